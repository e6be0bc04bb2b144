"""Sliding-window inference: stitching is exact for pointwise models, TTA flips back, gates stitch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.infer.sliding import (
    count_windows,
    estimate_buffer_bytes,
    pick_buffer_device,
    round_roi,
    sliding_window_predict,
)


class Pointwise(torch.nn.Module):
    """Logits = a fixed 1x1x1 conv of the input plus a coordinate-free bias; gates at 1/2 resolution.

    A pointwise model commutes with windowing and mirroring, so the stitched output must equal
    the model applied to the whole volume.
    """

    patch_divisor = (4, 4, 4)

    def __init__(self, k: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, k, 1)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))
        self.seen_shapes: list[tuple[int, ...]] = []
        self.calls_training: list[bool] = []

    def forward(self, x, return_attention=False):
        self.seen_shapes.append(tuple(x.shape[2:]))
        self.calls_training.append(self.training)
        y = self.conv(x)
        if not return_attention:
            return y
        gate = F.avg_pool3d(torch.sigmoid(x), 2)  # (B, 1, X/2, Y/2, Z/2) in [0, 1]
        return y, {"gate/level2": gate}


def _image(shape=(37, 29, 23), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, *shape), generator=g)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_pointwise_model_is_stitched_exactly(blend):
    model = Pointwise()
    img = _image()
    out = sliding_window_predict(model, img, roi_size=(16, 16, 16), overlap=0.5, blend=blend, sw_batch_size=3, device="cpu")
    ref = model(img[None])[0]
    assert out.shape == (3, 37, 29, 23) and out.dtype == torch.float32
    assert torch.max(torch.abs(out - ref)).item() < 1e-4
    assert len(model.seen_shapes) > 8  # really slid


def test_volume_smaller_than_roi_is_padded_and_cropped_back():
    model = Pointwise()
    img = _image((10, 12, 9))
    out = sliding_window_predict(model, img, roi_size=(16, 16, 16), device="cpu")
    assert out.shape == (3, 10, 12, 9)
    assert torch.allclose(out, model(img[None])[0], atol=1e-4)


def test_roi_rounded_up_to_patch_divisor():
    assert round_roi((30, 32, 17), (4, 4, 8)) == (32, 32, 24)
    assert round_roi((30, 32, 17), None) == (30, 32, 17)
    model = Pointwise()
    sliding_window_predict(model, _image((40, 40, 40)), roi_size=(30, 30, 30), device="cpu")
    assert set(model.seen_shapes) == {(32, 32, 32)}


def test_tta_flips_back():
    """Mirroring a pointwise model and flipping back gives the plain prediction; 8 passes per window."""
    model = Pointwise()
    img = _image((20, 20, 20))
    plain = sliding_window_predict(model, img, roi_size=(16, 16, 16), device="cpu", sw_batch_size=1)
    n_plain = len(model.seen_shapes)
    model.seen_shapes.clear()
    tta = sliding_window_predict(model, img, roi_size=(16, 16, 16), device="cpu", tta=True, sw_batch_size=1)
    assert len(model.seen_shapes) == 8 * n_plain
    assert torch.max(torch.abs(tta - plain)).item() < 1e-4


def test_tta_averages_mirrored_predictions_of_an_asymmetric_model():
    """A model that outputs its x-coordinate ramp: mirrored along x and flipped back it reverses, so TTA averages to the mean."""

    class Ramp(torch.nn.Module):
        def forward(self, x):
            r = torch.linspace(0, 1, x.shape[2]).view(1, 1, -1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
            return r.clone()

    img = _image((16, 16, 16))
    out = sliding_window_predict(Ramp(), img, roi_size=(16, 16, 16), device="cpu", tta=True)
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=1e-5)


def test_gate_maps_stitched_in_full_grid():
    model = Pointwise()
    img = _image((36, 28, 20))
    logits, gates = sliding_window_predict(model, img, roi_size=(16, 16, 16), device="cpu", return_attention=True)
    assert logits.shape == (3, 36, 28, 20)
    assert set(gates) == {"gate/level2"}
    g = gates["gate/level2"]
    assert g.shape == (1, 36, 28, 20)
    assert float(g.min()) >= 0.0 and float(g.max()) <= 1.0
    # the same map computed on the whole volume at once, upsampled: equal away from window seams
    whole = F.interpolate(F.avg_pool3d(torch.sigmoid(img[None]), 2), size=(36, 28, 20), mode="trilinear", align_corners=False)[0]
    assert torch.mean(torch.abs(g - whole)).item() < 0.02
    assert np.corrcoef(g.flatten().numpy(), whole.flatten().numpy())[0, 1] > 0.95


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_buffers_are_half_and_close(dtype):
    """bf16 (CPU) and fp16 (CUDA; its stitching falls back to a CPU fp16 buffer) accumulate in half precision."""
    model = Pointwise()
    img = _image((24, 24, 24))
    ref = sliding_window_predict(model, img, roi_size=(16, 16, 16), device="cpu")
    out, gates = sliding_window_predict(model, img, roi_size=(16, 16, 16), device="cpu", precision=dtype,
                                        return_attention=True)
    assert out.dtype == dtype and gates["gate/level2"].dtype == dtype
    assert torch.mean(torch.abs(out.float() - ref)).item() < 0.05
    assert (out.float().argmax(0) == ref.argmax(0)).float().mean().item() > 0.97


def test_mode_restored_and_deep_supervision_list_handled():
    class DS(Pointwise):
        def forward(self, x, return_attention=False):
            y = super().forward(x)
            return [y, y[:, :, ::2, ::2, ::2]] if self.training else y

    model = DS()
    model.train()
    out = sliding_window_predict(model, _image((16, 16, 16)), roi_size=(16, 16, 16), device="cpu")
    assert out.shape == (3, 16, 16, 16)
    assert model.training and not any(model.calls_training)


def test_buffer_estimate_and_cpu_fallback(monkeypatch):
    need = estimate_buffer_bytes((100, 100, 50), (64, 64, 64), 14, 2, torch.float16)
    assert need == 100 * 100 * 64 * 2 * (14 + 1 + 4)
    assert pick_buffer_device(torch.device("cpu"), 10**15) == torch.device("cpu")
    # a GPU with 1 GiB free plus 0.5 GiB of torch's reusable cache (faked: no GPU needed)
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: gib // 2)
    cuda = torch.device("cuda", 0)
    assert pick_buffer_device(cuda, int(1.1 * gib)) == cuda  # 1.1 <= 0.8 * 1.5
    assert pick_buffer_device(cuda, int(1.3 * gib)) == torch.device("cpu")


def test_bad_arguments():
    with pytest.raises(ValueError, match="blend"):
        sliding_window_predict(Pointwise(), _image((8, 8, 8)), roi_size=(8, 8, 8), blend="max", device="cpu")
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_predict(Pointwise(), _image((8, 8, 8)), roi_size=(8, 8, 8), overlap=1.0, device="cpu")
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        sliding_window_predict(Pointwise(), torch.zeros(8, 8, 8), roi_size=(8, 8, 8), device="cpu")


@pytest.mark.parametrize("shape,overlap", [((37, 29, 23), 0.5), ((16, 40, 9), 0.25), ((64, 16, 33), 0.0)])
def test_count_windows_matches_monai_and_progress_bar(shape, overlap, capsys):
    model = Pointwise()
    sliding_window_predict(model, _image(shape), roi_size=(16, 16, 16), overlap=overlap, sw_batch_size=1,
                           device="cpu", progress="case_x")
    assert len(model.seen_shapes) == count_windows(shape, (16, 16, 16), overlap)
    err = capsys.readouterr().err
    assert "case_x" in err and f"{len(model.seen_shapes)}/{len(model.seen_shapes)}" in err
