"""NIfTI headers: a qform that disagrees with the sform is refused; outputs keep the input's qform/sform codes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.infer.predictor import PredictionResult
from medseg.infer.runner import CaseJob, write_result
from medseg.io import QSFORM_TOLERANCE_MM, Volume, nifti_xform_codes, read_volume, write_volume

SFORM = np.array([[-0.8, 0.0, 0.0, 100.5], [0.0, -0.8, 0.0, 20.0], [0.0, 0.0, 2.5, -30.0], [0.0, 0.0, 0.0, 1.0]])


def _nifti(path, *, qform=SFORM, sform=SFORM, qcode=1, scode=1, shape=(6, 5, 4)):
    img = nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.int16).reshape(shape), None)
    img.set_sform(sform, code=scode)
    img.set_qform(qform, code=qcode)
    nib.save(img, str(path))
    return path


def _codes(path):
    h = nib.load(str(path)).header
    return int(h["qform_code"]), int(h["sform_code"])


@pytest.mark.parametrize("scode", [1, 2])
def test_qform_sform_disagreement_is_refused(tmp_path, scode):
    qform = SFORM.copy()
    qform[0, 3] += 10.0  # the measured case: ITK-based tools put the image 10 mm away
    path = _nifti(tmp_path / "shifted.nii.gz", qform=qform, scode=scode)
    if scode == 2:  # SimpleITK reads the qform here, nibabel the sform: the two disagree
        assert -sitk.ReadImage(str(path)).GetOrigin()[0] == pytest.approx(110.5)
        assert nib.load(str(path)).affine[0, 3] == pytest.approx(100.5)
    with pytest.raises(InputError, match=r"shifted\.nii\.gz: .*qform .*sform.* 10\.0\d* mm"):
        read_volume(path)


def test_rotated_qform_is_refused(tmp_path):
    c, s = np.cos(np.radians(1.0)), np.sin(np.radians(1.0))
    qform = SFORM.copy()
    qform[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ SFORM[:3, :3]
    with pytest.raises(InputError, match="rot.nii: .*qform"):
        read_volume(_nifti(tmp_path / "rot.nii", qform=qform))


def test_agreeing_or_single_forms_are_read(tmp_path):
    near = SFORM.copy()
    near[:3, 3] += QSFORM_TOLERANCE_MM / 4  # below the tolerance: float rounding, not a different place
    vol = read_volume(_nifti(tmp_path / "near.nii.gz", qform=near))
    assert np.allclose(vol.affine, SFORM, atol=1e-5) and vol.xform_codes == (1, 1)
    far = SFORM.copy()
    far[0, 3] += 50.0
    for name, q, qc, sc in (("sform_only", far, 0, 2), ("qform_only", SFORM, 1, 0)):
        vol = read_volume(_nifti(tmp_path / f"{name}.nii.gz", qform=q, qcode=qc, scode=sc))
        assert np.allclose(vol.affine, SFORM, atol=1e-5) and vol.xform_codes == (qc, sc)


@pytest.mark.parametrize("codes", [(1, 1), (0, 2), (2, 0), (1, 2), (0, 0)])
def test_written_nifti_keeps_the_input_codes(tmp_path, codes):
    qc, sc = codes
    src = _nifti(tmp_path / "in.nii.gz", qcode=qc, scode=sc)
    vol = read_volume(src)
    out = write_volume(vol.with_array(vol.array > 10), tmp_path / "out.nii.gz")
    assert _codes(out) == codes == nifti_xform_codes(src)
    back = read_volume(out)
    assert np.allclose(back.affine, vol.affine, atol=1e-5)
    # ITK places the output where it places the input
    assert np.allclose(sitk.ReadImage(str(out)).GetOrigin(), sitk.ReadImage(str(src)).GetOrigin(), atol=1e-4)
    # a plain array (no source header) gets scanner codes
    assert _codes(write_volume(vol.array, tmp_path / "plain.nii.gz", vol.affine)) == (1, 1)


def test_inference_outputs_keep_the_input_codes(tmp_path):
    src = _nifti(tmp_path / "case_0000.nii.gz", qcode=0, scode=2)
    vol = read_volume(src)
    mask = Volume((vol.array > 10).astype(np.uint8), vol.affine.copy(), str(src))  # as the predictor builds it
    probs = np.stack([1.0 - mask.array, mask.array]).astype(np.float16)
    gate = Volume(np.full(vol.shape, 0.5, np.float32), vol.affine.copy(), str(src))
    out = tmp_path / "out"
    job = CaseJob("case", src, out / "case.nii.gz", out / "case_probabilities.nii.gz", out / "case_gates")
    written = write_result(PredictionResult("case", mask, probs, {"gate/level1": gate}), job)
    assert len(written) == 3
    for path in written:
        assert _codes(path) == (0, 2), path
        assert np.allclose(nib.load(str(path)).affine, vol.affine, atol=1e-5)
    p = nib.load(str(job.probabilities))
    assert p.shape == vol.shape + (2,) and p.get_data_dtype() == np.uint16
    assert np.allclose(p.get_fdata()[..., 1], mask.array, atol=1e-4)
