"""The benchmark scripts' arithmetic and README splicing (nothing here is timed)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
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
    for name in ("zeta", "head_to_head", "real_ct_study_lung_lesion_fp32", "real_ct_study", "infer_speed", "alpha",
                 "real_ct_study_fp32", "real_ct_study_lung_lesion", "train_speed", "head_to_head_fp32"):
        (tmp_path / f"{name}.md").write_text(name)
    assert [p.stem for p in update_readme.result_files(tmp_path)] == [
        "infer_speed", "train_speed", "real_ct_study", "real_ct_study_lung_lesion", "real_ct_study_fp32",
        "real_ct_study_lung_lesion_fp32", "head_to_head", "head_to_head_fp32", "alpha", "zeta"]


def test_model_zoo_goes_to_its_own_section(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for name in ("model_zoo", "train_speed"):
        (results / f"{name}.md").write_text(f"### {name}\n")
    assert [p.stem for p in update_readme.result_files(results)] == ["train_speed"]
    readme = tmp_path / "README.md"
    readme.write_text("# t\n<!-- zoo:start -->\nold\n<!-- zoo:end -->\n## Performance\n<!-- perf:start -->\n<!-- perf:end -->\n")
    assert update_readme.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert readme.read_text() == ("# t\n<!-- zoo:start -->\n### model_zoo\n<!-- zoo:end -->\n## Performance\n"
                                  "<!-- perf:start -->\n### train_speed\n<!-- perf:end -->\n")


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
    assert not [k for k in s if k.startswith("target")]  # figures only: no pass/fail flags in published results


def test_md_table_formats_numbers():
    table = _common.md_table(["a", "b"], [["x", 1.23456], ["y", 123.456], ["z", float("nan")]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 1.23 |", "| y | 123.46 |", "| z | n/a |"]


# --------------------------------------------------------------------------- head_to_head
def _head_to_head():
    import head_to_head

    return head_to_head


def test_head_to_head_marks_default_to_thirds_of_the_budget():
    h2h = _head_to_head()
    assert h2h.parse_args([]).marks == [5.0, 10.0, 15.0]
    assert h2h.parse_args(["--minutes", "12", "--marks", "8", "4"]).marks == [4.0, 8.0, 12.0]  # the end is always a point
    quick = h2h.parse_args(["--quick", "--minutes", "15"])
    assert quick.minutes == 0.1 and quick.workers == 0 and quick.marks[-1] == 0.1
    assert h2h.parse_args(["--quick", "--marks", "0.05", "0.2"]).marks == [0.05, 0.1]  # none past the budget


def test_head_to_head_workers_auto_is_medsegs_own_rule():
    h2h = _head_to_head()
    from medseg.train.data import resolve_num_workers

    # auto: what data.num_workers=auto gives medseg on this CPU with the same threads, for every contender
    assert h2h.workers_for("auto", 2, cores=2) == 0
    assert h2h.workers_for("auto", 2, cores=8) == 2
    assert h2h.workers_for("auto", 4, cores=4) == 1
    assert h2h.parse_args([]).workers == resolve_num_workers("auto", "cpu", cores=os.cpu_count(), threads=2)
    assert h2h.parse_args(["--workers", "3"]).workers == 3
    assert h2h.parse_args(["--quick", "--workers", "3"]).workers == 0
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit, match="--workers"):
            h2h.parse_args(["--workers", bad])


def test_head_to_head_markdown_lists_scores_curve_and_skips():
    h2h = _head_to_head()
    args = h2h.parse_args(["--minutes", "15"])
    curve = [{"mark_min": m, "at_min": m + 0.01, "steps": 10 * m, "test_dice": {"liver": 0.1 * m / 5, "spleen": 0.05}}
             for m in (5.0, 10.0, 15.0)]
    row = {"test_dice": {"liver": 0.3, "spleen": 0.05}, "test_hd95": {"liver": 12.5, "spleen": float("inf")},
           "test_fg_mean_dice": 0.175, "steps": 150, "patches": 600, "patch_size": [64, 64, 64], "voxels": 600 * 64**3,
           "train_s": 900.0, "prep_s": 12.0, "infer_s": 3.0, "precision": "bf16", "curve": curve,
           "measured": {"commit": "abc1234", "date": "2026-11-29 10:28"}}
    md = h2h.markdown({"stock_monai": row, "nnunet": {"skipped": h2h.NNUNET_MISSING},
                       "medseg_unet": {"error": "RuntimeError: boom"}}, args)
    lines = md.splitlines()
    stock = next(ln for ln in lines if ln.startswith("| stock_monai | 0.3 | 0.05 | 0.175 | 12.50 | inf | 150 | 600 x 64x64x64"))
    assert "| 15.00 |" in stock and stock.endswith("| bf16 | abc1234 |")
    assert f"| nnunet | {h2h.NNUNET_MISSING} |" in md and "| medseg_unet | RuntimeError: boom |" in md
    assert "| contender | Dice liver / spleen @ 5 min | Dice liver / spleen @ 10 min | Dice liver / spleen @ 15 min |" in md
    assert "| stock_monai | 0.100 / 0.050 (5.0 min, 50.0 steps) | 0.200 / 0.050 (10.0 min, 100.0 steps) |" in md


def test_head_to_head_keep_others_keeps_the_rows_not_rerun_with_their_commit(tmp_path):
    h2h = _head_to_head()
    args = h2h.parse_args(["--minutes", "15", "--keep-others"])
    with pytest.raises(SystemExit, match="not found"):
        h2h.kept_rows(tmp_path, args, ["medseg_attention"])
    old = {"dataset": "organs", "minutes": 15.0, "marks": [5.0, 10.0, 15.0],
           "results": {"stock_monai": {"steps": 1}, "medseg_attention": {"steps": 2},
                       "nnunet": {"steps": 3, "measured": {"commit": "0ld0ne", "date": "d0"}}},
           "meta": {"commit": "d1c3d59", "date": "2026-11-29 10:28"}}
    (tmp_path / "head_to_head.json").write_text(json.dumps(old))
    kept = h2h.kept_rows(tmp_path, args, ["medseg_attention"])
    assert list(kept) == ["stock_monai", "nnunet"]  # the rerun contender's old row is dropped
    assert kept["stock_monai"] == {"steps": 1, "measured": {"commit": "d1c3d59", "date": "2026-11-29 10:28"}}
    assert kept["nnunet"]["measured"]["commit"] == "0ld0ne"  # a row's own commit wins over the file's
    with pytest.raises(SystemExit, match="dataset / minutes / marks"):
        h2h.kept_rows(tmp_path, h2h.parse_args(["--minutes", "10"]), ["medseg_attention"])
    named = h2h.parse_args(["--minutes", "15", "--keep-others", "--name", "head_to_head_fp32"])
    with pytest.raises(SystemExit, match="head_to_head_fp32.json not found"):  # --name: its own file
        h2h.kept_rows(tmp_path, named, ["medseg_attention"])
    (tmp_path / "head_to_head_fp32.json").write_text(json.dumps({**old, "results": {"nnunet": {"steps": 9}}}))
    assert h2h.kept_rows(tmp_path, named, ["medseg_attention"])["nnunet"]["steps"] == 9
    recorded = {**old, "threads": 2, "workers": 0}  # files written since 2026-12-06 record both
    (tmp_path / "head_to_head.json").write_text(json.dumps(recorded))
    same = h2h.parse_args(["--minutes", "15", "--keep-others", "--workers", "0"])
    assert list(h2h.kept_rows(tmp_path, same, ["medseg_attention"])) == ["stock_monai", "nnunet"]
    with pytest.raises(SystemExit, match="--workers 0, this run 1"):
        h2h.kept_rows(tmp_path, h2h.parse_args(["--minutes", "15", "--workers", "1"]), ["medseg_attention"])
    with pytest.raises(SystemExit, match="--threads 2, this run 4"):
        h2h.kept_rows(tmp_path, h2h.parse_args(["--minutes", "15", "--workers", "0", "--threads", "4"]), ["nnunet"])
    rows = h2h.merged(kept, {"medseg_unet": {"steps": 5}, "medseg_attention": {"steps": 4}})
    assert list(rows) == ["stock_monai", "medseg_unet", "medseg_attention", "nnunet"]  # the contenders' order


def test_head_to_head_nnunet_row_says_skipped_without_nnunetv2(tmp_path, monkeypatch):
    h2h = _head_to_head()
    for key in ("raw", "preprocessed", "results", "n_proc_DA", "def_n_proc", "compile"):
        monkeypatch.setenv(f"nnUNet_{key}", "")  # restored after the test
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 -> ModuleNotFoundError
    args = h2h.parse_args(["--child", "nnunet"])
    assert h2h.child_nnunet(args, tmp_path) == {"skipped": "skipped: nnunetv2 not installed (pip install -e '.[bench]')"}


def test_medseg_snapshots_saves_weights_past_each_mark_and_restores_the_engine(tmp_path, monkeypatch):
    import types

    import torch

    from medseg.train import engine

    h2h = _head_to_head()
    clock = iter([100.0, 100.0, 100.5, 101.5, 102.5, 200.0])  # loop start, then after steps 1..4, loop end
    monkeypatch.setattr(h2h.time, "perf_counter", lambda: next(clock))
    model = torch.nn.Linear(2, 1)

    def fake_loop(ctx, loader, stop):
        for _ in range(4):
            engine.train_step(ctx, None)  # the engine calls its step through the module global
            ctx.step += 1
        return "finished"

    monkeypatch.setattr(engine, "_loop", fake_loop)
    monkeypatch.setattr(engine, "train_step", lambda ctx, batch: None)
    ctx = types.SimpleNamespace(model=model, step=0)
    run = tmp_path / "run"
    with h2h.medseg_snapshots(run, [1 / 60, 2 / 60, 1.0]) as hook:  # marks at 1 s, 2 s; the end (1 min) is final.pt
        assert engine._loop(ctx, None, None) == "finished"
    assert engine._loop is fake_loop  # unwrapped again
    assert [(s["steps"], round(s["at_min"] * 60, 1)) for s in hook["snapshots"]] == [(3, 1.5), (4, 2.5)]
    assert hook["loop_s"] == 100.0
    saved = torch.load(hook["snapshots"][0]["run_dir"] / "checkpoints" / "final.pt", weights_only=True)
    assert torch.equal(saved["model"]["weight"], model.weight)
    assert not (tmp_path / "run_at1min").exists()  # the last mark is the run's own final.pt


def test_nnunet_budget_trainer_fits_the_schedule_snapshots_marks_and_stops_in_time(monkeypatch):
    """The clock logic of the nnU-Net contender on a simulated run: 2 s per iteration, 10 + validation per epoch."""
    pytest.importorskip("nnunetv2")
    import types

    import nnunet_budget as nb
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    saved = []
    monkeypatch.setattr(nnUNetTrainer, "__init__", lambda self, *a, **kw: None)  # no plans, data or network
    monkeypatch.setattr(nnUNetTrainer, "train_step", lambda self, batch: {"loss": 0.0})
    monkeypatch.setattr(nnUNetTrainer, "on_epoch_end", lambda self: setattr(self, "current_epoch", self.current_epoch + 1))
    monkeypatch.setattr(nnUNetTrainer, "save_checkpoint", lambda self, filename: saved.append(filename))
    clock = [0.0]
    monkeypatch.setattr(nb.time, "perf_counter", lambda: clock[0])
    trainer = nb.budget_trainer(1.0, marks_min=(0.25, 0.5, 1.0))(plans={}, configuration="3d_fullres", fold="all",
                                                                   dataset_json={}, device=None)
    assert (trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (10, 2)
    trainer.t0, trainer.current_epoch = 0.0, 0
    trainer.lr_scheduler = types.SimpleNamespace(max_steps=1000)
    trainer.snapshot = lambda name: Path(name)
    with pytest.raises(nb.BudgetSpent):
        for _ in range(10):
            for _ in range(10):
                clock[0] += 2.0
                trainer.train_step(None)
            clock[0] += 1.0  # pseudo-validation
            trainer.on_epoch_end()
    # epochs of 21 s: after the first, 1 + 39/21 -> 3 epochs cover the minute (the poly LR's length)
    assert trainer.epochs_run == 2 and trainer.lr_scheduler.max_steps == 3 == trainer.num_epochs
    # stop when the next iteration (at the mean so far, 58/28 s) would end past 60 s
    assert trainer.steps == 28 and trainer.train_s == 58.0
    assert [(s["mark_min"], round(s["at_min"] * 60, 6), s["steps"]) for s in trainer.snapshots] == [(0.25, 16.0, 8), (0.5, 31.0, 15)]
    trainer.save_checkpoint("out/checkpoint_best.pth")
    trainer.save_checkpoint("out/checkpoint_latest.pth")
    trainer.save_checkpoint("out/checkpoint_final.pth")
    assert saved == ["out/checkpoint_final.pth"]  # the per-epoch files are not written


@pytest.mark.slow
def test_head_to_head_quick_stock_and_medseg(tmp_path):
    """The whole benchmark on phantoms (~30 s on 2 cores): stock MONAI and one medseg variant, scored at each mark."""
    import json
    import subprocess

    import nibabel as nib
    import numpy as np

    cmd = [sys.executable, str(BENCH / "head_to_head.py"), "--quick", "--minutes", "0.05", "--contenders", "stock_monai",
           "medseg", "--variants", "unet", "--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "res")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    data = tmp_path / "work" / "quick" / "phantoms"
    names = {v: k for k, v in json.loads((data / "dataset.json").read_text())["labels"].items()}
    ref = np.unique(np.asarray(nib.load(next((data / "labelsTs").iterdir())).dataobj))
    scored = {names[int(v)] for v in ref if v != 0}
    assert len(scored) >= 2 and out["marks"] == pytest.approx([0.05 / 3, 0.1 / 3, 0.05])
    for name in ("stock_monai", "medseg_unet"):
        row = out["results"][name]
        assert set(row["test_dice"]) == scored and all(0.0 <= d <= 1.0 for d in row["test_dice"].values()), row
        edge = 32 if name == "stock_monai" else 64  # quick patches: the stock roi, medseg's 64^3 (its stem halves them)
        assert set(row["test_hd95"]) == scored and row["steps"] >= 1 and row["voxels"] == row["patches"] * edge**3
        assert [p["mark_min"] for p in row["curve"]] == out["marks"]
        for point in row["curve"]:
            assert set(point["test_dice"]) == scored and all(0.0 <= d <= 1.0 for d in point["test_dice"].values())
        steps = [p["steps"] for p in row["curve"]]
        assert steps == sorted(steps) and steps[-1] == row["steps"]
    md = (tmp_path / "res" / "head_to_head.md").read_text()
    assert "| stock_monai |" in md and "| medseg_unet |" in md and "@ 0.05 min" in md


@pytest.mark.slow
def test_head_to_head_quick_nnunet(tmp_path):
    """nnU-Net v2 end to end on phantoms (~1-2 min): its planner, the budget-bound trainer, its predictor."""
    import json
    import subprocess

    pytest.importorskip("nnunetv2")
    cmd = [sys.executable, str(BENCH / "head_to_head.py"), "--quick", "--contenders", "nnunet",
           "--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "res")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    row = out["results"]["nnunet"]
    assert "error" not in row and "skipped" not in row, row
    assert row["configuration"] == "3d_fullres" and row["steps"] >= 1 and row["epochs"] <= row["steps"] / 2  # 2 per epoch
    assert len(row["test_dice"]) >= 2 and all(0.0 <= d <= 1.0 for d in row["test_dice"].values())
    assert [p["mark_min"] for p in row["curve"]] == out["marks"]
    assert (tmp_path / "res" / "head_to_head.md").read_text().count("| nnunet |") == 2  # table and curve


def test_recorded_command_lines_hold_no_machine_paths():
    """meta_now's argv (the published "Reproduce" provenance) writes absolute paths relative to the repository."""
    shared = _common.ROOT.parent / "shared" / "data" / "x.nii.gz"
    tmp_w = Path(tempfile.gettempdir()) / "w"
    meta = _common.meta_now(1, argv=["benchmarks/x.py", "--work-dir", str(tmp_w), str(shared), "--minutes", "15"])
    work = "$TMPDIR/w" if os.path.commonpath([str(tmp_w), str(_common.ROOT.parent)]) != str(_common.ROOT.parent) else "../w"
    assert meta["argv"] == ["benchmarks/x.py", "--work-dir", work, "../shared/data/x.nii.gz", "--minutes", "15"]
    assert not any(a.startswith("/") for a in meta["argv"])


def test_reproduce_lines_hold_no_machine_paths(tmp_path):
    """write_results publishes the command with its absolute paths made public, whichever script built it."""
    tmp_w = Path(tempfile.gettempdir()) / "w"
    shared = _common.ROOT.parent / "shared" / "data" / "x.nii.gz"
    work = "$TMPDIR/w" if os.path.commonpath([str(tmp_w), str(_common.ROOT.parent)]) != str(_common.ROOT.parent) else "../w"
    cmd = f"python benchmarks/x.py --work-dir {tmp_w} --image {shared} --minutes 15"
    assert _common.public_command(cmd) == f"python benchmarks/x.py --work-dir {work} --image ../shared/data/x.nii.gz --minutes 15"
    md, _ = _common.write_results("x", "X", "body", {}, _common.meta_now(1), command=cmd, out_dir=tmp_path)
    line = next(ln for ln in md.read_text().splitlines() if ln.startswith("Reproduce:"))
    assert str(tmp_w) not in line and work in line and "../shared/data/x.nii.gz" in line


def test_real_ct_study_table_shows_where_gate_maps_look():
    import real_ct_study

    loc = {"gate/level1": {"fg": {"ratio": 1.0, "energy_fraction": 0.07, "volume_fraction": 0.07}, "1": {"ratio": 9.0}},
           "gate/level0": {"fg": {"ratio": 3.456, "energy_fraction": 0.2, "volume_fraction": 0.0714}}}
    assert real_ct_study.gate_cell(loc) == "gate/level1 1.00 (0.07 / 0.07); gate/level0 3.46 (0.20 / 0.07)"
    assert real_ct_study.gate_cell({}) == "-"
    row = {"test_dice": {"liver": 0.5}, "test_fg_mean_dice": 0.5, "val_dice_train_case": 0.4, "train_s": 60.0,
           "patches": 10, "infer_s_per_case": 2.0}
    plain = real_ct_study.markdown({"organs": {"unet": row}}, 1, "setup")
    assert "gate maps" not in plain  # no column without maps
    md = real_ct_study.markdown({"organs": {"unet": {**row, "gate_localisation": {}},
                                            "attention": {**row, "gate_localisation": loc}}}, 1, "setup")
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0].endswith("| gate maps, test fg: in/out ratio (energy / volume fraction) |")
    assert lines[1].endswith("| - |") and lines[2].endswith("| gate/level1 1.00 (0.07 / 0.07); gate/level0 3.46 (0.20 / 0.07) |")
    assert "1.00 = open everywhere" in md


def test_real_ct_study_mean_of_seeds_and_hd95_columns():
    import real_ct_study

    loc0 = {"gate/level0": {"fg": {"ratio": 2.0, "energy_fraction": 0.2, "volume_fraction": 0.1}}}
    loc1 = {"gate/level0": {"fg": {"ratio": 4.0, "energy_fraction": 0.4, "volume_fraction": 0.1}}}
    base = {"val_dice_train_case": 0.4, "train_s": 60.0, "patches": 10, "infer_s_per_case": 2.0}
    s0 = {**base, "test_dice": {"liver": 0.8, "spleen": 0.2}, "test_fg_mean_dice": 0.5,
          "test_hd95": {"liver": 20.0, "spleen": 40.0}, "gate_localisation": loc0}
    s1 = {**base, "test_dice": {"liver": 0.6, "spleen": 0.0}, "test_fg_mean_dice": 0.3, "patches": 21,
          "test_hd95": {"liver": 30.0, "spleen": math.inf}, "gate_localisation": loc1}
    m = real_ct_study.mean_row([s0, s1, {"error": "RuntimeError: boom"}])
    assert m["seeds"] == 2 and m["test_dice"] == pytest.approx({"liver": 0.7, "spleen": 0.1})
    assert m["test_hd95"]["liver"] == pytest.approx(25.0) and m["test_hd95"]["spleen"] == math.inf
    assert m["test_fg_mean_dice"] == pytest.approx(0.4) and m["patches"] == 16 and isinstance(m["patches"], int)
    assert m["gate_localisation"]["gate/level0"]["fg"]["ratio"] == pytest.approx(3.0)
    assert real_ct_study.mean_row([{"error": "x"}]) == {"error": "every seed failed"}
    md = real_ct_study.markdown({"organs": {"attention seed 0": s0, "attention seed 1": s1,
                                            "attention mean (2 seeds)": m}}, 15, "setup")
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:6] == ["variant", "test Dice liver", "test Dice spleen", "test mean fg Dice",
                        "test HD95 liver (mm)", "test HD95 spleen (mm)"]
    mean_cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert mean_cells[:6] == ["attention mean (2 seeds)", "0.7", "0.1", "0.4", "25.00", "inf"]
    assert "average the seeds' rows" in md and "gate/level0 3.00 (0.30 / 0.10)" in lines[3]


def test_real_ct_study_merge_assembles_seed_rows_from_separate_runs(tmp_path):
    import real_ct_study

    base = {"val_dice_train_case": 0.9, "train_s": 900.0, "infer_s_per_case": 2.0, "test_hd95": {"lesion": 2.0}}
    def run(name, seed, dice, patches, commit, label="attention", extra=None):
        rows = {label: {**base, "seed": seed, "test_dice": {"lesion": dice}, "test_fg_mean_dice": dice, "patches": patches},
                **(extra or {})}
        meta = {"commit": commit, "date": f"2026-11-29 1{seed}:00", "argv": ["benchmarks/real_ct_study.py", "--seeds", str(seed)],
                "machine": {"cpu": "x", "cores": 2, "threads": 2, "bf16_native": True, "torch": "t", "monai": "m"}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"results": {"lung_lesion": rows}, "minutes": 15.0, "overrides": [], "meta": meta}))
        return path

    a = run("a", 1, 0.5, 30, "bbb")
    b = run("b", 0, 0.8, 41, "aaa", label="attention seed 0",
            extra={"attention seed 9": {**base, "seed": 9, "error": "x"}, "attention mean (2 seeds)": {"seeds": 2}})
    def load(*paths):
        return [(p.name, json.loads(p.read_text())) for p in paths]

    results, minutes, sources = real_ct_study.merge_runs(load(a, b))
    rows = results["lung_lesion"]
    assert minutes == 15.0 and [s["commit"] for s in sources] == ["bbb", "aaa"]
    # seed rows in seed order, the stale mean row dropped and recomputed over the seeds that ran
    assert list(rows) == ["attention seed 0", "attention seed 1", "attention seed 9", "attention mean (3 seeds)"]
    assert rows["attention seed 0"]["measured"] == {"commit": "aaa", "date": "2026-11-29 10:00"}
    mean = rows["attention mean (3 seeds)"]
    assert mean["seeds"] == 2 and mean["test_dice"]["lesion"] == pytest.approx(0.65) and mean["patches"] == 36
    with pytest.raises(ValueError, match="seed 1 is in an earlier file"):
        real_ct_study.merge_runs(load(a, a))
    other = tmp_path / "c.json"
    other.write_text(json.dumps({**json.loads(a.read_text()), "minutes": 5.0}))
    with pytest.raises(ValueError, match="different budgets"):
        real_ct_study.merge_runs(load(b, other))

    assert real_ct_study.main(["--merge", str(a), str(b), "--results", str(tmp_path / "out"), "--name", "merged"]) == 0
    md = (tmp_path / "out" / "merged.md").read_text()
    assert "| attention mean (3 seeds) | 0.65 |" in md and "48x48x48 patches" in md  # the lesion config's setup
    assert "commit `bbb`, 2026-11-29 11:00" in md and "Measured on: commit `bbb, aaa`" in md


def test_real_ct_study_seeds_option():
    import real_ct_study

    assert real_ct_study.parse_args([]).seeds is None
    assert real_ct_study.parse_args(["--seeds", "0", "1"]).seeds == [0, 1]


def test_train_speed_layouts_summary():
    import train_speed

    rows = [{"model": "attention", "precision": "fp32", "layout": "contiguous", "patches_per_s": 2.0,
             "s_per_step": 1.0, "s_per_step_median": 1.2},
            {"model": "attention", "precision": "fp32", "layout": "channels_last", "patches_per_s": 2.5,
             "s_per_step": 0.8, "s_per_step_median": 0.8},
            {"model": "attention", "precision": "fp32", "layout": "channels_last_stock_norm", "patches_per_s": 2.2,
             "s_per_step": 0.9, "s_per_step_median": 0.88},
            {"model": "monai_attention", "precision": "fp32", "layout": "contiguous", "patches_per_s": 1.0,
             "s_per_step": 2.0, "s_per_step_median": 2.0},
            {"model": "monai_attention", "precision": "fp32", "layout": "channels_last", "patches_per_s": 4.0,
             "s_per_step": 0.5, "s_per_step_median": 0.5}]
    s = train_speed.summarize(rows)
    assert s["attention_fp32_channels_last_gain"] == pytest.approx(1.5)  # the medians' ratio
    assert s["attention_fp32_norm_backward_gain"] == pytest.approx(1.1)  # stock-norm median over channels_last's
    assert "monai_attention_fp32_norm_backward_gain" not in s  # no stock-norm row for it
    assert s["attention_fp32_channels_last_stock_norm_patches_per_s"] == 2.2
    assert s["attention_fp32_channels_last_patches_per_s"] == 2.5 and s["attention_fp32_patches_per_s"] == 2.0
    assert s["attention_fp32_vs_monai_attention"] == pytest.approx(2.0)  # contiguous against contiguous


def test_train_speed_quick_layouts_same_losses(tmp_path):
    import subprocess

    cmd = [sys.executable, str(BENCH / "train_speed.py"), "--quick", "--models", "unet", "--precisions", "fp32",
           "--layouts", "contiguous", "channels_last", "channels_last_stock_norm", "--steps", "2",
           "--results", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["unet_fp32_channels_last_gain"] > 0 and summary["unet_fp32_norm_backward_gain"] > 0
    rows = json.loads((tmp_path / "train_speed.json").read_text())["rows"]
    assert [r["layout"] for r in rows] == ["contiguous", "channels_last", "channels_last_stock_norm"]
    # the layout and the norm's backward change the speed, not the arithmetic: same patches, same weights, same losses
    assert rows[1]["loss_last"] == pytest.approx(rows[0]["loss_last"], rel=1e-4)
    assert rows[2]["loss_last"] == pytest.approx(rows[1]["loss_last"], rel=1e-4)


def test_native_bf16_tag_reads_the_machine_record():
    assert _common.native_bf16_tag({"machine": {"bf16_native": True}}) == "(native bf16: yes)"
    assert _common.native_bf16_tag({"machine": {"bf16_native": False}}) == "(native bf16: no)"
    assert _common.native_bf16_tag({"bf16_native": True}) == "(native bf16: no)"  # only machine.bf16_native counts
    meta = _common.meta_now(1)
    from medseg.runtime import cpu_supports_bf16

    assert _common.native_bf16_tag(meta) == f"(native bf16: {'yes' if cpu_supports_bf16() else 'no'})"


def test_unlabelled_ct_volumes_counts_classes_in_cm3_with_the_image_spacing(tmp_path):
    import numpy as np
    import SimpleITK as sitk
    import unlabelled_ct_volumes as U

    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2, "heart": 5}}))
    names = U.label_names(tmp_path / "dataset.json")
    assert names == {1: "liver", 2: "spleen", 5: "heart"}
    lab = np.zeros((4, 5, 6), np.uint8)  # (z, y, x)
    lab[0, 0, :6], lab[1, 1, :4] = 1, 1  # 10 liver voxels
    lab[3, 4, 3:] = 5  # 3 heart voxels
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing((0.5, 0.8, 2.0))  # x, y, z: 0.8 mm^3 = 0.0008 cm^3 per voxel
    img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))  # not RAS: volumes must not care
    sitk.WriteImage(img, str(tmp_path / "mask.nii.gz"))
    vol = U.class_volumes(tmp_path / "mask.nii.gz", names)
    assert vol["liver"] == pytest.approx(0.008) and vol["heart"] == pytest.approx(0.0024) and vol["spleen"] == 0.0


def test_unlabelled_ct_volumes_overlay_rows_per_run_and_colours(tmp_path):
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk
    import unlabelled_ct_volumes as U

    assert U.default_slices(48) == [2, 9, 15, 22]  # the lower half, where a chest CT's heart sits
    ct = np.full((6, 8, 10), 40, np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(ct), str(tmp_path / "ct.nii.gz"))
    masks = {}
    for run, cls in (("a", 1), ("b", 5)):
        lab = np.zeros(ct.shape, np.uint8)
        lab[2, 3, 4] = cls
        masks[run] = tmp_path / f"{run}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(masks[run]))
    names = {1: "liver", 5: "heart"}
    assert U.overlay(tmp_path / "ct.nii.gz", masks, names, [2, 4], tmp_path / "o.png") == [2, 4]
    png = plt.imread(tmp_path / "o.png")[..., :3]
    assert png.shape == (2 * 8, 2 * 10, 3)  # one row per run, one column per slice
    grey = png[0, 0]
    assert list(grey) == pytest.approx([0.5, 0.5, 0.5], abs=0.01)  # 40 HU: the window's middle, grey
    red, yellow = png[3, 4], png[8 + 3, 4]
    assert red[0] > 0.7 and red[1] < 0.4 and red[2] < 0.4  # run a: liver
    assert yellow[0] > 0.7 and yellow[1] > 0.7 and yellow[2] < 0.4  # run b: heart
    assert png[3, 10 + 4] == pytest.approx(grey, abs=0.01)  # slice 4 holds no label
    bad = tmp_path / "bad.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 8, 10), np.uint8)), str(bad))
    with pytest.raises(ValueError, match="not the CT's"):
        U.overlay(tmp_path / "ct.nii.gz", {"bad": bad}, names, [0], tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"slices \[6\] outside 0..5"):
        U.overlay(tmp_path / "ct.nii.gz", masks, names, [2, 6], tmp_path / "q.png")  # 6 slices along the third axis
    assert not (tmp_path / "q.png").exists()
    with pytest.raises(SystemExit) as exc:
        U.parse_args(["--runs", str(tmp_path), "--slices", "2"])  # --slices only chooses the overlay's slices
    assert exc.value.code == 2
    assert U.parse_args(["--runs", str(tmp_path), "--slices", "2", "--overlay", "o.png"]).slices == [2]


def test_unlabelled_ct_volumes_reuses_only_the_images_own_mask(tmp_path):
    import unlabelled_ct_volumes as U
    from medseg.errors import MedsegError

    image = tmp_path / "chest.nrrd"
    image.write_bytes(b"")  # never read: the mask is there, or the run fails to load first
    out = tmp_path / "pred"
    out.mkdir()
    (out / "other_ct.nii.gz").write_bytes(b"")  # another image's mask in the same folder is not this one's
    with pytest.raises(MedsegError, match="no_run: run directory not found"):
        U.predict(tmp_path / "no_run", image, out)  # so it segments: the missing run fails
    (out / "chest.nii.gz").write_bytes(b"")
    assert U.predict(tmp_path / "no_run", image, out) == (out / "chest.nii.gz").resolve()  # medseg infer's own name


def test_augment_cost_summary_arithmetic_and_skips():
    import augment_cost
    from medseg.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "real_organs.yaml")
    variants, skipped = augment_cost.variants_of(cfg, ["copy_paste", "label_shift", "thick_slices"])
    assert set(variants) == {"recipe", "crop only", "label_shift off", "label_shift always", "thick_slices off",
                             "thick_slices always"}
    assert "copy_paste_classes" in skipped["copy_paste"]  # the organ recipe pastes nothing
    assert variants["label_shift always"].train.augment.p_label_shift == 1.0
    assert variants["label_shift off"].train.augment.p_label_shift == 0.0
    assert variants["label_shift off"].train.augment.p_scale == cfg.train.augment.p_scale  # only its own key changes
    assert all(getattr(variants["crop only"].train.augment, k) == 0.0 for k in augment_cost.AUGMENTS.values())
    assert cfg.train.augment.p_label_shift == 0.3  # the recipe itself is not touched

    ms = {"recipe": 60.0, "crop only": 4.0, "label_shift off": 50.0, "label_shift always": 80.0,
          "thick_slices off": 60.0, "thick_slices always": 70.0}
    s = augment_cost.summarise(ms, cfg, skipped, 0.5, ["copy_paste", "label_shift", "thick_slices"])
    ls = s["augments"]["label_shift"]
    assert ls["ms_per_application"] == pytest.approx(30.0)
    assert ls["ms_per_batch_at_p"] == pytest.approx(0.3 * 30.0 * 2)  # p x per-application x batch 2
    assert ls["share_of_step"] == pytest.approx(0.018 / 0.5)
    assert s["augments"]["thick_slices"]["ms_per_batch_at_p"] == 0.0  # off in the recipe: costs nothing there
    ms_neg = {**ms, "thick_slices always": 59.0}  # a noise-sized negative difference
    neg = augment_cost.summarise(ms_neg, cfg, skipped, 0.5, ["thick_slices"])["augments"]["thick_slices"]
    assert neg["ms_per_application"] == pytest.approx(-1.0) and str(neg["ms_per_batch_at_p"]) == "0.0"
    assert s["recipe_s_per_batch"] == pytest.approx(0.12)
    assert s["data_share_of_step"] == pytest.approx(0.12 / 0.62)
    assert s["augments"]["copy_paste"] == {"p": 0.0, "skipped": skipped["copy_paste"]}
    assert augment_cost.summarise(ms, cfg, skipped, None, ["label_shift"])["data_share_of_step"] is None


def test_augment_cost_quick_runs_and_cuts_the_same_patches(tmp_path):
    import augment_cost

    assert augment_cost.main(["--quick", "--no-step", "--only", "label_shift", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "augment_cost_organs.json").read_text())
    assert set(data["variant_ms_per_patch"]) == {"recipe", "crop only", "label_shift off", "label_shift always"}
    assert all(v > 0 for v in data["variant_ms_per_patch"].values())
    assert data["step_s"] is None and data["patches"] == 2
    assert "Reproduce: `python benchmarks/augment_cost.py --quick" in (tmp_path / "augment_cost_organs.md").read_text()
    assert data["z_halo"] == 0  # a 3-D net cuts the patch itself


def test_augment_cost_cuts_a_25d_nets_z_halo_as_training(tmp_path):
    import augment_cost

    assert augment_cost.main(["--quick", "--no-step", "--variant", "unet25d", "--only", "rotate",
                              "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "augment_cost_organs.json").read_text())
    assert data["z_halo"] >= 1  # k stacked slices: (k - 1) / 2 more at each z end, as PatchDataset cuts them in training


def test_a_benchmark_imports_the_medseg_of_its_own_checkout(tmp_path):
    """Run from another clone or a git worktree, a benchmark must measure that checkout's medseg, not the
    folder an editable install points `import medseg` at (the results name this checkout's commit)."""
    import shutil
    import subprocess

    clone = tmp_path / "clone"
    (clone / "benchmarks").mkdir(parents=True)
    shutil.copy(BENCH / "_common.py", clone / "benchmarks" / "_common.py")
    (clone / "medseg").mkdir()
    (clone / "medseg" / "__init__.py").write_text("CHECKOUT = 'clone'\n")
    script = clone / "benchmarks" / "probe.py"
    script.write_text("import sys\nfrom pathlib import Path\nsys.path.insert(0, str(Path(__file__).resolve().parent))\n"
                      "import _common  # noqa: E402\nimport medseg  # noqa: E402\nprint(medseg.__file__)\n")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == (clone / "medseg" / "__init__.py").resolve()
