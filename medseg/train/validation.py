"""Validation during training: full sliding-window inference on the validation cases.

Each validation case is predicted whole with :func:`medseg.infer.sliding.sliding_window_predict`
(the same code path as ``medseg infer``; window = the training patch, ``infer.overlap`` /
``infer.blend`` / ``infer.sw_batch_size`` from the config) and scored on the **preprocessed
grid** against its preprocessed label (Dice and IoU per class, :mod:`medseg.evaluate.metrics`).
The summary has the layout of ``medseg evaluate``'s ``summary.json`` (nnU-Net's
``metric_per_case`` / ``mean`` / ``foreground_mean``, built by :func:`medseg.evaluate.evaluator.summarize`)
plus ``postprocessing``: per class, whether to keep the largest component (it raised the
validation Dice, nnU-Net's rule, or left it unchanged for a class that is one structure in every
validation reference, or -- for a class no validation reference holds -- in every training reference:
:func:`medseg.infer.postprocess.choose_largest_component`); the trainer
writes it to the run's ``postprocessing.json`` for ``medseg infer --postprocess auto``.

With DDP the cases are shared out over the ranks (``cases[rank::world]``) and the per-case
results gathered on every rank. The first ``train.tb_num_cases`` cases of rank 0 also return
their image, label, prediction and gate maps for the TensorBoard overlays, and where those maps
look is measured against the label (:func:`medseg.evaluate.gates.gate_localisation`, classes
dilated by :data:`~medseg.evaluate.gates.DEFAULT_MARGIN_MM`): rank 0's summary gets
``gate_localisation`` (``per_case``, ``mean``), logged as ``gate_loc/<map>/<class>/<metric>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from medseg.config import Config
from medseg.data.datasets import ignore_label_of
from medseg.evaluate.evaluator import summarize
from medseg.evaluate.gates import DEFAULT_MARGIN_MM, gate_localisation, mean_localisation
from medseg.evaluate.metrics import compute_metrics
from medseg.infer.postprocess import choose_largest_component, largest_component_scores
from medseg.infer.sliding import sliding_window_predict
from medseg.runtime import progress_enabled
from medseg.train.distributed import DistInfo, all_gather_objects

__all__ = ["CaseView", "ValidationResult", "mean_foreground_dice", "predict_preprocessed", "validate"]


@dataclass
class CaseView:
    """What TensorBoard draws of one case: arrays on the preprocessed grid."""

    case: str
    image: np.ndarray  # (C, X, Y, Z)
    label: np.ndarray  # (X, Y, Z)
    pred: np.ndarray  # (X, Y, Z)
    gates: dict[str, np.ndarray]  # name -> (X, Y, Z) in [0, 1]
    spacing: tuple[float, float, float]


@dataclass
class ValidationResult:
    summary: dict
    views: list[CaseView] = field(default_factory=list)

    @property
    def mean_fg_dice(self) -> float:
        return mean_foreground_dice(self.summary)


def mean_foreground_dice(summary: dict) -> float:
    """``foreground_mean.Dice`` of a summary; NaN (nothing to score) reads as 0."""
    v = summary.get("foreground_mean", {}).get("Dice", float("nan"))
    return 0.0 if v is None or math.isnan(v) else float(v)


@torch.no_grad()
def predict_preprocessed(model: torch.nn.Module, pre_dir: str | Path, name: str, *, patch_size: Sequence[int],
                         overlap: float, blend: str, sw_batch_size: int, amp_dtype: torch.dtype | None,
                         device: torch.device | str, channels_last: bool = False, return_attention: bool = False):
    """Load preprocessed case ``name`` of ``pre_dir`` and predict it whole (validation and hard-negative mining).

    The sliding window is the training patch ``(x, y, z)``; the argmax takes the first maximum on ties.

    Returns:
        ``(image (C, X, Y, Z), label (X, Y, Z), props, pred (X, Y, Z) uint8, gates)``; ``gates`` maps
        each gate name to a ``(1, X, Y, Z)`` tensor when ``return_attention``, else is empty.
    """
    from medseg.data.pipeline import load_case

    image, label, props = load_case(Path(pre_dir), name)
    out = sliding_window_predict(
        model, torch.from_numpy(np.ascontiguousarray(image)), roi_size=patch_size, overlap=overlap, blend=blend,
        sw_batch_size=sw_batch_size, precision=amp_dtype, device=device, return_attention=return_attention,
        channels_last=channels_last,
    )
    logits, gates = out if return_attention else (out, {})
    pred = logits.max(0).indices.to(torch.uint8).cpu().numpy()  # first maximum on ties, as argmax; ~10x faster on CPU
    return image, np.asarray(label[0]), props, pred, gates


def _score(pred: np.ndarray, label: np.ndarray, classes: Sequence[int], spacing, ignore_label: int | None = None) -> dict:
    ignore = (label == ignore_label) if ignore_label is not None else None  # nnU-Net v2's ignore label: not scored
    return {str(c): compute_metrics(pred == c, label == c, spacing, metrics=("dice", "iou"), ignore=ignore) for c in classes}


@torch.no_grad()
def validate(model: torch.nn.Module, cases: Sequence[str], pre_dir: str | Path, cfg: Config, *,
             patch_size: Sequence[int], num_classes: int, labels: dict[str, int], info: DistInfo,
             amp_dtype: torch.dtype | None, draw: int = 0,
             training_single: dict[str, bool] | None = None,
             training_multi: list[str] | None = None) -> ValidationResult:
    """Predict and score ``cases``; returns the gathered summary and (on rank 0) ``draw`` case views.

    Args:
        model: the bare network (not the DDP wrapper); its train/eval mode is restored.
        cases: validation case names (every rank passes the same list).
        patch_size: sliding-window size ``(x, y, z)``.
        num_classes: K, background included; classes ``1..K-1`` are scored.
        labels: ``plans["labels"]`` (name -> value), for the summary's ``label_names``.
        training_single: per class, one structure in every training label that holds it
            (:func:`medseg.train.engine._training_structures`): the post-processing choice
            for classes no validation reference contains.
        training_multi: classes some training label shows as several structures
            (:func:`medseg.train.engine._training_structures`): never reduced to their largest component.
    """
    mine = list(cases)[info.rank::info.world_size]
    classes = list(range(1, num_classes))
    per_case, views, gate_loc = [], [], {}
    for i, name in enumerate(tqdm(mine, desc="validation", leave=False, disable=not (info.is_main and progress_enabled()) or None)):
        want_gates = info.is_main and i < draw
        image, ref, props, pred, gates = predict_preprocessed(
            model, pre_dir, name, patch_size=patch_size, overlap=cfg.infer.overlap, blend=cfg.infer.blend,
            sw_batch_size=cfg.infer.sw_batch_size, amp_dtype=amp_dtype, device=info.device,
            channels_last=cfg.train.channels_last, return_attention=want_gates)
        spacing = tuple(float(s) for s in props.get("spacing", [1.0, 1.0, 1.0]))
        per_case.append({"case": name, "prediction_file": None, "reference_file": f"cases/{name}_label.npy",
                         "metrics": _score(pred, ref, classes, spacing, ignore_label_of(labels)),
                         "largest_component": largest_component_scores(pred, ref, classes,
                                                                       ignore_label=ignore_label_of(labels))})
        if want_gates:
            views.append(CaseView(name, np.asarray(image), ref, pred,
                                  {k: g[0].float().cpu().numpy() for k, g in gates.items()}, spacing))
            if gates:
                gate_loc[name] = gate_localisation(views[-1].gates, ref, spacing=spacing, classes=classes,
                                                   ignore_label=ignore_label_of(labels))
    gathered = [c for part in all_gather_objects(per_case, info) for c in part]
    gathered.sort(key=lambda c: c["case"])
    postprocessing = choose_largest_component([c.pop("largest_component") for c in gathered], training_single,
                                              training_multi)
    mean, fg_mean = summarize(gathered)
    names = {str(v): k for k, v in labels.items() if int(v) != 0}
    summary = {"metric_per_case": gathered, "mean": mean, "foreground_mean": fg_mean, "label_names": names,
               "metrics": ["dice", "iou"], "grid": "preprocessed", "postprocessing": postprocessing}
    if gate_loc:
        summary["gate_localisation"] = {"per_case": gate_loc, "mean": mean_localisation(list(gate_loc.values())),
                                        "margin_mm": DEFAULT_MARGIN_MM, "resampling": "maps stitched on the label grid"}
    return ValidationResult(summary, views)
