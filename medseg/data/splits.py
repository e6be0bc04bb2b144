"""K-fold cross-validation splits, saved as JSON together with the seed that made them.

``make_splits`` returns nnU-Net's ``splits_final.json`` shape, a list of
``{"train": [...], "val": [...]}`` (one per fold); the file written by
``load_or_make_splits`` wraps it as ``{"seed": s, "num_folds": k, "cases": [...], "folds": [...]}``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.errors import ConfigError, InputError
from medseg.io import atomic_write_text

__all__ = ["fold_cases", "load_or_make_splits", "make_splits", "read_splits", "write_splits"]


def make_splits(case_names: Sequence[str], k: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """Shuffle the (sorted) case names with ``seed`` and cut them into ``k`` validation folds.

    With fewer cases than folds, ``k`` drops to the number of cases; a single case is its own
    training and validation set (a warning says so).
    """
    names = sorted(str(n) for n in case_names)
    if not names:
        raise InputError("cannot make cross-validation splits: no cases")
    if k < 1:
        raise ConfigError(f"data.num_folds: must be >= 1, got {k}")
    if len(names) == 1:
        warnings.warn(f"only one case ({names[0]}): it is used for both training and validation")
        return [{"train": list(names), "val": list(names)}]
    k = min(k, len(names))
    order = np.random.default_rng(seed).permutation(len(names))
    folds = []
    for val_idx in np.array_split(order, k):
        val = set(int(i) for i in val_idx)
        folds.append({"train": [names[i] for i in range(len(names)) if i not in val],
                      "val": [names[i] for i in sorted(val)]})
    if k == 1:  # one "fold" = no held-out data; validate on everything
        folds = [{"train": list(names), "val": list(names)}]
    return folds


def write_splits(path: str | Path, folds: list[dict], *, seed: int, case_names: Sequence[str]) -> Path:
    """Write the splits JSON (atomically) with its seed, fold count and case list."""
    doc = {"seed": int(seed), "num_folds": len(folds), "cases": sorted(case_names), "folds": folds}
    return atomic_write_text(path, json.dumps(doc, indent=1))


def read_splits(path: str | Path) -> dict:
    """Read a splits JSON (ours, or a bare nnU-Net ``splits_final.json`` list)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: file not found") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{p}: not valid JSON: {err}") from None
    if isinstance(doc, list):  # nnU-Net's splits_final.json
        doc = {"seed": None, "num_folds": len(doc), "folds": doc,
               "cases": sorted({c for f in doc for c in f.get("train", []) + f.get("val", [])})}
    if not isinstance(doc, dict) or not isinstance(doc.get("folds"), list):
        raise InputError(f"{p}: expected {{'seed', 'folds': [{{'train': [...], 'val': [...]}}, ...]}}")
    return doc


def load_or_make_splits(path: str | Path, case_names: Sequence[str], k: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """The folds stored in ``path`` when they match (same cases, ``k`` and ``seed``), else new ones.

    A missing file is created. A file made for other cases / settings is left untouched and
    new folds are returned with a warning (so that existing runs keep their splits).
    """
    p = Path(path)
    names = sorted(str(n) for n in case_names)
    if p.is_file():
        doc = read_splits(p)
        same_cases = sorted(doc.get("cases", [])) == names
        same_k = doc["num_folds"] == min(k, len(names)) or len(names) == 1
        if same_cases and same_k and doc.get("seed") in (None, seed):
            return doc["folds"]
        warnings.warn(f"{p}: made for other cases or settings (seed {doc.get('seed')}, {doc['num_folds']} folds); "
                      f"using new splits (seed {seed}, {k} folds) without overwriting it")
        return make_splits(names, k, seed)
    folds = make_splits(names, k, seed)
    write_splits(p, folds, seed=seed, case_names=names)
    return folds


def fold_cases(folds: list[dict], fold: int) -> tuple[list[str], list[str]]:
    """``(train, val)`` case names of ``fold``; ``fold = -1`` or ``"all"`` trains on everything."""
    if fold in (-1, "all"):
        every = sorted({c for f in folds for c in f["train"] + f["val"]})
        return every, every
    if not 0 <= int(fold) < len(folds):
        raise ConfigError(f"data.fold: {fold} is out of range (the splits have {len(folds)} folds: 0..{len(folds) - 1})")
    return list(folds[int(fold)]["train"]), list(folds[int(fold)]["val"])
