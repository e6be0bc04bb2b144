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
    assert load_benchmark().main(["--no-time", "--size", "96", "--only", *names]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    rows = result["models"]
    assert set(rows) == set(names)
    assert rows["unet3d"]["gflops_vs_unet"] == 1.0
    assert rows["attention_unet3d"]["gflops_vs_unet"] <= 1.25  # the gate runs on the coarse grid
    for name in ("se_unet3d", "eca_unet3d", "cbam_unet3d"):
        assert rows[name]["gflops_vs_unet"] <= 1.10, name
    assert rows["monai_attention_unet"]["gflops_vs_monai_unet"] > 4  # MONAI's gates run at full resolution
    assert all(r["params_m"] > 0.1 for r in rows.values())
