"""End-to-end inference on a chest CT: our Predictor against MONAI's stock tutorial pipeline and
the nnU-Net v2 predictor, at matched precisions, with the speedup split into its causes.

One volume (default ``../shared/data/real_ct/organs/imagesTr/lidc0001_chest.nii.gz``, 512x512x133,
0.7x0.7x2.5 mm; a phantom of that size when the file is absent) goes through the whole product:
load -> preprocess -> sliding window -> back to the original grid -> write the mask.

Rows (``--pipelines``; every net untrained):

- **ours** (``ours_unet``, ``ours_attention``): a run directory built in a temp folder from
  ``configs/unet3d.yaml`` / ``configs/attention_unet3d.yaml`` (channels 16..256, 6 classes)
  and ``plans.json`` from the data layer (fingerprint -> ``make_plan`` with target spacing
  1.5 mm, CT normalization), run by ``Predictor.from_run(run).predict(path)`` with Gaussian
  blending at overlap 0.5 and precision ``auto`` (bf16 autocast on a CPU with native bf16, else
  fp32). The window is the patch size the plan gives for this image and net width (176x128x160
  for the chest CT and 16 base features). ``ours_*_fp32``: the same in fp32; ``ours_*_bf16``: bf16
  autocast forced. ``ours_attention_stockwin``: ours in fp32 with the stock pipeline's window plan
  (``--monai-roi`` cube, overlap 0.25, 4 windows per forward, constant blending).
  ``ours_unet_stem_fp32``, ``ours_attention_stem_fp32`` (and ``_bf16``): the same nets with a
  strided stem (``model.strides`` all 2: no conv at the input resolution, logits upsampled, the
  cost structure of MONAI's ``UNet``), the architecture of ``configs/real_organs.yaml`` whose
  15-minute runs give ``benchmarks/real_ct_study.py``'s Dice; the plan gives this net its own
  (larger) window, since it holds an eighth of the features per voxel. The optional
  ``_large`` rows (not run by default) use ``--large-roi`` (fewer, larger windows,
  ``--large-sw-batch-size`` of them per forward).
- **MONAI** (``monai_unet``, ``monai_attention``: fp32, also accepted as ``monai_unet_fp32`` /
  ``monai_attention_fp32``): ``benchmarks/stock_monai.py`` -- LoadImaged, Orientationd, Spacingd
  1.5 mm, ScaleIntensityRanged, ``sliding_window_inference`` (roi 96^3, sw_batch 4, overlap
  0.25), MONAI ``UNet`` / ``AttentionUnet`` (16..256, 6 classes), Invertd, save.
  ``monai_*_bf16``: the same with ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the
  sliding window.
- **nnU-Net v2** (``nnunet_tta``, ``nnunet_notta``): ``nnUNetPredictor`` with its defaults (tile
  step 0.5, Gaussian, fp32 on a CPU, ``perform_everything_on_device=False``), mirroring TTA on /
  off, on nnU-Net's own plan: once per benchmark run, in a child and a temp nnU-Net folder,
  ``nnunet_budget.make_raw_dataset`` + ``plan_and_preprocess`` (``3d_fullres``) of ``--nnunet-data``
  (default ``../shared/data/real_ct/organs``; phantoms of the input's size with ``--quick`` or when
  it is absent), and
  ``nnunet_budget.untrained_model`` (``nnUNetTrainer(...).initialize()``, its ``checkpoint_final.pth``).
  Timed: the predictor's own steps of ``predict_from_files_sequential`` (``run_case`` ->
  ``predict_logits_from_preprocessed_data`` -> ``export_prediction_from_logits``). Skipped, with
  the reason in the row, when ``nnunetv2`` cannot be imported.

bf16 rows are in the default set only on a CPU with native bf16 (``medseg.runtime.cpu_supports_bf16``:
AVX512-BF16 / AMX); elsewhere emulated bf16 takes minutes per model and says nothing, so the
report says "bf16 rows: n/a, no native bf16 on this CPU" (they still run when named).

Each pipeline runs in its own subprocess, so its peak RSS (``ru_maxrss`` of the child) is its
own; CPU seconds (user + system of the child) stand beside wall seconds. The table gives, per
row, the windows, TTA mirrorings and the voxels the net runs on (windows x window voxels x
mirrorings). The summary splits the speedup of ours over MONAI AttentionUnet into window plan
(``ours_attention_stockwin`` / ours fp32), architecture (and pipeline code: MONAI AttentionUnet /
``ours_attention_stockwin``) and precision (ours fp32 / ours bf16); their product is the total.
The strided stem is one more factor (ours fp32 / ``ours_attention_stem_fp32``). ``--repeats N``
runs every row N times, interleaved, except the ``--once`` rows (default ``nnunet_tta``).
Prints a table, writes ``benchmarks/results/infer_speed.{md,json}`` and, as its last line, a JSON
object (``<row>_s`` and ``<row>_peak_rss_gb`` per row run, ratios, the split).

    python benchmarks/infer_speed.py --repeats 2     # the real measurement: tens of minutes on 2 idle cores
                                                     # (nnunet_tta alone: 8 tiles x 8 mirrorings of nnU-Net's net)
    python benchmarks/infer_speed.py --quick         # small phantom, narrow nets: checks the script
    python benchmarks/infer_speed.py --pipelines ours_attention monai_unet --roi 128 128 128
    python benchmarks/infer_speed.py --pipelines ours_attention_fp32 ours_attention_stockwin monai_attention
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REAL_CT, ROOT, WIDTHS, make_run_dir, md_table, meta_now, num_windows, peak_rss_gb  # noqa: E402
from _common import plan_for_image, repo_relative, run_child, set_threads, write_phantom_ct, write_results  # noqa: E402
from nnunet_budget import NNUNET_MISSING  # noqa: E402,F401  (the skip message of the nnunet_* rows)

DEFAULT_IMAGE = REAL_CT / "organs" / "imagesTr" / "lidc0001_chest.nii.gz"
DEFAULT_NNUNET_DATA = REAL_CT / "organs"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "lung": 4, "heart": 5}
OURS_CONFIGS = {"unet": ROOT / "configs" / "unet3d.yaml", "attention": ROOT / "configs" / "attention_unet3d.yaml"}
OURS_MODELS = {  # model -> (config, strided stem): the *_stem nets are the real-CT CPU recipe's architecture
    "unet": ("unet", False), "attention": ("attention", False),
    "unet_stem": ("unet", True), "attention_stem": ("attention", True),
}
PIPELINES = {  # name -> (kind, model, precision, window: the plan's patch, --large-roi, the stock plan or nnU-Net's)
    "ours_unet": ("ours", "unet", "auto", "plan"),
    "ours_attention": ("ours", "attention", "auto", "plan"),
    "ours_unet_fp32": ("ours", "unet", "fp32", "plan"),
    "ours_attention_fp32": ("ours", "attention", "fp32", "plan"),
    "ours_unet_bf16": ("ours", "unet", "bf16", "plan"),
    "ours_attention_bf16": ("ours", "attention", "bf16", "plan"),
    "ours_attention_stockwin": ("ours", "attention", "fp32", "stock"),
    "ours_unet_stem_fp32": ("ours", "unet_stem", "fp32", "plan"),
    "ours_attention_stem_fp32": ("ours", "attention_stem", "fp32", "plan"),
    "ours_unet_stem_bf16": ("ours", "unet_stem", "bf16", "plan"),
    "ours_attention_stem_bf16": ("ours", "attention_stem", "bf16", "plan"),
    "ours_unet_large": ("ours", "unet", "auto", "large"),
    "ours_attention_large": ("ours", "attention", "auto", "large"),
    "monai_unet": ("monai", "unet", "fp32", "stock"),
    "monai_attention": ("monai", "attention", "fp32", "stock"),
    "monai_unet_bf16": ("monai", "unet", "bf16", "stock"),
    "monai_attention_bf16": ("monai", "attention", "bf16", "stock"),
    "nnunet_tta": ("nnunet", "tta", "fp32", "nnunet"),
    "nnunet_notta": ("nnunet", "notta", "fp32", "nnunet"),
}
ALIASES = {"monai_unet_fp32": "monai_unet", "monai_attention_fp32": "monai_attention"}  # same rows, other names
STOCK_WINDOW = {"overlap": 0.25, "sw_batch_size": 4, "blend": "constant"}  # the stock plan; roi: --monai-roi
QUICK = {"shape": (96, 96, 30), "spacing": (1.2, 1.2, 3.0), "channels": (4, 8, 16, 32, 64), "roi": 32, "large_roi": 48,
         "stem_roi": 64}  # a stem net's total stride is 32: a 32^3 window would leave 1 voxel at the bottleneck
NNUNET_CONFIG = "3d_fullres"
NO_BF16_NOTE = "bf16 rows: n/a, no native bf16 on this CPU"


def is_bf16_row(name: str) -> bool:
    """Whether row ``name`` forces bf16 autocast (the ``_bf16`` rows)."""
    return PIPELINES[name][2] == "bf16"


def default_pipelines(bf16_native: bool) -> list[str]:
    """The rows run without ``--pipelines``: all but the ``_large`` ones, and the bf16 ones only
    on a CPU with native bf16 (emulated bf16 takes minutes per model and measures nothing)."""
    return [p for p in PIPELINES if not p.endswith("_large") and (bf16_native or not is_bf16_row(p))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE,
                   help="CT volume to segment (default: the LIDC chest CT; a 512x512x133 phantom when absent)")
    p.add_argument("--pipelines", nargs="+", default=None, choices=[*PIPELINES, *ALIASES], metavar="ROW",
                   help="rows to run, in this order: " + ", ".join([*PIPELINES, *ALIASES]) + " (monai_*_fp32 = "
                        "monai_*). Default: all but the *_large ones (which use --large-roi), and the *_bf16 ones only "
                        "on a CPU with native bf16")
    p.add_argument("--channels", type=int, nargs="+", default=list(WIDTHS),
                   help="encoder widths of our and MONAI's nets (default 16 32 64 128 256; nnU-Net plans its own)")
    p.add_argument("--roi", type=int, nargs=3, default=None,
                   help="our window size x y z (default: the patch size the data layer plans for this image)")
    p.add_argument("--stem-roi", type=int, nargs=3, default=None,
                   help="window of the *_stem rows x y z (default: the patch size the data layer plans for that net)")
    p.add_argument("--monai-roi", type=int, default=96,
                   help="edge of the stock pipeline's cubic window, also ours_attention_stockwin's (default 96)")
    p.add_argument("--overlap", type=float, default=0.5, help="our window overlap (default 0.5; the stock pipeline keeps 0.25)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="our windows per forward (default: the config's infer.sw_batch_size)")
    p.add_argument("--large-roi", type=int, nargs=3, default=[160, 192, 224],
                   help="window of the *_large rows (default 160 192 224: 2 windows over the 240x190x222 chest at 1.5 mm)")
    p.add_argument("--large-sw-batch-size", type=int, default=1, help="windows per forward of the *_large rows (default 1)")
    p.add_argument("--nnunet-data", type=Path, default=None,
                   help="dataset (imagesTr + labelsTr + dataset.json) nnU-Net plans the nnunet_* rows on (default "
                        "../shared/data/real_ct/organs; phantoms with --quick or when it is absent)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each pipeline (interleaved); the fastest is reported, all are in the JSON (default 1)")
    p.add_argument("--once", nargs="*", default=["nnunet_tta"], choices=list(PIPELINES), metavar="ROW",
                   help="rows run in the first round only, whatever --repeats says (default: nnunet_tta, 12 minutes "
                        "per run on 2 cores; '--once' alone: none)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in every child (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="a 96x96x30 phantom, channels 4..64, 32^3 windows, nnU-Net planned on 2 such phantoms: "
                        "checks the script in seconds; results go to a temp folder")
    p.add_argument("--results", type=Path, default=None, help="folder for infer_speed.{md,json} (default benchmarks/results; a temp folder with --quick)")
    # child mode (internal): run one pipeline (or nnU-Net's planning) and print its JSON
    p.add_argument("--child", choices=[*PIPELINES, "nnunet_prepare"], help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-roi", type=int, nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--child-blend", help=argparse.SUPPRESS)
    p.add_argument("--nnunet-work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--nnunet-model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pipelines is not None:  # aliases -> their rows, each once, in the order given
        args.pipelines = list(dict.fromkeys(ALIASES.get(n, n) for n in args.pipelines))
    return args


# --------------------------------------------------------------------------- children
def child_ours(args: argparse.Namespace, precision: str) -> dict:
    """Predictor.from_run -> predict -> write the mask, with the Predictor's own stage timings."""
    from medseg.infer import predictor as predictor_mod
    from medseg.io import write_volume

    t0 = time.perf_counter()
    pred = predictor_mod.Predictor.from_run(args.run_dir, precision=precision, overlap=args.overlap,
                                            sw_batch_size=args.sw_batch_size, roi_size=args.child_roi,
                                            blend=args.child_blend)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = pred.predict(args.image)
    t1 = time.perf_counter()
    write_volume(result.mask, args.out / f"{result.case}_seg.nii.gz")
    t2 = time.perf_counter()
    st = dict(getattr(result, "timings", {}) or {})  # stage timings of the Predictor
    shape = [int(v) for v in result.properties["shape"]]
    stages = {
        "load_preprocess": st["load"] + st["preprocess"] if st else float("nan"),
        "sliding_window": st.get("sliding_window", float("nan")),
        "restore_write": st.get("restore", float("nan")) + (t2 - t1),
        "write": t2 - t1,
        "total": t2 - t0,
    }
    windows = num_windows(shape, pred.roi_size, pred.overlap)
    mirrors = 2 ** len(pred.mirror_axes) if pred.tta else 1
    return {**stages, "setup": setup, "shape": shape, "roi": list(pred.roi_size), "overlap": pred.overlap,
            "sw_batch_size": pred.sw_batch_size, "blend": pred.blend,
            "precision": str(pred.amp_dtype or "fp32").replace("torch.", ""), "windows": windows, "mirrors": mirrors,
            "net_voxels": net_voxels(windows, pred.roi_size, mirrors), "stage_timings": st}


def child_monai(args: argparse.Namespace, model: str, precision: str) -> dict:
    """The stock MONAI pipeline (``stock_monai.run_stock_pipeline``), fp32 or under bf16 autocast."""
    import torch
    from stock_monai import run_stock_pipeline

    roi = (args.monai_roi,) * 3
    amp = torch.bfloat16 if precision == "bf16" else None
    t = run_stock_pipeline(args.image, args.out, model, num_classes=len(LABELS), channels=tuple(args.channels),
                           roi_size=roi, sw_batch_size=STOCK_WINDOW["sw_batch_size"], overlap=STOCK_WINDOW["overlap"],
                           amp_dtype=amp)
    windows = num_windows(t["shape"], roi, STOCK_WINDOW["overlap"])
    return {"load_preprocess": t["load_preprocess"], "sliding_window": t["sliding_window"],
            "restore_write": t["invert_write"], "total": t["total"], "setup": t["setup"], "shape": t["shape"],
            "roi": list(roi), "overlap": STOCK_WINDOW["overlap"], "sw_batch_size": STOCK_WINDOW["sw_batch_size"],
            "blend": "constant", "precision": "bfloat16" if amp else "fp32", "windows": windows, "mirrors": 1,
            "net_voxels": net_voxels(windows, roi, 1)}


def child_nnunet_prepare(args: argparse.Namespace) -> dict:
    """nnU-Net's own plan of ``args.nnunet_data`` and an untrained model folder, under ``args.nnunet_work``.

    Returns ``model_dir``, ``patch_size``, ``spacing``, ``mirror_axes``, ``parameters``, ``dataset``
    and ``prep_s`` (planning + preprocessing + model seconds), or ``{"skipped": reason}``.
    """
    import nnunet_budget as nb

    from medseg.data.datasets import discover_cases

    nb.set_environment(args.nnunet_work, args.threads)  # before nnunetv2 is imported
    missing = nb.import_error()
    if missing:
        return {"skipped": missing}
    t0 = time.perf_counter()
    name = nb.make_raw_dataset(discover_cases(args.nnunet_data), args.nnunet_work / "raw")
    nb.plan_and_preprocess(NNUNET_CONFIG)
    model = nb.untrained_model(name, NNUNET_CONFIG)
    return {**model, "dataset": name, "prep_s": time.perf_counter() - t0}


def nnunet_tiles(shape, patch, step: float = 0.5) -> int:
    """Tiles ``nnUNetPredictor`` runs over a preprocessed image of ``shape`` (padded to at least
    ``patch``) with ``tile_step_size`` ``step``: its own ``compute_steps_for_sliding_window``."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    padded = [max(int(s), int(p)) for s, p in zip(shape, patch)]
    return math.prod(len(st) for st in compute_steps_for_sliding_window(padded, list(patch), step))


def child_nnunet(args: argparse.Namespace, tta: bool) -> dict:
    """``nnUNetPredictor`` (defaults; mirroring ``tta``) on ``args.image``: load + preprocess
    (``run_case``), the sliding window (``predict_logits_from_preprocessed_data``) and the export to
    the original grid (``export_prediction_from_logits``), as ``predict_from_files_sequential`` runs them."""
    import nnunet_budget as nb

    nb.set_environment(args.nnunet_work, args.threads)  # before nnunetv2 is imported; threads: its default_num_processes
    missing = nb.import_error()
    if missing:
        return {"skipped": missing}
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    t0 = time.perf_counter()
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, perform_everything_on_device=False,
                           device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(args.nnunet_model_dir), use_folds=("all",),
                                              checkpoint_name="checkpoint_final.pth")
    cm, pm = pred.configuration_manager, pred.plans_manager
    pre = cm.preprocessor_class(verbose=False)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    data, _, props = pre.run_case([str(args.image)], None, pm, cm, pred.dataset_json)
    t1 = time.perf_counter()
    logits = pred.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
    t2 = time.perf_counter()
    case = Path(args.image).name.removesuffix(".gz").removesuffix(".nii")
    export_prediction_from_logits(logits, props, cm, pm, pred.dataset_json, str(args.out / f"{case}_seg"), False)
    t3 = time.perf_counter()
    shape, patch = [int(v) for v in data.shape[1:]], [int(p) for p in cm.patch_size]
    axes = pred.allowed_mirroring_axes if tta else None
    mirrors = 2 ** len(axes) if axes else 1
    windows = nnunet_tiles(shape, patch, pred.tile_step_size)
    return {"load_preprocess": t1 - t0, "sliding_window": t2 - t1, "restore_write": t3 - t2, "total": t3 - t0,
            "setup": setup, "shape": shape, "roi": patch, "overlap": 1.0 - pred.tile_step_size, "sw_batch_size": 1,
            "blend": "gaussian", "precision": "fp32", "windows": windows, "mirrors": mirrors,
            "net_voxels": net_voxels(windows, patch, mirrors), "spacing": [float(v) for v in cm.spacing]}


def net_voxels(windows: int, roi, mirrors: int = 1) -> int:
    """Voxels the net runs on: ``windows`` x the voxels of one window ``roi`` x ``mirrors`` (TTA flips)."""
    return int(windows) * math.prod(int(r) for r in roi) * int(mirrors)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_child_mode(args: argparse.Namespace) -> None:
    """Run ``args.child`` and print its JSON row as the only line on the real stdout (libraries'
    prints -- nnU-Net's -- go to stderr)."""
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    set_threads(args.threads)
    if args.child == "nnunet_prepare":
        row = child_nnunet_prepare(args)
    else:
        kind, model, precision, _ = PIPELINES[args.child]
        args.out.mkdir(parents=True, exist_ok=True)
        c0 = cpu_seconds()
        if kind == "ours":
            row = child_ours(args, precision)
        elif kind == "monai":
            row = child_monai(args, model, precision)
        else:
            row = child_nnunet(args, tta=model == "tta")
        if "skipped" not in row:
            row["cpu_s"] = cpu_seconds() - c0  # set-up included; a check on the wall times when the machine is busy
            row["peak_rss_gb"] = peak_rss_gb()
    sys.stdout.flush()
    os.write(real_stdout, (json.dumps(row) + "\n").encode())


# --------------------------------------------------------------------------- parent
def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, dict[str, Path], str]:
    """The input image (real or phantom) and one run directory per model of ours."""
    image, source = args.image, str(args.image)
    if args.quick:
        image = write_phantom_ct(tmp / "phantom_quick.nii.gz", QUICK["shape"], QUICK["spacing"])
        source = f"phantom {'x'.join(map(str, QUICK['shape']))}"
    elif not image.is_file():
        print(f"{image} not found: using a 512x512x133 phantom (0.7x0.7x2.5 mm) instead", file=sys.stderr)
        image = write_phantom_ct(tmp / "phantom_chest.nii.gz")
        source = "phantom 512x512x133 (real file absent)"
    runs: dict[str, Path] = {}
    models = list(dict.fromkeys(PIPELINES[p][1] for p in args.pipelines if PIPELINES[p][0] == "ours"))
    if not models:
        return image, runs, source
    from medseg.config import load_config
    from medseg.data.plan import model_plan_args

    fingerprint_cache: dict = {}
    for model in models:
        overrides = ours_overrides(model, args.channels)
        probe = load_config(OURS_CONFIGS[OURS_MODELS[model][0]], overrides).model
        roi = args.stem_roi if OURS_MODELS[model][1] else args.roi
        plans = plan_for_image(image, LABELS, target_spacing=[1.5, 1.5, 1.5], patch_size=roi,
                               fingerprint_cache=fingerprint_cache, **model_plan_args(probe))
        runs[model] = make_run_dir(tmp / f"run_{model}", OURS_CONFIGS[OURS_MODELS[model][0]], plans, overrides=overrides)
    return image, runs, source


def ours_overrides(model: str, channels) -> list[str]:
    """Config overrides of our ``model`` (``OURS_MODELS``): the widths, 6 classes and, for the
    ``*_stem`` nets, the strided stem the budget planner gives a net (``medseg.train.budget.stem_model``:
    ``strides[0] = 2``, no conv at the input resolution, the logits upsampled; the architecture of
    ``configs/real_organs.yaml``, the real-CT CPU recipe)."""
    out = [f"model.channels={list(channels)}", f"model.num_classes={len(LABELS)}"]
    if OURS_MODELS[model][1]:
        from medseg.config import load_config
        from medseg.train.budget import stem_model

        out.append(f"model.strides={stem_model(load_config(OURS_CONFIGS[OURS_MODELS[model][0]], out)).strides}")
    return out


def phantom_dataset(out: Path, shape, spacing, n: int = 2) -> Path:
    """An nnU-Net v2 dataset (``medseg.data.phantoms.make_phantom_dataset``) of ``n`` LAS phantoms of
    ``shape`` voxels at ``spacing`` mm, like :func:`_common.write_phantom_ct`'s: nnU-Net's plan for
    them fits the phantom input (its spacing, a patch near its size). Returns ``out``."""
    from medseg.data.phantoms import NOMINAL_SPACING, make_phantom_dataset

    nominal = [round(k * s / ns) for k, s, ns in zip(shape, spacing, NOMINAL_SPACING)]
    return make_phantom_dataset(out, n_train=n, n_test=0, shape=nominal, name="InferSpeedPhantoms",
                                orientations=["LAS"], spacing=spacing, noise_hu=15.0)


def prepare_nnunet(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    """nnU-Net's plan and untrained model, made once in a child; returns its JSON (or
    ``{"skipped": ...}`` / ``{"error": ...}``) and the data set's description for the notes."""
    data = args.nnunet_data or DEFAULT_NNUNET_DATA
    if args.quick or not data.is_dir():
        if not args.quick:
            print(f"{data} not found: nnU-Net plans on phantoms instead", file=sys.stderr)
        shape, spacing = (QUICK["shape"], QUICK["spacing"]) if args.quick else ((512, 512, 133), (0.7, 0.7, 2.5))
        data = phantom_dataset(tmp / "nnunet_data", shape, spacing)
        described = f"2 phantoms of the input's size ({'x'.join(map(str, shape))})"
    else:
        described = f"`{repo_relative(data)}`"
    print("nnunet_prepare (nnU-Net's plan and untrained model) ...", file=sys.stderr, flush=True)
    try:
        prep = run_child([__file__, "--child", "nnunet_prepare", "--nnunet-work", tmp / "nnunet", "--nnunet-data", data,
                          "--threads", args.threads])
    except RuntimeError as err:  # the other rows are still worth reporting
        print(err, file=sys.stderr)
        prep = {"error": f"error: nnU-Net planning failed ({str(err).strip().splitlines()[-1][:200]})"}
    return prep, described


def split_of(rows: dict[str, dict], key: str = "total") -> dict[str, float]:
    """The speedup of ours (attention-gated) over MONAI's AttentionUnet, split into its causes.

    ``key``: ``"total"`` (wall seconds) or ``"cpu_s"``. With ``t`` the ``key`` of a row:
    ``window_plan`` = t(ours_attention_stockwin) / t(ours fp32), ``architecture`` (and pipeline
    code) = t(monai_attention) / t(ours_attention_stockwin), so ``total_fp32`` = t(monai_attention)
    / t(ours fp32) = window_plan x architecture; ``precision`` = t(ours fp32) / t(ours bf16) and
    ``total_bf16`` = t(monai_attention) / t(ours bf16) = precision x window_plan x architecture.
    Ours fp32 is ``ours_attention_fp32`` (or ``ours_attention`` when that ran in fp32), ours bf16
    ``ours_attention_bf16`` (or ``ours_attention`` when that ran in bf16). The strided stem:
    ``stem`` = t(ours fp32) / t(ours_attention_stem_fp32) (no conv at the input resolution, and
    the larger window the plan gives that net), ``total_stem_fp32`` = t(monai_attention) /
    t(ours_attention_stem_fp32) = window_plan x architecture x stem (``total_stem_bf16`` from the
    bf16 stem row). Returns only the factors whose rows ran.
    """
    def t(name: str) -> float | None:
        v = rows.get(name, {}).get(key)
        return float(v) if v else None

    def ours(precision: str) -> float | None:
        exact = t(f"ours_attention_{precision}")
        if exact is None and rows.get("ours_attention", {}).get("precision") in ((precision, "bfloat16") if precision == "bf16" else (precision,)):
            return t("ours_attention")
        return exact

    monai, stock, fp32, bf16 = t("monai_attention"), t("ours_attention_stockwin"), ours("fp32"), ours("bf16")
    stem32, stem16 = t("ours_attention_stem_fp32"), t("ours_attention_stem_bf16")
    factors = {"stem": (fp32, stem32), "total_stem_fp32": (monai, stem32), "total_stem_bf16": (monai, stem16),
               "window_plan": (stock, fp32), "architecture": (monai, stock), "total_fp32": (monai, fp32),
               "precision": (fp32, bf16), "total_bf16": (monai, bf16)}  # factor -> (slower, faster) seconds
    return {k: a / b for k, (a, b) in factors.items() if a and b}


def summarize(rows: dict[str, dict]) -> dict:
    """End-to-end seconds, peak RSS, the ratios the issue asks for and the speedup split
    (``split_<factor>`` on wall seconds, ``split_cpu_<factor>`` on CPU seconds, see :func:`split_of`).
    Rows without a ``total`` (skipped, failed) give ``<row>_skipped`` with their reason."""
    out: dict = {}
    for name, r in rows.items():
        if "total" not in r:
            out[f"{name}_skipped"] = r.get("skipped") or r.get("error") or "not run"
            continue
        out[f"{name}_s"] = r["total"]
        out[f"{name}_peak_rss_gb"] = r["peak_rss_gb"]
    rows = {n: r for n, r in rows.items() if "total" in r}

    def ratio(a: str, b: str) -> float | None:
        return rows[a]["total"] / rows[b]["total"] if a in rows and b in rows else None

    ratios = {
        "speedup_attention_vs_monai_attention": ratio("monai_attention", "ours_attention"),
        "speedup_attention_vs_monai_unet": ratio("monai_unet", "ours_attention"),
        "speedup_unet_vs_monai_unet": ratio("monai_unet", "ours_unet"),
        # at the same precision as the stock pipeline compared with
        "speedup_attention_fp32_vs_monai_attention": ratio("monai_attention", "ours_attention_fp32"),
        "speedup_attention_fp32_vs_monai_unet": ratio("monai_unet", "ours_attention_fp32"),
        "speedup_unet_fp32_vs_monai_unet": ratio("monai_unet", "ours_unet_fp32"),
        "speedup_attention_bf16_vs_monai_attention_bf16": ratio("monai_attention_bf16", "ours_attention_bf16"),
        "speedup_attention_bf16_vs_monai_unet_bf16": ratio("monai_unet_bf16", "ours_attention_bf16"),
        "speedup_unet_bf16_vs_monai_unet_bf16": ratio("monai_unet_bf16", "ours_unet_bf16"),
        # the strided stem (the real-CT CPU recipe's architecture), same precision as the stock row
        "speedup_attention_stem_fp32_vs_monai_attention": ratio("monai_attention", "ours_attention_stem_fp32"),
        "speedup_attention_stem_fp32_vs_monai_unet": ratio("monai_unet", "ours_attention_stem_fp32"),
        "speedup_unet_stem_fp32_vs_monai_unet": ratio("monai_unet", "ours_unet_stem_fp32"),
        "speedup_attention_stem_bf16_vs_monai_attention_bf16": ratio("monai_attention_bf16", "ours_attention_stem_bf16"),
        "speedup_attention_stem_bf16_vs_monai_unet_bf16": ratio("monai_unet_bf16", "ours_attention_stem_bf16"),
        "speedup_unet_stem_bf16_vs_monai_unet_bf16": ratio("monai_unet_bf16", "ours_unet_stem_bf16"),
        "speedup_attention_stem_fp32_vs_nnunet_notta": ratio("nnunet_notta", "ours_attention_stem_fp32"),
        "speedup_attention_fp32_vs_nnunet_notta": ratio("nnunet_notta", "ours_attention_fp32"),
        "speedup_attention_fp32_vs_nnunet_tta": ratio("nnunet_tta", "ours_attention_fp32"),
        "speedup_attention_large_vs_monai_attention": ratio("monai_attention", "ours_attention_large"),
        "speedup_attention_large_vs_monai_unet": ratio("monai_unet", "ours_attention_large"),
        "speedup_unet_large_vs_monai_unet": ratio("monai_unet", "ours_unet_large"),
        "bf16_gain_unet": ratio("ours_unet_fp32", "ours_unet"),
        "bf16_gain_attention": ratio("ours_attention_fp32", "ours_attention"),
        "bf16_gain_monai_unet": ratio("monai_unet", "monai_unet_bf16"),
        "bf16_gain_monai_attention": ratio("monai_attention", "monai_attention_bf16"),
        "attention_overhead_ours": ratio("ours_attention", "ours_unet"),
        "attention_overhead_ours_stem": ratio("ours_attention_stem_fp32", "ours_unet_stem_fp32"),
        "attention_overhead_monai": ratio("monai_attention", "monai_unet"),
        "tta_cost_nnunet": ratio("nnunet_tta", "nnunet_notta"),
    }
    out.update({k: v for k, v in ratios.items() if v is not None})
    for a, b in (("monai_attention", "ours_attention"), ("monai_unet", "ours_attention"),
                 ("monai_attention", "ours_attention_stem_fp32"), ("monai_unet", "ours_attention_stem_fp32"),
                 ("monai_attention", "ours_attention_large"), ("monai_unet", "ours_attention_large")):
        if a in rows and b in rows and rows[b].get("cpu_s"):  # CPU seconds: steadier than wall time on a busy machine
            out[f"cpu_ratio_{a}_vs_{b}"] = rows[a]["cpu_s"] / rows[b]["cpu_s"]
    out.update({f"split_{k}": v for k, v in split_of(rows, "total").items()})
    out.update({f"split_cpu_{k}": v for k, v in split_of(rows, "cpu_s").items()})
    return out


def split_lines(summary: dict, bf16_note: str | None = None) -> str:
    """The speedup split as sentences (wall seconds, CPU seconds in brackets); ``bf16_note``
    stands for the precision factor when no bf16 row ran."""
    def f(key: str) -> str:
        wall, cpu = summary.get(f"split_{key}"), summary.get(f"split_cpu_{key}")
        if wall is None:
            return "n/a"
        return f"{wall:.2f}x" + (f" ({cpu:.2f}x in CPU s)" if cpu is not None else "")

    if not any(k.startswith("split_") for k in summary):
        return ("Speedup split: n/a (it needs monai_attention, ours_attention_stockwin and ours_attention_fp32 "
                "or ours_attention in fp32)")
    lines = ["Speedup of ours (attention-gated) over stock MONAI AttentionUnet, split into its causes:",
             f"- at fp32, total {f('total_fp32')} = window plan {f('window_plan')} (ours_attention_stockwin / ours fp32) "
             f"x architecture and pipeline code {f('architecture')} (monai_attention / ours_attention_stockwin)"]
    if "split_stem" in summary:
        lines.append(f"- with the strided stem (the real-CT CPU recipe's net), at fp32: total {f('total_stem_fp32')} = the above "
                     f"x strided stem {f('stem')} (ours fp32 / ours_attention_stem_fp32: no conv at the input resolution, "
                     "and the larger window the plan gives it)")
    if "split_precision" in summary:
        lines.append(f"- precision {f('precision')} (ours fp32 / ours bf16); ours bf16 over MONAI fp32: total {f('total_bf16')} "
                     "= precision x window plan x architecture")
    else:
        lines.append(f"- precision: n/a ({bf16_note or 'no bf16 row of ours ran'})")
    return "\n".join(lines)


def table(rows: dict[str, dict]) -> str:
    header = ["pipeline", "precision", "window", "overlap", "sw batch", "windows", "mirrors", "net voxels (M)",
              "load + preprocess s", "sliding window s", "to original grid + write s", "end to end s", "CPU s", "peak RSS GB"]
    body = []
    for name, r in rows.items():
        if "total" not in r:
            body.append([name, r.get("skipped") or r.get("error") or "not run", *[""] * (len(header) - 2)])
            continue
        body.append([name, r["precision"], "x".join(map(str, r["roi"])), r["overlap"], r["sw_batch_size"], r["windows"],
                     r.get("mirrors", 1), r["net_voxels"] / 1e6 if "net_voxels" in r else float("nan"),
                     r["load_preprocess"], r["sliding_window"], r["restore_write"], r["total"],
                     r.get("cpu_s", float("nan")), r["peak_rss_gb"]])
    return md_table(header, body)


def child_argv(name: str, args: argparse.Namespace, image: Path, tmp: Path, runs: dict[str, Path], nnunet: dict) -> list:
    """The command line of the child that runs row ``name``."""
    kind, model, _, window = PIPELINES[name]
    argv = [__file__, "--child", name, "--image", image, "--out", tmp / f"out_{name}", "--threads", args.threads,
            "--channels", *args.channels, "--monai-roi", args.monai_roi]
    if kind == "ours":
        argv += ["--run-dir", runs[model]]
        if window == "large":
            argv += ["--overlap", args.overlap, "--child-roi", *args.large_roi, "--sw-batch-size", args.large_sw_batch_size]
        elif window == "stock":
            argv += ["--overlap", STOCK_WINDOW["overlap"], "--child-roi", *[args.monai_roi] * 3,
                     "--sw-batch-size", STOCK_WINDOW["sw_batch_size"], "--child-blend", STOCK_WINDOW["blend"]]
        else:
            argv += ["--overlap", args.overlap, *(["--sw-batch-size", args.sw_batch_size] if args.sw_batch_size else [])]
    elif kind == "nnunet":
        argv += ["--nnunet-work", tmp / "nnunet", "--nnunet-model-dir", nnunet["model_dir"]]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child_mode(args)
        return 0
    from medseg.runtime import cpu_supports_bf16

    bf16_native = cpu_supports_bf16()
    if args.pipelines is None:
        args.pipelines = default_pipelines(bf16_native)
    bf16_ran = any(is_bf16_row(p) for p in args.pipelines)
    bf16_note = None if bf16_ran else (NO_BF16_NOTE if not bf16_native else "bf16 rows: not asked for")
    if bf16_ran and not bf16_native:
        bf16_note = "bf16 rows: emulated (no native bf16 on this CPU), not representative"
    set_threads(args.threads)
    if args.quick:
        args.channels = list(QUICK["channels"])
        args.roi = args.roi or [QUICK["roi"]] * 3
        args.monai_roi = QUICK["roi"]
        args.large_roi = [QUICK["large_roi"]] * 3
        args.stem_roi = args.stem_roi or [QUICK["stem_roi"]] * 3
    nnunet_rows = [p for p in args.pipelines if PIPELINES[p][0] == "nnunet"]
    nnunet, nnunet_data = {}, ""
    with tempfile.TemporaryDirectory(prefix="medseg_infer_speed_") as tmp_s:
        tmp = Path(tmp_s)
        image, runs, source = prepare(args, tmp)
        if nnunet_rows:
            nnunet, nnunet_data = prepare_nnunet(args, tmp)
        runs_by: dict[str, list[dict]] = {p: [] for p in args.pipelines}
        for rep in range(args.repeats):
            for name in args.pipelines:
                if rep > 0 and name in args.once:
                    continue
                if PIPELINES[name][0] == "nnunet" and "model_dir" not in nnunet:
                    runs_by[name].append({k: v for k, v in nnunet.items() if k in ("skipped", "error")})
                    continue
                print(f"[{rep + 1}/{args.repeats}] {name} ...", file=sys.stderr, flush=True)
                try:
                    runs_by[name].append(run_child(child_argv(name, args, image, tmp, runs, nnunet)))
                except RuntimeError as err:
                    if PIPELINES[name][0] != "nnunet":
                        raise
                    print(err, file=sys.stderr)  # a failed nnU-Net row does not lose the others
                    runs_by[name].append({"error": f"error: {str(err).strip().splitlines()[-1][:200]}"})
    rows = {}
    for name, results in runs_by.items():  # the fastest run: the one the other users of the machine disturbed least
        timed = [r for r in results if "total" in r]
        if not timed:
            rows[name] = results[-1]
            continue
        best = min(timed, key=lambda r: r["total"])
        rows[name] = {**best, "total_all": [r["total"] for r in timed],
                      "total_median": statistics.median(r["total"] for r in timed)}
    summary = summarize(rows)
    md = table(rows)
    print(md)
    meta = meta_now(args.threads)
    source = repo_relative(source)
    notes = (f"Input: {source}. Untrained weights, 6 classes, channels {tuple(args.channels)} (ours and MONAI), one subprocess per "
             f"pipeline (peak RSS = its own `ru_maxrss`), {args.threads} threads, fastest of {args.repeats} interleaved run(s)"
             + (f" ({', '.join(once)}: one run)" if (once := [p for p in args.pipelines if p in args.once]) and args.repeats > 1 else "")
             + ". "
             "Ours: `Predictor.from_run(...).predict(path)` + writing the mask, Gaussian blending; precision `auto` "
             "(bf16 autocast on a CPU with native bf16, else fp32: the precision column says which ran), `_fp32` / `_bf16` "
             "forced, `channels_last_3d` (the CPU default for 3D nets); window = the patch size "
             "the data layer plans for this image and this net (`medseg.data.plan`: the median shape's aspect, 8 GB "
             "of training memory at batch 2 for a net of this first-stage width, as nnU-Net plans for its "
             "architecture)"
             + (", and for the `_large` rows a window covering most of the volume" if any(p.endswith("_large") for p in args.pipelines) else "")
             + ("; `ours_attention_stockwin`: fp32 with the stock window plan (constant blending)" if "ours_attention_stockwin" in args.pipelines else "")
             + ("; `ours_*_stem_*`: the same nets with a strided stem (`model.strides` all 2: no conv at the input "
                "resolution, logits upsampled; the architecture of `configs/real_organs.yaml`, whose 15-minute runs give "
                "the real-CT study's Dice), planned the same way for that net, at 1.5 mm like every row of ours and MONAI's"
                if any("_stem" in p for p in args.pipelines) else "")
             + ". MONAI: the stock tutorial pipeline (`benchmarks/stock_monai.py`; `_bf16`: bf16 autocast around its "
             "sliding window).")
    if nnunet_rows:
        prep = (f"planned by its own planner on {nnunet_data} (`{NNUNET_CONFIG}`, patch {'x'.join(map(str, nnunet['patch_size']))}, "
                f"spacing {'x'.join(f'{v:g}' for v in nnunet['spacing'])} mm, {nnunet['parameters'] / 1e6:.1f} M parameters; "
                f"planning, preprocessing and model {nnunet['prep_s']:.0f} s, not timed)") if "model_dir" in nnunet else \
            f"{nnunet.get('skipped') or nnunet.get('error')}"
        notes += (" nnU-Net v2: `nnUNetPredictor` with its defaults (tile step 0.5, Gaussian, fp32 on a CPU), "
                  f"untrained weights of its own architecture, {prep}; `nnunet_tta` mirrors over its TTA axes.")
    notes += (" CPU s = user + system seconds of the child (set-up included). net voxels = windows x window voxels x "
              "mirrorings (TTA).")
    ratio_lines = "\n".join(f"- {k}: {v:.2f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in summary.items()
                            if not k.endswith("_s") and not k.endswith("_gb") and not k.startswith("split_"))
    split_md = split_lines(summary, bf16_note)
    print(split_md)
    if bf16_note:
        summary["bf16_note"] = bf16_note
        print(bf16_note)
    body = f"{notes}\n\n{md}\n\n{split_md}\n\n" + (f"{bf16_note}.\n\n" if bf16_note else "") + ratio_lines
    cmd = " ".join(["python benchmarks/infer_speed.py", *(sys.argv[1:] if argv is None else argv)])
    results_dir = args.results or (Path(tempfile.gettempdir()) / "medseg_bench_quick" if args.quick else None)
    kw = {"out_dir": results_dir} if results_dir else {}
    md_path, _ = write_results("infer_speed", "Inference, end to end (512x512x133 chest CT)", body,
                               {"rows": rows, "summary": summary, "image": source, "nnunet": {k: repo_relative(v) if k == "model_dir" else v for k, v in nnunet.items()}},
                               meta, command=cmd, **kw)
    print(f"wrote {md_path}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
