"""The training loop: ``train(cfg, out_dir, resume=False) -> dict``.

One function and small helpers over a :class:`~medseg.train.setup.Context` of the run's objects
(set up by :mod:`medseg.train.setup`). Per iteration:
a batch of patches (:mod:`medseg.train.data`), forward under autocast
(:func:`medseg.runtime.autocast`; bf16 on CPU, fp16 + ``GradScaler`` or bf16 on CUDA), Dice+CE with
deep supervision plus the model's auxiliary loss (:mod:`medseg.train.losses`), backward,
gradient clipping, optimizer step, per-iteration LR schedule (:mod:`medseg.train.optim`).
Per epoch: scalars to TensorBoard and ``log.txt``; every ``train.val_interval`` epochs (and at
the end) sliding-window validation (:mod:`medseg.train.validation`) with overlays and gate
maps (:mod:`medseg.train.tensorboard`), ``best.pt`` on a new best mean foreground Dice; with
``data.hard_negatives`` every ``data.hard_negative_interval`` epochs the model's false positives on
its training cases are mined for the patch sampler (:mod:`medseg.train.hard_negatives`); every
``train.checkpoint_interval`` epochs ``latest.pt``; at the end ``final.pt``.

Faults: a non-finite loss stops the run with :class:`TrainingDiverged` (nothing is saved after
it, so ``latest.pt`` stays the last good state); Ctrl-C / SIGTERM finish the iteration, save
``latest.pt`` and return with ``status = "interrupted"`` (a stop on an epoch's last iteration keeps
the epoch, and the resumed run first does that epoch's due validation and checkpoint); every file is
written atomically.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from medseg.config import Config, config_from_dict, config_to_dict
from medseg.data.datasets import label_names_of
from medseg.errors import MedsegError
from medseg.evaluate.report import write_summary
from medseg.infer.postprocess import write_run_postprocessing
from medseg.runtime import autocast, get_logger, progress_enabled
from medseg.train import data as tdata
from medseg.train.checkpoint import capture_rng, save_checkpoint
from medseg.train.checks import check_config
from medseg.train.distributed import all_gather_objects, barrier, cleanup, init_distributed, mean_across, wrap_ddp
from medseg.train.hard_negatives import MAX_PER_CASE, hard_negative_file, mine_false_positives, write_hard_negatives
from medseg.train.optim import refresh_lr
from medseg.train.setup import (Context, budget_state, build_context, check_run_dir, open_log, resume_from_latest,
                                train_loader, write_run_files)
from medseg.train.signals import StopRequest
from medseg.train.tensorboard import log_case_images, log_gate_histograms, log_gate_localisation, render_case
from medseg.train.validation import validate

__all__ = ["TrainingDiverged", "train", "train_step"]

log = get_logger("medseg.train")


class TrainingDiverged(MedsegError):
    """The loss became NaN / inf; the message says where and which checkpoint is the last good one."""


# --------------------------------------------------------------------------- loop helpers
def train_step(ctx: Context, batch: dict) -> torch.Tensor:
    """One optimisation step; returns the detached ``[total, dice_ce, aux, *counts]``: the losses, then
    the step's hard-prediction overlap counts per foreground class (``SegmentationLoss.overlap_counts``,
    flattened ``(3, K - 1)``) that the epoch sums into its training Dice per class."""
    dev, t = ctx.info.device, ctx.cfg.train
    x = batch["image"].to(dev, non_blocking=True)
    y = batch["label"].to(dev, non_blocking=True).long()
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    ctx.optimizer.zero_grad(set_to_none=True)
    with autocast(dev, ctx.amp_dtype):
        out = ctx.ddp(x)
        aux = ctx.model.auxiliary_loss(y).float() if hasattr(ctx.model, "auxiliary_loss") else None
    seg = ctx.loss_fn(out, y)
    total = seg if aux is None else seg + t.aux_loss_weight * aux
    ctx.scaler.scale(total).backward()
    if t.grad_clip > 0:
        ctx.scaler.unscale_(ctx.optimizer)
        torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), t.grad_clip)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.scheduler.step()
    zero = seg.detach().new_zeros(())
    counts = ctx.loss_fn.overlap_counts(out, y).flatten().to(seg.dtype)
    return torch.cat([torch.stack([total.detach(), seg.detach(), zero if aux is None else aux.detach()]), counts])


def _diverged(ctx: Context, epoch: int) -> TrainingDiverged:
    latest = ctx.ckpt_dir / "latest.pt"
    last = f"the last good checkpoint is {latest}" if latest.is_file() else "no checkpoint was written yet"
    return TrainingDiverged(
        f"loss became NaN/inf at epoch {epoch + 1}, step {ctx.step}; training stopped without saving ({last}). "
        "Try a lower train.lr, train.precision=fp32 or a smaller train.grad_clip, and check the data."
    )


def _run_epoch(ctx: Context, batches, epoch: int, stop: StopRequest) -> tuple[dict | None, bool]:
    """Iterations up to the end of ``epoch``: ``(record, stopped)``. ``record`` holds the epoch's mean
    losses, or is None when a stop request cut the epoch short; a stop that arrives on the epoch's
    last iteration keeps the complete epoch's record (``stopped`` is then True as well)."""
    end = (epoch + 1) * ctx.iters
    sums, n, t0, stopped = None, 0, time.perf_counter(), False
    lr = ctx.optimizer.param_groups[0]["lr"]  # the epoch's first (largest) learning rate
    bar = tqdm(total=end - ctx.step, desc=f"epoch {epoch + 1}/{ctx.total_epochs}", leave=False,
               disable=not (ctx.info.is_main and progress_enabled()) or None)
    try:
        while ctx.step < end:
            terms = train_step(ctx, next(batches))
            flag = torch.tensor([1.0 if stop.signum else 0.0], device=terms.device)
            reduced = mean_across(torch.cat([terms.float(), flag]), ctx.info).cpu().double()
            if not torch.isfinite(reduced[:3]).all():
                raise _diverged(ctx, epoch)
            ctx.step += 1
            sums = reduced[:-1] if sums is None else sums + reduced[:-1]
            n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{reduced[0].item():.4f}")
            if reduced[-1] > 0:
                stopped = True
                break
    finally:
        bar.close()
    if ctx.step < end:
        return None, stopped
    seconds = time.perf_counter() - t0
    loss = (sums[:3] / max(n, 1)).tolist()
    return {"epoch": epoch, "loss": loss[0], "dice_ce": loss[1], "aux": loss[2], "lr": lr,
            "train_dice": _train_dice(sums[3:], ctx.plans.get("labels", {})), "time_s": seconds,
            "patches_per_s": n * ctx.cfg.train.batch_size * ctx.info.world_size / max(seconds, 1e-9)}, stopped


def _train_dice(counts: torch.Tensor, labels: dict) -> dict[str, float | None]:
    """Class name -> Dice of the epoch's patches, from summed ``(3, K - 1)`` overlap counts (flattened);
    None for a class neither predicted nor present in them."""
    counts = counts.view(3, -1)
    names = label_names_of(labels)
    out = {}
    for i in range(counts.shape[1]):
        tp, pred, ref = counts[:, i].tolist()
        out[names.get(i + 1, str(i + 1))] = 2 * tp / (pred + ref) if pred + ref > 0 else None
    return out


def _log_epoch(ctx: Context, rec: dict) -> None:
    dice = rec.get("train_dice") or {}
    shown = " ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in dice.items())
    # rec["dice_ce"] is the segmentation term, whichever train.loss it is (the history's key stays)
    log.info("epoch %d/%d  loss %.4f (%s %.4f, aux %.4f)  lr %.2e  %.1f s  %.1f patches/s%s", rec["epoch"] + 1,
             ctx.total_epochs, rec["loss"], ctx.cfg.train.loss, rec["dice_ce"], rec["aux"], rec["lr"], rec["time_s"],
             rec["patches_per_s"],
             f"  train Dice {shown}" if shown else "")
    w, e = ctx.writer, rec["epoch"] + 1
    if w is None:
        return
    w.add_scalar("loss/total", rec["loss"], e)
    w.add_scalar("loss/dice_ce", rec["dice_ce"], e)
    if hasattr(ctx.model, "auxiliary_loss"):
        w.add_scalar("loss/aux", rec["aux"], e)
    w.add_scalar("lr", rec["lr"], e)
    for cls, v in dice.items():
        if v is not None:
            w.add_scalar(f"train/dice/{cls}", v, e)
    w.add_scalar("speed/patches_per_s", rec["patches_per_s"], e)
    w.add_scalar("time/epoch_s", rec["time_s"], e)


def _training_structures(pre_dir: Path, train_cases: list[str], val_cases: list[str],
                         num_classes: int) -> tuple[dict[str, bool], list[str]]:
    """What the training labels say about each class's shape, for the post-processing choice
    (:func:`medseg.infer.postprocess.choose_largest_component`), from one pass over the training cases'
    property files: ``(single, multi)``.

    - ``single``: per class that no validation case holds (the only classes the choice's fallback decides),
      whether it is one 26-connected component in every training label holding it (classes in no
      training label are left out; ``{}`` without validation cases).
    - ``multi``: classes (strings) some training label shows as several structures (>=
      ``MULTI_STRUCTURE_SHARE`` of its voxels outside its largest component): never reduced to it.

    Both come from each case's ``class_component_share`` (recorded at preprocessing; share 0.0: one
    component), so no label is opened. A case preprocessed before medseg recorded the share has its label
    read (memory-mapped), and only when it holds a class no validation case holds.
    """
    from medseg.data.pipeline import load_case, load_props
    from medseg.data.preprocess import component_shares
    from medseg.infer.postprocess import MULTI_STRUCTURE_SHARE

    def held(props: dict) -> set[int]:
        return {int(k) for k, v in (props.get("class_locations") or {}).items() if v}

    unjudged = (set(range(1, num_classes)).difference(*(held(load_props(pre_dir, n)) for n in val_cases))
                if val_cases else set())
    one: dict[str, list[bool]] = {}
    multi: set[str] = set()
    for name in train_cases:
        props = load_props(pre_dir, name)
        shares = props.get("class_component_share")
        if shares is None:  # preprocessed before the share was recorded: the label says it
            todo = sorted(unjudged & held(props))
            label = load_case(pre_dir, name, mmap=True)[1] if todo else None
            shares = component_shares(label[0], todo) if label is not None else {}
        multi |= {c for c, v in shares.items() if v >= MULTI_STRUCTURE_SHARE}
        for c, v in shares.items():
            if int(c) in unjudged:
                one.setdefault(c, []).append(v == 0.0)
    return {c: all(v) for c, v in sorted(one.items(), key=lambda kv: int(kv[0]))}, sorted(multi, key=int)


def _validate(ctx: Context, epoch: int) -> float:
    t0 = time.perf_counter()
    res = validate(ctx.model, ctx.val_cases, ctx.pre_dir, ctx.cfg, patch_size=ctx.patch,
                   num_classes=int(ctx.plans["num_classes"]), labels=ctx.plans.get("labels", {}), info=ctx.info,
                   amp_dtype=ctx.amp_dtype, draw=ctx.cfg.train.tb_num_cases, training_single=ctx.training_single,
                   training_multi=ctx.training_multi)
    score, summary = res.mean_fg_dice, res.summary
    summary["epoch"] = epoch + 1
    ctx.final_summary = summary
    names = summary["label_names"]
    per_class = {names.get(k, k): v["Dice"] for k, v in summary["mean"].items()}
    log.info("validation epoch %d: mean fg Dice %.4f (%s) in %.1f s", epoch + 1, score,
             ", ".join(f"{k} {v:.3f}" for k, v in per_class.items()), time.perf_counter() - t0)
    if ctx.info.is_main:
        write_summary(summary, ctx.run_dir / "validation" / "summary.json")
        write_run_postprocessing(ctx.run_dir, summary["postprocessing"])
        if ctx.writer is not None:
            for cls, v in per_class.items():
                ctx.writer.add_scalar(f"val/dice/{cls}", v, epoch + 1)
            ctx.writer.add_scalar("val/mean_fg_dice", score, epoch + 1)
            for view in res.views:
                renders = render_case(view.image, view.label, view.pred, view.gates, view.spacing)
                log_case_images(ctx.writer, view.case, renders, epoch + 1)
                log_gate_histograms(ctx.writer, view.gates, epoch + 1)
            log_gate_localisation(ctx.writer, summary, epoch + 1)
            ctx.writer.flush()
    return score


def _mine(ctx: Context, epoch: int) -> int:
    """Mine the model's false positives on its training cases into this rank's table (the patch
    dataset rereads it); returns the number of voxels kept, over all cases."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    table = mine_false_positives(ctx.model, ctx.train_cases, ctx.pre_dir, patch_size=ctx.patch, info=ctx.info,
                                 blend=cfg.infer.blend, sw_batch_size=cfg.infer.sw_batch_size, amp_dtype=ctx.amp_dtype,
                                 channels_last=cfg.train.channels_last, ignore_label=ctx.plans.get("ignore_label"),
                                 seed=cfg.train.seed * 1_000_003 + epoch)
    write_hard_negatives(hard_negative_file(ctx.run_dir, ctx.info.rank), table)
    voxels = sum(len(v) for v in table.values())
    log.info("hard negatives epoch %d: %d false-positive voxels kept in %d of %d training cases (at most %d per case) "
             "in %.1f s; %.0f%% of the random patches of those cases are centred on one", epoch + 1, voxels,
             sum(1 for v in table.values() if len(v)), len(table), MAX_PER_CASE, time.perf_counter() - t0,
             100 * cfg.data.hard_negatives)
    if ctx.writer is not None:
        ctx.writer.add_scalar("train/hard_negative_voxels", voxels, epoch + 1)
    return voxels


def _state(ctx: Context) -> dict:
    rngs = all_gather_objects(capture_rng(), ctx.info)
    return {"model": ctx.model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
            "scheduler": ctx.scheduler.state_dict(), "scaler": ctx.scaler.state_dict(), "epoch": ctx.epoch,
            "step": ctx.step, "best_metric": ctx.best, "rng": rngs, "config": config_to_dict(ctx.recorded_config()),
            "plans": ctx.plans, "history": ctx.history, "budget": budget_state(ctx, time.perf_counter()),
            "epoch_end_pending": ctx.epoch_end_pending}


def _save(ctx: Context, *names: str) -> None:
    state = _state(ctx)  # collective: every rank calls it
    if ctx.info.is_main:
        for name in names:
            save_checkpoint(state, ctx.ckpt_dir / f"{name}.pt")


def _update_budget(ctx: Context) -> None:
    """Under ``train.max_minutes`` shrink ``total_epochs`` to what fits (the LR schedule follows).

    The time counted is the whole run's (earlier sessions included, restored on resume), and an
    epoch is expected to take its mean so far, validations included.
    """
    steps = ctx.step - ctx.timed_from
    if ctx.cfg.train.max_minutes is None or steps <= 0:
        return
    elapsed = time.perf_counter() - ctx.clock0
    left = ctx.cfg.train.max_minutes * 60.0 - elapsed - ctx.val_s
    fit = ctx.epoch + 1 + max(0, math.floor(left / (elapsed * ctx.iters / steps)))
    fit = min(all_gather_objects(fit, ctx.info))  # every rank must stop at the same epoch
    ctx.total_epochs = max(ctx.epoch + 1, min(ctx.cfg.train.epochs, fit))
    refresh_lr(ctx.scheduler)  # the next step's LR under the new total


# --------------------------------------------------------------------------- main
def _end_epoch(ctx: Context, epoch: int, rec: dict) -> None:
    """After the complete ``epoch`` (its history record ``rec``): refit the budget, then validate and
    save ``latest`` when they are due. A run stopped on an epoch's last iteration does this on resume."""
    ctx.epoch_end_pending = False
    _update_budget(ctx)
    last = ctx.step >= ctx.total_epochs * ctx.iters
    if (epoch + 1) % ctx.cfg.train.val_interval == 0 or last:
        t0 = time.perf_counter()
        rec["val_mean_fg_dice"] = score = _validate(ctx, epoch)  # the score joins the epoch's record
        ctx.val_s = time.perf_counter() - t0
        if score > ctx.best:
            ctx.best = score
            _save(ctx, "best")
    if ctx.cfg.data.hard_negatives > 0 and (epoch + 1) % ctx.cfg.data.hard_negative_interval == 0 and not last:
        rec["hard_negative_voxels"] = _mine(ctx, epoch)
    if (epoch + 1) % ctx.cfg.train.checkpoint_interval == 0 or last:
        _save(ctx, "latest")


def _loop(ctx: Context, loader, stop: StopRequest) -> str:
    batches = iter(loader)
    ctx.clock0 = time.perf_counter() - ctx.train_s
    if ctx.epoch_end_pending and ctx.history:  # resumed after a stop on an epoch's last iteration
        log.info("epoch %d ended with the stop: its budget refit, validation and checkpoint (where due) now",
                 ctx.epoch + 1)
        _end_epoch(ctx, ctx.epoch, ctx.history[-1])
    while ctx.step < ctx.total_epochs * ctx.iters:
        epoch = ctx.step // ctx.iters
        rec, stopped = _run_epoch(ctx, batches, epoch, stop)
        if rec is not None:  # a complete epoch, stopped on its last iteration or not: its record is kept
            ctx.epoch = epoch
            _log_epoch(ctx, rec)
            ctx.history.append(rec)
        if stopped:  # a complete epoch's due validation is left to the resumed run (epoch_end_pending)
            ctx.epoch_end_pending = rec is not None
            log.warning("%s received: saving checkpoints/latest.pt at step %d and stopping", stop.name, ctx.step)
            _save(ctx, "latest")
            return "interrupted"
        _end_epoch(ctx, epoch, rec)
    _save(ctx, "final", "latest")
    return "finished"


def train(cfg: Config, out_dir: str | Path, resume: bool = False) -> dict:
    """Train ``cfg`` into the run directory ``out_dir`` (see the module docstring).

    Returns:
        ``{"status": "finished" | "interrupted", "signal": int | None, "run_dir", "epoch", "step",
        "best_metric", "final_metric", "history"}`` (metrics are mean foreground Dice).

    Raises:
        ConfigError / InputError: bad config values, missing or empty preprocessed folder, no
            foreground, ``--resume`` without a checkpoint; TrainingDiverged: NaN / inf loss.
    """
    cfg = config_from_dict(config_to_dict(cfg))  # private copy: resolved values are written into it
    check_config(cfg)
    run_dir = Path(out_dir)
    info = init_distributed(cfg.train.device)
    if not info.is_main:
        log.setLevel(logging.WARNING)  # one copy of the progress lines (rank 0 speaks for all)
    handler = None
    try:
        if info.is_main:
            check_run_dir(run_dir, resume)
        handler = open_log(run_dir, info)
        ctx = build_context(cfg, run_dir, info)
        if resume:
            resume_from_latest(ctx)
        write_run_files(ctx)
        train_cases, ctx.val_cases = tdata.train_val_cases(ctx.pre_dir, cfg, tdata.list_cases(ctx.pre_dir))
        ctx.train_cases = train_cases
        if not resume:  # a table left by an earlier run in this folder is not this run's
            hard_negative_file(run_dir, info.rank).unlink(missing_ok=True)
        loader = train_loader(ctx, train_cases)
        ctx.training_single, ctx.training_multi = _training_structures(ctx.pre_dir, train_cases, ctx.val_cases,
                                                                       int(ctx.plans["num_classes"]))
        ctx.ddp = wrap_ddp(ctx.model, info)
        ctx.loss_fn = ctx.loss_fn.to(info.device)
        if info.is_main:
            ctx.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=ctx.epoch + 2 if resume else None)
        with StopRequest() as stop:
            status = _loop(ctx, loader, stop)
        barrier(info)  # no rank tears the group down while rank 0 still writes its checkpoints
        return {"status": status, "signal": stop.signum, "run_dir": str(run_dir), "epoch": ctx.epoch, "step": ctx.step,
                "best_metric": ctx.best, "final_summary": ctx.final_summary,
                "final_metric": ctx.history[-1].get("val_mean_fg_dice") if ctx.history else None,
                "history": ctx.history}
    finally:
        if "ctx" in locals():
            if ctx.writer is not None:
                ctx.writer.close()
            ctx.ddp = ctx.model  # drop the DDP wrapper: its reducer holds the process group cleanup destroys
        if handler is not None:
            logging.getLogger("medseg").removeHandler(handler)
            handler.close()
        cleanup(info)
