"""The budget planner (medseg.train.budget): spacing and patch for train.max_minutes, and its hooks in
`medseg run` (before preprocessing) and `medseg train` (the patch at the preprocessed spacing)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from medseg.config import Config, load_config
from medseg.train import budget
from medseg.train.budget import candidate_spacings, fov_patch, make_step_seconds, median_extent_mm, plan_for_budget
from medseg.data.phantoms import make_phantom_dataset
from medseg.errors import ConfigError
from medseg.pipelines.job import run_job
from medseg.train.checks import check_config

from test_train_demo import one_thread  # noqa: F401  (a fixture)


class FakeStep:
    """Seconds proportional to the patch volume (``per_96`` s for 96^3, as the real_organs recipe's
    ~1.3 s); records the patches it was asked for."""

    def __init__(self, per_96: float = 1.3):
        self.per_96, self.calls = per_96, []

    def __call__(self, patch):
        self.calls.append(list(patch))
        return math.prod(patch) * self.per_96 / 96 ** 3


BIG = dict(extent_mm=[300.0, 300.0, 300.0], target_spacing=[0.8, 0.8, 0.8], minutes=15.0, divisor=16)


def test_candidates_and_fov_patch():
    assert candidate_spacings([0.8, 0.8, 0.8]) == [[0.8] * 3, [1.5] * 3, [2.0] * 3, [3.0] * 3, [4.0] * 3]
    assert candidate_spacings([1.0, 1.0, 2.5]) == [[1.0, 1.0, 2.5], [3.0] * 3, [4.0] * 3]  # 1.5, 2 finer on z
    assert candidate_spacings([0.8, 0.8, 5.0]) == [[0.8, 0.8, 5.0]]
    assert candidate_spacings([2.0, 2.0, 2.0]) == [[2.0] * 3, [3.0] * 3, [4.0] * 3]  # no duplicate of the target
    # 250 mm at 3 mm = 84 voxels -> 96 (divisor 16 or 32); capped by a 90 mm median extent on z: 30 -> 32
    assert fov_patch([300, 300, 90], [3, 3, 3], 250, 16) == [96, 96, 32]
    assert fov_patch([300, 300, 90], [3, 3, 3], 250, [32, 32, 1]) == [96, 96, 30]
    assert median_extent_mm([[100, 50, 10], [200, 60, 30], [300, 70, 20]], [[1, 1, 2]] * 3) == [200.0, 60.0, 40.0]


def test_the_finest_spacing_that_allows_min_steps_wins():
    step = FakeStep()  # allowed: 15 * 60 * 0.9 / 500 = 1.62 s per step
    plan = plan_for_budget(**BIG, step_seconds=step)
    assert plan["spacing"] == [3.0, 3.0, 3.0] and plan["patch"] == [96, 96, 96]
    assert plan["expected_steps"] == int(15 * 60 * 0.9 / 1.3) == 623 and plan["qualifies"]
    assert plan["planned"] == ["spacing", "patch"] and plan["allowed_step_s"] == pytest.approx(1.62)
    # coarsest first, a probe before; stops at 2 mm (128^3: 3.1 s misses); 1.5 mm and 0.8 mm never run
    assert step.calls == [[32] * 3, [64] * 3, [96] * 3, [128] * 3]
    assert [r["role"] for r in plan["candidates"]] == ["probe", "candidate", "candidate", "candidate"]
    assert [r["qualifies"] for r in plan["candidates"]] == [True, True, True, False]
    # a 4x faster machine affords 2 mm (128^3 = 0.77 s) but not 1.5 mm (176^3 = 2.0 s)
    fast = plan_for_budget(**BIG, step_seconds=FakeStep(per_96=0.325))
    assert fast["spacing"] == [2.0, 2.0, 2.0] and fast["patch"] == [128, 128, 128]
    # a fast step everywhere: nnU-Net's spacing, its patch capped by the median case (then rounded to 16)
    small = plan_for_budget(extent_mm=[100.0, 120.0, 60.0], target_spacing=[1.0, 1.0, 2.5], minutes=15.0,
                            divisor=16, step_seconds=lambda p: 0.1)
    assert small["spacing"] == [1.0, 1.0, 2.5] and small["patch"] == [112, 128, 32]


def test_shrinks_the_coarsest_patch_when_no_spacing_qualifies():
    step = FakeStep(per_96=6.0)  # 4 mm 64^3 takes 1.8 s > 1.62 s: nothing qualifies as planned
    plan = plan_for_budget(**BIG, step_seconds=step)
    assert plan["spacing"] == [4.0, 4.0, 4.0] and plan["qualifies"]
    assert plan["patch"] == [48, 48, 48] and plan["candidates"][-1]["role"] == "shrunk"  # 64 * 2^(-1/3) = 50.8 -> 48
    # hopeless: the smallest patch (32 per axis) is returned, flagged; patches predicted far too slow are not run
    slow = FakeStep(per_96=3000.0)
    hopeless = plan_for_budget(**BIG, step_seconds=slow)
    assert hopeless["patch"] == [32, 32, 32] and not hopeless["qualifies"] and hopeless["expected_steps"] < 500
    assert slow.calls == [[32, 32, 32]]
    assert [r["timed"] for r in hopeless["candidates"]] == [True, False, False, True]
    # never below 32 voxels rounded to the divisor: 64 with a stride-64 net
    assert plan_for_budget(**{**BIG, "divisor": 64}, step_seconds=FakeStep(per_96=3000.0))["patch"] == [64, 64, 64]
    # a stride-32 net: the probe is 64^3 (a 32^3 patch leaves a 1-voxel bottleneck, which instance norm refuses
    # in training: such a step fails and counts as too slow); hopeless, it falls back to the smallest patch that ran
    def strided(patch):
        if min(patch) < 64:
            raise ValueError("Expected more than 1 spatial element when training")
        return FakeStep(per_96=6.0)(patch)
    s32 = plan_for_budget(**{**BIG, "divisor": 32}, step_seconds=strided)
    assert s32["candidates"][0]["patch"] == [64, 64, 64] and s32["candidates"][0]["role"] == "candidate"
    assert s32["candidates"][-1]["patch"] == [32, 32, 32] and s32["candidates"][-1]["step_s"] is None
    assert s32["candidates"][-1]["timed"] and s32["patch"] == [64, 64, 64] and not s32["qualifies"]
    # a failing step (out of memory) counts as too slow
    def oom(patch):
        if math.prod(patch) > 64 ** 3:
            raise RuntimeError("out of memory")
        return FakeStep()(patch)
    failed = plan_for_budget(**BIG, step_seconds=oom)
    assert failed["patch"] == [64, 64, 64] and failed["spacing"] == [4.0, 4.0, 4.0]
    assert failed["candidates"][-1]["step_s"] is None and failed["candidates"][-1]["expected_steps"] == 0


def test_explicit_spacing_or_patch_is_kept():
    step = FakeStep()
    plan = plan_for_budget(**BIG, spacing=[2.0, 2.0, 2.0], step_seconds=step)
    assert plan["spacing"] == [2.0, 2.0, 2.0] and plan["planned"] == ["patch"]
    assert plan["patch"] == [96, 96, 96] and plan["candidates"][-1]["role"] == "shrunk"  # 128^3 missed, 2^(-1/3) -> 96
    fixed = plan_for_budget(**BIG, patch=[80, 80, 48], step_seconds=FakeStep(per_96=100.0))
    assert fixed["patch"] == [80, 80, 48] and fixed["spacing"] == [0.8, 0.8, 0.8] and fixed["planned"] == []
    assert not fixed["qualifies"] and len(fixed["candidates"]) == 1
    # the memory cap shrinks a planned patch (largest axis first, by the divisor)
    capped = plan_for_budget(**BIG, step_seconds=lambda p: 0.01, max_voxels=100 ** 3)
    assert capped["spacing"] == [0.8, 0.8, 0.8] and math.prod(capped["patch"]) <= 100 ** 3
    assert all(v % 16 == 0 for v in capped["patch"])
    with pytest.raises(ConfigError, match="data.budget_min_steps"):
        plan_for_budget(**BIG, step_seconds=step, min_steps=0)

    def bad_model(patch):
        raise ConfigError("model.norm: 'nope' is not valid")
    with pytest.raises(ConfigError, match="model.norm"):  # a bad setting is not a slow patch
        plan_for_budget(**BIG, step_seconds=bad_model)


def test_settings_checked_and_off_without_minutes(tmp_path):
    cfg = Config()
    assert (cfg.data.budget_plan, cfg.data.budget_min_steps, cfg.data.budget_fov_mm) == ("auto", 500, 250.0)
    assert not budget.budget_applies(cfg) and not budget.job_plan_applies(cfg)  # no train.max_minutes: unchanged
    cfg.train.max_minutes = 15.0
    assert budget.job_plan_applies(cfg)
    cfg.data.patch_size = [96, 96, 96]
    assert budget.budget_applies(cfg) and not budget.job_plan_applies(cfg)
    assert budget.plan_train_patch(cfg, {}, tmp_path, None) is None  # explicit patch: nothing to plan
    for override, key in (("data.budget_plan=always", "data.budget_plan"), ("data.budget_min_steps=0", "data.budget_min_steps"),
                          ("data.budget_fov_mm=-1", "data.budget_fov_mm")):
        with pytest.raises(ConfigError, match=key):
            check_config(load_config(None, [override]))
    for value in ("off", "'off'"):  # YAML reads a bare off as false
        off = load_config(None, [f"data.budget_plan={value}", "train.max_minutes=15"])
        check_config(off)
        assert not budget.budget_applies(off)


def test_step_seconds_times_a_real_training_step(one_thread):
    cfg = load_config(None, ["model.channels=[4,8,16]", "train.device=cpu", "train.precision=fp32"])
    rng = torch.get_rng_state()
    step = make_step_seconds(cfg, in_channels=1, num_classes=3)
    s = step([16, 16, 16])
    assert 0 < s < 30 and step([16, 16, 16]) == s  # cached per patch
    assert torch.equal(torch.get_rng_state(), rng)  # building and stepping the probe net leaves training's RNG alone


def _fake_factory(calls):
    """A make_step_seconds stand-in: 1e-5 s per voxel (with 1 minute, 500 steps allow 0.108 s: ~10,000 voxels)."""
    def factory(cfg, **kwargs):
        def step(patch):
            calls.append(list(patch))
            return math.prod(patch) * 1e-5
        return step
    return factory


FAST = ["model.channels=[8,16,32]", "model.strides=[1,2,2]", "train.epochs=1", "train.iters_per_epoch=2",
        "train.val_interval=1", "train.scheduler=constant", "data.num_workers=0", "data.cache=ram"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("ds") / "Dataset043_Budget", n_train=3, n_test=1)


def test_run_job_plans_spacing_and_patch_for_the_minutes(phantoms, tmp_path, monkeypatch, one_thread):
    calls: list = []
    monkeypatch.setattr(budget, "make_step_seconds", _fake_factory(calls))
    out = tmp_path / "job"
    job = run_job(phantoms, out, load_config("demo", [*FAST, "data.patch_size=null", "train.max_minutes=1"]),
                  progress=False)
    assert job["status"] == "finished" and calls
    record = json.loads((out / "job.json").read_text())
    plan = record["budget_plan"]
    # the phantoms' nnU-Net spacing (~1 x 1 x 2.5 mm) and 3 mm need more than 10,000 voxels for their field of view
    assert plan["spacing"] == [4.0, 4.0, 4.0] and plan["qualifies"] and plan["planned"] == ["spacing", "patch"]
    assert all(p % 4 == 0 for p in plan["patch"]) and math.prod(plan["patch"]) * 1e-5 <= 0.108
    assert [r["spacing"] for r in plan["candidates"] if r["role"] == "candidate" and r["net"] == "config"] == [[4.0] * 3, [3.0] * 3]
    assert not plan["stem"]  # the stem net (same cost here) reaches the steps at 3 mm neither
    assert record["config"]["data"]["target_spacing"] == plan["spacing"]
    assert record["config"]["data"]["patch_size"] == plan["patch"]
    run_cfg = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert run_cfg["data"]["patch_size"] == plan["patch"] and run_cfg["data"]["target_spacing"] == plan["spacing"]
    assert json.loads((out / "preprocessed" / "plans.json").read_text())["target_spacing"] == plan["spacing"]

    # the same call again: not refused, nothing redone, nothing re-measured
    calls.clear()
    again = run_job(phantoms, out, load_config("demo", [*FAST, "data.patch_size=null", "train.max_minutes=1"]),
                    progress=False)
    assert again["steps_run"] == [] and calls == []
    # another budget is another recipe: refused
    with pytest.raises(ConfigError, match="max_minutes"):
        run_job(phantoms, out, load_config("demo", [*FAST, "data.patch_size=null", "train.max_minutes=2"]), progress=False)


def test_train_plans_the_patch_at_the_preprocessed_spacing(phantoms, tmp_path, monkeypatch, one_thread):
    calls: list = []
    monkeypatch.setattr(budget, "make_step_seconds", _fake_factory(calls))
    out = tmp_path / "job"
    # nnU-Net's optimizer (the variant configs'): a 1-minute budget trains the short-run recipe instead (rule 6)
    cfg = load_config("demo", [*FAST, "data.patch_size=null", "data.target_spacing=[3.0,3.0,3.0]", "train.max_minutes=1",
                               "train.optimizer=sgd", "train.scheduler=poly", "train.lr=0.01"])
    job = run_job(phantoms, out, cfg, progress=False)
    assert job["status"] == "finished"
    assert "budget_plan" not in json.loads((out / "job.json").read_text())  # the spacing was given: training plans the patch
    plan = json.loads((out / "run" / "plans.json").read_text())["budget_plan"]
    assert plan["spacing"] == [3.0, 3.0, 3.0] and plan["planned"] == ["patch", "recipe"] and plan["qualifies"]
    assert math.prod(plan["patch"]) * 1e-5 <= 0.108 and all(p % 4 == 0 for p in plan["patch"])
    run_cfg = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert run_cfg["data"]["patch_size"] == plan["patch"]  # the window inference uses (Predictor.from_run)
    assert (run_cfg["train"]["optimizer"], run_cfg["train"]["lr"], run_cfg["train"]["scheduler"]) == ("adamw", 1e-3, "wsd")
    assert "adamw" in (out / "run" / "log.txt").read_text()  # the model line names the optimizer it built
    assert json.loads((out / "predictions" / "predict_args.json").read_text())["settings"]["roi_size"] == plan["patch"]


def test_a_resumed_run_keeps_its_patch(tmp_path, monkeypatch):
    from types import SimpleNamespace

    def never(*args, **kwargs):
        raise AssertionError("a resumed run must not be re-planned")

    monkeypatch.setattr(budget, "make_step_seconds", never)
    cfg = load_config(None, ["train.max_minutes=15"])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.pt").write_bytes(b"")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"patch_size": [64, 48, 32]}}))
    (tmp_path / "plans.json").write_text(json.dumps({"budget_plan": {"spacing": [3.0] * 3, "planned": ["patch"]}}))
    plan = budget.plan_train_patch(cfg, {"target_spacing": [3.0] * 3}, tmp_path, SimpleNamespace(is_main=True, enabled=False))
    assert plan["patch"] == [64, 48, 32] and plan["resumed"] and plan["spacing"] == [3.0] * 3
    assert cfg.data.patch_size == [64, 48, 32]


# --------------------------------------------------------------------------- the strided stem (rule 5)
class NetStep:
    """Step seconds by net: ``per_96`` s per 96^3 for a strided-stem net, ``full`` times that for a net
    with a full-resolution stage (measured on 2 cores, fp32: ~7x per voxel); records (stem, patch)."""

    def __init__(self, per_96: float = 1.3, full: float = 7.0):
        self.per_96, self.full, self.calls = per_96, full, []

    def __call__(self, model_cfg):
        stem = model_cfg.strides[0] != 1

        def step(patch):
            self.calls.append((stem, list(patch)))
            return math.prod(patch) * self.per_96 / 96 ** 3 * (1.0 if stem else self.full)
        return step


def _stem_cfg(*overrides):
    return load_config(None, ["train.max_minutes=15", "model.strides=[1,2,2,2,2]", *overrides])


def test_stem_taken_where_the_config_net_needs_a_coarse_spacing_and_a_shrunk_patch():
    cfg, steps = _stem_cfg(), NetStep()
    plan = budget.plan_nets(cfg, steps, **BIG_NET)
    # the full-resolution net misses its field of view even at 4 mm; the stem net reaches 500 steps at 3 mm with 96^3
    # (2 mm: 128^3, 3.1 s/step, misses): configs/real_organs.yaml's hand-set recipe
    assert plan["stem"] and plan["strides"] == [2, 2, 2, 2, 2] and "stem" in plan["planned"]
    assert plan["spacing"] == [3.0] * 3 and plan["patch"] == [96] * 3 and plan["qualifies"]
    assert {r["net"] for r in plan["candidates"]} == {"config", "stem"}
    # the config's net reaches the steps only with a patch shrunk below the field of view, at 4 mm
    assert not [r for r in plan["candidates"] if r["net"] == "config" and r["role"] == "candidate" and r["qualifies"]]
    applied = _stem_cfg()
    budget.apply_plan(applied, plan)
    assert applied.model.strides == [2, 2, 2, 2, 2] and applied.data.patch_size == [96] * 3
    assert applied.model.train_at_stem and not _stem_cfg().model.train_at_stem
    assert "net: strided stem (model.strides [2, 2, 2, 2, 2])" in budget.describe(plan)


def test_stem_never_tried_when_the_config_net_reaches_the_finest_spacing():
    cfg, steps = _stem_cfg(), NetStep(per_96=0.001)  # a GPU
    plan = budget.plan_nets(cfg, steps, **BIG_NET)
    assert not plan["stem"] and "strides" not in plan and plan["spacing"] == [0.8] * 3
    assert not [c for c in steps.calls if c[0]]


def test_stem_taken_only_at_a_finer_spacing_and_off_when_asked():
    # full net: 3 mm 96^3 at 1 s (qualifies), 2 mm 128^3 at 2.4 s misses; stem (1/7): 2 mm 128^3 qualifies
    kw = dict(extent_mm=[300.0] * 3, target_spacing=[2.0, 2.0, 2.0], minutes=15.0, batch_size=2)
    plan = budget.plan_nets(_stem_cfg(), NetStep(per_96=1.0 / 7.0, full=7.0), **kw)
    assert plan["stem"] and plan["spacing"] == [2.0] * 3
    full_only = budget.plan_nets(_stem_cfg(), NetStep(per_96=1.0 / 7.0, full=7.0), **{**kw, "target_spacing": [3.0] * 3})
    assert not full_only["stem"] and full_only["spacing"] == [3.0] * 3  # finest already: nothing finer to try
    off = budget.plan_nets(_stem_cfg("data.budget_stem=off"), NetStep(per_96=1.0 / 7.0, full=7.0), **kw)
    assert not off["stem"] and off["spacing"] == [3.0] * 3 and {r["net"] for r in off["candidates"]} == {"config"}
    # a net that has a stem, a MONAI baseline and a 2.5D net are kept as they are
    assert budget.stem_model(_stem_cfg("model.strides=[2,2,2,2,2]")) is None
    assert budget.stem_model(_stem_cfg("model.arch=monai_unet")) is None
    assert budget.stem_model(_stem_cfg("model.slices=3")) is None
    assert budget.stem_model(_stem_cfg()).strides == [2, 2, 2, 2, 2]
    assert budget.stem_model(_stem_cfg()).train_at_stem  # timed as it will train: loss at the stem's resolution
    with pytest.raises(ConfigError, match="data.budget_stem"):
        check_config(load_config(None, ["data.budget_stem=maybe"]))


BIG_NET = dict(extent_mm=[300.0, 300.0, 300.0], target_spacing=[0.8, 0.8, 0.8], minutes=15.0, batch_size=2)


def test_train_takes_the_stem_and_inference_builds_it(phantoms, tmp_path, monkeypatch, one_thread):
    calls: list = []

    def factory(cfg, *, model_cfg=None, **kwargs):
        stem = (model_cfg or cfg.model).strides[0] != 1

        def step(patch):
            calls.append((stem, list(patch)))
            return math.prod(patch) * 1e-5 * (0.5 if stem else 8.0)
        return step

    monkeypatch.setattr(budget, "make_step_seconds", factory)
    out = tmp_path / "job"
    cfg = load_config("demo", [*FAST, "data.patch_size=null", "data.target_spacing=[3.0,3.0,3.0]", "train.max_minutes=1"])
    job = run_job(phantoms, out, cfg, progress=False)
    assert job["status"] == "finished" and any(c[0] for c in calls) and any(not c[0] for c in calls)
    plan = json.loads((out / "run" / "plans.json").read_text())["budget_plan"]
    assert plan["stem"] and plan["strides"] == [2, 2, 2] and plan["qualifies"]
    assert all(p % 8 == 0 for p in plan["patch"])  # the stem net's divisor
    run_cfg = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert run_cfg["model"]["strides"] == [2, 2, 2] and run_cfg["data"]["patch_size"] == plan["patch"]
    assert job["evaluation"] is not None  # Predictor.from_run built the stem net from the run's config


# --------------------------------------------------------------------------- the optimizer (rule 6)
def test_short_runs_train_adamw_wsd_instead_of_nnunet_sgd_poly():
    sgd = _stem_cfg()  # the variant configs' nnU-Net optimizer: SGD 0.01, poly
    assert (sgd.train.optimizer, sgd.train.scheduler) == ("sgd", "poly")
    plan = budget.plan_nets(sgd, NetStep(), **BIG_NET)  # a 2-core CPU: ~600 steps in 15 minutes
    assert plan["expected_steps"] < budget.SHORT_RUN_STEPS
    assert plan["recipe"] == {"optimizer": "adamw", "lr": 1e-3, "scheduler": "wsd"} and plan["planned"][-1] == "recipe"
    budget.apply_plan(sgd, plan)
    assert (sgd.train.optimizer, sgd.train.lr, sgd.train.scheduler) == ("adamw", 1e-3, "wsd")
    assert "optimizer: adamw lr 0.001, wsd schedule" in budget.describe(plan)

    # a fast GPU expects more steps than the threshold: nnU-Net's recipe stays
    gpu = _stem_cfg()
    fast = budget.plan_nets(gpu, NetStep(per_96=0.001), **BIG_NET)
    assert fast["expected_steps"] >= budget.SHORT_RUN_STEPS and fast["recipe"] is None and "recipe" not in fast["planned"]
    budget.apply_plan(gpu, fast)
    assert (gpu.train.optimizer, gpu.train.lr, gpu.train.scheduler) == ("sgd", 1e-2, "poly")

    # a config that chose its own optimizer or schedule keeps it; off keeps nnU-Net's
    for overrides in (["train.optimizer=adamw"], ["train.scheduler=cosine"], ["data.budget_recipe=off"]):
        cfg = _stem_cfg(*overrides)
        kept = budget.plan_nets(cfg, NetStep(), **BIG_NET)
        assert kept["recipe"] is None, overrides
        before = (cfg.train.optimizer, cfg.train.lr, cfg.train.scheduler)
        budget.apply_plan(cfg, kept)
        assert (cfg.train.optimizer, cfg.train.lr, cfg.train.scheduler) == before
    assert budget.short_run_recipe(_stem_cfg(), budget.SHORT_RUN_STEPS - 1) is not None
    assert budget.short_run_recipe(_stem_cfg(), budget.SHORT_RUN_STEPS) is None
    assert budget.short_run_recipe(_stem_cfg(), None) is None
    with pytest.raises(ConfigError, match="data.budget_recipe"):
        check_config(load_config(None, ["data.budget_recipe=maybe"]))


def test_a_resumed_run_keeps_its_recipe(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(budget, "make_step_seconds", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-planned")))
    cfg = load_config(None, ["train.max_minutes=15"])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.pt").write_bytes(b"")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"patch_size": [64, 48, 32]}}))
    saved = {"spacing": [3.0] * 3, "planned": ["patch", "recipe"], "expected_steps": 600,
             "recipe": {"optimizer": "adamw", "lr": 1e-3, "scheduler": "wsd"}}
    (tmp_path / "plans.json").write_text(json.dumps({"budget_plan": saved}))
    budget.plan_train_patch(cfg, {"target_spacing": [3.0] * 3}, tmp_path, SimpleNamespace(is_main=True, enabled=False))
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.scheduler) == ("adamw", 1e-3, "wsd")
    assert cfg.data.patch_size == [64, 48, 32]
