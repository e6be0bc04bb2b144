"""Geometry-safe IO: write -> read keeps array and affine (RAS, LPS, LAS, oblique, anisotropic), DICOM series."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from medseg.data.phantoms import orientation_affine
from medseg.errors import InputError
from medseg.io import read_volume, reorient, same_space, spacing_from_affine, undo_reorient, write_volume

GEOMETRIES = {
    "RAS": orientation_affine("RAS", (1.0, 1.0, 1.0), (9, 8, 7), (10.0, -20.0, 30.0)),
    "LPS": orientation_affine("LPS", (0.7, 0.7, 2.5), (9, 8, 7), (-123.4, 56.7, -890.1)),
    "LAS": orientation_affine("LAS", (0.9, 1.3, 3.0), (9, 8, 7), (5.5, 6.6, 7.7)),
    "oblique": orientation_affine("LPS", (0.8, 1.1, 2.2), (9, 8, 7), (1.0, 2.0, 3.0), oblique_deg=17.0),
    "aniso_PIR": orientation_affine("PIR", (0.5, 4.0, 1.5), (9, 8, 7), (0.0, 0.0, 0.0)),
}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("geom", sorted(GEOMETRIES))
def test_round_trip_keeps_array_and_affine(tmp_path, suffix, geom):
    aff = GEOMETRIES[geom]
    arr = np.random.default_rng(0).integers(-1000, 1000, (9, 8, 7)).astype(np.int16)
    path = write_volume(arr, tmp_path / f"v{suffix}", aff)
    vol = read_volume(path)
    assert vol.array.dtype == np.int16 and np.array_equal(vol.array, arr)
    assert np.abs(vol.affine - aff).max() < 1e-4
    assert np.allclose(vol.spacing, spacing_from_affine(aff), atol=1e-5)
    # a second round trip is exact as well, and other formats agree with each other
    again = read_volume(write_volume(vol, tmp_path / "again.nii.gz"))
    assert same_space(vol, again) and np.array_equal(again.array, arr)


def test_reorient_and_undo_are_inverse():
    aff = GEOMETRIES["oblique"]
    from medseg.io import Volume

    arr = np.arange(9 * 8 * 7, dtype=np.float32).reshape(9, 8, 7)
    ro, ornt = reorient(Volume(arr, aff))
    assert ro.orientation == "RAS"
    # a voxel keeps its world position: same value at the same world point
    ijk = np.array([2, 5, 3])
    world = aff[:3, :3] @ ijk + aff[:3, 3]
    ijk_ro = np.round(np.linalg.solve(ro.affine[:3, :3], world - ro.affine[:3, 3])).astype(int)
    assert ro.array[tuple(ijk_ro)] == arr[tuple(ijk)]
    assert np.array_equal(undo_reorient(ro.array, ornt), arr)
    assert np.array_equal(undo_reorient(np.stack([ro.array, ro.array]), ornt)[1], arr)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.nii.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    good = write_volume(np.zeros((20, 20, 20), np.int16), tmp_path / "good.nii.gz", np.eye(4))
    data = gzip.decompress(good.read_bytes())
    (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(InputError, match=r"trunc.nii.gz: cannot read voxel data"):
        read_volume(tmp_path / "trunc.nii.gz")
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match=r"garbage.nii.gz: cannot read NIfTI header"):
        read_volume(tmp_path / "garbage.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match="flat.nii.gz: is a 2-D image"):
        read_volume(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(InputError, match="t.nii.gz: is a 4-D image"):
        read_volume(tmp_path / "t.nii.gz")
    (tmp_path / "bad.nrrd").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n")
    with pytest.raises(InputError, match="bad.nrrd: cannot read image"):
        read_volume(tmp_path / "bad.nrrd")


def test_int64_and_bool_arrays_are_writable(tmp_path):
    lab = np.random.default_rng(1).integers(0, 4, (5, 6, 7))  # int64, as np.argmax returns
    back = read_volume(write_volume(lab, tmp_path / "lab.nii.gz", np.eye(4)))
    assert np.array_equal(back.array, lab) and back.array.dtype == np.uint8
    mask = read_volume(write_volume(lab > 1, tmp_path / "mask.nrrd", np.eye(4)))
    assert np.array_equal(mask.array, (lab > 1).astype(np.uint8))


def test_real_dicom_series_matches_nifti(real_ct):
    organs = real_ct / "organs"
    dcm = read_volume(organs / "dicom" / "ts_upperabd_dicom20")
    nii = read_volume(organs / "imagesTs" / "ts_upperabd_dicom20.nii.gz")
    assert dcm.shape == (512, 512, 20) and dcm.orientation == "LPS"
    assert np.array_equal(dcm.array, nii.array)
    assert np.abs(dcm.affine - nii.affine).max() < 1e-4
    # the label on its own (y-flipped) grid describes the same physical space
    own = read_volume(organs / "dicom" / "ts_upperabd_dicom20_label_own_grid.nii.gz")
    ref = read_volume(organs / "labelsTs" / "ts_upperabd_dicom20.nii.gz")
    assert not np.array_equal(own.array, ref.array) and own.orientation != ref.orientation
    a, _ = reorient(own)
    b, _ = reorient(ref)
    assert np.abs(a.affine - b.affine).max() < 1e-4 and np.array_equal(a.array, b.array)
    assert set(np.unique(a.array).tolist()) == {0, 1, 2}


def test_real_nrrd_reads_with_lps_geometry(real_ct):
    vol = read_volume(real_ct / "lung_lesion" / "imagesTs" / "pyradiomics_lung1.nrrd")
    assert vol.shape == (512, 512, 48) and vol.orientation == "LPS"
    assert np.allclose(vol.spacing[2], 5.0, atol=1e-3)


def test_written_files_get_normal_permissions(tmp_path):
    import os
    import stat

    from medseg.io import _UMASK

    path = write_volume(np.zeros((3, 3, 3), np.uint8), tmp_path / "p.nii.gz", np.eye(4))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_UMASK != 0o600  # not mkstemp's 0600
    assert _UMASK == os.umask(_UMASK)


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import os

    from medseg.io import atomic_write_text

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, st.st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = atomic_write_text(tmp_path / "sub" / "f.json", "{}\n")
    file_ino, dir_ino = path.stat().st_ino, path.parent.stat().st_ino
    kinds = [e[0] for e in events]
    assert ("fsync", file_ino, 3) in events, events  # the written file itself, with its data
    assert kinds.index("replace") > events.index(("fsync", file_ino, 3))
    if os.name == "posix":  # then the folder, so the rename itself is durable
        assert any(e[0] == "fsync" and e[1] == dir_ino for e in events[kinds.index("replace"):]), events
