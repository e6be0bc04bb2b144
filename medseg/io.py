"""Geometry-preserving image IO.

Every volume in medseg is a :class:`Volume`: a 3-D ``array`` indexed ``(i, j, k)`` in the
file's own voxel order (nibabel's convention, NOT SimpleITK's ``(z, y, x)``) and a 4x4
``affine`` that maps voxel indices to **RAS+ world millimetres** (nibabel's convention).
Readers keep the full geometry (spacing, origin, direction); writers put it back exactly,
so ``write_volume(read_volume(p), q)`` describes the same voxels in the same places.

Formats: NIfTI (``.nii``, ``.nii.gz``) through nibabel; NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) and DICOM series folders through SimpleITK. SimpleITK works in LPS:
``affine_ras = diag(-1, -1, 1, 1) @ affine_lps``.

NIfTI headers: a file whose qform and sform are both set (code > 0) but place the grid more than
:data:`QSFORM_TOLERANCE_MM` apart is refused (nibabel reads the sform, ITK-based tools may read
the qform: an output would not line up with its image there). A NIfTI volume keeps its
``(qform_code, sform_code)``, and writers put them back.

DICOM series: slices must be evenly spaced along the slice normal (to
:data:`SLICE_SPACING_RTOL` of the median step); a missing or duplicated slice is refused rather
than read on a wrong grid.

Writes are atomic: data go to a temporary name in the target folder, are ``fsync``-ed, then
``os.replace``-d into place (and the folder is ``fsync``-ed on POSIX).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from medseg.errors import GeometryError, InputError

__all__ = [
    "LPS_TO_RAS",
    "QSFORM_TOLERANCE_MM",
    "SLICE_SPACING_RTOL",
    "Volume",
    "affine_from_sitk",
    "atomic_write",
    "atomic_write_text",
    "case_name",
    "find_volumes",
    "is_dicom_dir",
    "is_volume_path",
    "nifti_xform_codes",
    "orientation_code",
    "read_volume",
    "reorient",
    "same_space",
    "spacing_from_affine",
    "split_channel_tag",
    "strip_volume_suffix",
    "to_canonical",
    "undo_reorient",
    "write_nifti",
    "write_volume",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
QSFORM_TOLERANCE_MM = 0.01  # qform vs sform: largest allowed distance between the points they give a voxel
SLICE_SPACING_RTOL = 0.05  # DICOM: largest allowed deviation of a slice step from the median step
SCANNER_CODES = (1, 1)  # (qform_code, sform_code) NIFTI_XFORM_SCANNER_ANAT, for volumes not read from a NIfTI


@dataclass
class Volume:
    """A 3-D image and its geometry.

    Attributes:
        array: voxel data, shape ``(I, J, K)`` in the file's voxel order.
        affine: ``(4, 4)`` float64, voxel index -> RAS+ world mm.
        path: where it was read from (for messages), or ``None``.
        xform_codes: ``(qform_code, sform_code)`` of the NIfTI it was read from, written back by
            :func:`write_volume`; ``None`` (not read from a NIfTI) writes scanner codes ``(1, 1)``.
    """

    array: np.ndarray
    affine: np.ndarray
    path: str | None = None
    xform_codes: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        return spacing_from_affine(self.affine)

    @property
    def orientation(self) -> str:
        return orientation_code(self.affine)

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry with other voxel data (shape must match)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} != volume shape {self.shape}")
        return Volume(array, self.affine.copy(), self.path, self.xform_codes)


# --------------------------------------------------------------------------- geometry
def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis: the column norms of the 3x3 part."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def orientation_code(affine: np.ndarray) -> str:
    """Closest axis codes, e.g. ``'RAS'``, ``'LPS'`` (the direction each axis points to)."""
    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def same_space(a: Volume, b: Volume, *, atol_mm: float = 1e-3, rtol: float = 1e-4) -> bool:
    """True when two volumes have the same shape and their affines agree (same voxel grid)."""
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(np.abs(a.affine[:3, 3]).max()))
    return bool(
        np.allclose(a.affine[:3, :3], b.affine[:3, :3], atol=atol_mm, rtol=rtol)
        and np.allclose(a.affine[:3, 3], b.affine[:3, 3], atol=max(atol_mm, rtol * scale))
    )


def to_canonical(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform (``ornt``) from ``affine``'s axes to the closest RAS."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))


def reorient(vol: Volume, ornt: np.ndarray | None = None) -> tuple[Volume, np.ndarray]:
    """Permute / flip the array axes so they point to the closest RAS (no interpolation).

    Returns the reoriented volume and the ``ornt`` that did it (pass it to
    :func:`undo_reorient` to go back). A residual oblique rotation stays in the affine.
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff

    if ornt is None:
        ornt = to_canonical(vol.affine)
    array = apply_orientation(vol.array, ornt)
    affine = vol.affine @ inv_ornt_aff(ornt, vol.shape)
    return Volume(np.ascontiguousarray(array), affine, vol.path, vol.xform_codes), ornt


def undo_reorient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Inverse of :func:`reorient` on the last three axes of ``array`` (channels first allowed)."""
    from nibabel.orientations import apply_orientation

    back = _inverse_ornt(ornt)
    if array.ndim == 3:
        return np.ascontiguousarray(apply_orientation(array, back))
    lead = array.shape[:-3]
    flat = array.reshape((-1,) + array.shape[-3:])
    out = np.stack([apply_orientation(a, back) for a in flat])
    return np.ascontiguousarray(out.reshape(lead + out.shape[-3:]))


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``ornt`` (axis permutation + flips)."""
    ornt = np.asarray(ornt, dtype=float)
    inv = np.zeros_like(ornt)
    for in_ax, (out_ax, flip) in enumerate(ornt):
        inv[int(out_ax)] = [in_ax, flip]
    return inv


# --------------------------------------------------------------------------- paths
def strip_volume_suffix(name: str) -> str:
    """``'case_0000.nii.gz'`` -> ``'case_0000'``."""
    low = name.lower()
    for suf in VOLUME_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def split_channel_tag(path: str | Path) -> tuple[str, int | None]:
    """Split nnU-Net's channel tag off a file name: ``'ct_0001.nii.gz'`` -> ``('ct', 1)``.

    Returns:
        The name without volume suffix and tag, and the channel index; a name without a
        four-digit ``_NNNN`` tag gives ``(name, None)``.
    """
    stem = strip_volume_suffix(Path(path).name)
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isascii() and stem[-4:].isdigit():  # ASCII: "²".isdigit() too
        return stem[:-5], int(stem[-4:])
    return stem, None


def case_name(path: str | Path) -> str:
    """The case a single-channel file belongs to: its name without volume suffix and nnU-Net's
    ``_0000`` channel tag (``ct_0000.nii.gz`` -> ``ct``; ``ct_0001.nii.gz`` stays ``ct_0001``;
    a DICOM folder -> its name). Inference names its outputs with it and evaluation matches
    predictions to references with it, so both agree."""
    stem, channel = split_channel_tag(path)
    return stem if channel == 0 else strip_volume_suffix(Path(path).name)


def is_volume_path(path: str | Path) -> bool:
    """A file with a volume suffix, or a folder holding a DICOM series."""
    p = Path(path)
    if p.is_dir():
        return is_dicom_dir(p)
    return p.name.lower().endswith(VOLUME_SUFFIXES)


def is_dicom_dir(path: str | Path) -> bool:
    """A folder whose files include at least one DICOM file (``DICM`` magic at byte 128)."""
    p = Path(path)
    if not p.is_dir():
        return False
    for f in sorted(p.iterdir())[:20]:
        if f.is_file():
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def find_volumes(folder: str | Path) -> list[Path]:
    """Volume files (and DICOM series sub-folders) directly inside ``folder``, sorted."""
    folder = Path(folder)
    if is_dicom_dir(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if is_volume_path(p) and not p.name.startswith("."))


# --------------------------------------------------------------------------- reading
def affine_from_sitk(image) -> np.ndarray:
    """RAS affine (for an ``(x, y, z)``-ordered array) from a SimpleITK image's geometry."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] = direction * spacing[None, :]
    aff[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ aff


def _sitk_to_volume(image, path: str) -> Volume:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar 3-D image")
    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise InputError(f"{path}: is a 4-D image (size {size}); expected a 3-D volume")
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputError(f"{path}: is a {dim}-D image (size {image.GetSize()}); expected a 3-D volume")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z,y,x) -> (x,y,z)
    return Volume(np.ascontiguousarray(array), affine_from_sitk(image), path)


def _read_dicom_series(folder: Path) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder")
    files_per = {s: reader.GetGDCMSeriesFileNames(str(folder), s) for s in series}
    sid = max(files_per, key=lambda s: len(files_per[s]))
    if len(series) > 1:
        warnings.warn(f"{folder}: {len(series)} DICOM series found; reading the largest ({sid}, {len(files_per[sid])} files)")
    files = files_per[sid]
    if len(files) < 2:
        raise InputError(f"{folder}: DICOM series {sid} has {len(files)} slice; expected a 3-D series")
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # keep each slice's tags: ImagePositionPatient is checked below
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{folder}: cannot read DICOM series: {str(err).strip().splitlines()[-1]}") from None
    _check_slice_steps(folder, files, reader, image)
    return _sitk_to_volume(image, str(folder))


def _check_slice_steps(folder: Path, files: list[str], reader, image) -> None:
    """Refuse a series whose slices are not evenly spaced along the slice normal.

    ITK reads such a series onto one uniform grid anyway (the mean step), which misplaces
    slices; a missing slice (one step twice the others) is the usual cause.

    Args:
        folder: the series folder (for messages).
        files: the slice files in the reader's order (sorted along the normal).
        reader: the executed ``sitk.ImageSeriesReader`` (with its per-slice metadata kept).
        image: the image it returned (its third direction column is the slice normal, LPS).

    Raises:
        InputError: a step differs from the median step by more than :data:`SLICE_SPACING_RTOL`
            of it, or the slices share one position; names the first gap (the two files, their
            positions, the step found and the step expected) and how many steps are off.
    """
    key = "0020|0032"  # ImagePositionPatient, LPS mm, like the image's direction
    if not all(reader.HasMetaDataKey(i, key) for i in range(len(files))):
        warnings.warn(f"{folder}: some DICOM slices have no ImagePositionPatient; slice spacing not checked")
        return
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(i, key).split("\\")] for i in range(len(files))])
    except ValueError:
        raise InputError(f"{folder}: a DICOM slice has an unreadable ImagePositionPatient") from None
    z = pos @ np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    steps = np.diff(z)
    expected = float(np.median(steps))
    if abs(expected) < 1e-6:
        raise InputError(f"{folder}: most of its {len(files)} DICOM slices share one position along the slice normal "
                         "(duplicated files, or several acquisitions in one folder?); expected one slice per position")
    bad = np.flatnonzero(np.abs(steps - expected) > SLICE_SPACING_RTOL * abs(expected))
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"{folder}: DICOM slices are not evenly spaced (a missing or duplicated slice?): between "
            f"{Path(files[i]).name} and {Path(files[i + 1]).name} (at {z[i]:.3f} and {z[i + 1]:.3f} mm along the "
            f"slice normal) the step is {abs(steps[i]):.3f} mm, expected {abs(expected):.3f} mm (the median step); "
            f"{bad.size} of {steps.size} steps differ from it by more than {SLICE_SPACING_RTOL:.0%}. "
            "Re-export the complete series; medseg does not read a series onto a wrong grid")


def read_volume(path: str | Path, *, dtype: np.dtype | None = None) -> Volume:
    """Read a 3-D volume with its full geometry.

    Args:
        path: NIfTI / NRRD / MHA / MHD file, or a folder with one DICOM series.
        dtype: cast the array to this dtype (default: keep the file's, scaled NIfTI -> float32).

    Raises:
        InputError: missing file, unknown format, corrupt header, not a 3-D scalar image
            (2-D images and 4-D series are rejected; a trailing 4th axis of size 1 is dropped).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    if p.is_dir():
        vol = _read_dicom_series(p)
    else:
        name = p.name.lower()
        if name.endswith(NIFTI_SUFFIXES):
            vol = _read_nifti(p)
        elif name.endswith(SITK_SUFFIXES):
            vol = _read_sitk(p)
        else:
            raise InputError(f"{p}: unknown volume format (expected one of {', '.join(VOLUME_SUFFIXES)} or a DICOM folder)")
    if min(vol.shape) < 2:
        raise InputError(f"{p}: is a 2-D image (shape {vol.shape}); expected a 3-D volume")
    if not np.all(np.isfinite(vol.affine)) or np.linalg.matrix_rank(vol.affine[:3, :3]) < 3:
        raise InputError(f"{p}: header has a degenerate or non-finite affine")
    if dtype is not None:
        vol.array = vol.array.astype(dtype, copy=False)
    return vol


def _read_nifti(p: Path) -> Volume:
    try:
        img = nib.load(str(p))
        shape = img.shape
    except Exception as err:  # nibabel raises many types for a bad header
        raise InputError(f"{p}: cannot read NIfTI header: {err}") from None
    if len(shape) == 4:
        if shape[3] != 1:
            raise InputError(f"{p}: is a 4-D image (shape {shape}); expected a 3-D volume")
    elif len(shape) != 3:
        raise InputError(f"{p}: is a {len(shape)}-D image (shape {shape}); expected a 3-D volume")
    try:
        if img.dataobj.slope == 1 and img.dataobj.inter == 0 or not np.issubdtype(img.get_data_dtype(), np.integer):
            array = np.asanyarray(img.dataobj)
        else:
            array = img.get_fdata(dtype=np.float32)
    except Exception as err:
        raise InputError(f"{p}: cannot read voxel data (truncated or corrupt file?): {' '.join(str(err).split())}") from None
    if array.ndim == 4:
        array = array[..., 0]
    _check_qform_sform(p, img.header, shape[:3])
    return Volume(np.ascontiguousarray(array), np.asarray(img.affine, dtype=np.float64), str(p), _xform_codes(img.header))


def _xform_codes(header) -> tuple[int, int]:
    return int(header["qform_code"]), int(header["sform_code"])


def nifti_xform_codes(path: str | Path | None) -> tuple[int, int] | None:
    """``(qform_code, sform_code)`` of a NIfTI file's header; ``None`` for anything else.

    Returns ``None`` as well for a path that does not exist or a header nibabel cannot read
    (the caller then writes scanner codes).
    """
    if path is None or not str(path).lower().endswith(NIFTI_SUFFIXES):
        return None
    try:
        return _xform_codes(nib.load(str(path)).header)
    except Exception:  # missing or unreadable: reading the volume reports that, not this
        return None


def _check_qform_sform(p: Path, header, shape: tuple[int, ...]) -> None:
    """Refuse a header whose qform and sform are both set and place the grid differently.

    nibabel (and medseg) use the sform, ITK-based tools (SimpleITK, 3D Slicer, nnU-Net's
    reader) may use the qform. Both maps are affine, so the largest distance between the
    points they give a voxel is reached at a corner of the grid; it must not exceed
    :data:`QSFORM_TOLERANCE_MM` (a rotation shows there as well as a shift).

    Raises:
        InputError: names the file, both codes and origins, and the largest distance.
    """
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if not (qcode and scode):
        return
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    dist = float(np.linalg.norm(((qform - sform) @ corners)[:3], axis=0).max())
    if dist > QSFORM_TOLERANCE_MM:
        raise InputError(
            f"{p}: its NIfTI qform (code {qcode}, origin {_mm(qform[:3, 3])}) and sform (code {scode}, origin "
            f"{_mm(sform[:3, 3])}) place voxels up to {dist:.3f} mm apart (tolerance {QSFORM_TOLERANCE_MM} mm); "
            "medseg reads the sform, ITK-based tools (SimpleITK, 3D Slicer, nnU-Net) may read the qform, so a mask "
            "would not line up with the image in them. Make them agree (nibabel: img.set_qform(img.get_sform()); "
            "FSL: fslorient -copysform2qform) or set the wrong one's code to 0")


def _mm(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(x):.3f}" for x in v) + ")"


def _read_sitk(p: Path) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as err:
        msg = str(err).strip().splitlines()
        raise InputError(f"{p}: cannot read image: {msg[-1] if msg else err}") from None
    return _sitk_to_volume(image, str(p))


# --------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); rename it into place on success.

    A crash, Ctrl-C or ``kill -9`` never leaves a half-written file under the final name, and
    neither does a power cut: the data are ``fsync``-ed before the rename, the folder (POSIX)
    after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op elsewhere and where the file system refuses)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and FUSE mounts) do not fsync folders
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically; returns the final path."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, *,
                xform_codes: tuple[int, int] | None = None, slope_inter: tuple[float, float] | None = None,
                descrip: str | None = None) -> Path:
    """Write a 3-D or 4-D NIfTI atomically: the one place medseg sets NIfTI headers.

    Args:
        array: voxel data, ``(I, J, K)`` or ``(I, J, K, T)``, stored in its own dtype.
        affine: voxel index -> RAS+ mm, written as both qform and sform.
        path: ``.nii`` or ``.nii.gz``.
        xform_codes: ``(qform_code, sform_code)``, e.g. the input's (:func:`nifti_xform_codes`);
            ``None``: ``(1, 1)``, scanner.
        slope_inter: ``scl_slope``, ``scl_inter`` for readers to apply (``array`` is stored as is).
        descrip: the header's description (up to 80 characters).

    Returns:
        ``path``.
    """
    qcode, scode = xform_codes or SCANNER_CODES
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(array, affine, dtype=array.dtype if array.dtype in (np.int64, np.uint64) else None)
    img.set_qform(affine, code=int(qcode))
    img.set_sform(affine, code=int(scode))
    img.header.set_xyzt_units("mm", "sec")
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    if descrip is not None:
        img.header["descrip"] = descrip.encode()[:80]
    path = Path(path)
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return path


def write_volume(vol: Volume | np.ndarray, path: str | Path, affine: np.ndarray | None = None, *,
                 xform_codes: tuple[int, int] | None = None) -> Path:
    """Write a volume (or ``array`` + ``affine``) with exactly that geometry, atomically.

    NIfTI gets the affine as both qform and sform (:func:`write_nifti`) with ``xform_codes``,
    else the volume's own (those of the NIfTI it was read from), else code 1 (scanner); NRRD /
    MHA get spacing, origin and direction from it. Boolean arrays are written as uint8.
    """
    if isinstance(vol, Volume):
        array, affine = vol.array, vol.affine
        xform_codes = xform_codes or vol.xform_codes
    else:
        array = vol
        if affine is None:
            raise ValueError("write_volume(array, path) needs an affine")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"write_volume expects a 3-D array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    if array.dtype in (np.int64, np.uint64):  # nibabel refuses 64-bit ints without an explicit dtype
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dt in (np.uint8, np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                array = array.astype(dt)
                break
    affine = np.asarray(affine, dtype=np.float64)
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return write_nifti(array, affine, path, xform_codes=xform_codes)
    if not name.endswith(SITK_SUFFIXES):
        raise InputError(f"{path}: unknown output format (use .nii.gz, .nii, .nrrd or .mha)")
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    lps = LPS_TO_RAS @ affine
    spacing = spacing_from_affine(lps)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing[None, :]).ravel()))
    image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path
