"""``medseg train``: train a U-Net variant from a YAML config into a run directory.

Exit status: 0 finished, 2 user error (bad config key or value, missing / empty preprocessed
folder, no foreground, NaN loss), 130 / 143 stopped by Ctrl-C / SIGTERM (``latest.pt`` saved;
continue with ``--resume``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Writes into --out: config.yaml (resolved), plans.json (copied), checkpoints/{latest,best,final}.pt,\n"
        "tensorboard/ (losses, lr, validation Dice, overlays and gate maps), log.txt,\n"
        "validation/summary.json (+ .csv; the last validation, nnU-Net layout, preprocessed grid).\n\n"
        "Several GPUs / machines: torchrun --nproc_per_node=4 -m medseg train --config C ...\n"
        "(batch_size is per process; multi-node: add torchrun's --nnodes / --rdzv_backend=c10d\n"
        "--rdzv_endpoint=HOST:PORT on every node). Look at the run: tensorboard --logdir RUN/tensorboard\n\n"
        "examples:\n"
        "  medseg train --config attention_unet3d --preprocessed pre/Dataset001 --out runs/att\n"
        "  medseg train --out runs/att --resume train.epochs=200     # continue, and train longer"
    )
    parser.add_argument("--config", help="YAML config, or a shipped config's name (attention_unet3d, cbam_unet3d, ...: "
                        "medseg/configs/); default: RUN/config.yaml with --resume, else the built-in defaults "
                        "(a plain 3D U-Net)")
    parser.add_argument("--preprocessed", metavar="DIR",
                        help="preprocessed folder written by `medseg preprocess` (sets data.preprocessed)")
    parser.add_argument("--data", metavar="DIR", help="deprecated spelling of --preprocessed (elsewhere --data is the "
                        "raw dataset)")
    parser.add_argument("-o", "--output", "--out", dest="out", metavar="RUN_DIR",
                        help="run directory to write (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN/checkpoints/latest.pt: model, optimizer, LR schedule, grad scaler, "
                        "epoch and RNG states; a raised train.epochs trains longer")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.epochs=50 model.block_attention.name=cbam data.fold=1")


def preprocessed_folder(args: argparse.Namespace) -> str | None:
    """``--preprocessed``, or its deprecated spelling ``--data`` (with a warning on stderr).

    Raises:
        ConfigError: both given, naming different folders.
    """
    from medseg.errors import ConfigError

    if args.data is None:
        return args.preprocessed
    print("medseg: warning: `medseg train --data` is deprecated; use --preprocessed (--data names the raw "
          "dataset in `medseg preprocess`)", file=sys.stderr)
    if args.preprocessed is not None and args.preprocessed != args.data:
        raise ConfigError(f"--data {args.data} and --preprocessed {args.preprocessed} disagree; give --preprocessed only")
    return args.data


def run(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.train import train
    from medseg.train.signals import exit_code

    config = args.config
    if config is None and args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        config = Path(args.out) / "config.yaml"
    cfg = load_config(config, args.overrides)
    preprocessed = preprocessed_folder(args)
    if preprocessed:
        cfg.data.preprocessed = preprocessed
    out = args.out or str(Path("runs") / cfg.name)
    result = train(cfg, out, resume=args.resume)
    main = os.environ.get("RANK", "0") == "0"
    if result["status"] != "finished":
        if main:
            print(f"stopped early; continue with: medseg train --out {out} --resume")
        return exit_code(result["signal"])
    if main:
        print(f"done: {out} (best mean foreground Dice {result['best_metric']:.4f}); "
              f"tensorboard --logdir {Path(out) / 'tensorboard'}")
    return 0
