"""DICOM series: a missing or duplicated slice is refused (no silent wrong grid); a complete series reads as before."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.io import read_volume


def _series(real_ct):
    folder = real_ct / "organs" / "dicom" / "ts_upperabd_dicom20"
    return folder, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))  # sorted along the normal


def test_missing_slice_is_refused(real_ct, tmp_path):
    _, files = _series(real_ct)
    assert len(files) == 20
    dst = tmp_path / "gap_series"
    dst.mkdir()
    for i, f in enumerate(files):
        if i != 10:  # the measured case: slice 10 of 20 removed
            shutil.copy(f, dst)
    with pytest.raises(InputError, match=r"gap_series: .*missing.*4\.000 mm.*expected 2\.000 mm") as err:
        read_volume(dst)
    # the message names where the gap is: the two slices around it
    assert Path(files[9]).name in str(err.value) and Path(files[11]).name in str(err.value)


def test_uneven_spacing_is_refused(real_ct, tmp_path):
    _, files = _series(real_ct)
    dst = tmp_path / "uneven"
    dst.mkdir()
    for i, f in enumerate(files):
        if i not in (3, 4, 6, 7):  # steps 2, 2, 6, 6, 2, ... mm: two uneven steps
            shutil.copy(f, dst)
    with pytest.raises(InputError, match=r"uneven: .*6\.000 mm.*expected 2\.000 mm.*2 of 15 steps"):
        read_volume(dst)


def test_complete_series_reads_as_before(real_ct, tmp_path):
    src, files = _series(real_ct)
    dst = tmp_path / "full"
    shutil.copytree(src, dst)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vol = read_volume(dst)
    ref = read_volume(real_ct / "organs" / "imagesTs" / "ts_upperabd_dicom20.nii.gz")
    assert vol.shape == (512, 512, 20)
    assert np.allclose(vol.spacing[2], 2.0, atol=1e-4)
    assert np.abs(vol.affine - ref.affine).max() < 1e-4 and np.array_equal(vol.array, ref.array)
