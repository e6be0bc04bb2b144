"""Hard-negative patches: centre some random patches on the current model's false positives.

Online hard example mining (A. Shrivastava, A. Gupta, R. Girshick, "Training Region-based Object
Detectors with Online Hard Example Mining", CVPR 2016), applied to where patches are cut rather
than to which RoIs enter the loss. A random patch of a CT lands mostly on easy background (air,
fat, muscle); the confusable background a small class is mistaken for (vessels where they meet
the lung, for a lung lesion) is a small fraction of the volume and seldom sampled.

With ``data.hard_negatives = f > 0``, every ``data.hard_negative_interval`` epochs the trainer
predicts its own **training** cases whole (:func:`mine_false_positives`: the validation's sliding
window, overlap 0.25) and records the voxels it marks as a foreground class they do not belong to
(background, or another class; never the ignore label), at most :data:`MAX_PER_CASE` per case
drawn uniformly. Afterwards, a random (not foreground-forced) patch of a case with such voxels is
centred on one of them with probability ``f`` (:class:`medseg.train.data.PatchDataset`); the
foreground-forced patches and the budget's accounting are unchanged (the mining time counts as
training time, as validation does). Until the first mining, and for a case without false
positives, the patch stream is exactly that of ``f = 0``.

The table travels through a file (:func:`hard_negative_file`, one per rank, written atomically) so
that loader worker processes, which hold copies of the dataset, pick it up (the dataset rereads it
when the file changes), and a resumed run reads the table its stopped run had mined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medseg.train.distributed import DistInfo, all_gather_objects

__all__ = ["MAX_PER_CASE", "MINING_OVERLAP", "hard_negative_file", "mine_false_positives", "read_hard_negatives",
           "write_hard_negatives"]

MAX_PER_CASE = 20_000  # voxel coordinates kept per case (uniform draw): ~240 kB of int32 per case
MINING_OVERLAP = 0.25  # sliding-window overlap of the mining pass (validation's default 0.5 costs ~3.4x the windows in 3D)


def hard_negative_file(run_dir: str | Path, rank: int) -> Path:
    """``<run_dir>/hard_negatives/rank<r>.npz``: the table rank ``r``'s patch dataset reads."""
    return Path(run_dir) / "hard_negatives" / f"rank{int(rank)}.npz"


@torch.no_grad()
def mine_false_positives(model: torch.nn.Module, cases: Sequence[str], pre_dir: str | Path, *,
                         patch_size: Sequence[int], info: DistInfo, overlap: float = MINING_OVERLAP,
                         blend: str = "gaussian", sw_batch_size: int = 2, amp_dtype: torch.dtype | None = None,
                         channels_last: bool = False, ignore_label: int | None = None, seed: int = 0,
                         max_per_case: int = MAX_PER_CASE) -> dict[str, np.ndarray]:
    """Voxels of each training case that ``model`` labels as a foreground class they are not.

    Args:
        model: the bare network, ``(B, C, *patch) -> (B, K, *patch)`` logits; its mode is restored.
        cases: training case names of ``pre_dir`` (every rank passes the same list; each predicts
            ``cases[rank::world]`` and the tables are gathered).
        patch_size: sliding-window size ``(x, y, z)`` (the training patch).
        seed: seeds (with the case's index in ``cases``) the uniform draw of ``max_per_case`` voxels
            from a case with more.

    Returns:
        ``{case: (N, 3) int32 voxel indices on the preprocessed grid}``, N in ``[0, max_per_case]``,
        sorted; the same dict on every rank.
    """
    from medseg.train.validation import predict_preprocessed

    table: dict[str, np.ndarray] = {}
    for index, name in enumerate(cases):
        if index % info.world_size != info.rank:
            continue
        _, ref, _, pred, _ = predict_preprocessed(
            model, pre_dir, name, patch_size=patch_size, overlap=overlap, blend=blend, sw_batch_size=sw_batch_size,
            amp_dtype=amp_dtype, device=info.device, channels_last=channels_last)
        wrong = (pred > 0) & (pred != ref)
        if ignore_label is not None:
            wrong &= ref != ignore_label
        coords = np.argwhere(wrong).astype(np.int32)
        if len(coords) > max_per_case:
            rng = np.random.default_rng([int(seed), index])
            coords = coords[np.sort(rng.choice(len(coords), max_per_case, replace=False))]
        table[name] = coords.reshape(-1, 3)
    return {k: v for part in all_gather_objects(table, info) for k, v in part.items()}


def write_hard_negatives(path: str | Path, table: dict[str, np.ndarray]) -> None:
    """Write ``table`` to ``path`` (``.npz``, one array per case) through a temporary name and a rename."""
    from medseg.io import atomic_write

    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v, dtype=np.int32).reshape(-1, 3) for k, v in table.items()})


def read_hard_negatives(path: str | Path) -> dict[str, np.ndarray]:
    """The table :func:`write_hard_negatives` wrote (``{}`` when ``path`` does not exist)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        return {}
