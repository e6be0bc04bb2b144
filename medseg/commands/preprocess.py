"""``medseg preprocess``: fingerprint a dataset, plan it, and preprocess every case.

Exit status: 0 when every case was preprocessed, 2 when a case failed for a reason in the data
(missing or corrupt file, grid mismatch, non-CT intensities, undeclared label values, ...),
1 when a case failed unexpectedly (a bug: please report it).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Writes into --out: plans.json (target spacing, normalization, patch size, fingerprint),\n"
        "dataset.json (copied), splits.json (data.num_folds folds made with data.split_seed) and\n"
        "cases/<case>_image.npy, <case>_label.npy, <case>.json (properties; written last).\n"
        "A re-run skips complete cases; empty labels are kept with a warning (negative examples).\n"
        "Refused per case (named with its file): NaN / inf voxels, non-CT intensities, grid mismatches,\n"
        "undeclared label values. Refused for the dataset: case names with '/', '\\' or '..'.\n"
        "nnU-Net v2's 'ignore' label is kept in the label arrays but is no class (not in num_classes).\n"
        "Exit status: 0 all cases done, 2 a case failed for a data reason (named with its file), 1 unexpected error.\n\n"
        "The plan depends on the network (patch size, divisibility): give the model with --config (a file or a\n"
        "shipped name, e.g. attention_unet3d) and/or model.* overrides, as for `medseg train`.\n\n"
        "example: medseg preprocess --data data/Dataset001 --out pre/Dataset001 --workers 4 data.target_spacing=[1,1,2]"
    )
    parser.add_argument("--data", help="dataset folder: nnU-Net v2 (dataset.json + imagesTr/labelsTr), Decathlon, "
                        "or images/ + labels/ (default: data.dataset of --config)")
    parser.add_argument("-o", "--output", "--out", dest="out",
                        help="preprocessed output folder (default: data.preprocessed of --config)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes for fingerprint and preprocessing (default 1)")
    parser.add_argument("--config", help="YAML config or a shipped config's name; its data section, and the model's "
                        "first-stage width and total stride "
                        "(the suggested patch size fits data.memory_budget_gb for that network)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo everything in --out (needed when the data settings changed since the last run)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (as --quiet, which also "
                        "keeps the log to warnings)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides of the data and model sections, e.g. data.normalization=window "
                        "data.hu_window=[-200,300] model.channels=[32,64,128,256]")


def run(args: argparse.Namespace) -> int:
    from medseg.cli import show_progress
    from medseg.config import load_config
    from medseg.data.pipeline import preprocess_dataset
    from medseg.errors import ConfigError

    bad = [o for o in args.overrides if not o.startswith(("data.", "model."))]
    if bad:
        raise ConfigError(f"override '{bad[0]}': `medseg preprocess` takes data.* and model.* overrides only "
                          "(the plan depends on both)")
    cfg = load_config(args.config, args.overrides)
    data, out = args.data or cfg.data.dataset, args.out or cfg.data.preprocessed
    if not data:
        raise ConfigError("no dataset folder: pass --data DIR (or set data.dataset in --config)")
    if not out:
        raise ConfigError("no output folder: pass --out DIR (or set data.preprocessed in --config)")
    if args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    report = preprocess_dataset(data, out, workers=args.workers, data_cfg=cfg.data, model_cfg=cfg.model, overwrite=args.overwrite,
                                progress=show_progress(args) and not args.no_progress)
    print(report.summary())
    if report.ok:
        return 0
    print(f"medseg: error: {len(report.failed)} of {report.total} case(s) failed (reasons above)", file=sys.stderr)
    return 1 if report.unexpected else 2
