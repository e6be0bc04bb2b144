"""Multi-channel runs end to end (nnU-Net's ``<case>_0000``, ``<case>_0001`` inputs) and case naming.

A 2-channel phantom dataset is preprocessed, trained for one iteration and served through the
Python API and the CLI; the refusals name the file and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.config import DataConfig, load_config
from medseg.data.phantoms import LABELS, make_phantom_case
from medseg.errors import InputError
from medseg.evaluate.cases import case_key
from medseg.infer.predictor import Predictor
from medseg.infer.runner import group_channels
from medseg.io import Volume, case_name, read_volume, write_volume
from test_infer_cli import infer, make_run, write_inputs

SHAPE = (32, 32, 16)


def second_channel(img: Volume) -> Volume:
    """A co-registered "late phase": the same CT, organs brightened by 40 HU, its own noise."""
    rng = np.random.default_rng(7)
    arr = img.array.astype(np.float32)
    arr = np.where((arr > 20) & (arr < 200), arr + 40.0, arr) + rng.normal(0, 5, arr.shape)
    return Volume(arr.astype(np.int16), img.affine.copy(), img.path)


def write_two_channel_case(folder: Path, case: str, seed: int, *, label_dir: Path | None = None) -> list[Path]:
    img, lab = make_phantom_case(seed, shape=SHAPE, orientation="LPS")
    paths = [write_volume(img, folder / f"{case}_0000.nii.gz"), write_volume(second_channel(img), folder / f"{case}_0001.nii.gz")]
    if label_dir is not None:
        write_volume(lab, label_dir / f"{case}.nii.gz")
    return paths


@pytest.fixture(scope="module")
def two_channel_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, imagesTs folder) of a 2-channel phantom dataset trained for one iteration."""
    from medseg.data.pipeline import preprocess_dataset
    from medseg.train import train

    root = tmp_path_factory.mktemp("two_channel")
    raw = root / "raw"
    for i in range(3):
        write_two_channel_case(raw / "imagesTr", f"ph_{i:03d}", i, label_dir=raw / "labelsTr")
    for i in (3, 4):
        write_two_channel_case(raw / "imagesTs", f"ph_{i:03d}", i, label_dir=raw / "labelsTs")
    meta = {"name": "TwoChannel", "channel_names": {"0": "CT", "1": "CT_late"}, "labels": LABELS,
            "numTraining": 3, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    preprocess_dataset(raw, root / "pre", data_cfg=DataConfig(target_spacing=[2.0, 2.0, 3.0]), progress=False)
    cfg = load_config(None, [f"data.preprocessed={root / 'pre'}", "model.channels=[4,8]", "data.patch_size=[16,16,16]",
                             "train.epochs=1", "train.iters_per_epoch=1", "train.batch_size=1", "data.num_workers=0",
                             "data.val_cases=[ph_002]", "train.tb_num_cases=1"])
    train(cfg, root / "run")
    return root / "run", raw / "imagesTs"


def test_two_channel_run_serves_through_api_and_cli(two_channel_run, tmp_path, capsys):
    run, images = two_channel_run
    pred = Predictor.from_run(run, checkpoint="final", device="cpu", precision="fp32")
    assert pred.channel_names == ["CT", "CT_late"]
    assert next(m for m in pred.model.modules() if isinstance(m, torch.nn.Conv3d)).in_channels == 2
    files = [images / "ph_003_0000.nii.gz", images / "ph_003_0001.nii.gz"]
    res = pred.predict(files, probabilities=True)
    ref = read_volume(files[0])
    assert res.case == "ph_003"
    assert res.mask.shape == ref.shape and np.allclose(res.mask.affine, ref.affine, atol=1e-4)
    assert np.abs(res.probabilities.astype(np.float32).sum(0) - 1).max() < 5e-3
    # the second channel matters: another second channel gives other probabilities
    other = pred.predict([files[0], files[0]], probabilities=True)
    assert np.abs(other.probabilities.astype(np.float32) - res.probabilities.astype(np.float32)).max() > 1e-3

    # CLI on the folder: one mask per case (not per channel file), named after the case
    assert main(["infer", "--model", str(run), "--checkpoint", "final", "-i", str(images), "-o", str(tmp_path / "out"),
                 "--device", "cpu", "--precision", "fp32"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ph_003.nii.gz", "ph_004.nii.gz", "predict_args.json"]
    cli_mask = read_volume(tmp_path / "out" / "ph_003.nii.gz").array
    assert np.array_equal(cli_mask, res.mask.array)
    # one channel file as the input: its case's other channel comes from its folder
    assert main(["infer", "--model", str(run), "--checkpoint", "final", "-i", str(files[1]), "-o", str(tmp_path / "one"),
                 "--device", "cpu", "--precision", "fp32"]) == 0
    assert np.array_equal(read_volume(tmp_path / "one" / "ph_003.nii.gz").array, cli_mask)
    # the predictions score against labelsTs by case name
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "out"), "--ref", str(images.parent / "labelsTs")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(Path(c["prediction_file"]).name for c in summary["metric_per_case"]) == ["ph_003.nii.gz", "ph_004.nii.gz"]


def test_two_channel_refusals_name_the_file(two_channel_run, tmp_path, capsys):
    run, images = two_channel_run
    img, _ = make_phantom_case(9, shape=SHAPE, orientation="LPS")
    cases = {}
    # a case with one channel file only
    d = tmp_path / "missing"
    write_volume(img, d / "x_0000.nii.gz")
    cases[d] = "x_0000.nii.gz: case 'x' has the channel files x_0000.nii.gz; this run needs 2: x_0000 ... x_0001"
    # a file without a channel tag
    d = tmp_path / "untagged"
    write_volume(img, d / "plain.nii.gz")
    cases[d] = "plain.nii.gz: this run takes 2 image channels per case"
    # channels on different grids
    d = tmp_path / "grids"
    write_volume(img, d / "g_0000.nii.gz")
    shifted = img.affine.copy()
    shifted[:3, 3] += 5.0
    write_volume(Volume(img.array, shifted), d / "g_0001.nii.gz")
    cases[d] = "g_0001.nii.gz: image channel does not share physical space with"
    for folder, message in cases.items():
        out = tmp_path / f"out_{folder.name}"
        assert infer(run, folder, out, "--checkpoint", "final") == 2, folder
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists() or not any(out.iterdir())
    pred = Predictor.from_run(run, checkpoint="final", device="cpu")
    with pytest.raises(InputError, match=r"one.nii.gz: this run was trained on 2 image channel\(s\) \(0: CT, 1: CT_late\), got 1"):
        pred.predict(write_volume(img, tmp_path / "one.nii.gz"))


def test_single_channel_run_refuses_two_channel_arrays(tmp_path):
    pred = Predictor.from_run(make_run(tmp_path / "run"), device="cpu")
    img, _ = make_phantom_case(0, shape=SHAPE, orientation="RAS")
    with pytest.raises(InputError, match=r"trained on 1 image channel\(s\) \(0: CT\), got 2"):
        pred.predict_array(np.stack([img.array, img.array]), img.affine)


def test_case_names_strip_only_the_channel_tag():
    for fn in (case_name, case_key):  # one rule for inference outputs and evaluation matching
        assert fn("/a/ct_0000.nii.gz") == "ct"
        assert fn("/a/patient_0001.nii.gz") == "patient_0001"
        assert fn("/a/ct.nrrd") == "ct" and fn("/a/lung_001.mha") == "lung_001"
        assert fn("/a/series_dir") == "series_dir"
    assert case_key is case_name
    ps = [Path("p_0001.nii.gz"), Path("p_0002.nii.gz")]
    assert group_channels(ps, 1) == [("p_0001", [ps[0]]), ("p_0002", [ps[1]])]
    two = [Path("a_0001.nii.gz"), Path("b_0000.nii.gz"), Path("a_0000.nii.gz"), Path("b_0001.nrrd")]
    assert group_channels(two, 2) == [("a", [two[2], two[0]]), ("b", [two[1], two[3]])]
    with pytest.raises(InputError, match="channel 0 of case 'a' is given twice"):
        group_channels([Path("a_0000.nii.gz"), Path("a_0000.nrrd"), Path("a_0001.nii.gz")], 2)
    with pytest.raises(InputError, match="same case name 'a'"):
        group_channels([Path("a_0000.nii.gz"), Path("a.nrrd")], 1)


def test_numbered_cases_are_segmented_separately_and_evaluated(tmp_path, capsys):
    """`patient_0001` and `patient_0002` are two cases; the masks keep those names, so evaluate finds them."""
    run = make_run(tmp_path / "run")
    inputs = write_inputs(tmp_path / "in", [("patient_0001.nii.gz", "RAS", 0.0), ("patient_0002.nii.gz", "LPS", 0.0)])
    assert infer(run, tmp_path / "in", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["patient_0001.nii.gz", "patient_0002.nii.gz", "predict_args.json"]
    refs = tmp_path / "labelsTs"
    for src in inputs:
        write_volume(read_volume(tmp_path / "out" / src.name), refs / src.name)
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "out"), "--ref", str(refs)]) == 0
    assert "no prediction" not in capsys.readouterr().err
    # a single one, too: written under its own name, not as patient.nii.gz
    assert infer(run, inputs[0], tmp_path / "single") == 0
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["patient_0001.nii.gz", "predict_args.json"]
