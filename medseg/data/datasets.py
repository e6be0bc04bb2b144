"""Dataset discovery: nnU-Net v2, Medical Segmentation Decathlon, or a plain images/labels pair.

Layouts understood by :func:`discover_cases`:

- **nnU-Net v2** (Isensee et al. 2021): ``dataset.json`` with ``channel_names`` and ``labels``
  ``{name: int}``; images ``imagesTr/<case>_<XXXX><file_ending>`` (one file per channel) and
  ``labelsTr/<case><file_ending>``; optionally an explicit ``dataset`` mapping
  ``{case: {"images": [...], "label": ...}}``. Images without the ``_XXXX`` channel suffix are
  accepted as single-channel cases (as in ``../shared/data/real_ct``).
- **Decathlon** (Antonelli et al. 2022): ``labels`` ``{"0": "background", ...}`` (int -> name),
  ``modality`` instead of ``channel_names``, explicit ``training`` / ``test`` lists of
  ``{"image": ..., "label": ...}`` paths relative to the root.
- **Ignore label** (nnU-Net v2): a label named ``"ignore"`` with the highest value marks voxels
  whose class is unknown. It is not a class: it is left out of :attr:`DatasetInfo.num_classes`,
  of the loss, of the fingerprint's foreground and of the metrics, and is never predicted.
  Region-based labels (a list of values per label) are refused.
- **Plain folders**: ``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/`` without a
  ``dataset.json``); classes are read from the label files. A DICOM series folder is a
  dataset of one unlabelled case.

Test cases come from the ``test`` list or from ``imagesTs/`` + ``labelsTs/``. Any volume
format :func:`medseg.io.read_volume` reads is accepted (NIfTI, NRRD, MHA, DICOM folders).
Case names become file names, so names with a path separator or ``..`` are refused.

:func:`load_dataset_json` is the one reader of ``dataset.json`` (discovery, preprocessing and
``medseg evaluate`` all use it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.checks import check_case_name
from medseg.data.splits import load_or_make_splits, make_splits  # noqa: F401  (re-exported, see docs/architecture.md)
from medseg.errors import InputError
from medseg.io import find_volumes, is_dicom_dir, read_volume, split_channel_tag, strip_volume_suffix

__all__ = ["IGNORE_NAME", "Case", "DatasetInfo", "build_dataset_json", "discover_cases", "ignore_label_of",
           "label_names_of", "load_dataset_json", "load_or_make_splits", "make_splits", "num_classes_of", "parse_labels"]

IGNORE_NAME = "ignore"  # nnU-Net v2's name of the ignore label


def ignore_label_of(labels: dict[str, int]) -> int | None:
    """The value of the label named ``"ignore"`` in a ``{name: value}`` map, or ``None``."""
    value = (labels or {}).get(IGNORE_NAME)
    return None if value is None else int(value)


def label_names_of(labels: dict[str, int]) -> dict[int, str]:
    """``{value: name}`` of the foreground classes of a ``{name: value}`` map (no background, no ignore
    label), by value."""
    ignore = ignore_label_of(labels)
    return {int(v): k for k, v in sorted((labels or {}).items(), key=lambda kv: kv[1]) if v != 0 and v != ignore}


def num_classes_of(labels: dict[str, int]) -> int:
    """Classes the network predicts, background included: the largest value that is not the
    ignore label, plus one (1 for an empty map)."""
    ignore = ignore_label_of(labels)
    values = [int(v) for v in (labels or {}).values() if int(v) != ignore]
    return max(values) + 1 if values else 1


@dataclass
class Case:
    """One case: its channel images (in channel order) and its label file (or ``None``)."""

    name: str
    images: list[Path]
    label: Path | None = None


@dataclass
class DatasetInfo:
    """What :func:`discover_cases` found."""

    root: Path
    name: str
    labels: dict[str, int]  # name -> value, background 0
    channel_names: dict[str, str]  # "0" -> "CT"
    cases: list[Case]
    test_cases: list[Case] = field(default_factory=list)
    layout: str = "nnunet"  # nnunet | decathlon | folders
    dataset_json: dict | None = None  # the source dataset.json, if any
    json_path: Path | None = None  # where dataset_json was read from

    @property
    def num_classes(self) -> int:
        """Classes the network predicts, background included (the ignore label is not one)."""
        return num_classes_of(self.labels)

    @property
    def ignore_label(self) -> int | None:
        """The value of nnU-Net v2's ``"ignore"`` label, or ``None``."""
        return ignore_label_of(self.labels)

    @property
    def label_names(self) -> dict[int, str]:
        """``{value: name}`` of the foreground classes (no background, no ignore label)."""
        return label_names_of(self.labels)


def load_dataset_json(path: str | Path) -> DatasetInfo | None:
    """Read a ``dataset.json`` (nnU-Net v2 or Decathlon): name, labels, channels; no case is listed.

    Args:
        path: the ``dataset.json`` file, or a folder holding one (its dataset root).

    Returns:
        a :class:`DatasetInfo` with ``cases == []`` (:func:`discover_cases` fills them), the
        parsed JSON in ``dataset_json`` and its path in ``json_path``; ``None`` when ``path`` is
        a folder without a ``dataset.json``.

    Raises:
        InputError: the file is missing, not a JSON object, or its ``labels`` / ``channel_names``
            are malformed (see :func:`parse_labels`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
        if not path.is_file():
            return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON: {err}") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read dataset.json: {err.strerror or err}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    labels, decathlon = parse_labels(meta.get("labels"), path)
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
    if not isinstance(channels, dict):
        raise InputError(f"{path}: 'channel_names' must map channel index to a name")
    channels = {str(k): str(v) for k, v in channels.items()}
    return DatasetInfo(path.parent, str(meta.get("name") or path.parent.name), labels, channels, [], [],
                       "decathlon" if decathlon else "nnunet", meta, path)


def discover_cases(root: str | Path, *, ignore_dataset_json: bool = False) -> DatasetInfo:
    """Find the cases of a dataset folder (see the module docstring for the layouts).

    ``ignore_dataset_json=True`` scans the folders as if there were no ``dataset.json``
    (classes from the label files), e.g. to write a new one.

    Raises:
        InputError: the folder or a listed file is missing, a label file is missing for an
            image in ``imagesTr``, ``dataset.json`` is malformed, or no case was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found")
    info = None if ignore_dataset_json else load_dataset_json(root)
    if info is None:
        return _discover_plain(root)
    meta, where = info.dataset_json, info.json_path
    ending = meta.get("file_ending")
    if isinstance(meta.get("dataset"), dict):
        cases = [_case_from_entry(root, check_case_name(str(name), where, "'dataset' key"), e, where)
                 for name, e in meta["dataset"].items()]
    elif isinstance(meta.get("training"), list) and meta["training"]:
        cases = [_case_from_entry(root, None, e, where) for e in meta["training"]]
    else:
        cases = _scan_pair(root / "imagesTr", root / "labelsTr", ending, require_labels=True)
    if isinstance(meta.get("test"), list) and meta["test"]:
        tests = [_case_from_entry(root, None, e, where) for e in meta["test"]]
    else:
        tests = _scan_pair(root / "imagesTs", root / "labelsTs", ending, require_labels=False)
    if not cases:
        raise InputError(f"{root}: no training cases found (looked in dataset.json and imagesTr/)")
    _check_unique(cases, root)
    for c in cases:
        if len(c.images) != len(info.channel_names):
            raise InputError(f"{c.images[0]}: case '{c.name}' has {len(c.images)} channel file(s), "
                             f"dataset.json declares {len(info.channel_names)}")
    info.root, info.cases, info.test_cases = root, cases, tests
    return info


def build_dataset_json(info: DatasetInfo, *, description: str = "") -> dict:
    """An nnU-Net v2 ``dataset.json`` for ``info`` with explicit ``training`` / ``test`` lists
    (paths relative to ``info.root``, so files without the ``_0000`` suffix or in NRRD work)."""

    def rel(p: Path) -> str:
        try:
            return "./" + Path(p).resolve().relative_to(Path(info.root).resolve()).as_posix()
        except ValueError:
            return str(p)

    def entry(c: Case) -> dict:
        e: dict = {"image": rel(c.images[0])} if len(c.images) == 1 else {"images": [rel(p) for p in c.images]}
        if c.label is not None:
            e["label"] = rel(c.label)
        return e

    first = str(info.cases[0].images[0]) if info.cases else ".nii.gz"
    ending = next((s for s in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd") if first.lower().endswith(s)), "")
    return {
        "name": info.name,
        "description": description,
        "channel_names": dict(info.channel_names),
        "labels": dict(sorted(info.labels.items(), key=lambda kv: kv[1])),
        "file_ending": ending,
        "numTraining": len(info.cases),
        "training": [entry(c) for c in info.cases],
        "test": [entry(c) for c in info.test_cases],
    }


# --------------------------------------------------------------------------- helpers
def parse_labels(raw, where: str | Path) -> tuple[dict[str, int], bool]:
    """``dataset.json`` ``labels`` -> ``({name: value}, is_decathlon)``.

    Accepts nnU-Net v2's ``{"background": 0, "liver": 1}`` and the Decathlon's
    ``{"0": "background", "1": "liver"}``; a label named ``"ignore"`` must have the highest value.

    Raises:
        InputError: not a non-empty mapping, a region-based label (a list of values), a value
            outside 0..255, two labels with one value, no background 0, or an ``ignore`` label
            that is not the highest (``where`` is named in the message).
    """
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{where}: 'labels' must be a non-empty mapping (e.g. {{\"background\": 0, \"liver\": 1}})")
    if all(str(k).strip().isdigit() for k in raw) and all(isinstance(v, str) for v in raw.values()):
        labels, decathlon = {str(v): int(k) for k, v in raw.items()}, True
        if len(labels) != len(raw):
            raise InputError(f"{where}: two labels share one name ({raw})")
    else:
        labels, decathlon = {}, False
        for k, v in raw.items():
            if isinstance(v, (list, tuple)):
                raise InputError(f"{where}: label '{k}' is region-based ({v}); medseg supports one integer value "
                                 "per class (nnU-Net v2's region-based training is not supported)")
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 255:
                raise InputError(f"{where}: label '{k}' must be an integer in 0..255, got {v!r}")
            labels[str(k)] = v
    values = sorted(labels.values())
    if len(set(values)) != len(values):
        raise InputError(f"{where}: two labels share one value ({raw})")
    if 0 not in values:
        raise InputError(f"{where}: labels must include background = 0 ({labels})")
    ignore = ignore_label_of(labels)
    if ignore is not None and (ignore == 0 or ignore != values[-1]):
        raise InputError(f"{where}: the 'ignore' label ({ignore}) must have the highest value and not be 0 "
                         f"(nnU-Net v2's rule); labels: {labels}")
    return labels, decathlon


def _resolve(root: Path, rel, where: Path, what: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{where}: {what} must be a path string, got {rel!r}")
    p = (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
    if p.exists():
        return p
    # nnU-Net / Decathlon lists name the case file without the channel suffix
    stem = strip_volume_suffix(p.name)
    for cand in sorted(p.parent.glob(f"{stem}_0*")) if p.parent.is_dir() else []:
        if split_channel_tag(cand)[0] == stem:
            return p
    raise InputError(f"{p}: file not found ({what} listed in {where})")


def _case_from_entry(root: Path, name: str | None, entry, where: Path) -> Case:
    """A case from a ``training`` / ``test`` list entry or a ``dataset`` mapping value."""
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict):
        raise InputError(f"{where}: case entry must be a path or an object, got {entry!r}")
    imgs = entry.get("images", entry.get("image"))
    imgs = imgs if isinstance(imgs, list) else [imgs]
    paths = [_resolve(root, r, where, "image") for r in imgs]
    if len(paths) == 1 and not paths[0].exists():  # 'case.nii.gz' listed, 'case_0000.nii.gz' on disk
        stem = strip_volume_suffix(paths[0].name)
        paths = sorted(p for p in paths[0].parent.glob(f"{stem}_0*") if split_channel_tag(p)[0] == stem)
    label = _resolve(root, entry["label"], where, "label") if entry.get("label") else None
    case = name or check_case_name(strip_volume_suffix(Path(imgs[0]).name), where, f"case name of entry {imgs[0]!r}")
    return Case(str(case), paths, label)


def _scan_pair(img_dir: Path, lab_dir: Path, ending: str | None, *, require_labels: bool) -> list[Case]:
    """Group ``img_dir`` files into cases (``_XXXX`` channel suffix optional) and pair labels."""
    if not img_dir.is_dir():
        return []
    groups: dict[str, list[tuple[int, Path]]] = {}
    for p in find_volumes(img_dir):
        case, ch = split_channel_tag(p)
        ch = 0 if ch is None else ch
        groups.setdefault(case, []).append((ch, p))
    labels = {strip_volume_suffix(p.name): p for p in find_volumes(lab_dir)} if lab_dir.is_dir() else {}
    cases = []
    for case, chans in sorted(groups.items()):
        chans.sort()
        if [c for c, _ in chans] != list(range(len(chans))):
            raise InputError(f"{img_dir}: case '{case}' has channel files {[p.name for _, p in chans]}; expected _0000, _0001, ... without gaps")
        label = labels.get(case)
        if label is None and require_labels:
            want = lab_dir / f"{case}{ending or '.nii.gz'}"
            raise InputError(f"{want}: file not found (label for image {chans[0][1]})")
        cases.append(Case(check_case_name(case, img_dir, "case name from file"), [p for _, p in chans], label))
    return cases


def _check_unique(cases: list[Case], root: Path) -> None:
    seen: set[str] = set()
    for c in cases:
        if c.name in seen:
            raise InputError(f"{root}: case name '{c.name}' appears twice")
        seen.add(c.name)


def _discover_plain(root: Path) -> DatasetInfo:
    """``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/``) without a dataset.json; a
    DICOM series folder is one unlabelled case."""
    if is_dicom_dir(root):
        return DatasetInfo(root, root.name, {"background": 0}, {"0": "CT"}, [Case(root.name, [root], None)], [], "folders", None)
    for img_name, lab_name in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (root / img_name).is_dir():
            cases = _scan_pair(root / img_name, root / lab_name, None, require_labels=(root / lab_name).is_dir())
            tests = _scan_pair(root / "imagesTs", root / "labelsTs", None, require_labels=False)
            break
    else:
        raise InputError(f"{root}: no dataset.json and no images/ (or imagesTr/) folder; "
                         "see data_tools/make_dataset_json.py to describe a dataset")
    if not cases:
        raise InputError(f"{root}: no volumes found in {img_name}/")
    _check_unique(cases, root)
    values: set[int] = {0}
    for c in cases:
        if c.label is not None:
            values |= set(np.unique(read_volume(c.label).array).astype(int).tolist())
    labels = {"background": 0, **{f"label_{v}": v for v in sorted(values) if v != 0}}
    nch = len(cases[0].images)
    channels = {str(i): "CT" for i in range(nch)}
    return DatasetInfo(root, root.name, labels, channels, cases, tests, "folders", None)
