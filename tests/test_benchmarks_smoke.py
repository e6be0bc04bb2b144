"""The benchmark scripts' arithmetic and README splicing (nothing here is timed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import infer_speed  # noqa: E402
import update_readme  # noqa: E402


@pytest.mark.parametrize("shape,roi,overlap", [((239, 239, 222), (96, 96, 96), 0.25), ((240, 184, 222), (128, 96, 128), 0.5),
                                               ((50, 200, 97), (64, 64, 32), 0.5), ((96, 96, 96), (96, 96, 96), 0.5)])
def test_num_windows_matches_monai(shape, roi, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    roi_c = tuple(min(r, s) for r, s in zip(roi, shape))
    expected = len(dense_patch_slices(shape, roi_c, _get_scan_interval(shape, roi_c, 3, (overlap,) * 3)))
    assert _common.num_windows(shape, roi, overlap) == expected


def test_splice_replaces_only_between_markers():
    readme = "# t\n\n## Performance\nintro\n<!-- perf:start -->\nold table\n<!-- perf:end -->\nafter\n"
    out = update_readme.splice(readme, ["### A\n| x |", "### B\n"])
    assert out.startswith("# t\n\n## Performance\nintro\n<!-- perf:start -->\n### A\n| x |\n\n### B\n<!-- perf:end -->")
    assert out.endswith("<!-- perf:end -->\nafter\n") and "old table" not in out
    assert update_readme.splice(out, ["### A\n| x |", "### B\n"]) == out  # idempotent
    with pytest.raises(ValueError, match="markers"):
        update_readme.splice("no markers here", ["x"])


def test_result_files_in_readme_order(tmp_path):
    for name in ("zeta", "real_ct_study", "infer_speed", "alpha", "train_speed"):
        (tmp_path / f"{name}.md").write_text(name)
    assert [p.stem for p in update_readme.result_files(tmp_path)] == [
        "infer_speed", "train_speed", "real_ct_study", "alpha", "zeta"]


def test_infer_summary_ratios_and_targets():
    rows = {"ours_attention": {"total": 20.0, "peak_rss_gb": 2.0, "cpu_s": 40.0},
            "ours_attention_fp32": {"total": 50.0, "peak_rss_gb": 2.4},
            "monai_attention": {"total": 90.0, "peak_rss_gb": 3.8, "cpu_s": 150.0},
            "monai_unet": {"total": 25.0, "peak_rss_gb": 3.0, "cpu_s": 50.0}}
    s = infer_speed.summarize(rows)
    assert s["ours_attention_s"] == 20.0 and s["monai_attention_peak_rss_gb"] == 3.8
    assert s["speedup_attention_vs_monai_attention"] == pytest.approx(4.5)
    assert s["speedup_attention_vs_monai_unet"] == pytest.approx(1.25)
    assert s["bf16_gain_attention"] == pytest.approx(2.5)
    assert s["cpu_ratio_monai_attention_vs_ours_attention"] == pytest.approx(3.75)
    assert s["cpu_ratio_monai_unet_vs_ours_attention"] == pytest.approx(1.25)
    assert s["target_4x_vs_monai_attention"] and s["target_not_slower_than_monai_unet"] and s["target_rss_le_2_5_gb"]
    rows["ours_attention"]["total"] = 30.0
    assert not infer_speed.summarize(rows)["target_4x_vs_monai_attention"]


def test_md_table_formats_numbers():
    table = _common.md_table(["a", "b"], [["x", 1.23456], ["y", 123.456], ["z", float("nan")]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 1.23 |", "| y | 123.46 |", "| z | n/a |"]
