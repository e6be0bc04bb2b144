"""nnU-Net v2's ``ignore`` label: not a class, not foreground, not in the loss, not scored, kept in labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medseg.errors import InputError
from medseg.io import read_volume, write_volume

IGNORE = 5  # the phantom classes are 0..4
BOX = (slice(4, 16), slice(4, 16), slice(3, 11))  # voxels of the ignore region in every phantom
HOT = 2000  # HU written into the ignore region: would show in the fingerprint if it were foreground


def _ignore_phantoms(root, n=4):
    """Phantoms whose labels hold an ignore region (value 5) where the image is 2000 HU."""
    from medseg.data.phantoms import make_phantom_dataset

    make_phantom_dataset(root, n_train=n, n_test=0, seed=3, shape=(32, 32, 16))
    for lab_path in sorted((root / "labelsTr").glob("*.nii.gz")):
        img_path = root / "imagesTr" / lab_path.name.replace(".nii.gz", "_0000.nii.gz")
        lab, img = read_volume(lab_path), read_volume(img_path)
        la, ia = lab.array.copy(), img.array.copy()
        la[BOX], ia[BOX] = IGNORE, HOT
        write_volume(lab.with_array(la), lab_path)
        write_volume(img.with_array(ia), img_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["ignore"] = IGNORE
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def ignore_pre(tmp_path_factory):
    from medseg.config import DataConfig
    from medseg.data.pipeline import preprocess_dataset

    root = tmp_path_factory.mktemp("ignore")
    raw = _ignore_phantoms(root / "raw")
    report = preprocess_dataset(raw, root / "pre", data_cfg=DataConfig(target_spacing=[1.5, 1.5, 3.0]), progress=False)
    assert report.ok, report.summary()
    return raw, root / "pre"


def test_dataset_json_ignore_label_is_not_a_class(tmp_path):
    from medseg.data.datasets import discover_cases

    raw = _ignore_phantoms(tmp_path / "raw", n=1)
    info = discover_cases(raw)
    assert info.ignore_label == IGNORE and info.num_classes == 5
    assert sorted(info.label_names) == [1, 2, 3, 4]
    meta = json.loads((raw / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "ignore": 1, "liver": 2}  # nnU-Net: the ignore label is the highest
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"dataset.json: the 'ignore' label \(1\) must have the highest value"):
        discover_cases(raw)


def test_plan_fingerprint_and_preprocessed_labels(ignore_pre):
    from medseg.data.pipeline import load_case

    raw, pre = ignore_pre
    plans = json.loads((pre / "plans.json").read_text())
    assert plans["num_classes"] == 5 and plans["ignore_label"] == IGNORE
    # the 2000 HU ignore region is not foreground: the intensity statistics never see it
    props = plans["fingerprint"]["foreground_intensity_properties_per_channel"]["0"]
    assert props["max"] < 1000, props
    # the ignore value survives resampling with about the region's physical volume, and is never a
    # foreground-oversampling target
    for name in ("phantom_000", "phantom_001", "phantom_002", "phantom_003"):
        _, label, case_props = load_case(pre, name)
        box_mm3 = 12 * 12 * 8 * float(np.prod(read_volume(raw / "labelsTr" / f"{name}.nii.gz").spacing))
        kept_mm3 = np.count_nonzero(label == IGNORE) * float(np.prod(case_props["spacing"]))
        assert abs(kept_mm3 / box_mm3 - 1.0) < 0.25, (kept_mm3, box_mm3)
        assert str(IGNORE) not in case_props["class_locations"] and case_props["class_locations"]


def test_loss_leaves_ignored_voxels_out():
    from medseg.train.losses import SegmentationLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    label[..., :3] = 3  # ignored voxels: the first 3 z slices
    loss_fn = SegmentationLoss("dice_ce", ignore_label=3)
    loss = loss_fn(logits, label)
    loss.backward()
    # the loss is exactly the loss of the labelled part alone, and ignored logits get no gradient
    plain = SegmentationLoss("dice_ce")(logits.detach()[..., 3:], label[..., 3:])
    assert float(loss.detach()) == pytest.approx(float(plain), rel=1e-6)
    assert float(logits.grad[..., :3].abs().max()) == 0.0 and float(logits.grad[..., 3:].abs().max()) > 0
    # deep supervision (a downsampled output) and an all-ignored batch stay finite
    ds = loss_fn([logits, logits[..., ::2, ::2, ::2]], label)
    assert math.isfinite(float(ds.detach()))
    assert float(loss_fn(logits, torch.full_like(label, 3))) == 0.0


def test_one_training_iteration_never_predicts_ignore(ignore_pre, tmp_path):
    from medseg.config import load_config
    from medseg.train import train

    _, pre = ignore_pre
    cfg = load_config(None, [f"data.preprocessed={pre}", "model.channels=[4,8,16]", "data.patch_size=[16,16,16]",
                             "train.epochs=1", "train.iters_per_epoch=1", "train.batch_size=2", "data.num_workers=0",
                             "data.val_cases=[phantom_003]", "train.tb_num_cases=0", "infer.sw_batch_size=4"])
    result = train(cfg, tmp_path / "run")
    assert result["status"] == "finished" and math.isfinite(result["history"][0]["loss"])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    head = [v for k, v in ckpt["model"].items() if v.ndim == 5][-1]
    assert head.shape[0] == 5  # 5 outputs: the ignore label is no network output
    summary = json.loads((tmp_path / "run" / "validation" / "summary.json").read_text())
    assert str(IGNORE) not in summary["metric_per_case"][0]["metrics"]


def test_evaluate_masks_the_reference_ignore_region(tmp_path, capsys):
    from medseg.cli import main

    ref = np.zeros((20, 20, 10), np.uint8)
    ref[2:8, 2:8, 2:6] = 1
    ref[10:18, 10:18, 2:8] = 2  # ignore
    pred = ref.copy()
    pred[ref == 2] = 1  # the prediction says "liver" where the reference does not know
    write_volume(ref, tmp_path / "labelsTs" / "a.nii.gz", np.eye(4))
    write_volume(pred, tmp_path / "pred" / "a.nii.gz", np.eye(4))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "ignore": 2}}))
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "labelsTs"), "--metrics", "dice,hd95"])
    capsys.readouterr()
    assert rc == 0
    s = json.loads((tmp_path / "pred" / "summary.json").read_text())
    m = s["metric_per_case"][0]["metrics"]
    assert list(m) == ["1"] and s["ignore_label"] == 2
    assert m["1"]["Dice"] == 1.0 and m["1"]["FP"] == 0 and m["1"]["HD95"] == 0.0
    assert m["1"]["TN"] == ref.size - 8 * 8 * 6 - 6 * 6 * 4  # ignored voxels are counted nowhere


def test_the_trainers_label_shift_keeps_the_ignore_region_unshifted(ignore_pre, tmp_path):
    """The training chain gets the dataset's ignore label: a per-structure intensity shift on every
    patch moves the structures but never the ignore region (unknown content, not one structure)."""
    from medseg.config import load_config
    from medseg.data.transforms import RandLabelIntensityShiftd
    from medseg.train import setup

    _, pre = ignore_pre
    cfg = load_config(None, [f"data.preprocessed={pre}", "model.channels=[4,8,16]", "data.patch_size=[16,16,16]",
                             "train.augment.p_label_shift=1.0", "data.num_workers=0", "data.cache=disk"])
    ctx = setup.build_context(cfg, tmp_path / "run", setup.DistInfo())
    chain = setup.train_loader(ctx, ["phantom_000"]).dataset.transforms.transforms
    shift = [t for t in chain if isinstance(t, RandLabelIntensityShiftd)]
    assert len(shift) == 1 and shift[0].ignore_label == IGNORE
