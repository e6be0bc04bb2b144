"""The stock MONAI inference pipeline, as a MONAI tutorial writes it: the baseline for benchmarks.

LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(1.5 mm) ->
ScaleIntensityRanged(-1000..1000 -> 0..1) -> ``sliding_window_inference`` (roi 96^3,
sw_batch_size 4, overlap 0.25) -> Invertd -> argmax -> SaveImaged, with MONAI's ``UNet`` or
``AttentionUnet`` (channels 16..256, untrained). Each stage is timed; used by ``infer_speed.py``
in its own subprocess so that its peak RSS is its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def build_monai_model(name: str, num_classes: int = 6, channels=(16, 32, 64, 128, 256)) -> torch.nn.Module:
    """MONAI's ``UNet`` (``name='unet'``) or ``AttentionUnet`` (``'attention'``) with stride-2 stages."""
    from monai.networks.nets import AttentionUnet, UNet

    strides = (2,) * (len(channels) - 1)
    if name == "unet":
        return UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=channels, strides=strides, num_res_units=2)
    if name == "attention":
        return AttentionUnet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=channels, strides=strides)
    raise ValueError(f"unknown MONAI model '{name}' (unet, attention)")


def run_stock_pipeline(image_path: str | Path, out_dir: str | Path, model_name: str, *, num_classes: int = 6,
                       channels=(16, 32, 64, 128, 256), roi_size=(96, 96, 96), sw_batch_size: int = 4,
                       overlap: float = 0.25) -> dict:
    """Run the stock pipeline on one volume; returns per-stage seconds (``load_preprocess``,
    ``sliding_window``, ``invert_write``, ``total``), the model set-up time (``setup``, not in
    ``total``) and the ``shape`` of the resampled image."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_monai_model(model_name, num_classes, tuple(channels)).eval()
    setup = time.perf_counter() - t0
    pre = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    post = Compose(
        [
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
            SaveImaged(keys="pred", output_dir=str(out_dir), output_postfix="seg", separate_folder=False, print_log=False),
        ]
    )
    times = {}
    t0 = time.perf_counter()
    data = pre({"image": str(image_path)})
    times["load_preprocess"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        data["pred"] = sliding_window_inference(data["image"][None], tuple(roi_size), sw_batch_size, model, overlap=overlap)[0]
    times["sliding_window"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    post(data)
    times["invert_write"] = time.perf_counter() - t0
    times["total"] = sum(times.values())
    return {**times, "setup": setup, "shape": [int(v) for v in data["image"].shape[1:]]}
