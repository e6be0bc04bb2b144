"""Checks on inputs that must never pass silently: non-finite voxels and unsafe case names.

Both the dataset pipeline (fingerprint, preprocessing) and inference call these, so a bad
input is refused with the same message on every path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import InputError

__all__ = ["check_case_name", "check_finite", "safe_child"]


def check_finite(array: np.ndarray, name: str | Path) -> None:
    """Refuse an image holding NaN or infinite voxels.

    Args:
        array: voxel array of any shape (integer arrays are always finite).
        name: the file the array was read from (named in the message).

    Raises:
        InputError: ``"<name>: 1000 NaN and 0 infinite voxel(s) of 27000 ..."``.
    """
    arr = np.asarray(array)
    if not np.issubdtype(arr.dtype, np.inexact):
        return
    finite = np.isfinite(arr)
    n_bad = int(arr.size - np.count_nonzero(finite))
    if n_bad == 0:
        return
    n_nan = int(np.count_nonzero(np.isnan(arr)))
    raise InputError(
        f"{name}: {n_nan} NaN and {n_bad - n_nan} infinite voxel(s) of {arr.size}; medseg refuses non-finite "
        "intensities (they would poison the normalization and the network). Replace them in the file "
        "(e.g. with -1024 HU, air) and run again"
    )


def check_case_name(name: str, where: str | Path, what: str = "case name") -> str:
    """Refuse a case name that could leave the folder it is written into.

    A case name becomes a file name (``cases/<case>_image.npy``, ``<case>.nii.gz``), so it must
    not be empty, hold a path separator (``/`` or ``\\``), a NUL byte, or ``..``.

    Args:
        name: the case name.
        where: what the name came from (a dataset.json, a folder), named in the message.
        what: how the name was given (e.g. ``"key '../x' of 'dataset'"``), named in the message.

    Returns:
        ``name`` unchanged.

    Raises:
        InputError: ``"<where>: <what> '../x' is not a safe case name ..."``.
    """
    if not isinstance(name, str) or not name or any(c in name for c in ("/", "\\", "\0")) or ".." in name:
        raise InputError(f"{where}: {what} {name!r} is not a safe case name (it must not be empty or contain "
                         "'/', '\\' or '..', since it becomes an output file name)")
    return name


def safe_child(folder: str | Path, file_name: str) -> Path:
    """``folder / file_name``, refusing a result that lies outside ``folder``.

    Raises:
        InputError: the joined path resolves outside ``folder``.
    """
    folder = Path(folder)
    path = folder / file_name
    if path.resolve().parent != folder.resolve():
        raise InputError(f"{path}: would be written outside {folder}; refusing the unsafe name {file_name!r}")
    return path
