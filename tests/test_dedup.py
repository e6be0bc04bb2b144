"""One implementation per concept (issue 14 item 1): each test pins a concept to its one home and
checks that every former copy now answers with it (and with the same numbers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.config import Config, load_config, save_config
from medseg.errors import ConfigError, InputError
from medseg.io import write_volume
from medseg.nn import build_model, make_unet
from medseg.nn.registries import create_block_attention, create_skip_fusion
from medseg.registry import is_none_name

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


# --------------------------------------------------------------------------- norms
def test_make_norm_is_monai_get_norm_layer_of_norm_spec(monkeypatch):
    from medseg.nn import layers

    assert type(layers.make_norm("group", 24, 3)) is layers.GroupNorm and layers.make_norm("group", 24, 3).num_groups == 8
    assert type(layers.make_norm("instance", 6, 2)) is layers.InstanceNorm2d
    assert layers.make_norm("instance", 6, 3).affine and type(layers.make_norm("batch", 6, 3)) is torch.nn.BatchNorm3d
    with pytest.raises(ValueError, match="spatial_dims"):
        layers.make_norm("instance", 6, 4)
    monkeypatch.setattr(layers, "norm_spec", lambda name, channels=None: ("batch", {}))  # one mapping: change it, both follow
    assert type(layers.make_norm("instance", 6, 3)) is torch.nn.BatchNorm3d


# --------------------------------------------------------------------------- "no module" names
@pytest.mark.parametrize("name", [None, "", "none", "None", "identity", "Identity", " none "])
def test_every_spelling_of_no_module_is_accepted_everywhere(name):
    assert is_none_name(name)
    assert isinstance(create_block_attention(name, 8), torch.nn.Identity)
    assert type(create_skip_fusion(name, 8, 16)).__name__ == type(create_skip_fusion("concat", 8, 16)).__name__
    def n_params(*overrides):
        cfg = load_config(None, ["model.channels=[4,8,16]", *overrides]).model
        cfg.block_attention.name, cfg.block_attention.bottleneck, cfg.skip_fusion.name = name, name, name
        return sum(p.numel() for p in build_model(cfg, num_classes=2).parameters())

    plain = sum(p.numel() for p in build_model(load_config(None, ["model.channels=[4,8,16]"]).model, num_classes=2).parameters())
    assert n_params() == plain  # factory, unet and registries agree: no block, concat skips
    assert n_params("model.arch=monai_unet") > 0  # the baselines' refusal check agrees too
    assert isinstance(make_unet(channels=[4, 8], block_attention=name, block_attention_kwargs={"x": 1}), torch.nn.Module)


@pytest.mark.parametrize("name", ["cbam", "nonsense", 0])
def test_a_real_name_is_not_none(name):
    assert not is_none_name(name)


def test_unknown_name_still_fails_naming_the_key():
    cfg = load_config(None, ["model.block_attention.name=identityx"]).model
    with pytest.raises(ConfigError, match="model.block_attention.name"):
        build_model(cfg, num_classes=2)


# --------------------------------------------------------------------------- checkpoints and plans
def _run_dir(tmp_path: Path, payload) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_config(Config(), run / "config.yaml")
    (run / "plans.json").write_text(json.dumps({"num_classes": 2}))
    if isinstance(payload, bytes):
        (run / "checkpoints" / "best.pt").write_bytes(payload)
    else:
        torch.save(payload, run / "checkpoints" / "best.pt")
    return run


def test_predictor_reads_checkpoints_and_plans_with_the_one_loader(tmp_path, monkeypatch):
    import medseg.data.pipeline as pipeline
    import medseg.train.checkpoint as ck
    from medseg.infer.predictor import load_run

    seen = []
    real_ck, real_plans = ck.load_checkpoint, pipeline.load_plans
    monkeypatch.setattr(ck, "load_checkpoint", lambda p, map_location="cpu": seen.append(("ckpt", Path(p).name)) or real_ck(p, map_location))
    monkeypatch.setattr(pipeline, "load_plans", lambda d: seen.append(("plans", Path(d).name)) or real_plans(d))
    run = _run_dir(tmp_path, {"model": {"module.w": torch.ones(2)}})
    _, plans, state, _ = load_run(run)
    assert plans == {"num_classes": 2} and list(state) == ["w"]
    assert sorted(seen) == [("ckpt", "best.pt"), ("plans", "run")]


@pytest.mark.parametrize("payload,match", [(b"junk", "cannot read checkpoint"), ({"epoch": 1}, "no 'model' state dict"),
                                           ({"model": 3}, "no 'model' state dict")])
def test_bad_checkpoints_give_the_same_error_to_resume_and_to_predict(tmp_path, payload, match):
    from medseg.infer.predictor import load_run
    from medseg.train.checkpoint import load_checkpoint

    run = _run_dir(tmp_path, payload)
    for read in (lambda: load_run(run), lambda: load_checkpoint(run / "checkpoints" / "best.pt")):
        with pytest.raises(InputError, match=match):
            read()


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    from medseg.train.checkpoint import load_checkpoint

    torch.save({"model": {}, "cfg": Config()}, tmp_path / "x.pt")  # a class instance needs weights_only=False
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


# --------------------------------------------------------------------------- window counting
def test_benchmarks_count_windows_with_the_library(monkeypatch):
    sys.path.insert(0, str(BENCH))
    import _common

    import medseg.infer.sliding as sliding

    monkeypatch.setattr(sliding, "count_windows", lambda shape, roi, overlap: 42)
    assert _common.num_windows((100, 100, 100), (32, 32, 32), 0.5) == 42


@pytest.mark.parametrize("shape,roi,overlap", [((1, 2, 40, 33), (16, 16), 0.5), ((40, 33), (16, 16), 0.25),
                                               ((1, 1, 40, 33, 20), (16, 16, 16), 0.5)])
def test_count_windows_is_n_dimensional_and_matches_monai(shape, roi, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from medseg.infer.sliding import count_windows

    spatial = shape[-len(roi):]
    expected = len(dense_patch_slices(spatial, roi, _get_scan_interval(spatial, roi, len(roi), (overlap,) * len(roi))))
    assert count_windows(shape, roi, overlap) == expected


# --------------------------------------------------------------------------- the process pool
def _labels(folder: Path, name: str, affine=np.eye(4)):
    arr = np.zeros((6, 5, 4), np.uint8)
    arr[1:4, 1:3, 1:3] = 1
    folder.mkdir(parents=True, exist_ok=True)
    write_volume(arr, folder / name, affine)


def test_evaluate_runs_its_cases_in_the_data_layers_pool_and_lists_every_failure(tmp_path, monkeypatch):
    import medseg.evaluate.evaluator as ev

    pred, ref = tmp_path / "pred", tmp_path / "ref"
    shifted = np.eye(4)
    shifted[0, 3] = 7.0
    for case in ("a", "b", "c"):
        _labels(ref, f"{case}.nii.gz")
        _labels(pred, f"{case}.nii.gz", np.eye(4) if case == "a" else shifted)  # b, c: other grid
    calls = []
    real = ev.run_parallel
    monkeypatch.setattr(ev, "run_parallel", lambda fn, jobs, **kw: calls.append((len(jobs), kw["workers"])) or real(fn, jobs, **kw))
    with pytest.raises(InputError) as err:
        ev.evaluate_folders(pred, ref, dataset_json=None, workers=2, progress=False)
    assert calls == [(3, 2)]
    msg = str(err.value)
    assert msg.startswith("2 case(s) could not be scored") and "  b: " in msg and "  c: " in msg and "  a: " not in msg
    _labels(pred, "b.nii.gz")
    _labels(pred, "c.nii.gz")
    summary = ev.evaluate_folders(pred, ref, dataset_json=None, workers=2, progress=False)
    assert summary["mean"]["1"]["Dice"] == 1.0 and [c["case"] for c in summary["metric_per_case"]] == ["a", "b", "c"]


# --------------------------------------------------------------------------- nnU-Net channel tags
def test_dataset_discovery_splits_channel_tags_with_io(tmp_path):
    from medseg.data.datasets import discover_cases

    for name in ("a_01_0000.nii.gz", "b_0000.nii.gz"):  # a_01_0000 is channel 0 of case 'a_01', not of 'a'
        write_volume(np.zeros((4, 4, 4), np.int16), tmp_path / "imagesTr" / name, np.eye(4))
    for name in ("a.nii.gz", "b.nii.gz", "a_01.nii.gz"):
        write_volume(np.zeros((4, 4, 4), np.uint8), tmp_path / "labelsTr" / name, np.eye(4))
    meta = {"labels": {"background": 0, "x": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
            "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
                         {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"a\.nii\.gz: file not found"):
        discover_cases(tmp_path)
    meta["training"] = meta["training"][1:]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert [p.name for p in discover_cases(tmp_path).cases[0].images] == ["b_0000.nii.gz"]
    del meta["training"]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert [(c.name, [p.name for p in c.images]) for c in discover_cases(tmp_path).cases] == [
        ("a_01", ["a_01_0000.nii.gz"]), ("b", ["b_0000.nii.gz"])]


def test_a_non_ascii_digit_is_no_channel_tag():
    from medseg.io import split_channel_tag

    assert split_channel_tag("a_0001.nii.gz") == ("a", 1)
    assert split_channel_tag("a_000\u00b2.nii.gz") == ("a_000\u00b2", None)  # '²'.isdigit() is True, int('²') fails
