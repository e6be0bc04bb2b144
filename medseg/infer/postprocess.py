"""Post-processing of predicted label maps.

``largest-component``: per foreground class, keep only the largest connected component
(26-connectivity) and set the rest to background -- nnU-Net's "remove all but the largest
component" (Isensee et al., Nature Methods 2021). MONAI's ``KeepLargestConnectedComponent``
does the same but needs scikit-image or cuCIM, which medseg does not depend on, so this
uses ``scipy.ndimage.label`` on each class's bounding box.

**Chosen on validation data, as nnU-Net does** (``determine_postprocessing``): at every validation
the trainer scores each class with and without keeping its largest component
(:func:`choose_largest_component`) and writes the chosen classes to the run's
``postprocessing.json``; ``medseg infer --postprocess auto`` (the default) applies exactly that.
A class is chosen on a strict improvement of its mean validation Dice (nnU-Net's rule), or on a
tie when its reference mask is one connected component in every validation case (a
single-structure class: liver, spleen, heart). The tie is what a validation case without stray
components gives -- always, when the validation case is a training case, as in a study that
trains on every case of a tiny dataset -- and nnU-Net's strict rule then leaves a far-away false
positive on new data in place. Multi-focal classes (lesions, two kidneys) keep their components
unless removing them raised the validation Dice, and never when a validation reference or a training
label (its preprocessing properties' ``class_component_share``) shows the class as several structures
(10% or more of its voxels outside its largest component): on the abdominal validation CT of the
real-CT study the two lung bases were dropped to one with a few false-positive islands for a higher
Dice, which on a chest CT threw away a whole lung. A class that no validation reference contains (the
heart, when the validation case is an abdominal CT) cannot be judged there; it falls back on the
training references (``class_component_share`` of their preprocessing properties): kept to its largest component when it is one
connected component in every training label that holds it, else left alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medseg.data.preprocess import components as _components, reference_components
from medseg.evaluate.metrics import dice
from medseg.registry import Registry

__all__ = ["POSTPROCESSORS", "apply_postprocess", "choose_largest_component", "keep_largest_component",
           "largest_component_scores",
           "load_run_postprocessing", "write_run_postprocessing"]

RUN_FILE = "postprocessing.json"
MULTI_STRUCTURE_SHARE = 0.1  # a reference with >= 10% of a class's voxels outside its largest component: several structures


def keep_largest_component(mask: np.ndarray, labels: Sequence[int] | None = None) -> np.ndarray:
    """Keep the largest 26-connected component of each foreground class.

    Args:
        mask: ``(I, J, K)`` integer label map.
        labels: classes to process (default: every non-zero value present).

    Returns:
        A new label map of the same shape and dtype; removed voxels are 0.
    """
    out = mask.copy()
    values = np.unique(mask) if labels is None else np.asarray(labels)
    for v in values:
        if int(v) == 0:
            continue
        fg = out == v
        if not fg.any():
            continue
        box, comp, n = _components(fg)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        drop = (comp != int(np.argmax(sizes))) & (comp > 0)
        out[box][drop] = 0
    return out


POSTPROCESSORS = Registry("postprocess")
POSTPROCESSORS.register("none", lambda m: m)
POSTPROCESSORS.register("largest-component", keep_largest_component)


def apply_postprocess(mask: np.ndarray, name: str | dict | None) -> np.ndarray:
    """Apply the post-processing step called ``name`` (``None`` / ``"none"``: unchanged), or a run's
    choice ``{"largest_component_classes": [c, ...]}`` (see :func:`choose_largest_component`).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if isinstance(name, dict):
        classes = [int(c) for c in name.get("largest_component_classes", [])]
        return keep_largest_component(mask, classes) if classes else mask
    return POSTPROCESSORS.get(name or "none")(mask)


def largest_component_scores(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int], *,
                             ignore_label: int | None = None) -> dict[str, list[float]]:
    """One validation case: ``{class: [Dice without, Dice with largest-component, reference
    components, reference share outside its largest component]}`` (Dice NaN when the class is absent
    from both prediction and reference; the count of 26-connected components of the class in ``ref``
    and the share of its voxels outside the largest of them, 0 when absent); reference voxels equal to
    ``ignore_label`` are not scored."""
    ign = (ref == ignore_label) if ignore_label is not None else None
    out = {}
    for c in classes:
        r = ref == c
        n, share = reference_components(r)
        out[str(int(c))] = [dice(pred == c, r, ign), dice(keep_largest_component(pred, [int(c)]) == c, r, ign),
                            n, share]
    return out


def choose_largest_component(per_case: Sequence[dict[str, list[float]]],
                             training_single: dict[str, bool] | None = None,
                             training_multi: Iterable[str] | None = None) -> dict:
    """Per class, keep the largest component where that raises the mean validation Dice, or leaves
    it unchanged for a class that is one structure in every validation reference.

    nnU-Net's rule (Isensee et al. 2021, ``determine_postprocessing``), per class: the mean Dice
    over the validation cases (cases where the class is absent from prediction and reference do
    not count) with the class reduced to its largest 26-connected component, against without;
    chosen on a strict improvement. Added: a tie (within 1e-9) chooses it too when the class's
    reference is exactly one component in every counted case -- the validation data then say the
    class is a single structure, and a stray island on new data can only be a false positive. A
    loss never chooses it. Nor does a gain for a class that some validation reference shows as
    several structures (>= ``MULTI_STRUCTURE_SHARE`` of its voxels outside its largest component: two
    lungs, two kidneys, several lesions): there the gain comes from removing false-positive islands
    that outweigh the smaller true part on that case, and on a case that shows both parts in full
    (a chest CT's lungs, after an abdominal validation CT's lung bases) the step drops a whole organ.
    A class absent from every validation reference (never counted, or only
    predicted where the reference has none) has no validation evidence: it is chosen when
    ``training_single`` says it is one structure in every training reference that holds it
    (:func:`medseg.train.engine._training_structures`), and listed under ``"from_training_references"``.

    Args:
        per_case: :func:`largest_component_scores` of each validation case (``[before, after]``
            entries, without the component count, read as "not one structure"; without the share
            outside the largest component, as "not several structures").
        training_single: per class, one 26-connected component in every training label holding it
            (:func:`medseg.train.engine._training_structures`; ``None``: no fallback).
        training_multi: classes (strings) some training label shows as several structures (share
            outside the largest component >= ``MULTI_STRUCTURE_SHARE``, from the cases'
            ``class_component_share``): vetoed as a validation reference showing it would (a validation
            CT with one lung base in view cannot say the lungs are two).

    Returns:
        ``{"largest_component_classes": [c, ...], "dice_before": {c: d}, "dice_after": {c: d},
        "single_structure": {c: bool}, "multi_structure": {c: bool}, "from_training_references": [c, ...],
        "num_cases": n}`` (class
        keys as strings; a class never seen reads NaN and is chosen only by the fallback).
    """
    classes = sorted({c for case in per_case for c in case}, key=int)
    train_multi = {str(c) for c in (training_multi or ())}
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    single: dict[str, bool] = {}
    multi: dict[str, bool] = {}
    chosen, fallback = [], []
    for c in classes:
        valid = [case[c] for case in per_case if c in case and not any(np.isnan(v) for v in case[c][:2])]
        before[c] = float(np.mean([v[0] for v in valid])) if valid else float("nan")
        after[c] = float(np.mean([v[1] for v in valid])) if valid else float("nan")
        single[c] = bool(valid) and all(len(v) > 2 and v[2] == 1 for v in valid)
        multi[c] = any(len(v) > 3 and v[3] >= MULTI_STRUCTURE_SHARE for v in valid) or c in train_multi
        if multi[c]:
            continue  # two lungs, two kidneys, several lesions: the largest component alone drops real structure
        if valid and (after[c] > before[c] + 1e-9 or (single[c] and after[c] >= before[c] - 1e-9)):
            chosen.append(int(c))
        elif training_single and training_single.get(c) and all(len(v) > 2 and v[2] == 0 for v in valid):
            chosen.append(int(c))  # no validation reference holds the class: the training references decide
            fallback.append(int(c))
    return {"largest_component_classes": chosen, "dice_before": before, "dice_after": after,
            "single_structure": single, "multi_structure": multi, "from_training_references": fallback,
            "num_cases": len(per_case)}


def write_run_postprocessing(run_dir: str | Path, choice: dict) -> Path:
    """Write a :func:`choose_largest_component` result as ``<run_dir>/postprocessing.json`` (atomically)."""
    from medseg.io import atomic_write_text

    return atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(choice, indent=2, default=float) + "\n")


def load_run_postprocessing(run_dir: str | Path) -> dict | None:
    """The run's ``postprocessing.json`` (``None`` when training never validated)."""
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
