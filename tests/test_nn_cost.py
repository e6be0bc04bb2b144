"""benchmarks/model_cost.py: runs, ends with a JSON line, and the FLOP targets of the variants hold."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("model_cost", ROOT / "benchmarks" / "model_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_cost_flop_targets(capsys):
    names = ["unet3d", "attention_unet3d", "se_unet3d", "eca_unet3d", "cbam_unet3d", "monai_unet", "monai_attention_unet"]
    assert load_benchmark().main(["--no-time", "--no-write", "--size", "96", "--only", *names]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    rows = result["models"]
    assert set(rows) == set(names)
    assert rows["unet3d"]["gflops_vs_plain"] == 1.0
    assert rows["attention_unet3d"]["gflops_vs_plain"] <= 1.25  # the gate runs on the coarse grid
    for name in ("se_unet3d", "eca_unet3d", "cbam_unet3d"):
        assert rows[name]["gflops_vs_plain"] <= 1.10, name
    assert rows["monai_attention_unet"]["gflops_vs_monai_unet"] > 4  # MONAI's gates run at full resolution
    assert all(r["params_m"] > 0.1 for r in rows.values())


def test_model_cost_covers_every_shipped_config_and_writes_the_zoo_table(capsys, tmp_path):
    """--no-time: every configs/*.yaml (whatever was added) gets FLOPs, params and its maps, with ratios
    to the plain net of its dimensionality; the model-zoo table has a row per config, times pending."""
    bench = load_benchmark()
    assert bench.main(["--no-time", "--size", "64", "--results", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"]
    configs = sorted(p.stem for p in (ROOT / "medseg" / "configs").glob("*.yaml"))
    assert sorted(set(rows) - {"monai_unet", "monai_attention_unet"}) == configs
    for name in configs:
        row = rows[name]
        assert row["plain"] == ("unet25d" if "25d" in name else "unet3d"), name
        assert row["gflops"] > 0 and row["params_m"] > 0 and "fp32_s" not in row
        assert row["gflops_vs_plain"] == row["gflops"] / rows[row["plain"]]["gflops"]
        assert row["params_m_vs_plain"] == row["params_m"] / rows[row["plain"]]["params_m"]
    assert rows["unet3d"]["gflops_vs_plain"] == rows["unet25d"]["gflops_vs_plain"] == 1.0
    assert rows["unet3d"]["maps"] == [] and rows["se_unet3d"]["maps"] == []
    assert "gate/level1" in rows["attention_unet3d"]["maps"] and "gate/level1" in rows["attention_unet25d"]["maps"]
    assert any(m.startswith("cbam/") for m in rows["cbam_unet3d"]["maps"])
    assert rows["attention_unet3d"]["paper"] == "Oktay et al. 2018"
    md = (tmp_path / "model_zoo.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(table) == len(configs)
    assert all(line.count("| pending |") == 2 or "pending | pending" in line for line in table)
    assert "`gate/level0-3`" in md and "`gate/...`: additive gate" in md
    assert json.loads((tmp_path / "model_zoo.json").read_text())["timed"] is False


def test_compact_maps_groups_consecutive_levels():
    bench = load_benchmark()
    assert bench.compact_maps(["gate/level0", "gate/level1", "gate/level3", "cbam/enc1", "cbam/enc2", "abn/bottleneck"]) == \
        "gate/level0-1,3, cbam/enc1-2, abn/bottleneck"
    assert bench.compact_maps([]) == "none"
