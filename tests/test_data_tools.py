"""data_tools/*.py: small mains over medseg functions (help, outputs, errors)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import ROOT
from medseg.data.datasets import discover_cases
from medseg.io import read_volume, write_volume


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"data_tools_{name}", ROOT / "data_tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name,flags", [
    ("make_phantoms", ["--train", "--test", "--seed", "--shape", "--orientations", "--name"]),
    ("split", ["--folds", "--seed", "--out"]),
    ("make_dataset_json", ["--labels", "--channels", "--name", "--description", "--force"]),
    ("dicom_to_nifti", ["--suffix"]),
])
def test_help_explains_every_flag(name, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        tool(name).main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text


def test_make_phantoms_and_split(tmp_path, capsys):
    out = tmp_path / "ph"
    assert tool("make_phantoms").main([str(out), "--train", "3", "--test", "1", "--seed", "4", "--shape", "24", "24", "12"]) == 0
    info = discover_cases(out)
    assert len(info.cases) == 3 and len(info.test_cases) == 1
    again = tmp_path / "ph2"
    tool("make_phantoms").main([str(again), "--train", "3", "--test", "1", "--seed", "4", "--shape", "24", "24", "12"])
    a = read_volume(out / "imagesTr" / "phantom_002_0000.nii.gz")
    b = read_volume(again / "imagesTr" / "phantom_002_0000.nii.gz")
    assert np.array_equal(a.array, b.array) and np.array_equal(a.affine, b.affine)  # deterministic by seed
    assert tool("split").main([str(out), "--folds", "3", "--seed", "9"]) == 0
    doc = json.loads((out / "splits.json").read_text())
    assert doc["seed"] == 9 and len(doc["folds"]) == 3 and sorted(c for f in doc["folds"] for c in f["val"]) == doc["cases"]
    assert "wrote 3 folds" in capsys.readouterr().out
    assert tool("split").main([str(tmp_path / "nothing")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


def test_make_dataset_json_for_plain_folder(tmp_path, capsys):
    for name, value in (("p1", 1), ("p2", 2)):
        write_volume(np.full((5, 5, 4), -1000, np.int16), tmp_path / "imagesTr" / f"{name}.nrrd", np.eye(4))
        write_volume(np.full((5, 5, 4), value, np.uint8), tmp_path / "labelsTr" / f"{name}.nrrd", np.eye(4))
    mk = tool("make_dataset_json")
    assert mk.main([str(tmp_path), "--labels", "background=0", "liver=1", "spleen=2", "--name", "Mine"]) == 0
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "spleen": 2} and meta["name"] == "Mine"
    assert meta["training"][0] == {"image": "./imagesTr/p1.nrrd", "label": "./labelsTr/p1.nrrd"}
    info = discover_cases(tmp_path)
    assert [c.name for c in info.cases] == ["p1", "p2"] and info.labels["spleen"] == 2
    assert mk.main([str(tmp_path)]) == 2
    assert "dataset.json: already exists" in capsys.readouterr().err
    assert mk.main([str(tmp_path), "--force", "--labels", "liver=1"]) == 2
    assert "background must be 0" in capsys.readouterr().err


def test_dicom_to_nifti(real_ct, tmp_path, capsys):
    src = real_ct / "organs" / "dicom"
    assert tool("dicom_to_nifti").main([str(src), str(tmp_path / "out")]) == 0
    got = read_volume(tmp_path / "out" / "ts_upperabd_dicom20.nii.gz")
    ref = read_volume(real_ct / "organs" / "imagesTs" / "ts_upperabd_dicom20.nii.gz")
    assert np.array_equal(got.array, ref.array) and np.abs(got.affine - ref.affine).max() < 1e-4
    (tmp_path / "empty").mkdir()
    assert tool("dicom_to_nifti").main([str(tmp_path / "empty"), str(tmp_path / "x.nii.gz")]) == 2
    assert "no DICOM series found" in capsys.readouterr().err
