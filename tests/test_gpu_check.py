"""benchmarks/gpu_check.py without a GPU: the no-CUDA exit, --help, and the CPU-side judgements
(losses falling, GradScaler state, mask agreement, resume continuity, ratios, check wrapper, report),
with hand-made numbers; plus the ``MEDSEG_BUFFER_DEVICE`` switch of the sliding window it relies on."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check as gc  # noqa: E402

from medseg.errors import ConfigError  # noqa: E402
from medseg.infer import sliding  # noqa: E402


# --------------------------------------------------------------------------- command line
def test_without_cuda_prints_skipped_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA device, even on a GPU machine
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out-dir", str(tmp_path / "res")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped: no CUDA device" in lines
    assert json.loads(lines[-1]) == {"skipped": "no CUDA device"}
    assert not (tmp_path / "res").exists()  # no result files from a run that checked nothing


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        gc.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--image", "--precision", "--out-dir", "--work-dir", "--threads", "--workers", "--max-minutes"):
        assert flag in out, flag
    assert "skipped: no CUDA device" in out and "--nccl-child" not in out  # internal flags stay hidden


# --------------------------------------------------------------------------- judgements
def test_judge_losses_needs_finite_and_falling():
    assert gc.judge_losses([2.0, 1.5, 1.2]) == (True, "loss 2.0000 -> 1.2000")
    ok, why = gc.judge_losses([2.0, 1.95])  # 1.95 is not below 0.95 x 2.0 = 1.9
    assert not ok and "did not fall" in why
    assert gc.judge_losses([2.0, 1.89])[0]
    ok, why = gc.judge_losses([2.0, float("inf"), 0.1])
    assert not ok and "epoch 2" in why
    assert not gc.judge_losses([float("nan"), 1.0])[0]
    assert not gc.judge_losses([1.0])[0]  # one epoch cannot show a fall
    assert gc.judge_losses([2.0, 1.7], max_ratio=0.9)[0] and not gc.judge_losses([2.0, 1.81], max_ratio=0.9)[0]


def test_judge_scaler_on_only_in_fp16():
    on = {"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 40}
    assert gc.judge_scaler(on, "fp16")[0]
    assert not gc.judge_scaler({}, "fp16")[0]
    assert not gc.judge_scaler({**on, "scale": float("inf")}, "fp16")[0]
    assert gc.judge_scaler({}, "bf16") == (True, "GradScaler off")
    assert not gc.judge_scaler(on, "bf16")[0]
    # what torch writes: a disabled scaler's state is empty, an enabled one's has the scale
    assert torch.amp.GradScaler("cpu", enabled=False).state_dict() == {}


def test_best_throughput_skips_the_first_epoch():
    assert gc.best_throughput([{"patches_per_s": 50.0}, {"patches_per_s": 30.0}, {"patches_per_s": 20.0}]) == 30.0
    assert gc.best_throughput([{"patches_per_s": 10.0}]) == 10.0
    assert math.isnan(gc.best_throughput([]))


def test_mask_agreement_by_hand():
    a = np.array([0, 1, 1, 2, 2, 2])
    b = np.array([0, 1, 2, 2, 2, 0])
    res = gc.mask_agreement(a, b)
    # label 1: |a|=2, |b|=1, overlap 1 -> 2/3; label 2: |a|=3, |b|=3, overlap 2 -> 4/6; 4 of 6 voxels equal
    assert res["dice"] == pytest.approx({1: 2 / 3, 2: 2 / 3})
    assert res["mean_dice"] == pytest.approx(2 / 3) and res["equal_fraction"] == pytest.approx(4 / 6)
    assert res["labels"] == [1, 2]
    c = np.zeros((4, 4, 4), np.uint8)
    c[1:3, 1:3, 1:3] = 5
    assert gc.mask_agreement(c, c)["mean_dice"] == 1.0 and gc.mask_agreement(c, c)["labels"] == [5]
    d = c.copy()
    d[1, 1, 1] = 0  # one of 8 voxels lost: Dice 2*7/(8+7)
    assert gc.mask_agreement(c, d)["mean_dice"] == pytest.approx(14 / 15)
    assert gc.mask_agreement(np.zeros(5, int), np.zeros(5, int))["mean_dice"] == 1.0  # no foreground in either
    assert gc.mask_agreement(np.array([3, 0]), np.array([0, 0]))["dice"] == {3: 0.0}
    with pytest.raises(ValueError, match="shapes differ"):
        gc.mask_agreement(np.zeros((2, 2)), np.zeros((2, 3)))


def _history(losses_lrs, start=0):
    return [{"epoch": start + i, "loss": loss, "lr": lr} for i, (loss, lr) in enumerate(losses_lrs)]


SAVED = {"step": 13, "lr": 0.0123, "history": _history([(1.0, 0.01)])}  # SIGTERM 3 steps into epoch 2 (10 steps/epoch)
RESUMED = {"step": 40, "resumed_at_step": 13,
           "history": _history([(1.0, 0.01), (0.8, 0.0123), (0.7, 0.006), (0.6, 0.003)])}


def test_judge_resume_accepts_a_continuation():
    assert gc.judge_resume(SAVED, RESUMED, iters_per_epoch=10, epochs=4, expected_lr=0.0123) == (True, [])


@pytest.mark.parametrize("change,expect", [
    ({"resumed_at_step": 10}, "resumed at step 10"),
    ({"resumed_at_step": None}, "no 'resumed from"),
    ({"step": 35}, "ended at step 35"),
    ({"history": _history([(0.9, 0.01), (0.8, 0.0123), (0.7, 0.006), (0.6, 0.003)])}, "does not start with"),
    ({"history": _history([(1.0, 0.01), (0.8, 0.01), (0.7, 0.006), (0.6, 0.003)])}, "resumed with lr 0.01,"),
    ({"history": _history([(1.0, 0.01), (0.8, 0.0123), (0.6, 0.003)])}, "are not [0, 1, 2, 3]"),
])
def test_judge_resume_names_what_broke(change, expect):
    ok, problems = gc.judge_resume(SAVED, {**RESUMED, **change}, iters_per_epoch=10, epochs=4)
    assert not ok and any(expect in p for p in problems), problems


def test_judge_resume_sigterm_in_the_last_iteration_of_an_epoch():
    # stopped at step 20 = the end of epoch 1, whose record the engine never wrote; resumed with epoch 2
    saved = {"step": 20, "lr": 0.005, "history": _history([(1.0, 0.01)])}
    resumed = {"step": 40, "resumed_at_step": 20, "history": _history([(1.0, 0.01)]) + _history([(0.7, 0.005), (0.6, 0.002)], 2)}
    assert gc.judge_resume(saved, resumed, iters_per_epoch=10, epochs=4) == (True, [])
    missing = {**resumed, "history": _history([(1.0, 0.01)]) + _history([(0.6, 0.002)], 3)}
    ok, problems = gc.judge_resume(saved, missing, iters_per_epoch=10, epochs=4)
    assert not ok and any("are not [0, 2, 3]" in p for p in problems)


def test_judge_resume_checks_the_schedule_and_the_checkpoint():
    ok, problems = gc.judge_resume(SAVED, RESUMED, iters_per_epoch=10, epochs=4, expected_lr=0.0125)
    assert not ok and problems == ["resumed with lr 0.0123, the schedule gives 0.0125 at step 13"]
    finished = {**SAVED, "step": 40}  # the SIGTERM came too late: nothing to resume
    assert any("not inside the run" in p for p in gc.judge_resume(finished, RESUMED, iters_per_epoch=10, epochs=4)[1])
    early = {**SAVED, "history": []}  # stopped before its first epoch was logged
    assert any("logged no epoch" in p for p in gc.judge_resume(early, RESUMED, iters_per_epoch=10, epochs=4)[1])
    wrong_epoch = {**RESUMED, "history": _history([(1.0, 0.01), (0.8, 0.0123), (0.7, 0.006), (0.6, 0.003)])}
    wrong_epoch["history"][1]["epoch"] = 2
    assert any("first resumed epoch is 2, expected 1" in p
               for p in gc.judge_resume(SAVED, wrong_epoch, iters_per_epoch=10, epochs=4)[1])


def test_ratios_for_rates_and_seconds():
    assert gc.ratios({"a": 10.0, "b": 4.0}, [("a", "b")]) == {"a_vs_b": 2.5}
    assert gc.ratios({"a": 2.0, "b": 7.0}, [("a", "b")], higher_is_better=False) == {"a_vs_b": 3.5}
    assert gc.ratios({"a": 2.0, "b": 0.0, "c": float("nan")}, [("a", "b"), ("a", "c"), ("a", "missing")]) == {}


def test_log_lines_the_checks_parse():
    assert gc.EPOCH_LINE.search("2026-11-27 17:00:01 INFO epoch 1/30  loss 0.9123 (dice_ce 0.9123, aux 0.0000)  lr 3.00e-03")
    assert not gc.EPOCH_LINE.search("2026-11-27 17:00:01 INFO resumed from run/checkpoints/latest.pt at epoch 2")
    line = "2026-11-27 17:00:09 INFO resumed from /tmp/r/checkpoints/latest.pt at epoch 2 (step 13, best mean fg Dice -1.0000)"
    assert gc.RESUMED_LINE.findall(line) == [("2", "13")]


# --------------------------------------------------------------------------- wrapper and report
def test_run_check_reports_failures_and_keeps_going():
    lines = []
    ok = gc.run_check("fine", lambda: {"result": "good", "_internal": 1}, out=lines.append)
    assert ok["status"] == "ok" and ok["details"] == {"result": "good", "_internal": 1} and ok["error"] is None
    assert lines[0] == "[gpu_check] fine ..." and lines[1].startswith("[gpu_check] fine: ok (")

    def boom():
        raise ValueError("boom")

    bad = gc.run_check("broken", boom, out=lines.append)
    assert bad["status"] == "failed" and bad["error"].splitlines()[0] == "ValueError: boom"
    assert "test_gpu_check.py:" in bad["error"] and "in boom" in bad["error"]
    assert "    ValueError: boom" in lines[-1]

    def judged():
        raise gc.CheckFailed("masks disagree", {"mean_dice": 0.5})

    failed = gc.run_check("judged", judged, out=lines.append)
    assert failed["status"] == "failed" and failed["error"] == "masks disagree" and failed["details"] == {"mean_dice": 0.5}

    def skip():
        raise gc.CheckSkipped("image absent")

    assert gc.run_check("skip", skip, out=lines.append)["status"] == "skipped"
    called = []
    late = gc.run_check("late", lambda: called.append(1), deadline=0.0, out=lines.append)
    assert late["status"] == "skipped" and "time budget" in late["error"] and called == []


def _checks():
    return [
        {"name": "environment", "status": "ok", "seconds": 0.5, "error": None, "details": {"result": "H100, 79.1 GB"}},
        {"name": "train ours fp16", "status": "ok", "seconds": 12.0, "error": None,
         "details": {"result": "loss 1.2 -> 0.6 | fast", "summary": {"train_ours_fp16_patches_per_s": 41.5}}},
        {"name": "torchrun resume", "status": "failed", "seconds": 3.0, "details": {},
         "error": "RuntimeError: torchrun exited 1\n  at gpu_check.py:10 in check_resume"},
        {"name": "infer prepare", "status": "skipped", "seconds": 0.0, "details": {}, "error": "image not found"},
    ]


def test_summarize_lists_statuses_and_numbers():
    s = gc.summarize(_checks())
    assert s == {"ok": False, "passed": ["environment", "train ours fp16"], "failed": ["torchrun resume"],
                 "skipped": ["infer prepare"], "train_ours_fp16_patches_per_s": 41.5}
    assert gc.summarize(_checks()[:2])["ok"] is True


def test_build_report_by_hand():
    env = {"gpu": "NVIDIA H100 80GB HBM3", "memory_gb": 79.1, "capability": "9.0", "torch": "2.13.0", "cuda": "12.8",
           "cudnn": 91000, "nccl": "2.27.3", "monai": "1.6.0"}
    table = {"title": "Training", "header": ["model", "patches/s"], "rows": [["ours", 41.5], ["monai_unet", 20.25]]}
    md = gc.build_report(env, _checks(), [table, {"title": "Empty", "header": ["x"], "rows": []}], "a note")
    assert "| NVIDIA H100 80GB HBM3 | 79.10 | 9.0 | 2.13.0 | 12.8 | 91000 | 2.27.3 | 1.6.0 |" in md
    assert "| train ours fp16 | ok | 12.00 | loss 1.2 -> 0.6 / fast |" in md  # '|' would break the table
    assert "| torchrun resume | FAILED | 3 | RuntimeError: torchrun exited 1 |" in md
    assert "| infer prepare | skipped | 0 | image not found |" in md
    assert "- **torchrun resume**\n\n```\nRuntimeError: torchrun exited 1\n  at gpu_check.py:10 in check_resume\n```" in md
    assert "Training:\n\n| model | patches/s |\n|---|---|\n| ours | 41.50 |\n| monai_unet | 20.25 |" in md
    assert "Empty" not in md and md.endswith("a note")


def test_scrub_replaces_machine_paths():
    obj = {"error": "cannot read /tmp/w1/run/latest.pt", "files": ["/repo/benchmarks/x.json", "/elsewhere/y"], "n": 3}
    out = gc.scrub(obj, {"/tmp/w1": "<work>", "/repo": ".", "/": ".."})  # "/" (a checkout at the root's child) is ignored
    assert out == {"error": "cannot read <work>/run/latest.pt", "files": ["./benchmarks/x.json", "/elsewhere/y"], "n": 3}
    assert gc.scrub({"p": "/a/b/c"}, {"/a": "..", "/a/b": "."}) == {"p": "./c"}  # the longer path first


# --------------------------------------------------------------------------- the sliding window's buffer switch
@pytest.mark.parametrize("value,expected", [("cpu", torch.device("cpu")), (" CUDA:1 ", torch.device("cuda", 1)),
                                            ("auto", None), ("", None)])
def test_buffer_device_override(monkeypatch, value, expected):
    monkeypatch.setenv("MEDSEG_BUFFER_DEVICE", value)
    assert sliding.buffer_device_override() == expected
    monkeypatch.delenv("MEDSEG_BUFFER_DEVICE")
    assert sliding.buffer_device_override() is None


def test_sliding_window_reads_the_buffer_switch(monkeypatch):
    model = torch.nn.Conv3d(1, 2, 1)
    image = torch.randn(1, 8, 8, 8)
    monkeypatch.setenv("MEDSEG_BUFFER_DEVICE", "gpu")
    with pytest.raises(ConfigError, match="MEDSEG_BUFFER_DEVICE='gpu' is not a device"):
        sliding.sliding_window_predict(model, image, roi_size=(8, 8, 8))
    monkeypatch.setenv("MEDSEG_BUFFER_DEVICE", "cpu")
    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda rec: records.append(rec.getMessage())
    logger = logging.getLogger("medseg.infer.sliding")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        out = sliding.sliding_window_predict(model, image, roi_size=(8, 8, 8))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert out.shape == (2, 8, 8, 8) and out.device.type == "cpu"
    assert [gc.BUFFER_LINE.findall(r) for r in records if "stitching" in r] == [["cpu"]]  # what gpu_check parses


# --------------------------------------------------------------------------- configs and subprocess errors
@pytest.mark.parametrize("name", sorted(gc.TRAIN_MODELS))
def test_train_config_builds_every_model(name, tmp_path):
    from medseg.nn import build_model

    cfg = gc.train_config(tmp_path, arch=gc.TRAIN_MODELS[name], precision="fp16", channels_last=True, epochs=4, iters=10,
                          patch=(32, 32, 32), channels=(4, 8, 16, 32, 64), workers=0)
    assert (cfg.train.precision, cfg.train.device, cfg.train.channels_last, cfg.train.val_interval) == ("fp16", "cuda", True, 4)
    model = build_model(cfg.model, num_classes=3, spacing=(1.5, 1.5, 1.5))  # MONAI's nets refuse settings they ignore
    assert sum(p.numel() for p in model.parameters()) > 0


def test_run_proc_names_the_inner_error():
    code = "import sys; print('Traceback (most recent call last):', file=sys.stderr); raise ValueError('inner boom')"
    with pytest.raises(RuntimeError, match=r"exited 1: ValueError: inner boom"):
        gc.run_proc([sys.executable, "-c", code], timeout=60)


def test_reproduce_argv_drops_output_and_scratch_paths():
    argv = ["--max-minutes", "7.3", "--out-dir", "/root/out", "--work-dir=/tmp/w", "--quick", "--work-dir", "x"]
    assert gc.reproduce_argv(argv) == ["--max-minutes", "7.3", "--quick"]
    assert gc.reproduce_argv(["--image", "a.nii.gz"]) == ["--image", "a.nii.gz"]


def test_stock_infer_child_reports_its_stages_on_the_cpu(tmp_path):
    """The stock pipeline's time split (load/resample, net, invert/write) comes back with its total:
    the GPU figures say where the stock pipeline spends its seconds. Dry run on the CPU."""
    from medseg.data.phantoms import make_phantom_dataset

    make_phantom_dataset(tmp_path / "raw", n_train=1, n_test=0, seed=0, shape=(32, 32, 16))
    image = next((tmp_path / "raw" / "imagesTr").glob("*.nii.gz"))
    args = gc.parse_args(["--child-infer", "monai", "unet", "--device", "cpu", "--precision", "bf16", "--image",
                          str(image), "--out", str(tmp_path / "out"), "--repeats", "2", "--threads", "1"])
    args.precision = "fp32"  # the CLI offers the GPU precisions only; the CPU dry run needs no autocast
    res = gc.infer_child(args)
    assert len(res["times"]) == 2 and res["best_s"] == res["times"][1]
    stages = res["stages_s"]
    assert set(stages) == {"load_preprocess", "sliding_window", "invert_write"}
    assert all(v > 0 for v in stages.values())
    assert sum(stages.values()) == pytest.approx(res["best_s"], rel=1e-6)
    assert list((tmp_path / "out").glob("*.nii.gz"))
