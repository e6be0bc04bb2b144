"""Post-processing of predicted label maps.

``largest-component``: per foreground class, keep only the largest connected component
(26-connectivity) and set the rest to background -- nnU-Net's "remove all but the largest
component" (Isensee et al., Nature Methods 2021). MONAI's ``KeepLargestConnectedComponent``
does the same but needs scikit-image or cuCIM, which medseg does not depend on, so this
uses ``scipy.ndimage.label`` on each class's bounding box.

**Chosen on validation data, as nnU-Net does** (``determine_postprocessing``): at every validation
the trainer scores each class with and without keeping its largest component
(:func:`choose_largest_component`) and writes the classes where it raised the mean Dice to the
run's ``postprocessing.json``; ``medseg infer --postprocess auto`` (the default) applies exactly
that. A class is post-processed only on a strict improvement, so a class whose validation
predictions have no stray component is left alone, and multi-focal classes (lesions) keep their
components when removing them costs Dice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.evaluate.metrics import dice
from medseg.registry import Registry

__all__ = ["POSTPROCESSORS", "apply_postprocess", "choose_largest_component", "keep_largest_component",
           "largest_component_scores",
           "load_run_postprocessing", "write_run_postprocessing"]

RUN_FILE = "postprocessing.json"

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def keep_largest_component(mask: np.ndarray, labels: Sequence[int] | None = None) -> np.ndarray:
    """Keep the largest 26-connected component of each foreground class.

    Args:
        mask: ``(I, J, K)`` integer label map.
        labels: classes to process (default: every non-zero value present).

    Returns:
        A new label map of the same shape and dtype; removed voxels are 0.
    """
    out = mask.copy()
    values = np.unique(mask) if labels is None else np.asarray(labels)
    for v in values:
        if int(v) == 0:
            continue
        fg = out == v
        if not fg.any():
            continue
        box = ndimage.find_objects(fg.astype(np.uint8))[0]
        comp, n = ndimage.label(fg[box], structure=_FULL_CONNECTIVITY)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        drop = (comp != int(np.argmax(sizes))) & (comp > 0)
        out[box][drop] = 0
    return out


POSTPROCESSORS = Registry("postprocess")
POSTPROCESSORS.register("none", lambda m: m)
POSTPROCESSORS.register("largest-component", keep_largest_component)


def apply_postprocess(mask: np.ndarray, name: str | dict | None) -> np.ndarray:
    """Apply the post-processing step called ``name`` (``None`` / ``"none"``: unchanged), or a run's
    choice ``{"largest_component_classes": [c, ...]}`` (see :func:`choose_largest_component`).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if isinstance(name, dict):
        classes = [int(c) for c in name.get("largest_component_classes", [])]
        return keep_largest_component(mask, classes) if classes else mask
    return POSTPROCESSORS.get(name or "none")(mask)


def largest_component_scores(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int], *,
                             ignore_label: int | None = None) -> dict[str, list[float]]:
    """One validation case: ``{class: [Dice without, Dice with largest-component]}`` (NaN when the
    class is absent from both prediction and reference); reference voxels equal to
    ``ignore_label`` are not scored."""
    ign = (ref == ignore_label) if ignore_label is not None else None
    out = {}
    for c in classes:
        r = ref == c
        out[str(int(c))] = [dice(pred == c, r, ign), dice(keep_largest_component(pred, [int(c)]) == c, r, ign)]
    return out


def choose_largest_component(per_case: Sequence[dict[str, list[float]]]) -> dict:
    """Per class, keep the largest component only where that raises the mean validation Dice.

    nnU-Net's rule (Isensee et al. 2021, ``determine_postprocessing``), per class: the mean Dice
    over the validation cases (cases where the class is absent from prediction and reference do
    not count) with the class reduced to its largest 26-connected component, against without;
    chosen on a strict improvement.

    Args:
        per_case: :func:`largest_component_scores` of each validation case.

    Returns:
        ``{"largest_component_classes": [c, ...], "dice_before": {c: d}, "dice_after": {c: d},
        "num_cases": n}`` (class keys as strings; a class never seen reads NaN and is not chosen).
    """
    classes = sorted({c for case in per_case for c in case}, key=int)
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    chosen = []
    for c in classes:
        valid = [case[c] for case in per_case if c in case and not any(np.isnan(v) for v in case[c])]
        before[c] = float(np.mean([b for b, _ in valid])) if valid else float("nan")
        after[c] = float(np.mean([a for _, a in valid])) if valid else float("nan")
        if valid and after[c] > before[c] + 1e-9:
            chosen.append(int(c))
    return {"largest_component_classes": chosen, "dice_before": before, "dice_after": after, "num_cases": len(per_case)}


def write_run_postprocessing(run_dir: str | Path, choice: dict) -> Path:
    """Write a :func:`choose_largest_component` result as ``<run_dir>/postprocessing.json`` (atomically)."""
    from medseg.io import atomic_write_text

    return atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(choice, indent=2, default=float) + "\n")


def load_run_postprocessing(run_dir: str | Path) -> dict | None:
    """The run's ``postprocessing.json`` (``None`` when training never validated)."""
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
