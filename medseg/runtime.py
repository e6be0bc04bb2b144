"""Device, precision, seeding and logging helpers shared by the engines."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys

import numpy as np
import torch

from medseg.errors import ConfigError

__all__ = ["affinity_mask", "autocast", "available_cores", "cpu_supports_bf16", "get_logger", "progress_enabled",
           "resolve_channels_last", "resolve_device", "resolve_precision", "seed_everything", "set_console_level"]


CONSOLE_HANDLER = "medseg-console"


def _level(name: str | None) -> int:
    level = logging.getLevelName(str(name or "INFO").upper())
    return level if isinstance(level, int) else logging.INFO


def _console() -> logging.Handler | None:
    return next((h for h in logging.getLogger("medseg").handlers if h.get_name() == CONSOLE_HANDLER), None)


def get_logger(name: str = "medseg") -> logging.Logger:
    """A logger that prints ``HH:MM:SS level message`` lines to stderr (configured once).

    ``MEDSEG_LOGLEVEL`` (default INFO) sets what the *console* shows; the ``medseg`` logger itself
    stays at INFO or below, so a run's ``log.txt`` (:func:`medseg.train.setup.open_log`) keeps its
    INFO lines under ``medseg --quiet``.
    """
    logger = logging.getLogger(name)
    root = logging.getLogger("medseg")
    if _console() is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(CONSOLE_HANDLER)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        level = _level(os.environ.get("MEDSEG_LOGLEVEL"))
        handler.setLevel(level)
        root.addHandler(handler)
        root.setLevel(min(level, logging.INFO))
        root.propagate = False
    return logger


def set_console_level(level: str) -> None:
    """What the console shows from now on (``medseg --quiet``: ``WARNING``), here and in the worker
    processes and ``torchrun`` ranks started later (``MEDSEG_LOGLEVEL``); log files keep INFO."""
    os.environ["MEDSEG_LOGLEVEL"] = str(level).upper()
    get_logger()
    _console().setLevel(_level(level))


def progress_enabled() -> bool:
    """Whether progress bars may be drawn: while the console shows INFO lines (``medseg --quiet``
    and ``MEDSEG_LOGLEVEL=WARNING`` turn both off)."""
    logger = get_logger()
    return logger.isEnabledFor(logging.INFO) and _console().level <= logging.INFO


def affinity_mask() -> set[int] | None:
    """The CPU ids this process may run on (``taskset``, a container's cpuset, a Slurm allocation), ``None``
    where the OS does not say."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def available_cores() -> int:
    """CPU cores this process may run on: the size of its :func:`affinity_mask`, else ``os.cpu_count()``.
    The one core count of medseg (loader workers, the demo's idle-core check)."""
    mask = affinity_mask()
    return len(mask) if mask is not None else os.cpu_count() or 1


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda:i`` checked to exist."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not valid (use auto, cpu, cuda or cuda:i)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 / AMX), where bf16 autocast pays off."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in info or "amx_bf16" in info


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``name`` on ``device``; ``None`` means plain fp32.

    ``auto``: bf16 on a CPU that supports it, fp16 on CUDA (bf16 where the GPU supports it
    is available by asking for ``bf16``), fp32 otherwise.
    """
    name = (name or "auto").lower()
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision '{name}' is not valid (use auto, fp32, bf16 or fp16)")
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else None
    if name == "fp32":
        return None
    if name == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision 'fp16' needs a CUDA device (use bf16 on CPU)")
        return torch.float16
    return torch.bfloat16


def resolve_channels_last(value: bool | str | None, device: torch.device, model: torch.nn.Module | None) -> bool:
    """Whether to run ``model`` in ``channels_last_3d`` memory format (inference and ``train.channels_last``).

    ``True`` / ``False`` are obeyed; ``None`` / ``"auto"`` means yes on the CPU for a net whose
    convolutions are all 3D (oneDNN's convolutions work in channels-last, and
    :class:`medseg.nn.layers.InstanceNorm3d` keeps that layout: inference ~1.9x faster in bf16, ~1.6x
    in fp32 on 2 cores; training 1.05-1.12x in fp32, ``benchmarks/train_speed.py --layouts``), no on
    CUDA (training measured slower on an H200) and for 2D / 2.5D nets (no 3D layout).
    """
    if value is None or value == "auto":
        if device.type != "cpu" or model is None:
            return False
        dims = {p.dim() for name, p in model.named_parameters() if name.endswith("weight") and p.dim() >= 3}
        return dims == {5}
    if not isinstance(value, bool):
        raise ConfigError(f"channels_last must be 'auto', True or False, got {value!r}")
    return value


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
