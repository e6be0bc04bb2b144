"""Training data: preprocessed cases in a MONAI dataset, patches with foreground oversampling.

- **Cases**: ``{"case": name}`` items loaded by :class:`LoadCased` (``load_case`` of the data
  layer) inside a MONAI dataset chosen by ``data.cache``: ``ram`` = :class:`monai.data.CacheDataset`
  (every case decoded once, shared copy-on-write with the loader workers), ``disk`` = the
  preprocessed ``.npy`` files memory-mapped (the preprocessed folder *is* the persistent cache:
  only the voxels of each patch are read), ``none`` = read the case at every access; ``auto``
  = ``ram`` when the cases take less than half of the available memory, else ``disk``.
- **Patches** (:class:`PatchDataset`): sample ``i`` of the run is drawn from its own generator
  seeded by ``(seed, rank, i)``, so a batch does not depend on the number of loader workers,
  each DDP rank sees different patches, and a resumed run draws the very patches it would
  have drawn. Foreground oversampling as nnU-Net: in each batch the last
  ``batch_size - round(batch_size * (1 - fg_oversample))`` samples are centred on a voxel of a
  random foreground class present in the case (``properties["class_locations"]``); with a
  batch of 1 the sample is forced with probability ``fg_oversample``.
- **Hard negatives** (``data.hard_negatives = f > 0``, :mod:`medseg.train.hard_negatives`): once
  the trainer has mined its model's false positives on the training cases, a random patch of a
  case that has some is centred on one of them with probability ``f`` (the table is read from
  ``hard_file`` and reread when that file changes, so loader workers see each new mining).
- **Copy-paste** (``train.augment.p_copy_paste > 0``): the connected components of
  ``copy_paste_classes`` in the training cases are banked once (:class:`medseg.data.transforms.ObjectBank`)
  with each case's :func:`medseg.data.transforms.inside_body` mask, and
  :class:`medseg.data.transforms.RandCopyPasted` pastes one into a patch's region with that probability.
- **z halo** (2.5D models, ``z_halo = H > 0``, :mod:`medseg.nn.slice25d`): each patch is cut and
  augmented with ``patch_z + 2H`` slices, so that the slices of the patch proper have their real
  neighbours; the loss keeps the central ``patch_z`` slices (:class:`medseg.train.losses.SegmentationLoss`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, get_track_meta, set_track_meta
from monai.transforms import Compose, MapTransform

from medseg.config import Config
from medseg.data.transforms import (ObjectBank, RandRotateScaled, as_plain_tensor, build_train_transforms, crop_extent,
                                    crop_patch, inside_body)
from medseg.errors import ConfigError, InputError
from medseg.runtime import get_logger
from medseg.train.signals import ignore_in_worker

__all__ = ["LoadCased", "PatchDataset", "case_dataset", "check_foreground", "list_cases",
           "make_train_loader", "read_plans", "resolve_cache_mode", "resolve_mirror_axes", "resolve_num_workers",
           "train_val_cases"]

CACHE_MODES = ("auto", "ram", "disk", "none")
log = get_logger(__name__)


def read_plans(pre_dir: str | Path) -> dict:
    """``plans.json`` of a preprocessed folder (InputError when the folder is missing or not one)."""
    from medseg.data.pipeline import load_plans

    pre = Path(pre_dir)
    if not pre.is_dir():
        raise InputError(f"{pre}: preprocessed folder not found (run `medseg preprocess` first, or set data.preprocessed)")
    return load_plans(pre)


def list_cases(pre_dir: str | Path) -> list[str]:
    """Names of the complete cases (``cases/<case>.json`` is written last), sorted."""
    pre = Path(pre_dir)
    names = sorted(p.name[: -len(".json")] for p in (pre / "cases").glob("*.json"))
    if not names:
        raise InputError(f"{pre}: holds no preprocessed cases (cases/*.json); run `medseg preprocess` into it")
    return names


def resolve_mirror_axes(cfg: Config, pre_dir: str | Path, plans: dict) -> list[int]:
    """Write the axes training flips into ``cfg.train.augment.mirror_axes`` (a list stays as it is;
    ``"auto"`` is decided from the preprocessed cases' class locations by
    :func:`medseg.data.plan.auto_mirror_axes`, with a log line naming ``plans``' labels) and return them."""
    import json

    from medseg.data.datasets import label_names_of
    from medseg.data.pipeline import case_file
    from medseg.data.plan import auto_mirror_axes

    aug = cfg.train.augment
    if aug.mirror_axes != "auto":
        return aug.flip_axes()
    cases = Path(pre_dir) / "cases"
    props = [json.loads(case_file(cases, n, ".json").read_text()) for n in list_cases(pre_dir)]
    axes, lateral = auto_mirror_axes(props)
    if lateral:
        names = label_names_of(plans.get("labels", {}))
        sides = ", ".join(f"{names.get(k, k)} {off:+.2f}" for k, off in lateral.items())
        log.info("train.augment.mirror_axes auto: %s; no left-right flips: classes on one side of the body in every "
                 "case (centroid offset / body width: %s)", axes, sides)
    else:
        log.info("train.augment.mirror_axes auto: %s (no class on one side of the body in every case)", axes)
    aug.mirror_axes = axes
    return axes


def train_val_cases(pre_dir: str | Path, cfg: Config, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(train, val)`` case names: ``data.val_cases`` when given, else fold ``data.fold`` of ``splits.json``."""
    from medseg.data.splits import fold_cases, load_or_make_splits

    d = cfg.data
    if d.val_cases:
        unknown = sorted(set(d.val_cases) - set(names))
        if unknown:
            raise ConfigError(f"data.val_cases: {unknown} are not preprocessed cases in {pre_dir}")
        train = [n for n in names if n not in set(d.val_cases)] or list(names)
        return train, list(d.val_cases)
    folds = load_or_make_splits(Path(pre_dir) / "splits.json", names, d.num_folds, d.split_seed)
    train, val = fold_cases(folds, d.fold)
    missing = sorted(set(train + val) - set(names))
    if missing:
        raise InputError(f"{Path(pre_dir) / 'splits.json'}: lists cases that are not preprocessed: {missing[:5]}")
    return train, val


class LoadCased(MapTransform):
    """``{"case": name}`` -> ``{"case", "image" (C,X,Y,Z) float32, "label" (1,X,Y,Z) uint8,
    "fg": {class: (N, 3) int32 voxel coordinates}, "spacing": [x, y, z]}``."""

    def __init__(self, pre_dir: str | Path, *, mmap: bool = False):
        super().__init__(keys=["case"])
        self.pre_dir, self.mmap = Path(pre_dir), mmap

    def __call__(self, data: dict) -> dict:
        from medseg.data.pipeline import load_case

        name = data["case"]
        image, label, props = load_case(self.pre_dir, name, mmap=self.mmap)
        if label is None:
            raise InputError(f"{self.pre_dir}: case '{name}' has no label; cannot train on it")
        fg = {int(k): np.asarray(v, dtype=np.int32).reshape(-1, 3) for k, v in props.get("class_locations", {}).items()}
        return {"case": name, "image": image, "label": label, "fg": {k: v for k, v in fg.items() if len(v)},
                "spacing": [float(s) for s in props.get("spacing", [1.0, 1.0, 1.0])]}


def _case_bytes(pre_dir: Path, names: Sequence[str]) -> int:
    return sum(p.stat().st_size for n in names for p in (pre_dir / "cases").glob(f"{n}_*.npy"))


def resolve_cache_mode(mode: str, pre_dir: str | Path, names: Sequence[str], *, copies: int = 1) -> str:
    """``auto`` -> ``ram`` when ``copies`` x the case files fit in half the available memory, else ``disk``."""
    if mode not in CACHE_MODES:
        raise ConfigError(f"data.cache: '{mode}' is not valid (use {', '.join(CACHE_MODES)})")
    if mode != "auto":
        return mode
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return "disk"
    return "ram" if copies * _case_bytes(Path(pre_dir), names) < 0.5 * avail else "disk"


def resolve_num_workers(value: int | str, device_type: str, *, cores: int, threads: int, ranks: int = 1) -> int:
    """Loader worker processes for ``data.num_workers`` (an integer is kept; ``"auto"`` decides).

    ``auto`` shares the machine's ``cores`` among the ``ranks`` training processes on it. On CUDA the
    step does not use CPU cores: up to 8 workers, one core per rank left to the main process. On a
    CPU, the step runs ``threads`` intra-op threads (``torch.get_num_threads()``): workers take the
    cores those leave idle (at most 2); with no idle core, a machine of <= 2 cores per rank loads in
    the main process (0 workers) and a larger one spends one core on a worker. Measured on a 2-core
    AMD EPYC (fp32, ``configs/real_organs.yaml``, 2 threads): with 1 worker the step took 1.41 s
    (presumably the worker's preemption stalls both compute threads; not profiled), loading in the main process 1.16 s +
    0.11 s. The 1 worker of a larger machine is not measured.
    """
    if value != "auto":
        return int(value)
    per_rank = max(1, cores // max(1, ranks))
    if device_type == "cuda":
        return max(1, min(8, per_rank - 1))
    idle = per_rank - threads
    if idle >= 1:
        return min(2, idle)
    return 0 if per_rank <= 2 else 1


def case_dataset(pre_dir: str | Path, names: Sequence[str], mode: str, *, workers: int = 0,
                 progress: bool = False) -> Dataset:
    """MONAI dataset of the cases ``names`` for a resolved cache ``mode`` (``ram`` / ``disk`` / ``none``)."""
    items = [{"case": n} for n in names]
    if mode == "ram":
        return CacheDataset(items, Compose([LoadCased(pre_dir)]), cache_rate=1.0, num_workers=max(workers, 1),
                            progress=progress, copy_cache=False)
    return Dataset(items, Compose([LoadCased(pre_dir, mmap=(mode == "disk"))]))


def check_foreground(cases: Dataset, pre_dir: str | Path) -> None:
    """InputError when no training case has any foreground voxel (nothing to learn)."""
    if not any(cases[i]["fg"] for i in range(len(cases))):
        raise InputError(f"{pre_dir}: no training case has foreground labels (class_locations are all empty)")


class PatchDataset(torch.utils.data.Dataset):
    """Random training patches; item ``i`` is fully determined by ``(seed, rank, i)``.

    Returns ``{"image": (C, X, Y, Z + 2 * z_halo) float32, "label": (1, X, Y, Z + 2 * z_halo) uint8}``
    for ``patch_size = (X, Y, Z)``. The length is nominal (``10**12``): the loader's sampler says
    which items an epoch takes.
    """

    def __init__(self, cases: Dataset, patch_size: Sequence[int], cfg: Config, *, rank: int = 0, z_halo: int = 0,
                 ignore_label: int | None = None, hard_file: str | Path | None = None):
        x, y, z = (int(p) for p in patch_size)
        self.cases, self.patch = cases, [x, y, z + 2 * int(z_halo)]
        self.batch_size, self.fg = int(cfg.train.batch_size), float(cfg.data.fg_oversample)
        self.seed, self.rank = int(cfg.train.seed), int(rank)
        self.extent = crop_extent(self.patch, cfg.train.augment)
        aug = cfg.train.augment
        self.bank, self.inside = None, None
        if aug.p_copy_paste > 0:
            self.bank = ObjectBank(cases, aug.copy_paste_classes)
            real = len(self.bank)
            if aug.copy_paste_synthetic > 0 and real:
                added = self.bank.add_synthetic(aug.copy_paste_synthetic, cases[0]["spacing"],
                                                aug.copy_paste_synthetic_diameter_mm, seed=self.seed)
                log.info("copy-paste: %d synthetic object(s) added to the %d real one(s) (diameters %s mm)",
                         added, real, aug.copy_paste_synthetic_diameter_mm)
            if len(self.bank):
                self.inside = [inside_body(np.asarray(cases[i]["image"][0]))[None]
                               for i in range(len(cases))]
            log.info("copy-paste: %d object(s) of class(es) %s banked from %d training case(s), pasted into %.0f%% of "
                     "the patches", len(self.bank), aug.copy_paste_classes, len(cases), 100 * aug.p_copy_paste)
        self.transforms = build_train_transforms(self.patch, aug, ignore_label=ignore_label, bank=self.bank)
        # the chain's spatial transform, when it comes first: it draws ahead and the region is cut to what it
        # reads (the patch when it neither rotates nor scales); copy-paste before it works on the whole region
        first = self.transforms.transforms[0]
        self.spatial = first if isinstance(first, RandRotateScaled) else None
        self.n_random = round(self.batch_size * (1.0 - self.fg))
        self.hard = float(cfg.data.hard_negatives)
        self.hard_file = Path(hard_file) if hard_file is not None and self.hard > 0 else None
        self._hard_key: tuple | None = None
        self._hard_table: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return 10**12

    def force_foreground(self, index: int, rng: np.random.Generator) -> bool:
        if self.batch_size == 1:
            return bool(rng.random() < self.fg)
        return index % self.batch_size >= self.n_random

    def hard_locations(self, case: str) -> np.ndarray | None:
        """The mined false-positive voxels of ``case`` ((N, 3), N > 0), or None (none mined, or off)."""
        if self.hard_file is None:
            return None
        try:
            st = os.stat(self.hard_file)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._hard_key:  # a new mining (written through a rename: a new inode)
            from medseg.train.hard_negatives import read_hard_negatives

            self._hard_table, self._hard_key = read_hard_negatives(self.hard_file), key
        locs = self._hard_table.get(case)
        return locs if locs is not None and len(locs) else None

    def _center(self, case: dict, forced: bool, rng: np.random.Generator) -> list[int]:
        if forced and case["fg"]:
            classes = sorted(case["fg"])
            locs = case["fg"][classes[int(rng.integers(len(classes)))]]
            return [int(v) for v in locs[int(rng.integers(len(locs)))]]
        hard = None if forced else self.hard_locations(case["case"])
        if hard is not None and rng.random() < self.hard:  # no draw without a table: the stream of f = 0
            return [int(v) for v in hard[int(rng.integers(len(hard)))]]
        return [int(rng.integers(n)) for n in case["image"].shape[1:]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        k = int(rng.integers(len(self.cases)))
        case = self.cases[k]
        center = self._center(case, self.force_foreground(int(index), rng), rng)
        self.transforms.set_random_state(seed=int(rng.integers(2**31)))
        # cut only what this patch's rotation / scaling reads of the region (a box at the same centre)
        box = self.extent if self.spatial is None else self.spatial.draw(self.extent)
        image, label = crop_patch([case["image"], case["label"]], center, box)
        region = {"image": torch.from_numpy(image.astype(np.float32, copy=False)),
                  "label": torch.from_numpy(label.astype(np.float32))}
        if self.inside is not None:
            region["inside"] = torch.from_numpy(crop_patch([self.inside[k]], center, box)[0])
        track = get_track_meta()
        set_track_meta(False)  # plain tensors: MONAI's metadata bookkeeping doubles the cost of a patch
        try:
            d = self.transforms(region)
        finally:
            set_track_meta(track)
        return {"image": as_plain_tensor(d["image"]).float(),
                "label": as_plain_tensor(d["label"]).round().to(torch.uint8)}


def make_train_loader(patches: PatchDataset, *, start_batch: int, end_batch: int, num_workers: int,
                      pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """One loader over batches ``[start_batch, end_batch)`` of the run (a resumed run starts later)."""
    bs = patches.batch_size
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=2, persistent_workers=False, worker_init_fn=ignore_in_worker)
        if "fork" in torch.multiprocessing.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"  # share cached cases copy-on-write
    return torch.utils.data.DataLoader(patches, batch_size=bs, sampler=range(start_batch * bs, end_batch * bs),
                                       num_workers=num_workers, pin_memory=pin_memory, drop_last=False, **kwargs)
