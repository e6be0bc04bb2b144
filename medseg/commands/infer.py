"""``medseg infer``: segment volumes with a trained run, in each input's own geometry.

A thin layer over :class:`medseg.infer.predictor.Predictor` and
:func:`medseg.infer.runner.run_inference` (the output layout is described there).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.infer.postprocess import POSTPROCESSORS
from medseg.infer.runner import OUTPUT_FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "outputs in OUT_DIR, per case:\n"
        "  <case>.nii.gz                uint8 mask, the input's exact shape and affine\n"
        "  <case>_probabilities.nii.gz  (--save-probabilities) 4-D (I,J,K,C): volume c = P(label c),\n"
        "                               uint16 with scl_slope 1/65535 (readers return floats in [0,1])\n"
        "  <case>_gates/<name>.nii.gz   (--save-gates) each attention map, float32 in [0,1]\n"
        "once per call:\n"
        "  predict_args.json            the resolved settings and the checkpoint's identity (path, sha256, epoch)\n"
        "<case> is the input name without suffix and nnU-Net's _0000 tag (a DICOM folder: its name);\n"
        "for a run trained on several image channels, <case>_0000, <case>_0001, ... (one file per channel) are one case.\n"
        "Options left unset come from the run's config.yaml `infer` section; trailing\n"
        "section.key=value overrides (e.g. infer.overlap=0.25) apply to that config.\n"
        "--continue skips the cases whose mask (and --save-probabilities file) is already in OUT_DIR."
    )
    p.add_argument("--model", "-m", required=True, metavar="RUN_DIR",
                   help="training run directory (config.yaml, plans.json, checkpoints/<name>.pt)")
    p.add_argument("-i", "--input", required=True, metavar="INPUT",
                   help="a volume file (.nii.gz, .nii, .nrrd, .mha, .mhd), a DICOM series folder, or a folder of them")
    p.add_argument("-o", "--output", "--out", dest="output", required=True, metavar="OUT_DIR",
                   help="output folder (created; must not be the input folder)")
    p.add_argument("--checkpoint", choices=("best", "final", "latest"), default=None,
                   help="which checkpoint of the run to load (default: infer.checkpoint, normally best)")
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap fraction in [0, 1) (default: infer.overlap, normally 0.5)")
    p.add_argument("--blend", choices=("gaussian", "constant"), default=None,
                   help="how overlapping windows are blended: Gaussian importance weights (default) or uniform")
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="windows per forward pass (default: infer.sw_batch_size); larger is faster on a GPU; on the CPU capped so "
                        "that a forward holds at most infer.cpu_window_voxels voxels (4 M; x2 in bf16; 0 = no cap)")
    p.add_argument("--tta", action="store_true", default=None,
                   help="test-time augmentation: average the predictions mirrored along every subset of the "
                        "axes training mirrored (plans.json inference_allowed_mirroring_axes; all 3 axes: 8x "
                        "slower); a run trained without mirroring predicts once, with a warning")
    p.add_argument("--device", default=None,
                   help="auto | cpu | cuda | cuda:i (default: infer.device, normally auto = CUDA when available)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="autocast precision; auto = fp16 on CUDA, bf16 on a CPU with native bf16, else fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="run the network in channels_last_3d memory format; default: on for 3D nets on the CPU "
                        "(~1.6-1.9x faster there), off on CUDA; --no-channels-last turns it off")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write <case>_probabilities.nii.gz (softmax, input grid)")
    p.add_argument("--save-gates", action="store_true",
                   help="also write every attention/gate map as <case>_gates/<name>.nii.gz in the input grid")
    p.add_argument("--postprocess", choices=["auto", *POSTPROCESSORS.names()], default="auto",
                   help="auto (default): what training chose on its validation cases (the run's postprocessing.json: "
                        "largest component kept for the classes where that raised the validation Dice, or left it "
                        "unchanged for a class that is one component in every validation reference; none if the "
                        "run never validated); largest-component: every class; none: the raw arg-max")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="nii.gz",
                   help="mask file format; 'same' keeps the input's (DICOM -> nii.gz)")
    p.add_argument("--num-parts", type=int, default=1,
                   help="split the input folder into this many parts (one per machine / GPU)")
    p.add_argument("--part-id", type=int, default=0, help="which part this process segments, 0..num-parts-1")
    p.add_argument("--continue", dest="continue_", action="store_true",
                   help="skip the cases already segmented in OUT_DIR (their mask, and probabilities when asked for, exist)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides applied to the run's config.yaml (e.g. infer.sw_batch_size=4)")


def run(args: argparse.Namespace) -> int:
    from medseg.cli import show_progress
    from medseg.infer.predictor import Predictor
    from medseg.infer.runner import run_inference, select_part, write_predict_args

    select_part([], args.num_parts, args.part_id)  # validate before loading the model
    predictor = Predictor.from_run(
        args.model,
        checkpoint=args.checkpoint,
        device=args.device,
        precision=args.precision,
        overlap=args.overlap,
        blend=args.blend,
        sw_batch_size=args.sw_batch_size,
        tta=args.tta,
        overrides=args.overrides,
        channels_last=args.channels_last,  # None: auto
        postprocess=args.postprocess,
        progress=show_progress(args),
    )
    out = Path(args.output)
    before, finished = _listing(out), False
    try:
        written = run_inference(
            predictor, args.input, out, output_format=args.output_format,
            save_probabilities=args.save_probabilities, save_gates=args.save_gates,
            num_parts=args.num_parts, part_id=args.part_id, skip_existing=args.continue_,
        )
        finished = True
    finally:  # after a partial failure or Ctrl-C too, once something was written; a refused call writes nothing
        if finished or _listing(out) - before:
            write_predict_args(out, predictor, run=args.model, checkpoint=args.checkpoint, input_path=args.input,
                               overrides=args.overrides, output_format=args.output_format,
                               save_probabilities=args.save_probabilities, save_gates=args.save_gates,
                               num_parts=args.num_parts, part_id=args.part_id, continue_=args.continue_)
    print(f"wrote {len(written)} file(s) to {args.output}")
    return 0


def _listing(folder: Path) -> set[Path]:
    return set(folder.iterdir()) if folder.is_dir() else set()
