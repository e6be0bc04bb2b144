"""TensorBoard logging: scalars, validation overlays and gate-map heat maps.

Tags (documented in README.md, "Inspecting gate maps"):

- scalars: ``loss/total``, ``loss/dice_ce``, ``loss/aux`` (models with an auxiliary loss), ``lr``,
  ``val/dice/<class name>``, ``val/mean_fg_dice``, ``speed/patches_per_s``, ``time/epoch_s``;
- images, per fixed validation case and view (``axial`` = a slice ``[:, :, k]``, ``coronal`` =
  ``[:, j, :]``, both through the centre of the ground-truth foreground):
  ``val/<case>/<view>/segmentation`` (CT | ground truth | prediction, colour overlays) and
  ``gates/<case>/<view>/<map name>`` (each gate map, e.g. ``gate/level2`` or ``cbam/enc1``,
  resampled to the slice and drawn as a ``jet`` heat overlay on the CT, fixed scale 0..1);
- histograms: ``gate_hist/<map name>`` (gate values over the whole validation case);
- scalars of where each map looks (:mod:`medseg.evaluate.gates`, mean over the drawn validation
  cases): ``gate_loc/<map name>/<class name | fg>/<metric>`` with metric ``energy_fraction``,
  ``volume_fraction`` (what a flat map scores), ``mean_inside``, ``mean_outside``, ``ratio``.

Slices are shown radiologically (patient right on the image left, anterior / superior up)
with square millimetres (rows and columns resampled by their spacing). Colour maps come from
matplotlib and are applied with numpy; no pyplot window is ever opened.

``python -m medseg.train.tensorboard --logdir RUN/tensorboard --out docs/gate_maps.png`` tiles
the newest images of one case from an event file into a labelled PNG.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from medseg.errors import InputError, MedsegError

__all__ = ["VIEWS", "export_gate_grid", "log_case_images", "log_gate_histograms", "log_gate_localisation", "render_case",
           "slice_indices"]

VIEWS = {"axial": 2, "coronal": 1}  # view -> array axis the slice is taken across
MIN_SIDE_PX = 192  # small phantoms are upscaled (nearest) to at least this many pixels
SEPARATOR_PX = 2  # white gap between the CT | truth | prediction panels


def _cmap(name: str, n: int | None = None):
    import matplotlib

    return matplotlib.colormaps[name] if n is None else matplotlib.colormaps[name].resampled(n)


def slice_indices(label: np.ndarray | None, shape: tuple[int, int, int]) -> dict[str, int]:
    """Per view, the slice through the foreground centroid of ``label (X, Y, Z)`` (centre if empty)."""
    fg = np.argwhere(label > 0) if label is not None else np.zeros((0, 3))
    centre = fg.mean(axis=0) if len(fg) else np.asarray(shape) / 2.0
    return {view: int(min(max(round(centre[ax]), 0), shape[ax] - 1)) for view, ax in VIEWS.items()}


def _take(vol: np.ndarray, view: str, index: int) -> np.ndarray:
    return np.take(vol, index, axis=VIEWS[view])


def _display(a: np.ndarray) -> np.ndarray:
    """2-D slice ``(X, Y)`` or ``(X, Z)`` of a RAS array -> display rows (A->P or S->I), columns (R->L)."""
    return np.ascontiguousarray(a[::-1, ::-1].T)


def _resize_rows_cols(rgb: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Nearest-neighbour resize to square pixels, upscaled so the short side has >= MIN_SIDE_PX."""
    h, w = rgb.shape[:2]
    pix = min(row_mm, col_mm)
    out_h, out_w = h * row_mm / pix, w * col_mm / pix
    up = max(1.0, MIN_SIDE_PX / min(out_h, out_w))
    out_h, out_w = max(1, round(out_h * up)), max(1, round(out_w * up))
    rows = np.minimum((np.arange(out_h) + 0.5) * h / out_h, h - 1).astype(int)
    cols = np.minimum((np.arange(out_w) + 0.5) * w / out_w, w - 1).astype(int)
    return rgb[rows][:, cols]


def _gray(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    g = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return np.repeat(g[..., None], 3, axis=-1)


def _overlay_labels(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours (tab10, class k -> colour k) where ``labels > 0``."""
    colours = np.asarray(_cmap("tab10").colors)[:, :3]
    out = rgb.copy()
    mask = labels > 0
    col = colours[(labels[mask].astype(int) - 1) % len(colours)]
    out[mask] = (1 - alpha) * out[mask] + alpha * col
    return out


def _overlay_heat(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map with values in [0, 1] over the whole slice."""
    col = _cmap(cmap)(np.clip(heat, 0.0, 1.0))[..., :3]
    return (1 - alpha) * rgb + alpha * col


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_case(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray,
                gates: Mapping[str, np.ndarray], spacing: tuple[float, float, float],
                indices: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """All overlays of one case as ``HWC uint8`` images keyed ``"<view>/segmentation"`` / ``"<view>/<gate>"``.

    Args:
        image: ``(C, X, Y, Z)`` preprocessed image (channel 0 is drawn), RAS axis order.
        label: ``(X, Y, Z)`` ground truth or ``None``; pred: ``(X, Y, Z)`` predicted labels.
        gates: ``{name: (X, Y, Z)}`` maps in [0, 1] already on the image grid.
        spacing: voxel size ``(x, y, z)`` mm.
        indices: slice per view (default :func:`slice_indices` of ``label``).
    """
    ct = image[0]
    lo, hi = (float(v) for v in np.percentile(ct, [0.5, 99.5]))
    indices = indices or slice_indices(label if label is not None else pred, ct.shape)
    out: dict[str, np.ndarray] = {}
    for view, idx in indices.items():
        keep = [a for a in range(3) if a != VIEWS[view]]
        row_mm, col_mm = float(spacing[keep[1]]), float(spacing[keep[0]])
        base = _gray(_display(_take(ct, view, idx)), lo, hi)
        panels = [base]
        if label is not None:
            panels.append(_overlay_labels(base, _display(_take(label, view, idx))))
        panels.append(_overlay_labels(base, _display(_take(pred, view, idx))))
        panels = [_resize_rows_cols(p, row_mm, col_mm) for p in panels]
        sep = np.ones((panels[0].shape[0], SEPARATOR_PX, 3))
        seg = np.concatenate([p for pair in zip(panels, [sep] * len(panels)) for p in pair][:-1], axis=1)
        out[f"{view}/segmentation"] = _to_uint8(seg)
        for name, g in gates.items():
            heat = _overlay_heat(base, _display(_take(np.asarray(g, dtype=np.float32), view, idx)))
            out[f"{view}/{name}"] = _to_uint8(_resize_rows_cols(heat, row_mm, col_mm))
    return out


def log_case_images(writer, case: str, renders: Mapping[str, np.ndarray], step: int) -> None:
    """Write :func:`render_case` output under ``val/<case>/<view>/segmentation`` and ``gates/<case>/<view>/<map>``."""
    for key, img in renders.items():
        view, name = key.split("/", 1)
        tag = f"val/{case}/{view}/segmentation" if name == "segmentation" else f"gates/{case}/{view}/{name}"
        writer.add_image(tag, img, step, dataformats="HWC")


def log_gate_histograms(writer, gates: Mapping[str, np.ndarray], step: int, max_values: int = 200_000) -> None:
    """Histogram of each gate map's values (subsampled to ``max_values``) under ``gate_hist/<map>``."""
    for name, g in gates.items():
        v = np.asarray(g, dtype=np.float32).ravel()
        if v.size > max_values:
            v = v[:: int(math.ceil(v.size / max_values))]
        writer.add_histogram(f"gate_hist/{name}", v, step)


def log_gate_localisation(writer, summary: Mapping, step: int) -> int:
    """Scalars ``gate_loc/<map>/<class>/<metric>`` of a validation summary's ``gate_localisation``
    mean (classes named by its ``label_names``; ``inf`` ratios are written, NaN left out);
    returns how many were written (0 when the summary has no gate maps)."""
    from medseg.evaluate.gates import localisation_scalars

    loc = summary.get("gate_localisation")
    if not loc:
        return 0
    scalars = localisation_scalars(loc["mean"], summary.get("label_names"))
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    return len(scalars)


# --------------------------------------------------------------------------- export
def _latest_images(logdir: Path, case: str | None) -> tuple[str, dict[str, np.ndarray]]:
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={IMAGES: 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    cases = sorted({t.split("/")[1] for t in tags if t.startswith(("val/", "gates/"))})
    if not cases:
        raise InputError(f"{logdir}: no validation images in the event files (has the run validated yet?)")
    case = case or cases[0]
    if case not in cases:
        raise InputError(f"{logdir}: no validation images of case '{case}' (cases: {', '.join(cases)})")
    out = {}
    for t in tags:
        parts = t.split("/")
        if parts[1] == case:
            ev = acc.Images(t)[-1]
            out[t] = imread(io.BytesIO(ev.encoded_image_string), format="png")
    return case, out


def export_gate_grid(logdir: str | Path, out_png: str | Path, *, case: str | None = None,
                     views: tuple[str, ...] = ("axial", "coronal"), dpi: int = 80) -> Path:
    """Tile the newest images of ``case`` into a labelled PNG: per view, CT | truth | prediction, then every gate.

    Raises:
        InputError: ``logdir`` holds no validation images, or none of ``case``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medseg.io import atomic_write

    case, images = _latest_images(Path(logdir), case)
    rows: list[tuple[str, list[str]]] = []  # (view, tags) per figure row
    for view in views:
        seg = [t for t in images if t.startswith("val/") and f"/{view}/" in t]
        gate = sorted(t for t in images if t.startswith("gates/") and f"/{case}/{view}/" in t)
        rows += [(view, seg)] if seg else []
        rows += [(view, gate[i:i + 4]) for i in range(0, len(gate), 4)]
    ncol = max([len(tags) for _, tags in rows if tags and tags[0].startswith("gates/")] or [1])
    fig = Figure(figsize=(2.6 * ncol, 2.6 * len(rows)))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), ncol)
    for r, (view, tags) in enumerate(rows):
        for c, tag in enumerate(tags):
            seg = tag.startswith("val/")
            ax = fig.add_subplot(grid[r, :] if seg else grid[r, c])
            ax.imshow(images[tag], interpolation="nearest")
            title = "CT | ground truth | prediction" if seg else tag.split(f"/{view}/", 1)[1]
            ax.set_title(f"{view}: {title}", fontsize=9)
            ax.axis("off")
    fig.suptitle(f"{case}: validation overlays and attention-gate maps", fontsize=10)
    fig.tight_layout()
    with atomic_write(out_png) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(out_png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tile a run's newest validation overlays and gate maps into one PNG.")
    parser.add_argument("--logdir", required=True, help="the run's tensorboard/ folder")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--case", default=None, help="validation case to show (default: the first)")
    parser.add_argument("--views", nargs="+", default=list(VIEWS), choices=sorted(VIEWS), help="slice orientations")
    parser.add_argument("--dpi", type=int, default=80, help="resolution of the PNG")
    args = parser.parse_args(argv)
    try:
        print(export_gate_grid(args.logdir, args.out, case=args.case, views=tuple(args.views), dpi=args.dpi))
    except MedsegError as err:  # as the medseg CLI: the message, exit status 2, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
