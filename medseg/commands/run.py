"""``medseg run``: the whole job on a dataset of your own: preprocess -> train -> infer -> evaluate.

Exit status: 0 finished, 2 user error (bad dataset, config or overrides; a folder made with other
settings), 130 / 143 stopped by Ctrl-C / SIGTERM during training (run the same command again to
continue).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Writes under --out: preprocessed/ (medseg preprocess), run/ (medseg train: checkpoints/, tensorboard/),\n"
        "predictions/ (medseg infer on DATASET/imagesTs, each mask in its input's geometry),\n"
        "evaluation/summary.json + .csv (medseg evaluate against DATASET/labelsTs, dataset.json's scored_labels\n"
        "honoured) and job.json (the finished steps). Running the same command again does not redo a finished\n"
        "step: it continues an interrupted training from its latest checkpoint and an interrupted inference\n"
        "from the first case not written. Other settings on the same --out are refused (use another --out).\n"
        "Without imagesTs the job ends after training; without labelsTs after inference.\n\n"
        "examples:\n"
        "  medseg run --data data/Dataset001_Liver --config attention_unet3d --out runs/liver\n"
        "  medseg run --data data/Dataset001_Liver --config real_organs --minutes 15 model.arch=unet3d\n"
        "  medseg demo      # the same job on generated phantoms"
    )
    parser.add_argument("--data", required=True, metavar="DATASET",
                        help="dataset folder: nnU-Net v2 (dataset.json + imagesTr/labelsTr, optional imagesTs/labelsTs), "
                        "Decathlon, or images/ + labels/ (no test set: the job ends after training)")
    parser.add_argument("--config", help="YAML config or a shipped config's name (attention_unet3d, real_organs, ...; "
                        "default: the built-in defaults, a plain 3D U-Net)")
    parser.add_argument("-o", "--output", "--out", dest="out", metavar="DIR",
                        help="job folder (default: runs/<dataset folder name>)")
    parser.add_argument("--minutes", type=float, help="training time budget in minutes (train.max_minutes); the LR "
                        "schedule is fitted to it")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes for preprocessing and evaluation (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.epochs=50 model.block_attention.name=cbam")


def run(args: argparse.Namespace) -> int:
    from medseg.cli import show_progress
    from medseg.commands.demo import format_timings, use_idle_cores
    from medseg.errors import ConfigError
    from medseg.evaluate import format_table
    from medseg.pipelines.job import load_job_config, run_job
    from medseg.train.signals import exit_code

    if args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    cfg = load_job_config(args.config, args.overrides, args.minutes)
    out = Path(args.out or Path("runs") / Path(args.data).resolve().name)
    use_idle_cores()
    job = run_job(args.data, out, cfg, workers=args.workers, progress=show_progress(args))
    if job["status"] != "finished":
        print(f"stopped during training; run the same command again to continue ({out})")
        return exit_code(job["signal"])
    if job["evaluation"] is not None:
        summary = job["evaluation"]
        print(f"\n{Path(args.data) / 'imagesTs'} ({len(summary['metric_per_case'])} cases), per-class mean:")
        print(format_table(summary))
        print(f"evaluation: {out / 'evaluation' / 'summary.json'}")
    elif job["predictions"] is not None:
        print(f"predictions: {job['predictions']} (no labelsTs to evaluate against)")
    else:
        print(f"trained: {job['run_dir']} (no imagesTs to segment)")
    if job["timings_s"]:
        print(f"timings: {format_timings(job['timings_s'])}")
    print(f"look at the training curves, overlays and attention-gate maps:\n  tensorboard --logdir {Path(job['run_dir']) / 'tensorboard'}")
    return 0
