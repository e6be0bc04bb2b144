"""Where attention looks, as numbers: an energy-based pointing game for spatial attention maps.

For one spatial map ``A`` (values in [0, 1], e.g. ``gate/level2``) and a reference label map, per
class ``c`` (and for the whole foreground, key ``"fg"`` = every label > 0), with ``R`` the region
of class ``c`` dilated by ``margin_mm`` (every voxel within that Euclidean distance in mm of the
class, from the voxel spacing; 0 = the class itself) and ``V`` every scored voxel:

- ``energy_fraction = sum(A over R) / sum(A over V)``: the share of the map's energy inside ``R``;
- ``volume_fraction = |R| / |V|``: what ``energy_fraction`` is for a flat map (any constant map,
  e.g. a gate open everywhere, ~1): a map concentrates on the class only where
  ``energy_fraction > volume_fraction``;
- ``mean_inside``, ``mean_outside``: mean of ``A`` over ``R`` and over ``V \\ R``;
- ``ratio = mean_inside / mean_outside``: 1 for a flat map, > 1 where the map favours the class,
  ``inf`` when the map is 0 everywhere outside ``R`` and not inside (perfect localisation).

Undefined values are NaN: a class absent from the reference (``R`` empty), ``R`` covering every
voxel (nothing outside), or a map that is 0 everywhere (no energy). NaN is left out of the means
over cases, ``inf`` is kept (as :func:`medseg.evaluate.evaluator.summarize` does for HD95).

**Grids.** A map on another grid than the label (a model's raw map at its level's resolution) is
upsampled to the label grid by trilinear interpolation (``align_corners=False``), the very resampling
the sliding window applies when it stitches maps (:mod:`medseg.infer.sliding`), so the numbers
describe the maps that ``medseg infer --save-gates`` writes and TensorBoard draws. The label is
never resampled: pooling it to a coarse grid and thresholding would erase small structures (a
lesion smaller than half a coarse voxel leaves no trace), while the upsampled map keeps its mean.

**Folders** (:func:`gate_localisation_folders`): ``medseg infer --save-gates`` writes
``<case>_gates/<map>.nii.gz`` (``gate/level2`` -> ``gate_level2``) on the input's grid; each is
scored against ``<case>``'s reference (reoriented without interpolation when only the axis order
differs, else refused). Map names are the file names' stems.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from medseg.evaluate.evaluator import _label_array, _mean, align_to_reference
from medseg.io import Volume, find_volumes, read_volume

__all__ = ["DEFAULT_MARGIN_MM", "GATE_METRICS", "format_gate_table", "gate_localisation", "gate_localisation_folders",
           "localisation_scalars", "mean_localisation", "resample_to"]

log = logging.getLogger(__name__)

DEFAULT_MARGIN_MM = 5.0  # a coarse level's map is blurred over a few mm by its upsampling
GATE_METRICS = ("energy_fraction", "volume_fraction", "mean_inside", "mean_outside", "ratio")


def resample_to(gate: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``gate (X', Y', Z')`` trilinearly resampled to ``shape`` (align_corners=False, as the sliding
    window stitches maps: :func:`medseg.data.resample.interpolate`); unchanged when equal."""
    import torch

    from medseg.data.resample import interpolate

    gate = np.asarray(gate, dtype=np.float32)
    if tuple(gate.shape) == tuple(shape):
        return gate
    return interpolate(torch.from_numpy(np.ascontiguousarray(gate))[None], shape)[0].numpy()


def _region(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """``mask`` dilated by ``margin_mm`` (Euclidean distance in mm; 0: ``mask`` itself)."""
    if margin_mm <= 0 or not mask.any():
        return mask
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~mask, sampling=tuple(float(s) for s in spacing)) <= margin_mm


def _div(a: float, b: float) -> float:
    if b == 0:
        return float("nan") if a == 0 else float("inf")
    return a / b


def _scores(gate: np.ndarray, region: np.ndarray, valid: np.ndarray | None) -> dict[str, float]:
    if valid is not None:
        gate, region = gate[valid], region[valid]
    n, n_in = int(region.size), int(np.count_nonzero(region))
    if n_in == 0 or n == 0:
        return {k: float("nan") for k in GATE_METRICS}
    total = float(gate.sum(dtype=np.float64))
    inside = float(gate[region].sum(dtype=np.float64))
    mean_in = inside / n_in
    mean_out = (total - inside) / (n - n_in) if n > n_in else float("nan")
    ratio = float("nan") if math.isnan(mean_out) or (mean_in == 0 and mean_out == 0) else _div(mean_in, mean_out)
    return {"energy_fraction": inside / total if total > 0 else float("nan"), "volume_fraction": n_in / n,
            "mean_inside": mean_in, "mean_outside": mean_out, "ratio": ratio}


def gate_localisation(gates: Mapping[str, np.ndarray], label: np.ndarray, *, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                      classes: Iterable[int] | None = None, margin_mm: float = DEFAULT_MARGIN_MM,
                      ignore_label: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Localisation of every map in ``gates`` against ``label`` (see the module docstring).

    Args:
        gates: ``{name: (X', Y', Z')}`` maps in [0, 1], on ``label``'s grid or a coarser one
            (upsampled trilinearly to it).
        label: ``(X, Y, Z)`` integer reference.
        spacing: voxel size of ``label`` in mm (for the margin).
        classes: label values to score (default: every value > 0 present, the ignore label left out);
            ``"fg"`` (all of them together) is always scored.
        margin_mm: dilation of each class region, mm (0: none).
        ignore_label: reference value whose voxels are left out of ``V`` (nnU-Net v2's ignore label).

    Returns:
        ``{map name: {"fg" | "<class>": {metric: value}}}`` with the metrics of :data:`GATE_METRICS`.
    """
    label = np.asarray(label)
    valid = (label != ignore_label) if ignore_label is not None else None
    if classes is None:
        classes = sorted(int(v) for v in np.unique(label) if v > 0 and v != ignore_label)
    fg = label > 0
    if ignore_label is not None:
        fg &= label != ignore_label
    regions = {"fg": _region(fg, spacing, margin_mm)}
    regions.update({str(c): _region(label == c, spacing, margin_mm) for c in classes})
    out = {}
    for name, gate in gates.items():
        g = resample_to(gate, label.shape)
        out[name] = {key: _scores(g, region, valid) for key, region in regions.items()}
    return out


def mean_localisation(per_case: Sequence[Mapping[str, Mapping[str, Mapping[str, float]]]]) -> dict:
    """Mean over cases of :func:`gate_localisation` results, per map, class and metric (NaN left out, inf kept)."""
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for case in per_case:
        for name, by_class in case.items():
            for key, metrics in by_class.items():
                slot = values.setdefault(name, {}).setdefault(key, {})
                for m, v in metrics.items():
                    slot.setdefault(m, []).append(float(v))
    return {name: {key: {m: _mean(vs) for m, vs in ms.items()} for key, ms in by_class.items()}
            for name, by_class in sorted(values.items())}


def localisation_scalars(mean: Mapping[str, Mapping[str, Mapping[str, float]]],
                         label_names: Mapping[str, str] | None = None) -> dict[str, float]:
    """TensorBoard scalars ``gate_loc/<map>/<class name>/<metric>`` of a :func:`mean_localisation` dict
    (classes named by ``label_names``, ``fg`` kept; NaN values are left out)."""
    names = dict(label_names or {})
    out = {}
    for name, by_class in mean.items():
        for key, metrics in by_class.items():
            for m, v in metrics.items():
                if not math.isnan(v):
                    out[f"gate_loc/{name}/{names.get(key, key)}/{m}"] = v
    return out


def _case_gates(gates_dir: Path, case: str, ref_path: Path, margin_mm: float, ignore_label: int | None) -> dict:
    ref = read_volume(ref_path)
    label = _label_array(ref)
    gates = {}
    for path in find_volumes(gates_dir / f"{case}_gates"):
        vol = read_volume(path, dtype=np.float32)
        name = path.name.split(".")[0]
        gates[name] = align_to_reference(Volume(vol.array, vol.affine, path), ref)
    return gate_localisation(gates, label, spacing=ref.spacing, margin_mm=margin_mm, ignore_label=ignore_label)


def gate_localisation_folders(gates_dir: str | Path, cases: Sequence[tuple[str, Path]], *,
                              margin_mm: float = DEFAULT_MARGIN_MM, ignore_label: int | None = None) -> dict:
    """Score the ``<case>_gates/`` folders of ``gates_dir`` against each case's reference.

    Args:
        gates_dir: folder holding ``<case>_gates/<map>.nii.gz`` (``medseg infer --save-gates``'s output).
        cases: ``(case, reference file)`` pairs.
        margin_mm, ignore_label: see :func:`gate_localisation`.

    Returns:
        ``{"per_case": {case: {map: {class: {metric: value}}}}, "mean": {...}, "missing": [cases
        without a gate folder], "margin_mm": float, "resampling": str}``.

    Raises:
        InputError / GeometryError: an unreadable map, or a map on another grid than its reference.
    """
    gates_dir = Path(gates_dir)
    per_case, missing = {}, []
    for case, ref in cases:
        if not (gates_dir / f"{case}_gates").is_dir():
            missing.append(case)
            continue
        per_case[case] = _case_gates(gates_dir, case, Path(ref), margin_mm, ignore_label)
    if missing:
        log.warning("no gate folder <case>_gates/ in %s for %d case(s): %s", gates_dir, len(missing), ", ".join(missing))
    return {"per_case": per_case, "mean": mean_localisation(list(per_case.values())), "missing": missing,
            "margin_mm": float(margin_mm), "resampling": "maps upsampled trilinearly to the reference grid"}


def format_gate_table(loc: Mapping, label_names: Mapping[str, str] | None = None) -> str:
    """Console table of ``loc["mean"]``: one row per map and class; a flat map has ratio 1 and
    energy fraction = volume fraction."""
    names = dict(label_names or {})
    header = ["map", "class", "energy_frac", "volume_frac", "mean_in", "mean_out", "in/out"]
    rows = [header]
    for name, by_class in loc.get("mean", {}).items():
        for key, m in by_class.items():
            rows.append([name, names.get(key, key)] + [_fmt(m.get(k)) for k in GATE_METRICS])
    if len(rows) == 1:
        return "gate localisation: no gate maps scored"
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    title = f"gate localisation (margin {loc.get('margin_mm', DEFAULT_MARGIN_MM):g} mm; flat map: in/out 1, energy = volume fraction)"
    return title + "\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    return "nan" if math.isnan(v) else "inf" if math.isinf(v) else f"{v:.3f}"
