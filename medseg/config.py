"""Typed configuration: YAML -> nested dataclasses.

``load_config(path, overrides)`` reads a YAML file, applies ``section.key=value`` overrides
(values parsed as YAML, so ``train.lr=1e-3`` is a float and ``model.channels=[8,16]`` a list),
and returns a :class:`Config`. Unknown keys and wrong types raise :class:`ConfigError`
naming the key's full path (``model.block_attention.name``). ``save_config`` writes the
resolved config back as YAML next to whatever it produced.

Each section belongs to one layer of the pipeline: ``data`` (dataset, preprocessing,
patch sampling), ``model`` (the network), ``train`` (the engine), ``infer`` (the predictor).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from medseg.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "BlockAttentionConfig",
    "Config",
    "DataConfig",
    "InferConfig",
    "ModelConfig",
    "SkipFusionConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]


# --------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Dataset location, preprocessing plan choices and patch sampling."""

    dataset: str = ""  # raw dataset folder (nnU-Net v2 / Decathlon / images+labels)
    preprocessed: str = ""  # folder written by `medseg preprocess`
    normalization: str = "ct"  # "ct" (clip to fg 0.5-99.5 pct, z-score) or "window"
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    target_spacing: Optional[list[float]] = None  # mm, (x, y, z); None = nnU-Net's rule
    patch_size: Optional[list[int]] = None  # voxels, (x, y, z); None = from the plan
    memory_budget_gb: float = 8.0  # GPU memory a suggested patch size may use
    # Under train.max_minutes, plan spacing and patch for the budget (medseg.train.budget): the finest
    # spacing whose patch (budget_fov_mm of view, capped by the median case) still allows
    # budget_min_steps measured training steps. "auto" | "off" (YAML's bare off / on: false / true, the same);
    # explicit target_spacing / patch_size win.
    budget_plan: Union[str, bool] = "auto"
    budget_min_steps: int = 500  # optimizer steps the budget must allow (500 of batch 2: decent Dice in 15 CPU-min)
    budget_fov_mm: float = 250.0  # physical field of view a budget-planned patch aims at, per axis
    # "auto": when the config's net reaches budget_min_steps only at a coarser spacing than the finest
    # candidate (or not at all), the plan also tries the same net with a strided stem (model.strides[0] = 2:
    # no conv at the input resolution, ~1/8 of the FLOPs per voxel) and takes it where it reaches them at a
    # finer spacing. "off": the net is never changed.
    budget_stem: Union[str, bool] = "auto"
    # "auto": when the plan expects fewer than 10,000 steps and the config trains nnU-Net's SGD + poly, train
    # with AdamW 1e-3 and the wsd schedule instead (configs/real_organs.yaml's recipe). "off": never changed.
    budget_recipe: Union[str, bool] = "auto"
    fold: int = 0
    num_folds: int = 5
    split_seed: int = 12345
    val_cases: Optional[list[str]] = None  # explicit validation cases (overrides folds)
    cache: str = "auto"  # auto | ram | disk | none
    # data-loader worker processes, or "auto" (medseg.train.data.resolve_num_workers): on CUDA up to 8, one core
    # per rank left to the main process; on a CPU the cores torch's threads leave idle (at most 2), and none
    # on a CPU of <= 2 cores whose threads take every core (a worker there slowed each step more than
    # loading the batch in the main process costs: 2-core AMD EPYC, fp32, real_organs: 1.41 -> 1.27 s per step)
    num_workers: Union[int, str] = "auto"
    fg_oversample: float = 0.33  # fraction of each batch forced to contain foreground
    # hard-negative patches (medseg.train.hard_negatives): every hard_negative_interval epochs the trainer predicts
    # its training cases and this fraction of the random (not foreground-forced) patches is then centred on a voxel
    # it marked as a foreground class that voxel is not (0: off, the patch stream is unchanged)
    hard_negatives: float = 0.0
    hard_negative_interval: int = 20  # epochs between two mining passes (the first after this many epochs)


@dataclass
class BlockAttentionConfig:
    """Block attention (one input, same shape out) inside the U-Net stages."""

    name: Optional[str] = None  # se | eca | cbam | bam | nonlocal | abn | None
    where: str = "both"  # encoder | decoder | both
    stages: Optional[list[bool]] = None  # per encoder stage on/off; None = all stages
    kwargs: dict[str, Any] = field(default_factory=dict)
    bottleneck: Optional[str] = None  # extra block on the bottleneck only (e.g. nonlocal, abn)
    bottleneck_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkipFusionConfig:
    """How a skip connection ``x`` is merged with the gating signal ``g``."""

    name: str = "concat"  # concat | gate | aff | iaff
    kwargs: dict[str, Any] = field(default_factory=dict)
    levels: Optional[list[bool]] = None  # per decoder level, finest first: fuse by `name` (true) or concat; None = all


@dataclass
class ModelConfig:
    """The network. ``arch`` picks our U-Net or one of MONAI's as a baseline."""

    arch: str = "unet"  # unet | monai_unet | monai_attention_unet | monai_dynunet
    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int = 0  # 0 = take it from plans.json (background included)
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    strides: Optional[list[Union[int, list[int]]]] = None  # per stage, int or per axis [x,y,z]; None = [1, 2, 2, ...]
    kernel_sizes: Optional[list[Union[int, list[int]]]] = None  # per stage, int or per axis; None = 3 everywhere
    convs_per_stage: int = 2
    norm: str = "instance"  # instance | batch | group
    act: str = "leakyrelu"  # leakyrelu | relu | prelu | gelu
    residual: bool = False
    deep_supervision: bool = False
    train_at_stem: bool = False  # strided stem: the training loss at the stem's resolution (no logits upsampling)
    block_attention: BlockAttentionConfig = field(default_factory=BlockAttentionConfig)
    skip_fusion: SkipFusionConfig = field(default_factory=SkipFusionConfig)
    slices: int = 1  # 2.5D: k adjacent axial slices as channels (odd); 1 = true 3D
    slice_offset_mm: Optional[float] = None  # 2.5D: slice offsets in mm instead of slices


@dataclass
class AugmentConfig:
    """nnU-Net-like augmentation, built from MONAI transforms; p_* are probabilities."""

    p_rotate: float = 0.2
    rotate_deg: float = 15.0
    p_scale: float = 0.2
    scale_range: list[float] = field(default_factory=lambda: [0.85, 1.25])
    p_noise: float = 0.1
    noise_std: float = 0.1
    p_blur: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])  # voxels
    p_brightness: float = 0.15
    brightness_range: list[float] = field(default_factory=lambda: [0.75, 1.25])  # multiplicative
    p_contrast: float = 0.15
    contrast_range: list[float] = field(default_factory=lambda: [0.75, 1.25])  # around the mean
    p_lowres: float = 0.125  # simulate low resolution (down, then up again)
    lowres_zoom: list[float] = field(default_factory=lambda: [0.5, 1.0])
    p_gamma: float = 0.15
    gamma_range: list[float] = field(default_factory=lambda: [0.7, 1.5])
    p_mirror: float = 0.5
    # axes of the RAS grid to flip: a list, or "auto" = [1, 2] when a class sits on one side of the body in
    # every training case (liver / spleen: a left-right flip swaps them), else [0, 1, 2] (medseg.data.plan.auto_mirror_axes)
    mirror_axes: Union[str, list[int]] = "auto"
    # thick slices (medseg.data.transforms.RandThickSliced): with this probability per patch, the image is averaged over
    # runs of f slices along z and interpolated back, f uniform in thick_slice_factor (x the target z spacing: 5 mm scans)
    p_thick_slices: float = 0.0
    thick_slice_factor: list[float] = field(default_factory=lambda: [1.0, 2.0])
    p_slab: float = 0.0  # keep a random axial slab of the patch, the rest as padding (partial-coverage scans)
    slab_min_slices: int = 8
    # per-structure intensity shift (contrast phases; medseg.data.transforms.RandLabelIntensityShiftd): with this
    # probability per patch, each labelled class present gets its own offset from label_shift_range (normalized units)
    p_label_shift: float = 0.0
    label_shift_range: list[float] = field(default_factory=lambda: [-0.5, 0.5])
    # object-level copy-paste (TumorCP; medseg.data.transforms.RandCopyPasted): with this probability per patch, one
    # connected component of copy_paste_classes from the training cases, scaled by a factor of copy_paste_scale, is
    # pasted where the tissue looks like the component's surroundings (90% of the voxels within copy_paste_context_tol units)
    p_copy_paste: float = 0.0
    copy_paste_classes: list[int] = field(default_factory=list)
    copy_paste_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    copy_paste_context_tol: float = 0.5
    # synthetic objects (ObjectBank.add_synthetic; Hu et al. CVPR 2023): this many per copy_paste_class are added to the
    # bank, ellipsoids with lobulated edges and the real objects' intensity statistics, diameters in this range (mm;
    # lung nodules are 3-30 mm)
    copy_paste_synthetic: int = 0
    copy_paste_synthetic_diameter_mm: list[float] = field(default_factory=lambda: [5.0, 30.0])

    @classmethod
    def probability_keys(cls) -> list[str]:
        """The per-patch probabilities (every ``p_*`` field), in declaration order."""
        return [f.name for f in dataclasses.fields(cls) if f.name.startswith("p_")]

    def flip_axes(self) -> list[int]:
        """``mirror_axes`` as a list; an unresolved ``"auto"`` (training resolves it from the data,
        :func:`medseg.train.data.resolve_mirror_axes`) counts as all three axes."""
        return [0, 1, 2] if self.mirror_axes == "auto" else [int(a) for a in self.mirror_axes]


@dataclass
class TrainConfig:
    """The training engine."""

    epochs: int = 100
    iters_per_epoch: int = 250
    batch_size: int = 2
    optimizer: str = "sgd"  # sgd (Nesterov, poly LR) | adamw (cosine)
    lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    scheduler: str = "poly"  # poly | cosine | constant | wsd (stepped per iteration)
    poly_exponent: float = 0.9  # lr = lr0 * (1 - step / total) ** poly_exponent
    decay_fraction: float = 0.2  # wsd: linear cooldown to 0 over this last share of the steps
    grad_clip: float = 12.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    # channels_last_3d memory format for the net in training: "auto" = on for 3D nets on the CPU (oneDNN's layout;
    # benchmarks/train_speed.py --layouts: 1.05-1.12x patches/s in fp32 on 2 cores), off on CUDA (slower on the H200)
    # and for 2D / 2.5D nets (medseg.runtime.resolve_channels_last); true | false force it. config.yaml keeps the
    # setting ("auto" resolves again where a run resumes), log.txt the resolved value
    channels_last: Union[bool, str] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:i
    seed: int = 0
    val_interval: int = 5  # epochs between full validations
    checkpoint_interval: int = 1  # epochs between `latest` checkpoints
    max_minutes: Optional[float] = None  # stop training after this wall time
    loss: str = "dice_ce"  # dice_ce | dice | ce | dice_topk10 (CE over the 10% hardest voxels; medseg.train.losses)
    batch_dice: bool = True  # Dice over the whole batch (nnU-Net) instead of per sample
    aux_loss_weight: float = 1.0  # weight of auxiliary losses declared by the model; 1.0 = plain sum, as ABN
    tb_num_cases: int = 2  # fixed validation cases drawn in TensorBoard
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class InferConfig:
    """Sliding-window inference defaults (CLI flags override)."""

    overlap: float = 0.5
    blend: str = "gaussian"  # gaussian | constant
    sw_batch_size: int = 2
    cpu_window_voxels: int = 4_000_000  # CPU: windows per forward capped to this many voxels (x2 in bf16); 0 = no cap
    tta: bool = False
    precision: str = "auto"
    device: str = "auto"
    checkpoint: str = "best"


@dataclass
class Config:
    """The whole, resolved configuration of one run."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)


# --------------------------------------------------------------------------- machinery
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{path}' (valid keys here: {valid})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> Config:
    """Build a :class:`Config` from a plain mapping, validating every key and type."""
    return _from_dict(Config, data or {})


def config_to_dict(cfg: Any) -> dict:
    """The config as plain Python data (lists, dicts, scalars), ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...] | None) -> dict:
    """Apply ``section.key=value`` strings to a nested mapping (values parsed as YAML)."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': cannot parse value: {err}") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides.

    ``path`` may also name a shipped config (``"attention_unet3d"``, see :mod:`medseg.configs`).

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, a value has the wrong type.
    """
    data: dict = {}
    if path is not None:
        from medseg.configs import resolve_config

        p = resolve_config(path)  # a file, or a shipped config's name (``attention_unet3d``)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides)
    return config_from_dict(data)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    from medseg.io import atomic_write_text

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write_text(path, text)
