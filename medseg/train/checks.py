"""Up-front checks of the config values the training engine uses (types are checked by medseg.config).

Every failure is a :class:`~medseg.errors.ConfigError` whose message starts with the key.
"""

from __future__ import annotations

from typing import Sequence

from medseg.config import Config
from medseg.errors import ConfigError
from medseg.train.data import CACHE_MODES
from medseg.train.losses import LOSSES
from medseg.train.optim import OPTIMIZERS, SCHEDULERS

__all__ = ["check_config", "resolve_patch_size"]


def _require(ok: bool, key: str, msg: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}, got {value!r}")


def _choice(value: str, key: str, options: Sequence[str]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: '{value}' is not valid (use {', '.join(options)})")


def _pair(values: Sequence[float], key: str, positive: bool = True) -> None:
    _require(len(values) == 2, key, "expected two numbers [low, high]", values)
    if positive:
        _require(min(values) > 0, key, "expected numbers > 0", values)


def check_config(cfg: Config) -> None:
    """Raise ConfigError for values the engine cannot use (names, ranges, lengths)."""
    t, d, a = cfg.train, cfg.data, cfg.train.augment
    for key in ("epochs", "iters_per_epoch", "batch_size", "val_interval", "checkpoint_interval"):
        _require(getattr(t, key) >= 1, f"train.{key}", "must be >= 1", getattr(t, key))
    _require(t.lr > 0, "train.lr", "must be > 0", t.lr)
    for key in ("weight_decay", "momentum", "grad_clip", "aux_loss_weight", "poly_exponent"):
        _require(getattr(t, key) >= 0, f"train.{key}", "must be >= 0", getattr(t, key))
    _require(0.0 < t.decay_fraction <= 1.0, "train.decay_fraction", "must be in (0, 1]", t.decay_fraction)
    _require(t.tb_num_cases >= 0, "train.tb_num_cases", "must be >= 0", t.tb_num_cases)
    _require(t.max_minutes is None or t.max_minutes > 0, "train.max_minutes", "must be > 0 (or null)", t.max_minutes)
    _choice(t.optimizer, "train.optimizer", OPTIMIZERS)
    _choice(t.scheduler, "train.scheduler", SCHEDULERS)
    _choice(t.loss, "train.loss", tuple(LOSSES))
    _choice(d.cache, "data.cache", CACHE_MODES)
    _require(0.0 <= d.fg_oversample <= 1.0, "data.fg_oversample", "must be in [0, 1]", d.fg_oversample)
    _require(0.0 <= d.hard_negatives <= 1.0, "data.hard_negatives", "must be in [0, 1]", d.hard_negatives)
    _require(d.hard_negative_interval >= 1, "data.hard_negative_interval", "must be >= 1", d.hard_negative_interval)
    _require(d.num_workers == "auto" or (isinstance(d.num_workers, int) and not isinstance(d.num_workers, bool)
                                         and d.num_workers >= 0),
             "data.num_workers", "expected auto or an integer >= 0", d.num_workers)
    _require(d.budget_plan in ("auto", "off", True, False), "data.budget_plan", "expected auto or off", d.budget_plan)
    _require(d.budget_min_steps >= 1, "data.budget_min_steps", "must be >= 1", d.budget_min_steps)
    _require(d.budget_fov_mm > 0, "data.budget_fov_mm", "must be > 0", d.budget_fov_mm)
    _require(d.budget_stem in ("auto", "off", True, False), "data.budget_stem", "expected auto or off", d.budget_stem)
    _require(d.budget_recipe in ("auto", "off", True, False), "data.budget_recipe", "expected auto or off", d.budget_recipe)
    if d.patch_size is not None:
        _require(len(d.patch_size) == 3 and min(d.patch_size) >= 1, "data.patch_size",
                 "expected three positive integers [x, y, z]", d.patch_size)
    for key in a.probability_keys():
        _require(0.0 <= getattr(a, key) <= 1.0, f"train.augment.{key}", "must be a probability in [0, 1]", getattr(a, key))
    for key in ("scale_range", "blur_sigma", "brightness_range", "contrast_range", "lowres_zoom", "gamma_range"):
        _pair(getattr(a, key), f"train.augment.{key}")
    _require(a.mirror_axes == "auto" or (isinstance(a.mirror_axes, list) and all(ax in (0, 1, 2) for ax in a.mirror_axes)),
             "train.augment.mirror_axes", "expected auto or a list of axes 0, 1, 2", a.mirror_axes)
    _pair(a.label_shift_range, "train.augment.label_shift_range", positive=False)
    _pair(a.thick_slice_factor, "train.augment.thick_slice_factor")
    _require(min(a.thick_slice_factor) >= 1.0, "train.augment.thick_slice_factor",
             "factors are slice thickness over the target spacing: >= 1", a.thick_slice_factor)
    _require(a.noise_std >= 0, "train.augment.noise_std", "must be >= 0", a.noise_std)
    _pair(a.copy_paste_scale, "train.augment.copy_paste_scale")
    _pair(a.copy_paste_synthetic_diameter_mm, "train.augment.copy_paste_synthetic_diameter_mm")
    _require(isinstance(a.copy_paste_synthetic, int) and a.copy_paste_synthetic >= 0, "train.augment.copy_paste_synthetic",
             "expected an integer >= 0 (objects per class)", a.copy_paste_synthetic)
    _require(a.copy_paste_context_tol >= 0, "train.augment.copy_paste_context_tol", "must be >= 0", a.copy_paste_context_tol)
    _require(isinstance(a.copy_paste_classes, list) and all(isinstance(c, int) and c > 0 for c in a.copy_paste_classes),
             "train.augment.copy_paste_classes", "expected a list of label values > 0", a.copy_paste_classes)
    _require(a.p_copy_paste == 0 or bool(a.copy_paste_classes), "train.augment.copy_paste_classes",
             "p_copy_paste > 0 needs the classes to paste", a.copy_paste_classes)
    _require(isinstance(a.slab_min_slices, int) and a.slab_min_slices >= 1, "train.augment.slab_min_slices",
             "must be an integer >= 1", a.slab_min_slices)


def resolve_patch_size(cfg: Config, plans: dict, divisor: Sequence[int] | None) -> list[int]:
    """``data.patch_size`` (must be divisible by the model's ``patch_divisor``) or the plan's, rounded up."""
    div = [int(v) for v in (divisor or (1, 1, 1))]
    if cfg.data.patch_size is not None:
        patch = [int(p) for p in cfg.data.patch_size]
        bad = [p for p, q in zip(patch, div) if p % q]
        if bad:
            raise ConfigError(f"data.patch_size: {patch} must be divisible by the model's patch_divisor {div} per axis")
        return patch
    plan_patch = plans.get("patch_size")
    if not plan_patch or len(plan_patch) != 3:
        raise ConfigError("data.patch_size: not set and plans.json has no 'patch_size' [x, y, z]")
    return [-(-int(p) // q) * q for p, q in zip(plan_patch, div)]
