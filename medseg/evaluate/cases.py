"""Which files to compare, and which classes to score: case matching and ``dataset.json``.

**Case matching.** A case's key is its file name without the volume suffix (``.nii.gz``, ``.nii``,
``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) and without a trailing ``_0000`` channel suffix, so
``liver_3.nrrd`` (prediction) matches ``liver_3.nii.gz`` or ``liver_3_0000.mha`` (reference).

**Labels and scored labels in dataset.json** (read by :func:`medseg.data.datasets.load_dataset_json`,
the one reader of dataset.json: nnU-Net v2's ``"labels": {"background": 0, "liver": 1, ...}`` or the
Decathlon's ``{"0": "background", "1": "liver"}`` give the class names; nnU-Net v2's ``"ignore"``
label is not a class: reference voxels holding it are left out of every metric). A case may restrict
the classes it is scored on (e.g. a scan whose reference only outlines some organs), in either or
both of two forms::

    "scored_labels": {"case_a": [1, 2], "case_b": ["liver"]}            # top level: case -> classes

    "test": [{"image": "./imagesTs/case_a.nii.gz",                      # per entry of "test" or
              "label": "./labelsTs/case_a.nii.gz", "scored_labels": [1, 2]}]   # "training"

Classes are label values or names from ``"labels"``; an entry's case is the key of its ``label``
(else ``image``, else ``name``/``case``) file name. A case not listed is scored on every class.
Two different lists for one case are an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.data.datasets import DatasetInfo, load_dataset_json  # noqa: F401  (the one dataset.json reader)
from medseg.errors import InputError
from medseg.io import case_name, find_volumes

__all__ = ["CaseMatch", "DatasetInfo", "case_key", "find_dataset_json", "load_dataset_json", "match_cases", "parse_label_list",
           "scored_labels"]


case_key = case_name  # one rule with inference: ``'dir/case_0000.nii.gz'`` -> ``'case'``, ``'x_0001.nrrd'`` -> ``'x_0001'``


@dataclass
class CaseMatch:
    """Result of pairing two folders: ``pairs`` (case, pred, ref), references without a
    prediction (``missing``: case, ref) and predictions without a reference (``unmatched``)."""

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)
    missing: list[tuple[str, Path]] = field(default_factory=list)
    unmatched: list[Path] = field(default_factory=list)


def _index(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{folder}: {role} folder not found")
    out: dict[str, Path] = {}
    for p in find_volumes(folder):
        key = case_key(p)
        if key in out:
            raise InputError(f"{folder}: two {role} files map to case '{key}': {out[key].name} and {p.name}")
        out[key] = p
    return out


def match_cases(pred_dir: str | Path, ref_dir: str | Path) -> CaseMatch:
    """Pair prediction and reference files by case key (any supported format on either side).

    Raises:
        InputError: a folder is missing, the reference folder holds no volume, or two files of one
            folder map to the same case.
    """
    preds, refs = _index(Path(pred_dir), "prediction"), _index(Path(ref_dir), "reference")
    if not refs:
        raise InputError(f"{ref_dir}: no reference volumes found (.nii.gz, .nii, .nrrd, .mha, .mhd or DICOM folders)")
    match = CaseMatch()
    for key in sorted(refs):
        if key in preds:
            match.pairs.append((key, preds[key], refs[key]))
        else:
            match.missing.append((key, refs[key]))
    match.unmatched = [preds[k] for k in sorted(set(preds) - set(refs))]
    return match


def find_dataset_json(ref_dir: str | Path) -> Path | None:
    """``dataset.json`` in the reference folder or its parent (nnU-Net's ``labelsTs/..``), or ``None``."""
    ref_dir = Path(ref_dir)
    for cand in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
        if cand.is_file():
            return cand
    return None


def parse_label_list(items: Any, names: dict[int, str], where: str) -> list[int]:
    """``[1, "liver", "2"]`` -> sorted label ints (names looked up in ``names``)."""
    if isinstance(items, (str, int)):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise InputError(f"{where}: expected a list of labels, got {items!r}")
    by_name = {v: k for k, v in names.items()}
    out = set()
    for it in items:
        if isinstance(it, bool):
            raise InputError(f"{where}: {it!r} is not a label")
        if isinstance(it, int):
            out.add(it)
        elif isinstance(it, str) and it.strip().lstrip("-").isdigit():
            out.add(int(it))
        elif isinstance(it, str) and it.strip() in by_name:
            out.add(by_name[it.strip()])
        else:
            known = ", ".join(f"{v}={k}" for k, v in sorted(names.items())) or "none"
            raise InputError(f"{where}: unknown label {it!r} (known names: {known})")
    if 0 in out:
        raise InputError(f"{where}: label 0 is background and is not scored")
    return sorted(out)


def _entry_case(entry: dict) -> str | None:
    for key in ("label", "image"):
        if isinstance(entry.get(key), str):
            return case_key(entry[key])
    for key in ("name", "case"):
        if isinstance(entry.get(key), str):
            return entry[key]
    return None


def scored_labels(info: DatasetInfo) -> dict[str, list[int]]:
    """Per-case scored classes of a dataset.json read by :func:`load_dataset_json` (format in the
    module docstring); ``{}`` when it restricts none.

    Raises:
        InputError: unknown scored label names, the ignore label or background listed, or two
            different scored-label lists for one case (the dataset.json is named).
    """
    path, ds, names = info.json_path, info.dataset_json or {}, info.label_names
    found: list[tuple[str, list[int], str]] = []
    top = ds.get("scored_labels") or {}
    if not isinstance(top, dict):
        raise InputError(f"{path}: scored_labels must map case names to label lists")
    for case, items in top.items():
        found.append((case, parse_label_list(items, names, f"{path}: scored_labels.{case}"), "scored_labels"))
    for section in ("training", "test"):
        for i, entry in enumerate(ds.get(section) or []):
            if isinstance(entry, dict) and "scored_labels" in entry:
                case = _entry_case(entry)
                if case is None:
                    raise InputError(f"{path}: {section}[{i}] has scored_labels but no label/image/name to name its case")
                where = f"{path}: {section}[{i}].scored_labels"
                found.append((case, parse_label_list(entry["scored_labels"], names, where), f"{section}[{i}]"))
    scored: dict[str, list[int]] = {}
    for case, labels, where in found:
        if info.ignore_label in labels:
            raise InputError(f"{path}: {where}: label {info.ignore_label} is the ignore label and is not scored")
        if case in scored and scored[case] != labels:
            raise InputError(f"{path}: case '{case}' has two different scored_labels lists ({scored[case]} and {labels} in {where})")
        scored[case] = labels
    return scored
