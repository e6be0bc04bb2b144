"""``medseg evaluate``: score predicted label maps against references -> summary.json + CSV + table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medseg.errors import InputError

EPILOG = """\
output:
  summary.json in nnU-Net's layout: "metric_per_case" (one entry per case with "prediction_file",
  "reference_file" and "metrics": {"<label>": {"Dice", "IoU", "HD95", "ASSD", "NSD" (those asked for),
  "n_pred", "n_ref", "TP", "FP", "FN", "TN"}}), "mean" (per class), "foreground_mean" (mean of the
  class means), plus "missing" (reference cases without a prediction) and "label_names".
  A CSV beside it has one row per case and class. A per-class table is printed at the end.

conventions:
  - a class absent from both prediction and reference: Dice (and every metric) is NaN and is left
    out of the means; exactly one of them empty: Dice = IoU = NSD = 0, HD95 = ASSD = inf (a mean
    that includes an inf is inf, so a missed organ shows).
  - surface = mask XOR its 6-connected erosion; distances in mm from the reference's spacing;
    HD95 = max of the two directed 95th percentiles (as MONAI); ASSD = mean of both directions'
    distances; NSD = fraction of both surfaces within --nsd-tolerance mm (Nikolov et al. 2021).
  - cases are matched by file name without suffix (.nii.gz .nii .nrrd .nhdr .mha .mhd) and without a
    trailing _0000; any supported format on either side.
  - a prediction on a permuted / flipped grid of the same physical space (e.g. LAS vs LPS of the
    same scan) is reoriented without interpolation; any other grid difference is an error (exit 2).
  - dataset.json (--dataset-json, else found in the reference folder or its parent; nnU-Net v2
    {"liver": 1} or Decathlon {"1": "liver"} labels) gives class names and may restrict the
    classes scored per case, either at top level
    "scored_labels": {"case": [1, 2]} or inside a "test"/"training" entry
    {"image": ..., "label": "./labelsTs/case.nii.gz", "scored_labels": [1, 2]}.
  - nnU-Net v2's "ignore" label in dataset.json: reference voxels holding it are left out of
    every metric of every class, and it is never scored as a class.

gate localisation (--gates [DIR]): each map of DIR/<case>_gates/<map>.nii.gz (what `medseg infer
  --save-gates` writes; DIR defaults to --pred) against the case's reference, per class and for the
  whole foreground ("fg"), each class dilated by --gate-margin mm: energy_fraction (share of the map's
  sum inside the class), volume_fraction (the class's share of the volume: what a flat map scores),
  mean_inside, mean_outside and their ratio (1 for a flat map). Written to summary.json under
  "gate_localisation" ("per_case", "mean", "missing"), and printed as a second table.

exit status: 0 ok; 1 some reference cases have no prediction (unless --allow-missing); 2 bad input.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--pred", required=True, type=Path, metavar="DIR", help="folder of predicted label maps")
    parser.add_argument("--ref", required=True, type=Path, metavar="DIR", help="folder of reference label maps (every case in it is scored)")
    parser.add_argument("--labels", metavar="LIST", default=None,
                        help="comma-separated classes to score, as values or dataset.json names (e.g. 1,2 or liver,spleen); "
                        "default: the labels of dataset.json, else every label found in the references")
    parser.add_argument("--metrics", metavar="LIST", default="dice,iou",
                        help="comma-separated metrics out of dice,iou,hd95,assd,nsd, or 'all' (default: dice,iou; "
                        "surface metrics cost more on large volumes)")
    parser.add_argument("--nsd-tolerance", type=float, default=2.0, metavar="MM", help="NSD tolerance in mm (default: 2.0)")
    parser.add_argument("-o", "--output", "--out", dest="output", type=Path, default=None, metavar="PATH",
                        help="where the results go: a .json file, or a folder that gets summary.json "
                        "(default: <pred>/summary.json)")
    parser.add_argument("--csv", type=Path, default=None, metavar="CSV",
                        help="per-case, per-class CSV to write (default: the summary path with .csv)")
    parser.add_argument("--dataset-json", default="auto", metavar="PATH",
                        help="dataset.json with class names and per-case scored_labels; 'auto' (default) looks in the "
                        "reference folder and its parent, 'none' ignores it")
    parser.add_argument("--allow-missing", action="store_true",
                        help="exit 0 even when some reference cases have no prediction (they are still listed in "
                        "summary.json 'missing' and left out of the means)")
    parser.add_argument("--gates", nargs="?", const="", default=None, metavar="DIR",
                        help="also measure where the attention maps of DIR/<case>_gates/ look (default DIR: --pred); "
                        "see 'gate localisation' below")
    parser.add_argument("--gate-margin", type=float, default=None, metavar="MM",
                        help="dilation of each reference class for --gates, mm (default: 5.0; 0: none)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="processes scoring cases in parallel (default: 1)")


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def summary_path(output: Path | None, pred: Path) -> Path:
    """``-o/--output/--out``: a path ending in ``.json`` is the summary file; anything else is a folder
    (as ``--out`` of the other commands) that gets ``summary.json``; none: ``<pred>/summary.json``."""
    if output is None:
        return pred / "summary.json"
    return output if output.suffix.lower() == ".json" else output / "summary.json"


def run(args: argparse.Namespace) -> int:
    from medseg.cli import show_progress
    from medseg.evaluate import ALL_METRICS, evaluate_folders, format_table, write_summary
    from medseg.evaluate.gates import format_gate_table

    metrics = list(ALL_METRICS) if args.metrics.strip().lower() == "all" else [m.lower() for m in _split(args.metrics)]
    if not metrics:
        raise InputError("--metrics: give at least one of dice,iou,hd95,assd,nsd")
    if args.workers < 1:
        raise InputError(f"--workers: must be >= 1, got {args.workers}")
    if not (args.nsd_tolerance >= 0) or args.nsd_tolerance == float("inf"):
        raise InputError(f"--nsd-tolerance: must be a finite number >= 0 mm, got {args.nsd_tolerance}")
    if args.gate_margin is not None and (not (args.gate_margin >= 0) or args.gate_margin == float("inf")):
        raise InputError(f"--gate-margin: must be a finite number >= 0 mm, got {args.gate_margin}")
    gates_dir = None if args.gates is None else Path(args.gates) if args.gates else args.pred
    summary = evaluate_folders(
        args.pred,
        args.ref,
        labels=_split(args.labels) or None,
        metrics=metrics,
        nsd_tolerance_mm=args.nsd_tolerance,
        dataset_json=args.dataset_json,
        workers=args.workers,
        progress=None if show_progress(args) else False,  # None: a bar on a terminal
        gates_dir=gates_dir,
        gate_margin_mm=args.gate_margin,
    )
    json_path, csv_path = write_summary(summary, summary_path(args.output, args.pred), args.csv)
    print(format_table(summary))
    if "gate_localisation" in summary:
        print("\n" + format_gate_table(summary["gate_localisation"], summary.get("label_names")))
    print(f"wrote {json_path} and {csv_path} ({len(summary['metric_per_case'])} cases)")
    missing = summary["missing"]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        print(f"medseg: warning: {len(missing)} reference case(s) have no prediction in {args.pred}: {shown} "
              f"(listed under 'missing' in {json_path.name})", file=sys.stderr)
        if not args.allow_missing:
            return 1
    return 0
