"""Object-level copy-paste (TumorCP): the object bank, where and what the transform pastes, its place in the chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import AugmentConfig, load_config
from medseg.data.transforms import ObjectBank, RandCopyPasted, build_train_transforms
from medseg.errors import ConfigError

LUNG, TISSUE, LESION = -3.0, 1.0, 0.5


def _case():
    """A (1, 24, 24, 24) case: x < 12 is 'lung' (-3), x >= 12 'tissue' (1); a 4^3 class-1 cube at 4..8 in
    the lung (value 0.5), a 1-voxel class-1 speck (left out: < 8 voxels) and a 3^3 class-2 cube in the tissue."""
    image = np.full((1, 24, 24, 24), TISSUE, dtype=np.float32)
    image[0, :12] = LUNG
    label = np.zeros((1, 24, 24, 24), dtype=np.uint8)
    image[0, 4:8, 4:8, 4:8], label[0, 4:8, 4:8, 4:8] = LESION, 1
    label[0, 10, 20, 20] = 1
    label[0, 16:19, 16:19, 16:19] = 2
    return {"image": image, "label": label}


def test_bank_holds_the_components_of_the_asked_classes_with_their_surroundings():
    bank = ObjectBank([_case()], [1])
    assert len(bank) == 1  # the speck is too small, class 2 not asked for
    img, mask, cls, context = bank.objects[0]
    assert cls == 1 and int(mask.sum()) == 64 and mask.shape == (8, 8, 8)  # 4^3 + a 2-voxel margin each side
    assert img.shape == (1, 8, 8, 8) and np.all(img[0][mask] == LESION)
    assert context == LUNG  # the shell around the cube is lung
    both = ObjectBank([_case(), _case()], [1, 2])
    assert sorted(o[2] for o in both.objects) == [1, 1, 2, 2]
    assert [o[3] for o in both.objects if o[2] == 2] == [TISSUE, TISSUE]


def _paste(seed, image, label, **kw):
    bank = ObjectBank([_case()], [1])
    t = RandCopyPasted(bank, inner=[20, 20, 20], prob=1.0, **kw)
    t.set_random_state(seed=seed)
    out = t({"image": torch.from_numpy(image.copy()), "label": torch.from_numpy(label.copy())})
    return t, out


def test_paste_lands_only_in_matching_tissue_on_background_with_the_object_values():
    region = np.full((1, 32, 32, 32), TISSUE, dtype=np.float32)
    region[0, :16] = LUNG
    label = np.zeros((1, 32, 32, 32), dtype=np.uint8)
    label[0, 20:24, 20:24, 20:24] = 2  # an existing structure in the tissue stays as it is
    pasted = 0
    for seed in range(12):
        t, out = _paste(seed, region, label, scale_range=(1.0, 1.0))
        img, lab = out["image"].numpy(), out["label"].numpy()
        assert img.shape == region.shape and lab.dtype == label.dtype
        assert np.array_equal(lab == 2, label == 2)
        new = lab[0] == 1
        if t.pasted is None:
            assert np.array_equal(img, region) and not new.any()
            continue
        pasted += 1
        assert int(new.sum()) == 64  # scale 1: the whole cube, flipped or not
        xs = np.nonzero(new)[0]
        assert xs.max() < 16  # only in the lung: the tissue (1) is 4 units from the context (-3)
        assert np.allclose(img[0][new], LESION) and np.array_equal(img[0][~new], region[0][~new])
        lo = [int(np.nonzero(new)[a].min()) for a in range(3)]
        assert all(6 - 2 <= v for v in lo)  # the centre sits in the inner 20^3 box: origin >= 6 - half the box
    assert pasted >= 9  # most draws find lung among 20 tries (the lung is ~ a third of the inner box)


def test_nothing_is_pasted_where_no_tissue_matches_and_scale_changes_the_size():
    tissue = np.full((1, 32, 32, 32), TISSUE, dtype=np.float32)
    label = np.zeros((1, 32, 32, 32), dtype=np.uint8)
    for seed in range(5):
        t, out = _paste(seed, tissue, label)
        assert t.pasted is None and torch.equal(out["image"], torch.from_numpy(tissue))
        assert not out["label"].any()
    lung = np.full((1, 32, 32, 32), LUNG, dtype=np.float32)
    sizes = {}
    for s in (0.5, 1.5):
        t, out = _paste(0, lung, label, scale_range=(s, s))
        assert t.pasted is not None
        sizes[s] = int((out["label"] == 1).sum())
    assert sizes[0.5] < 64 < sizes[1.5]
    assert 4 <= sizes[0.5] <= 27 and 125 <= sizes[1.5] <= 343  # a 2^3 .. 3^3 and a 5^3 .. 7^3 cube
    # a context tolerance wide enough lets it into the tissue too
    t, out = _paste(0, tissue, label, context_tol=10.0)
    assert t.pasted is not None and int((out["label"] == 1).sum()) > 0


def test_paste_is_seeded_and_a_chain_without_it_draws_as_before():
    lung = np.full((1, 32, 32, 32), LUNG, dtype=np.float32)
    label = np.zeros((1, 32, 32, 32), dtype=np.uint8)
    a, b, c = (_paste(s, lung, label)[1]["label"] for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    bank = ObjectBank([_case()], [1])
    off = build_train_transforms([16, 16, 16], AugmentConfig(), bank=bank)
    on = build_train_transforms([16, 16, 16], AugmentConfig(p_copy_paste=0.5, copy_paste_classes=[1]), bank=bank)
    assert not any(isinstance(t, RandCopyPasted) for t in off.transforms)
    assert isinstance(on.transforms[0], RandCopyPasted) and on.transforms[0].inner == [16, 16, 16]
    empty = build_train_transforms([16, 16, 16], AugmentConfig(p_copy_paste=0.5, copy_paste_classes=[1]),
                                   bank=ObjectBank([_case()], [3]))
    assert not any(isinstance(t, RandCopyPasted) for t in empty.transforms)  # nothing banked: nothing to paste


@pytest.mark.parametrize("overrides,key", [
    (["train.augment.p_copy_paste=0.3"], "copy_paste_classes"),
    (["train.augment.p_copy_paste=1.5", "train.augment.copy_paste_classes=[1]"], "p_copy_paste"),
    (["train.augment.copy_paste_scale=[0.5]"], "copy_paste_scale"),
    (["train.augment.copy_paste_context_tol=-1"], "copy_paste_context_tol"),
    (["train.augment.copy_paste_classes=[0]"], "copy_paste_classes"),
    (["train.augment.copy_paste_synthetic=-1"], "copy_paste_synthetic"),
    (["train.augment.copy_paste_synthetic_diameter_mm=[0,10]"], "copy_paste_synthetic_diameter_mm"),
])
def test_copy_paste_settings_are_checked(overrides, key):
    from medseg.train.checks import check_config

    with pytest.raises(ConfigError, match=key):
        check_config(load_config(None, overrides))


def test_patch_dataset_banks_the_training_lesions_and_pastes_them(preprocessed_phantoms):
    from medseg.train import data as tdata

    pre = preprocessed_phantoms
    cases = tdata.case_dataset(pre, tdata.list_cases(pre), "ram")
    base = ["data.patch_size=[16,16,16]", "train.batch_size=2", "data.fg_oversample=0", "train.augment.p_rotate=0",
            "train.augment.p_scale=0", "train.augment.p_mirror=0"]
    plain = tdata.PatchDataset(cases, [16, 16, 16], load_config(None, base))
    paste = tdata.PatchDataset(cases, [16, 16, 16], load_config(None, base + [
        "train.augment.p_copy_paste=1", "train.augment.copy_paste_classes=[4]", "train.augment.copy_paste_context_tol=100"]))
    assert plain.bank is None and paste.bank is not None and len(paste.bank) >= 1
    assert {o[2] for o in paste.bank.objects} == {4}
    more = sum(int((paste[i]["label"] == 4).sum()) > int((plain[i]["label"] == 4).sum()) for i in range(8))
    assert more >= 6  # with any tissue accepted, nearly every random patch gets a pasted class-4 object


def test_inside_body_keeps_the_lungs_and_drops_the_air_around_the_body():
    from medseg.data.transforms import inside_body

    vol = np.full((40, 40, 6), LUNG, dtype=np.float32)  # air everywhere ...
    vol[5:35, 5:35] = TISSUE  # ... around a body
    vol[10:18, 10:30], vol[22:30, 10:30] = LUNG, LUNG  # with two lungs, as dark as the air outside
    inside = inside_body(vol)
    assert inside.shape == vol.shape and inside[5:35, 5:35].all()
    assert not inside[:5].any() and not inside[35:].any() and not inside[:, :5].any()
    vol[0:18, 15, :] = LUNG  # a lung opened to the outside in every slice is outside air
    assert not inside_body(vol)[12, 20].any() and inside_body(vol)[25, 20].all()


def test_paste_stays_inside_the_body_when_given_the_mask():
    lung = np.full((1, 32, 32, 32), LUNG, dtype=np.float32)
    label = np.zeros((1, 32, 32, 32), dtype=np.uint8)
    inside = np.zeros((1, 32, 32, 32), dtype=bool)
    inside[0, :, 16:] = True
    pasted = 0
    for seed in range(10):
        bank = ObjectBank([_case()], [1])
        t = RandCopyPasted(bank, inner=[20, 20, 20], prob=1.0, scale_range=(1.0, 1.0))
        t.set_random_state(seed=seed)
        out = t({"image": torch.from_numpy(lung.copy()), "label": torch.from_numpy(label.copy()),
                 "inside": torch.from_numpy(inside)})
        assert "inside" not in out
        new = out["label"][0].numpy() == 1
        if t.pasted is not None:
            pasted += 1
            assert int(new.sum()) == 64 and np.nonzero(new)[1].min() >= 16
    assert pasted >= 8


def _textured_case():
    """_case() with a textured lesion: values 0.2 .. 0.8 (mean 0.5, std ~0.17) in its 4^3 cube."""
    case = _case()
    rng = np.random.default_rng(0)
    case["image"][0, 4:8, 4:8, 4:8] = rng.uniform(0.2, 0.8, size=(4, 4, 4)).astype(np.float32)
    return case


def test_synthetic_objects_take_the_real_objects_statistics_in_the_asked_sizes():
    case = _textured_case()
    bank = ObjectBank([case], [1, 2])
    real = {o[2]: o for o in bank.objects}
    spacing = [1.5, 1.5, 3.0]  # anisotropic: sizes are physical
    assert bank.add_synthetic(40, spacing, [6.0, 24.0], seed=0) == 80 and len(bank) == 82
    for cls in (1, 2):
        syn = [o for o in bank.objects[2:] if o[2] == cls]
        assert len(syn) == 40 and all(o[3] == real[cls][3] for o in syn)  # the real object's surroundings
        from scipy import ndimage

        big = [(img, mask, ndimage.binary_erosion(mask, iterations=2)) for img, mask, _, _ in syn]
        big = [(img, mask, core) for img, mask, core in big if core.sum() >= 8]
        assert len(big) >= 10
        core_values = np.concatenate([img[0][core] for img, _, core in big])
        rim_values = np.concatenate([img[0][mask & ~ndimage.binary_erosion(mask)] for img, mask, _ in big])
        ref_mask = real[cls][1]
        ref = real[cls][0][0][ndimage.binary_erosion(ref_mask) if cls == 1 else ref_mask]  # class 1: its 2^3 interior
        assert abs(core_values.mean() - ref.mean()) < 0.1  # the texture is the real interior's level ...
        if cls == 1:  # class 2 is a constant cube in tissue of its own value: nothing more to tell apart
            assert 0.2 * ref.std() < core_values.std() < 1.5 * ref.std() + 0.05  # a texture, not a constant
            # the rim is partial volume: between the interior and the surroundings
            assert real[cls][3] < rim_values.mean() < core_values.mean() - 0.1 * (core_values.mean() - real[cls][3])
            assert all(img[0][mask].min() > real[cls][3] for img, mask, _, _ in syn)  # a solid object in its tissue
        else:
            assert np.allclose(core_values, TISSUE, atol=1e-5) and np.allclose(rim_values, TISSUE, atol=1e-5)
        for img, mask, _, context in syn:
            assert img.shape == (1,) + mask.shape and np.all(img[0][~mask] == context)
            # equivalent-sphere diameter in mm within the range, widened by the axis factors and the lobulation
            d = (6.0 * mask.sum() * np.prod(spacing) / np.pi) ** (1 / 3)
            assert 6.0 * 0.6 <= d <= 24.0 * 1.4
            # physical extent: the z axis (3 mm voxels) spans about half the voxels of x (1.5 mm)
        ext = np.array([[np.ptp(np.nonzero(m)[a]) + 1 for a in range(3)] for _, m, _, _ in syn], dtype=float)
        ratio = np.median(ext[:, 2] / ext[:, 0])
        assert 0.35 <= ratio <= 0.75
        vols = sorted(int(m.sum()) for _, m, _, _ in syn)
        assert vols[-1] > 8 * vols[0]  # sizes spread over the range, not one size
    # seeded: the same seed draws the same objects, another seed others
    again = ObjectBank([case], [1, 2])
    again.add_synthetic(40, spacing, [6.0, 24.0], seed=0)
    assert all(np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0]) for a, b in zip(bank.objects, again.objects))
    other = ObjectBank([case], [1, 2])
    other.add_synthetic(40, spacing, [6.0, 24.0], seed=1)
    assert any(a[1].shape != b[1].shape or not np.array_equal(a[1], b[1]) for a, b in zip(bank.objects[2:], other.objects[2:]))
    # nothing real to copy: nothing added
    empty = ObjectBank([case], [3])
    assert empty.add_synthetic(10, spacing, [6.0, 24.0]) == 0 and len(empty) == 0


def test_synthetic_objects_are_pasted_into_matching_tissue():
    bank = ObjectBank([_textured_case()], [1])
    bank.add_synthetic(20, [3.0, 3.0, 3.0], [6.0, 15.0], seed=0)
    bank.objects = bank.objects[1:]  # synthetic ones only
    region = np.full((1, 32, 32, 32), TISSUE, dtype=np.float32)
    region[0, :16] = LUNG
    label = np.zeros((1, 32, 32, 32), dtype=np.uint8)
    pasted = 0
    for seed in range(10):
        t = RandCopyPasted(bank, inner=[20, 20, 20], prob=1.0, scale_range=(1.0, 1.0))
        t.set_random_state(seed=seed)
        out = t({"image": torch.from_numpy(region.copy()), "label": torch.from_numpy(label.copy())})
        new = out["label"][0].numpy() == 1
        if t.pasted is None:
            continue
        pasted += 1
        assert new.any() and np.nonzero(new)[0].max() < 16  # in the lung only
        values = out["image"][0].numpy()[new]  # solid (the lesion's 0.2 .. 0.8), its rim blurred towards the lung
        assert values.min() > LUNG and values.max() <= 0.8 + 0.3 and values.mean() > LUNG + 1.0
    assert pasted >= 6


def test_patch_dataset_adds_synthetic_objects_to_the_bank(preprocessed_phantoms):
    from medseg.train import data as tdata

    pre = preprocessed_phantoms
    cases = tdata.case_dataset(pre, tdata.list_cases(pre), "ram")
    base = ["data.patch_size=[16,16,16]", "train.batch_size=2", "train.augment.p_copy_paste=1",
            "train.augment.copy_paste_classes=[4]"]
    real = tdata.PatchDataset(cases, [16, 16, 16], load_config(None, base))
    syn = tdata.PatchDataset(cases, [16, 16, 16], load_config(None, base + ["train.augment.copy_paste_synthetic=7"]))
    assert len(syn.bank) == len(real.bank) + 7 and {o[2] for o in syn.bank.objects} == {4}
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(real.bank.objects, syn.bank.objects))  # the real ones first
