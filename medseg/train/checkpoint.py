"""Training checkpoints: atomic writes, ``weights_only`` loads, full RNG state.

A checkpoint is a plain dict (docs/architecture.md): ``model`` (state dict), ``optimizer``,
``scheduler``, ``scaler``, ``epoch`` (last completed epoch, 0-based; -1 = none), ``best_metric``,
``rng`` (python / numpy / torch / cuda states as tensors and primitives), ``config`` (plain
dict), ``plans`` (plain dict), plus ``step``, ``history`` and ``budget`` (the time budget's state:
``train_s`` spent, ``val_s`` of the last validation, ``timed_from`` step, ``max_minutes`` and the
shrunk ``total_epochs`` or None; :func:`medseg.train.setup.restore_budget`) and ``epoch_end_pending``
(the run stopped on an epoch's last iteration, before that epoch's validation / checkpoint). Nothing in it needs pickled
classes, so ``torch.load(path, weights_only=True)`` reads it (:func:`load_checkpoint`, which the
predictor uses too).

Writes go to a temporary file beside the target and are renamed into place
(:func:`medseg.io.atomic_write`): a ``kill -9`` mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import InputError
from medseg.io import atomic_write

__all__ = ["capture_rng", "load_checkpoint", "restore_rng", "save_checkpoint"]


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch (CPU) and CUDA generator states as tensors / primitives."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when the device count matches).

    The generators only take CPU states (``torch.set_rng_state`` needs a CPU ``ByteTensor``), so
    every tensor is brought to the CPU first, wherever the checkpoint was mapped.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].cpu().tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``state`` to ``path`` atomically (temporary file + rename)."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: the one checkpoint reader (resuming a run and
    :func:`medseg.infer.predictor.load_run` both call it).

    Args:
        path: the ``.pt`` file.
        map_location: where its tensors land. Keep the default (CPU) to resume and to predict:
            the RNG states must be CPU tensors, and ``load_state_dict`` copies weights to the
            model's device.

    Returns:
        The checkpoint dict (see the module docstring).

    Raises:
        InputError: missing, truncated or not a medseg checkpoint (no ``model`` state dict).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: checkpoint not found")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...
        raise InputError(f"{p}: cannot read checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise InputError(f"{p}: not a medseg checkpoint (no 'model' state dict)")
    return state
