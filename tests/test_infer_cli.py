"""`medseg infer` end to end on phantoms with a tiny run directory, plus every refusal path."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.cli import main
from medseg.config import Config, save_config
from medseg.data.phantoms import LABELS, make_phantom_case
from medseg.errors import InputError
from medseg.infer.predictor import Predictor
from medseg.io import read_volume, write_volume
from medseg.nn import build_model

PLANS = {
    "dataset_name": "phantom",
    "labels": LABELS,
    "num_classes": len(LABELS),
    "channel_names": {"0": "CT"},
    "target_spacing": [2.0, 2.0, 2.5],
    "normalization": {"scheme": "ct", "clip": [-1000.0, 700.0], "mean": 30.0, "std": 120.0},
    "patch_size": [16, 16, 16],
    "axis_order": "RAS",
}


def make_run(run: Path, *, deep_supervision: bool = False, prefix: str = "") -> Path:
    """A run directory as `medseg train` writes it: config.yaml, plans.json, checkpoints/best.pt."""
    cfg = Config()
    cfg.model.channels = [4, 8, 16]
    cfg.model.skip_fusion.name = "gate"
    cfg.model.deep_supervision = deep_supervision
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=PLANS["num_classes"])
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    (run / "plans.json").write_text(json.dumps(PLANS))
    (run / "checkpoints").mkdir(exist_ok=True)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 1}, run / "checkpoints" / "best.pt")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run")


def write_inputs(folder: Path, specs) -> list[Path]:
    """Phantom CTs in several formats / orientations: ``[(name, orientation, oblique_deg), ...]``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (name, code, oblique) in enumerate(specs):
        img, _ = make_phantom_case(i, shape=(32, 32, 20), orientation=code, oblique_deg=oblique)
        out.append(write_volume(img, folder / name))
    return out


def digest(paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def infer(run_dir, inp, out, *extra) -> int:
    return main(["infer", "--model", str(run_dir), "-i", str(inp), "-o", str(out), "--device", "cpu", *extra])


def test_folder_end_to_end_geometry_probabilities_gates(tmp_path, run_dir):
    inputs = write_inputs(tmp_path / "in", [("a_0000.nii.gz", "LPS", 0.0), ("b.nrrd", "RAS", 0.0), ("c.mha", "LAS", 12.0)])
    before = digest(inputs)
    assert infer(run_dir, tmp_path / "in", tmp_path / "out", "--save-probabilities", "--save-gates", "--precision", "fp32") == 0
    assert digest(inputs) == before  # inputs untouched
    for src, case in zip(inputs, ["a", "b", "c"]):
        ref = read_volume(src)
        mask = read_volume(tmp_path / "out" / f"{case}.nii.gz")
        assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine, atol=1e-4)
        assert mask.orientation == ref.orientation
        assert mask.array.dtype == np.uint8 and set(np.unique(mask.array)) <= set(range(len(LABELS)))
        probs = nib.load(tmp_path / "out" / f"{case}_probabilities.nii.gz")
        assert probs.shape == (*ref.shape, len(LABELS)) and np.allclose(probs.affine, ref.affine, atol=1e-4)
        p = probs.get_fdata(dtype=np.float32)
        assert p.min() >= 0.0 and p.max() <= 1.0
        assert np.abs(p.sum(-1) - 1.0).max() < 5e-3
        disagree = np.argmax(p, -1) != mask.array
        assert disagree.mean() < 0.01  # only near-ties after float16 / uint16 rounding
        gates = sorted((tmp_path / "out" / f"{case}_gates").glob("*.nii.gz"))
        assert [g.name for g in gates] == ["gate_level0.nii.gz", "gate_level1.nii.gz"]
        for g in gates:
            gv = read_volume(g)
            assert gv.shape == ref.shape and np.allclose(gv.affine, ref.affine, atol=1e-4)
            assert gv.array.min() >= 0.0 and gv.array.max() <= 1.0 and gv.array.std() > 0


def components(mask: np.ndarray, value: int) -> tuple[np.ndarray, int]:
    return ndimage.label(mask == value, structure=np.ones((3, 3, 3), bool))


def test_output_format_same_and_largest_component(tmp_path, run_dir):
    """`--postprocess largest-component` keeps, per class, exactly the largest 26-connected component of the raw mask."""
    src = write_inputs(tmp_path / "in", [("b.nrrd", "LPS", 0.0)])[0]
    assert infer(run_dir, src, tmp_path / "raw") == 0
    assert infer(run_dir, src, tmp_path / "out", "--output-format", "same", "--postprocess", "largest-component") == 0
    raw = read_volume(tmp_path / "raw" / "b.nii.gz").array
    mask = read_volume(tmp_path / "out" / "b.nrrd")
    assert mask.shape == read_volume(src).shape
    assert not (tmp_path / "out" / "b.nii.gz").exists()
    classes = [int(v) for v in np.unique(raw) if v]
    assert max(components(raw, v)[1] for v in classes) > 1  # the raw mask has stray islands to remove
    for v in classes:
        comp, n = components(raw, v)
        largest = comp == np.argmax(np.bincount(comp.ravel())[1:]) + 1
        assert components(mask.array, v)[1] == 1, v
        assert np.array_equal(mask.array == v, largest), v
    assert np.array_equal(mask.array[mask.array > 0], raw[mask.array > 0])  # only removals, to background


def test_tta_runs_eight_passes_and_times_its_stages(tmp_path, run_dir):
    src = write_inputs(tmp_path / "in", [("a.nii.gz", "RAS", 0.0)])[0]
    calls = {"tta": 0, "plain": 0}
    for key, tta in (("plain", False), ("tta", True)):
        pred = Predictor.from_run(run_dir, device="cpu", precision="fp32", tta=tta)
        pred.model.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
        t0 = time.perf_counter()
        res = pred.predict(src)
        wall = time.perf_counter() - t0
        assert res.mask.shape == read_volume(src).shape
        assert set(res.timings) == {"load", "preprocess", "sliding_window", "restore"}
        # every stage measured, none counted twice: the stages add up to (almost all of) the call
        assert all(v > 0 for v in res.timings.values())
        assert 0.8 * wall <= sum(res.timings.values()) <= wall
    assert calls["plain"] > 0 and calls["tta"] == 8 * calls["plain"]


def test_cli_tta_overlap_and_blend_reach_the_prediction(tmp_path, run_dir):
    """The CLI's --tta / --overlap / --blend give what the Predictor gives with those settings; TTA changes the
    probabilities of this (not mirror-symmetric) net a little, never their validity."""
    src = write_inputs(tmp_path / "in", [("a.nii.gz", "RAS", 0.0)])[0]
    probs = {}
    for key, flags in (("plain", ()), ("tta", ("--tta",))):
        out = tmp_path / key
        assert infer(run_dir, src, out, *flags, "--overlap", "0.25", "--blend", "constant", "--precision", "fp32",
                     "--save-probabilities") == 0
        p = nib.load(out / "a_probabilities.nii.gz").get_fdata(dtype=np.float32)
        assert np.abs(p.sum(-1) - 1.0).max() < 5e-3
        assert (np.argmax(p, -1) != read_volume(out / "a.nii.gz").array).mean() < 0.01  # near-ties only
        probs[key] = p
    diff = np.abs(probs["tta"] - probs["plain"])
    assert diff.max() > 1e-3 and diff.mean() < 0.1  # measured: max 0.30, mean 0.023
    api = Predictor.from_run(run_dir, device="cpu", precision="fp32", tta=True, overlap=0.25, blend="constant")
    ref = np.moveaxis(api.predict(src, probabilities=True).probabilities.astype(np.float32), 0, -1)
    assert np.abs(ref - probs["tta"]).max() < 1e-3  # uint16 / float16 rounding only
    default = Predictor.from_run(run_dir, device="cpu", precision="fp32", tta=True)  # overlap 0.5, gaussian
    other = np.moveaxis(default.predict(src, probabilities=True).probabilities.astype(np.float32), 0, -1)
    assert np.abs(other - probs["tta"]).max() > 1e-3  # so the flags did change something


def test_num_parts_split_the_folder(tmp_path, run_dir):
    write_inputs(tmp_path / "in", [(f"c{i}.nii.gz", "RAS", 0.0) for i in range(3)])
    written = []
    for part in (0, 1):
        out = tmp_path / f"out{part}"
        assert infer(run_dir, tmp_path / "in", out, "--num-parts", "2", "--part-id", str(part)) == 0
        written.append(sorted(p.name for p in out.glob("*.nii.gz")))
    assert written == [["c0.nii.gz", "c2.nii.gz"], ["c1.nii.gz"]]
    assert infer(run_dir, tmp_path / "in", tmp_path / "x", "--num-parts", "2", "--part-id", "2") == 2


def test_checkpoint_prefixes_and_deep_supervision_heads_load(tmp_path):
    run = make_run(tmp_path / "run", deep_supervision=True, prefix="module.")
    pred = Predictor.from_run(run, device="cpu")
    assert not pred.model.training
    with pytest.raises(InputError, match="final.pt: checkpoint not found .available: best"):
        Predictor.from_run(run, checkpoint="final")


def test_mismatched_weights_are_refused(tmp_path):
    run = make_run(tmp_path / "run")
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    state.pop(next(iter(state)))
    torch.save({"model": state}, run / "checkpoints" / "best.pt")
    with pytest.raises(InputError, match="best.pt: weights do not match"):
        Predictor.from_run(run)


@pytest.mark.parametrize("missing", ["config.yaml", "plans.json", "checkpoints/best.pt"])
def test_missing_model_files(tmp_path, capsys, missing):
    run = make_run(tmp_path / "run")
    (run / missing).unlink()
    src = write_inputs(tmp_path / "in", [("a.nii.gz", "RAS", 0.0)])[0]
    assert infer(run, src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert Path(missing).name in err and "medseg: error:" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_inputs_exit_2_with_the_file_named(tmp_path, capsys, run_dir):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.full((8, 8, 8, 3), -1000, np.int16), aff), bad / "four_d.nii.gz")
    nib.save(nib.Nifti1Image(np.full((16, 16, 1), -1000, np.int16), aff), bad / "flat.nii.gz")
    _, lab = make_phantom_case(0, shape=(32, 32, 20), orientation="RAS")
    write_volume(lab, bad / "label.nii.gz")
    (tmp_path / "empty").mkdir()
    cases = [
        (bad / "notes.txt", "notes.txt: not a volume file"),
        (bad / "four_d.nii.gz", "four_d.nii.gz: is a 4-D image"),
        (bad / "flat.nii.gz", "flat.nii.gz: is a 2-D image"),
        (bad / "label.nii.gz", "label.nii.gz: looks like a label map"),
        (tmp_path / "empty", "no volume files"),
        (tmp_path / "nowhere.nii.gz", "nowhere.nii.gz: input not found"),
    ]
    for path, message in cases:
        assert infer(run_dir, path, tmp_path / "out") == 2, path
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))


def test_folder_with_one_bad_case_segments_the_rest_and_fails(tmp_path, capsys, run_dir):
    write_inputs(tmp_path / "in", [("good.nii.gz", "RAS", 0.0)])
    _, lab = make_phantom_case(1, shape=(32, 32, 20), orientation="RAS")
    write_volume(lab, tmp_path / "in" / "seg.nii.gz")
    assert infer(run_dir, tmp_path / "in", tmp_path / "out") == 2
    assert "1 of 2 case(s) failed" in capsys.readouterr().err
    assert (tmp_path / "out" / "good.nii.gz").is_file() and not (tmp_path / "out" / "seg.nii.gz").exists()


def test_refuses_to_overwrite_inputs(tmp_path, capsys, run_dir):
    inputs = write_inputs(tmp_path / "in", [("a.nii.gz", "RAS", 0.0), ("b_0000.nii.gz", "LPS", 0.0)])
    before = digest(inputs)
    assert infer(run_dir, tmp_path / "in", tmp_path / "in") == 2
    assert "output folder is the input folder" in capsys.readouterr().err
    assert infer(run_dir, tmp_path / "in" / ".." / "in", tmp_path / "in") == 2  # same folder, other spelling
    capsys.readouterr()
    assert infer(run_dir, inputs[0], tmp_path / "in") == 2  # a.nii.gz -> a.nii.gz
    assert "would overwrite the input" in capsys.readouterr().err
    assert digest(inputs) == before
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.nii.gz", "b_0000.nii.gz"]
    # b_0000.nii.gz -> b.nii.gz beside it is allowed (a new file, no input touched)
    assert infer(run_dir, inputs[1], tmp_path / "in") == 0
    assert digest(inputs) == before and (tmp_path / "in" / "b.nii.gz").is_file()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["infer", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--input", "--output", "--overlap", "--blend", "--sw-batch-size", "--tta", "--device",
                 "--precision", "--checkpoint", "--save-probabilities", "--save-gates", "--postprocess",
                 "--num-parts", "--part-id", "--output-format", "_probabilities.nii.gz"):
        assert flag in out


def test_real_dicom_series_folder(tmp_path, real_ct, run_dir):
    """A DICOM series folder in, a NIfTI mask out on the series' own (LPS) grid."""
    dicom = real_ct / "organs" / "dicom" / "ts_upperabd_dicom20"
    if not dicom.is_dir():
        pytest.skip("ts_upperabd_dicom20 is not present")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "checkpoints"):
        (run / name).symlink_to(run_dir / name)
    (run / "plans.json").write_text(json.dumps(dict(PLANS, target_spacing=[6.0, 6.0, 6.0])))  # coarse: fast
    assert infer(run, dicom, tmp_path / "out", "--save-gates") == 0
    ref = read_volume(dicom)
    mask = read_volume(tmp_path / "out" / "ts_upperabd_dicom20.nii.gz")
    assert mask.shape == ref.shape == (512, 512, 20) and np.allclose(mask.affine, ref.affine, atol=1e-4)
    assert mask.orientation == "LPS"
    gate = read_volume(tmp_path / "out" / "ts_upperabd_dicom20_gates" / "gate_level0.nii.gz")
    assert gate.shape == ref.shape and np.allclose(gate.affine, ref.affine, atol=1e-4)


def test_predict_args_record_the_settings_and_the_checkpoint(tmp_path, run_dir):
    """predict_args.json beside the masks: resolved settings (flags over the run's infer section) and the
    checkpoint's path, sha256 and epoch, as nnU-Net's predict_from_raw_data_args.json."""
    write_inputs(tmp_path / "in", [("a.nii.gz", "RAS", 0.0)])
    assert infer(run_dir, tmp_path / "in", tmp_path / "out", "--precision", "fp32", "--overlap", "0.25",
                 "--blend", "constant", "infer.sw_batch_size=3") == 0
    rec = json.loads((tmp_path / "out" / "predict_args.json").read_text())
    ckpt = run_dir / "checkpoints" / "best.pt"
    assert rec["checkpoint"] == {"name": "best", "path": str(ckpt.resolve()), "epoch": 1, "step": None,
                                 "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    s = rec["settings"]
    assert (s["device"], s["precision"], s["overlap"], s["blend"], s["sw_batch_size"]) == ("cpu", "fp32", 0.25, "constant", 3)
    assert s["roi_size"] == PLANS["patch_size"] and s["postprocess"] == "none"  # the run never validated
    assert rec["model"] == str(run_dir.resolve()) and rec["input"] == str((tmp_path / "in").resolve())
    assert rec["overrides"] == ["infer.sw_batch_size=3"] and rec["continue"] is False


def test_continue_skips_cases_already_written(tmp_path, run_dir, capsys):
    """--continue leaves a finished case's mask alone and segments only the missing ones."""
    write_inputs(tmp_path / "in", [("a.nii.gz", "RAS", 0.0), ("b.nii.gz", "LPS", 0.0)])
    out = tmp_path / "out"
    assert infer(run_dir, tmp_path / "in", out, "--precision", "fp32") == 0
    (out / "b.nii.gz").unlink()
    a_before = (out / "a.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert infer(run_dir, tmp_path / "in", out, "--precision", "fp32", "--continue") == 0
    assert "wrote 1 file(s)" in capsys.readouterr().out
    assert (out / "a.nii.gz").stat().st_mtime_ns == a_before and (out / "b.nii.gz").is_file()
    assert json.loads((out / "predict_args.json").read_text())["continue"] is True
    # a case without the probabilities asked for now is not finished: both are redone
    assert infer(run_dir, tmp_path / "in", out, "--precision", "fp32", "--continue", "--save-probabilities") == 0
    assert (out / "a_probabilities.nii.gz").is_file() and (out / "b_probabilities.nii.gz").is_file()
    assert (out / "a.nii.gz").stat().st_mtime_ns != a_before


def test_predict_args_follow_the_predictions_only(tmp_path, capsys, run_dir):
    """A refused call leaves no predict_args.json; a call where some cases failed records the ones written."""
    inputs = write_inputs(tmp_path / "in", [("a.nii.gz", "RAS", 0.0)])
    assert infer(run_dir, inputs[0], tmp_path / "in") == 2  # would overwrite its input
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.nii.gz"]
    _, lab = make_phantom_case(1, shape=(32, 32, 20), orientation="RAS")
    write_volume(lab, tmp_path / "in" / "seg.nii.gz")  # a label map: refused as an image
    assert infer(run_dir, tmp_path / "in", tmp_path / "out") == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "predict_args.json"]
