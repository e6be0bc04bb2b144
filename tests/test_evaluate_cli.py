"""`medseg evaluate` end to end on small synthetic label folders written to tmp_path."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from medseg.cli import build_parser, main
from medseg.evaluate import evaluate_folders
from medseg.io import Volume, read_volume, write_volume

AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, -1.2, 0, 30.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])  # LPS, anisotropic
SHAPE = (20, 16, 12)


def _labels(boxes: dict[int, tuple[slice, slice, slice]]) -> np.ndarray:
    arr = np.zeros(SHAPE, np.uint8)
    for lab, box in boxes.items():
        arr[box] = lab
    return arr


BOX1 = (slice(2, 12), slice(2, 10), slice(2, 8))  # 10 x 8 x 6 = 480 voxels
BOX2 = (slice(13, 18), slice(10, 15), slice(3, 9))  # 5 x 5 x 6 = 150 voxels


def _shift(box, axis, k):
    box = list(box)
    box[axis] = slice(box[axis].start + k, box[axis].stop + k)
    return tuple(box)


def _write(folder, name, arr, affine=AFFINE):
    folder.mkdir(parents=True, exist_ok=True)
    return write_volume(arr, folder / name, affine)


def _run(capsys, *args):
    rc = main(["evaluate", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _two_case_folders(tmp_path):
    """case a: label 1 shifted 2 voxels along x (Dice 0.8), label 2 exact; case b: label 1 exact,
    label 2 absent from both (Dice NaN)."""
    ref, pred = tmp_path / "labelsTs", tmp_path / "pred"
    _write(ref, "a.nii.gz", _labels({1: BOX1, 2: BOX2}))
    _write(pred, "a.nii.gz", _labels({1: _shift(BOX1, 0, 2), 2: BOX2}))
    _write(ref, "b_0000.nii.gz", _labels({1: BOX1}))
    _write(pred, "b.nrrd", _labels({1: BOX1}))  # other format, no channel suffix: still case "b"
    return pred, ref


def test_summary_layout_values_and_csv(tmp_path, capsys):
    pred, ref = _two_case_folders(tmp_path)
    out_json = tmp_path / "out" / "summary.json"
    rc, stdout, _ = _run(capsys, "--pred", pred, "--ref", ref, "--metrics", "dice,iou,hd95,nsd", "--nsd-tolerance", "1.0", "-o", out_json)
    assert rc == 0
    s = json.loads(out_json.read_text())
    assert {"metric_per_case", "mean", "foreground_mean", "missing"} <= set(s)
    assert s["missing"] == []
    cases = {c["case"]: c for c in s["metric_per_case"]}
    assert set(cases) == {"a", "b"}
    assert cases["b"]["prediction_file"].endswith("b.nrrd") and cases["b"]["reference_file"].endswith("b_0000.nii.gz")
    a1 = cases["a"]["metrics"]["1"]
    assert set(a1) == {"Dice", "IoU", "HD95", "NSD", "TP", "FP", "FN", "TN", "n_pred", "n_ref"}
    assert a1["Dice"] == pytest.approx(0.8) and a1["IoU"] == pytest.approx(8 / 12)
    assert a1["HD95"] == pytest.approx(2 * 0.8)  # 2 voxels along x at 0.8 mm
    assert (a1["TP"], a1["FP"], a1["FN"], a1["n_ref"]) == (384, 96, 96, 480)
    assert cases["a"]["metrics"]["2"]["Dice"] == 1.0
    assert math.isnan(cases["b"]["metrics"]["2"]["Dice"])  # absent from both
    assert s["mean"]["1"]["Dice"] == pytest.approx(0.9)
    assert s["mean"]["2"]["Dice"] == 1.0  # the NaN of case b is left out
    assert s["foreground_mean"]["Dice"] == pytest.approx(0.95)
    assert s["mean"]["1"]["HD95"] == pytest.approx(0.8)
    rows = list(csv.DictReader(out_json.with_suffix(".csv").open()))
    assert len(rows) == 4
    row = next(r for r in rows if r["case"] == "a" and r["label"] == "1")
    assert float(row["Dice"]) == pytest.approx(0.8) and int(row["TP"]) == 384
    assert next(r for r in rows if r["case"] == "b" and r["label"] == "2")["Dice"] == "nan"
    table = stdout.splitlines()
    assert any(line.split()[:1] == ["1"] and "0.9000" in line for line in table)


def test_missing_case_is_listed_and_fails_unless_allowed(tmp_path, capsys):
    pred, ref = _two_case_folders(tmp_path)
    _write(ref, "c.nii.gz", _labels({1: BOX1}))
    rc, _, err = _run(capsys, "--pred", pred, "--ref", ref)
    assert rc == 1
    assert "1 reference case(s) have no prediction" in err and f"{pred}: c " in err
    s = json.loads((pred / "summary.json").read_text())  # default output: inside the prediction folder
    assert s["missing"] == ["c"] and len(s["metric_per_case"]) == 2
    rc, _, err = _run(capsys, "--pred", pred, "--ref", ref, "--allow-missing")
    assert rc == 0 and "no prediction" in err


def _reorient_to(arr, affine, codes):
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt(codes))
    return apply_orientation(arr, ornt), affine @ inv_ornt_aff(ornt, arr.shape)


def test_permuted_and_flipped_grid_scores_one(tmp_path, capsys):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    arr = _labels({1: BOX1, 2: BOX2})
    _write(ref, "x.nii.gz", arr)
    moved, moved_aff = _reorient_to(arr, AFFINE, "SRA")
    assert moved.shape != arr.shape
    _write(pred, "x.mha", moved, moved_aff)
    rc, _, _ = _run(capsys, "--pred", pred, "--ref", ref, "--metrics", "all", "--dataset-json", "none")
    assert rc == 0
    s = json.loads((pred / "summary.json").read_text())
    for lab in ("1", "2"):
        m = s["metric_per_case"][0]["metrics"][lab]
        assert (m["Dice"], m["HD95"], m["NSD"]) == (1.0, 0.0, 1.0)


def test_different_grid_is_an_error_naming_both_files(tmp_path, capsys):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    arr = _labels({1: BOX1})
    _write(ref, "x.nii.gz", arr)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0  # same shape and spacing, origin 5 mm away
    _write(pred, "x.nii.gz", arr, shifted)
    rc, _, err = _run(capsys, "--pred", pred, "--ref", ref)
    assert rc == 2
    assert str(pred / "x.nii.gz") in err and str(ref / "x.nii.gz") in err
    assert not (pred / "summary.json").exists()


def test_one_empty_gives_inf_distance_and_zero_dice(tmp_path, capsys):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    _write(ref, "x.nii.gz", _labels({1: BOX1, 2: BOX2}))
    _write(pred, "x.nii.gz", _labels({1: BOX1}))  # label 2 missed
    rc, _, _ = _run(capsys, "--pred", pred, "--ref", ref, "--metrics", "dice,hd95")
    assert rc == 0
    text = (pred / "summary.json").read_text()
    assert "Infinity" in text
    m = json.loads(text)["mean"]["2"]
    assert m["Dice"] == 0.0 and m["HD95"] == math.inf


def test_scored_labels_and_names_from_dataset_json(tmp_path, capsys):
    pred, ref = _two_case_folders(tmp_path)
    ds = {
        "labels": {"background": 0, "liver": 1, "spleen": 2, "kidney": 3},
        "test": [{"image": "./imagesTs/a_0000.nii.gz", "label": "./labelsTs/a.nii.gz", "scored_labels": ["spleen"]}],
        "scored_labels": {"b": [1]},
    }
    (tmp_path / "dataset.json").write_text(json.dumps(ds))  # found as the reference folder's parent
    rc, stdout, _ = _run(capsys, "--pred", pred, "--ref", ref)
    assert rc == 0
    s = json.loads((pred / "summary.json").read_text())
    cases = {c["case"]: c["metrics"] for c in s["metric_per_case"]}
    assert set(cases["a"]) == {"2"} and set(cases["b"]) == {"1"}
    assert s["mean"]["1"]["Dice"] == 1.0  # only case b scores label 1 (case a's 0.8 is excluded)
    assert "3" not in s["mean"]  # kidney: no case scores it
    assert s["label_names"]["1"] == "liver" and "spleen" in stdout
    rows = list(csv.DictReader((pred / "summary.csv").open()))
    assert [(r["case"], r["name"]) for r in rows] == [("a", "spleen"), ("b", "liver")]
    # --labels overrides the dataset's label list; the per-case restriction still applies
    rc, _, _ = _run(capsys, "--pred", pred, "--ref", ref, "--labels", "liver")
    s = json.loads((pred / "summary.json").read_text())
    assert [sorted(c["metrics"]) for c in s["metric_per_case"]] == [[], ["1"]]
    # --dataset-json none ignores it: both classes scored in both cases
    rc, _, _ = _run(capsys, "--pred", pred, "--ref", ref, "--dataset-json", "none")
    s = json.loads((pred / "summary.json").read_text())
    assert [sorted(c["metrics"]) for c in s["metric_per_case"]] == [["1", "2"], ["1", "2"]]


def test_conflicting_scored_labels_is_an_error(tmp_path, capsys):
    pred, ref = _two_case_folders(tmp_path)
    ds = {"labels": {"background": 0, "a": 1, "b": 2}, "scored_labels": {"a": [1]}, "test": [{"label": "labelsTs/a.nii.gz", "scored_labels": [2]}]}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    rc, _, err = _run(capsys, "--pred", pred, "--ref", ref)
    assert rc == 2 and "dataset.json" in err and "'a'" in err


def test_workers_give_the_same_summary(tmp_path):
    pred, ref = _two_case_folders(tmp_path)
    one = evaluate_folders(pred, ref, metrics=["dice", "assd"], workers=1, progress=False)
    two = evaluate_folders(pred, ref, metrics=["dice", "assd"], workers=2, progress=False)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)


def test_help_documents_conventions():
    parser = build_parser("evaluate")
    sub = parser._subparsers._group_actions[0].choices["evaluate"]
    text = sub.format_help()
    for flag in ("--pred", "--ref", "--labels", "--metrics", "--nsd-tolerance", "--dataset-json", "--allow-missing", "--workers", "-o"):
        assert flag in text
    assert "NaN" in text and "scored_labels" in text and "left" in text


def test_real_ct_pair_on_flipped_grid_scores_one(real_ct, tmp_path, capsys):
    organs = real_ct / "organs"
    own_grid = organs / "dicom" / "ts_upperabd_dicom20_label_own_grid.nii.gz"
    ref_file = organs / "labelsTs" / "ts_upperabd_dicom20.nii.gz"
    if not own_grid.exists() or not ref_file.exists():
        pytest.skip("real CT label pair not present")
    a, b = read_volume(own_grid), read_volume(ref_file)
    assert a.shape == b.shape and not np.array_equal(a.array, b.array)  # y flipped: raw arrays disagree
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(own_grid, pred / "ts_upperabd_dicom20.nii.gz")
    rc, _, _ = _run(capsys, "--pred", pred, "--ref", organs / "labelsTs", "--metrics", "dice,hd95")
    assert rc == 0
    s = json.loads((pred / "summary.json").read_text())
    assert s["dataset_json"] == str(organs / "dataset.json")
    metrics = s["metric_per_case"][0]["metrics"]
    assert sorted(metrics) == ["1", "2"]  # the dataset's scored_labels for this test case
    for lab in ("1", "2"):
        assert metrics[lab]["Dice"] == 1.0 and metrics[lab]["HD95"] == 0.0 and metrics[lab]["n_ref"] > 1000


def test_decathlon_dataset_json_is_read_and_region_labels_refused_by_name(tmp_path, capsys):
    pred, ref = _two_case_folders(tmp_path)
    ds = {"name": "Task03_Liver", "labels": {"0": "background", "1": "liver", "2": "tumour"}, "modality": {"0": "CT"}}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))  # the Decathlon's value -> name map
    rc, stdout, err = _run(capsys, "--pred", pred, "--ref", ref)
    assert rc == 0, err
    s = json.loads((pred / "summary.json").read_text())
    assert s["label_names"] == {"1": "liver", "2": "tumour"} and "tumour" in stdout
    assert s["mean"]["1"]["Dice"] == pytest.approx((0.8 + 1.0) / 2)
    # names from the Decathlon map work in --labels
    rc, _, _ = _run(capsys, "--pred", pred, "--ref", ref, "--labels", "tumour")
    assert rc == 0 and list(json.loads((pred / "summary.json").read_text())["mean"]) == ["2"]
    # a region-based nnU-Net label is refused with what it is
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "whole": [1, 2]}}))
    rc, _, err = _run(capsys, "--pred", pred, "--ref", ref)
    assert rc == 2 and "dataset.json: label 'whole' is region-based ([1, 2])" in err


def test_evaluate_and_discovery_share_one_dataset_json_reader():
    import medseg.data.datasets as data_ds
    import medseg.evaluate.cases as eval_cases

    assert eval_cases.load_dataset_json is data_ds.load_dataset_json
    assert eval_cases.DatasetInfo is data_ds.DatasetInfo
