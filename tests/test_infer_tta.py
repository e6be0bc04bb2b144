"""Test-time mirroring flips only the axes training mirrored, on the same array axes as training."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
import torch

from medseg.config import AugmentConfig, load_config, save_config
from medseg.data.transforms import build_train_transforms
from medseg.infer.predictor import Predictor, run_mirror_axes
from medseg.infer.sliding import allowed_mirror_axes, sliding_window_predict
from test_infer_cli import make_run, write_inputs


class Recorder(torch.nn.Module):
    """A random 3x3x3 conv net (not mirror-symmetric) that records every input window."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 3, padding=1))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


def _image(shape=(16, 12, 8)) -> torch.Tensor:
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(1))


def _predict(model, img, **kw):
    # one window covering the whole image: no padding, so a flip of the image flips the window
    return sliding_window_predict(model, img, roi_size=tuple(img.shape[1:]), device="cpu", **kw)


@pytest.mark.parametrize("axes,passes", [((0, 1, 2), 8), ((0, 2), 4), ((1,), 2), ((), 1)])
def test_tta_passes_are_the_subsets_of_the_allowed_axes(axes, passes):
    model = Recorder()
    _predict(model, _image(), tta=True, mirror_axes=axes)
    assert len(model.seen) == passes
    flipped = set()
    for x in model.seen:  # each recorded window is the image flipped along some dims
        img = _image()[None]
        hits = [d for n in range(4) for d in itertools.combinations((2, 3, 4), n)
                if torch.equal(x, torch.flip(img, d) if d else img)]
        assert len(hits) == 1
        flipped.add(hits[0])
    assert flipped == {tuple(a + 2 for a in c) for n in range(len(axes) + 1)
                       for c in itertools.combinations(sorted(axes), n)}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_inference_flip_is_the_training_flip(axis):
    """Training mirrors axis a of the preprocessed (C, X, Y, Z) array; TTA with mirror_axes=[a] flips that same axis."""
    img = _image((8, 8, 8))
    aug = AugmentConfig(p_rotate=0, p_scale=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
                        p_gamma=0, p_mirror=1.0, mirror_axes=[axis])
    trained = build_train_transforms((8, 8, 8), aug)({"image": img.clone(), "label": torch.zeros_like(img)})["image"]
    trained = torch.as_tensor(trained)
    assert not torch.equal(trained, img)
    model = Recorder()
    _predict(model, img, tta=True, mirror_axes=allowed_mirror_axes(aug))
    assert len(model.seen) == 2 and torch.equal(model.seen[1][0], trained)


def test_tta_makes_the_prediction_equivariant_along_the_allowed_axes_only():
    model, img = Recorder(), _image()
    plain = _predict(model, img)
    for axes, equivariant, not_equivariant in (((0, 1, 2), (0, 1, 2), ()), ((0,), (0,), (1, 2))):
        out = _predict(model, img, tta=True, mirror_axes=axes)
        assert torch.max(torch.abs(out - plain)).item() > 1e-3  # TTA changes a non-symmetric net's output
        for a in equivariant:
            mirrored = _predict(model, torch.flip(img, (a + 1,)), tta=True, mirror_axes=axes)
            assert torch.allclose(torch.flip(mirrored, (a + 1,)), out, atol=1e-5), (axes, a)
        for a in not_equivariant:
            mirrored = _predict(model, torch.flip(img, (a + 1,)), tta=True, mirror_axes=axes)
            assert torch.max(torch.abs(torch.flip(mirrored, (a + 1,)) - out)).item() > 1e-3, (axes, a)


def test_allowed_axes_follow_the_training_augmentation():
    assert allowed_mirror_axes(AugmentConfig(p_mirror=0.5, mirror_axes=[2, 0])) == [0, 2]
    assert allowed_mirror_axes(AugmentConfig(p_mirror=0.0, mirror_axes=[0, 1, 2])) == []
    cfg = load_config(None, ["train.augment.mirror_axes=[1]"])
    assert run_mirror_axes(cfg, {}) == [1]  # an older run: derived from its config.yaml
    assert run_mirror_axes(cfg, {"inference_allowed_mirroring_axes": [0, 2]}) == [0, 2]  # recorded: wins


def _counting_predictor(run, **kw):
    pred = Predictor.from_run(run, device="cpu", precision="fp32", **kw)
    calls = []
    pred.model.register_forward_hook(lambda *a: calls.append(1))
    return pred, calls


@pytest.mark.parametrize("recorded,overrides,passes", [
    ([], [], 1),  # recorded: trained without mirroring
    ([0, 1], [], 4),
    (None, ["train.augment.p_mirror=0"], 1),  # an older run without the record: from config.yaml
    (None, ["train.augment.mirror_axes=[2]"], 2),
])
def test_predictor_mirrors_only_what_the_run_allows(tmp_path, monkeypatch, caplog, recorded, overrides, passes):
    run = make_run(tmp_path / "run")
    if recorded is not None:
        plans = json.loads((run / "plans.json").read_text())
        (run / "plans.json").write_text(json.dumps(dict(plans, inference_allowed_mirroring_axes=recorded)))
    if overrides:
        save_config(load_config(run / "config.yaml", overrides), run / "config.yaml")
    src = write_inputs(tmp_path / "in", [("a.nii.gz", "RAS", 0.0)])[0]
    plain, plain_calls = _counting_predictor(run, tta=False)
    plain_mask = plain.predict(src).mask.array
    monkeypatch.setattr(logging.getLogger("medseg"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="medseg"):
        tta, tta_calls = _counting_predictor(run, tta=True)
    assert ("trained without mirroring" in caplog.text) == (passes == 1)
    tta_mask = tta.predict(src).mask.array
    assert len(plain_calls) > 0 and len(tta_calls) == passes * len(plain_calls)
    if passes == 1:
        assert np.array_equal(tta_mask, plain_mask)


@pytest.mark.parametrize("axes_override, saved, axes", [
    (["train.augment.mirror_axes=[1,0]"], [1, 0], [0, 1]),
    ([], [1, 2], [1, 2]),  # the default "auto": the phantoms' liver and spleen have sides, so no left-right flips
])
def test_training_records_the_mirror_axes_in_plans(preprocessed_phantoms, tmp_path, axes_override, saved, axes):
    from medseg.train import train

    run = tmp_path / "run"
    cfg = load_config(None, [f"data.preprocessed={preprocessed_phantoms}", "model.channels=[4,8]", "data.patch_size=[16,16,16]",
                             "train.epochs=1", "train.iters_per_epoch=1", "train.batch_size=1", "data.num_workers=0",
                             "data.val_cases=[phantom_003]", "train.tb_num_cases=1", "train.augment.p_mirror=0.3",
                             *axes_override])
    train(cfg, run)
    plans = json.loads((run / "plans.json").read_text())
    assert plans["inference_allowed_mirroring_axes"] == axes
    assert load_config(run / "config.yaml").train.augment.mirror_axes == saved  # resolved before it is saved
    assert Predictor.from_run(run, checkpoint="final", device="cpu").mirror_axes == axes
