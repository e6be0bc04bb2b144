"""Hard-negative patches: mining the model's false positives on the training cases, the table file,
the patch sampler centring random patches on them, and the trainer mining at its interval."""

from __future__ import annotations

import numpy as np
import torch

from medseg.config import load_config
from medseg.train import data as tdata
from medseg.train.distributed import DistInfo
from medseg.train.hard_negatives import (hard_negative_file, mine_false_positives, read_hard_negatives,
                                         write_hard_negatives)

CPU = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


class ConstantLogits(torch.nn.Module):
    """``(B, C, X, Y, Z) -> (B, K, X, Y, Z)``: the same logits everywhere (class ``winner`` highest)."""

    def __init__(self, num_classes: int, winner: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.logits[winner] = 1.0

    def forward(self, x):
        return self.logits.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]).to(x.dtype)


def _label(pre, case):
    return np.load(pre / "cases" / f"{case}_label.npy")[0]


def test_mining_keeps_the_voxels_marked_as_a_class_they_are_not(preprocessed_phantoms):
    pre, case = preprocessed_phantoms, "phantom_000"
    ref = _label(pre, case)
    wrong = np.argwhere(ref != 1)  # a net that says "liver" everywhere: every non-liver voxel is a false positive
    assert 1000 < len(wrong) < ref.size

    table = mine_false_positives(ConstantLogits(5, 1), [case], pre, patch_size=[16, 16, 16], info=CPU)
    np.testing.assert_array_equal(table[case], wrong)  # all of them (fewer than MAX_PER_CASE), sorted

    capped = mine_false_positives(ConstantLogits(5, 1), [case, "phantom_001"], pre, patch_size=[16, 16, 16],
                                  info=CPU, max_per_case=500, seed=3)
    assert sorted(capped) == [case, "phantom_001"] and all(len(v) == 500 for v in capped.values())
    c = capped[case]
    assert c.dtype == np.int32 and len(np.unique(c, axis=0)) == 500 and (ref[tuple(c.T)] != 1).all()
    assert (np.diff(c[:, 0]) >= 0).all()  # a sorted subset of the full list
    again = mine_false_positives(ConstantLogits(5, 1), [case], pre, patch_size=[16, 16, 16], info=CPU,
                                 max_per_case=500, seed=3)
    other = mine_false_positives(ConstantLogits(5, 1), [case], pre, patch_size=[16, 16, 16], info=CPU,
                                 max_per_case=500, seed=4)
    np.testing.assert_array_equal(again[case], c)
    assert not np.array_equal(other[case], c)

    # background everywhere marks nothing; the ignore label is never a false positive
    assert len(mine_false_positives(ConstantLogits(5, 0), [case], pre, patch_size=[16, 16, 16], info=CPU)[case]) == 0
    no_kidney = mine_false_positives(ConstantLogits(5, 1), [case], pre, patch_size=[16, 16, 16], info=CPU,
                                     ignore_label=3)
    np.testing.assert_array_equal(no_kidney[case], np.argwhere((ref != 1) & (ref != 3)))


def test_the_table_file_is_written_atomically_and_read_back(tmp_path):
    path = hard_negative_file(tmp_path / "run", 1)
    assert path == tmp_path / "run" / "hard_negatives" / "rank1.npz"
    assert read_hard_negatives(path) == {}
    write_hard_negatives(path, {"a": np.array([[1, 2, 3], [4, 5, 6]]), "b": np.zeros((0, 3))})
    back = read_hard_negatives(path)
    assert sorted(back) == ["a", "b"] and back["a"].dtype == np.int32 and back["b"].shape == (0, 3)
    np.testing.assert_array_equal(back["a"], [[1, 2, 3], [4, 5, 6]])
    assert [p.name for p in path.parent.iterdir()] == ["rank1.npz"]  # no temporary left behind


def _patches(pre, hard_file, *extra):
    cfg = load_config(None, ["data.patch_size=[16,16,16]", "train.batch_size=3", "train.augment.p_rotate=0",
                             "train.augment.p_scale=0", "train.augment.p_mirror=0", *extra])
    cases = tdata.case_dataset(pre, ["phantom_000"], "ram")
    return tdata.PatchDataset(cases, [16, 16, 16], cfg, hard_file=hard_file)


def test_random_patches_are_centred_on_mined_voxels_at_the_asked_fraction(preprocessed_phantoms, tmp_path):
    pre, case = preprocessed_phantoms, "phantom_000"
    ref = _label(pre, case)
    kidney, liver = np.argwhere(ref == 3)[0], np.argwhere(ref == 1)[0]
    path = tmp_path / "hard.npz"
    items = range(30)
    always = _patches(pre, path, "data.hard_negatives=1.0", "data.fg_oversample=0")
    plain = _patches(pre, None, "data.fg_oversample=0")
    # nothing mined yet: the very patches of hard_negatives = 0
    for i in (0, 1, 5):
        torch.testing.assert_close(always[i]["image"], plain[i]["image"])

    write_hard_negatives(path, {case: kidney[None]})
    assert all(always[i]["label"][0, 8, 8, 8] == 3 for i in items)  # every patch centred on the one mined voxel
    write_hard_negatives(path, {case: liver[None]})  # a new mining is picked up by the same dataset
    assert all(always[i]["label"][0, 8, 8, 8] == 1 for i in items)

    half = _patches(pre, path, "data.hard_negatives=0.5", "data.fg_oversample=0")
    centred = sum(bool((half[i]["image"][0, 8, 8, 8] == always[i]["image"][0, 8, 8, 8]).item()) for i in range(60))
    assert 15 <= centred <= 45, centred  # ~half (binomial 60 x 0.5: 15..45 is beyond 3.8 sigma)
    # foreground-forced patches are not redirected; hard_negatives = 0 ignores a table
    forced = _patches(pre, path, "data.hard_negatives=1.0", "data.fg_oversample=0.34")
    off = _patches(pre, path, "data.fg_oversample=0.34")
    for i in (2, 5, 8):
        torch.testing.assert_close(forced[i]["image"], off[i]["image"])
    assert all(forced[i]["label"][0, 8, 8, 8] == 1 for i in (0, 1, 3, 4))  # the random slots do go there
    assert off.hard_file is None


def test_the_trainer_mines_at_its_interval_and_samples_from_the_table(preprocessed_phantoms, tmp_path):
    from medseg.train import train

    run = tmp_path / "run"
    cfg = load_config(None, [f"data.preprocessed={preprocessed_phantoms}", "model.channels=[4,8,16]",
                             "data.patch_size=[16,16,16]", "train.epochs=3", "train.iters_per_epoch=2",
                             "train.batch_size=2", "data.num_workers=0", "data.val_cases=[phantom_003]",
                             "train.tb_num_cases=0", "infer.sw_batch_size=4", "data.fg_oversample=0",
                             "data.hard_negatives=1.0", "data.hard_negative_interval=1"])
    result = train(cfg, run)
    hist = result["history"]
    assert result["status"] == "finished" and len(hist) == 3
    assert "hard_negative_voxels" not in hist[-1]  # no mining after the last epoch
    table = read_hard_negatives(hard_negative_file(run, 0))
    assert sorted(table) == ["phantom_000", "phantom_001", "phantom_002"]  # the training cases, not phantom_003
    assert hist[1]["hard_negative_voxels"] == sum(len(v) for v in table.values())  # the file is the last mining
    for case, coords in table.items():
        ref = _label(preprocessed_phantoms, case)
        assert ((coords >= 0) & (coords < ref.shape)).all()
    log = (run / "log.txt").read_text()
    assert log.count("hard negatives epoch") == 2 and "hard negatives epoch 2:" in log
