"""benchmarks/infer_speed.py: the rows it runs by default, the speedup split, the nnU-Net rows' skip
and window counts, and the script end to end at --quick size (nothing here checks a timing)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import infer_speed  # noqa: E402

BF16_ROWS = {"ours_unet_bf16", "ours_attention_bf16", "monai_unet_bf16", "monai_attention_bf16", "ours_unet_stem_bf16",
             "ours_attention_stem_bf16"}


def test_default_rows_leave_bf16_out_without_native_bf16():
    plain = infer_speed.default_pipelines(bf16_native=False)
    assert not BF16_ROWS & set(plain)
    assert {"ours_attention", "ours_attention_fp32", "ours_attention_stockwin", "monai_unet", "monai_attention",
            "nnunet_tta", "nnunet_notta"} <= set(plain)
    assert not [p for p in plain if p.endswith("_large")]
    native = infer_speed.default_pipelines(bf16_native=True)
    assert BF16_ROWS <= set(native) and set(native) - set(plain) == BF16_ROWS


def test_fp32_aliases_name_the_fp32_rows_once():
    args = infer_speed.parse_args(["--pipelines", "monai_unet_fp32", "ours_attention_bf16", "monai_unet", "monai_attention_fp32"])
    assert args.pipelines == ["monai_unet", "ours_attention_bf16", "monai_attention"]
    assert infer_speed.parse_args([]).pipelines is None  # resolved by main from the CPU's bf16 support


def test_speedup_split_multiplies_to_the_total():
    rows = {"ours_attention_fp32": {"total": 20.0, "cpu_s": 40.0, "peak_rss_gb": 2.0, "precision": "fp32"},
            "ours_attention_bf16": {"total": 10.0, "cpu_s": 16.0, "peak_rss_gb": 1.5, "precision": "bfloat16"},
            "ours_attention_stockwin": {"total": 30.0, "cpu_s": 50.0, "peak_rss_gb": 2.2, "precision": "fp32"},
            "monai_attention": {"total": 90.0, "cpu_s": 175.0, "peak_rss_gb": 3.8, "precision": "fp32"}}
    s = infer_speed.summarize(rows)
    # wall: window plan 30/20, architecture 90/30, precision 20/10
    assert s["split_window_plan"] == pytest.approx(1.5) and s["split_architecture"] == pytest.approx(3.0)
    assert s["split_total_fp32"] == pytest.approx(4.5) == s["split_window_plan"] * s["split_architecture"]
    assert s["split_precision"] == pytest.approx(2.0)
    assert s["split_total_bf16"] == pytest.approx(9.0) == s["split_precision"] * s["split_total_fp32"]
    # CPU seconds: 50/40, 175/50, 40/16
    assert s["split_cpu_window_plan"] == pytest.approx(1.25) and s["split_cpu_architecture"] == pytest.approx(3.5)
    assert s["split_cpu_total_fp32"] == pytest.approx(4.375) and s["split_cpu_precision"] == pytest.approx(2.5)
    text = infer_speed.split_lines(s)
    assert "total 4.50x (4.38x in CPU s) = window plan 1.50x (1.25x in CPU s)" in text
    assert "architecture and pipeline code 3.00x (3.50x in CPU s)" in text and "precision 2.00x (2.50x in CPU s)" in text


def test_strided_stem_is_one_more_factor_of_the_split():
    rows = {"ours_attention_fp32": {"total": 20.0, "cpu_s": 40.0, "peak_rss_gb": 2.0, "precision": "fp32"},
            "ours_attention_stem_fp32": {"total": 5.0, "cpu_s": 16.0, "peak_rss_gb": 1.5, "precision": "fp32"},
            "ours_unet_stem_fp32": {"total": 4.0, "cpu_s": 14.0, "peak_rss_gb": 1.5, "precision": "fp32"},
            "ours_attention_stockwin": {"total": 30.0, "cpu_s": 50.0, "peak_rss_gb": 2.2, "precision": "fp32"},
            "monai_attention": {"total": 90.0, "cpu_s": 175.0, "peak_rss_gb": 3.8, "precision": "fp32"},
            "monai_unet": {"total": 30.0, "cpu_s": 60.0, "peak_rss_gb": 3.8, "precision": "fp32"}}
    s = infer_speed.summarize(rows)
    assert s["split_stem"] == pytest.approx(4.0) and s["split_cpu_stem"] == pytest.approx(2.5)
    # monai_attention / stem = window plan (30/20) x architecture (90/30) x stem (20/5)
    assert s["split_total_stem_fp32"] == pytest.approx(18.0)
    assert s["split_total_stem_fp32"] == pytest.approx(s["split_window_plan"] * s["split_architecture"] * s["split_stem"])
    assert s["speedup_attention_stem_fp32_vs_monai_attention"] == pytest.approx(18.0)
    assert s["speedup_attention_stem_fp32_vs_monai_unet"] == pytest.approx(6.0)
    assert s["speedup_unet_stem_fp32_vs_monai_unet"] == pytest.approx(7.5)
    assert s["attention_overhead_ours_stem"] == pytest.approx(1.25)
    assert "total 18.00x (10.94x in CPU s) = the above x strided stem 4.00x (2.50x in CPU s)" in infer_speed.split_lines(s)
    del rows["ours_attention_stem_fp32"]
    assert "split_stem" not in infer_speed.summarize(rows) and "strided stem" not in infer_speed.split_lines(infer_speed.summarize(rows))


def test_stem_rows_get_a_strided_stem_and_their_own_plan():
    assert infer_speed.ours_overrides("attention_stem", [16, 32, 64, 128, 256])[-1] == "model.strides=[2, 2, 2, 2, 2]"
    assert not [o for o in infer_speed.ours_overrides("attention", [16, 32, 64, 128, 256]) if "strides" in o]
    assert {infer_speed.PIPELINES[p][1] for p in infer_speed.PIPELINES if "_stem" in p} == {"unet_stem", "attention_stem"}
    assert {"ours_attention_stem_fp32", "ours_unet_stem_fp32"} <= set(infer_speed.default_pipelines(bf16_native=False))
    assert "ours_attention_stem_bf16" in infer_speed.default_pipelines(bf16_native=True)


def test_speedup_split_without_bf16_takes_ours_attention_in_fp32_and_says_why_precision_is_missing():
    rows = {"ours_attention": {"total": 25.0, "peak_rss_gb": 2.0, "precision": "fp32"},
            "ours_attention_stockwin": {"total": 40.0, "peak_rss_gb": 2.2, "precision": "fp32"},
            "monai_attention": {"total": 60.0, "peak_rss_gb": 3.8, "precision": "fp32"},
            "nnunet_tta": {"skipped": infer_speed.NNUNET_MISSING}}
    s = infer_speed.summarize(rows)
    assert s["split_window_plan"] == pytest.approx(1.6) and s["split_architecture"] == pytest.approx(1.5)
    assert s["split_total_fp32"] == pytest.approx(2.4)
    assert "split_precision" not in s and "split_total_bf16" not in s and "split_cpu_window_plan" not in s
    assert s["nnunet_tta_skipped"] == infer_speed.NNUNET_MISSING and "nnunet_tta_s" not in s
    assert f"precision: n/a ({infer_speed.NO_BF16_NOTE})" in infer_speed.split_lines(s, infer_speed.NO_BF16_NOTE)
    # ours_attention in bf16 is not an fp32 reference
    rows["ours_attention"]["precision"] = "bfloat16"
    assert "split_window_plan" not in infer_speed.summarize(rows)
    assert infer_speed.split_lines({}).startswith("Speedup split: n/a")


def test_net_voxels_and_nnunet_tiles():
    assert infer_speed.net_voxels(18, (96, 96, 96)) == 18 * 96**3
    assert infer_speed.net_voxels(32, (28, 56, 56), 8) == 32 * 28 * 56 * 56 * 8
    pytest.importorskip("nnunetv2")
    # steps per axis: ceil((121 - 96) / 48) + 1 = 2, ceil((195 - 160) / 80) + 1 = 2 -> 8 tiles
    assert infer_speed.nnunet_tiles((121, 195, 195), (96, 160, 160)) == 8
    assert infer_speed.nnunet_tiles((30, 50, 50), (32, 96, 96)) == 1  # padded up to one tile
    assert infer_speed.nnunet_tiles((200, 100, 100), (64, 100, 100)) == 6  # ceil(136 / 32) + 1 = 6 along x


def test_nnunet_rows_are_skipped_without_nnunetv2(tmp_path, monkeypatch):
    for key in ("raw", "preprocessed", "results", "n_proc_DA", "def_n_proc", "compile"):
        monkeypatch.setenv(f"nnUNet_{key}", "")  # set_environment's values are restored after the test
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 -> ModuleNotFoundError
    args = infer_speed.parse_args(["--child", "nnunet_prepare", "--nnunet-work", str(tmp_path / "w"),
                                   "--nnunet-data", str(tmp_path / "d"), "--threads", "1"])
    assert infer_speed.child_nnunet_prepare(args) == {"skipped": infer_speed.NNUNET_MISSING}
    assert infer_speed.child_nnunet(args, tta=True) == {"skipped": infer_speed.NNUNET_MISSING}


@pytest.mark.parametrize("native", [False, True])
def test_main_default_rows_follow_native_bf16_and_report_it(tmp_path, monkeypatch, native):
    """main's default set without running anything: children, planning and inputs faked."""
    import medseg.runtime

    ran = []

    def fake_child(argv):
        name = argv[argv.index("--child") + 1]
        ran.append(name)
        precision = infer_speed.PIPELINES[name][2].replace("auto", "bf16" if native else "fp32")
        return {"total": 2.0, "cpu_s": 3.0, "peak_rss_gb": 0.5, "precision": precision, "roi": [32, 32, 32],
                "overlap": 0.5, "sw_batch_size": 2, "windows": 4, "mirrors": 1, "net_voxels": 4 * 32**3,
                "load_preprocess": 0.1, "sliding_window": 1.5, "restore_write": 0.4}

    monkeypatch.setattr(medseg.runtime, "cpu_supports_bf16", lambda: native)
    monkeypatch.setattr(infer_speed, "run_child", fake_child)
    monkeypatch.setattr(infer_speed, "prepare", lambda args, tmp: (tmp / "x.nii.gz", dict.fromkeys(infer_speed.OURS_MODELS, tmp), "x"))
    monkeypatch.setattr(infer_speed, "prepare_nnunet", lambda args, tmp: ({"skipped": infer_speed.NNUNET_MISSING}, ""))
    assert infer_speed.main(["--results", str(tmp_path)]) == 0
    assert bool(BF16_ROWS & set(ran)) is native
    assert "ours_attention_stockwin" in ran and not [n for n in ran if n.startswith("nnunet")]  # planning skipped them
    md = (tmp_path / "infer_speed.md").read_text()
    assert (infer_speed.NO_BF16_NOTE in md) is not native
    assert f"| nnunet_tta | {infer_speed.NNUNET_MISSING} |" in md
    assert "| pipeline | precision | window | overlap | sw batch | windows | mirrors | net voxels (M) |" in md
    data = json.loads((tmp_path / "infer_speed.json").read_text())
    assert data["summary"]["nnunet_notta_skipped"] == infer_speed.NNUNET_MISSING
    assert ("split_precision" in data["summary"]) is native


def test_once_rows_run_in_the_first_round_only(tmp_path, monkeypatch):
    ran = []

    def fake_child(argv):
        ran.append(argv[argv.index("--child") + 1])
        return {"total": 1.0 + len(ran), "cpu_s": 3.0, "peak_rss_gb": 0.5, "precision": "fp32", "roi": [32, 32, 32],
                "overlap": 0.5, "sw_batch_size": 2, "windows": 4, "mirrors": 1, "net_voxels": 4 * 32**3,
                "load_preprocess": 0.1, "sliding_window": 1.5, "restore_write": 0.4}

    monkeypatch.setattr(infer_speed, "run_child", fake_child)
    monkeypatch.setattr(infer_speed, "prepare", lambda args, tmp: (tmp / "x.nii.gz", dict.fromkeys(infer_speed.OURS_MODELS, tmp), "x"))
    assert infer_speed.main(["--results", str(tmp_path), "--repeats", "3", "--pipelines", "ours_unet_fp32",
                             "monai_unet", "--once", "monai_unet"]) == 0
    assert ran == ["ours_unet_fp32", "monai_unet", "ours_unet_fp32", "ours_unet_fp32"]
    data = json.loads((tmp_path / "infer_speed.json").read_text())
    assert data["rows"]["ours_unet_fp32"]["total_all"] == [2.0, 4.0, 5.0] and data["rows"]["ours_unet_fp32"]["total"] == 2.0
    assert data["rows"]["monai_unet"]["total_all"] == [3.0]
    assert "fastest of 3 interleaved run(s) (monai_unet: one run)" in (tmp_path / "infer_speed.md").read_text()
    assert infer_speed.parse_args([]).once == ["nnunet_tta"] and infer_speed.parse_args(["--once"]).once == []


def _run_quick(tmp_path: Path, *rows: str) -> tuple[dict, dict]:
    cmd = [sys.executable, str(BENCH / "infer_speed.py"), "--quick", "--threads", "1", "--results", str(tmp_path),
           "--pipelines", *rows]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, json.loads((tmp_path / "infer_speed.json").read_text())["rows"]


def test_quick_end_to_end_stock_window_and_monai(tmp_path):
    """The script on a 96x96x30 phantom (a few seconds per row): the split's rows and MONAI UNet."""
    rows_run = ("ours_attention_fp32", "ours_attention_stockwin", "monai_attention", "monai_unet", "ours_attention_stem_fp32")
    s, rows = _run_quick(tmp_path, *rows_run)
    for name in rows_run:
        assert s[f"{name}_s"] > 0 and 0 < s[f"{name}_peak_rss_gb"] < 4
        r = rows[name]
        edge = 64 if "_stem" in name else 32  # a stem net's window: --quick's stem_roi
        assert r["precision"] == "fp32" and r["mirrors"] == 1 and r["roi"] == [edge] * 3
        assert r["net_voxels"] == r["windows"] * edge**3 and r["cpu_s"] > 0
    assert s["split_total_stem_fp32"] == pytest.approx(s["monai_attention_s"] / s["ours_attention_stem_fp32_s"])
    stock, monai = rows["ours_attention_stockwin"], rows["monai_unet"]
    assert (stock["overlap"], stock["sw_batch_size"], stock["blend"]) == (0.25, 4, "constant")
    assert (monai["overlap"], monai["sw_batch_size"]) == (0.25, 4)
    assert rows["ours_attention_fp32"]["overlap"] == 0.5 and rows["ours_attention_fp32"]["blend"] == "gaussian"
    assert s["split_total_fp32"] == pytest.approx(s["split_window_plan"] * s["split_architecture"])
    assert s["split_total_fp32"] == pytest.approx(s["monai_attention_s"] / s["ours_attention_fp32_s"])
    md = (tmp_path / "infer_speed.md").read_text()
    assert "| ours_attention_stockwin | fp32 | 32x32x32 | 0.25 | 4 |" in md and "split into its causes" in md


@pytest.mark.slow
def test_quick_end_to_end_nnunet(tmp_path):
    """nnU-Net's plan, untrained model and predictor with and without TTA (~2-3 min on 1 busy thread)."""
    pytest.importorskip("nnunetv2")
    s, rows = _run_quick(tmp_path, "nnunet_notta", "nnunet_tta")
    tta, notta = rows["nnunet_tta"], rows["nnunet_notta"]
    assert s["nnunet_tta_s"] > 0 and s["nnunet_notta_s"] > 0 and "tta_cost_nnunet" in s
    assert (tta["mirrors"], notta["mirrors"]) == (8, 1) and tta["windows"] == notta["windows"] >= 1
    assert tta["net_voxels"] == 8 * notta["net_voxels"] == 8 * notta["windows"] * math.prod(notta["roi"])
    assert tta["precision"] == "fp32" and tta["overlap"] == 0.5 and tta["sw_batch_size"] == 1
    md = (tmp_path / "infer_speed.md").read_text()
    assert "| nnunet_tta | fp32 |" in md and "planned by its own planner on 2 phantoms" in md
