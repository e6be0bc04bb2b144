"""What each training augmentation costs per patch, against the training step the patches feed.

On a CPU of <= 2 cores per rank medseg loads training batches in the main process
(``data.num_workers: auto`` -> 0, :func:`medseg.train.data.resolve_num_workers`), so every millisecond
the augmentation chain takes is added to the step; the budget planner's step timer
(:func:`medseg.train.budget.make_step_seconds`) times the net only. This script measures the difference.

For a real-CT study dataset (``--dataset``: ``organs`` -> ``configs/real_organs.yaml``, ``lung_lesion``
-> ``configs/real_lung_lesion.yaml``, with the attention settings of ``--variant`` as
``benchmarks/real_ct_study.py`` puts them on, and ``overrides``), the training cases are preprocessed
into a temp folder (or ``--preprocessed``: a folder the study wrote), cached in RAM as training caches
them, and the same ``--patches`` training items (:class:`medseg.train.data.PatchDataset`, a 2.5D net's z
halo included as training cuts them: item ``i`` is a fixed case and centre, so every variant crops the
same regions) are cut by each variant of the augmentation settings:

- ``recipe``: the config's augmentation as it is;
- ``crop only``: every ``p_*`` at 0 (the crop of the patch, nothing else; the larger box a rotated or scaled
  patch reads is cut only for the patches that rotate or scale, so its cost is in their rows);
- per augmentation ``X`` (``train.augment.p_X``): the recipe with ``p_X = 0`` and with ``p_X = 1``.
  ``(X always - X off) / patches`` is the cost of one application; ``p_X`` times it, times the batch
  size, what ``X`` adds to a step of the recipe. Copy-paste needs ``copy_paste_classes`` (its row says
  n/a without them).

The variants run interleaved, ``--repeats`` times, and the fastest repeat of each counts (the one
other work on the machine disturbed least, as in ``train_speed.py``; all are in the JSON). The net's
step is timed by ``make_step_seconds`` (training's own step, forward, loss, backward, optimizer, at the
recipe's precision and memory format, on random input of the plan's patch; the median of ``--steps``).
Differences of a few ms per application are within the noise of a shared 2-core VM. Prints a table, writes ``benchmarks/results/augment_cost_<dataset>.{md,json}`` and,
as its last line, a JSON object (``recipe_ms_per_patch``, ``crop_ms_per_patch``, ``step_s``,
``data_share_of_step`` and ``<X>_ms_per_application`` per augmentation).

    python benchmarks/augment_cost.py                            # organs, 32 patches x 5 repeats (~6 min on 2 cores)
    python benchmarks/augment_cost.py --dataset lung_lesion
    python benchmarks/augment_cost.py --quick                    # phantoms, 64^3, narrow net: checks the script
    python benchmarks/augment_cost.py train.augment.p_thick_slices=0.3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, md_table, meta_now, repo_relative, set_threads, write_results  # noqa: E402
from real_ct_study import DATASETS, VARIANTS, prepare, quick_dataset, study_config  # noqa: E402

from medseg.config import AugmentConfig  # noqa: E402

# row name -> the probability key of train.augment: every p_* of medseg.config.AugmentConfig, in its order
AUGMENTS = {key[2:]: key for key in AugmentConfig.probability_keys()}
QUICK_OVERRIDES = ["data.patch_size=[64,64,64]", "model.channels=[4,8,16,32,64]"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) on the dataset's config, e.g. "
                   "train.augment.p_thick_slices=0.3")
    p.add_argument("--dataset", choices=list(DATASETS), default="organs",
                   help="real-CT study dataset and its config (default organs: configs/real_organs.yaml)")
    p.add_argument("--variant", choices=list(VARIANTS), default="attention",
                   help="attention settings put on the config, as real_ct_study.py does (default attention); "
                        "they change the step, not the patches")
    p.add_argument("--data", type=Path, default=None,
                   help="dataset folder (default ../shared/data/real_ct/<dataset>; phantoms when absent or with --quick)")
    p.add_argument("--preprocessed", type=Path, default=None,
                   help="a folder preprocessed with the same config (e.g. the study's <work-dir>/<dataset>/preprocessed); "
                        "default: preprocess into a temp folder")
    p.add_argument("--patches", type=int, default=32, help="training patches cut per variant and repeat (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the fastest counts (default 5)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of the net; the median counts (default 10)")
    p.add_argument("--only", nargs="+", choices=list(AUGMENTS), default=None,
                   help="augmentations to time one by one (default: all of them)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-step", action="store_true", help="do not time the net's step (no share-of-step figures)")
    p.add_argument("--quick", action="store_true",
                   help="phantoms, 64^3 patches, channels 4..64, 2 patches, 1 repeat: checks the script; results to a temp folder")
    p.add_argument("--results", type=Path, default=None,
                   help="folder for augment_cost_<dataset>.{md,json} (default benchmarks/results; a temp folder with --quick)")
    args = p.parse_args(argv)
    if min(args.patches, args.repeats, args.steps) < 1:
        p.error("--patches, --repeats and --steps must be >= 1")
    if args.quick:
        args.patches, args.repeats, args.steps = 2, 1, 1
    return args


def variant_config(cfg, key: str | None, value: float | None):
    """A copy of ``cfg`` with ``train.augment.<key> = value`` (``key`` None: every ``p_*`` at 0)."""
    out = copy.deepcopy(cfg)
    aug = out.train.augment
    if key is None:
        for k in AUGMENTS.values():
            setattr(aug, k, 0.0)
    else:
        setattr(aug, key, float(value))
    return out


def time_patches(ds, start: int, n: int) -> float:
    """Seconds to cut items ``start .. start + n - 1`` of a :class:`PatchDataset`."""
    t0 = time.perf_counter()
    for i in range(start, start + n):
        ds[i]
    return time.perf_counter() - t0


def variants_of(cfg, only: list[str] | None) -> tuple[dict, dict]:
    """``(variants, skipped)``: name -> config, and augmentation -> why it has no row."""
    out = {"recipe": cfg, "crop only": variant_config(cfg, None, None)}
    skipped = {}
    for name in only or list(AUGMENTS):
        key = AUGMENTS[name]
        if name == "copy_paste" and not cfg.train.augment.copy_paste_classes:
            skipped[name] = "n/a: no copy_paste_classes in the config"
            continue
        out[f"{name} off"] = variant_config(cfg, key, 0.0)
        out[f"{name} always"] = variant_config(cfg, key, 1.0)
    return out, skipped


def summarise(ms: dict[str, float], cfg, skipped: dict, step_s: float | None, only: list[str] | None) -> dict:
    """Per-augmentation figures from the median ms per patch of each variant."""
    bs = int(cfg.train.batch_size)
    rows = {}
    for name in only or list(AUGMENTS):
        p = float(getattr(cfg.train.augment, AUGMENTS[name]))
        if name in skipped:
            rows[name] = {"p": p, "skipped": skipped[name]}
            continue
        per_app = ms[f"{name} always"] - ms[f"{name} off"]
        per_batch = p * per_app * bs if p > 0 else 0.0  # off in the recipe: no cost (and no -0 from noise)
        rows[name] = {"p": p, "ms_per_application": per_app, "ms_per_batch_at_p": per_batch,
                      "share_of_step": None if step_s is None else per_batch / 1000.0 / step_s}
    recipe_batch_s = ms["recipe"] * bs / 1000.0
    return {"batch_size": bs, "recipe_ms_per_patch": ms["recipe"], "crop_ms_per_patch": ms["crop only"],
            "recipe_s_per_batch": recipe_batch_s, "step_s": step_s,
            "data_share_of_step": None if step_s is None else recipe_batch_s / (recipe_batch_s + step_s),
            "augments": rows, "variant_ms_per_patch": ms}


def markdown(s: dict, *, dataset: str, variant: str, patch, patches: int, repeats: int) -> str:
    rows = []
    for name, r in s["augments"].items():
        if "skipped" in r:
            rows.append([name, r["p"], r["skipped"], "", ""])
            continue
        share = "n/a" if r["share_of_step"] is None else f"{100 * r['share_of_step']:.1f}%"
        rows.append([name, r["p"], float(r["ms_per_application"]), float(r["ms_per_batch_at_p"]), share])
    step = "not timed" if s["step_s"] is None else f"{s['step_s']:.3f} s"
    share = "n/a" if s["data_share_of_step"] is None else f"{100 * s['data_share_of_step']:.0f}%"
    head = (f"{dataset} ({variant} net), patch {'x'.join(map(str, patch))}, batch {s['batch_size']}; fastest of {repeats} "
            f"interleaved repeat(s) of {patches} patches per variant, loaded in the main process as on a 2-core CPU. "
            f"Recipe: {s['recipe_ms_per_patch']:.1f} ms per patch (crop only {s['crop_ms_per_patch']:.1f} ms), "
            f"{1000 * s['recipe_s_per_batch']:.0f} ms per batch; the net's step (forward, loss, backward, optimizer): "
            f"{step}; loading is {share} of a step plus its loading.\n\n")
    return head + md_table(["augmentation", "p (recipe)", "ms per application", "ms per batch at p", "of the net's step"],
                           rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    from medseg.train.budget import make_step_seconds
    from medseg.nn import build_model
    from medseg.nn.slice25d import z_halo
    from medseg.train import data as tdata
    from medseg.train.checks import resolve_patch_size

    with tempfile.TemporaryDirectory(prefix="augment_cost_") as tmp:
        tmp = Path(tmp)
        data_dir = args.data or (ROOT.parent / "shared" / "data" / "real_ct" / args.dataset)
        overrides = list(args.overrides)
        if args.quick or not data_dir.is_dir():
            if not args.quick:
                print(f"{data_dir} not found: using phantoms", file=sys.stderr)
            data_dir = quick_dataset(tmp)
            overrides = QUICK_OVERRIDES + overrides
        pre = args.preprocessed or tmp / "preprocessed"
        cfg = study_config(DATASETS[args.dataset], args.variant, pre_dir=pre, data_dir=data_dir, minutes=15.0,
                           overrides=overrides)
        if args.preprocessed is None:
            print(f"preprocessing {repo_relative(data_dir)} ...", file=sys.stderr)
            prepare(data_dir, pre, cfg)
        plans = tdata.read_plans(pre)
        tdata.resolve_mirror_axes(cfg, pre, plans)
        train, _ = tdata.train_val_cases(pre, cfg, tdata.list_cases(pre))
        cases = tdata.case_dataset(pre, train, "ram")
        in_channels, num_classes = len(plans.get("channel_names", {})) or 1, int(plans["num_classes"])
        # the net as training builds it (medseg.train.setup.build_context): its patch divisor and a 2.5D net's z halo,
        # the extra slices training cuts at each z end of a patch
        model = build_model(cfg.model, in_channels=in_channels, num_classes=num_classes, spacing=plans.get("target_spacing"))
        patch = resolve_patch_size(cfg, plans, getattr(model, "patch_divisor", None))
        variants, skipped = variants_of(cfg, args.only)
        halo = z_halo(model)
        del model
        datasets = {name: tdata.PatchDataset(cases, patch, c, z_halo=halo, ignore_label=plans.get("ignore_label"))
                    for name, c in variants.items()}
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.repeats):
            for name, ds in datasets.items():
                seconds[name].append(time_patches(ds, 0, args.patches))
            print(f"repeat {r + 1}/{args.repeats}: recipe {1000 * seconds['recipe'][-1] / args.patches:.1f} ms per patch",
                  file=sys.stderr)
        ms = {name: 1000.0 * min(v) / args.patches for name, v in seconds.items()}
        step_s = None
        if not args.no_step:
            step_s = make_step_seconds(cfg, in_channels=in_channels, num_classes=num_classes,
                                       spacing=plans.get("target_spacing"), steps=args.steps)(patch)
        s = summarise(ms, cfg, skipped, step_s, args.only)

    body = markdown(s, dataset=args.dataset, variant=args.variant, patch=patch, patches=args.patches, repeats=args.repeats)
    print(body)
    out_dir = args.results or (Path(tempfile.mkdtemp(prefix="augment_cost_results_")) if args.quick else None)
    name = f"augment_cost_{args.dataset}"
    kw = {"out_dir": out_dir} if out_dir is not None else {}
    data = {**s, "dataset": args.dataset, "variant": args.variant, "patch": list(patch), "z_halo": halo, "patches": args.patches,
            "repeats": args.repeats, "overrides": list(args.overrides), "seconds": seconds}
    md, _ = write_results(name, f"Augmentation cost per training patch ({args.dataset})", body, data,
                          meta_now(args.threads), command="python benchmarks/augment_cost.py " + " ".join(
                              (argv if argv is not None else sys.argv[1:])), **kw)
    print(f"results: {repo_relative(md)}", file=sys.stderr)
    last = {"recipe_ms_per_patch": s["recipe_ms_per_patch"], "crop_ms_per_patch": s["crop_ms_per_patch"],
            "step_s": step_s, "data_share_of_step": s["data_share_of_step"]}
    last.update({f"{k}_ms_per_application": v.get("ms_per_application") for k, v in s["augments"].items()})
    print(json.dumps(last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
