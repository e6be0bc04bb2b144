"""Real-CT study: the plain, attention-gated, CBAM and 2.5D U-Nets, same budget each, scored on held-out CT.

For each dataset of ``../shared/data/real_ct`` (``organs``: 2 training CTs, test case scored on
liver and spleen only, as its ``dataset.json`` says; ``lung_lesion``: 1 training CT with manual
LIDC outlines, test CT from pyradiomics):

1. ``medseg.data.preprocess.preprocess_dataset`` with ``configs/real_<dataset>.yaml`` (3 mm voxels,
   CT normalization; organs: 96^3 patches on a strided stem, lesion: 48^3), once, shared by every variant;
2. ``splits.json`` = train on every training case, validate on one of them (the last by name):
   with 2 cases there is nothing to hold out, so the validation Dice is a *training-case*
   number; **the held-out test case is the honest number**;
3. per variant (``configs/{unet3d,attention_unet3d,cbam_unet3d,unet25d}.yaml``: their attention
   settings -- ``arch``, ``block_attention``, ``skip_fusion``, ``slices`` -- on the dataset config's
   backbone and recipe), ``medseg.train.train`` with ``train.max_minutes = --minutes``;
4. ``Predictor.from_run(run, checkpoint="final")`` over ``imagesTs`` (``medseg.infer.runner``), then
   ``medseg.evaluate.evaluate_folders`` against ``labelsTs`` (``scored_labels`` honoured).

Writes ``benchmarks/results/<--name>.{md,json}`` (default ``real_ct_study``) after every run (per-class test Dice and HD95,
training and inference time); work files (preprocessed data, runs, predictions) go to
``--work-dir``, never into the repository. Last stdout line: the JSON summary.

    python benchmarks/real_ct_study.py --minutes 15      # the study as specified (2 x 4 x 15 min of CPU)
    nohup python benchmarks/real_ct_study.py --minutes 3 > /tmp/real_ct_study.log 2>&1 &
    python benchmarks/real_ct_study.py --datasets organs --variants attention unet --seeds 0 1   # 2 seeds each, mean rows
    python benchmarks/real_ct_study.py --datasets lung_lesion --variants attention unet --name real_ct_study_lung_lesion
    python benchmarks/real_ct_study.py --quick           # phantom dataset, seconds per variant: checks the script
    python benchmarks/real_ct_study.py --merge a.json b.json --name real_ct_study_lung_lesion   # seeds run apart, one table

``--merge`` trains nothing: it assembles one table from the ``<name>.json`` of earlier runs (say, one seed per
run, or runs made on different days), one row per variant and seed, a mean row per variant with more than one
seed, and a list of the runs (command, commit, date) the rows come from.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REAL_CT, ROOT, md_table, meta_now, native_bf16_tag, set_threads, write_results  # noqa: E402

DATASETS = {"organs": ROOT / "configs" / "real_organs.yaml", "lung_lesion": ROOT / "configs" / "real_lung_lesion.yaml"}
VARIANTS = {"unet": "unet3d", "attention": "attention_unet3d", "cbam": "cbam_unet3d", "unet25d": "unet25d"}
QUICK_OVERRIDES = ["data.target_spacing=[3.0,3.0,3.0]", "data.patch_size=[64,64,64]", "train.iters_per_epoch=2",
                   "model.channels=[4,8,16,32,64]", "data.num_workers=0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="training budget per variant, wall minutes (default 15)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS), help="default: organs lung_lesion")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="default: all four")
    p.add_argument("--real-ct", type=Path, default=REAL_CT, help="the real_ct folder (default ../shared/data/real_ct)")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "medseg_real_ct_study",
                   help="preprocessed data, runs and predictions (default /tmp/medseg_real_ct_study)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train.seed of each run: one row per variant and seed, plus a mean row per variant when "
                        "more than one (default: the config's seed, one run)")
    p.add_argument("--quick", action="store_true",
                   help="a 2+1-case phantom dataset, tiny nets, a few seconds of training per variant: checks the script")
    p.add_argument("--results", type=Path, default=None, help="folder for <name>.{md,json} (default benchmarks/results)")
    p.add_argument("--name", default="real_ct_study",
                   help="stem of the result files (default real_ct_study; the README's tables: real_ct_study for "
                        "organs, real_ct_study_lung_lesion for the lesion dataset)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="train nothing: one table from earlier runs' <name>.json files (rows of a variant from several "
                        "files become its seed rows and their mean; the same variant and seed twice is refused), "
                        "written as --name")
    p.add_argument("overrides", nargs="*", help="extra section.key=value config overrides for every run")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- steps
VARIANT_KEYS = ("arch", "block_attention", "skip_fusion", "slices", "slice_offset_mm")


def study_config(dataset_cfg: Path, variant: str, *, pre_dir: Path, data_dir: Path, minutes: float, overrides: list[str]):
    """The dataset config (data, training recipe and backbone: widths, strides, norm, deep
    supervision) with the attention settings of ``configs/<variant>.yaml`` (``VARIANT_KEYS``: what
    makes a variant a variant), the budget and the overrides. Every variant of a study thus has
    the same backbone and recipe, and only its attention differs."""
    from medseg.config import apply_overrides, config_from_dict, config_to_dict, load_config

    base = config_to_dict(load_config(dataset_cfg))
    variant_model = config_to_dict(load_config(ROOT / "configs" / f"{VARIANTS[variant]}.yaml").model)
    base["model"].update({k: variant_model[k] for k in VARIANT_KEYS})
    base["name"] = f"{base['name']}_{variant}"
    base["data"].update(dataset=str(data_dir), preprocessed=str(pre_dir))
    base["train"]["max_minutes"] = float(minutes)
    return config_from_dict(apply_overrides(base, overrides))


def prepare(data_dir: Path, pre_dir: Path, cfg) -> tuple[list[str], str]:
    """Preprocess the training cases (once) and write splits.json: train on all, validate on the last."""
    from medseg.data.pipeline import preprocess_dataset
    from medseg.data.splits import write_splits

    report = preprocess_dataset(data_dir, pre_dir, data_cfg=cfg.data, model_cfg=cfg.model, progress=False)
    if not report.ok:
        raise RuntimeError(report.summary())
    names = sorted(report.done + report.skipped)
    val = names[-1]
    write_splits(pre_dir / "splits.json", [{"train": names, "val": [val]}], seed=cfg.data.split_seed, case_names=names)
    return names, val


def predict_run(run_dir: Path, data_dir: Path, pred_dir: Path, checkpoint: str = "final") -> float:
    """Segment ``imagesTs`` with ``run_dir``'s ``checkpoint`` into ``pred_dir``; returns the seconds taken."""
    from medseg.infer.predictor import Predictor
    from medseg.infer.runner import run_inference

    t0 = time.perf_counter()
    predictor = Predictor.from_run(run_dir, checkpoint=checkpoint)
    run_inference(predictor, data_dir / "imagesTs", pred_dir)
    return time.perf_counter() - t0


def score_predictions(pred_dir: Path, data_dir: Path, metrics: tuple[str, ...] = ("dice",)) -> dict:
    """``evaluate_folders`` of ``pred_dir`` against ``labelsTs`` (``scored_labels`` honoured): per-class
    ``test_dice`` (and ``test_hd95`` in mm when asked for), ``test_fg_mean_dice``, ``missing`` cases."""
    from medseg.evaluate import evaluate_folders

    summary = evaluate_folders(pred_dir, data_dir / "labelsTs", dataset_json=data_dir / "dataset.json",
                               metrics=metrics, progress=False)
    names = summary.get("label_names", {})
    dice = {names.get(k, k): v["Dice"] for k, v in summary["mean"].items() if not math.isnan(v.get("Dice", math.nan))}
    out = {"test_dice": dice, "test_fg_mean_dice": summary["foreground_mean"].get("Dice"),
           "missing": summary.get("missing", [])}
    if "hd95" in metrics:
        out["test_hd95"] = {names.get(k, k): v["HD95"] for k, v in summary["mean"].items() if names.get(k, k) in dice}
    return out


def gate_localisation_of(run_dir: Path, data_dir: Path, gates_dir: Path) -> dict:
    """Where the final model's maps look on the test cases (:mod:`medseg.evaluate.gates`): ``imagesTs``
    segmented again, untimed, with the gate maps saved to ``gates_dir`` and scored against ``labelsTs``;
    the mean per map, class and metric (``{}`` for a model without maps)."""
    from medseg.evaluate import evaluate_folders
    from medseg.infer.predictor import Predictor
    from medseg.infer.runner import run_inference

    predictor = Predictor.from_run(run_dir, checkpoint="final")
    if not any(getattr(m, "returns_map", False) for m in predictor.model.modules()):
        return {}
    run_inference(predictor, data_dir / "imagesTs", gates_dir, save_gates=True)
    summary = evaluate_folders(gates_dir, data_dir / "labelsTs", dataset_json=data_dir / "dataset.json",
                               metrics=("dice",), progress=False, gates_dir=gates_dir)
    return summary["gate_localisation"]["mean"]


def gate_cell(mean: dict) -> str:
    """One table cell: per map, the foreground in/out ratio and energy / volume fraction
    (an open gate: ratio 1.00, energy = volume)."""
    cells = []
    for name, by_class in mean.items():
        m = by_class.get("fg", {})
        cells.append(f"{name} {m.get('ratio', math.nan):.2f} ({m.get('energy_fraction', math.nan):.2f} / "
                     f"{m.get('volume_fraction', math.nan):.2f})")
    return "; ".join(cells) or "-"


def run_variant(cfg, data_dir: Path, run_dir: Path, pred_dir: Path, metrics: tuple[str, ...] = ("dice", "hd95")) -> dict:
    """Train, segment ``imagesTs`` with ``final.pt``, score against ``labelsTs``; one row of the study."""
    from medseg.train import train

    t0 = time.perf_counter()
    out = train(cfg, run_dir)
    train_s = time.perf_counter() - t0
    if out["status"] != "finished":  # Ctrl-C / SIGTERM: the engine saved latest.pt and returned
        raise KeyboardInterrupt(f"training interrupted ({out['status']})")
    infer_s = predict_run(run_dir, data_dir, pred_dir)
    n_cases = max(1, len(list((data_dir / "imagesTs").iterdir())))
    try:
        gates = gate_localisation_of(run_dir, data_dir, pred_dir.with_name(pred_dir.name + "_gates"))
    except Exception as err:  # the Dice row stands without the maps
        gates = {"error": f"{type(err).__name__}: {err}"}
    return {"train_s": train_s, "epochs": out["epoch"] + 1, "steps": out["step"],
            "patches": out["step"] * cfg.train.batch_size, "status": out["status"],
            "val_dice_train_case": out.get("final_metric"), **score_predictions(pred_dir, data_dir, metrics),
            "infer_s_per_case": infer_s / n_cases, "gate_localisation": gates}


# --------------------------------------------------------------------------- report
MEAN_KEYS = ("test_fg_mean_dice", "val_dice_train_case", "train_s", "patches", "infer_s_per_case")


def mean_row(rows: list[dict]) -> dict:
    """The mean of several seeds' rows of one variant: per class test Dice and HD95 (a seed without
    that structure predicted has HD95 ``inf``, and so has the mean), the scalar columns, and per gate
    map its in/out ratio and energy / volume fractions (``patches``: the mean rounded to a count).
    Rows with an ``error`` are left out."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {"error": "every seed failed"}

    def mean(values):
        values = [float(v) for v in values if v is not None]
        return sum(values) / len(values) if values else None

    out: dict = {"seeds": len(ok)}
    for key in ("test_dice", "test_hd95"):
        classes = list(dict.fromkeys(c for r in ok for c in r.get(key, {})))
        if classes:
            out[key] = {c: mean(r[key][c] for r in ok if c in r.get(key, {})) for c in classes}
    out.update({k: mean(r.get(k) for r in ok) for k in MEAN_KEYS})
    if out.get("patches") is not None:
        out["patches"] = round(out["patches"])  # a count (the table prints it as one)
    locs = [r["gate_localisation"] for r in ok if r.get("gate_localisation") and "error" not in r["gate_localisation"]]
    if locs:
        out["gate_localisation"] = {
            name: {"fg": {m: mean(loc[name]["fg"].get(m, math.nan) for loc in locs if name in loc)
                          for m in ("ratio", "energy_fraction", "volume_fraction")}}
            for name in dict.fromkeys(n for loc in locs for n in loc)}
    return out


def markdown(results: dict, minutes: float, setup: str) -> str:
    parts = []
    for ds, rows in results.items():
        classes = list(dict.fromkeys(c for r in rows.values() if "test_dice" in r for c in r["test_dice"]))
        hd_classes = list(dict.fromkeys(c for r in rows.values() for c in r.get("test_hd95", {})))
        header = ["variant", *[f"test Dice {c}" for c in classes], "test mean fg Dice",
                  *[f"test HD95 {c} (mm)" for c in hd_classes], "val Dice (train case)",
                  "train min", "patches seen", "infer s / case"]
        gated = any(r.get("gate_localisation") for r in rows.values())
        header += ["gate maps, test fg: in/out ratio (energy / volume fraction)"] if gated else []
        body = []
        for v, r in rows.items():
            if "error" in r:
                body.append([v, *["error"] * len(classes), r["error"][:60], *[""] * len(hd_classes), "", "", "", "",
                             *([""] if gated else [])])
                continue
            loc = r.get("gate_localisation") or {}
            val = r.get("val_dice_train_case")
            body.append([v, *[r["test_dice"].get(c, float("nan")) for c in classes], r["test_fg_mean_dice"],
                         *[float(r.get("test_hd95", {}).get(c, float("nan"))) for c in hd_classes],
                         val if val is not None else float("nan"),
                         r["train_s"] / 60.0, r["patches"], r["infer_s_per_case"],
                         *([loc["error"][:60] if "error" in loc else gate_cell(loc)] if gated else [])])
        parts.append(f"**{ds}**\n\n" + md_table(header, body))
    note = (f"Same wall-clock budget per variant ({minutes:g} min, `train.max_minutes`), {setup}. "
            "The validation Dice is measured on a *training* case (2 organ cases, 1 lesion case: nothing to hold "
            "out); the test columns are the held-out case, scored on its `scored_labels` only (HD95 `inf`: the "
            "structure was not predicted at all). A few minutes of CPU training is far from convergence: these "
            "numbers compare the variants under a tiny budget, nothing more.")
    if any(" mean (" in v for rows in results.values() for v in rows):
        note += " Rows `<variant> mean (n seeds)` average the seeds' rows above them (`--seeds`)."
    if any(r.get("gate_localisation") for rows in results.values() for r in rows.values()):
        note += (" Gate maps (segmented again, untimed): per map, mean map value inside the dilated foreground "
                 "over outside (1.00 = open everywhere, no attention), and the share of its energy inside vs the "
                 "foreground's share of the volume (`medseg evaluate --gates`).")
    return note + "\n\n" + "\n\n".join(parts)


def row_label(variant: str, seed, n_seeds: int) -> str:
    """A seed row's label: ``<variant>`` when the variant has one run, else ``<variant> seed <n>``."""
    return variant if n_seeds == 1 else f"{variant} seed {seed}"


def mean_label(variant: str, n_seeds: int) -> str:
    """The label of a variant's mean row over ``n_seeds`` seeds."""
    return f"{variant} mean ({n_seeds} seeds)"


def setup_of(cfg) -> str:
    """The table note's settings: spacing, patch, batch and precision of a study config."""
    return (f"{'x'.join(f'{v:g}' for v in cfg.data.target_spacing)} mm voxels, "
            f"{'x'.join(map(str, cfg.data.patch_size))} patches, batch {cfg.train.batch_size}, "
            f"precision {cfg.train.precision}")


def merge_runs(runs: list[tuple[str, dict]]) -> tuple[dict, float, list[dict]]:
    """The results of several runs' JSON files (``(file name, parsed JSON)`` pairs) as one:
    ``(results, minutes, sources)``.

    Per dataset and variant the seed rows of every file (mean rows are recomputed, not copied) are
    relabelled ``<variant> seed <n>`` (the bare ``<variant>`` when only one), ordered by seed, with a
    ``<variant> mean (k seeds)`` row when ``k > 1``; each row keeps ``measured`` (the commit and date
    of its run). ``sources``: per file its command line, commit and date.

    Raises:
        ValueError: the files' budgets differ, or a variant and seed come twice.
    """
    budgets, sources, rows = set(), [], {}
    for name, data in runs:
        meta = data.get("meta", {})
        budgets.add(float(data["minutes"]))
        sources.append({"file": name, "argv": meta.get("argv", []), "commit": meta.get("commit"),
                        "date": meta.get("date")})
        for ds, labelled in data["results"].items():
            for label, row in labelled.items():
                if " mean (" in label:
                    continue
                variant = label.split(" seed ")[0]
                seeds = rows.setdefault(ds, {}).setdefault(variant, {})
                seed = row.get("seed")
                if seed in seeds:
                    raise ValueError(f"{name}: {ds} / {variant} seed {seed} is in an earlier file too")
                seeds[seed] = {**row, "measured": {"commit": meta.get("commit"), "date": meta.get("date")}}
    if len(budgets) > 1:
        raise ValueError(f"the runs have different budgets ({sorted(budgets)} min): not one table")
    results: dict = {}
    for ds, variants in rows.items():
        results[ds] = {}
        for variant, seeds in variants.items():
            ordered = [seeds[k] for k in sorted(seeds, key=lambda v: (v is None, v))]
            for row in ordered:
                results[ds][row_label(variant, row.get("seed"), len(ordered))] = row
            if len(ordered) > 1:
                results[ds][mean_label(variant, len(ordered))] = mean_row(ordered)
    return results, budgets.pop(), sources


def merge_main(args: argparse.Namespace, cmd: str) -> int:
    """``--merge``: write ``<--name>.{md,json}`` from earlier runs' JSON files (see :func:`merge_runs`)."""
    parsed = [(p.name, json.loads(p.read_text())) for p in args.merge]
    results, minutes, sources = merge_runs(parsed)
    runs = "\n".join(f"- `python {' '.join(s['argv'])}`: commit `{s['commit']}`, {s['date']}" for s in sources)
    data = parsed[0][1]  # the first run: its setup, overrides and machine
    setup = data.get("setup") or setup_of(study_config(  # runs written before the JSON kept "setup"
        DATASETS[next(iter(results))], "unet", pre_dir=Path("."), data_dir=Path("."), minutes=minutes,
        overrides=list(data.get("overrides") or [])))
    body = markdown(results, minutes, setup) + "\n\nRuns merged (`--merge`):\n" + runs
    commits = ", ".join(dict.fromkeys(str(s["commit"]) for s in sources))
    meta = {**data.get("meta", {}), "commit": commits, "date": " / ".join(dict.fromkeys(str(s["date"]) for s in sources)),
            "loadavg_start": None, "merged": sources}
    write_results(args.name, f"Real CT: variants under the same training budget {native_bf16_tag(meta)}", body,
                  {"results": results, "minutes": minutes, "sources": sources, "setup": setup}, meta, command=cmd,
                  **({"out_dir": args.results} if args.results else {}))
    print(body)
    print(json.dumps({"minutes": minutes, "results": results}, default=float))
    return 0


def quick_dataset(work: Path) -> Path:
    """A phantom stand-in for a real-CT folder: 2 training cases, 1 test case."""
    from medseg.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(work / "phantoms", n_train=2, n_test=1, seed=0, shape=(48, 48, 24))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    overrides = list(args.overrides)
    work = args.work_dir / ("quick" if args.quick else "")
    if args.quick:
        args.minutes, args.datasets = min(args.minutes, 0.1), ["organs"]
        overrides = QUICK_OVERRIDES + overrides
    results: dict[str, dict] = {}
    setup = ""
    meta = meta_now(args.threads)
    results_dir = args.results or (Path(tempfile.gettempdir()) / "medseg_bench_quick" if args.quick else None)
    cmd = " ".join(["python benchmarks/real_ct_study.py", *(sys.argv[1:] if argv is None else argv)])
    if args.merge:
        return merge_main(args, cmd)
    for ds in args.datasets:
        data_dir = quick_dataset(work) if args.quick else args.real_ct / ds
        if not data_dir.is_dir():
            print(f"{data_dir} not found: skipping {ds}", file=sys.stderr)
            continue
        pre_dir = work / ds / "preprocessed"
        base = study_config(DATASETS[ds], "unet", pre_dir=pre_dir, data_dir=data_dir, minutes=args.minutes, overrides=overrides)
        names, val = prepare(data_dir, pre_dir, base)
        setup = setup_of(base)
        print(f"{ds}: training cases {names}, validation on {val}", file=sys.stderr, flush=True)
        results[ds] = {}
        for variant in args.variants:
            seeds = args.seeds or [None]
            seed_rows = []
            for seed in seeds:
                label = row_label(variant, seed, len(seeds))
                extra = [] if seed is None else [f"train.seed={seed}"]
                cfg = study_config(DATASETS[ds], variant, pre_dir=pre_dir, data_dir=data_dir, minutes=args.minutes,
                                   overrides=overrides + extra)
                stamp = time.strftime("%Y%m%d-%H%M%S")
                tag = variant if seed is None else f"{variant}_s{seed}"
                run_dir, pred_dir = work / ds / f"run_{tag}_{stamp}", work / ds / f"pred_{tag}_{stamp}"
                print(f"{ds} / {label}: training {args.minutes:g} min -> {run_dir}", file=sys.stderr, flush=True)
                try:
                    row = run_variant(cfg, data_dir, run_dir, pred_dir)
                except Exception as err:  # one variant failing must not lose the others
                    row = {"error": f"{type(err).__name__}: {err}"}
                row["seed"] = cfg.train.seed
                seed_rows.append(row)
                results[ds][label] = row
                print(f"{ds} / {label}: {json.dumps(row, default=float)}", file=sys.stderr, flush=True)
                if len(seeds) > 1 and len(seed_rows) == len(seeds):
                    results[ds][mean_label(variant, len(seeds))] = mean_row(seed_rows)
                write_results(args.name, f"Real CT: variants under the same training budget {native_bf16_tag(meta)}",
                              markdown(results, args.minutes, setup),
                              {"results": results, "minutes": args.minutes, "seeds": args.seeds, "overrides": overrides,
                               "setup": setup},
                              meta, command=cmd, **({"out_dir": results_dir} if results_dir else {}))
    print(markdown(results, args.minutes, setup))
    print(json.dumps({"minutes": args.minutes, "results": results}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
