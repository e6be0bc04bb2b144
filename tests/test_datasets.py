"""Dataset discovery (nnU-Net v2, Decathlon, plain folders, real data) and k-fold splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.data.datasets import build_dataset_json, discover_cases
from medseg.data.splits import fold_cases, load_or_make_splits, make_splits, read_splits
from medseg.errors import ConfigError, InputError
from medseg.io import write_volume


def _vol(path, value=0, shape=(6, 5, 4)):
    write_volume(np.full(shape, value, np.int16), path, np.eye(4))
    return path


def _nnunet(root, cases=("a", "b", "c"), channels=1, labels=None, ext=".nii.gz"):
    for c in cases:
        for ch in range(channels):
            _vol(root / "imagesTr" / f"{c}_{ch:04d}{ext}")
        _vol(root / "labelsTr" / f"{c}{ext}")
    meta = {"name": "Toy", "channel_names": {str(i): "CT" for i in range(channels)},
            "labels": labels or {"background": 0, "liver": 1}, "numTraining": len(cases), "file_ending": ext}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_nnunet_v2_scan_with_channels(tmp_path):
    _nnunet(tmp_path, channels=2)
    _vol(tmp_path / "imagesTs" / "t1_0000.nii.gz")
    _vol(tmp_path / "imagesTs" / "t1_0001.nii.gz")
    info = discover_cases(tmp_path)
    assert info.layout == "nnunet" and info.name == "Toy" and info.num_classes == 2
    assert [c.name for c in info.cases] == ["a", "b", "c"]
    assert [p.name for p in info.cases[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert info.cases[1].label.name == "b.nii.gz"
    assert [c.name for c in info.test_cases] == ["t1"] and info.test_cases[0].label is None


def test_decathlon_layout(tmp_path):
    for c in ("liver_0", "liver_1"):
        _vol(tmp_path / "imagesTr" / f"{c}.nii.gz")
        _vol(tmp_path / "labelsTr" / f"{c}.nii.gz")
    meta = {"name": "Task03_Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"} for i in (0, 1)],
            "test": ["./imagesTr/liver_0.nii.gz"]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    info = discover_cases(tmp_path)
    assert info.layout == "decathlon"
    assert info.labels == {"background": 0, "liver": 1, "cancer": 2} and info.channel_names == {"0": "CT"}
    assert [c.name for c in info.cases] == ["liver_0", "liver_1"] and len(info.test_cases) == 1


def test_plain_folder_pair_infers_labels(tmp_path):
    for c, v in (("x", 1), ("y", 3)):
        _vol(tmp_path / "images" / f"{c}.nrrd", -1000)
        _vol(tmp_path / "labels" / f"{c}.nrrd", v)
    info = discover_cases(tmp_path)
    assert info.layout == "folders" and info.labels == {"background": 0, "label_1": 1, "label_3": 3}
    assert [c.label.name for c in info.cases] == ["x.nrrd", "y.nrrd"]
    # build_dataset_json describes the same folder (explicit lists, no _0000 suffix needed)
    (tmp_path / "dataset.json").write_text(json.dumps(build_dataset_json(info)))
    again = discover_cases(tmp_path)
    assert [(c.name, c.images, c.label) for c in again.cases] == [(c.name, c.images, c.label) for c in info.cases]


def test_missing_files_and_bad_json_are_named(tmp_path):
    _nnunet(tmp_path)
    (tmp_path / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(InputError, match=r"labelsTr/b.nii.gz: file not found \(label for image"):
        discover_cases(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["training"] = [{"image": "./imagesTr/zz.nii.gz", "label": "./labelsTr/a.nii.gz"}]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"imagesTr/zz.nii.gz: file not found \(image listed in .*dataset.json\)"):
        discover_cases(tmp_path)
    meta["labels"] = {"background": 0, "organ": [1, 2]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="region-based"):
        discover_cases(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="dataset.json: not valid JSON"):
        discover_cases(tmp_path)
    with pytest.raises(InputError, match="dataset folder not found"):
        discover_cases(tmp_path / "nope")


def test_labels_need_background(tmp_path):
    _nnunet(tmp_path, labels={"liver": 1, "spleen": 2})
    with pytest.raises(InputError, match="background = 0"):
        discover_cases(tmp_path)


def test_real_ct_without_channel_suffix_and_nrrd(real_ct):
    organs = discover_cases(real_ct / "organs")
    assert [c.name for c in organs.cases] == ["lidc0001_chest", "ts_abdpelvis_3mm"]
    assert organs.labels["heart"] == 5 and organs.num_classes == 6
    assert organs.test_cases[0].name == "ts_upperabd_dicom20"
    lung = discover_cases(real_ct / "lung_lesion")
    assert lung.test_cases[0].images[0].suffix == ".nrrd" and lung.test_cases[0].label.suffix == ".nrrd"


def test_splits_partition_and_depend_on_seed():
    names = [f"case_{i:02d}" for i in range(13)]
    folds = make_splits(names, 5, seed=7)
    assert len(folds) == 5
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == names  # every case validated exactly once
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and len(f["train"]) + len(f["val"]) == 13
        assert len(f["val"]) in (2, 3)
    assert make_splits(list(reversed(names)), 5, seed=7) == folds  # order of input does not matter
    assert make_splits(names, 5, seed=8) != folds
    assert len(make_splits(names[:3], 5, seed=0)) == 3  # fewer cases than folds
    with pytest.warns(UserWarning, match="only one case"):
        assert make_splits(["solo"], 5, 0) == [{"train": ["solo"], "val": ["solo"]}]


def test_load_or_make_splits_saves_seed_and_reuses(tmp_path):
    path = tmp_path / "splits.json"
    names = ["a", "b", "c", "d", "e", "f"]
    folds = load_or_make_splits(path, names, 3, seed=42)
    doc = read_splits(path)
    assert doc["seed"] == 42 and doc["num_folds"] == 3 and doc["folds"] == folds and doc["cases"] == names
    path.write_text(json.dumps({**doc, "folds": [{"train": ["a"], "val": ["b"]}] * 3}))  # hand-edited folds are kept
    assert load_or_make_splits(path, names, 3, seed=42)[0] == {"train": ["a"], "val": ["b"]}
    with pytest.warns(UserWarning, match="other cases or settings"):
        other = load_or_make_splits(path, names + ["g"], 3, seed=42)
    assert sorted(c for f in other for c in f["val"]) == names + ["g"]
    assert read_splits(path)["cases"] == names  # not overwritten
    train, val = fold_cases(folds, 1)
    assert sorted(train + val) == names
    with pytest.raises(ConfigError, match="data.fold: 3 is out of range"):
        fold_cases(folds, 3)


def test_dicom_series_folder_is_one_unlabelled_case(real_ct):
    info = discover_cases(real_ct / "organs" / "dicom" / "ts_upperabd_dicom20")
    assert len(info.cases) == 1 and info.cases[0].label is None and info.cases[0].images[0].is_dir()


def test_load_dataset_json_reads_both_label_conventions(tmp_path):
    from medseg.data.datasets import load_dataset_json

    assert load_dataset_json(tmp_path) is None  # a folder without dataset.json
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "ignore"}}))
    info = load_dataset_json(path)
    assert info.labels == {"background": 0, "liver": 1, "ignore": 2} and info.layout == "decathlon"
    assert info.label_names == {1: "liver"} and info.ignore_label == 2 and info.num_classes == 2
    assert info.json_path == path and info.cases == []
    path.write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    assert load_dataset_json(tmp_path).layout == "nnunet" and load_dataset_json(tmp_path).ignore_label is None


@pytest.mark.parametrize("name", ["../../evil", "sub/x", "a\\b", ".."])
def test_unsafe_case_names_from_dataset_json_are_refused(tmp_path, name, capsys):
    from medseg.cli import main
    from medseg.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "raw", n_train=2, n_test=0, seed=3, shape=(32, 32, 16))
    meta = json.loads((data / "dataset.json").read_text())
    meta["dataset"] = {n: {"images": [f"./imagesTr/{c}_0000.nii.gz"], "label": f"./labelsTr/{c}.nii.gz"}
                       for n, c in ((name, "phantom_000"), ("ok", "phantom_001"))}
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"dataset.json: 'dataset' key .* is not a safe case name"):
        discover_cases(data)
    out = tmp_path / "a" / "b" / "pre"
    code = main(["preprocess", "--data", str(data), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and repr(name) in err and "dataset.json" in err
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and "raw" not in p.parts}
    assert written == set(), written  # refused before anything was written, inside or outside --out


def test_load_case_refuses_names_that_leave_the_folder(tmp_path):
    from medseg.data.pipeline import load_case

    (tmp_path / "pre" / "cases").mkdir(parents=True)
    (tmp_path / "pre" / "x.json").write_text("{}")
    with pytest.raises(InputError, match="'../x' is not a safe case name"):
        load_case(tmp_path / "pre", "../x")
