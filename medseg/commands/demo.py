"""``medseg demo``: phantoms -> preprocess -> train -> infer -> evaluate on CPU, then print where to look."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Writes under --out: data/ (phantom dataset), preprocessed/, run/ (the training run with\n"
        "tensorboard/), predictions/ (held-out phantoms, in their own geometry), evaluation/summary.json.\n"
        "A second call reuses a finished run and resumes an interrupted one.\n\n"
        "examples:\n"
        "  medseg demo                         # ~10 minutes on 2 CPU cores\n"
        "  medseg demo --minutes 2 --out runs/quick\n"
        "  medseg demo model.block_attention.name=cbam --out runs/demo_cbam"
    )
    parser.add_argument("-o", "--output", "--out", dest="out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--config", help="YAML config or a shipped config's name (default: demo)")
    parser.add_argument("--minutes", type=float, help="training time budget in minutes (default: train.max_minutes "
                        "of the config, 6); the LR schedule is fitted to it")
    parser.add_argument("--train-cases", type=int, default=10, help="phantom cases to train on (default 10)")
    parser.add_argument("--test-cases", type=int, default=4, help="held-out phantom cases to evaluate (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms (default 0)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.epochs=20 model.block_attention.name=cbam")


def run(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.evaluate import format_table
    from medseg.train.demo import run_demo
    from medseg.train.signals import exit_code

    if args.train_cases < 2 or args.test_cases < 1:
        raise ConfigError("--train-cases must be >= 2 and --test-cases >= 1")
    summary = run_demo(args.out, config=args.config, minutes=args.minutes, overrides=args.overrides,
                       n_train=args.train_cases, n_test=args.test_cases, seed=args.seed)
    if summary["status"] != "finished":
        print("demo stopped during training; run the same command again to resume")
        return exit_code(summary["signal"])
    print()
    print(f"Held-out phantoms ({len(summary['metric_per_case'])} cases), per-class mean:")
    print(format_table(summary))
    times = ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items())
    print(f"\ntimings: {times}")
    print(f"evaluation: {Path(args.out) / 'evaluation' / 'summary.json'}")
    print(f"look at the training curves, overlays and attention-gate maps:\n  tensorboard --logdir {Path(summary['run_dir']) / 'tensorboard'}")
    return 0
