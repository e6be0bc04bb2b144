"""Per-case preprocessing and its inverse (nnU-Net's pipeline, Isensee et al., Nature Methods 2021).

``preprocess_volume``: reorient to the closest RAS (pure axis permutation / flip, no
interpolation) -> resample to the plan's target spacing (image cubic, label one-hot linear,
align_corners=False) -> crop to the body box (``image > body_threshold`` HU, grown by a small
margin, always containing the label's foreground) -> normalize (``ct``: clip to the foreground
0.5-99.5 percentiles, z-score with the foreground mean / std; ``window``: clip to a HU window,
scale to [-1, 1]).

``restore_to_original`` undoes the geometry part for anything on the preprocessed grid
(logits, probabilities, masks, gate maps) so that it lands on the original file's voxel grid.

Dataset-level work (fingerprint, plan, parallel preprocessing) lives in
:mod:`medseg.data.pipeline` (``preprocess_dataset``, ``load_case``); input checks in
:mod:`medseg.data.checks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medseg.data.checks import BODY_THRESHOLD_HU, check_ct_intensities, check_finite, check_label
from medseg.data.resample import apply_ornt, interpolate, resample_affine, resample_image, resample_label, resampled_shape
from medseg.errors import GeometryError, InputError
from medseg.io import Volume, _inverse_ornt, reorient, same_space, spacing_from_affine, strip_volume_suffix

__all__ = ["body_bbox", "normalize", "preprocess_volume", "reorient_to_original", "restore_to_original",
           "sample_class_locations", "component_shares", "components", "reference_components"]

CROP_MARGIN = 3  # voxels added around the body box (the "dilated a little")
MAX_CLASS_LOCATIONS = 10_000


# --------------------------------------------------------------------------- normalization
def normalize(image: np.ndarray, scheme: dict) -> np.ndarray:
    """Intensity normalization of one channel (in place on a float32 array; also returned).

    ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}``: clip, then ``(x - m) / s``
    (nnU-Net's CTNormalization). ``{"scheme": "window", "window": [lo, hi]}``: clip, then map
    ``[lo, hi]`` linearly to ``[-1, 1]``.
    """
    name = scheme.get("scheme", "ct")
    if name == "ct":
        lo, hi = scheme["clip"]
        np.clip(image, lo, hi, out=image)
        image -= np.float32(scheme["mean"])
        image /= np.float32(max(float(scheme["std"]), 1e-8))
    elif name == "window":
        lo, hi = scheme["window"]
        np.clip(image, lo, hi, out=image)
        image -= np.float32((lo + hi) / 2.0)
        image /= np.float32(max((hi - lo) / 2.0, 1e-8))
    elif name != "none":
        raise InputError(f"plans.json: unknown normalization scheme '{name}' (expected ct, window or none)")
    return image


def _channel_schemes(plans: dict, n: int) -> list[dict]:
    norm = plans.get("normalization", {"scheme": "none"})
    schemes = list(norm) if isinstance(norm, list) else [norm] * n
    if len(schemes) != n:
        raise InputError(f"plans.json: {len(schemes)} normalization schemes for {n} image channels")
    return schemes


# --------------------------------------------------------------------------- crop
def body_bbox(image: np.ndarray, label: np.ndarray | None, *, threshold: float = BODY_THRESHOLD_HU,
              margin: int = CROP_MARGIN) -> list[list[int]]:
    """``[[lo, hi), ...]`` per axis of ``image > threshold`` (any channel) grown by ``margin``,
    united with the label's foreground box; the whole grid when nothing is above threshold.

    Args:
        image: ``(C, X, Y, Z)`` intensities before normalization.
        label: ``(X, Y, Z)`` or ``None``.
    """
    shape = image.shape[1:]
    mask = (image > threshold).any(axis=0)
    if label is not None:
        mask |= label > 0
    if not mask.any():
        return [[0, int(s)] for s in shape]
    box = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append([max(0, int(idx[0]) - margin), min(int(shape[ax]), int(idx[-1]) + 1 + margin)])
    return box


def _crop(a: np.ndarray, bbox: Sequence[Sequence[int]]) -> np.ndarray:
    sl = tuple(slice(lo, hi) for lo, hi in bbox)
    return np.ascontiguousarray(a[(...,) + sl])


def components(mask: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray, int]:
    """26-connected components of a non-empty boolean mask, labelled within its bounding box:
    ``(box, labels in the box, count)``."""
    from scipy import ndimage

    box = ndimage.find_objects(np.asarray(mask).astype(np.uint8))[0]
    comp, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
    return box, comp, int(n)


def reference_components(mask: np.ndarray) -> tuple[int, float]:
    """``(count, share)`` of a boolean mask: its 26-connected components and the share of its voxels
    outside the largest one (``(0, 0.0)`` when empty; ``share`` 0.0: one structure, ~0.4-0.5: two lungs)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0, 0.0
    _, comp, n = components(mask)
    sizes = np.bincount(comp.ravel())[1:]
    return n, float(1.0 - sizes.max() / sizes.sum())


def component_shares(label: np.ndarray, classes: Sequence[int]) -> dict[str, float]:
    """Per class present in ``label`` (``(I, J, K)`` integer map), the share of its voxels outside its largest
    26-connected component (:func:`reference_components`). Recorded per case at preprocessing
    (``class_component_share``) so that training tells several-structure classes (two lungs, two kidneys) from
    every training label without reading them: the post-processing choice never keeps only their largest
    component (:func:`medseg.infer.postprocess.choose_largest_component`)."""
    label = np.asarray(label)
    out = {}
    for c in classes:
        n, share = reference_components(label == c)
        if n:
            out[str(int(c))] = share
    return out


def sample_class_locations(label: np.ndarray, values: Sequence[int], *, max_per_class: int = MAX_CLASS_LOCATIONS,
                           seed: int = 1234) -> dict[str, list[list[int]]]:
    """Up to ``max_per_class`` voxel coordinates ``[x, y, z]`` per foreground class (keys are ``str(value)``).

    Used by the trainer's foreground oversampling (nnU-Net's ``class_locations``).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[int]]] = {}
    for v in values:
        if int(v) == 0:
            continue
        coords = np.argwhere(label == v)
        if len(coords) > max_per_class:
            coords = coords[np.sort(rng.choice(len(coords), max_per_class, replace=False))]
        out[str(int(v))] = coords.astype(int).tolist()
    return out


# --------------------------------------------------------------------------- forward
def preprocess_volume(image: Volume | Sequence[Volume], plans: dict, label: Volume | None = None, *,
                      case: str | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Reorient, resample, crop and normalize one case.

    Args:
        image: a :class:`Volume` or a list of co-registered channel volumes.
        plans: ``plans.json`` content; uses ``target_spacing``, ``normalization``, ``labels``
            and optionally ``ignore_label``, ``ct_check`` (default true) and ``body_threshold`` (HU).
            The ignore label's value is kept in the label map but is not foreground (no
            ``class_locations``, so foreground oversampling never centres a patch on it).
        label: label volume on the image's grid, or ``None``.
        case: case name (default: the image file name without suffix).

    Returns:
        ``image (C, X, Y, Z) float32``, ``label (1, X, Y, Z) uint8 | None`` and the JSON-able
        properties (see docs/architecture.md).

    Raises:
        InputError / GeometryError: NaN / inf voxels, non-CT intensities, channel / label grid
        mismatch, undeclared label values.
    """
    chans = [image] if isinstance(image, Volume) else list(image)
    ref = chans[0]
    for ch in chans[1:]:
        if not same_space(ref, ch):
            raise GeometryError(f"{ch.path}: image channel does not share physical space with {ref.path}")
    for ch in chans:
        check_finite(ch.array, ch.path or "image")
        if plans.get("ct_check", True):
            check_ct_intensities(ch.array, str(ch.path or "image"))
    values = sorted(int(v) for v in plans.get("labels", {}).values()) or None
    present = check_label(label, ref, values) if label is not None else []

    # 1. reorient to the closest RAS (no interpolation)
    ro, ornt = reorient(ref)
    arrays = [ro.array] + [reorient(ch, ornt)[0].array for ch in chans[1:]]
    lab = reorient(label, ornt)[0].array if label is not None else None
    ro_shape = ro.shape

    # 2. resample to the target spacing
    spacing = spacing_from_affine(ro.affine)
    target = plans.get("target_spacing") or spacing.tolist()
    new_shape = resampled_shape(ro_shape, spacing, target)
    img = resample_image(np.stack(arrays), new_shape)
    del arrays
    if lab is not None:
        lab = resample_label(lab, new_shape, values=sorted(set(present) | {0}))
    res_affine = resample_affine(ro.affine, ro_shape, new_shape)

    # 3. crop to the body box (HU threshold before normalization)
    bbox = body_bbox(img, lab, threshold=float(plans.get("body_threshold", BODY_THRESHOLD_HU)))
    img = _crop(img, bbox)
    lab = _crop(lab, bbox) if lab is not None else None
    shift = np.eye(4)
    shift[:3, 3] = [lo for lo, _ in bbox]
    final_affine = res_affine @ shift

    # 4. normalize each channel
    for c, scheme in enumerate(_channel_schemes(plans, img.shape[0])):
        normalize(img[c], scheme)

    name = case or (strip_volume_suffix(Path(ref.path).name) if ref.path else "case")
    fg = [v for v in values or present if v not in (0, plans.get("ignore_label"))]  # the classes the props describe
    props = {
        "case": name,
        "source": [str(ch.path) for ch in chans] if len(chans) > 1 else str(ref.path),
        "original_shape": list(ref.shape),
        "original_affine": ref.affine.tolist(),
        "original_spacing": spacing_from_affine(ref.affine).tolist(),
        "ornt": np.asarray(ornt).tolist(),
        "reoriented_shape": list(ro_shape),
        "reoriented_affine": ro.affine.tolist(),
        "resampled_shape": list(new_shape),
        "bbox": bbox,
        "shape": list(img.shape[1:]),
        "affine": final_affine.tolist(),
        "spacing": spacing_from_affine(final_affine).tolist(),
        "class_locations": sample_class_locations(lab, fg) if lab is not None else {},
        # per class, the share outside its largest component (two lungs ~0.4): the post-processing choice's veto
        "class_component_share": component_shares(lab, fg) if lab is not None else {},
    }
    return img, (lab[None] if lab is not None else None), props


# --------------------------------------------------------------------------- inverse
def restore_to_original(data, properties: dict, *, mode: str = "linear", fill: Sequence[float] | float | None = None,
                        reorient: bool = True):
    """Put a channel-first array on the preprocessed grid back on the original file's grid.

    Un-crop (pad with ``fill[c]`` per channel, default 0) -> resample to the reoriented original
    shape (``mode="linear"``: trilinear, ``"nearest"``: nearest voxel centre; align_corners=False)
    -> undo the reorientation.

    Args:
        data: ``(C, X, Y, Z)`` numpy array or torch tensor with ``(X, Y, Z) == properties["shape"]``.
        properties: the case's properties from :func:`preprocess_volume`.
        mode: ``"linear"`` (logits, probabilities, gate maps) or ``"nearest"`` (label maps).
        fill: value per channel outside the crop (e.g. a large background logit), or a scalar.
        reorient: ``False`` stops before undoing the reorientation (shape
            ``properties["reoriented_shape"]``): reduce there (e.g. an arg-max over classes) and
            reorient the smaller result with :func:`reorient_to_original`.

    Returns:
        Same type as ``data``, shape ``(C, *properties["original_shape"])``, in the original
        file's voxel order (write it with ``properties["original_affine"]``). A tensor keeps
        its device; its dtype too (integer data with ``mode="linear"`` comes back float32).
    """
    is_numpy = isinstance(data, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(data)) if is_numpy else data
    if t.ndim != 4:
        raise ValueError(f"restore_to_original expects (C, X, Y, Z) data, got shape {tuple(t.shape)}")
    if list(t.shape[1:]) != list(properties["shape"]):
        raise ValueError(f"data shape {tuple(t.shape[1:])} != preprocessed shape {properties['shape']} of case {properties.get('case')}")
    c = t.shape[0]
    fills = [0.0] * c if fill is None else ([float(fill)] * c if np.isscalar(fill) else [float(v) for v in fill])
    if len(fills) != c:
        raise ValueError(f"fill has {len(fills)} values for {c} channels")
    full = torch.empty((c, *properties["resampled_shape"]), dtype=t.dtype, device=t.device)
    for i, v in enumerate(fills):
        full[i].fill_(v)
    sl = tuple(slice(lo, hi) for lo, hi in properties["bbox"])
    full[(slice(None),) + sl] = t
    del t
    out = interpolate(full, properties["reoriented_shape"], mode=mode)
    del full
    if reorient:
        out = reorient_to_original(out, properties)
    return out.cpu().numpy() if is_numpy else out


def reorient_to_original(data, properties: dict):
    """Undo the preprocessing reorientation of ``(..., X, Y, Z)`` data on the reoriented original
    grid (what :func:`restore_to_original` returns with ``reorient=False``); numpy or torch."""
    return apply_ornt(data, _inverse_ornt(np.asarray(properties["ornt"], dtype=float)))
