"""Where attention maps look (medseg.evaluate.gates): hand-computed numbers, `medseg evaluate --gates`
end to end on a tiny synthetic case in infer's layout, and the TensorBoard scalars of validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medseg.cli import main
from medseg.evaluate.gates import gate_localisation, localisation_scalars, mean_localisation, resample_to
from medseg.infer.runner import safe_name
from medseg.io import write_volume

SHAPE = (6, 6, 6)  # |V| = 216
CUBE = (slice(1, 3), slice(1, 3), slice(1, 3))  # |FG| = 8


def _label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[CUBE] = 1
    return label


def _cube_map() -> np.ndarray:
    gate = np.zeros(SHAPE, np.float32)
    gate[CUBE] = 1.0
    return gate


def test_map_one_inside_zero_outside_puts_all_energy_in_the_foreground():
    m = gate_localisation({"g": _cube_map()}, _label(), margin_mm=0)["g"]["1"]
    assert m["energy_fraction"] == 1.0
    assert m["volume_fraction"] == pytest.approx(8 / 216)
    assert (m["mean_inside"], m["mean_outside"]) == (1.0, 0.0)
    assert m["ratio"] == math.inf  # nothing outside: unbounded, reported as inf (not a division error)


def test_flat_map_scores_the_volume_fraction_and_ratio_one():
    """An open-everywhere gate (constant map) is no attention: energy fraction = |FG| / |V|, ratio 1."""
    for value in (1.0, 0.9, 0.3):
        m = gate_localisation({"g": np.full(SHAPE, value, np.float32)}, _label(), margin_mm=0)["g"]
        for key in ("1", "fg"):
            assert m[key]["energy_fraction"] == pytest.approx(8 / 216)
            assert m[key]["energy_fraction"] == pytest.approx(m[key]["volume_fraction"])
            assert m[key]["ratio"] == pytest.approx(1.0)
            assert m[key]["mean_inside"] == pytest.approx(value)


def test_half_open_background():
    gate = np.full(SHAPE, 0.5, np.float32)
    gate[CUBE] = 1.0
    m = gate_localisation({"g": gate}, _label(), margin_mm=0)["g"]["1"]
    assert m["energy_fraction"] == pytest.approx(8 / (8 + 208 * 0.5))  # 0.0714
    assert m["ratio"] == pytest.approx(2.0)
    assert m["mean_outside"] == pytest.approx(0.5)


def test_margin_dilates_the_foreground_in_mm():
    # 1 mm at 1 mm spacing: the cube plus its 6 face-neighbour layers: 8 + 6 * 4 = 32 voxels
    m = gate_localisation({"g": _cube_map()}, _label(), margin_mm=1.0)["g"]["1"]
    assert m["volume_fraction"] == pytest.approx(32 / 216)
    assert m["energy_fraction"] == 1.0 and m["mean_inside"] == pytest.approx(8 / 32)
    # spacing (1, 1, 2) mm, margin 1.5 mm: x/y neighbours (1 mm) and in-plane diagonals (1.41 mm) join,
    # z neighbours (2 mm) do not: 4 x 4 x 2 = 32 voxels again, but a different set
    m = gate_localisation({"g": _cube_map()}, _label(), spacing=(1, 1, 2), margin_mm=1.5)["g"]["1"]
    assert m["volume_fraction"] == pytest.approx(32 / 216)
    iso = gate_localisation({"g": _cube_map()}, _label(), spacing=(1, 1, 1), margin_mm=1.5)["g"]["1"]
    assert iso["volume_fraction"] == pytest.approx((8 + 6 * 4 + 12 * 2) / 216)  # faces and edges: 56


def test_coarse_map_is_upsampled_trilinearly_to_the_label_grid():
    # a 2-voxel map (0 | 1 along x) upsampled to 4 voxels (align_corners=False): 0, 0.25, 0.75, 1
    coarse = np.zeros((2, 1, 1), np.float32)
    coarse[1] = 1.0
    up = resample_to(coarse, (4, 2, 2))
    assert np.allclose(up[:, 0, 0], [0.0, 0.25, 0.75, 1.0])
    label = np.zeros((4, 2, 2), np.uint8)
    label[2:] = 1  # the right half
    m = gate_localisation({"g": coarse}, label, margin_mm=0)["g"]["1"]
    assert m["energy_fraction"] == pytest.approx(1.75 / 2.0)
    assert (m["mean_inside"], m["mean_outside"]) == (pytest.approx(0.875), pytest.approx(0.125))
    assert m["ratio"] == pytest.approx(7.0)


def test_classes_fg_ignore_and_undefined_values():
    label = _label()
    label[4:6, 4:6, 4:6] = 2
    label[0, 0, :] = 9  # ignore label: left out of V
    gate = _cube_map()
    gate[0, 0, :] = 1.0  # energy on ignored voxels does not count
    loc = gate_localisation({"g": gate, "zero": np.zeros(SHAPE)}, label, classes=[1, 2, 3], margin_mm=0, ignore_label=9)
    g = loc["g"]
    assert g["1"]["energy_fraction"] == 1.0 and g["1"]["volume_fraction"] == pytest.approx(8 / 210)
    assert g["2"]["energy_fraction"] == 0.0 and g["2"]["ratio"] == 0.0
    assert g["fg"]["volume_fraction"] == pytest.approx(16 / 210) and g["fg"]["mean_inside"] == pytest.approx(0.5)
    assert all(math.isnan(v) for v in g["3"].values())  # class absent from the reference
    assert math.isnan(loc["zero"]["1"]["energy_fraction"]) and math.isnan(loc["zero"]["1"]["ratio"])  # no energy


def test_mean_over_cases_drops_nan_keeps_inf_and_names_scalars():
    a = {"gate/level1": {"1": {"ratio": math.inf, "energy_fraction": 1.0}}}
    b = {"gate/level1": {"1": {"ratio": 1.0, "energy_fraction": math.nan}}}
    mean = mean_localisation([a, b])
    assert mean["gate/level1"]["1"] == {"ratio": math.inf, "energy_fraction": 1.0}
    tags = localisation_scalars(mean, {"1": "liver"})
    assert tags == {"gate_loc/gate/level1/liver/ratio": math.inf, "gate_loc/gate/level1/liver/energy_fraction": 1.0}


AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, -1.2, 0, 30.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])


def _infer_like_case(tmp_path):
    """labelsTs/a.nii.gz, and pred/a.nii.gz plus pred/a_gates/<map>.nii.gz as `medseg infer --save-gates` writes."""
    ref, pred = tmp_path / "labelsTs", tmp_path / "pred"
    ref.mkdir()
    (pred / "a_gates").mkdir(parents=True)
    write_volume(_label(), ref / "a.nii.gz", AFFINE)
    write_volume(_label(), pred / "a.nii.gz", AFFINE)
    write_volume(_cube_map(), pred / "a_gates" / f"{safe_name('gate/level1')}.nii.gz", AFFINE)
    write_volume(np.ones(SHAPE, np.float32), pred / "a_gates" / f"{safe_name('gate/level2')}.nii.gz", AFFINE)
    return pred, ref


def test_evaluate_gates_cli_end_to_end(tmp_path, capsys):
    pred, ref = _infer_like_case(tmp_path)
    rc = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--gates", "--gate-margin", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    loc = json.loads((pred / "summary.json").read_text())["gate_localisation"]
    case = loc["per_case"]["a"]
    assert case["gate_level1"]["1"]["energy_fraction"] == 1.0 and case["gate_level1"]["1"]["ratio"] == math.inf
    assert case["gate_level2"]["1"]["energy_fraction"] == pytest.approx(8 / 216)  # open everywhere
    assert case["gate_level2"]["fg"]["ratio"] == pytest.approx(1.0)
    assert loc["mean"]["gate_level2"]["1"]["ratio"] == pytest.approx(1.0)
    assert loc["missing"] == [] and loc["margin_mm"] == 0.0
    assert "gate localisation" in out and "gate_level2" in out and "0.037" in out

    # a gate folder elsewhere without this case: listed as missing, nothing scored
    other = tmp_path / "other"
    other.mkdir()
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--gates", str(other), "-o", str(tmp_path / "s.json")]) == 0
    loc = json.loads((tmp_path / "s.json").read_text())["gate_localisation"]
    assert loc["missing"] == ["a"] and loc["per_case"] == {} and loc["margin_mm"] == 5.0


def test_evaluate_without_gates_writes_no_gate_key_and_refuses_a_bad_margin(tmp_path, capsys):
    pred, ref = _infer_like_case(tmp_path)
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref)]) == 0
    assert "gate_localisation" not in json.loads((pred / "summary.json").read_text())
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--gates", "--gate-margin", "-1"]) == 2
    assert "--gate-margin" in capsys.readouterr().err


class _Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)


def test_validation_summary_gate_localisation_is_logged_as_gate_loc_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medseg.train.tensorboard import log_gate_localisation

    loc = gate_localisation({"gate/level1": np.ones(SHAPE, np.float32)}, _label(), margin_mm=0)
    summary = {"label_names": {"1": "liver"}, "gate_localisation": {"mean": mean_localisation([loc])}}
    w = _Writer()
    assert log_gate_localisation(w, summary, 3) == 10  # 5 metrics x (liver, fg)
    assert w.scalars["gate_loc/gate/level1/liver/ratio"] == (pytest.approx(1.0), 3)
    assert w.scalars["gate_loc/gate/level1/fg/energy_fraction"] == (pytest.approx(8 / 216), 3)
    assert log_gate_localisation(w, {"label_names": {}}, 3) == 0  # a model without maps: nothing

    writer = SummaryWriter(str(tmp_path / "tb"))
    log_gate_localisation(writer, summary, 7)
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    ev = acc.Scalars("gate_loc/gate/level1/liver/volume_fraction")
    assert ev[-1].step == 7 and ev[-1].value == pytest.approx(8 / 216)


def test_training_validation_logs_gate_loc_and_writes_it_to_the_summary(preprocessed_phantoms, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    from medseg.config import load_config
    from medseg.train import train

    cfg = load_config(None, [
        f"data.preprocessed={preprocessed_phantoms}", "model.channels=[4,8,16]", "data.patch_size=[16,16,16]",
        "train.epochs=1", "train.iters_per_epoch=1", "data.num_workers=0", "data.val_cases=[phantom_003]",
        "train.tb_num_cases=1", "model.skip_fusion.name=gate",
    ])
    run = tmp_path / "run"
    train(cfg, run)
    loc = json.loads((run / "validation" / "summary.json").read_text())["gate_localisation"]
    m = loc["per_case"]["phantom_003"]["gate/level1"]["fg"]
    assert 0 < m["volume_fraction"] < 1 and 0 <= m["energy_fraction"] <= 1
    assert m["energy_fraction"] == pytest.approx(m["volume_fraction"] * m["mean_inside"]
                                                 / (m["volume_fraction"] * m["mean_inside"]
                                                    + (1 - m["volume_fraction"]) * m["mean_outside"]))
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for metric in ("energy_fraction", "volume_fraction", "ratio"):
        assert f"gate_loc/gate/level1/liver/{metric}" in tags and f"gate_loc/gate/level0/fg/{metric}" in tags
    assert acc.Scalars("gate_loc/gate/level1/fg/energy_fraction")[-1].value == pytest.approx(m["energy_fraction"], rel=1e-5)
