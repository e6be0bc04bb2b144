"""Patch sampling, augmentation chain, loss weights, LR schedule, checkpoints and config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import AugmentConfig, load_config
from medseg.data.transforms import RandRotateScaled, build_train_transforms, crop_extent, crop_patch, grid_sample_split
from medseg.errors import ConfigError, InputError
from medseg.train import data as tdata


# --------------------------------------------------------------------------- cropping
def test_crop_patch_cuts_inside_and_pads_outside():
    a = np.arange(2 * 6 * 5 * 4, dtype=np.float32).reshape(2, 6, 5, 4)
    (inside,) = crop_patch([a], center=[3, 2, 2], size=[2, 3, 2])
    np.testing.assert_array_equal(inside, a[:, 2:4, 1:4, 1:3])
    (edge,) = crop_patch([a], center=[0, 0, 0], size=[4, 4, 4], fill=[-7.0])
    assert edge.shape == (2, 4, 4, 4)
    np.testing.assert_array_equal(edge[:, 2:, 2:, 2:], a[:, :2, :2, :2])
    assert (edge[:, :2] == -7).all() and (edge[:, :, :2] == -7).all()
    (away,) = crop_patch([a], center=[50, 50, 50], size=[2, 2, 2])
    assert (away == 0).all()


def test_crop_extent_covers_rotation_and_scaling():
    aug = AugmentConfig(p_rotate=0.2, rotate_deg=15, p_scale=0.2, scale_range=[0.8, 1.25])
    ext = crop_extent([32, 32, 16], aug)
    assert all(e >= 1.25 * p for e, p in zip(ext, [32, 32, 16]))
    assert crop_extent([32, 32, 16], AugmentConfig(p_rotate=0, p_scale=0)) == [32, 32, 16]


def test_augmentation_chain_keeps_shapes_label_values_and_is_seeded():
    aug = AugmentConfig(p_rotate=1, p_scale=1, p_noise=1, p_blur=1, p_brightness=1, p_contrast=1, p_lowres=1,
                        p_gamma=1, p_mirror=0.5)
    patch = [16, 16, 8]
    ext = crop_extent(patch, aug)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(1, *ext)).astype(np.float32))
    label = torch.from_numpy(rng.integers(0, 4, size=(1, *ext)).astype(np.float32))
    chain = build_train_transforms(patch, aug)
    outs = []
    for _ in range(2):
        chain.set_random_state(seed=5)
        d = chain({"image": image.clone(), "label": label.clone()})
        outs.append(d)
        assert tuple(d["image"].shape) == (1, *patch) and tuple(d["label"].shape) == (1, *patch)
        assert set(np.unique(np.asarray(d["label"]))) <= {0.0, 1.0, 2.0, 3.0}
    torch.testing.assert_close(torch.as_tensor(outs[0]["image"]), torch.as_tensor(outs[1]["image"]))
    chain.set_random_state(seed=6)
    other = chain({"image": image.clone(), "label": label.clone()})
    assert not torch.equal(torch.as_tensor(other["image"]), torch.as_tensor(outs[0]["image"]))


def test_no_augmentation_is_an_exact_centre_crop():
    aug = AugmentConfig(p_rotate=0, p_scale=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
                        p_gamma=0, p_mirror=0)
    image = torch.arange(10 * 10 * 10, dtype=torch.float32).reshape(1, 10, 10, 10)
    d = build_train_transforms([4, 4, 4], aug)({"image": image, "label": image.clone()})
    torch.testing.assert_close(torch.as_tensor(d["image"]), image[:, 3:7, 3:7, 3:7])


def test_grid_sample_split_gives_grid_samples_values_on_every_thread_count():
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 20, 25, generator=rng)
    grid = torch.rand(1, 31, 17, 19, 3, generator=rng) * 2.4 - 1.2  # some samples outside: zeros
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):  # 31 output rows: uneven slabs for 2 and 3 threads
            torch.set_num_threads(threads)
            for mode in ("bilinear", "nearest"):
                ref = torch.nn.functional.grid_sample(x[None], grid, mode=mode, padding_mode="zeros",
                                                      align_corners=False)[0]
                out = grid_sample_split(x, grid, mode)
                assert out.shape == (2, 31, 17, 19) and torch.equal(out, ref), (threads, mode)
    finally:
        torch.set_num_threads(old)


def _region(extent, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *extent)).astype(np.float32)
    label = rng.integers(0, 4, size=(1, *extent)).astype(np.float32)
    return image, label


def test_rotate_scale_resamples_as_monai_affine():
    from monai.transforms import Affine

    patch = [20, 18, 12]
    image, label = _region([34, 30, 26])
    t = RandRotateScaled(patch, p_rotate=1.0, rotate_deg=15, p_scale=1.0, scale_range=(0.7, 1.4))
    for seed in range(3):
        t.set_random_state(seed)
        out = t({"image": torch.from_numpy(image), "label": torch.from_numpy(label)})
        assert t._angles is not None and t._scale is not None
        for key, arr, mode in (("image", image, "bilinear"), ("label", label, "nearest")):
            ref = Affine(rotate_params=t._angles, scale_params=[t._scale] * 3, spatial_size=patch, mode=mode,
                         padding_mode="zeros", image_only=True)(torch.from_numpy(arr))
            assert torch.equal(out[key], torch.as_tensor(ref)), (seed, key)


def test_drawn_box_gives_the_patch_of_the_full_region_and_is_much_smaller():
    patch = [24, 20, 16]
    aug = AugmentConfig(p_rotate=0.5, rotate_deg=15, p_scale=0.5, scale_range=(0.7, 1.4))
    extent = crop_extent(patch, aug)
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(1, 50, 44, 36)).astype(np.float32)
    labels = rng.integers(0, 5, size=(1, 50, 44, 36)).astype(np.float32)
    t = RandRotateScaled(patch, p_rotate=0.5, rotate_deg=15, p_scale=0.5, scale_range=(0.7, 1.4))
    fractions, plain, mismatched = [], 0, 0
    for seed in range(40):
        centre = [int(rng.integers(0, n)) for n in volume.shape[1:]]  # near the edges too: padding inside the box
        full = crop_patch([volume, labels], centre, extent)
        t.set_random_state(seed)
        want = t({"image": torch.from_numpy(full[0]), "label": torch.from_numpy(full[1])})
        t.set_random_state(seed)
        box = t.draw(extent)
        assert all(b <= e and (e - b) % 2 == 0 or b == p for b, e, p in zip(box, extent, patch))
        fractions.append(np.prod(box) / np.prod(extent))
        plain += int(box == patch)
        cut = crop_patch([volume, labels], centre, box)  # centred as the region
        got = t({"image": torch.from_numpy(cut[0]), "label": torch.from_numpy(cut[1])})
        assert got["image"].shape == want["image"].shape == (1, *patch)
        torch.testing.assert_close(got["image"], want["image"], atol=1e-4, rtol=0)  # float rounding of the grid
        mismatched += int((got["label"] != want["label"]).sum())
        if box == patch:  # no rotation or scaling: the very centre crop
            assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])
    assert 10 <= plain <= 25  # (1 - 0.5) * (1 - 0.5) of the patches neither rotate nor scale
    assert mismatched <= 40 * np.prod(patch) * 1e-4  # a label voxel at an exact half voxel may round the other way
    assert np.mean(fractions) < 0.5


def test_patch_dataset_cuts_the_drawn_box_and_gives_the_full_region_patches(preprocessed_phantoms):
    over = ("train.augment.p_rotate=0.5", "train.augment.p_scale=0.5", "train.augment.p_label_shift=0.3")
    patches, cases = _patches(preprocessed_phantoms, 0, *over)
    full, _ = _patches(preprocessed_phantoms, 0, *over)
    assert isinstance(patches.spatial, RandRotateScaled)
    full.spatial = None  # the whole crop_extent region, as before the drawn box
    sizes = []
    real_crop = tdata.crop_patch
    try:
        tdata.crop_patch = lambda arrays, center, size, fill=None: sizes.append(list(size)) or real_crop(arrays, center, size, fill)
        for i in range(12):
            a, b = patches[i], full[i]
            torch.testing.assert_close(a["image"], b["image"], atol=1e-4, rtol=0)
            assert (a["label"] != b["label"]).float().mean() < 1e-3
    finally:
        tdata.crop_patch = real_crop
    assert [16, 16, 16] in sizes[0::2] and all(s == full.extent for s in sizes[1::2])


# --------------------------------------------------------------------------- sampling
def _patches(pre, rank=0, *extra):
    cfg = load_config(None, ["data.patch_size=[16,16,16]", "train.batch_size=3", "data.fg_oversample=0.34", *extra])
    cases = tdata.case_dataset(pre, tdata.list_cases(pre), "ram")
    return tdata.PatchDataset(cases, [16, 16, 16], cfg, rank=rank), cases


def test_foreground_oversampling_centres_the_last_third_on_foreground(preprocessed_phantoms):
    patches, _ = _patches(preprocessed_phantoms, 0, "train.augment.p_rotate=0", "train.augment.p_scale=0",
                          "train.augment.p_mirror=0")
    assert [patches.force_foreground(i, None) for i in range(6)] == [False, False, True, False, False, True]
    for i in (2, 5, 8, 11, 14, 17):
        assert patches[i]["label"][0, 8, 8, 8] > 0, i  # centre voxel is foreground
    batch = next(iter(tdata.make_train_loader(patches, start_batch=0, end_batch=1, num_workers=0)))
    assert batch["image"].shape == (3, 1, 16, 16, 16) and batch["label"].dtype == torch.uint8


def test_patches_depend_on_seed_rank_and_index_only(preprocessed_phantoms):
    p0, _ = _patches(preprocessed_phantoms, 0)
    p0_again, _ = _patches(preprocessed_phantoms, 0)
    p1, _ = _patches(preprocessed_phantoms, 1)
    torch.testing.assert_close(p0[7]["image"], p0_again[7]["image"])
    assert not torch.equal(p0[7]["image"], p1[7]["image"])  # DDP ranks draw different patches
    assert not torch.equal(p0[7]["image"], p0[8]["image"])
    two_workers = next(iter(tdata.make_train_loader(p0, start_batch=2, end_batch=3, num_workers=2)))
    torch.testing.assert_close(two_workers["image"][1], p0[7]["image"])  # batch 2, slot 1 = item 7


def test_num_workers_auto_gives_workers_only_idle_cores_on_a_cpu_and_spare_cores_on_cuda():
    from medseg.train.checks import check_config

    auto = tdata.resolve_num_workers
    assert load_config(None, []).data.num_workers == "auto"
    check_config(load_config(None, ["data.num_workers=auto"]))
    check_config(load_config(None, ["data.num_workers=3"]))
    assert auto(3, "cpu", cores=2, threads=2) == 3  # an explicit count is kept
    assert auto(0, "cuda", cores=64, threads=64) == 0
    # CPU: every core computing -> the 2-core machine loads inline, a larger one spends one core on a worker
    assert auto("auto", "cpu", cores=2, threads=2) == 0
    assert auto("auto", "cpu", cores=1, threads=1) == 0
    assert auto("auto", "cpu", cores=16, threads=16) == 1
    # idle cores (threads below the core count) go to workers, at most 2
    assert auto("auto", "cpu", cores=4, threads=3) == 1
    assert auto("auto", "cpu", cores=16, threads=8) == 2
    # CUDA: one core per rank stays with the main process, at most 8 workers, at least 1
    assert auto("auto", "cuda", cores=16, threads=16) == 8
    assert auto("auto", "cuda", cores=16, threads=16, ranks=4) == 3
    assert auto("auto", "cuda", cores=2, threads=2, ranks=4) == 1
    # CPU ranks share the cores too: 2 ranks of 2 threads on 4 cores have none idle
    assert auto("auto", "cpu", cores=4, threads=2, ranks=2) == 0


def test_cache_modes_and_case_loading(preprocessed_phantoms):
    names = tdata.list_cases(preprocessed_phantoms)
    assert names == ["phantom_000", "phantom_001", "phantom_002", "phantom_003"]
    assert tdata.resolve_cache_mode("auto", preprocessed_phantoms, names) == "ram"
    disk = tdata.case_dataset(preprocessed_phantoms, names, "disk")
    ram = tdata.case_dataset(preprocessed_phantoms, names, "ram")
    assert isinstance(disk[0]["image"], np.memmap)
    np.testing.assert_array_equal(np.asarray(disk[1]["label"]), ram[1]["label"])
    assert set(ram[0]["fg"]) <= {1, 2, 3, 4} and ram[0]["fg"][1].shape[1] == 3
    with pytest.raises(ConfigError, match="data.cache"):
        tdata.resolve_cache_mode("gpu", preprocessed_phantoms, names)


def test_missing_and_empty_preprocessed_folders(tmp_path):
    with pytest.raises(InputError, match="not found"):
        tdata.read_plans(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="plans.json"):
        tdata.read_plans(tmp_path / "empty")
    with pytest.raises(InputError, match="no preprocessed cases"):
        tdata.list_cases(tmp_path / "empty")


# --------------------------------------------------------------------------- loss / LR
def test_deep_supervision_weights_and_loss():
    from medseg.train.losses import SegmentationLoss, deep_supervision_weights

    assert deep_supervision_weights(1) == [1.0]
    np.testing.assert_allclose(deep_supervision_weights(4), np.array([1, 0.5, 0.25, 0]) / 1.75)
    loss = SegmentationLoss("dice_ce")
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    full, half, quarter = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)
    want = (loss(full, label) + 0.5 * loss(half, label[..., 1::2, 1::2, 1::2])) / 1.5  # lowest level: 0
    torch.testing.assert_close(loss([full, half, quarter], label), want)
    perfect = torch.nn.functional.one_hot(label[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 50
    assert loss(perfect, label) < 1e-3 < loss(full, label)


def test_topk_loss_averages_the_cross_entropy_of_the_hardest_tenth_of_the_voxels():
    import torch.nn.functional as F

    from medseg.train.losses import SegmentationLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10, 10, 10)
    label = torch.randint(0, 3, (2, 1, 10, 10, 10))
    voxel = F.cross_entropy(logits, label[:, 0], reduction="none").flatten()
    hardest = voxel.sort(descending=True).values[:200].mean()  # 10% of 2,000 voxels
    dice = float(SegmentationLoss("dice")(logits, label))
    topk = float(SegmentationLoss("dice_topk10")(logits, label))
    assert topk == pytest.approx(dice + float(hardest), rel=1e-5)
    assert float(hardest) > 1.5 * float(voxel.mean())  # not the plain mean: dice_ce would be lower
    assert float(SegmentationLoss("dice_ce")(logits, label)) < topk
    # the ignore label is left out before the top 10% are taken: ignored voxels count in neither part
    ignored = label.clone()
    ignored[..., :5] = 3
    kept = F.cross_entropy(logits[..., 5:], label[:, 0, ..., 5:], reduction="none").flatten()
    expect = SegmentationLoss("dice")(logits[..., 5:], label[..., 5:]) + kept.sort(descending=True).values[:100].mean()
    assert float(SegmentationLoss("dice_topk10", ignore_label=3)(logits, ignored)) == pytest.approx(float(expect), rel=1e-5)
    # a voxel outside the top 10% gets no CE gradient
    x = logits.clone().requires_grad_(True)
    only_ce = SegmentationLoss("dice_topk10")
    only_ce.lambda_dice = 0.0
    only_ce(x, label).backward()
    easy = voxel.view(2, 10, 10, 10) < voxel.sort(descending=True).values[199]
    assert float(x.grad.permute(0, 2, 3, 4, 1)[easy].abs().max()) == 0.0
    assert float(x.grad.abs().max()) > 0


def test_overlap_counts_score_the_argmax_of_the_full_resolution_output_without_halo_and_ignored_voxels():
    from medseg.train.losses import SegmentationLoss

    label = torch.zeros(1, 1, 4, 4, 6, dtype=torch.long)
    label[..., :2, :, :] = 1
    label[..., 3, 3, :] = 2
    label[..., 0, 0, 1] = 3  # ignore label (K = 3 outputs)
    pred = torch.zeros(1, 4, 4, 6, dtype=torch.long)
    pred[:, :3] = 1  # class 1: 2 rows right, 1 row wrong
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 4, 1, 2, 3).float()
    low = torch.zeros(1, 3, 2, 2, 3)  # a deep-supervision output: not scored
    counts = SegmentationLoss("dice_ce", ignore_label=3, z_halo=1).overlap_counts([logits, low], label, stride=1)
    # z halo 1: 4 central slices of 16 voxels; class 1 labelled in 2 x 4 x 4 = 32 less the ignored voxel
    assert counts.dtype == torch.float64 and counts.shape == (3, 2)
    assert counts[:, 0].tolist() == [31, 47, 31]  # tp, predicted (3 rows x 16 less 1 ignored), labelled
    assert counts[:, 1].tolist() == [0, 0, 4]  # class 2 never predicted
    full = SegmentationLoss("dice_ce").overlap_counts(logits, label.clamp(max=2), stride=1)
    assert full[:, 0].tolist() == [47, 72, 47]  # all 6 slices (the clamped voxel is class 2 now)
    # the default: every 2nd voxel per axis (x 0, 2; y 0, 2; z 0, 2, 4): class 1 rows x 0 (labelled), 2 (not)
    sub = SegmentationLoss("dice_ce").overlap_counts(logits, label.clamp(max=2))
    assert sub[:, 0].tolist() == [6, 12, 6] and sub[:, 1].tolist() == [0, 0, 0]
    from medseg.train.engine import _train_dice

    dice = _train_dice(counts.flatten(), {"background": 0, "liver": 1, "spleen": 2})
    assert dice == {"liver": pytest.approx(2 * 31 / 78), "spleen": 0.0}
    assert _train_dice(torch.zeros(6, dtype=torch.float64), {"liver": 1}) == {"liver": None, "2": None}


def test_a_coarser_output_is_scored_against_the_label_downsampled_to_it():
    """Logits at half the label's resolution (model.train_at_stem): loss and training Dice take the
    label resampled with nearest-exact, the loss equals the one on that label explicitly; the
    overlap counts keep one sample per 2^3 label voxels (stride 2 on the label = stride 1 here)."""
    import torch.nn.functional as F

    from medseg.train.losses import SegmentationLoss

    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    label[0, 0, 0, 0, 0] = 3  # ignore label
    coarse = torch.randn(2, 3, 4, 4, 4)
    down = F.interpolate(label.float(), size=(4, 4, 4), mode="nearest-exact").long()
    assert torch.equal(down, label[..., 1::2, 1::2, 1::2])  # nearest-exact takes the odd voxels of a 2x grid
    for kind in ("dice_ce", "dice_topk10"):
        loss = SegmentationLoss(kind, ignore_label=3)
        torch.testing.assert_close(loss(coarse, label), loss(coarse, down))
        half = torch.randn(2, 3, 2, 2, 2)
        torch.testing.assert_close(loss([coarse, half], label), loss([coarse, half], down))
    loss = SegmentationLoss("dice_ce", ignore_label=3)
    torch.testing.assert_close(loss.overlap_counts(coarse, label), loss.overlap_counts(coarse, down, stride=1))
    perfect = F.one_hot(down[:, 0].clamp(max=2), 3).permute(0, 4, 1, 2, 3).float()
    counts = loss.overlap_counts(perfect, label)
    assert torch.equal(counts[0], counts[1]) and torch.equal(counts[1], counts[2]) and counts.sum() > 0


def test_poly_schedule_follows_a_changed_total():
    from medseg.config import TrainConfig
    from medseg.train.optim import build_optimizer, build_scheduler, refresh_lr

    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(lr=0.01, scheduler="poly")
    total = {"n": 10}
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, lambda: total["n"])
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.99
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    total["n"] = 20  # resumed with twice the epochs
    refresh_lr(sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.75**0.9)


def test_wsd_schedule_holds_the_base_lr_then_cools_down_linearly_and_follows_a_changed_total():
    from medseg.config import Config, TrainConfig
    from medseg.errors import ConfigError
    from medseg.train.checks import check_config
    from medseg.train.optim import build_optimizer, build_scheduler, lr_factor, refresh_lr

    assert [lr_factor("wsd", s, 100) for s in (0, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])
    assert [lr_factor("wsd", s, 100) for s in (90, 95, 100, 120)] == pytest.approx([0.5, 0.25, 0.0, 0.0])
    assert lr_factor("wsd", 50, 100, decay_fraction=1.0) == pytest.approx(0.5)  # linear from the start
    # the mean LR over a run: ~0.9 of the base (cosine: 0.5)
    assert np.mean([lr_factor("wsd", s, 1000) for s in range(1000)]) == pytest.approx(0.9, abs=1e-3)
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(optimizer="adamw", lr=0.001, scheduler="wsd", decay_fraction=0.5)
    total = {"n": 10}
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, lambda: total["n"])
    for _ in range(8):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001 * 0.2 / 0.5)
    total["n"] = 40  # a time budget that turned out to fit more steps: back on the plateau
    refresh_lr(sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    for bad in (0.0, 1.5):
        c = Config()
        c.train.decay_fraction = bad
        with pytest.raises(ConfigError, match="train.decay_fraction"):
            check_config(c)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_write_is_atomic_and_rng_round_trips(tmp_path, monkeypatch):
    import random

    from medseg.train import checkpoint as ck

    path = tmp_path / "latest.pt"
    ck.save_checkpoint({"model": {"w": torch.ones(2)}, "rng": ck.capture_rng()}, path)

    def dying_save(obj, f):  # a crash in the middle of writing
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    state = ck.load_checkpoint(path)  # weights_only=True inside
    torch.testing.assert_close(state["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temporary file left

    ck.restore_rng(state["rng"])
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.restore_rng(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        ck.load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("override, key", [
    ("train.optimizer=adam", "train.optimizer"),
    ("train.scheduler=step", "train.scheduler"),
    ("data.cache=gpu", "data.cache"),
    ("train.augment.p_rotate=1.5", "train.augment.p_rotate"),
    ("train.epochs=0", "train.epochs"),
    ("data.patch_size=[16,16]", "data.patch_size"),
    ("train.augment.mirror_axes=[3]", "train.augment.mirror_axes"),
    ("train.augment.mirror_axes=lr", "train.augment.mirror_axes"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.num_workers=many", "data.num_workers"),
    ("data.hard_negatives=1.5", "data.hard_negatives"),
    ("data.hard_negatives=-0.1", "data.hard_negatives"),
    ("data.hard_negative_interval=0", "data.hard_negative_interval"),
])
def test_bad_config_values_name_the_key(override, key):
    from medseg.train.checks import check_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(load_config(None, [override]))


def test_patch_size_must_fit_the_model():
    from medseg.train.checks import resolve_patch_size

    cfg = load_config(None, ["data.patch_size=[20,16,16]"])
    with pytest.raises(ConfigError, match="data.patch_size"):
        resolve_patch_size(cfg, {}, (8, 8, 8))
    assert resolve_patch_size(load_config(None), {"patch_size": [20, 16, 9]}, (8, 8, 1)) == [24, 16, 9]


def test_axial_slab_keeps_one_run_of_slices_and_pads_the_rest():
    from medseg.data.transforms import RandAxialSlabd

    image = torch.arange(2 * 4 * 4 * 20, dtype=torch.float32).reshape(2, 4, 4, 20) + 1.0  # no zero anywhere
    label = torch.ones(1, 4, 4, 20)
    spans = set()
    for seed in range(40):
        t = RandAxialSlabd(prob=1.0, min_slices=5, fill=0.0)
        t.set_random_state(seed=seed)
        out = t({"image": image, "label": label})
        kept = (out["image"] != 0).all(dim=(0, 1, 2)).nonzero().flatten().tolist()
        assert kept == list(range(kept[0], kept[-1] + 1)) and 5 <= len(kept) <= 20  # one contiguous run
        outside = [z for z in range(20) if z not in kept]
        assert torch.equal(out["image"][..., kept], image[..., kept])  # the slab untouched
        assert out["image"][..., outside].abs().sum() == 0 and out["label"][..., outside].sum() == 0
        assert torch.equal(out["label"][..., kept], label[..., kept])
        spans.add((kept[0], len(kept)))
    assert len(spans) > 10  # random start and length
    assert torch.equal(image, torch.arange(2 * 4 * 4 * 20, dtype=torch.float32).reshape(2, 4, 4, 20) + 1.0)  # input not modified
    off = RandAxialSlabd(prob=0.0, min_slices=5)({"image": image, "label": label})
    assert torch.equal(off["image"], image)


def test_slab_augmentation_is_in_the_chain_only_when_asked():
    from medseg.config import AugmentConfig
    from medseg.data.transforms import RandAxialSlabd, build_train_transforms

    def has_slab(aug):
        return any(isinstance(t, RandAxialSlabd) for t in build_train_transforms([8, 8, 8], aug).transforms)

    assert not has_slab(AugmentConfig())
    assert has_slab(AugmentConfig(p_slab=0.3, slab_min_slices=4))


@pytest.mark.parametrize("override, key", [("train.augment.p_slab=1.5", "train.augment.p_slab"),
                                           ("train.augment.slab_min_slices=0", "train.augment.slab_min_slices")])
def test_slab_settings_are_checked(override, key):
    from medseg.config import load_config
    from medseg.errors import ConfigError
    from medseg.train.checks import check_config

    with pytest.raises(ConfigError, match=key):
        check_config(load_config(None, [override]))



def test_thick_slices_average_along_z_only_and_leave_the_label_sharp():
    from medseg.data.transforms import RandThickSliced

    xy = torch.randn(2, 5, 6, 1).expand(2, 5, 6, 20).contiguous()  # varies in x and y only
    t = RandThickSliced(prob=1.0, factor_range=(2.0, 2.0))
    assert torch.allclose(t({"image": xy})["image"], xy, atol=1e-5)  # nothing to average along z: x / y untouched
    step = torch.zeros(1, 3, 3, 20)
    step[..., 11:] = 1.0  # an edge between slices 10 and 11, off the 2-slice grid
    label = (step > 0).float()
    out = t({"image": step, "label": label})
    z = out["image"][0, 1, 1]
    assert torch.equal(out["label"], label) and out["image"].shape == step.shape and out["image"].dtype == step.dtype
    assert torch.allclose(out["image"], z.expand_as(out["image"]))  # the same profile in every (x, y)
    assert (z[1:] >= z[:-1] - 1e-6).all() and z[0] == 0 and z[-1] == 1  # still a monotone edge ...
    assert ((z > 0.05) & (z < 0.95)).sum() >= 2  # ... but smeared over slices (partial volume)
    assert abs(float(z.sum()) - 9.0) < 1.0  # the intensity is moved, not lost
    spike = torch.zeros(1, 2, 2, 20)
    spike[..., 9] = 1.0  # a structure one slice tall
    zs = t({"image": spike})["image"][0, 0, 0]
    assert zs.max() < 0.75 and (zs > 0.1).sum() >= 2  # a thin structure fades and spreads, as in a 2x thicker slice
    assert torch.equal(step, (torch.arange(20) >= 11).float().expand(1, 3, 3, 20))  # input not modified
    assert torch.equal(RandThickSliced(prob=0.0)({"image": step})["image"], step)
    assert torch.equal(RandThickSliced(prob=1.0, factor_range=(1.0, 1.0))({"image": step})["image"], step)
    factors = set()
    for seed in range(20):
        r = RandThickSliced(prob=1.0, factor_range=(1.2, 3.0))
        r.set_random_state(seed=seed)
        r.randomize()
        assert 1.2 <= r._factor <= 3.0
        factors.add(round(r._factor, 2))
    assert len(factors) > 10
    with pytest.raises(ValueError, match=">= 1"):
        RandThickSliced(prob=1.0, factor_range=(0.5, 2.0))


def test_thick_slices_are_in_the_chain_only_when_asked_and_checked():
    from medseg.data.transforms import RandThickSliced
    from medseg.train.checks import check_config

    def has(aug):
        return any(isinstance(t, RandThickSliced) for t in build_train_transforms([8, 8, 8], aug).transforms)

    assert not has(AugmentConfig())
    assert has(AugmentConfig(p_thick_slices=0.2, thick_slice_factor=[1.0, 1.7]))
    for override, key in (("train.augment.p_thick_slices=1.5", "p_thick_slices"),
                          ("train.augment.thick_slice_factor=[0.5,2.0]", "thick_slice_factor"),
                          ("train.augment.thick_slice_factor=[2.0]", "thick_slice_factor")):
        with pytest.raises(ConfigError, match=key):
            check_config(load_config(None, [override]))


def test_label_intensity_shift_moves_each_structure_by_its_own_offset_within_the_range():
    from medseg.data.transforms import RandLabelIntensityShiftd

    image = torch.randn(2, 6, 6, 6)
    label = torch.zeros(1, 6, 6, 6)
    label[0, :2] = 1  # class 1: x 0-1
    label[0, 4:] = 3  # class 3: x 4-5 (class 2 absent)
    seen = []
    for seed in range(30):
        t = RandLabelIntensityShiftd(prob=1.0, shift_range=(0.5, -0.5))  # either order
        t.set_random_state(seed=seed)
        out = t({"image": image, "label": label})
        delta = out["image"] - image
        assert torch.equal(out["label"], label)
        assert delta[:, 2:4].abs().max() == 0  # background untouched
        d1, d3 = delta[0, 0, 0, 0].item(), delta[0, 5, 0, 0].item()
        assert torch.allclose(delta[:, :2], torch.full_like(delta[:, :2], d1), atol=1e-6)  # one offset per class,
        assert torch.allclose(delta[:, 4:], torch.full_like(delta[:, 4:], d3), atol=1e-6)  # every channel
        assert -0.5 <= d1 <= 0.5 and -0.5 <= d3 <= 0.5
        seen.append((d1, d3))
    d1s, d3s = zip(*seen)
    assert min(d1s) < -0.2 and max(d1s) > 0.2  # spread over the range, both signs
    assert sum(abs(a - b) > 0.05 for a, b in seen) > 20  # the classes draw independently
    assert torch.equal(RandLabelIntensityShiftd(prob=0.0)({"image": image, "label": label})["image"], image)
    empty = RandLabelIntensityShiftd(prob=1.0)({"image": image, "label": torch.zeros_like(label)})
    assert torch.equal(empty["image"], image)  # nothing labelled: nothing to shift


def test_label_intensity_shift_leaves_the_ignore_label_alone():
    from medseg.config import AugmentConfig
    from medseg.data.transforms import RandLabelIntensityShiftd, build_train_transforms

    image = torch.randn(1, 6, 6, 6)
    label = torch.zeros(1, 6, 6, 6)
    label[0, :2] = 1
    label[0, 4:] = 7  # the dataset's ignore label: unknown content, not a structure
    for seed in range(5):
        t = RandLabelIntensityShiftd(prob=1.0, shift_range=(0.3, 0.5), ignore_label=7)
        t.set_random_state(seed=seed)
        delta = t({"image": image, "label": label})["image"] - image
        assert delta[:, 4:].abs().max() == 0 and delta[:, 2:4].abs().max() == 0
        assert delta[:, :2].min() >= 0.3 - 1e-6  # the structure itself still moves
    only_ignore = RandLabelIntensityShiftd(prob=1.0, ignore_label=7)({"image": image, "label": (label == 7).float() * 7})
    assert torch.equal(only_ignore["image"], image)
    shift = [t for t in build_train_transforms([8, 8, 8], AugmentConfig(p_label_shift=0.3), ignore_label=7).transforms
             if isinstance(t, RandLabelIntensityShiftd)]
    assert len(shift) == 1 and shift[0].ignore_label == 7  # the chain passes the dataset's ignore label on


def test_label_intensity_shift_is_in_the_chain_only_when_asked_and_its_settings_are_checked():
    from medseg.config import AugmentConfig, load_config
    from medseg.data.transforms import RandLabelIntensityShiftd, build_train_transforms
    from medseg.errors import ConfigError
    from medseg.train.checks import check_config

    def has_shift(aug):
        return any(isinstance(t, RandLabelIntensityShiftd) for t in build_train_transforms([8, 8, 8], aug).transforms)

    assert not has_shift(AugmentConfig())
    assert has_shift(AugmentConfig(p_label_shift=0.3))
    check_config(load_config(None, ["train.augment.p_label_shift=0.3", "train.augment.label_shift_range=[-0.4,0.2]"]))
    for override, key in (("train.augment.p_label_shift=2", "p_label_shift"),
                          ("train.augment.label_shift_range=[0.5]", "label_shift_range")):
        with pytest.raises(ConfigError, match=key):
            check_config(load_config(None, [override]))


# --------------------------------------------------------------------------- mirroring: auto
def _case_props(width, xs_per_class):
    """A preprocessed case's properties: a body box ``width`` voxels wide (axis 0, left-right) and
    each class's sampled voxels at the given x positions."""
    return {"shape": [width, 8, 8],
            "class_locations": {str(k): [[x, 4, 4] for x in xs] for k, xs in xs_per_class.items()}}


def test_lateral_offsets_are_centroid_distances_from_the_midline_over_the_body_width():
    from medseg.data.plan import lateral_offsets

    off = lateral_offsets([_case_props(100, {1: [69.5, 79.5], 2: [19.5], 3: [9.5, 89.5]}),
                           _case_props(50, {1: [34.5], 2: [14.5], 3: []})])
    assert off[1] == pytest.approx([0.25, 0.2])  # voxel centres: (74.5 + 0.5) / 100 - 0.5, (34.5 + 0.5) / 50 - 0.5
    assert off[2] == pytest.approx([-0.3, -0.2])
    assert off[3] == pytest.approx([0.0])  # both sides: centred; absent from the second case


@pytest.mark.parametrize("cases, axes, lateral", [
    # (body width, {class: x positions}) per case
    # liver right, spleen left in both cases; a bilateral class does not count
    ([(100, {1: [74.5], 2: [19.5], 3: [10, 89]}), (50, {1: [34.5], 2: [14.5], 3: [5, 44]})], [1, 2],
     {1: 0.225, 2: -0.25}),
    ([(100, {3: [10, 89]}), (50, {3: [5, 44]})], [0, 1, 2], {}),  # bilateral only
    ([(100, {1: [74.5]})], [0, 1, 2], {}),  # one case cannot tell anatomy from chance (a lesion in one lung)
    ([(100, {1: [74.5]}), (100, {1: [9.5]})], [0, 1, 2], {}),  # the side differs between cases
    ([(100, {1: [53.5]}), (100, {1: [58.5]})], [0, 1, 2], {}),  # 0.04 / 0.09 off: under LATERAL_MIN_OFFSET (0.1)
    ([(100, {1: [74.5]}), (100, {2: [19.5]}), (100, {1: [79.5], 2: [14.5]})], [1, 2],
     {1: 0.275, 2: -0.325}),  # counted over the cases that have the class
])
def test_auto_mirror_axes_keeps_left_right_flips_unless_a_class_has_a_side(cases, axes, lateral):
    from medseg.data.plan import auto_mirror_axes

    got_axes, got = auto_mirror_axes([_case_props(w, c) for w, c in cases])
    assert got_axes == axes
    assert got == pytest.approx(lateral)


def test_auto_mirror_axes_is_resolved_from_the_preprocessed_cases(preprocessed_phantoms):
    """The phantoms put the liver on the right and the spleen on the left, as anatomy does."""
    cfg = load_config(None, [f"data.preprocessed={preprocessed_phantoms}"])
    assert cfg.train.augment.mirror_axes == "auto"
    plans = tdata.read_plans(preprocessed_phantoms)
    assert tdata.resolve_mirror_axes(cfg, preprocessed_phantoms, plans) == [1, 2]
    assert cfg.train.augment.mirror_axes == [1, 2]
    chain = build_train_transforms([8, 8, 8], cfg.train.augment)
    assert sorted(t.flipper.spatial_axis for t in chain.transforms if hasattr(t, "flipper")) == [1, 2]
    cfg = load_config(None, ["train.augment.mirror_axes=[0]"])
    assert tdata.resolve_mirror_axes(cfg, preprocessed_phantoms, plans) == [0]  # a list is the user's: kept
    unresolved = build_train_transforms([8, 8, 8], AugmentConfig())
    assert sorted(t.flipper.spatial_axis for t in unresolved.transforms if hasattr(t, "flipper")) == [0, 1, 2]


def test_overlap_counts_break_ties_towards_the_first_class_as_argmax():
    from medseg.train.losses import SegmentationLoss

    logits = torch.zeros(1, 3, 4, 4, 4, dtype=torch.bfloat16)  # every class tied everywhere
    logits[:, 2, :2] = 1.0  # class 2 wins in x 0-1
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[:, :, :2] = 2
    counts = SegmentationLoss("dice_ce").overlap_counts(logits, label, stride=1)
    assert counts[:, 0].tolist() == [0.0, 0.0, 0.0]  # class 1 never chosen on a tie with background
    assert counts[:, 1].tolist() == [32.0, 32.0, 32.0]  # class 2 exactly where it wins
    assert torch.equal(logits.max(1).indices, logits.argmax(1))
