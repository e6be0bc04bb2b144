"""Cost of every model in ``configs/`` and of MONAI's UNet / AttentionUnet at the same widths.

For each model: parameters, forward GFLOPs (``torch.utils.flop_counter.FlopCounterMode``: convs,
matmuls and attention; element-wise ops are not counted) and CPU forward time (median of
``--reps`` after one warm-up, the reps interleaved over the models, ``--threads`` threads) in fp32
and under bf16 autocast, on a ``1 x 1 x size^3`` patch, plus ratios against our plain U-Net
(``unet3d``) and MONAI's ``UNet``.
The last printed line is a JSON object with all numbers.

    python benchmarks/model_cost.py                 # every config, 96^3, 3 reps, 2 threads
    python benchmarks/model_cost.py --size 64 --reps 1 --only unet3d attention_unet3d
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = [16, 32, 64, 128, 256]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=Path, default=ROOT / "configs", help="folder of YAML configs (default: configs/)")
    p.add_argument("--only", nargs="*", default=None, help="model names to run (config stems or monai_unet / monai_attention_unet)")
    p.add_argument("--size", type=int, default=96, help="edge of the cubic input patch in voxels (default 96)")
    p.add_argument("--reps", type=int, default=3, help="timed forward passes per precision; the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--num-classes", type=int, default=2, help="output classes when a config leaves model.num_classes at 0 (default 2)")
    p.add_argument("--no-time", action="store_true", help="only parameters and FLOPs (fast)")
    return p.parse_args(argv)


def candidate_models(config_dir: Path, num_classes: int, only: list[str] | None = None) -> dict[str, torch.nn.Module]:
    """Every config in ``config_dir`` plus the two MONAI baselines at WIDTHS (or those named in ``only``)."""
    from medseg.config import ModelConfig, load_config
    from medseg.nn import build_model

    models: dict[str, torch.nn.Module] = {}
    for path in sorted(config_dir.glob("*.yaml")):
        if only and path.stem not in only:
            continue
        cfg = load_config(path).model
        k = cfg.num_classes if cfg.num_classes >= 2 else num_classes
        models[path.stem] = build_model(cfg, num_classes=k, spacing=(1.0, 1.0, 1.0))
    for arch in ("monai_unet", "monai_attention_unet"):
        if only and arch not in only:
            continue
        models[arch] = build_model(ModelConfig(arch=arch, channels=list(WIDTHS)), num_classes=num_classes)
    return models


def gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward GFLOPs, counted on a meta-device copy (shapes only, no arithmetic: instant at any size)."""
    meta = copy.deepcopy(model).eval().to("meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(torch.empty(x.shape, device="meta"))
    return counter.get_total_flops() / 1e9


def time_interleaved(models: dict[str, torch.nn.Module], x: torch.Tensor, reps: int, bf16: bool) -> dict[str, tuple[float, float]]:
    """(median, min) forward seconds per model; the reps run round-robin over the models so that
    load from other processes on a shared machine hits every model alike (the min is the least
    disturbed run: compare it with the median to judge the noise)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for model in models.values():
            model(x)  # warm-up (allocations, oneDNN primitive cache)
        for _ in tqdm(range(reps), desc=f"timing {'bf16' if bf16 else 'fp32'}", file=sys.stderr):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def measure(models: dict[str, torch.nn.Module], args: argparse.Namespace) -> dict[str, dict]:
    x = torch.randn(1, 1, args.size, args.size, args.size)
    rows = {}
    for name, model in models.items():
        model.eval()
        rows[name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gflops": gflops(model, x)}
    if not args.no_time:
        for key, bf16 in (("fp32_s", False), ("bf16_s", True)):
            for name, (med, low) in time_interleaved(models, x, args.reps, bf16).items():
                rows[name][key] = med
                rows[name][key.replace("_s", "_min_s")] = low
    return rows


def add_ratios(rows: dict[str, dict]) -> None:
    for ref_name, tag in (("unet3d", "vs_unet"), ("monai_unet", "vs_monai_unet")):
        ref = rows.get(ref_name)
        if ref is None:
            continue
        for row in rows.values():
            for key in ("gflops", "fp32_s", "bf16_s", "fp32_min_s", "bf16_min_s"):
                if key in row and key in ref:
                    row[f"{key}_{tag}"] = row[key] / ref[key]


def print_table(rows: dict[str, dict]) -> None:
    cols = [
        ("params_m", "params(M)", "{:9.2f}"),
        ("gflops", "GFLOPs", "{:8.1f}"),
        ("fp32_s", "fp32(s)", "{:8.2f}"),
        ("bf16_s", "bf16(s)", "{:8.2f}"),
        ("gflops_vs_unet", "FLOPs/unet", "{:10.2f}"),
        ("fp32_s_vs_unet", "fp32/unet", "{:9.2f}"),
        ("bf16_s_vs_unet", "bf16/unet", "{:9.2f}"),
        ("fp32_min_s_vs_unet", "min fp32/unet", "{:13.2f}"),
        ("bf16_min_s_vs_unet", "min bf16/unet", "{:13.2f}"),
        ("gflops_vs_monai_unet", "FLOPs/monai", "{:11.2f}"),
        ("fp32_s_vs_monai_unet", "fp32/monai", "{:10.2f}"),
    ]
    width = max(len(n) for n in rows) + 2
    print("model".ljust(width) + " ".join(h.rjust(len(f.format(0.0))) for _, h, f in cols))
    for name, row in rows.items():
        cells = [f.format(row[k]) if k in row else "-".rjust(len(f.format(0.0))) for k, _, f in cols]
        print(name.ljust(width) + " ".join(cells))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = candidate_models(args.configs, args.num_classes, args.only)
    rows = measure(models, args)
    add_ratios(rows)
    print(f"input 1x1x{args.size}^3, {args.threads} threads, median of {args.reps}, torch {torch.__version__}")
    print_table(rows)
    print(json.dumps({"size": args.size, "threads": args.threads, "reps": args.reps, "models": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
