"""Sliding-window inference over MONAI's ``sliding_window_inference``.

The volume is cut into overlapping ``roi_size`` windows, each window is run through the
model (optionally once per subset of the mirror axes the model was trained with, up to 8
times: nnU-Net's test-time augmentation, Isensee et al., Nature Methods 2021, which mirrors
only its ``inference_allowed_mirroring_axes``), and the window outputs are blended back with
a Gaussian importance map (nnU-Net; MONAI ``mode="gaussian"``) or uniformly.

Mirror axes are the spatial axes ``0, 1, 2`` of the preprocessed ``(C, X, Y, Z)`` image, the
array that training augments (``train.augment.mirror_axes`` flips the same axes of the same
RAS-reoriented, resampled, cropped array); a window ``(B, C, X, Y, Z)`` flips dim ``axis + 2``.

Memory (what a 512x512x300 CT with 14 classes needs):

- MONAI accumulates the stitched output in the **dtype of the input tensor**
  (``compute_dtype = inputs.dtype`` in MONAI 1.6). Under fp16 / bf16 autocast we therefore
  hand it the image already cast to the autocast dtype -- exactly the cast autocast makes
  before the first convolution anyway -- and cast every window output to that dtype in
  :class:`WindowPredictor`; the logit buffer is then half precision. Without autocast
  everything stays float32. No float64 copy is ever made.
- Windows run on ``device``; the stitching buffer lives on ``buffer_device``. ``None`` picks
  the compute device when the estimated buffer fits into its free memory, the CPU otherwise
  (MONAI's ``sw_device`` / ``device`` arguments). The environment variable
  ``MEDSEG_BUFFER_DEVICE`` (``cpu``, ``cuda``, ``cuda:i``; unset / ``auto``: that choice) forces
  the buffer device of every call that leaves it ``None``, e.g. ``MEDSEG_BUFFER_DEVICE=cpu medseg
  infer ...`` runs the CPU-stitching fallback on a GPU that has the memory
  (``benchmarks/gpu_check.py`` compares both). The choice is logged at DEBUG level
  (``MEDSEG_LOGLEVEL=DEBUG``). Why not MONAI's ``SlidingWindowInfererAdapt``, which makes the
  same choice by trial: it runs the whole volume with GPU buffers, and on a CUDA out-of-memory
  error starts again buffered, then with CPU stitching (remembering the size). Ours decides
  before the first window from the buffer estimate and the device's free memory, so no window
  runs twice and no OOM is provoked on a GPU shared with other jobs; and the decision is a pure
  function a CPU test checks (``tests/test_infer_sliding.py``: ``pick_buffer_device`` with a
  mocked ``mem_get_info``), where MONAI's path is reached only by a real CUDA OOM.
- Gate maps (``model(x, return_attention=True)``) come back at their own coarse resolution;
  they are upsampled to the window size inside the window (trilinear, align_corners=False)
  and stitched by the same call as the logits (MONAI takes dict outputs). Stitching them at
  the coarse resolution would need every window start to be a multiple of the zoom factor,
  which the last window of an axis rarely is (MONAI truncates the scaled slice bounds).

2.5D models (a ``z_halo`` H > 0, :mod:`medseg.nn.slice25d`): a window's outputs for the H slices at
each of its z ends were computed with replicated, invented neighbours, so they get zero blending
weight (the importance map, Gaussian or constant, is zero there: MONAI's ``roi_weight_map``). As in
training, a window is ``roi_z + 2H`` slices deep (``roi_size`` is what the net predicts per window,
the training patch), cut to the padded volume's depth; the volume is replicate-padded by H slices at
its own two ends (the only place where a neighbour is a copy) and the result cropped back; the z
overlap is raised to at least ``2H / window_z`` so that every slice is interior to some window. A slice's
prediction is then the same whatever the window plan, e.g. at a seam between two windows as with
one window over the whole volume. 3-D models (no ``z_halo``) are blended exactly as before.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from tqdm.auto import tqdm

from medseg.errors import ConfigError
from medseg.nn.slice25d import crop_z_halo, z_halo
from medseg.runtime import autocast, get_logger, resolve_precision

__all__ = ["WindowPredictor", "allowed_mirror_axes", "buffer_device_override", "count_windows", "estimate_buffer_bytes",
           "pick_buffer_device", "round_roi", "sliding_window_predict"]

log = get_logger(__name__)
BUFFER_DEVICE_ENV = "MEDSEG_BUFFER_DEVICE"

LOGITS_KEY = "__logits__"
ALL_AXES = (0, 1, 2)  # spatial axes of a (C, X, Y, Z) image


def round_roi(roi_size: Sequence[int], divisor: Sequence[int] | int | None) -> tuple[int, ...]:
    """Round each window size up to a multiple of the model's ``patch_divisor``."""
    roi = [int(r) for r in roi_size]
    if len(roi) != 3:
        raise ValueError(f"roi_size must have 3 entries (x, y, z), got {roi_size}")
    div = [1, 1, 1] if divisor is None else ([int(divisor)] * 3 if np.isscalar(divisor) else [int(d) for d in divisor])
    return tuple(int(math.ceil(r / d) * d) for r, d in zip(roi, div))


def allowed_mirror_axes(augment) -> list[int]:
    """The spatial axes a run's training mirrored (``train.augment``): ``mirror_axes`` when
    ``p_mirror > 0``, else none. What test-time mirroring may flip (nnU-Net's
    ``inference_allowed_mirroring_axes``). An unresolved ``"auto"`` counts as all three
    (:meth:`medseg.config.AugmentConfig.flip_axes`)."""
    return sorted(set(augment.flip_axes())) if float(augment.p_mirror) > 0 else []


def _mirror_sets(tta: bool, axes: Sequence[int] = ALL_AXES) -> list[tuple[int, ...]]:
    """The flips of test-time mirroring as window dims: ``()`` alone, or every subset of ``axes``
    (spatial axes of the image, 0..2; 3 axes give 8 flips)."""
    dims = sorted({int(a) + 2 for a in axes}) if tta else []
    return [c for n in range(len(dims) + 1) for c in itertools.combinations(dims, n)]


class WindowPredictor:
    """The ``predictor`` handed to MONAI: one batch of windows in, stitchable outputs out.

    Args:
        model: ``model(x) -> (B, K, *roi)`` logits, or with ``return_attention`` a pair
            ``(logits, {name: (B, 1, x, y, z)})`` with each map at its own resolution.
        device: where the model runs.
        amp_dtype: autocast dtype or ``None`` (fp32).
        out_dtype: dtype of what MONAI accumulates (must equal the input window dtype).
        tta: average over the mirrorings (flip, predict, flip back) of ``mirror_axes``.
        mirror_axes: spatial axes (0..2 of the image) test-time mirroring may flip.
        return_attention: also return the gate maps, upsampled to the window size.
        channels_last: feed windows in ``torch.channels_last_3d`` memory format.

    Call: ``x (B, C, *roi)`` -> ``(B, K, *roi)`` tensor, or a dict ``{LOGITS_KEY: logits,
    name: (B, 1, *roi)}`` when ``return_attention``; all in ``out_dtype``.
    """

    def __init__(self, model: torch.nn.Module, *, device: torch.device, amp_dtype: torch.dtype | None,
                 out_dtype: torch.dtype, tta: bool = False, mirror_axes: Sequence[int] = ALL_AXES,
                 return_attention: bool = False, channels_last: bool = False, bar=None):
        self.model = model
        self.device = device
        self.amp_dtype = amp_dtype
        self.out_dtype = out_dtype
        self.flips = _mirror_sets(tta, mirror_axes)
        self.return_attention = return_attention
        self.channels_last = channels_last
        self.bar = bar  # a tqdm bar advanced by the windows of each call

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(self.device, self.amp_dtype):
            out = self.model(x, return_attention=True) if self.return_attention else self.model(x)
        logits, gates = out if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) else (out, {})
        if isinstance(logits, (list, tuple)):  # deep supervision left on: full resolution first
            logits = logits[0]
        return logits, gates

    def __call__(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        x = x.to(self.device, dtype=torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        size = tuple(x.shape[2:])
        logit_sum: torch.Tensor | None = None
        gate_sum: dict[str, torch.Tensor] = {}
        for axes in self.flips:
            logits, gates = self._forward(torch.flip(x, axes) if axes else x)
            logits = (torch.flip(logits, axes) if axes else logits).float()
            logit_sum = logits if logit_sum is None else logit_sum + logits
            for name, g in gates.items():
                g = F.interpolate(g.float(), size=size, mode="trilinear", align_corners=False) if tuple(g.shape[2:]) != size else g.float()
                g = torch.flip(g, axes) if axes else g
                gate_sum[name] = g if name not in gate_sum else gate_sum[name] + g
        n = float(len(self.flips))
        if self.bar is not None:
            self.bar.update(x.shape[0])
        logits = (logit_sum / n).to(self.out_dtype)
        if not self.return_attention:
            return logits
        out = {LOGITS_KEY: logits}
        out.update({name: (g / n).to(self.out_dtype) for name, g in gate_sum.items()})
        return out


def count_windows(image_shape: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float]) -> int:
    """How many windows MONAI's ``sliding_window_inference`` visits (its scan-interval rule).

    The one window count (the benchmarks use it too). ``image_shape`` may carry leading batch /
    channel axes: its last ``len(roi_size)`` entries are the spatial size. ``overlap``: one value
    or one per axis.
    """
    size = [max(int(s), int(r)) for s, r in zip(image_shape[-len(roi_size):], roi_size)]
    ovs = [float(overlap)] * len(roi_size) if np.isscalar(overlap) else [float(o) for o in overlap]
    interval = [r if r == s else max(int(r * (1 - o)), 1) for s, r, o in zip(size, roi_size, ovs)]
    return len(dense_patch_slices(size, roi_size, interval))


def estimate_buffer_bytes(image_shape: Sequence[int], roi_size: Sequence[int], n_out_channels: int,
                          n_maps: int, dtype: torch.dtype) -> int:
    """Bytes MONAI allocates for stitching: output + count map per output, and the input copy.

    ``n_out_channels`` logits plus ``n_maps`` one-channel gate maps, each output with its own
    one-channel count map, on the grid padded to at least ``roi_size``.
    """
    vox = int(np.prod([max(int(s), int(r)) for s, r in zip(image_shape[-3:], roi_size)]))
    item = torch.empty((), dtype=dtype).element_size()
    return vox * item * (n_out_channels + 1 + 2 * n_maps)


def buffer_device_override() -> torch.device | None:
    """The stitching-buffer device forced by ``MEDSEG_BUFFER_DEVICE``, or ``None`` (the automatic choice).

    Returns:
        ``torch.device`` of the variable's value (``cpu``, ``cuda``, ``cuda:i``); ``None`` when it is
        unset, empty or ``auto``.

    Raises:
        ConfigError: a value that is not a device name.
    """
    value = os.environ.get(BUFFER_DEVICE_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    try:
        return torch.device(value)
    except RuntimeError:
        raise ConfigError(f"{BUFFER_DEVICE_ENV}={value!r} is not a device (use auto, cpu, cuda or cuda:i)") from None


def pick_buffer_device(device: torch.device, needed_bytes: int, *, headroom: float = 0.8) -> torch.device:
    """``device`` when ``needed_bytes`` fits into ``headroom`` x its free memory, else the CPU."""
    if device.type != "cuda":
        return torch.device("cpu") if device.type == "cpu" else device
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cache is reusable
    return device if needed_bytes <= headroom * free else torch.device("cpu")


def z_halo_plan(image_shape: Sequence[int], roi: Sequence[int], overlap: float, halo: int, blend: str
                ) -> tuple[tuple[int, ...], tuple[float, ...], torch.Tensor]:
    """The window plan of a model with a z halo of ``halo`` slices over a ``(C, X, Y, Z)`` volume
    that is replicate-padded by ``halo`` slices at both z ends (module docstring).

    Returns:
        the window: ``roi`` with ``2 * halo`` more slices, cut to the padded depth; the per-axis
        overlap, z raised to at least ``2 * halo / window_z``; the importance map (float32, window
        size): MONAI's ``blend`` map with the ``halo`` slices at each z end of the window set to 0.
    """
    depth = int(image_shape[-1]) + 2 * halo
    roi = (*tuple(int(r) for r in roi[:2]), min(int(roi[2]) + 2 * halo, depth))
    ov = (float(overlap), float(overlap), max(float(overlap), 2.0 * halo / roi[2]))
    weight = compute_importance_map(roi, mode=blend, sigma_scale=0.125, device="cpu", dtype=torch.float32)
    weight[..., :halo] = 0
    weight[..., roi[2] - halo:] = 0
    return roi, ov, weight


@torch.inference_mode()
def _probe_outputs(window: WindowPredictor, image: torch.Tensor, roi: tuple[int, ...]) -> tuple[int, int]:
    """(number of logit channels, number of gate maps) from one forward on an roi-size window."""
    x = torch.zeros((1, image.shape[0], *roi), dtype=image.dtype)
    flips, window.flips = window.flips, [()]
    try:
        out = window(x)
    finally:
        window.flips = flips
    if isinstance(out, dict):
        return int(out[LOGITS_KEY].shape[1]), len(out) - 1
    return int(out.shape[1]), 0


def sliding_window_predict(
    model: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    *,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    blend: str = "gaussian",
    sw_batch_size: int = 2,
    precision: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    tta: bool = False,
    mirror_axes: Sequence[int] = ALL_AXES,
    return_attention: bool = False,
    buffer_device: torch.device | str | None = None,
    channels_last: bool = False,
    progress: bool | str = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (and gate maps) for a whole preprocessed volume.

    Args:
        model: network, ``(B, C, *roi) -> (B, K, *roi)`` logits (see :class:`WindowPredictor`);
            put in eval mode for the call, its previous mode is restored afterwards.
        image: ``(C, X, Y, Z)`` preprocessed image (float), numpy or torch, any device.
        roi_size: window size ``(x, y, z)``; rounded up to ``model.patch_divisor`` when the model
            has one. MONAI pads a volume smaller than a window and crops the result back.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        blend: ``"gaussian"`` (nnU-Net's importance weighting, sigma = roi / 8) or ``"constant"``.
        sw_batch_size: windows per forward pass.
        precision: autocast dtype (``torch.bfloat16`` / ``torch.float16``), a name for
            :func:`medseg.runtime.resolve_precision` (``"auto"``, ``"bf16"``, ...), or ``None``
            / ``"fp32"``. The stitched buffers use this dtype too.
        device: where the model runs (default: the device of its parameters).
        tta: mirroring test-time augmentation: one forward pass per subset of ``mirror_axes``
            (8 for all three axes), averaged.
        mirror_axes: the spatial axes (0, 1, 2 of ``image``'s ``X, Y, Z``) that TTA may flip:
            those the model was trained with (:func:`allowed_mirror_axes`); empty = one pass.
        return_attention: also stitch the model's gate maps.
        buffer_device: where the stitched output lives; ``None`` = ``MEDSEG_BUFFER_DEVICE`` when set
            (:func:`buffer_device_override`), else ``device`` when it fits, else CPU.
        channels_last: run windows in ``channels_last_3d`` memory format.
        progress: tqdm bar over the windows (a string: the bar's description, e.g. the case name).

    Returns:
        ``logits (K, X, Y, Z)`` in the precision's dtype (float32 without autocast) on the
        buffer device; with ``return_attention`` also ``{name: (1, X, Y, Z)}`` gate maps.
    """
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    img = torch.as_tensor(image)
    if img.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {tuple(img.shape)}")
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    amp_dtype = resolve_precision(precision, device) if isinstance(precision, str) else precision
    compute_dtype = amp_dtype or torch.float32
    roi = round_roi(roi_size, getattr(model, "patch_divisor", None))
    halo, ov, weight = z_halo(model), float(overlap), None
    if halo:
        roi, ov, weight = z_halo_plan(img.shape, roi, float(overlap), halo, blend)
    if any(int(a) not in ALL_AXES for a in mirror_axes):
        raise ValueError(f"mirror_axes must be spatial axes 0, 1 or 2, got {list(mirror_axes)}")
    window = WindowPredictor(model, device=device, amp_dtype=amp_dtype, out_dtype=compute_dtype, tta=tta,
                             mirror_axes=mirror_axes, return_attention=return_attention, channels_last=channels_last)
    bar = None
    was_training = model.training
    model.eval()
    try:
        if buffer_device is None:
            buffer_device = buffer_device_override()
        if buffer_device is None:
            if device.type == "cuda":
                n_out, n_maps = _probe_outputs(window, img, roi)
                padded = (*img.shape[:-1], img.shape[-1] + 2 * halo)  # the z halo pads the volume's ends
                need = estimate_buffer_bytes(padded, roi, n_out, n_maps, compute_dtype)
                need += img[:1].numel() * img.shape[0] * torch.empty((), dtype=compute_dtype).element_size()
                buffer_device = pick_buffer_device(device, need)
            else:
                buffer_device = device
        buffer_device = torch.device(buffer_device)
        log.debug("sliding window: windows on %s, stitching buffers on %s", device, buffer_device)
        inputs = img.to(buffer_device, dtype=compute_dtype)[None]
        if halo:  # the volume's own ends: replicated neighbours (the windows' z edges get weight 0)
            inputs = F.pad(inputs, (halo, halo, 0, 0, 0, 0), mode="replicate")
        if progress:
            desc = progress if isinstance(progress, str) else None
            bar = window.bar = tqdm(total=count_windows(inputs.shape, roi, ov), desc=desc, unit="window")
        with torch.inference_mode():
            out: Any = sliding_window_inference(
                inputs, roi, sw_batch_size, window, overlap=ov, mode=blend,
                sw_device=device, device=buffer_device, roi_weight_map=weight,
            )
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if halo:
        out = {k: crop_z_halo(v, halo) for k, v in out.items()} if isinstance(out, dict) else crop_z_halo(out, halo)
    if isinstance(out, dict):
        logits = out.pop(LOGITS_KEY)[0]
        return logits, {name: m[0] for name, m in out.items()}
    return out[0]
