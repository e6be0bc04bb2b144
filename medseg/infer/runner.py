"""Folder-level inference: find the inputs, plan and guard the outputs, write every result.

Output layout in ``OUT_DIR`` (one set per case; ``<case>`` is the input name without its
suffix and nnU-Net's ``_0000`` channel tag, a DICOM series folder gives its folder name; for a
run trained on ``n > 1`` image channels the files ``<case>_0000 ... <case>_{n-1}`` of a folder
form one case, see :func:`group_channels`):

- ``<case>.nii.gz``: the mask, ``uint8`` label values, the input's exact shape and affine
  (``--output-format nrrd | mha | same`` changes the container; ``same`` keeps the input's
  format, DICOM -> NIfTI, ``.mhd`` -> ``.mha``, ``.nhdr`` -> ``.nrrd``).
- ``<case>_probabilities.nii.gz`` (``--save-probabilities``): one 4-D NIfTI ``(I, J, K, C)``
  with the input's affine; volume ``c`` is the softmax probability of label value ``c``
  (background first). Stored as ``uint16`` with ``scl_slope = 1/65535`` (NIfTI has no
  float16): 2 bytes a voxel like float16, 1.5e-5 resolution, and every NIfTI reader that
  applies the slope (nibabel, ITK, 3D Slicer) returns floats in [0, 1].
- ``<case>_gates/<name>.nii.gz`` (``--save-gates``): each attention map (``gate/level2`` ->
  ``gate_level2.nii.gz``), float32 in [0, 1], in the input's grid.

Inputs are never overwritten: an output folder equal to the input folder is refused, and
so is any planned output path that is an input. Writes are atomic (``medseg.io``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputError, MedsegError
from medseg.infer.predictor import PredictionResult, Predictor
from medseg.io import (
    case_name,
    find_volumes,
    is_dicom_dir,
    is_volume_path,
    nifti_xform_codes,
    split_channel_tag,
    write_nifti,
    write_volume,
)
from medseg.runtime import get_logger

__all__ = ["OUTPUT_FORMATS", "CaseJob", "collect_inputs", "group_channels", "plan_jobs", "run_inference", "select_part",
           "write_probabilities", "write_result"]

OUTPUT_FORMATS = ("nii.gz", "nrrd", "mha", "same")
_SAME_FORMAT = {".nii.gz": ".nii.gz", ".nii": ".nii", ".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha", ".mhd": ".mha"}
log = get_logger(__name__)


@dataclass
class CaseJob:
    """One input (the first channel file of a multi-channel case) and the paths its outputs go to."""

    case: str
    source: Path
    mask: Path
    probabilities: Path
    gates_dir: Path
    channels: tuple[Path, ...] = ()  # every channel file of a multi-channel case, in channel order

    @property
    def inputs(self) -> list[Path]:
        """The files of the case: its channel files, or ``[source]``."""
        return list(self.channels) or [self.source]


def collect_inputs(input_path: str | Path, channels: int = 1) -> list[Path]:
    """The volumes named by ``input_path``: a volume file, a DICOM series folder, or a folder of them.

    Args:
        input_path: file or folder.
        channels: the run's image channels; with more than one, a file ``<case>_0000...`` brings
            the other channel files of its case from its folder.

    Raises:
        InputError: missing path, a file that is not a volume, a folder without volumes.
    """
    p = Path(input_path)
    if not p.exists():
        raise InputError(f"{p}: input not found")
    if p.is_file():
        if not is_volume_path(p):
            raise InputError(f"{p}: not a volume file (expected .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd or a DICOM folder)")
        case, channel = split_channel_tag(p)
        if channels > 1 and channel is not None:
            tags = [(split_channel_tag(q), q) for q in find_volumes(p.parent)]
            return [q for (c, ch), q in tags if c == case and ch is not None]
        return [p]
    if is_dicom_dir(p):
        return [p]
    found = find_volumes(p)
    if not found:
        raise InputError(f"{p}: no volume files (.nii.gz, .nii, .nrrd, .mha, ...) or DICOM series folders in this folder")
    return found


def _mask_suffix(source: Path, output_format: str) -> str:
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"output format '{output_format}' is not valid (use one of {', '.join(OUTPUT_FORMATS)})")
    if output_format != "same":
        return "." + output_format
    if source.is_dir():
        return ".nii.gz"
    low = source.name.lower()
    return next(v for k, v in _SAME_FORMAT.items() if low.endswith(k))


def safe_name(name: str) -> str:
    """A file-name-safe version of a gate name: ``gate/level2`` -> ``gate_level2``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "map"


def group_channels(inputs: list[Path], channels: int = 1) -> list[tuple[str, list[Path]]]:
    """The cases of ``inputs`` as ``(case, [file per channel])``, in input order.

    One channel: every input is a case named by :func:`medseg.io.case_name` (only nnU-Net's
    ``_0000`` tag is stripped: ``p_0001.nii.gz`` and ``p_0002.nii.gz`` are two cases). ``n > 1``
    channels: the files ``<case>_0000 ... <case>_{n-1:04d}`` are the channels of ``<case>``
    (nnU-Net's naming), each case needs exactly those.

    Raises:
        InputError: two inputs give one case name; with several channels, a file without a
            ``_NNNN`` tag, a channel given twice, or a case whose channel files are not
            ``_0000 ... _{n-1}`` (names the files found and the ones expected).
    """
    if channels <= 1:
        grouped = {}
        for source in inputs:
            case = case_name(source)
            if case in grouped:
                raise InputError(f"{source}: gives the same case name '{case}' as {grouped[case][0]}; rename one of them")
            grouped[case] = [source]
        return list(grouped.items())
    tagged: dict[str, dict[int, Path]] = {}
    for source in inputs:
        case, ch = split_channel_tag(source)
        if ch is None:
            raise InputError(f"{source}: this run takes {channels} image channels per case; name each case's files "
                             f"<case>_0000 ... <case>_{channels - 1:04d} (this name has no _NNNN channel tag)")
        if ch in tagged.setdefault(case, {}):
            raise InputError(f"{source}: channel {ch} of case '{case}' is given twice (also {tagged[case][ch]})")
        tagged[case][ch] = source
    for case, files in tagged.items():
        if sorted(files) != list(range(channels)):
            found = ", ".join(p.name for _, p in sorted(files.items()))
            raise InputError(f"{next(iter(files.values()))}: case '{case}' has the channel files {found}; this run "
                             f"needs {channels}: {case}_0000 ... {case}_{channels - 1:04d}")
    return [(case, [files[c] for c in range(channels)]) for case, files in tagged.items()]


def plan_jobs(inputs: list[Path], out_dir: str | Path, input_path: str | Path, *, output_format: str = "nii.gz",
              channels: int = 1) -> list[CaseJob]:
    """Output paths for each case of ``inputs`` (see :func:`group_channels`), refusing anything that
    could overwrite an input.

    Raises:
        InputError: ``out_dir`` is the input folder, two inputs give the same case name, the
            channel files do not form whole cases, or an output path is one of the inputs.
    """
    out = Path(out_dir).resolve()
    src = Path(input_path).resolve()
    if src.is_dir() and out == src:
        raise InputError(f"{out_dir}: output folder is the input folder; choose another so that no input can be overwritten")
    jobs = []
    for case, files in group_channels(inputs, channels):
        jobs.append(CaseJob(case, files[0], out / f"{case}{_mask_suffix(files[0], output_format)}",
                            out / f"{case}_probabilities.nii.gz", out / f"{case}_gates",
                            tuple(files) if len(files) > 1 else ()))
    sources = {s.resolve() for s in inputs}
    for job in jobs:
        for target in (job.mask, job.probabilities, job.gates_dir):
            if target in sources or any(s.is_relative_to(target) for s in sources):
                raise InputError(f"{target}: output would overwrite the input {target}; choose another output folder")
    return jobs


def select_part(items: list, num_parts: int = 1, part_id: int = 0) -> list:
    """Every ``num_parts``-th item starting at ``part_id`` (split a folder across machines).

    Raises:
        InputError: ``num_parts < 1`` or ``part_id`` outside ``0..num_parts-1``.
    """
    if num_parts < 1:
        raise InputError(f"--num-parts must be >= 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise InputError(f"--part-id must be in 0..{num_parts - 1}, got {part_id}")
    return items[part_id::num_parts]


def write_probabilities(probs: np.ndarray, affine: np.ndarray, path: str | Path, *,
                        xform_codes: tuple[int, int] | None = None) -> Path:
    """Write ``(C, I, J, K)`` probabilities as a 4-D ``uint16`` NIfTI with ``scl_slope = 1/65535``.

    ``xform_codes``: the NIfTI ``(qform_code, sform_code)`` to write (default scanner, 1 and 1).
    """
    q = np.empty(probs.shape[1:] + probs.shape[:1], dtype=np.uint16)
    for c in range(probs.shape[0]):  # one float32 channel at a time
        q[..., c] = np.rint(np.clip(probs[c].astype(np.float32), 0.0, 1.0) * 65535.0)
    return write_nifti(q, affine, path, xform_codes=xform_codes, slope_inter=(1.0 / 65535.0, 0.0),
                       descrip="medseg softmax; volume c = label c")


def write_result(result: PredictionResult, job: CaseJob) -> list[Path]:
    """Write the mask, and the probabilities / gate maps when the result holds them.

    NIfTI outputs get the input's qform/sform codes (:func:`medseg.io.nifti_xform_codes`), so
    their headers match the input's.
    """
    codes = nifti_xform_codes(job.source)
    written = [write_volume(result.mask, job.mask, xform_codes=codes)]
    if result.probabilities is not None:
        written.append(write_probabilities(result.probabilities, result.mask.affine, job.probabilities,
                                           xform_codes=codes))
    for name, vol in result.gates.items():
        written.append(write_volume(vol, job.gates_dir / f"{safe_name(name)}.nii.gz", xform_codes=codes))
    return written


def run_inference(predictor: Predictor, input_path: str | Path, out_dir: str | Path, *, output_format: str = "nii.gz",
                  save_probabilities: bool = False, save_gates: bool = False, num_parts: int = 1,
                  part_id: int = 0, skip_existing: bool = False) -> list[Path]:
    """Segment every input of ``input_path`` (this machine's part of them) into ``out_dir``.

    A case that fails with a user error is reported and skipped; the others still run, then
    an :class:`InputError` lists the failed cases. ``skip_existing`` (``medseg infer --continue``)
    leaves out the cases whose mask (and probabilities, when asked for) already exist: writes are
    atomic, so an existing file is a finished one.

    Returns:
        The paths written.
    """
    channels = len(predictor.channel_names)
    inputs = collect_inputs(input_path, channels)
    jobs = select_part(plan_jobs(inputs, out_dir, input_path, output_format=output_format, channels=channels),
                       num_parts, part_id)
    if skip_existing:
        todo = [j for j in jobs if not (j.mask.is_file() and (not save_probabilities or j.probabilities.is_file()))]
        if len(todo) < len(jobs):
            log.info("--continue: %d case(s) already segmented in %s, skipped", len(jobs) - len(todo), out_dir)
        jobs = todo
    log.info("%d case(s) to segment (part %d of %d) -> %s", len(jobs), part_id + 1, num_parts, out_dir)
    written: list[Path] = []
    failed: list[str] = []
    for i, job in enumerate(jobs, 1):
        log.info("[%d/%d] %s", i, len(jobs), job.source)
        try:
            result = predictor.predict(job.inputs, probabilities=save_probabilities, gates=save_gates, case=job.case)
        except MedsegError as err:
            if len(jobs) == 1:
                raise
            log.error("%s", err)
            failed.append(f"{job.source} ({err})")
            continue
        if save_gates and not result.gates:
            log.warning("%s: the model has no attention maps; nothing written for --save-gates", job.case)
        written += write_result(result, job)
    if failed:
        raise InputError(f"{len(failed)} of {len(jobs)} case(s) failed: " + "; ".join(failed))
    return written


def checkpoint_identity(path: Path) -> dict:
    """``{"path", "sha256", "epoch", "step"}`` of a checkpoint (``epoch``: the last completed one, 0-based)."""
    import hashlib

    from medseg.train.checkpoint import load_checkpoint

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    state = load_checkpoint(path)
    return {"path": str(path.resolve()), "sha256": digest.hexdigest(), "epoch": state.get("epoch"),
            "step": state.get("step")}


def write_predict_args(out_dir: str | Path, predictor: Predictor, *, run: str | Path, input_path: str | Path,
                       checkpoint: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                       output_format: str = "nii.gz", save_probabilities: bool = False, save_gates: bool = False,
                       num_parts: int = 1, part_id: int = 0, continue_: bool = False) -> Path:
    """``OUT_DIR/predict_args.json``: what an inference call ran with (as nnU-Net's predict_from_raw_data_args.json).

    The settings are the predictor's resolved ones (after the run's ``infer`` section, the overrides
    and the flags; ``precision`` is the autocast dtype actually used), plus the checkpoint's identity
    (``checkpoint`` None: the run's ``infer.checkpoint``).
    """
    import json

    from medseg import __version__
    from medseg.config import load_config
    from medseg.io import atomic_write_text

    run = Path(run)
    name = checkpoint or load_config(run / "config.yaml", list(overrides)).infer.checkpoint
    amp = predictor.amp_dtype
    record = {
        "medseg_version": __version__,
        "model": str(run.resolve()),
        "checkpoint": {"name": name, **checkpoint_identity(run / "checkpoints" / f"{name}.pt")},
        "input": str(Path(input_path).resolve()),
        "output": str(Path(out_dir).resolve()),
        "overrides": list(overrides),
        "settings": {
            "device": str(predictor.device),
            "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
            "roi_size": list(predictor.roi_size),
            "overlap": predictor.overlap,
            "blend": predictor.blend,
            "sw_batch_size": predictor.sw_batch_size,
            "tta": predictor.tta,
            "mirror_axes": list(predictor.mirror_axes),
            "channels_last": predictor.channels_last,
            "postprocess": predictor.postprocess,
            "channels": list(predictor.channel_names),
        },
        "output_format": output_format,
        "save_probabilities": save_probabilities,
        "save_gates": save_gates,
        "num_parts": num_parts,
        "part_id": part_id,
        "continue": continue_,
    }
    return atomic_write_text(Path(out_dir) / "predict_args.json", json.dumps(record, indent=2) + "\n")
