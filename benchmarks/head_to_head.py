"""Head to head on real CT: the stock MONAI recipe, nnU-Net v2 and medseg's variants, same budget each.

Contenders (``--contenders``, run in this order):

- ``stock_monai``: MONAI's 3D segmentation tutorial recipe (``stock_monai.train_stock_recipe`` /
  ``predict_stock_recipe``): Orientationd RAS, Spacingd 3 mm, ScaleIntensityRanged -175..250 HU ->
  0..1 clipped, CropForegroundd, CacheDataset, 4 x 64^3 RandCropByPosNegLabeld patches per step,
  random flips / rot90 / intensity shift, MONAI ``UNet`` (16..256, 2 residual units, batch norm),
  DiceCELoss, AdamW 1e-3 (constant, as in the tutorial); sliding window 64^3, overlap 0.5, Gaussian,
  Invertd back to the original grid.
- ``medseg`` (one row per ``--variants`` entry): exactly ``real_ct_study.py``'s training and scoring
  (``configs/real_<dataset>.yaml`` + the variant's ``model`` section, ``train.max_minutes``,
  ``Predictor.from_run(run, checkpoint="final")``), plus the positional ``overrides``.
- ``nnunet``: nnU-Net v2's own planner, preprocessing, ``3d_fullres`` trainer (fold ``all``) stopped
  by the clock, and predictor without TTA (``nnunet_budget.py`` says how and why). Skipped, with the
  reason in its row, when ``nnunetv2`` is not installed (``pip install -e '.[bench]'``, see README).

Fairness rules:

- same data: trained on ``imagesTr``/``labelsTr`` of one dataset of ``../shared/data/real_ct``, scored
  on ``imagesTs``/``labelsTs`` in the original geometry by the same function
  (``medseg.evaluate.evaluate_folders``: Dice and HD95, the test case's ``scored_labels`` only);
- same wall-clock budget for the training loop (``--minutes``); each contender's preprocessing
  (medseg's and nnU-Net's preprocessing, MONAI's CacheDataset) runs before its clock starts and is
  reported (``prep s``); whatever a recipe does inside its loop (medseg's validation, nnU-Net's
  pseudo-validation and checkpoints) counts;
- same machine, one process per contender, one after the other (never in parallel), the same torch
  threads (``--threads``) and data-loading workers (``--workers``);
- same precision policy: ``auto`` (bf16 autocast on a CPU with native bf16, else fp32) for medseg and
  the stock recipe; nnU-Net keeps its own (autocast on CUDA only: fp32 on a CPU); the ``precision``
  column says what ran;
- no test-time augmentation for anyone.

Dice-vs-minutes curve: each contender is scored with its weights at the marks (``--marks``, default
1/3, 2/3 and all of the budget): one training run, not three, so the LR schedule is that of the full
budget. medseg: this script saves the model's weights after the first training step that ends past a
mark (a wrapper around the engine's step, :func:`medseg_snapshots`); stock MONAI: the same, in its
loop; nnU-Net: the same, in its trainer (``nnunet_budget.py``). The last point is the
final model; each point records the minute it was actually taken at. medseg's final point applies the
post-processing its run chose at its end-of-budget validation (``postprocessing.json``); the earlier
points have none, as no validation had run by then.

Each row records the commit it was measured on; ``--keep-others`` reruns some contenders (medseg after
a recipe change) and keeps the other rows of the existing ``<--name>.json`` with their commits.

Writes ``benchmarks/results/<--name>.{md,json}`` (default ``head_to_head``; a temp folder with ``--quick``) after every
contender; work files (preprocessed data, runs, predictions) go to ``--work-dir``. The last stdout
line is the JSON summary.

    python benchmarks/head_to_head.py                      # organs, 15 min each: stock MONAI, medseg attention + unet, nnU-Net
    python benchmarks/head_to_head.py --contenders medseg --variants attention train.lr=0.003
    python benchmarks/head_to_head.py --quick              # phantoms, tiny nets, seconds each: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REAL_CT, RESULTS, md_table, meta_now, native_bf16_tag, repo_relative, run_child,  # noqa: E402
                     set_threads, write_results)
from nnunet_budget import NNUNET_MISSING  # noqa: E402,F401  (the skip message of the nnunet row)
from real_ct_study import DATASETS, QUICK_OVERRIDES, VARIANTS, quick_dataset  # noqa: E402

CONTENDERS = ("stock_monai", "medseg", "nnunet")
METRICS = ("dice", "hd95")
QUICK_STOCK = {"spacing": 3.0, "roi": 32, "channels": (4, 8, 16, 32, 64)}
QUICK_NNUNET = {"iters": 2, "val_iters": 1}


def workers_for(value: str | int, threads: int, cores: int | None = None) -> int:
    """``--workers``: an integer >= 0 as given; ``auto``: what medseg's ``data.num_workers=auto`` resolves to on
    this machine's CPU with ``threads`` torch threads (:func:`medseg.train.data.resolve_num_workers`)."""
    from medseg.train.data import resolve_num_workers

    if str(value) == "auto":
        return resolve_num_workers("auto", "cpu", cores=cores or os.cpu_count() or 1, threads=threads)
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise SystemExit(f"--workers: expected auto or an integer >= 0, got {value!r}")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="organs", choices=list(DATASETS),
                   help="dataset of --real-ct: train on imagesTr/labelsTr, score imagesTs/labelsTs (default organs)")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget per contender (default 15)")
    p.add_argument("--marks", type=float, nargs="+", default=None,
                   help="minutes at which to score the weights of the run so far (default: 1/3, 2/3 and all of --minutes)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS,
                   help="what to run, in this order (default: stock_monai medseg nnunet)")
    p.add_argument("--variants", nargs="+", default=["attention", "unet"], choices=list(VARIANTS),
                   help="medseg variants, one row each (default: attention unet)")
    p.add_argument("--nnunet-config", default="3d_fullres", choices=["3d_fullres", "3d_lowres", "2d"],
                   help="nnU-Net configuration to train (default 3d_fullres: 3D organs, few cases; see README)")
    p.add_argument("--nnunet-memory-gb", type=float, default=None,
                   help="memory target of nnU-Net's planner, which sizes its patch (default: nnU-Net's 8 GB of GPU memory)")
    p.add_argument("--real-ct", type=Path, default=REAL_CT, help="the real_ct folder (default ../shared/data/real_ct)")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "medseg_head_to_head",
                   help="preprocessed data, runs, checkpoints and predictions (default /tmp/medseg_head_to_head)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of every contender (default 2)")
    p.add_argument("--workers", default="auto",
                   help="data-loading / augmentation worker processes, the same for every contender: an integer, or auto "
                        "(the default): what medseg's own default (data.num_workers=auto) picks on this machine for "
                        "--threads torch threads on the CPU (0 on a 2-core CPU: the batch loaded between steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of medseg (train.seed) and the stock recipe; nnU-Net does not seed (default 0)")
    p.add_argument("--quick", action="store_true",
                   help="a 2+1-case phantom dataset, tiny nets and patches, 0.1 min each (at most): checks the script")
    p.add_argument("--results", type=Path, default=None,
                   help="folder for <name>.{md,json} (default benchmarks/results; a temp folder with --quick)")
    p.add_argument("--name", default="head_to_head",
                   help="result file name: writes <results>/<name>.{md,json} (default head_to_head; "
                        "head_to_head_fp32 is the table of a CPU without native bf16)")
    p.add_argument("--keep-others", action="store_true",
                   help="keep the rows of the contenders not run this time from the existing <name>.json "
                        "(same dataset, budget, marks, threads and workers; each row keeps the commit it was measured on): rerun "
                        "medseg after a recipe change without rerunning stock MONAI and nnU-Net")
    p.add_argument("overrides", nargs="*", help="extra section.key=value config overrides for the medseg runs")
    # child mode (internal): run one contender, print its JSON row
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workers = workers_for(args.workers, args.threads)
    if args.quick:
        args.minutes, args.workers = min(args.minutes, 0.1), 0
    marks = args.marks or [args.minutes / 3, 2 * args.minutes / 3]
    args.marks = sorted({m for m in marks if 0 < m < args.minutes} | {args.minutes})  # the final model is always a point
    return args


# --------------------------------------------------------------------------- children
def test_images(data_dir: Path) -> list[tuple[str, Path]]:
    from medseg.data.datasets import discover_cases

    return [(c.name, c.images[0]) for c in discover_cases(data_dir).test_cases]


def curve_point(snap: dict, pred_dir: Path, data_dir: Path, infer_s: float) -> dict:
    from real_ct_study import score_predictions

    return {"mark_min": snap["mark_min"], "at_min": snap["at_min"], "steps": snap["steps"], "infer_s": infer_s,
            **score_predictions(pred_dir, data_dir, METRICS)}


def row_of(train: dict, curve: list[dict], prep_s: float, work: Path) -> dict:
    """A contender's row: the final point's scores, what it saw in training, the curve."""
    final = curve[-1]
    keys = ("steps", "patches", "patch_size", "voxels", "train_s", "precision")
    return {**{k: train[k] for k in keys}, "prep_s": prep_s, "test_dice": final["test_dice"],
            "test_hd95": final["test_hd95"], "test_fg_mean_dice": final["test_fg_mean_dice"], "infer_s": final["infer_s"],
            "missing": final["missing"], "curve": curve, "work": repo_relative(work)}


def child_stock(args: argparse.Namespace, work: Path) -> dict:
    from stock_monai import predict_stock_recipe, train_stock_recipe

    from medseg.data.datasets import discover_cases

    info = discover_cases(args.data_dir)
    out = work / f"stock_monai_{time.strftime('%Y%m%d-%H%M%S')}"
    tr = train_stock_recipe([(c.images[0], c.label) for c in info.cases], info.num_classes, out, minutes=args.minutes,
                            marks_min=args.marks, num_workers=args.workers, seed=args.seed,
                            **(QUICK_STOCK if args.quick else {}))
    final = {"mark_min": args.marks[-1], "at_min": tr["train_s"] / 60, "steps": tr["steps"], "path": tr["final"]}
    curve = []
    for snap in tr["snapshots"] + [final]:
        pred = out / f"pred_{snap['mark_min']:g}min"
        inf = predict_stock_recipe(snap["path"], test_images(args.data_dir), pred)
        curve.append(curve_point(snap, pred, args.data_dir, inf["infer_s"]))
    return row_of(tr, curve, tr["cache_s"], out)


@contextlib.contextmanager
def medseg_snapshots(run_dir: Path, marks_min):
    """Save the model's weights after the first training step that ends past each mark (minutes since
    the training loop started) as a run directory ``<run_dir>_at<m>min`` (``checkpoints/final.pt``;
    ``config.yaml`` and ``plans.json`` are copied in by :func:`finish_snapshots`).

    The engine has no step callback, so this wraps its ``_loop`` (to start the clock) and
    ``train_step`` (to read it) in this process only; it fails loudly if they are renamed.
    Yields ``{"snapshots": [...], "loop_s": seconds}``.
    """
    from medseg.train import engine
    from medseg.train.checkpoint import save_checkpoint

    if not (callable(getattr(engine, "_loop", None)) and callable(getattr(engine, "train_step", None))):
        raise RuntimeError("medseg.train.engine has no _loop / train_step any more: update head_to_head.medseg_snapshots")
    loop0, step0 = engine._loop, engine.train_step
    out: dict = {"snapshots": [], "loop_s": 0.0}
    pending, t0 = sorted(m for m in marks_min), [0.0]

    def loop(ctx, *a, **kw):
        t0[0] = time.perf_counter()
        try:
            return loop0(ctx, *a, **kw)
        finally:
            out["loop_s"] = time.perf_counter() - t0[0]

    def step(ctx, *a, **kw):
        res = step0(ctx, *a, **kw)
        elapsed = time.perf_counter() - t0[0]
        while pending and elapsed >= pending[0] * 60 and pending[0] < marks_min[-1]:
            mark = pending.pop(0)
            snap = run_dir.parent / f"{run_dir.name}_at{mark:g}min"
            save_checkpoint({"model": ctx.model.state_dict()}, snap / "checkpoints" / "final.pt")
            out["snapshots"].append({"mark_min": mark, "at_min": elapsed / 60, "steps": ctx.step + 1, "run_dir": snap})
        return res

    engine._loop, engine.train_step = loop, step
    try:
        yield out
    finally:
        engine._loop, engine.train_step = loop0, step0


def child_medseg(args: argparse.Namespace, variant: str, work: Path) -> dict:
    from real_ct_study import predict_run, prepare, run_variant, study_config

    from medseg.config import load_config
    from medseg.runtime import resolve_device, resolve_precision

    overrides = [f"data.num_workers={args.workers}", f"train.seed={args.seed}",
                 *(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    pre_dir, cfg_path = work / "medseg_preprocessed", DATASETS[args.dataset]
    t0 = time.perf_counter()
    prepare(args.data_dir, pre_dir, study_config(cfg_path, "unet", pre_dir=pre_dir, data_dir=args.data_dir,
                                                 minutes=args.minutes, overrides=overrides))
    prep_s = time.perf_counter() - t0
    cfg = study_config(cfg_path, variant, pre_dir=pre_dir, data_dir=args.data_dir, minutes=args.minutes, overrides=overrides)
    run_dir = work / f"medseg_{variant}_{time.strftime('%Y%m%d-%H%M%S')}"
    with medseg_snapshots(run_dir, args.marks) as hook:
        res = run_variant(cfg, args.data_dir, run_dir, run_dir.parent / f"{run_dir.name}_pred", metrics=METRICS)
    curve = []
    for snap in hook["snapshots"]:
        for name in ("config.yaml", "plans.json"):
            shutil.copy2(run_dir / name, snap["run_dir"] / name)
        pred = snap["run_dir"].parent / f"{snap['run_dir'].name}_pred"
        curve.append(curve_point(snap, pred, args.data_dir, predict_run(snap["run_dir"], args.data_dir, pred)))
    n_test = len(test_images(args.data_dir))
    curve.append({"mark_min": args.marks[-1], "at_min": hook["loop_s"] / 60, "steps": res["steps"],
                  "infer_s": res["infer_s_per_case"] * n_test,
                  **{k: res[k] for k in ("test_dice", "test_hd95", "test_fg_mean_dice", "missing")}})
    run_cfg = load_config(run_dir / "config.yaml")
    patch = run_cfg.data.patch_size or json.loads((run_dir / "plans.json").read_text())["patch_size"]
    amp = resolve_precision(run_cfg.train.precision, resolve_device(run_cfg.train.device))
    train = {"steps": res["steps"], "patches": res["patches"], "patch_size": list(patch),
             "voxels": res["patches"] * math.prod(patch), "train_s": hook["loop_s"],
             "precision": str(amp or "fp32").replace("torch.", "")}
    return {**row_of(train, curve, prep_s, run_dir), "val_dice_train_case": res["val_dice_train_case"]}


def child_nnunet(args: argparse.Namespace, work: Path) -> dict:
    import nnunet_budget as nb

    from medseg.data.datasets import discover_cases

    out = work / f"nnunet_{time.strftime('%Y%m%d-%H%M%S')}"
    nb.set_environment(out, args.workers)  # before nnunetv2 is imported
    missing = nb.import_error()
    if missing:
        return {"skipped": missing}
    name = nb.make_raw_dataset(discover_cases(args.data_dir), out / "raw")
    t0 = time.perf_counter()
    nb.plan_and_preprocess(args.nnunet_config, args.nnunet_memory_gb)
    prep_s = time.perf_counter() - t0
    tr = nb.train(name, args.nnunet_config, minutes=args.minutes, marks_min=args.marks, **(QUICK_NNUNET if args.quick else {}))
    final = {"mark_min": args.marks[-1], "at_min": tr["train_s"] / 60, "steps": tr["steps"], "checkpoint": tr["final"]}
    curve = []
    for snap in tr["snapshots"] + [final]:
        pred = out / f"pred_{snap['mark_min']:g}min"
        inf = nb.predict(tr["model_dir"], snap["checkpoint"], test_images(args.data_dir), pred)
        curve.append(curve_point(snap, pred, args.data_dir, inf["infer_s"]))
    return {**row_of(tr, curve, prep_s, out), "configuration": args.nnunet_config, "batch_size": tr["batch_size"],
            "spacing": tr["spacing"], "epochs": tr["epochs"]}


def run_as_child(args: argparse.Namespace) -> int:
    """Run one contender; its JSON row is the only line on the real stdout (everything else -> stderr)."""
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # libraries' prints and their worker processes' go to stderr
    set_threads(args.threads)
    work = args.work_dir / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    if args.child == "stock_monai":
        row = child_stock(args, work)
    elif args.child == "nnunet":
        row = child_nnunet(args, work)
    else:
        row = child_medseg(args, args.child.removeprefix("medseg_"), work)
    sys.stdout.flush()
    os.write(real_stdout, (json.dumps(row, default=str) + "\n").encode())
    return 0


# --------------------------------------------------------------------------- report
def _cell(v) -> float:
    return float("nan") if v is None else float(v)


def markdown(rows: dict, args: argparse.Namespace) -> str:
    ok = {n: r for n, r in rows.items() if "test_dice" in r}
    classes = list(dict.fromkeys(c for r in ok.values() for c in r["test_dice"]))
    header = ["contender", *[f"Dice {c}" for c in classes], "mean Dice", *[f"HD95 {c} (mm)" for c in classes],
              "steps", "patches seen", "voxels seen (G)", "train min", "prep s", "infer s", "precision", "commit"]
    body = []
    for name, r in rows.items():
        if name not in ok:
            body.append([name, r.get("skipped") or r.get("error", "?")[:120], *[""] * (len(header) - 2)])
            continue
        body.append([name, *[_cell(r["test_dice"].get(c)) for c in classes], _cell(r["test_fg_mean_dice"]),
                     *[_cell(r["test_hd95"].get(c)) for c in classes], r["steps"],
                     f"{r['patches']} x {'x'.join(map(str, r['patch_size']))}", r["voxels"] / 1e9, r["train_s"] / 60,
                     r["prep_s"], r["infer_s"], r["precision"], (r.get("measured") or {}).get("commit") or ""])
    curve_header = ["contender", *[f"Dice {' / '.join(classes)} @ {m:g} min" for m in args.marks]]
    curve_body = []
    for name, r in ok.items():
        cells = []
        for p in r["curve"]:
            dice = " / ".join(f"{p['test_dice'].get(c, float('nan')):.3f}" for c in classes)
            cells.append(f"{dice} ({p['at_min']:.1f} min, {p['steps']} steps)")
        curve_body.append([name, *cells])
    nn = rows.get("nnunet", {})
    nn_note = (f"nnU-Net: `{nn['configuration']}` as planned by nnU-Net (patch {'x'.join(map(str, nn['patch_size']))}, "
               f"batch {nn['batch_size']}, {'x'.join(f'{s:.3g}' for s in nn['spacing'])} mm), fold `all`, "
               f"{nn['epochs']} budget-fitted epochs. " if "configuration" in nn else "")
    note = (f"Dataset `{args.dataset}`: trained on `imagesTr`, scored on `imagesTs` (`scored_labels` only) in the original "
            f"geometry by `medseg.evaluate.evaluate_folders`. The same wall-clock training budget for each contender "
            f"({args.minutes:g} min; preprocessing / caching before the clock, reported as prep s), one process each, one "
            f"after the other, {args.threads} torch threads and {args.workers} data worker(s) each, precision `auto` for "
            f"medseg and the stock recipe (bf16 autocast on a CPU with native bf16), nnU-Net's own policy, no TTA. "
            f"{nn_note}One run per contender from one seed on one test CT: a few Dice points are noise. "
            f"Each row says the commit it was measured on (rows of other commits: kept by `--keep-others`).")
    return (note + "\n\n" + md_table(header, body) + "\n\nDice over training time (weights of the same run at each mark; "
            "the time and step each point was actually taken at):\n\n" + md_table(curve_header, curve_body))


def kept_rows(results_dir: Path, args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    """``--keep-others``: the rows of ``<args.name>.json`` in ``results_dir`` whose contenders are not in
    ``names``, each with its ``measured`` commit and date (the file's, for rows written before rows
    carried their own). Raises SystemExit when the file is missing or was run on another dataset,
    budget, marks, threads or workers (the last two where the file records them): rows of different setups
    are not comparable."""
    path = results_dir / f"{args.name}.json"
    if not path.is_file():
        raise SystemExit(f"--keep-others: {path} not found (run every contender once first)")
    old = json.loads(path.read_text())
    setup, want = (old.get("dataset"), old.get("minutes"), old.get("marks")), (args.dataset, args.minutes, args.marks)
    if setup != want:
        raise SystemExit(f"--keep-others: {path} holds dataset / minutes / marks {setup}, this run {want}")
    for key in ("threads", "workers"):  # recorded since 2026-12-06; older files are not checked for them
        if key in old and old[key] != getattr(args, key):
            raise SystemExit(f"--keep-others: {path} was run with --{key} {old[key]}, this run {getattr(args, key)}")
    meta = old.get("meta", {})
    return {name: {**row, "measured": row.get("measured") or {"commit": meta.get("commit"), "date": meta.get("date")}}
            for name, row in old.get("results", {}).items() if name not in names}


def merged(kept: dict[str, dict], rows: dict[str, dict]) -> dict[str, dict]:
    """The kept rows and this run's in the contenders' order (stock MONAI, medseg's variants, nnU-Net)."""
    rank = {c: i for i, c in enumerate(CONTENDERS)}
    return dict(sorted({**kept, **rows}.items(),
                       key=lambda kv: rank.get("medseg" if kv[0].startswith("medseg_") else kv[0], len(rank))))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_as_child(args)
    set_threads(args.threads)
    meta = meta_now(args.threads, argv)
    cmd = " ".join(["python benchmarks/head_to_head.py", *(sys.argv[1:] if argv is None else argv)])
    results_dir = args.results or (Path(tempfile.gettempdir()) / "medseg_bench_quick" if args.quick else None)
    data_dir = quick_dataset(args.work_dir / "quick") if args.quick else args.real_ct / args.dataset
    if not data_dir.is_dir():
        raise SystemExit(f"{data_dir} not found")
    names = [f"medseg_{v}" if c == "medseg" else c for c in args.contenders for v in (args.variants if c == "medseg" else [c])]
    kept = kept_rows(results_dir or RESULTS, args, names) if args.keep_others else {}
    setup = {"dataset": args.dataset, "minutes": args.minutes, "marks": args.marks, "threads": args.threads,
             "workers": args.workers}  # what --keep-others checks (kept_rows)
    rows: dict[str, dict] = {}
    for name in names:
        print(f"{name}: training {args.minutes:g} min ...", file=sys.stderr, flush=True)
        child = [Path(__file__).resolve(), "--child", name, "--data-dir", data_dir, "--dataset", args.dataset,
                 "--minutes", args.minutes, "--marks", *args.marks, "--work-dir", args.work_dir, "--threads", args.threads,
                 "--workers", args.workers, "--seed", args.seed, "--nnunet-config", args.nnunet_config,
                 *(["--nnunet-memory-gb", args.nnunet_memory_gb] if args.nnunet_memory_gb else []),
                 *(["--quick"] if args.quick else []), *args.overrides]
        try:
            rows[name] = run_child(child)
        except Exception as err:  # one contender failing must not lose the others
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
        rows[name]["measured"] = {"commit": meta.get("commit"), "date": meta.get("date")}
        print(f"{name}: {json.dumps(rows[name], default=float)}", file=sys.stderr, flush=True)
        table = merged(kept, rows)
        title = f"Head to head: {args.minutes:g} CPU-minutes of training each {native_bf16_tag(meta)}"
        write_results(args.name, title, markdown(table, args), {**setup, "results": table, "overrides": args.overrides},
                      meta, command=cmd, **({"out_dir": results_dir} if results_dir else {}))
    table = merged(kept, rows)
    print(markdown(table, args))
    print(json.dumps({**setup, "results": table}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
