"""Cost of every model in ``configs/`` and of MONAI's UNet / AttentionUnet at the same widths.

For each model: parameters, forward GFLOPs (``torch.utils.flop_counter.FlopCounterMode``: convs,
matmuls and attention; element-wise ops are not counted) and CPU forward time (median of
``--reps`` after one warm-up, the reps interleaved over the models, ``--threads`` threads) in fp32
and under bf16 autocast, on a ``1 x 1 x size^3`` patch, plus ratios against the plain net of the
same dimensionality (``unet3d`` for 3-D configs, ``unet25d`` for 2.5-D ones: ``model.slices > 1``;
``*_vs_plain``) and against MONAI's ``UNet`` (``*_vs_monai_unet``), and the attention maps each
model hands out (``model(x, return_attention=True)``, counted on the meta device).

Every ``*.yaml`` of ``--configs`` is a model (a config without a ``model`` section gets the
default U-Net), so configs added later are covered without a change here. The model-zoo table
(``benchmarks/results/model_zoo.{md,json}``: config, variant, paper, FLOPs and params vs plain,
time ratios, maps) goes to README.md's "Model zoo" section with ``benchmarks/update_readme.py``;
``--no-time`` (FLOPs and parameters only, seconds) writes it with the time columns "pending".
The last printed line is a JSON object with all numbers.

    python benchmarks/model_cost.py                 # every config, 96^3, 3 reps, 2 threads (an idle machine)
    python benchmarks/model_cost.py --no-time       # FLOPs / params / maps only: seconds
    python benchmarks/model_cost.py --size 64 --reps 1 --only unet3d attention_unet3d
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, meta_now, write_results  # noqa: E402

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
    p.add_argument("--no-time", action="store_true", help="only parameters, FLOPs and maps (fast); time columns 'pending'")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="time bf16 autocast too: auto = only on a CPU with native bf16 (elsewhere autocast emulates it, "
                        "tens of times slower, and says nothing of a real bf16 machine); default auto")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder for model_zoo.{md,json} (default benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    return p.parse_args(argv)


PLAIN_3D, PLAIN_25D = "unet3d", "unet25d"
# paper of each attention setting (block attention / bottleneck / skip fusion / 2.5D)
PAPERS = {"se": "Hu et al. 2018", "eca": "Wang et al. 2020", "cbam": "Woo et al. 2018", "bam": "Park et al. 2018",
          "nonlocal": "Wang et al. 2018", "abn": "Fukui et al. 2019", "gate": "Oktay et al. 2018",
          "aff": "Dai et al. 2021", "iaff": "Dai et al. 2021", "va": "Wang et al. 2019 (MICCAI)"}
PLAIN_PAPER = "Çiçek et al. 2016; Isensee et al. 2021"


def plain_of(cfg) -> str:
    """The plain net a config is compared with: ``unet25d`` for 2.5D (``model.slices > 1``), else ``unet3d``."""
    return PLAIN_25D if int(getattr(cfg, "slices", 1) or 1) > 1 else PLAIN_3D


def _named(value) -> str | None:
    from medseg.registry import is_none_name

    return None if value is None or is_none_name(value) else str(value)


def describe(cfg) -> tuple[str, str]:
    """``(variant, paper)`` of a model config, read from its attention settings."""
    parts, papers = [], []
    block = _named(cfg.block_attention.name)
    if block:
        where = {"both": "encoder + decoder"}.get(str(cfg.block_attention.where), str(cfg.block_attention.where))
        parts.append(f"{block} ({where})")
    bottleneck = _named(cfg.block_attention.bottleneck)
    if bottleneck:
        parts.append(f"{bottleneck} on the bottleneck")
    fusion = _named(cfg.skip_fusion.name)
    if fusion and fusion != "concat":
        parts.append(f"{fusion} skips")
    if int(getattr(cfg, "slices", 1) or 1) > 1:
        parts.append(f"2.5D, {cfg.slices} slices")
    if cfg.arch != "unet":
        parts.append(cfg.arch)
    if list(cfg.channels) != WIDTHS:
        parts.append(f"channels {cfg.channels[0]}-{cfg.channels[-1]}")
    stem = cfg.strides[0] if cfg.strides else 1
    stem = max(stem) if isinstance(stem, (list, tuple)) else stem
    if int(stem) > 1:
        parts.append(f"stride-{stem} stem")
    for name in (block, bottleneck, fusion):
        if name in PAPERS and PAPERS[name] not in papers:
            papers.append(PAPERS[name])
    return ", ".join(parts) or "plain U-Net", "; ".join(papers) or PLAIN_PAPER


def map_names(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """The names of the maps ``model(x, return_attention=True)`` returns (a meta-device forward)."""
    meta = copy.deepcopy(model).eval().to("meta")
    with torch.no_grad():
        try:
            out = meta(torch.empty(x.shape, device="meta"), return_attention=True)
        except TypeError:  # a model without attention maps (MONAI's baselines)
            return []
    return sorted(out[1]) if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) else []


def compact_maps(names: list[str]) -> str:
    """``gate/level1, gate/level2, gate/level3`` -> ``gate/level1-3`` (runs of consecutive indices)."""
    groups: dict[str, list[int]] = {}
    plain = []
    for n in names:
        m = re.fullmatch(r"(.*?)(\d+)", n)
        if m:
            groups.setdefault(m.group(1), []).append(int(m.group(2)))
        else:
            plain.append(n)
    out = []
    for stem, idx in groups.items():
        idx.sort()
        runs, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        out.append(f"{stem}{','.join(runs)}")
    return ", ".join(out + plain) or "none"


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
        variant, paper = describe(cfg)
        models[path.stem].cost_info = {"config": f"configs/{path.name}", "plain": plain_of(cfg), "variant": variant,
                                       "paper": paper}
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
        rows[name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gflops": gflops(model, x),
                      **getattr(model, "cost_info", {"plain": PLAIN_3D}), "maps": map_names(model, x)}
    if not args.no_time:
        for key, bf16 in (("fp32_s", False), ("bf16_s", True))[: 2 if time_bf16(args) else 1]:
            for name, (med, low) in time_interleaved(models, x, args.reps, bf16).items():
                rows[name][key] = med
                rows[name][key.replace("_s", "_min_s")] = low
    return rows


def time_bf16(args: argparse.Namespace) -> bool:
    """Whether bf16 is timed (``--bf16``; auto: the CPU has native bf16)."""
    from medseg.runtime import cpu_supports_bf16

    return args.bf16 == "on" or (args.bf16 == "auto" and cpu_supports_bf16())


def add_ratios(rows: dict[str, dict]) -> None:
    """``<key>_vs_plain`` (against the row's plain net of the same dimensionality) and
    ``<key>_vs_monai_unet`` for FLOPs, parameters and times, where both rows have the key."""
    for row in rows.values():
        for ref_name, tag in ((row.get("plain", PLAIN_3D), "vs_plain"), ("monai_unet", "vs_monai_unet")):
            ref = rows.get(ref_name)
            if ref is None:
                continue
            for key in ("gflops", "params_m", "fp32_s", "bf16_s", "fp32_min_s", "bf16_min_s"):
                if key in row and key in ref:
                    row[f"{key}_{tag}"] = row[key] / ref[key]


def print_table(rows: dict[str, dict]) -> None:
    cols = [
        ("params_m", "params(M)", "{:9.2f}"),
        ("gflops", "GFLOPs", "{:8.1f}"),
        ("fp32_s", "fp32(s)", "{:8.2f}"),
        ("bf16_s", "bf16(s)", "{:8.2f}"),
        ("gflops_vs_plain", "FLOPs/plain", "{:11.2f}"),
        ("params_m_vs_plain", "params/plain", "{:12.2f}"),
        ("fp32_s_vs_plain", "fp32/plain", "{:10.2f}"),
        ("bf16_s_vs_plain", "bf16/plain", "{:10.2f}"),
        ("fp32_min_s_vs_plain", "min fp32/plain", "{:14.2f}"),
        ("bf16_min_s_vs_plain", "min bf16/plain", "{:14.2f}"),
        ("gflops_vs_monai_unet", "FLOPs/monai", "{:11.2f}"),
        ("fp32_s_vs_monai_unet", "fp32/monai", "{:10.2f}"),
    ]
    width = max(len(n) for n in rows) + 2
    print("model".ljust(width) + " ".join(h.rjust(len(f.format(0.0))) for _, h, f in cols))
    for name, row in rows.items():
        cells = [f.format(row[k]) if k in row else "-".rjust(len(f.format(0.0))) for k, _, f in cols]
        print(name.ljust(width) + " ".join(cells))


# what each map prefix means (the factor it is, or a stated function of it; README "Model zoo")
MAP_MEANING = {
    "gate": "additive gate alpha in [0, 1] multiplied into the skip: 0 suppresses it, 1 passes it (with residual: true, 1 + alpha: 0 passes, 1 doubles)",
    "cbam": "CBAM spatial factor in [0, 1]: 0 suppresses the voxel in every channel, 1 passes it",
    "bam": "channel mean of sigmoid(Mc + Ms) in [0, 1]; features x (1 + it): 0 leaves them, 1 doubles them",
    "aff": "channel mean of the fusion weight M in [0, 1]: 1 takes the skip, 0 the upsampled decoder path",
    "iaff": "as aff, for the second (outer) fusion of iAFF",
    "abn": "learned attention map M in [0, 1]; bottleneck features x (1 + M): 0 leaves them, 1 doubles them "
           "(with residual: false, x M: 0 suppresses, 1 passes)",
    "va": "channel mean of the applied factor Mc(z) * Ms(z) in [0, 1] (from the slice's z feature bag): "
          "0 suppresses the pixel of slice z in every channel, 1 passes it",
}


def zoo_markdown(rows: dict[str, dict], args: argparse.Namespace) -> str:
    """The model-zoo table: one row per config (MONAI baselines left out), ratios to the plain net
    of the same dimensionality; times 'pending' without a timed run."""
    def ratio(row, key):
        v = row.get(f"{key}_vs_plain")
        if v is None:
            return "pending" if args.no_time else "n/a"
        return f"{v:.2f}"

    table = []
    for name, row in rows.items():
        if "config" not in row:
            continue
        table.append([f"`{name}`", row["variant"], row["paper"], f"`{row['config']}`", f"{row['gflops']:.1f}",
                      ratio(row, "gflops"), f"{row['params_m']:.2f}", ratio(row, "params_m"), ratio(row, "fp32_s"),
                      ratio(row, "bf16_s"), f"`{compact_maps(row['maps'])}`".replace("`none`", "none"), row["plain"]])
    head = ["config", "variant", "paper", "file", "GFLOPs", "FLOPs vs plain", "params M", "params vs plain",
            "fp32 time vs plain", "bf16 time vs plain", "maps returned", "plain"]
    prefixes = sorted({n.split("/")[0] for r in rows.values() for n in r.get("maps", [])})
    legend = "\n".join(f"- `{p}/...`: {MAP_MEANING.get(p, 'see the attention-map table under Inspecting gate maps')}"
                        for p in prefixes)
    timed = "" if args.no_time else f", times: median of {args.reps} forward passes, {args.threads} threads"
    return (f"Forward cost on a 1x1x{args.size}^3 patch (FLOPs counted by torch's FlopCounterMode: convolutions, "
            f"matmuls, attention{timed}); \"plain\" is the plain net of the same dimensionality "
            f"(`{PLAIN_3D}` for 3-D configs, `{PLAIN_25D}` for 2.5-D ones)."
            + (" Time ratios \"pending\": not yet measured on an idle machine." if args.no_time else "")
            + (" bf16 \"n/a\": this CPU has no native bf16 (autocast would emulate it), so bf16 was not timed."
               if not args.no_time and not time_bf16(args) else "") + "\n\n" + md_table(head, table) + "\n\nWhat the maps mean:\n\n" + legend)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = candidate_models(args.configs, args.num_classes, args.only)
    rows = measure(models, args)
    add_ratios(rows)
    print(f"input 1x1x{args.size}^3, {args.threads} threads, median of {args.reps}, torch {torch.__version__}")
    print_table(rows)
    if not args.no_write:
        md, _ = write_results("model_zoo", "Model zoo: cost and maps of every shipped config", zoo_markdown(rows, args),
                              {"size": args.size, "threads": args.threads, "reps": args.reps, "timed": not args.no_time,
                               "models": rows}, meta_now(args.threads, argv and ["benchmarks/model_cost.py", *argv]),
                              command="python benchmarks/model_cost.py" + (" --no-time" if args.no_time else ""),
                              out_dir=args.results)
        print(f"wrote {md}")
    print(json.dumps({"size": args.size, "threads": args.threads, "reps": args.reps, "models": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
