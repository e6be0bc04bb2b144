"""The run-directory predictor: volumes in, masks / probabilities / gate maps out, in the input's grid.

``Predictor.from_run(run_dir)`` reads what ``medseg train`` wrote (``config.yaml``,
``plans.json``, ``checkpoints/<name>.pt``) and rebuilds the network with deep supervision off.
``predict(path)`` then runs nnU-Net's inference recipe (Isensee et al., Nature Methods 2021):
preprocess exactly as in training -> Gaussian-weighted sliding window (optionally mirrored along
the axes training mirrored: ``plans.json``'s ``inference_allowed_mirroring_axes``) ->
softmax on the preprocessed grid -> probabilities back to the original grid (un-crop, linear
resampling, undo the reorientation: ``medseg.data.preprocess.restore_to_original``) -> arg-max
there. The class dimension is processed in chunks so that no full-resolution float32 copy of
all classes is needed; nothing is ever float64.

A run trained on several image channels (nnU-Net's ``<case>_0000``, ``<case>_0001``, ...) takes
one co-registered file per channel, in channel order (``predict([ct, pet])``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.config import Config, InferConfig, load_config
from medseg.errors import ConfigError, InputError
from medseg.infer.postprocess import apply_postprocess, load_run_postprocessing
from medseg.infer.sliding import ALL_AXES, allowed_mirror_axes, sliding_window_predict
from medseg.io import Volume, case_name, read_volume, split_channel_tag
from medseg.runtime import get_logger, resolve_channels_last, resolve_device, resolve_precision

__all__ = ["CHECKPOINT_NAMES", "CPU_WINDOW_VOXELS", "PredictionResult", "Predictor", "check_not_label", "cpu_window_batch",
           "load_run", "run_channels", "run_mirror_axes"]

CHECKPOINT_NAMES = ("best", "final", "latest")
RESTORE_BUDGET_BYTES = 512 * 2**20  # float32 bytes per chunk of classes on the original grid
log = get_logger(__name__)


@dataclass
class PredictionResult:
    """What :meth:`Predictor.predict` returns, everything in the input's own voxel grid.

    Attributes:
        case: case name (input file name without suffix and nnU-Net's channel tag ``_0000``).
        mask: ``uint8`` label map, the input's shape and affine.
        probabilities: ``(K, I, J, K)`` float16 softmax probabilities (channel ``c`` = label
            value ``c``), or ``None`` unless requested.
        gates: gate maps ``{name: Volume}`` (float32 in [0, 1]), empty unless requested.
        properties: the preprocessing properties of the case.
        timings: wall seconds per stage: ``load`` (file reading, :meth:`Predictor.predict` only),
            ``preprocess``, ``sliding_window``, ``restore`` (softmax, back to the original grid,
            arg-max, post-processing, gate maps).
    """

    case: str
    mask: Volume
    probabilities: np.ndarray | None = None
    gates: dict[str, Volume] = field(default_factory=dict)
    properties: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def check_not_label(vol: Volume, num_classes: int) -> None:
    """Refuse a label map passed as the image: integer values in ``0..num_classes`` and no air.

    Raises:
        InputError: ``"<path>: looks like a label map ..."``.
    """
    arr = vol.array
    if float(arr.min()) < -500:  # CT has air at about -1000 HU
        return
    sub = arr[::2, ::2, ::2]
    if np.issubdtype(sub.dtype, np.floating) and not np.array_equal(sub, np.round(sub)):
        return
    values = np.unique(sub)
    if len(values) <= max(num_classes, 2) and values.min() >= 0 and values.max() <= max(num_classes, 2):
        raise InputError(
            f"{vol.path}: looks like a label map, not a CT image (only the integer values "
            f"{values.astype(int).tolist()}, no air below -500 HU); pass the image file instead"
        )


# --------------------------------------------------------------------------- run directory
def run_channels(plans: dict) -> list[str]:
    """The image channel names of a run, in channel order (``plans.json``'s ``channel_names``;
    one ``CT`` channel when absent)."""
    names = plans.get("channel_names") or {"0": "CT"}
    return [str(names[k]) for k in sorted(names, key=int)]


def run_mirror_axes(cfg: Config, plans: dict) -> list[int]:
    """The axes test-time mirroring may flip: ``plans.json``'s ``inference_allowed_mirroring_axes``
    (written when training starts), else those the run's ``train.augment`` mirrored (older runs)."""
    if "inference_allowed_mirroring_axes" in plans:
        axes = plans["inference_allowed_mirroring_axes"] or []
        if not isinstance(axes, list) or any(isinstance(a, bool) or a not in ALL_AXES for a in axes):
            raise InputError(f"plans.json: inference_allowed_mirroring_axes must list axes 0, 1, 2, got {axes!r}")
        return sorted(set(axes))
    return allowed_mirror_axes(cfg.train.augment)


def _strip_prefixes(state: dict) -> dict:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` key prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_run(run_dir: str | Path, checkpoint: str | None = "best", overrides: list[str] | None = None,
             map_location: str | torch.device = "cpu") -> tuple[Config, dict, dict, Path]:
    """``(config, plans, model state dict, checkpoint path)`` of a run directory.

    ``checkpoint=None`` takes the config's ``infer.checkpoint``.

    Raises:
        InputError: a missing run directory, ``config.yaml``, ``plans.json`` or checkpoint
            (the message names the file and lists the checkpoints that exist), or a checkpoint
            without a ``model`` entry.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run}: run directory not found")
    cfg_path, plans_path = run / "config.yaml", run / "plans.json"
    for p in (cfg_path, plans_path):
        if not p.is_file():
            raise InputError(f"{p}: missing; a run directory needs config.yaml, plans.json and checkpoints/<name>.pt")
    cfg = load_config(cfg_path, overrides)
    checkpoint = checkpoint or cfg.infer.checkpoint
    if checkpoint not in CHECKPOINT_NAMES:
        raise InputError(f"checkpoint '{checkpoint}' is not valid (use one of {', '.join(CHECKPOINT_NAMES)})")
    ckpt = run / "checkpoints" / f"{checkpoint}.pt"
    if not ckpt.is_file():
        have = sorted(p.stem for p in (run / "checkpoints").glob("*.pt")) if (run / "checkpoints").is_dir() else []
        raise InputError(f"{ckpt}: checkpoint not found (available: {', '.join(have) or 'none'})")
    from medseg.data.pipeline import load_plans
    from medseg.train.checkpoint import load_checkpoint

    plans = load_plans(run)
    payload = load_checkpoint(ckpt, map_location=map_location)  # weights_only=True
    return cfg, plans, _strip_prefixes(payload["model"]), ckpt


def build_inference_model(cfg: Config, plans: dict, state: dict, source: str = "checkpoint") -> torch.nn.Module:
    """The network of ``cfg.model`` with deep supervision off, weights loaded, in eval mode.

    Keys that only a deep-supervision head has are tolerated when the run trained with one;
    any other mismatch raises :class:`InputError` naming ``source``.
    """
    from medseg.nn import build_model

    model_cfg = dataclasses.replace(cfg.model, deep_supervision=False)
    num_classes = cfg.model.num_classes or int(plans["num_classes"])
    model = build_model(model_cfg, in_channels=len(run_channels(plans)), num_classes=num_classes,
                        spacing=plans.get("target_spacing"))
    result = model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys) if cfg.model.deep_supervision else []
    bad_unexpected = [] if cfg.model.deep_supervision else list(result.unexpected_keys)
    if result.missing_keys or bad_unexpected:
        raise InputError(
            f"{source}: weights do not match the model in config.yaml "
            f"(missing: {result.missing_keys[:5]}, unexpected: {bad_unexpected[:5]})"
        )
    if unexpected:
        log.debug("ignored %d deep-supervision keys of %s", len(unexpected), source)
    return model.eval()


# --------------------------------------------------------------------------- predictor
CPU_WINDOW_VOXELS = InferConfig.cpu_window_voxels  # the config's default (4 M voxels)


def cpu_window_batch(sw_batch_size: int, roi_size: Sequence[int], device: torch.device, amp_dtype,
                     max_voxels: int = CPU_WINDOW_VOXELS) -> int:
    """Windows per forward: on the CPU, at most what keeps one forward under ``max_voxels`` window
    voxels (twice that under bf16 / fp16 autocast), at least 1; unchanged on CUDA or when
    ``max_voxels`` is 0.

    A forward's activations grow with its windows. Measured on the 512x512x133 chest CT,
    attention U-Net 16..256, fp32, window 176x128x160 (3.6 M voxels): peak RSS 3.94 GB with 2
    windows per forward, 2.43 GB with 1 (``benchmarks/infer_speed.py``); on a busy 1-thread run
    the single-window forward took 1.3x the wall time, so the cap trades some speed for memory.
    """
    if device.type != "cpu" or not max_voxels or max_voxels < 0:
        return int(sw_batch_size)
    budget = max_voxels * (2 if amp_dtype in (torch.bfloat16, torch.float16) else 1)
    fit = max(1, int(budget // max(1, math.prod(int(v) for v in roi_size))))
    if fit < sw_batch_size:
        log.info("CPU: %d window(s) of %s per forward instead of %d (infer.cpu_window_voxels=%d keeps the peak "
                 "memory down; 0 lifts the cap)", fit, "x".join(map(str, roi_size)), sw_batch_size, max_voxels)
    return min(int(sw_batch_size), fit)


class Predictor:
    """Segment volumes with one network and its plans.

    Args:
        model: the network (eval mode is set), or ``None`` when a subclass overrides
            :meth:`predict_preprocessed` (e.g. an oracle in tests).
        plans: ``plans.json`` content (spacing, normalization, ``patch_size``, ``num_classes``).
        roi_size: sliding-window size (default: ``plans["patch_size"]``).
        device / precision: ``auto`` or explicit (see :mod:`medseg.runtime`).
        overlap, blend, sw_batch_size, tta: see :func:`sliding_window_predict`; on the CPU the
            windows per forward are capped by ``cpu_window_voxels`` (:func:`cpu_window_batch`).
        mirror_axes: the axes TTA may flip, those training mirrored (:func:`run_mirror_axes`;
            default all three). With ``tta`` and none allowed, a warning and one pass.
        channels_last: ``"auto"`` (default: on for 3D nets on the CPU), ``True`` or ``False``; see
            :func:`medseg.runtime.resolve_channels_last`.
        postprocess: ``None`` / ``"none"``, ``"largest-component"`` (every class) or a run's choice
            ``{"largest_component_classes": [...]}`` (:func:`~medseg.infer.postprocess.choose_largest_component`).
        progress: a tqdm bar over the windows of each case (named after the case).
    """

    def __init__(self, model: torch.nn.Module | None, plans: dict, *, roi_size=None, device: str = "auto",
                 precision: str = "auto", overlap: float = 0.5, blend: str = "gaussian", sw_batch_size: int = 2,
                 tta: bool = False, mirror_axes: Sequence[int] = ALL_AXES,
                 channels_last: bool | str | None = "auto", postprocess: str | dict | None = None, progress: bool = False,
                 cpu_window_voxels: int = CPU_WINDOW_VOXELS):
        if not 0.0 <= float(overlap) < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
        if blend not in ("gaussian", "constant"):
            raise ConfigError(f"blend must be gaussian or constant, got {blend!r}")
        if int(sw_batch_size) < 1:
            raise ConfigError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.plans = plans
        self.num_classes = int(plans["num_classes"])
        self.device = resolve_device(device)
        self.amp_dtype = resolve_precision(precision, self.device)
        self.roi_size = list(roi_size or plans["patch_size"])
        self.overlap, self.blend = float(overlap), blend
        self.sw_batch_size = cpu_window_batch(int(sw_batch_size), self.roi_size, self.device, self.amp_dtype,
                                              cpu_window_voxels)
        self.channel_names = run_channels(plans)
        self.mirror_axes = sorted({int(a) for a in mirror_axes})
        if any(a not in ALL_AXES for a in self.mirror_axes):
            raise ConfigError(f"mirror_axes must be spatial axes 0, 1 or 2, got {list(mirror_axes)}")
        if tta and not self.mirror_axes:
            log.warning("--tta: this model was trained without mirroring (train.augment.p_mirror = 0 or no "
                        "mirror_axes), so test-time mirroring has nothing to average; predicting once")
        self.tta, self.postprocess, self.progress = bool(tta) and bool(self.mirror_axes), postprocess, progress
        self.channels_last = resolve_channels_last(channels_last, self.device, model)
        try:
            apply_postprocess(np.zeros((1, 1, 1), np.uint8), postprocess)  # fail early on a bad name
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.model = model
        if model is not None:
            model.to(self.device).eval()
            if self.channels_last:
                model.to(memory_format=torch.channels_last_3d)

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str | None = "best", device: str | None = "auto",
                 precision: str | None = "auto", overlap: float | None = None, blend: str | None = None, sw_batch_size: int | None = None,
                 tta: bool | None = None, overrides: list[str] | None = None, **kwargs: Any) -> Predictor:
        """A predictor for a training run directory; options given as ``None`` come from the run's
        ``infer`` section (after ``overrides``), the window size from ``data.patch_size`` or the plans.
        ``postprocess`` defaults to ``"auto"``: what the run chose on its validation cases
        (``postprocessing.json``, see :mod:`medseg.infer.postprocess`; none when it never validated).

        Raises:
            InputError: missing ``config.yaml`` / ``plans.json`` / checkpoint, or mismatched weights.
        """
        cfg, plans, state, ckpt = load_run(run_dir, checkpoint, overrides)
        model = build_inference_model(cfg, plans, state, source=str(ckpt))
        inf = cfg.infer
        roi = kwargs.pop("roi_size", None) or cfg.data.patch_size or plans["patch_size"]
        kwargs.setdefault("mirror_axes", run_mirror_axes(cfg, plans))
        if kwargs.get("postprocess", "auto") == "auto":  # the run's choice on validation data, as nnU-Net
            kwargs["postprocess"] = load_run_postprocessing(run_dir) or "none"
        return cls(model, plans, roi_size=roi, device=device or inf.device, precision=precision or inf.precision,
                   overlap=inf.overlap if overlap is None else overlap, blend=blend or inf.blend,
                   sw_batch_size=sw_batch_size or inf.sw_batch_size, tta=inf.tta if tta is None else tta,
                   cpu_window_voxels=kwargs.pop("cpu_window_voxels", inf.cpu_window_voxels), **kwargs)

    # ------------------------------------------------------------------ public API
    def predict(self, path: str | Path | Sequence[str | Path], *, probabilities: bool = False, gates: bool = False,
                case: str | None = None) -> PredictionResult:
        """Segment one volume file or DICOM folder, or a multi-channel run's channel files in
        channel order (see :meth:`predict_volume`); ``case`` defaults to the file's case name."""
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        t0 = time.perf_counter()
        vols = [read_volume(p) for p in paths]
        load_s = time.perf_counter() - t0
        if case is None:
            case = case_name(paths[0]) if len(paths) == 1 else split_channel_tag(paths[0])[0]
        result = self.predict_volume(vols, case=case, probabilities=probabilities, gates=gates)
        result.timings = {"load": load_s, **result.timings}
        return result

    def predict_array(self, array: np.ndarray, affine: np.ndarray, *, probabilities: bool = False,
                      gates: bool = False, case: str = "array") -> PredictionResult:
        """Segment an ``(I, J, K)`` array in HU (``(C, I, J, K)`` for a multi-channel run) with its
        voxel -> RAS+ mm ``affine``."""
        array, affine = np.asarray(array), np.asarray(affine, dtype=np.float64)
        vols = [Volume(a, affine, case) for a in (array if array.ndim == 4 else [array])]
        return self.predict_volume(vols, case=case, probabilities=probabilities, gates=gates)

    def predict_volume(self, vol: Volume | Sequence[Volume], *, case: str | None = None, probabilities: bool = False,
                       gates: bool = False) -> PredictionResult:
        """Mask (and optionally probabilities and gate maps) of ``vol``, on ``vol``'s own grid.

        Args:
            vol: the image, or one co-registered volume per channel of the run, in channel order.

        Raises:
            InputError: a channel count other than the run's, a volume that looks like a label
                map or not like CT (see preprocessing).
            GeometryError: channels on different grids.
        """
        from medseg.data.preprocess import preprocess_volume

        vols = [vol] if isinstance(vol, Volume) else list(vol)
        self.check_channels(vols)
        case = case or (case_name(vols[0].path) if vols[0].path else "case")
        t0 = time.perf_counter()
        for v, name in zip(vols, self.channel_names):
            if name.upper() == "CT":
                check_not_label(v, self.num_classes)
        image, _, props = preprocess_volume(vols, self.plans, case=case)
        vol = vols[0]
        t1 = time.perf_counter()
        logits, gate_maps = self.predict_preprocessed(image, props, gates)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest stage timings: wait for queued kernels
        t2 = time.perf_counter()
        del image
        mask, probs = self.logits_to_original(logits, props, keep_probabilities=probabilities)
        del logits
        mask = apply_postprocess(mask, self.postprocess)
        affine = vol.affine.copy()
        gate_vols = {name: Volume(self._restore_map(g, props), affine.copy(), vol.path) for name, g in gate_maps.items()}
        timings = {"preprocess": t1 - t0, "sliding_window": t2 - t1, "restore": time.perf_counter() - t2}
        return PredictionResult(case, Volume(mask, affine, vol.path), probs, gate_vols, props, timings)

    def check_channels(self, vols: Sequence[Volume]) -> None:
        """Refuse a number of image volumes other than the run's channel count.

        Raises:
            InputError: names the first file, the run's channels and the file names it expects.
        """
        n = len(self.channel_names)
        if len(vols) != n:
            first = vols[0].path if vols and vols[0].path else "input"
            names = ", ".join(f"{i}: {c}" for i, c in enumerate(self.channel_names))
            raise InputError(f"{first}: this run was trained on {n} image channel(s) ({names}), got {len(vols)}; "
                             f"pass one file per channel, named <case>_0000 ... <case>_{n - 1:04d}")

    # ------------------------------------------------------------------ steps
    def predict_preprocessed(self, image: np.ndarray, properties: dict,
                             gates: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits ``(K, X, Y, Z)`` and gate maps ``{name: (1, X, Y, Z)}`` on the preprocessed grid.

        The hook a test oracle overrides; the default runs :func:`sliding_window_predict`.
        """
        if self.model is None:
            raise RuntimeError("Predictor has no model; pass one or override predict_preprocessed")
        out = sliding_window_predict(
            self.model, torch.from_numpy(image), roi_size=self.roi_size, overlap=self.overlap, blend=self.blend,
            sw_batch_size=self.sw_batch_size, precision=self.amp_dtype, device=self.device, tta=self.tta,
            mirror_axes=self.mirror_axes,
            return_attention=gates, channels_last=self.channels_last,
            progress=properties.get("case", True) if self.progress else False,
        )
        return out if gates else (out, {})

    @torch.inference_mode()
    def logits_to_original(self, logits: torch.Tensor, properties: dict, *,
                           keep_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Softmax on the preprocessed grid, probabilities back to the original grid, arg-max there.

        Args:
            logits: ``(K, X, Y, Z)`` on the preprocessed grid (any float dtype / device); the
                softmax is written into it in slabs along X.
            properties: the case's preprocessing properties.
            keep_probabilities: also return ``(K, I, J, K)`` float16 probabilities.

        Returns:
            ``uint8`` mask ``(I, J, K)`` and the probabilities or ``None``.
        """
        from medseg.data.preprocess import reorient_to_original, restore_to_original

        probs = _softmax_inplace(logits)
        k = probs.shape[0]
        n_vox = int(np.prod(properties["original_shape"]))
        chunk = max(1, min(k, RESTORE_BUDGET_BYTES // max(1, 4 * n_vox)))
        # resample on the compute device even when the stitched buffer fell back to the CPU
        work = self.device if self.device.type == "cuda" else probs.device
        best_val = best_idx = None
        kept = np.empty((k, *properties["original_shape"]), dtype=np.float16) if keep_probabilities else None
        for c0 in range(0, k, chunk):
            c1 = min(k, c0 + chunk)
            fill = [1.0 if c == 0 else 0.0 for c in range(c0, c1)]  # outside the crop: background
            # arg-max on the reoriented grid; only the uint8 result is reoriented (1 byte per voxel, not 4 per class)
            restored = restore_to_original(probs[c0:c1].to(work, torch.float32), properties, mode="linear", fill=fill,
                                           reorient=False)
            val, idx = restored.max(dim=0)  # first maximum on ties, as argmax
            idx = idx.to(torch.uint8).add_(c0)
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                better = val > best_val  # strict: an earlier class keeps a tie
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx, best_idx)
            if kept is not None:
                kept[c0:c1] = reorient_to_original(restored.to(torch.float16), properties).cpu().numpy()
            del restored, val, idx
        return reorient_to_original(best_idx, properties).cpu().numpy(), kept

    @staticmethod
    @torch.inference_mode()
    def _restore_map(gate: torch.Tensor, properties: dict) -> np.ndarray:
        """A ``(1, X, Y, Z)`` gate map on the original grid, float32 clipped to [0, 1]."""
        from medseg.data.preprocess import restore_to_original

        out = restore_to_original(gate.float(), properties, mode="linear", fill=0.0)[0]
        return out.clamp_(0.0, 1.0).cpu().numpy()


def _softmax_inplace(logits: torch.Tensor, slab_voxels: int = 2**24) -> torch.Tensor:
    """Softmax over channels, computed in float32 slabs along X and written back into ``logits``."""
    k, nx = logits.shape[0], logits.shape[1]
    step = max(1, slab_voxels // max(1, k * int(np.prod(logits.shape[2:]))))
    for x0 in range(0, nx, step):
        sl = logits[:, x0:x0 + step]
        sl.copy_(torch.softmax(sl.float(), dim=0))
    return logits
