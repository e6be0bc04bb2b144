"""The CUDA path, proven by one command on one GPU (at most ~8 minutes on an H100).

Checks, each reported as it runs (``[gpu_check] ...`` lines on stdout; the engines log to stderr):

1. **environment**: GPU name, memory, compute capability, torch / CUDA / cuDNN / NCCL / MONAI versions.
2. **train <model> <precision> [channels_last]**: ``medseg.train.train(cfg, run_dir)`` on CUDA on a small
   phantom dataset (``medseg.data.phantoms`` -> ``preprocess_dataset`` in a temp folder), a few dozen
   iterations each: ours (``configs/attention_unet3d.yaml``: additive attention gates, deep supervision)
   in fp16 (GradScaler) and bf16, ``train.channels_last`` off and on; MONAI ``UNet`` / ``AttentionUnet``
   (``model.arch=monai_unet`` / ``monai_attention_unet``, same widths) in both precisions. Judged: every
   epoch's loss finite, the last epoch's mean below 0.95x the first's, the GradScaler on in fp16 and off
   in bf16 (the checkpoint's ``scaler`` state). Reported: patches/s (best epoch after the first; the
   loader is included) and ours vs MONAI at the same precision.
3. **nccl ddp**: ``torchrun --nproc_per_node=1`` of this script's NCCL child: ``init_process_group("nccl")``,
   our attention U-Net in ``DistributedDataParallel(static_graph=True)`` (as ``medseg.train.distributed.
   wrap_ddp`` builds it), 3 fp16 + GradScaler steps, an ``all_reduce`` and an ``all_gather_object``.
   (``medseg train`` under ``torchrun --nproc_per_node=1`` joins no process group: world size 1.)
4. **torchrun resume**: ``torchrun --standalone --nproc_per_node=1 -m medseg train`` (fp16) as a
   subprocess; after its ``log.txt`` shows one epoch, SIGTERM to its process group (as a cluster
   scheduler sends it); then ``medseg train --out RUN --resume`` on CUDA. Judged (:func:`judge_resume`):
   the SIGTERM checkpoint is mid-run, the resumed run starts at its step (``log.txt``: "resumed from ...
   (step S") with its learning rate (the optimizer's, and the schedule's value at S), keeps the
   earlier epochs, and finishes every step.
5. **infer ...** (on ``--image``, default ``../shared/data/real_ct/organs/imagesTr/lidc0001_chest.nii.gz``;
   skipped with a message when absent): ``medseg infer`` of an untrained attention U-Net (widths
   16..256, the window the data layer plans at 1.5 mm) with the stitching buffers on the GPU and with
   the CPU fallback forced (``MEDSEG_BUFFER_DEVICE=cpu``, see ``medseg/infer/sliding.py``), each also
   with ``--tta``: the masks of the two buffer modes must agree (mean Dice >= 0.99), and the buffer
   device logged must be the one asked for. Then end-to-end seconds (load -> write, one subprocess per
   pipeline, CUDA initialised before the clock starts; first and fastest later run) of ours
   (``Predictor.from_run``) against the stock MONAI pipeline (``benchmarks/stock_monai.py``
   ``run_stock_pipeline``) moved to the GPU as MONAI's tutorials do it (net and input on the device,
   autocast) at the same precision.

A failing check is reported with a traceback summary and the others still run; the exit status
is 1 when any check failed. Results: ``benchmarks/results/gpu_check.{md,json}`` and, as the last
stdout line, a JSON object. Without CUDA it prints ``skipped: no CUDA device`` and exits 0.

    python benchmarks/gpu_check.py            # everything, ~6-8 min on one H100
    python benchmarks/gpu_check.py --quick    # shorter trainings, attention pair only, no repeats
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REAL_CT, RESULTS, ROOT, WIDTHS, make_run_dir, md_table, meta_now, plan_for_image  # noqa: E402
from _common import run_child, set_threads, write_results  # noqa: E402

DEFAULT_IMAGE = REAL_CT / "organs" / "imagesTr" / "lidc0001_chest.nii.gz"
INFER_LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "lung": 4, "heart": 5}
TRAIN_MODELS = {"ours": "unet", "monai_unet": "monai_unet", "monai_attention": "monai_attention_unet"}  # -> model.arch
LOSS_RATIO = 0.95  # the last epoch's mean loss must be below this fraction of the first's
DICE_MIN = 0.99  # masks of the GPU and CPU buffer modes
PREFIX = "[gpu_check]"


# --------------------------------------------------------------------------- pure judgements
class CheckFailed(Exception):
    """A check ran but its result is wrong; ``details`` are still reported."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class CheckSkipped(Exception):
    """A check that cannot run here (missing input, an earlier check it needs failed, no time left)."""


def judge_losses(losses: Sequence[float], max_ratio: float = LOSS_RATIO) -> tuple[bool, str]:
    """Per-epoch mean losses of one run: all finite, at least 2 epochs, the last ``< max_ratio`` x the first.

    Returns:
        ``(ok, reason)``; ``reason`` names the epoch or the two values.
    """
    values = [float(v) for v in losses]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        return False, f"loss not finite at epoch {bad[0] + 1}: {values[bad[0]]}"
    if len(values) < 2:
        return False, f"need at least 2 epochs to see the loss fall, got {len(values)}"
    first, last = values[0], values[-1]
    if not last < max_ratio * first:
        return False, f"loss did not fall: first epoch {first:.4f}, last {last:.4f} (need < {max_ratio:g}x the first)"
    return True, f"loss {first:.4f} -> {last:.4f}"


def judge_scaler(state: dict, precision: str) -> tuple[bool, str]:
    """A run's ``GradScaler`` state (the checkpoint's ``scaler``): on with a finite scale in fp16, off
    (``torch.amp.GradScaler(enabled=False).state_dict() == {}``) otherwise."""
    if precision == "fp16":
        scale = float(state.get("scale", float("nan"))) if state else float("nan")
        if not math.isfinite(scale) or scale <= 0:
            return False, f"fp16 needs the GradScaler on with a finite scale, got {state!r}"
        return True, f"GradScaler on, scale {scale:g}"
    if state:
        return False, f"{precision} needs no GradScaler, but its state is {state!r}"
    return True, "GradScaler off"


def best_throughput(history: Sequence[dict]) -> float:
    """Patches/s of a run: the best epoch after the first (warm-up, cuDNN autotuning, loader start)."""
    rates = [float(r["patches_per_s"]) for r in history]
    if not rates:
        return float("nan")
    return max(rates[1:]) if len(rates) > 1 else rates[0]


def mask_agreement(a, b) -> dict:
    """Per-label Dice between two integer masks of one shape, their mean over the foreground labels
    present in either, and the fraction of equal voxels.

    Args:
        a, b: integer label arrays (any shape, equal shapes), 0 = background.

    Returns:
        ``{"dice": {label: dice}, "mean_dice", "equal_fraction", "labels"}``; two masks without
        foreground have ``mean_dice`` 1.0 when equal, else 0.0.

    Raises:
        ValueError: the shapes differ.
    """
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    a, b = a.astype(np.int64).ravel(), b.astype(np.int64).ravel()
    k = int(max(a.max(initial=0), b.max(initial=0))) + 1
    conf = np.bincount(a * k + b, minlength=k * k).reshape(k, k)  # conf[i, j]: voxels a == i and b == j
    equal = float(np.trace(conf)) / max(a.size, 1)
    dice = {}
    for lab in range(1, k):
        na, nb = conf[lab].sum(), conf[:, lab].sum()
        if na + nb:
            dice[lab] = float(2 * conf[lab, lab] / (na + nb))
    mean = sum(dice.values()) / len(dice) if dice else (1.0 if equal == 1.0 else 0.0)
    return {"dice": dice, "mean_dice": mean, "equal_fraction": equal, "labels": sorted(dice)}


def judge_resume(saved: dict, resumed: dict, *, iters_per_epoch: int, epochs: int,
                 expected_lr: float | None = None, rel_tol: float = 1e-5) -> tuple[bool, list[str]]:
    """Did a run resumed after a SIGTERM continue where it stopped?

    Args:
        saved: the SIGTERM checkpoint (``latest.pt``): ``step``, ``lr`` (its optimizer's, i.e. the
            learning rate of the next step) and ``history`` (per-epoch records with ``epoch``, ``loss``).
        resumed: the resumed run's end: ``step``, ``history`` (earlier epochs included, as the engine
            keeps them) and ``resumed_at_step`` (from its ``log.txt``; ``None`` when not found).
        iters_per_epoch, epochs: the run's ``train.iters_per_epoch`` and ``train.epochs``.
        expected_lr: the schedule's learning rate at ``saved["step"]`` (skipped when ``None``).

    Returns:
        ``(ok, problems)``: one sentence per broken expectation. Every epoch must have its record,
        except one whose last iteration got the SIGTERM (the engine saves and stops before logging
        it; the resumed run starts with the next epoch).
    """
    problems = []
    step, total = int(saved["step"]), iters_per_epoch * epochs
    old, new = list(saved.get("history") or []), list(resumed.get("history") or [])
    if not old:
        problems.append("the interrupted run logged no epoch before the SIGTERM checkpoint")
    if not 0 < step < total:
        problems.append(f"the SIGTERM checkpoint is at step {step}, not inside the run (1..{total - 1})")
    at = resumed.get("resumed_at_step")
    if at is None:
        problems.append("the resumed run's log has no 'resumed from ... (step N' line")
    elif int(at) != step:
        problems.append(f"resumed at step {at}, but the checkpoint was saved at step {step}")
    if int(resumed["step"]) != total:
        problems.append(f"the resumed run ended at step {resumed['step']}, not {total}")
    kept = [(r["epoch"], r["loss"]) for r in new[:len(old)]]
    if kept != [(r["epoch"], r["loss"]) for r in old]:
        problems.append("the resumed history does not start with the interrupted run's epochs")
    expected_epochs = list(range(epochs))
    if 0 < step <= total and step % iters_per_epoch == 0 and len(old) < step // iters_per_epoch:
        expected_epochs.remove(step // iters_per_epoch - 1)  # the SIGTERM came in its last iteration: never logged
    if [r["epoch"] for r in new] != expected_epochs:
        problems.append(f"resumed history epochs {[r['epoch'] for r in new]} are not {expected_epochs}")
    if len(new) > len(old):
        first = new[len(old)]
        if first["epoch"] != step // iters_per_epoch:
            problems.append(f"first resumed epoch is {first['epoch']}, expected {step // iters_per_epoch}")
        if not math.isclose(first["lr"], saved["lr"], rel_tol=rel_tol):
            problems.append(f"resumed with lr {first['lr']:.6g}, the checkpoint's optimizer had {saved['lr']:.6g}")
        if expected_lr is not None and not math.isclose(first["lr"], expected_lr, rel_tol=rel_tol):
            problems.append(f"resumed with lr {first['lr']:.6g}, the schedule gives {expected_lr:.6g} at step {step}")
    elif not problems:
        problems.append("the resumed run added no epoch")
    return not problems, problems


def ratios(values: dict[str, float], pairs: Sequence[tuple[str, str]], *, higher_is_better: bool = True) -> dict[str, float]:
    """``"<a>_vs_<b>"``: how many times better ``a`` is than ``b`` (rates: a / b; seconds: b / a),
    for the pairs whose both values are there and positive."""
    out = {}
    for a, b in pairs:
        va, vb = values.get(a), values.get(b)
        if va and vb and va > 0 and vb > 0 and math.isfinite(va) and math.isfinite(vb):
            out[f"{a}_vs_{b}"] = va / vb if higher_is_better else vb / va
    return out


def traceback_summary(exc: BaseException, frames: int = 4) -> str:
    """The exception line and its innermost ``frames`` frames (``file:line in function``), on one line each."""
    tb = traceback.extract_tb(exc.__traceback__)[-frames:]
    where = [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in tb]
    head = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return "\n".join([head, *(f"  at {w}" for w in where)])


def run_check(name: str, fn: Callable[[], dict | None], *, deadline: float | None = None,
              out: Callable[[str], None] = print) -> dict:
    """Run one check: ``{"name", "status": ok | failed | skipped, "seconds", "details", "error"}``.

    ``fn`` returns its details (keys starting with ``_`` are for later checks, not the report);
    :class:`CheckFailed` / any exception -> ``failed`` with a traceback summary; :class:`CheckSkipped`
    or a passed ``deadline`` (``time.monotonic()``) -> ``skipped``.
    """
    out(f"{PREFIX} {name} ...")
    rec: dict[str, Any] = {"name": name, "status": "ok", "seconds": 0.0, "details": {}, "error": None}
    if deadline is not None and time.monotonic() > deadline:
        rec.update(status="skipped", error="time budget (--max-minutes) spent")
    else:
        t0 = time.monotonic()
        try:
            rec["details"] = dict(fn() or {})
        except CheckSkipped as err:
            rec.update(status="skipped", error=str(err))
        except CheckFailed as err:
            rec.update(status="failed", error=str(err), details=err.details)
        except Exception as err:  # noqa: BLE001 - every failure is reported, the other checks still run
            rec.update(status="failed", error=traceback_summary(err))
        rec["seconds"] = time.monotonic() - t0
    line = f"{PREFIX} {name}: {rec['status']} ({rec['seconds']:.1f} s)"
    if rec["error"]:
        line += "\n" + "\n".join("    " + ln for ln in rec["error"].splitlines())
    out(line)
    return rec


def public(details: dict) -> dict:
    """``details`` without the internal ``_`` keys."""
    return {k: v for k, v in details.items() if not k.startswith("_")}


def scrub(obj: Any, replacements: dict[str, str]) -> Any:
    """``obj`` (JSON-able) with the keys of ``replacements`` replaced in every string, the longest
    key first (a path before its parent); keys of fewer than 2 characters (``/``) are ignored."""
    text = json.dumps(obj, default=str)
    for old in sorted((k for k in replacements if len(k) > 1), key=len, reverse=True):
        text = text.replace(json.dumps(old)[1:-1], json.dumps(replacements[old])[1:-1])
    return json.loads(text)


def summarize(checks: Sequence[dict]) -> dict:
    """The last-line JSON: ``ok``, the names per status, and every check's ``summary`` numbers."""
    out: dict[str, Any] = {"ok": not any(c["status"] == "failed" for c in checks)}
    for status in ("passed", "failed", "skipped"):
        key = "ok" if status == "passed" else status
        out[status] = [c["name"] for c in checks if c["status"] == key]
    for c in checks:
        out.update(c["details"].get("summary", {}))
    return out


def build_report(env: dict, checks: Sequence[dict], tables: Sequence[dict] = (), notes: str = "") -> str:
    """Markdown body: the GPU, one row per check (status, seconds, what it found or why it failed),
    the failures' traceback summaries, then ``tables`` (``{"title", "header", "rows"}``) and ``notes``."""
    lines = []
    if env:
        lines.append(md_table(["GPU", "memory GB", "capability", "torch", "CUDA", "cuDNN", "NCCL", "MONAI"],
                              [[env.get(k, "?") for k in ("gpu", "memory_gb", "capability", "torch", "cuda", "cudnn",
                                                          "nccl", "monai")]]))
    rows = []
    for c in checks:
        what = c["details"].get("result", "") if c["status"] == "ok" else (c["error"] or "").splitlines()[0]
        rows.append([c["name"], c["status"].upper() if c["status"] == "failed" else c["status"], round(c["seconds"], 1),
                     str(what).replace("|", "/")])
    lines.append(md_table(["check", "status", "s", "result"], rows))
    failed = [c for c in checks if c["status"] == "failed"]
    if failed:
        lines.append("Failures:\n\n" + "\n\n".join(f"- **{c['name']}**\n\n```\n{c['error']}\n```" for c in failed))
    for t in tables:
        if t["rows"]:
            lines.append(f"{t['title']}:\n\n" + md_table(t["header"], t["rows"]))
    if notes:
        lines.append(notes)
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- helpers
def reproduce_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--out-dir`` / ``--work-dir`` and their values: where results and scratch files go
    is no part of reproducing a run, and their paths are this machine's."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out-dir", "--work-dir"):
            skip = True
        elif not a.startswith(("--out-dir=", "--work-dir=")):
            out.append(a)
    return out


def say(msg: str) -> None:
    print(f"{PREFIX}   {msg}", flush=True)


def config_path(stem: str) -> Path:
    """A shipped config by name (``configs/`` or, after the move into the package, ``medseg/configs/``)."""
    for folder in (ROOT / "configs", ROOT / "medseg" / "configs"):
        if (folder / f"{stem}.yaml").is_file():
            return folder / f"{stem}.yaml"
    raise FileNotFoundError(f"config {stem}.yaml not found under configs/ or medseg/configs/")


def rel(path: Path) -> str:
    """``path`` relative to the repository (results hold no absolute path of the machine)."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def run_proc(cmd: Sequence, *, timeout: float, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` from the repository root; ``(process, wall seconds)``.

    Raises:
        RuntimeError: non-zero exit (the last lines of its stderr in the message).
    """
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)
                  and "ChildFailedError" not in ln]  # the worker's own error: torchrun's summary hides it
        tail = "\n".join(errors[-1:] + lines[-15:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} ... exited {proc.returncode}: "
                           f"{errors[-1] if errors else ''}\n{tail}")
    return proc, wall


def train_config(pre: Path, *, arch: str, precision: str, channels_last: bool, epochs: int, iters: int,
                 patch: Sequence[int], channels: Sequence[int], workers: int, checkpoint_interval: int | None = None):
    """The check's training config: ``configs/attention_unet3d.yaml`` on the phantoms, AdamW 3e-3 with
    the poly schedule (falls within a few dozen iterations), validation once at the end."""
    from medseg.config import load_config

    ov = [f"data.preprocessed={pre}", f"data.patch_size={list(patch)}", f"data.num_workers={workers}", "data.cache=ram",
          "data.val_cases=[phantom_005]", f"model.channels={list(channels)}", f"train.epochs={epochs}",
          f"train.iters_per_epoch={iters}", "train.batch_size=2", "train.optimizer=adamw", "train.lr=0.003",
          "train.scheduler=poly", f"train.precision={precision}", f"train.channels_last={str(channels_last).lower()}",
          "train.device=cuda", f"train.val_interval={epochs}", f"train.checkpoint_interval={checkpoint_interval or epochs}",
          "train.tb_num_cases=1"]
    if arch != "unet":
        ov += [f"model.arch={arch}", "model.deep_supervision=false", "model.skip_fusion.name=concat",
               "model.skip_fusion.kwargs={}"]  # MONAI's nets refuse settings they cannot honour
    return load_config(config_path("attention_unet3d"), ov)


# --------------------------------------------------------------------------- checks
def check_environment() -> dict:
    import monai
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        v = torch.cuda.nccl.version()  # a tuple (2, 21, 5); an int in old releases
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001 - a torch built without NCCL
        nccl = "none"
    env = {"gpu": props.name, "memory_gb": round(props.total_memory / 1024**3, 1),
           "capability": f"{props.major}.{props.minor}", "gpus": torch.cuda.device_count(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "nccl": nccl, "monai": monai.__version__,
           "bf16": torch.cuda.is_bf16_supported()}
    for k, v in env.items():
        say(f"{k}: {v}")
    return {"env": env, "result": f"{env['gpu']}, {env['memory_gb']} GB, CUDA {env['cuda']}"}


def check_phantoms(work: Path, quick: bool, workers: int) -> dict:
    """Six phantom CTs, preprocessed for the training config; ``_pre`` is the folder."""
    from medseg.data.phantoms import make_phantom_dataset
    from medseg.data.pipeline import preprocess_dataset

    shape, patch = ((64, 64, 40), (32, 32, 32)) if quick else ((96, 96, 64), (64, 64, 48))
    raw = make_phantom_dataset(work / "phantoms", n_train=6, n_test=0, seed=0, shape=shape)
    cfg = train_config(work / "pre", arch="unet", precision="fp16", channels_last=False, epochs=2, iters=1,
                       patch=patch, channels=WIDTHS, workers=workers)
    report = preprocess_dataset(raw, work / "pre", data_cfg=cfg.data, model_cfg=cfg.model, progress=False)
    if not report.ok:
        raise RuntimeError(report.summary())
    return {"_pre": work / "pre", "_patch": patch, "result": f"6 phantoms {'x'.join(map(str, shape))}, patch {list(patch)}"}


def check_train(pre: Path, work: Path, name: str, precision: str, channels_last: bool, *, patch, epochs: int,
                iters: int, workers: int) -> dict:
    """One training run on CUDA: losses finite and falling, GradScaler on iff fp16, patches/s."""
    import torch

    from medseg.train import train
    from medseg.train.checkpoint import load_checkpoint

    cfg = train_config(pre, arch=TRAIN_MODELS[name], precision=precision, channels_last=channels_last, epochs=epochs,
                       iters=iters, patch=patch, channels=WIDTHS, workers=workers)
    run = work / f"run_{name}_{precision}_{'cl' if channels_last else 'ncdhw'}"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    res = train(cfg, run)
    hist = res["history"]
    losses = [r["loss"] for r in hist]
    scaler = load_checkpoint(run / "checkpoints" / "final.pt")["scaler"]
    pps = best_throughput(hist)
    row = [name, precision, "on" if channels_last else "off", losses[0] if losses else float("nan"),
           losses[-1] if losses else float("nan"), pps, torch.cuda.max_memory_allocated() / 1024**3]
    key = f"train_{name}_{precision}{'_cl' if channels_last else ''}_patches_per_s"
    details = {"losses": losses, "patches_per_s": pps, "scaler": bool(scaler), "_row": row, "summary": {key: pps},
               "val_mean_fg_dice": res.get("final_metric")}
    ok, why = judge_losses(losses)
    scaler_ok, scaler_why = judge_scaler(scaler, precision)
    say(f"{why}; {pps:.1f} patches/s; {scaler_why}")
    if res["status"] != "finished":
        raise CheckFailed(f"training stopped early: {res['status']}", details)
    if not ok or not scaler_ok:
        raise CheckFailed("; ".join(w for good, w in ((ok, why), (scaler_ok, scaler_why)) if not good), details)
    details["result"] = f"{why}, {pps:.1f} patches/s"
    return details


def nccl_child() -> dict:
    """Run under ``torchrun``: one NCCL process group, our attention U-Net in DDP, 3 fp16 + GradScaler steps."""
    import torch
    import torch.distributed as dist

    from medseg.config import load_config
    from medseg.nn import build_model
    from medseg.train.losses import build_loss

    local = int(os.environ["LOCAL_RANK"])
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    cfg = load_config(config_path("attention_unet3d"), [f"model.channels={list(WIDTHS)}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=3, spacing=(1.5, 1.5, 1.5)).to(dev)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local], static_graph=True)  # as wrap_ddp
    loss_fn, opt = build_loss(cfg.train).to(dev), torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    losses = []
    for _ in range(3):
        x = torch.randn(2, 1, 64, 64, 64, device=dev, generator=g)
        y = torch.randint(0, 3, (2, 1, 64, 64, 64), device=dev, generator=g)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            out = ddp(x)
        loss = loss_fn(out, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    t = torch.full((1,), float(dist.get_rank() + 1), device=dev)
    dist.all_reduce(t)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank()})
    out = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "losses": losses,
           "all_reduce": float(t.item()), "gathered": gathered, "scale": float(scaler.get_scale())}
    dist.destroy_process_group()
    return out


def torchrun_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *map(str, args)]


def check_nccl() -> dict:
    proc, wall = run_proc(torchrun_cmd(__file__, "--nccl-child"), timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"the NCCL child printed no JSON:\n{proc.stderr[-2000:]}")
    res = json.loads(lines[-1])
    say(f"backend {res['backend']}, world size {res['world_size']}, losses {res['losses']}, all_reduce {res['all_reduce']}")
    if res["backend"] != "nccl" or not all(math.isfinite(v) for v in res["losses"]) or res["all_reduce"] != 1.0:
        raise CheckFailed(f"NCCL DDP: {res}", {"nccl": res})
    return {"nccl": res, "result": f"DDP(static_graph) on NCCL, 3 fp16 steps, losses {res['losses'][0]:.3f} -> "
                                   f"{res['losses'][-1]:.3f}, {wall:.0f} s with start-up"}


EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+loss")
RESUMED_LINE = re.compile(r"resumed from .* at epoch (\d+) \(step (\d+)")
BUFFER_LINE = re.compile(r"stitching buffers on (\S+)")  # medseg.infer.sliding's DEBUG line


def check_resume(pre: Path, work: Path, *, epochs: int, iters: int, workers: int) -> dict:
    """torchrun -> SIGTERM after one logged epoch -> --resume on CUDA; judged by :func:`judge_resume`."""
    from medseg.config import save_config
    from medseg.train.checkpoint import load_checkpoint
    from medseg.train.optim import lr_factor

    cfg = train_config(pre, arch="unet", precision="fp16", channels_last=False, epochs=epochs, iters=iters,
                       patch=(32, 32, 32), channels=WIDTHS, workers=workers, checkpoint_interval=1)
    cfg_path = save_config(cfg, work / "resume_config.yaml")
    run = work / "run_resume"
    log_txt = run / "log.txt"
    with open(work / "torchrun_stdout.txt", "w") as sink:
        proc = subprocess.Popen(torchrun_cmd("-m", "medseg", "train", "--config", cfg_path, "--out", run), cwd=ROOT,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        try:
            while proc.poll() is None and time.monotonic() - t0 < 300:
                if log_txt.is_file() and EPOCH_LINE.search(log_txt.read_text()):
                    break
                time.sleep(0.2)
            if proc.poll() is not None:
                tail = "\n".join((work / "torchrun_stdout.txt").read_text().splitlines()[-15:])
                raise RuntimeError(f"torchrun exited ({proc.returncode}) before the SIGTERM:\n{tail}")
            say(f"epoch 1 logged after {time.monotonic() - t0:.1f} s: SIGTERM to torchrun's process group")
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    saved = {"step": int(state["step"]), "lr": float(state["optimizer"]["param_groups"][0]["lr"]),
             "history": state.get("history", [])}
    say(f"torchrun exit status {rc}; latest.pt at step {saved['step']}, lr {saved['lr']:.6g}, "
        f"{len(saved['history'])} epoch(s)")
    _, wall = run_proc([sys.executable, "-m", "medseg", "train", "--out", run, "--resume"], timeout=400)
    final = load_checkpoint(run / "checkpoints" / "final.pt")
    found = RESUMED_LINE.findall(log_txt.read_text())
    resumed = {"step": int(final["step"]), "history": final.get("history", []),
               "resumed_at_step": int(found[-1][1]) if found else None}
    total = epochs * iters
    expected = cfg.train.lr * lr_factor(cfg.train.scheduler, saved["step"], total, cfg.train.poly_exponent)
    ok, problems = judge_resume(saved, resumed, iters_per_epoch=iters, epochs=epochs, expected_lr=expected)
    details = {"torchrun_exit": rc, "saved_step": saved["step"], "saved_lr": saved["lr"], "expected_lr": expected,
               "resumed_at_step": resumed["resumed_at_step"], "final_step": resumed["step"], "resume_s": wall}
    if not ok:
        raise CheckFailed("; ".join(problems), details)
    details["result"] = (f"SIGTERM at step {saved['step']} (torchrun exit {rc}), resumed at step "
                         f"{resumed['resumed_at_step']} with lr {saved['lr']:.4g}, finished {total} steps")
    return details


def check_infer_prepare(image: Path, work: Path, quick: bool) -> dict:
    """Run directories (untrained attention / plain U-Net, widths 16..256) planned at 1.5 mm for ``image``."""
    from medseg.config import load_config
    from medseg.data.plan import model_plan_args

    if not image.is_file():
        raise CheckSkipped(f"{rel(image)} not found: the inference checks need it")
    probe = load_config(config_path("unet3d"), [f"model.channels={list(WIDTHS)}"]).model
    plans = plan_for_image(image, INFER_LABELS, target_spacing=[1.5, 1.5, 1.5], **model_plan_args(probe))
    runs = {}
    for model, stem in (("attention", "attention_unet3d"), ("unet", "unet3d"))[: 1 if quick else 2]:
        runs[model] = make_run_dir(work / f"infer_run_{model}", config_path(stem), plans,
                                   overrides=[f"model.channels={list(WIDTHS)}", f"model.num_classes={len(INFER_LABELS)}"])
    return {"_runs": runs, "patch": plans["patch_size"], "result": f"window {plans['patch_size']} at 1.5 mm"}


def infer_cli(run: Path, image: Path, out: Path, *, precision: str, tta: bool, buffer: str) -> dict:
    """``medseg infer`` on CUDA with the buffers on the GPU (``auto``) or forced to the CPU; mask + buffer device."""
    env = {**os.environ, "MEDSEG_LOGLEVEL": "DEBUG"}
    env.pop("MEDSEG_BUFFER_DEVICE", None)
    if buffer == "cpu":
        env["MEDSEG_BUFFER_DEVICE"] = "cpu"
    cmd = [sys.executable, "-m", "medseg", "infer", "--model", run, "-i", image, "-o", out, "--device", "cuda",
           "--precision", precision, "--postprocess", "none", *(["--tta"] if tta else [])]
    proc, wall = run_proc(cmd, timeout=400, env=env)
    used = BUFFER_LINE.findall(proc.stderr)
    masks = sorted(p for p in out.glob("*.nii.gz") if "_probabilities" not in p.name)
    if len(masks) != 1:
        raise RuntimeError(f"expected one mask in {rel(out)}, found {[p.name for p in masks]}")
    return {"wall_s": wall, "buffer": used[-1] if used else None, "mask": masks[0]}


def check_infer_buffers(runs: dict, image: Path, work: Path, precision: str, tta: bool) -> dict:
    """GPU buffers vs the CPU-stitching fallback (with or without TTA): same masks, the buffer asked for."""
    import nibabel as nib
    import numpy as np

    tag = "tta" if tta else "plain"
    res = {b: infer_cli(runs["attention"], image, work / f"infer_{tag}_{b}", precision=precision, tta=tta, buffer=b)
           for b in ("gpu", "cpu")}
    masks = {b: np.asanyarray(nib.load(str(r["mask"])).dataobj) for b, r in res.items()}
    agree = mask_agreement(masks["gpu"], masks["cpu"])
    details = {"buffer_gpu_run": res["gpu"]["buffer"], "buffer_cpu_run": res["cpu"]["buffer"],
               "wall_s_gpu_buffer": res["gpu"]["wall_s"], "wall_s_cpu_buffer": res["cpu"]["wall_s"],
               "mean_dice": agree["mean_dice"], "equal_fraction": agree["equal_fraction"], "labels": agree["labels"],
               "_mask": res["gpu"]["mask"],
               "summary": {f"infer_{tag}_buffer_dice": agree["mean_dice"],
                           f"infer_{tag}_wall_s_gpu_buffer": res["gpu"]["wall_s"],
                           f"infer_{tag}_wall_s_cpu_buffer": res["cpu"]["wall_s"]}}
    say(f"buffers {res['gpu']['buffer']} / {res['cpu']['buffer']}; Dice {agree['mean_dice']:.5f} over labels "
        f"{agree['labels']}, {agree['equal_fraction']:.5f} of voxels equal; {res['gpu']['wall_s']:.1f} s / "
        f"{res['cpu']['wall_s']:.1f} s (with start-up)")
    problems = []
    if not str(res["gpu"]["buffer"]).startswith("cuda"):
        problems.append(f"auto buffer run stitched on {res['gpu']['buffer']}, not on the GPU")
    if res["cpu"]["buffer"] != "cpu":
        problems.append(f"MEDSEG_BUFFER_DEVICE=cpu run stitched on {res['cpu']['buffer']}")
    if agree["mean_dice"] < DICE_MIN:
        problems.append(f"masks disagree: mean Dice {agree['mean_dice']:.4f} < {DICE_MIN}")
    if problems:
        raise CheckFailed("; ".join(problems), details)
    details["result"] = f"Dice {agree['mean_dice']:.4f} ({len(agree['labels'])} labels), GPU vs CPU stitching"
    return details


def stock_on_device(image: Path, out: Path, model: str, *, device, amp_dtype, channels) -> dict:
    """``stock_monai.run_stock_pipeline`` as MONAI's tutorials run it on a GPU: the net on the device,
    the input moved there for ``sliding_window_inference`` under autocast, the prediction back for
    Invertd / SaveImaged (patched in for the call; the CPU pipeline is unchanged)."""
    import monai.inferers
    import torch

    import stock_monai

    build0, swi0 = stock_monai.build_monai_model, monai.inferers.sliding_window_inference

    def build(*a, **k):
        return build0(*a, **k).to(device)

    def swi(inputs, *a, **k):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            pred = swi0(inputs.to(device), *a, **k)
        return pred.float().cpu()

    stock_monai.build_monai_model, monai.inferers.sliding_window_inference = build, swi
    try:
        return stock_monai.run_stock_pipeline(image, out, model, num_classes=len(INFER_LABELS), channels=tuple(channels))
    finally:
        stock_monai.build_monai_model, monai.inferers.sliding_window_inference = build0, swi0


def infer_child(args: argparse.Namespace) -> dict:
    """One pipeline on CUDA, ``--repeats`` times in this process; seconds from load to the written mask."""
    import torch

    from medseg.io import write_volume
    from medseg.runtime import resolve_precision

    set_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.ones(1, device=device).sum().item()  # CUDA context before the clock, for both pipelines
    amp = resolve_precision(args.precision, device)
    kind, model = args.child_infer
    args.out.mkdir(parents=True, exist_ok=True)
    times = []
    if kind == "ours":
        from medseg.infer.predictor import Predictor

        pred = Predictor.from_run(args.run_dir, device=str(device), precision=args.precision, postprocess="none")
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = pred.predict(args.image)
            write_volume(result.mask, args.out / f"{result.case}.nii.gz")
            times.append(time.perf_counter() - t0)
        extra = {"roi": list(pred.roi_size), "overlap": pred.overlap, "sw_batch_size": pred.sw_batch_size}
    else:
        runs = [stock_on_device(args.image, args.out, model, device=device, amp_dtype=amp, channels=WIDTHS)
                for _ in range(args.repeats)]
        times = [r["total"] for r in runs]
        extra = {"roi": [96, 96, 96], "overlap": 0.25, "sw_batch_size": 4}
    best = min(range(1, len(times)), key=times.__getitem__) if len(times) > 1 else 0  # the fastest later run
    if kind != "ours":  # where the stock pipeline's time goes (CPU load/resample, net on the GPU, CPU invert/write)
        extra["stages_s"] = {k: runs[best][k] for k in ("load_preprocess", "sliding_window", "invert_write")}
    return {"times": times, "first_s": times[0], "best_s": times[best],
            "precision": str(amp).replace("torch.", ""),
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else float("nan"), **extra}


def check_infer_speed(kind: str, model: str, runs: dict, image: Path, work: Path, precision: str, repeats: int,
                      threads: int) -> dict:
    """End-to-end seconds of one pipeline (``ours``: the run ``runs[model]``; ``monai``: the stock one) in a child."""
    argv = [__file__, "--child-infer", kind, model, "--image", image, "--out", work / f"speed_{kind}_{model}",
            "--precision", precision, "--repeats", repeats, "--threads", threads]
    if kind == "ours":
        argv += ["--run-dir", runs[model]]
    r = run_child(argv, timeout=500)
    say(f"{kind} {model} {r['precision']}: first {r['first_s']:.2f} s, best {r['best_s']:.2f} s, "
        f"window {r['roi']}, peak GPU {r['peak_gpu_gb']:.1f} GB")
    name = f"{kind}_{model}"
    return {**r, "_row": [name, r["precision"], "x".join(map(str, r["roi"])), r["overlap"], r["sw_batch_size"],
                          r["first_s"], r["best_s"], r["peak_gpu_gb"]],
            "summary": {f"infer_{name}_s": r["best_s"]}, "result": f"{r['best_s']:.2f} s end to end ({r['precision']})"}


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="shorter run (~3-4 min on an H100): smaller phantoms, 3 epochs x 6 iterations on 32^3 "
                        "patches, a 20-epoch resume run, the attention pipelines only and one timed run each")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE,
                   help="CT for the inference checks (default ../shared/data/real_ct/organs/imagesTr/"
                        "lidc0001_chest.nii.gz; skipped with a message when absent)")
    p.add_argument("--precision", choices=("fp16", "bf16"), default="fp16",
                   help="inference precision of ours and of the stock MONAI pipeline (default fp16; training runs both)")
    p.add_argument("--out-dir", type=Path, default=RESULTS,
                   help="folder for gpu_check.{md,json} (default benchmarks/results)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the phantoms, runs and masks here (default: a temp folder, deleted at the end)")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16),
                   help="torch CPU threads for the CPU-side work: preprocessing, resampling, CPU stitching "
                        "(default: all cores, at most 16)")
    p.add_argument("--workers", type=int, default=None,
                   help="training data-loader workers (default: cores - 2, between 0 and 8)")
    p.add_argument("--max-minutes", type=float, default=8.0,
                   help="time budget: checks that would start after it are reported as skipped (default 8)")
    p.add_argument("--child-infer", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    p.add_argument("--nccl-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # of --child-infer (cpu: a dry run of the script)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nccl_child:
        print(json.dumps(nccl_child()), flush=True)
        return 0
    if args.child_infer:
        print(json.dumps(infer_child(args)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA device", flush=True)
        print(json.dumps({"skipped": "no CUDA device"}), flush=True)
        return 0
    set_threads(args.threads)
    workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 2) - 2))
    deadline = time.monotonic() + args.max_minutes * 60
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="medseg_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    cli = list(sys.argv[1:] if argv is None else argv)
    meta = meta_now(args.threads, argv=["benchmarks/gpu_check.py", *reproduce_argv(cli)])
    epochs, iters = (3, 6) if args.quick else (4, 10)
    checks: list[dict] = []

    def check(name: str, fn: Callable[[], dict | None]) -> dict:
        rec = run_check(name, fn, deadline=deadline, out=lambda s: print(s, flush=True))
        checks.append(rec)
        return rec["details"] if rec["status"] == "ok" else {}

    def needs(value, what: str):
        if not value:
            raise CheckSkipped(f"needs the {what} check, which did not pass")
        return value

    try:
        env = check("environment", check_environment).get("env", {})
        data = check("phantom data", lambda: check_phantoms(work, args.quick, workers))
        pre, patch = data.get("_pre"), data.get("_patch")
        check("nccl ddp", check_nccl)
        train_runs = [("ours", p, cl) for p in ("fp16", "bf16") for cl in (False, True)]
        train_runs += [(m, p, False) for m in ("monai_unet", "monai_attention") for p in ("fp16", "bf16")]
        for name, prec, cl in train_runs:
            check(f"train {name} {prec}{' channels_last' if cl else ''}",
                  lambda name=name, prec=prec, cl=cl: check_train(needs(pre, "phantom data"), work, name, prec, cl,
                                                                  patch=patch, epochs=epochs, iters=iters, workers=workers))
        check("torchrun resume", lambda: check_resume(needs(pre, "phantom data"), work, epochs=20 if args.quick else 30,
                                                      iters=10, workers=workers))
        runs = check("infer prepare", lambda: check_infer_prepare(args.image, work, args.quick)).get("_runs")
        for tta in (False, True):
            check(f"infer buffers{' tta' if tta else ''}",
                  lambda tta=tta: check_infer_buffers(needs(runs, "infer prepare"), args.image, work, args.precision, tta))
        repeats = 1 if args.quick else 2
        for model in ("attention",) if args.quick else ("attention", "unet"):
            for kind in ("ours", "monai"):
                check(f"infer speed {kind} {model}",
                      lambda kind=kind, model=model: check_infer_speed(
                          kind, model, needs(runs, "infer prepare"), args.image, work, args.precision, repeats, args.threads))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    train_rows = [c["details"]["_row"] for c in checks if c["name"].startswith("train ") and "_row" in c["details"]]
    pps = {f"{r[0]}_{r[1]}": r[5] for r in train_rows if r[2] == "off"}
    train_ratios = ratios(pps, [(f"ours_{p}", f"{m}_{p}") for p in ("fp16", "bf16") for m in ("monai_unet", "monai_attention")])
    speed_rows = [c["details"]["_row"] for c in checks if c["name"].startswith("infer speed") and "_row" in c["details"]]
    infer_ratios = ratios({r[0]: r[6] for r in speed_rows}, [("ours_attention", "monai_attention"),
                          ("ours_attention", "monai_unet"), ("ours_unet", "monai_unet")], higher_is_better=False)
    tables = [
        {"title": f"Training on CUDA ({epochs} epochs x {iters} iterations, batch 2, patch {list(patch or [])}, widths "
                  f"{list(WIDTHS)}; patches/s: best epoch after the first, data loader included)",
         "header": ["model", "precision", "channels_last", "first epoch loss", "last epoch loss", "patches/s", "peak GPU GB"],
         "rows": train_rows},
        {"title": f"Inference end to end on CUDA ({rel(args.image)}, untrained nets; load -> mask written; first run "
                  f"and fastest of {1 if args.quick else 2})",
         "header": ["pipeline", "precision", "window", "overlap", "sw batch", "first s", "best s", "peak GPU GB"],
         "rows": speed_rows},
    ]
    # results hold no path of this machine: the work folder and the checkout become placeholders
    paths = {str(work): "<work>", str(ROOT): ".", str(ROOT.parent): ".."}
    checks = scrub([{**c, "details": public(c["details"])} for c in checks], paths)
    summary = {**summarize(checks), **{f"train_{k}": v for k, v in train_ratios.items()},
               **{f"infer_speedup_{k}": v for k, v in infer_ratios.items()}}
    ratio_lines = "\n".join(f"- {k}: {v:.2f}x" for k, v in {**train_ratios, **infer_ratios}.items())
    notes = ("Ours vs MONAI at the same precision (training: patches/s ratio, channels_last off; inference: "
             "seconds ratio, i.e. speed-up):\n\n" + ratio_lines) if ratio_lines else ""
    cmd = " ".join(["python benchmarks/gpu_check.py", *reproduce_argv(cli)])
    md_path, _ = write_results("gpu_check", f"GPU check ({env.get('gpu', 'CUDA')})", build_report(env, checks, tables, notes),
                               {"checks": checks, "summary": summary}, scrub({**meta, "gpu": env}, paths), command=cmd,
                               out_dir=args.out_dir)
    print(f"{PREFIX} wrote {rel(md_path)}", flush=True)
    print(json.dumps(summary, default=float), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
