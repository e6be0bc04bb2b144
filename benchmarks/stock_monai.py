"""The stock MONAI pipelines, as MONAI's tutorials write them: the baselines of the benchmarks.

Inference (``run_stock_pipeline``, timed by ``infer_speed.py``):
LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(1.5 mm) ->
ScaleIntensityRanged(-1000..1000 -> 0..1) -> ``sliding_window_inference`` (roi 96^3,
sw_batch_size 4, overlap 0.25; fp32, or under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with
``amp_dtype``) -> Invertd -> argmax -> SaveImaged, with MONAI's ``UNet`` or ``AttentionUnet``
(channels 16..256, untrained). Each stage is timed; used by ``infer_speed.py``
in its own subprocess so that its peak RSS is its own.

Training (``train_stock_recipe`` + ``predict_stock_recipe``, run by ``head_to_head.py``): the 3D
segmentation tutorials' recipe (spleen / BTCV) under a wall-clock budget -- 3 mm voxels,
-175..250 HU -> 0..1, CropForegroundd, CacheDataset, 4 x 64^3 RandCropByPosNegLabeld patches per
step, flips / rot90 / intensity shift, MONAI ``UNet`` (16..256, 2 residual units, batch norm),
``DiceCELoss``, AdamW 1e-3; ``sliding_window_inference`` 64^3 (sw_batch 4, overlap 0.5, Gaussian),
Invertd back to the original grid.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch


def build_monai_model(name: str, num_classes: int = 6, channels=(16, 32, 64, 128, 256), norm: str = "instance") -> torch.nn.Module:
    """MONAI's ``UNet`` (``name='unet'``, 2 residual units, ``norm``) or ``AttentionUnet`` (``'attention'``)
    with stride-2 stages."""
    from monai.networks.nets import AttentionUnet, UNet

    strides = (2,) * (len(channels) - 1)
    if name == "unet":
        return UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=channels, strides=strides,
                    num_res_units=2, norm=norm)
    if name == "attention":
        return AttentionUnet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=channels, strides=strides)
    raise ValueError(f"unknown MONAI model '{name}' (unet, attention)")


def run_stock_pipeline(image_path: str | Path, out_dir: str | Path, model_name: str, *, num_classes: int = 6,
                       channels=(16, 32, 64, 128, 256), roi_size=(96, 96, 96), sw_batch_size: int = 4,
                       overlap: float = 0.25, amp_dtype: torch.dtype | None = None) -> dict:
    """Run the stock pipeline on one volume; returns per-stage seconds (``load_preprocess``,
    ``sliding_window``, ``invert_write``, ``total``), the model set-up time (``setup``, not in
    ``total``) and the ``shape`` of the resampled image.

    ``amp_dtype``: ``None`` (default) runs the sliding window in fp32, as the tutorials do;
    ``torch.bfloat16`` wraps it in ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the logits are
    cast back to fp32 before Invertd)."""
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
    amp = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        data["pred"] = sliding_window_inference(data["image"][None], tuple(roi_size), sw_batch_size, model, overlap=overlap)[0]
    if amp_dtype is not None:
        data["pred"] = data["pred"].float()
    times["sliding_window"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    post(data)
    times["invert_write"] = time.perf_counter() - t0
    times["total"] = sum(times.values())
    return {**times, "setup": setup, "shape": [int(v) for v in data["image"].shape[1:]]}


# --------------------------------------------------------------------------- the stock training recipe
def stock_transforms(*, spacing: float, roi: int, num_samples: int = 4, a_min: float = -175.0, a_max: float = 250.0,
                     train: bool = True):
    """The tutorial's transforms: LoadImaged, EnsureChannelFirstd, Orientationd RAS, Spacingd (bilinear image,
    nearest label), ScaleIntensityRanged ``a_min..a_max`` HU -> 0..1 clipped, CropForegroundd on the image;
    for training also RandCropByPosNegLabeld ``num_samples`` x ``roi``^3 (pos 1, neg 1), RandFlipd on each axis
    (p 0.1), RandRotate90d (p 0.1, max_k 3), RandShiftIntensityd (offsets 0.1, p 0.5). A SpatialPadd to one
    patch precedes the crops: a no-op on CTs larger than a patch (the real ones), needed for small phantoms."""
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd, RandCropByPosNegLabeld,
                                  RandFlipd, RandRotate90d, RandShiftIntensityd, ScaleIntensityRanged, Spacingd, SpatialPadd)

    keys = ["image", "label"] if train else ["image"]
    ops = [LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys), Orientationd(keys=keys, axcodes="RAS"),
           Spacingd(keys=keys, pixdim=(spacing,) * 3, mode=("bilinear", "nearest") if train else "bilinear"),
           ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
           CropForegroundd(keys=keys, source_key="image")]
    if train:
        ops += [SpatialPadd(keys=keys, spatial_size=(roi,) * 3),
                RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=(roi,) * 3, pos=1, neg=1,
                                       num_samples=num_samples, image_key="image", image_threshold=0),
                *[RandFlipd(keys=keys, spatial_axis=[axis], prob=0.10) for axis in range(3)],
                RandRotate90d(keys=keys, prob=0.10, max_k=3),
                RandShiftIntensityd(keys="image", offsets=0.10, prob=0.50)]
    return Compose(ops)


def train_stock_recipe(cases, num_classes: int, out_dir: str | Path, *, minutes: float, marks_min=(), spacing: float = 3.0,
                       roi: int = 64, num_samples: int = 4, channels=(16, 32, 64, 128, 256), lr: float = 1e-3,
                       weight_decay: float = 1e-5, precision: str = "auto", num_workers: int = 1, seed: int = 0) -> dict:
    """Train the stock recipe on ``cases`` (``(image, label)`` paths) for ``minutes`` of wall clock.

    CacheDataset (the deterministic transforms, before the clock starts) -> DataLoader(batch_size=1:
    ``num_samples`` patches a step) -> MONAI ``UNet`` (``channels``, strides 2, 2 residual units, batch norm)
    -> ``DiceCELoss(to_onehot_y=True, softmax=True)`` -> AdamW. ``precision`` as medseg's
    (:func:`medseg.runtime.resolve_precision`: ``auto`` = bf16 autocast on a CPU with native bf16).
    A step starts only when it is expected to end within the budget; the weights are saved to
    ``out_dir/at_<m>min.pt`` after the first step that ends past each mark of ``marks_min`` (below the
    budget) and to ``out_dir/final.pt`` at the end.

    Returns:
        ``steps``, ``patches``, ``voxels`` (seen), ``train_s`` (the loop), ``cache_s``, ``precision``,
        ``final`` (path) and ``snapshots`` (``mark_min``, ``at_min``, ``steps``, ``path``).
    """
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    from medseg.runtime import autocast, resolve_device, resolve_precision

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(seed)
    dev = resolve_device("auto")
    amp = resolve_precision(precision, dev)
    t0 = time.perf_counter()
    data = [{"image": str(img), "label": str(lab)} for img, lab in cases]
    ds = CacheDataset(data, stock_transforms(spacing=spacing, roi=roi, num_samples=num_samples), cache_rate=1.0,
                      num_workers=max(1, num_workers), progress=False)
    loader = DataLoader(ds, batch_size=1, shuffle=True, num_workers=num_workers)
    cache_s = time.perf_counter() - t0
    model = build_monai_model("unet", num_classes, tuple(channels), norm="batch").to(dev).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    meta = {"num_classes": num_classes, "channels": list(channels), "spacing": spacing, "roi": roi}
    budget, pending, snaps = minutes * 60.0, sorted(m * 60.0 for m in marks_min if m < minutes), []
    step, patches, t0 = 0, 0, time.perf_counter()
    done = False
    while not done:
        for batch in loader:
            x, y = batch["image"].to(dev), batch["label"].to(dev)
            opt.zero_grad(set_to_none=True)
            with autocast(dev, amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            loss.backward()
            opt.step()
            step, patches = step + 1, patches + x.shape[0]
            elapsed = time.perf_counter() - t0
            while pending and elapsed >= pending[0]:
                mark = pending.pop(0) / 60
                path = out_dir / f"at_{mark:g}min.pt"
                torch.save({"model": model.state_dict(), **meta, "step": step}, path)
                snaps.append({"mark_min": mark, "at_min": elapsed / 60, "steps": step, "path": str(path)})
            if elapsed + elapsed / step > budget:
                done = True
                break
    train_s = time.perf_counter() - t0
    final = out_dir / "final.pt"
    torch.save({"model": model.state_dict(), **meta, "step": step}, final)
    return {"steps": step, "patches": patches, "patch_size": [roi] * 3, "voxels": patches * roi**3, "train_s": train_s,
            "cache_s": cache_s, "precision": str(amp or "fp32").replace("torch.", ""), "final": str(final),
            "snapshots": snaps}


def predict_stock_recipe(checkpoint: str | Path, images, out_dir: str | Path, *, sw_batch_size: int = 4,
                         overlap: float = 0.5, precision: str = "auto") -> dict:
    """Segment ``images`` (``(case, path)`` pairs) with a :func:`train_stock_recipe` checkpoint:
    the deterministic transforms, ``sliding_window_inference`` (the training patch, ``sw_batch_size``,
    ``overlap``, Gaussian), Invertd back to the original grid, argmax, written as ``<case>.nii.gz`` in
    the input's geometry (its affine and NIfTI codes). Returns ``infer_s`` and ``cases``."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscreted, Compose, Invertd

    from medseg.io import nifti_xform_codes, read_volume, write_volume
    from medseg.runtime import autocast, resolve_device, resolve_precision

    t0 = time.perf_counter()
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    dev = resolve_device("auto")
    amp = resolve_precision(precision, dev)
    model = build_monai_model("unet", ck["num_classes"], tuple(ck["channels"]), norm="batch")
    model.load_state_dict(ck["model"])
    model = model.to(dev).eval()
    pre = stock_transforms(spacing=ck["spacing"], roi=ck["roi"], train=False)
    post = Compose([Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
                    AsDiscreted(keys="pred", argmax=True)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for case, path in images:
        data = pre({"image": str(path)})
        with torch.inference_mode(), autocast(dev, amp):
            logits = sliding_window_inference(data["image"][None].to(dev), (ck["roi"],) * 3, sw_batch_size, model,
                                              overlap=overlap, mode="gaussian")
        data["pred"] = logits[0].float().cpu()
        mask = post(data)["pred"][0].numpy().astype("uint8")
        ref = read_volume(path)
        if mask.shape != ref.array.shape:
            raise RuntimeError(f"{path}: inverted mask {mask.shape} != image {ref.array.shape}")
        write_volume(mask, out_dir / f"{case}.nii.gz", affine=ref.affine, xform_codes=nifti_xform_codes(path))
    return {"infer_s": time.perf_counter() - t0, "cases": len(images)}
