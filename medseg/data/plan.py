"""The experiment plan (``plans.json``): target spacing, normalization and patch size.

Target spacing follows nnU-Net's ``ExperimentPlanner.determine_fullres_target_spacing``
(Isensee et al., Nature Methods 2021): the per-axis median of the case spacings, except for
strongly anisotropic data (the coarsest median spacing is more than 3x the finest other axis
AND that axis has more than 3x fewer voxels), where the coarse axis takes the 10th percentile
of its spacings (no lower than the other axes' largest spacing) so that thin-slice cases are
not thrown away.

The suggested patch size keeps the aspect of the median case in mm (patch voxels proportional
to the median resampled shape), fits ``data.memory_budget_gb`` at batch size 2, is capped by
the median shape and divisible by 16 (or by the model's total stride). Training memory per
patch voxel is ``BYTES_PER_VOXEL`` for nnU-Net's 32-feature U-Net (its 128^3, batch 2 in 8 GB)
and scales with the network's first-stage width (every feature map of a U-Net does), so a
16-feature net gets twice the voxels -- as nnU-Net's planner, which estimates the memory of
the actual architecture.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from medseg.data.datasets import ignore_label_of, num_classes_of
from medseg.errors import ConfigError

__all__ = ["BYTES_PER_VOXEL", "LATERAL_MIN_OFFSET", "auto_mirror_axes", "lateral_offsets", "make_plan", "model_plan_args",
           "suggest_patch_size", "target_spacing_nnunet"]

ANISOTROPY_THRESHOLD = 3.0
BYTES_PER_VOXEL = 1900.0  # training memory per patch voxel and sample (3D U-Net, 32 base features, AMP)
REFERENCE_FEATURES = 32  # the width BYTES_PER_VOXEL was measured for
PLAN_BATCH_SIZE = 2
LATERAL_MIN_OFFSET = 0.1  # a class this far (fraction of the body box's width) off the midline is on one side


def target_spacing_nnunet(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> list[float]:
    """nnU-Net's full-resolution target spacing from per-case spacings and (cropped) shapes, ``[x, y, z]`` mm."""
    sp = np.asarray(spacings, dtype=np.float64)
    target = np.percentile(sp, 50, axis=0)
    size = np.percentile(np.asarray(shapes, dtype=np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[i] for i in others)
    aniso_voxels = size[worst] * ANISOTROPY_THRESHOLD < min(size[i] for i in others)
    if aniso_spacing and aniso_voxels:
        t = float(np.percentile(sp[:, worst], 10))
        other_max = max(target[i] for i in others)
        if t < other_max:
            t = max(other_max, t) + 1e-5
        target[worst] = t
    return [float(v) for v in target]


def max_patch_voxels(memory_budget_gb: float, batch_size: int, features: float) -> float:
    """Patch voxels a training step of ``batch_size`` samples may use within ``memory_budget_gb`` for a
    net of first-stage width ``features`` (``BYTES_PER_VOXEL`` per voxel at ``REFERENCE_FEATURES``)."""
    return memory_budget_gb * 1e9 / (batch_size * BYTES_PER_VOXEL * features / REFERENCE_FEATURES)


def suggest_patch_size(median_shape: Sequence[float], *, memory_budget_gb: float, divisor: int | Sequence[int] = 16,
                       batch_size: int = PLAN_BATCH_SIZE, features: float = REFERENCE_FEATURES) -> list[int]:
    """Largest patch with the median case's aspect that fits the memory budget (see module docstring).

    Args:
        median_shape: median case shape in voxels at the target spacing ``(x, y, z)``.
        memory_budget_gb: GPU memory the training step may use.
        divisor: what each patch axis must be divisible by (int or one per axis).
        batch_size: samples per training step.
        features: the network's first-stage width (memory per voxel scales with it).

    Returns:
        ``[x, y, z]`` patch size in voxels, each a multiple of its divisor (>= the divisor).
    """
    med = np.maximum(np.asarray(median_shape, dtype=np.float64), 1.0)
    div = np.broadcast_to(np.asarray(divisor, dtype=np.int64), (3,))
    if features < 1:
        raise ConfigError(f"features must be >= 1, got {features}")
    max_vox = max_patch_voxels(memory_budget_gb, batch_size, features)
    scale = min(1.0, (max_vox / float(np.prod(med))) ** (1.0 / 3.0))
    ideal = med * scale
    patch = np.array([
        int(math.ceil(ideal[i] / div[i]) * div[i]) if scale >= 1.0 else max(int(div[i]), int(ideal[i] // div[i]) * int(div[i]))
        for i in range(3)
    ])
    while np.prod(patch) > max_vox and np.any(patch > div):
        ratio = np.where(patch > div, patch / med, -np.inf)
        patch[int(np.argmax(ratio))] -= div[int(np.argmax(ratio))]
    return [int(v) for v in patch]


def _validated(values, n: int, kind: type, key: str):
    if values is None:
        return None
    if len(values) != n or any(v is None or v <= 0 for v in values):
        raise ConfigError(f"{key}: expected {n} positive values (x, y, z), got {values}")
    return [kind(v) for v in values]


def model_plan_args(model_cfg) -> dict:
    """``divisor`` (the net's patch divisor per axis) and ``features`` (first-stage width per
    input voxel: ``channels[0]`` over the stem's voxels) of a model config for :func:`make_plan`,
    computed from the config alone (:func:`medseg.nn.factory.patch_geometry`, no net built); the
    defaults (16, 32) when ``model_cfg`` is ``None``."""
    if model_cfg is None:
        return {"divisor": 16, "features": REFERENCE_FEATURES}
    from medseg.nn.factory import patch_geometry

    geo = patch_geometry(model_cfg)
    return {"divisor": list(geo["divisor"]), "features": float(model_cfg.channels[0]) / float(np.prod(geo["stem"]))}


def make_plan(fingerprint: dict, data_cfg=None, *, divisor: int | Sequence[int] = 16,
              features: int = REFERENCE_FEATURES) -> dict:
    """Turn a fingerprint (:func:`medseg.data.fingerprint.compute_fingerprint`) into ``plans.json``.

    Args:
        fingerprint: the dataset fingerprint (also carries ``dataset_name``, ``labels``, ``channel_names``).
        data_cfg: :class:`medseg.config.DataConfig` (``normalization``, ``hu_window``,
            ``target_spacing``, ``patch_size``, ``memory_budget_gb``); ``None`` = defaults.
        divisor: the model's total stride per axis (patch sizes are multiples of it).
        features: the model's first-stage width (see :func:`suggest_patch_size`); both come
            from :func:`model_plan_args`.

    Raises:
        ConfigError: unknown normalization, malformed spacing / patch size / window.
    """
    from medseg.config import DataConfig

    cfg = data_cfg or DataConfig()
    spacing = _validated(cfg.target_spacing, 3, float, "data.target_spacing") or target_spacing_nnunet(
        fingerprint["spacings"], fingerprint["shapes_after_crop"])
    resampled = [np.asarray(sh, float) * np.asarray(sp) / np.asarray(spacing)
                 for sh, sp in zip(fingerprint["shapes_after_crop"], fingerprint["spacings"])]
    median_shape = np.median(np.asarray(resampled), axis=0)
    patch = _validated(cfg.patch_size, 3, int, "data.patch_size") or suggest_patch_size(
        median_shape, memory_budget_gb=cfg.memory_budget_gb, divisor=divisor, features=features)
    labels = dict(fingerprint.get("labels") or {"background": 0})
    props = fingerprint["foreground_intensity_properties_per_channel"]
    return {
        "dataset_name": fingerprint.get("dataset_name", ""),
        "labels": labels,
        "num_classes": num_classes_of(labels),  # the network's outputs: the ignore label is not a class
        "ignore_label": ignore_label_of(labels),
        "channel_names": fingerprint.get("channel_names", {"0": "CT"}),
        "target_spacing": [float(v) for v in spacing],
        "normalization": _normalization(cfg, props),
        "patch_size": patch,
        "patch_planned_for": {"features": float(features), "divisor": np.broadcast_to(np.asarray(divisor), (3,)).tolist(),
                              "memory_budget_gb": float(cfg.memory_budget_gb), "batch_size": PLAN_BATCH_SIZE},
        "median_shape": [float(v) for v in median_shape],
        "batch_size": PLAN_BATCH_SIZE,
        "axis_order": "RAS",
        "ct_check": True,
        "body_threshold": -500.0,
        "fingerprint": {k: v for k, v in fingerprint.items() if k not in ("labels", "channel_names")},
        "data_config": plan_request(cfg),
    }


def _normalization(cfg, props: dict) -> dict | list[dict]:
    if cfg.normalization == "window":
        win = list(cfg.hu_window or [])
        if len(win) != 2 or not win[1] > win[0]:
            raise ConfigError(f"data.hu_window: expected [low, high] with low < high, got {cfg.hu_window}")
        return {"scheme": "window", "window": [float(win[0]), float(win[1])]}
    if cfg.normalization != "ct":
        raise ConfigError(f"data.normalization: '{cfg.normalization}' is not one of ct, window")
    schemes = [{"scheme": "ct", "clip": [p["percentile_00_5"], p["percentile_99_5"]], "mean": p["mean"],
                "std": max(p["std"], 1e-8)} for _, p in sorted(props.items(), key=lambda kv: int(kv[0]))]
    return schemes[0] if len(schemes) == 1 else schemes


def plan_request(cfg) -> dict:
    """The data-config values a plan depends on (a re-run with other values needs a new plan)."""
    return {"normalization": cfg.normalization, "hu_window": list(cfg.hu_window),
            "target_spacing": cfg.target_spacing, "patch_size": cfg.patch_size,
            "memory_budget_gb": cfg.memory_budget_gb}


# --------------------------------------------------------------------------- mirroring
def lateral_offsets(case_props: Sequence[dict]) -> dict[int, list[float]]:
    """Left-right offset of each foreground class from the body's midline, per case that has it.

    ``case_props``: preprocessed cases' properties (``shape``, ``class_locations``; the arrays are
    in the closest-RAS axis order, cropped to the body box, so axis 0 runs left-right and the box's
    centre stands for the midline). The offset is the class centroid's (from its sampled voxels)
    distance from the box centre as a fraction of the box width, signed (+ = towards +x), in
    ``[-0.5, 0.5]``.
    """
    out: dict[int, list[float]] = {}
    for props in case_props:
        width = float(props["shape"][0])
        for k, locs in (props.get("class_locations") or {}).items():
            xyz = np.asarray(locs, dtype=np.float64).reshape(-1, 3)
            if len(xyz) and width > 0:
                out.setdefault(int(k), []).append(float((xyz[:, 0].mean() + 0.5) / width - 0.5))
    return out


def auto_mirror_axes(case_props: Sequence[dict], *, min_offset: float = LATERAL_MIN_OFFSET,
                     min_cases: int = 2) -> tuple[list[int], dict[int, float]]:
    """``train.augment.mirror_axes: auto``: the axes training may flip, and the lateralised classes.

    A class is *lateralised* when it lies on the same side of the midline, at least ``min_offset``
    of the body width off it (:func:`lateral_offsets`), in every one of at least ``min_cases``
    cases (one case cannot tell anatomy from chance: a lesion in one lung). Mirroring the
    left-right axis (axis 0 of the RAS grid) swaps the sides of such classes (liver right, spleen
    left), so then only axes 1 and 2 are flipped; TotalSegmentator (Wasserthal et al., Radiology AI
    2023) trains without mirroring for the same reason. Otherwise all three axes, as nnU-Net.

    Returns:
        ``(axes, {class: mean offset})``.
    """
    lateral = {k: float(np.mean(v)) for k, v in sorted(lateral_offsets(case_props).items())
               if len(v) >= min_cases and (min(v) >= min_offset or max(v) <= -min_offset)}
    return ([1, 2] if lateral else [0, 1, 2]), lateral
