"""Post-processing of predicted label maps.

``largest-component``: per foreground class, keep only the largest connected component
(26-connectivity) and set the rest to background -- nnU-Net's "remove all but the largest
component" (Isensee et al., Nature Methods 2021). MONAI's ``KeepLargestConnectedComponent``
does the same but needs scikit-image or cuCIM, which medseg does not depend on, so this
uses ``scipy.ndimage.label`` on each class's bounding box.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medseg.registry import Registry

__all__ = ["POSTPROCESSORS", "apply_postprocess", "keep_largest_component"]

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


def apply_postprocess(mask: np.ndarray, name: str | None) -> np.ndarray:
    """Apply the post-processing step called ``name`` (``None`` / ``"none"``: unchanged).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    return POSTPROCESSORS.get(name or "none")(mask)
