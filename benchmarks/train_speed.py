"""Training throughput: our U-Net variants against MONAI's UNet / AttentionUnet, fp32 and bf16.

Every model trains on the very same random patches (``--batch`` x 1 x ``--patch``^3 CT-like
noise with random labels of ``--num-classes`` classes) in the same plain loop: forward under
autocast (bf16) or not (fp32), loss, backward, SGD step (Nesterov, lr 1e-2, momentum 0.99).
Losses: ours use the engine's loss (``medseg.train.losses.build_loss``: MONAI ``DiceCELoss``
over the deep-supervision outputs, as ``medseg train`` trains them); MONAI's nets use
``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``. All nets have the widths
``--channels`` (default 16..256); ours come from ``configs/{unet3d,attention_unet3d,
cbam_unet3d,unet25d}.yaml``, MONAI's from ``benchmarks/stock_monai.py``.

One subprocess per model and precision (peak RSS is its own); after ``--warmup`` steps,
``--steps`` steps are timed one by one (wall and CPU seconds) and the fastest counts (the one
other work on the machine disturbed least; all are in the JSON). ``--layouts contiguous
channels_last`` trains two copies of each net (same weights, same patches) in the one subprocess,
their steps interleaved, and reports ``<model>_<precision>_channels_last_gain`` from the medians
(``train.channels_last``; on a 2-core AMD EPYC, fp32, 48^3: 1.09x gated, 1.12x plain). The layout
``channels_last_stock_norm`` is channels_last with PyTorch's group-norm backward in the instance
(or ``--norm group``) norms instead of medseg's (``medseg.nn.layers.CHANNELS_LAST_NORM_BACKWARD``), and
``<model>_<precision>_norm_backward_gain`` the ratio of its median step to channels_last's. Prints a table, writes
``benchmarks/results/train_speed.{md,json}`` and, as its last line, a JSON object with
``<model>_<precision>_patches_per_s`` and ratios against MONAI.

    python benchmarks/train_speed.py                  # 2x1x64^3, 3 timed steps (a few minutes on 2 cores)
    python benchmarks/train_speed.py --quick          # 1x1x32^3, narrow nets, 1 step: checks the script
    python benchmarks/train_speed.py --patch 96 --models unet attention monai_attention
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, WIDTHS, md_table, meta_now, peak_rss_gb, run_child, set_threads, write_results  # noqa: E402

MODELS = {  # name -> our config stem, or None for a MONAI network
    "unet": "unet3d",
    "attention": "attention_unet3d",
    "cbam": "cbam_unet3d",
    "unet25d": "unet25d",
    "monai_unet": None,
    "monai_attention": None,
}
PRECISIONS = ("fp32", "bf16")
LAYOUTS = ("contiguous", "channels_last", "channels_last_stock_norm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run (default: all)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS), help="default: fp32 bf16")
    p.add_argument("--layouts", nargs="+", default=["contiguous"], choices=list(LAYOUTS),
                   help="memory formats of the net and its input: contiguous (NCDHW; train.channels_last=false, what "
                        "auto gives on CUDA) and/or channels_last (channels_last_3d; train.channels_last=true, what auto "
                        "gives 3D nets on the CPU) and/or channels_last_stock_norm (channels_last with PyTorch's "
                        "group-norm backward in the instance / group norms, medseg's before its own channels-last backward); "
                        "default: contiguous")
    p.add_argument("--patch", type=int, default=64, help="edge of the cubic training patch in voxels (default 64)")
    p.add_argument("--batch", type=int, default=2, help="patches per step (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model and precision (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--channels", type=int, nargs="+", default=list(WIDTHS), help="widths of every net (default 16 32 64 128 256)")
    p.add_argument("--norm", choices=("instance", "group", "batch"), default=None,
                   help="model.norm of medseg's nets (default: the config's, instance); MONAI's nets keep theirs")
    p.add_argument("--num-classes", type=int, default=6, help="classes, background included (default 6)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patches and the weights (default 0)")
    p.add_argument("--quick", action="store_true", help="1x1x32^3, channels 4..64, 1 step: checks the script; results to a temp folder")
    p.add_argument("--results", type=Path, default=None, help="folder for train_speed.{md,json} (default benchmarks/results)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- child
def build(name: str, channels: list[int], num_classes: int, norm: str | None = None):
    """``(model, loss)`` for one entry of :data:`MODELS` (``norm``: medseg's ``model.norm``, None the config's)."""
    import torch

    if MODELS[name] is None:
        from monai.losses import DiceCELoss
        from stock_monai import build_monai_model

        return build_monai_model(name.removeprefix("monai_"), num_classes, tuple(channels)), \
            DiceCELoss(to_onehot_y=True, softmax=True)
    from medseg.config import load_config
    from medseg.nn import build_model
    from medseg.train.losses import build_loss

    cfg = load_config(ROOT / "configs" / f"{MODELS[name]}.yaml", [f"model.channels={channels}", *([f"model.norm={norm}"] if norm else [])])
    model = build_model(cfg.model, num_classes=num_classes, spacing=(1.5, 1.5, 1.5))
    return model, build_loss(cfg.train).to(torch.device("cpu"))


def make_patches(n: int, batch: int, patch: int, num_classes: int, seed: int):
    """``n`` batches ``(image (B,1,P,P,P) float32, label (B,1,P,P,P) int64)``, the same for every model."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        image = torch.randn(batch, 1, patch, patch, patch, generator=g)
        c = max(patch // 8, 1)
        coarse = torch.randint(0, num_classes, (batch, 1, c, c, c), generator=g)
        label = F.interpolate(coarse.float(), size=(patch,) * 3, mode="nearest").long()  # blobs, not salt noise
        out.append((image, label))
    return out


def child(args: argparse.Namespace) -> dict:
    """``{"rows": [one row per layout]}`` of one model and precision. With several layouts, one copy
    of the net per layout (the same initial weights) and their steps interleave (A B, B A, ...), so
    that drifts of the machine's speed hit every layout alike; the layout ratio uses medians."""
    import copy
    import statistics

    import torch

    set_threads(args.threads)
    name, precision = args.child
    torch.manual_seed(args.seed)
    base, loss_fn = build(name, args.channels, args.num_classes, args.norm)
    nets = {}
    for layout in args.layouts:
        model = copy.deepcopy(base)
        if layout.startswith("channels_last"):  # as medseg.train.setup / engine do with train.channels_last
            model = model.to(memory_format=torch.channels_last_3d)
        model.train()
        nets[layout] = (model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5))
    batches = make_patches(args.warmup + args.steps, args.batch, args.patch, args.num_classes, args.seed)

    from medseg.nn import layers

    def step(layout: str, image, label) -> float:
        model, opt = nets[layout]
        opt.zero_grad(set_to_none=True)
        layers.CHANNELS_LAST_NORM_BACKWARD = layout != "channels_last_stock_norm"
        if layout.startswith("channels_last"):
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(image)
        loss = loss_fn(out, label)  # ours: a deep-supervision list, handled by the engine's loss
        loss.backward()
        opt.step()
        return float(loss)

    walls = {k: [] for k in nets}
    cpus = {k: [] for k in nets}
    losses = {k: [] for k in nets}
    for i, (image, label) in enumerate(batches):
        for layout in (list(nets) if i % 2 == 0 else list(nets)[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            loss = step(layout, image, label)
            if i >= args.warmup:
                walls[layout].append(time.perf_counter() - t0)
                cpus[layout].append(time.process_time() - c0)
                losses[layout].append(loss)
    rows = []
    for layout, (model, _) in nets.items():
        best = min(walls[layout])  # the step the other users of the machine disturbed least
        rows.append({"model": name, "precision": precision, "layout": layout, "patches_per_s": args.batch / best,
                     "s_per_step": best, "s_per_step_median": statistics.median(walls[layout]),
                     "s_per_step_all": walls[layout], "cpu_s_per_patch": min(cpus[layout]) / args.batch,
                     "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "loss_last": losses[layout][-1],
                     "peak_rss_gb": peak_rss_gb()})
    return {"rows": rows}


# --------------------------------------------------------------------------- parent
def row_key(r: dict) -> str:
    """``<model>_<precision>``, ``_<layout>`` appended for a layout other than contiguous."""
    layout = r.get("layout", "contiguous")
    return f"{r['model']}_{r['precision']}" + ("" if layout == "contiguous" else f"_{layout}")


def summarize(rows: list[dict]) -> dict:
    """Patches/s per row; ratios against MONAI and bf16 against fp32 (contiguous rows), and
    ``<model>_<precision>_channels_last_gain`` (contiguous over channels_last seconds per step, same model
    and precision: the medians of their interleaved steps) and ``<model>_<precision>_norm_backward_gain``
    (channels_last_stock_norm over channels_last, the same way)."""
    out = {f"{row_key(r)}_patches_per_s": r["patches_per_s"] for r in rows}

    def median_of(r: dict, layout: str) -> float | None:
        base = [b for b in rows if (b["model"], b["precision"]) == (r["model"], r["precision"])
                and b.get("layout", "contiguous") == layout]
        return base[0]["s_per_step_median"] if base else None  # medians of the interleaved steps of one child

    for r in rows:
        if r.get("layout") == "channels_last":
            for layout, key in (("contiguous", "channels_last_gain"), ("channels_last_stock_norm", "norm_backward_gain")):
                base = median_of(r, layout)
                if base is not None:
                    out[f"{r['model']}_{r['precision']}_{key}"] = base / r["s_per_step_median"]
    by = {(r["model"], r["precision"]): r["patches_per_s"] for r in rows if r.get("layout", "contiguous") == "contiguous"}
    for (model, prec), v in by.items():
        for ref in ("monai_unet", "monai_attention"):
            if model in MODELS and MODELS[model] and (ref, prec) in by:
                out[f"{model}_{prec}_vs_{ref}"] = v / by[(ref, prec)]
        if prec == "bf16" and (model, "fp32") in by:
            out[f"{model}_bf16_gain"] = v / by[(model, "fp32")]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.patch, args.batch, args.steps, args.channels = 32, 1, 1, [4, 8, 16, 32, 64]
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for name, prec in itertools.product(args.models, args.precisions):
        print(f"{name} {prec} {' + '.join(args.layouts)} ...", file=sys.stderr, flush=True)
        rows += run_child([__file__, "--child", name, prec, "--layouts", *args.layouts, "--patch", args.patch,
                           "--batch", args.batch, "--steps", args.steps, "--warmup", args.warmup,
                           "--channels", *args.channels, "--num-classes", args.num_classes, "--threads", args.threads,
                           "--seed", args.seed, *(["--norm", args.norm] if args.norm else [])])["rows"]
    summary = summarize(rows)
    md = md_table(["model", "precision", "layout", "params M", "patches/s", "s/step", "CPU s/patch", "peak RSS GB"],
                  [[r["model"], r["precision"], r["layout"], r["params_m"], r["patches_per_s"], r["s_per_step"], r["cpu_s_per_patch"],
                    r["peak_rss_gb"]] for r in rows])
    print(md)
    notes = (f"Patches {args.batch}x1x{args.patch}^3, {args.num_classes} classes, channels {tuple(args.channels)}, "
             + (f"medseg's nets with model.norm={args.norm}, " if args.norm else "") +
             f"fastest of {args.steps} timed step(s) after {args.warmup} warm-up, {args.threads} threads, one subprocess per "
             "model and precision" + (" (its layouts' steps interleaved; peak RSS theirs together; "
                                      "layout gains = ratios of the median steps)" if len(args.layouts) > 1 else "") + ". "
             "Ours: engine loss (DiceCE + deep supervision); MONAI: DiceCELoss; SGD for all.")
    ratio_lines = "\n".join(f"- {k}: {v:.2f}" for k, v in summary.items() if "_vs_" in k or k.endswith("_gain"))
    results_dir = args.results or (Path(tempfile.gettempdir()) / "medseg_bench_quick" if args.quick else None)
    cmd = " ".join(["python benchmarks/train_speed.py", *(sys.argv[1:] if argv is None else argv)])
    md_path, _ = write_results("train_speed", f"Training throughput ({args.batch}x1x{args.patch}^3 patches)",
                               f"{notes}\n\n{md}\n\n{ratio_lines}", {"rows": rows, "summary": summary},
                               meta_now(args.threads), command=cmd, **({"out_dir": results_dir} if results_dir else {}))
    print(f"wrote {md_path}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
