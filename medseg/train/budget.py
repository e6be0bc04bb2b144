"""Plan spacing and patch for a training budget in minutes (``train.max_minutes``, ``data.budget_plan``).

nnU-Net's planner sizes the patch for GPU memory and days of training; under a budget of minutes
the number of optimizer steps is what runs out first. Measured on a 2-core CPU in fp32: with 15
minutes, held-out Dice was decent only after about 500 steps of batch 2, and a large physical field
of view mattered (``configs/real_organs.yaml``: 3 mm voxels, 96^3 patches = 29 cm cubes, strided
stem, ~1.3 s per step -> ~650 steps; the full-resolution 48^3 recipe saw much less context and did
worse). The rule, :func:`plan_for_budget`:

1. candidate spacings: nnU-Net's target spacing, then isotropic 1.5, 2, 3 and 4 mm, each only where
   it is not finer than the target on any axis (finest first);
2. patch per candidate: per axis ``min(ceil(fov_mm / spacing), median shape at that spacing)``
   (``data.budget_fov_mm``, default 250 mm), rounded up to the net's patch divisor (and, when a
   memory cap is given, shrunk to fit it);
3. a step's cost is measured (:func:`make_step_seconds`: forward + backward + optimizer step at the
   training batch size, device and precision); expected steps = ``minutes * 60 * 0.9 / step_s``
   (10 % is kept for validation and checkpoints);
4. the finest spacing whose expected steps reach ``data.budget_min_steps`` (default 500) wins;
   when none does, the coarsest spacing with its patch shrunk (volume halved per try, never below
   32 voxels per axis rounded to the divisor) until it does (or the smallest is reached).

5. the net (``data.budget_stem``, default ``auto``): when the config's net reaches the steps only
   at a coarser spacing than the finest candidate, or nowhere, the same net with a strided stem
   (``model.strides[0] = 2``: no conv at the input resolution, logits upsampled, ~1/8 of the FLOPs
   per voxel, trained at the stem's resolution, ``model.train_at_stem``: the net and training of
   ``configs/real_organs.yaml``) is planned over the finer spacings
   (all of them when the config's net reached none) and taken when it reaches the steps there;
   when neither net reaches them anywhere, the stem net (a wider view for the same time) is taken.
   A GPU that runs the config's net at the finest spacing never sees the stem. MONAI's baselines
   and 2.5D nets keep their net.
6. the optimizer (``data.budget_recipe``, default ``auto``): nnU-Net's Nesterov SGD at 0.01 with a
   poly schedule is tuned for ~250,000 steps; when the plan expects fewer than
   :data:`SHORT_RUN_STEPS` (10,000) and the config trains that recipe (``train.optimizer: sgd``,
   ``train.scheduler: poly``), the run trains with :data:`SHORT_RUN_RECIPE` instead: AdamW at 1e-3,
   the LR held for 80% of the steps and cooled down linearly over the rest (``wsd``), the recipe of
   ``configs/real_organs.yaml`` (measured there on 2 bf16 CPU cores, 15 min, gated net, 2 seeds:
   AdamW 1e-3 against 1e-2 raised the test liver from 0.835 / 0.851 to 0.904 / 0.908 and let the
   gates localise; wsd against cosine let seed 1 learn spleen and kidney). A config that chose
   another optimizer or schedule keeps it; ``off`` never changes it. The threshold is a rule of
   thumb: the recipe was measured at ~1,200 steps, not at 10,000.

Explicit settings win: ``data.target_spacing`` fixes the spacing (only the patch is planned, as
``medseg train`` does at the preprocessed spacing); ``data.patch_size`` fixes the patch, and since
the step cost then does not depend on the spacing, the spacing stays nnU-Net's (the finest).

Step cost grows with the patch volume and finer spacings have larger patches, so the candidates are
measured from the coarsest up, stopping at the first that misses; a patch whose cost, extrapolated
linearly in voxels from the nearest measured one, exceeds ``TIME_GUARD`` times the allowed step is
not run (its row says ``timed: false``); a small probe patch is measured first for that.

Validated once (2-core AMD EPYC, fp32, idle, ``OMP_NUM_THREADS=2``): ``medseg run --minutes 15`` on
``../shared/data/real_ct/organs`` with the study's attention-gated config and spacing, patch and
strides left unset picked 3 mm, 96^3 and the strided stem (1.31 s/step -> 619 expected, 600 run),
the hand-set ``configs/real_organs.yaml`` recipe, and scored liver 0.75 / spleen 0 on the test CT
(the hand-set recipe: 0.77 / 0.29, 0.80 / 0, 0.80 / 0 in three runs). On a busy machine ``medseg
run`` uses fewer threads (``use_idle_cores``) and the plan follows: smaller patches.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medseg.errors import ConfigError
from medseg.runtime import get_logger

__all__ = ["CANDIDATE_SPACINGS_MM", "MIN_PATCH", "SAFETY", "SHORT_RUN_RECIPE", "SHORT_RUN_STEPS", "TIME_GUARD",
           "apply_plan", "budget_applies", "candidate_spacings", "describe", "fov_patch", "job_plan_applies",
           "make_step_seconds", "median_extent_mm", "plan_for_budget", "plan_job", "plan_nets", "plan_train_patch",
           "short_run_recipe", "stem_model"]

log = get_logger("medseg.budget")

CANDIDATE_SPACINGS_MM = (1.5, 2.0, 3.0, 4.0)  # isotropic candidates after nnU-Net's target spacing
SAFETY = 0.9  # share of the budget spent on steps (the rest: validation, checkpoints)
MIN_PATCH = 32  # voxels per axis a shrunk patch keeps (rounded up to the divisor)
TIME_GUARD = 2.0  # a patch predicted slower than this many allowed steps is not timed
SHORT_RUN_STEPS = 10_000  # rule 6: below this many expected steps nnU-Net's SGD + poly gives way to SHORT_RUN_RECIPE
SHORT_RUN_RECIPE = {"optimizer": "adamw", "lr": 1e-3, "scheduler": "wsd"}  # configs/real_organs.yaml's

StepSeconds = Callable[[Sequence[int]], float]


# --------------------------------------------------------------------------- settings
def budget_applies(cfg) -> bool:
    """Whether the budget planner is on for a config: ``data.budget_plan`` ``"auto"`` (or YAML's
    ``on``, read as true) and ``train.max_minutes`` set."""
    return cfg.data.budget_plan in ("auto", True) and cfg.train.max_minutes is not None


def job_plan_applies(cfg) -> bool:
    """Whether ``medseg run`` plans spacing and patch before preprocessing: the budget applies and
    neither ``data.target_spacing`` nor ``data.patch_size`` is set (with the spacing set, training
    plans the patch; with the patch set, the spacing stays nnU-Net's)."""
    return budget_applies(cfg) and cfg.data.target_spacing is None and cfg.data.patch_size is None


# --------------------------------------------------------------------------- the rule (pure)
def median_extent_mm(shapes: Sequence[Sequence[float]], spacings: Sequence[Sequence[float]]) -> list[float]:
    """Per-axis median physical extent ``shape * spacing`` (mm) of the cases, ``[x, y, z]``."""
    ext = np.asarray(shapes, dtype=np.float64) * np.asarray(spacings, dtype=np.float64)
    return [float(v) for v in np.median(ext, axis=0)]


def candidate_spacings(target: Sequence[float]) -> list[list[float]]:
    """``target``, then the isotropic :data:`CANDIDATE_SPACINGS_MM` not finer than it on any axis
    (and not equal to it), finest first."""
    tgt = [float(v) for v in target]
    out = [tgt]
    for s in CANDIDATE_SPACINGS_MM:
        iso = [float(s)] * 3
        if all(s >= t - 1e-6 for t in tgt) and not np.allclose(iso, tgt):
            out.append(iso)
    return out


def _round_up(v: float, d: int) -> int:
    return max(int(d), int(math.ceil(v / d - 1e-9)) * int(d))


def _round_near(v: float, d: int) -> int:
    return max(int(d), int(math.floor(v / d + 0.5)) * int(d))


def _div3(divisor) -> list[int]:
    return [int(v) for v in np.broadcast_to(np.asarray(divisor, dtype=np.int64), (3,))]


def fov_patch(extent_mm: Sequence[float], spacing: Sequence[float], fov_mm: float, divisor) -> list[int]:
    """Per axis ``min(ceil(fov_mm / spacing), extent / spacing)`` rounded up to the divisor (int or per axis)."""
    div = _div3(divisor)
    return [_round_up(min(math.ceil(fov_mm / s - 1e-9), e / s), d) for e, s, d in zip(extent_mm, spacing, div)]


def _cap_voxels(patch: list[int], max_voxels: float | None, div: list[int], floor: list[int]) -> list[int]:
    """``patch`` shrunk (largest axis first, one divisor at a time) to at most ``max_voxels``."""
    p = list(patch)
    if not max_voxels:
        return p
    while math.prod(p) > max_voxels:
        room = [i for i in range(3) if p[i] - div[i] >= floor[i]]
        if not room:
            break
        i = max(room, key=lambda j: p[j])
        p[i] -= div[i]
    return p


def plan_for_budget(*, extent_mm: Sequence[float], target_spacing: Sequence[float], minutes: float,
                    step_seconds: StepSeconds, divisor, batch_size: int = 2, min_steps: int = 500,
                    fov_mm: float = 250.0, spacing: Sequence[float] | None = None,
                    patch: Sequence[int] | None = None, max_voxels: float | None = None,
                    spacings: Sequence[Sequence[float]] | None = None) -> dict:
    """Spacing and patch for ``minutes`` of training (the rule of the module docstring).

    Args:
        extent_mm: the dataset's median physical extent per axis (:func:`median_extent_mm`).
        target_spacing: nnU-Net's target spacing (mm, x y z): the finest candidate.
        minutes: the training budget (``train.max_minutes``).
        step_seconds: seconds of one training step for a patch ``[x, y, z]`` (:func:`make_step_seconds`);
            called once per distinct patch; may raise ``RuntimeError`` / ``ValueError`` /
            ``MemoryError`` (out of memory, too small for the net: the patch then misses).
        divisor: the net's patch divisor (int or per axis; :func:`medseg.nn.factory.patch_geometry`).
        batch_size: samples per step (recorded; ``step_seconds`` is measured at it).
        min_steps: optimizer steps the budget must allow (``data.budget_min_steps``).
        fov_mm: the physical field of view a patch aims at (``data.budget_fov_mm``).
        spacing: a fixed spacing (explicit ``data.target_spacing`` or the preprocessed one): only
            the patch is planned.
        patch: a fixed patch (explicit ``data.patch_size``): nothing is shrunk and the spacing is
            the finest candidate (the step cost does not depend on it).
        max_voxels: a memory cap on the patch's voxels (``None``: none).
        spacings: the candidate spacings, finest first (default :func:`candidate_spacings` of
            ``target_spacing``); ignored when ``spacing`` or ``patch`` is given.

    Returns:
        ``{"spacing", "patch", "step_s", "expected_steps", "qualifies", "planned" (the parts
        chosen here: "spacing", "patch"), "minutes", "min_steps", "fov_mm", "batch_size",
        "divisor", "allowed_step_s", "target_spacing", "extent_mm", "candidates"}``; each row of
        ``candidates`` (in the order tried) is ``{"role" (probe | candidate | shrunk), "spacing",
        "patch", "step_s", "expected_steps", "qualifies", "timed"}`` (``timed`` false: the cost
        was extrapolated, not measured).

    Raises:
        ConfigError: ``minutes``, ``min_steps`` or ``fov_mm`` not positive (the message names the key).
    """
    for key, value, ok in (("train.max_minutes", minutes, minutes > 0), ("data.budget_min_steps", min_steps, min_steps >= 1),
                           ("data.budget_fov_mm", fov_mm, fov_mm > 0)):
        if not ok:
            raise ConfigError(f"{key}: must be positive for the budget plan, got {value!r}")
    div = _div3(divisor)
    budget_s = float(minutes) * 60.0 * SAFETY
    allowed = budget_s / float(min_steps)
    fixed_patch = [int(v) for v in patch] if patch is not None else None
    if spacing is not None:
        spacings = [[float(v) for v in spacing]]
    elif fixed_patch is not None:
        spacings = [[float(v) for v in target_spacing]]
    else:
        spacings = [[float(v) for v in sp] for sp in spacings] if spacings else candidate_spacings(target_spacing)
    floor_of = lambda p: [min(v, _round_up(MIN_PATCH, d)) for v, d in zip(p, div)]  # noqa: E731
    patches = []
    for sp in spacings:
        p = fixed_patch or fov_patch(extent_mm, sp, fov_mm, div)
        patches.append(p if fixed_patch else _cap_voxels(p, max_voxels, div, floor_of(p)))

    measured: dict[tuple, float] = {}
    rows: list[dict] = []

    def predict(p) -> float | None:
        ok = [(q, s) for q, s in measured.items() if math.isfinite(s)]
        if not ok:
            return None
        below = [(q, s) for q, s in ok if math.prod(q) <= math.prod(p)]
        q, s = max(below, key=lambda qs: math.prod(qs[0])) if below else min(ok, key=lambda qs: math.prod(qs[0]))
        return s * math.prod(p) / math.prod(q)

    def measure(p, sp, role: str) -> dict:
        key = tuple(int(v) for v in p)
        timed = True
        if key in measured:
            s = measured[key]
        else:
            guess = predict(key)
            if guess is not None and guess > TIME_GUARD * allowed:
                s, timed = guess, False
            else:
                try:
                    s = float(step_seconds(list(key)))
                except (RuntimeError, ValueError, MemoryError) as err:  # out of memory; too small for the net
                    if isinstance(err, ConfigError):  # a bad model / train setting is the user's to fix
                        raise
                    log.warning("budget plan: a step of patch %s failed (%s); counted as too slow", list(key),
                                str(err).splitlines()[0] if str(err) else type(err).__name__)
                    s = math.inf
                measured[key] = s
        steps = int(budget_s / s) if s > 0 and math.isfinite(s) else 0
        row = {"role": role, "spacing": list(sp), "patch": list(key), "step_s": round(s, 4) if math.isfinite(s) else None,
               "expected_steps": steps, "qualifies": steps >= min_steps, "timed": timed}
        rows.append(row)
        return row

    if fixed_patch is None:  # a small probe first: what the larger patches' costs are extrapolated from
        # (2 divisors per axis at least: a 1-voxel bottleneck cannot be instance-normalised in training)
        probe = [min(p, max(f, 2 * d)) for p, f, d in zip(patches[-1], floor_of(patches[-1]), div)]
        if probe != patches[-1]:
            measure(probe, spacings[-1], "probe")
    chosen = None
    for sp, p in reversed(list(zip(spacings, patches))):  # coarsest first: stop at the first that misses
        row = measure(p, sp, "candidate")
        if not row["qualifies"]:
            break
        chosen = row
    if chosen is None and fixed_patch is None:  # shrink the coarsest candidate's patch
        base, sp = patches[-1], spacings[-1]
        floor, last, k = floor_of(base), list(base), 1
        while last != floor and k < 64:
            f = 2.0 ** (-k / 3.0)
            k += 1
            p = [max(fl, _round_near(b * f, d)) for b, fl, d in zip(base, floor, div)]
            if p == last:
                continue
            last = p
            row = measure(p, sp, "shrunk")
            if row["qualifies"]:
                chosen = row
                break
    if chosen is None:  # nothing reaches min_steps: the smallest patch that ran
        chosen = next((r for r in reversed(rows) if r["timed"] and r["step_s"] is not None), rows[-1])
    planned = ([] if spacing is not None or fixed_patch is not None else ["spacing"]) + ([] if fixed_patch else ["patch"])
    return {"spacing": chosen["spacing"], "patch": chosen["patch"], "step_s": chosen["step_s"],
            "expected_steps": chosen["expected_steps"], "qualifies": chosen["qualifies"], "planned": planned,
            "minutes": float(minutes), "min_steps": int(min_steps), "fov_mm": float(fov_mm),
            "batch_size": int(batch_size), "divisor": div, "allowed_step_s": round(allowed, 4),
            "target_spacing": [float(v) for v in target_spacing], "extent_mm": [round(float(v), 1) for v in extent_mm],
            "candidates": rows}


def describe(plan: dict) -> str:
    """One log line: the choice, the rule's numbers and the candidates tried."""
    fmt = lambda v: " x ".join(f"{x:.3g}" for x in v)  # noqa: E731
    tried = "; ".join(
        f"{r['role']}{' (stem)' if r.get('net') == 'stem' else ''} {fmt(r['spacing'])} mm {'x'.join(map(str, r['patch']))}: "
        + (f"{r['step_s']:.2f} s" if r["step_s"] is not None else "failed")
        + ("" if r["timed"] else " (extrapolated)") + f" -> {r['expected_steps']}"
        for r in plan["candidates"])
    miss = "" if plan["qualifies"] else f" (fewer than {plan['min_steps']}: nothing tried reaches it)"
    net = f"net: strided stem (model.strides {plan['strides']}), trained at its resolution; " if plan.get("stem") else ""
    if plan.get("recipe"):
        r = plan["recipe"]
        net += (f"optimizer: {r['optimizer']} lr {r['lr']:g}, {r['scheduler']} schedule (fewer than {SHORT_RUN_STEPS:,} "
                "steps: nnU-Net's SGD + poly is tuned for ~250,000); ")
    return (f"budget plan ({plan['minutes']:g} min, >= {plan['min_steps']} steps of batch {plan['batch_size']}, "
            f"field of view {plan['fov_mm']:g} mm): spacing {fmt(plan['spacing'])} mm, patch "
            f"{'x'.join(map(str, plan['patch']))}, {plan['step_s'] if plan['step_s'] is not None else float('nan'):.2f} "
            f"s/step -> ~{plan['expected_steps']} steps{miss}; {net}planned: {', '.join(plan['planned']) or 'nothing'}; "
            f"tried: {tried}")


# --------------------------------------------------------------------------- measuring a step
def make_step_seconds(cfg, *, in_channels: int, num_classes: int, spacing: Sequence[float] | None = None,
                      device=None, warmup: int = 2, steps: int = 3, model_cfg=None) -> StepSeconds:
    """A ``step_seconds(patch) -> float`` that times training steps of ``cfg``'s model.

    The model is built from ``model_cfg`` (default ``cfg.model``; :func:`medseg.nn.build_model`) on the
    training device (``cfg.train.device``, or ``device``) with training's precision
    (:func:`medseg.runtime.resolve_precision`) and memory format, and each call runs ``warmup`` +
    ``steps`` of training's own step (forward under autocast, loss, backward, clipping, optimizer
    step) on random input of
    ``cfg.train.batch_size x in_channels x patch`` (plus a 2.5D net's z halo); returns the median
    seconds of the timed steps (one step slowed by the machine does not decide the plan; on 2 cores
    a first timed step after one warm-up measured up to 1.6x the steady cost). Results are cached
    per patch; the global RNG is left untouched.
    """
    import torch

    from medseg.nn import build_model
    from medseg.nn.slice25d import z_halo
    from medseg.runtime import resolve_channels_last, resolve_device, resolve_precision
    from medseg.train.losses import build_loss
    from medseg.train.optim import build_optimizer

    dev = torch.device(device) if device is not None else resolve_device(cfg.train.device)
    amp = resolve_precision(cfg.train.precision, dev)
    cache: dict[tuple, float] = {}
    state: dict = {}

    def setup():
        from types import SimpleNamespace

        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            model = build_model(model_cfg or cfg.model, in_channels=in_channels, num_classes=num_classes, spacing=spacing).to(dev)
        if resolve_channels_last(cfg.train.channels_last, dev, model):  # training's switch, resolved as medseg.train.setup does
            model = model.to(memory_format=torch.channels_last_3d)
        opt = build_optimizer(model, cfg.train)
        state["ctx"] = SimpleNamespace(
            info=SimpleNamespace(device=dev), cfg=cfg, optimizer=opt, ddp=model, model=model, amp_dtype=amp,
            scheduler=SimpleNamespace(step=lambda: None),
            scaler=torch.amp.GradScaler(dev.type, enabled=amp == torch.float16),
            loss_fn=build_loss(cfg.train, z_halo=z_halo(model)).to(dev))
        state["halo"] = z_halo(model)

    def step_seconds(patch: Sequence[int]) -> float:
        from medseg.train.engine import train_step  # training's own step, so the cost is the one training pays

        key = tuple(int(v) for v in patch)
        if key in cache:
            return cache[key]
        if not state:
            setup()
        ctx, halo = state["ctx"], state["halo"]
        g = torch.Generator().manual_seed(0)
        shape = (cfg.train.batch_size, 1, key[0], key[1], key[2] + 2 * halo)
        batch = {"image": torch.randn((shape[0], in_channels) + shape[2:], generator=g),
                 "label": torch.randint(0, max(num_classes, 1), shape, generator=g, dtype=torch.uint8)}
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        times = []
        for i in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            train_step(ctx, batch)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        ctx.optimizer.zero_grad(set_to_none=True)
        cache[key] = float(np.median(times))
        return cache[key]

    return step_seconds


def _max_voxels(cfg, model_cfg) -> float:
    """The memory cap of :func:`medseg.data.plan.suggest_patch_size` for the net ``model_cfg`` at ``cfg``'s batch size."""
    from medseg.data.plan import max_patch_voxels, model_plan_args

    return max_patch_voxels(cfg.data.memory_budget_gb, cfg.train.batch_size, model_plan_args(model_cfg)["features"])


def stem_model(cfg):
    """``cfg.model`` with a strided stem (``strides[0] = 2``), or ``None`` where the plan keeps the
    config's net: ``data.budget_stem`` off, a stem already there, MONAI's baselines, 2.5D or 2-D nets."""
    import dataclasses

    from medseg.nn.factory import is_slice_stack, patch_geometry

    m = cfg.model
    if cfg.data.budget_stem not in ("auto", True) or str(m.arch).startswith("monai_") or m.spatial_dims != 3:
        return None
    if is_slice_stack(m):
        return None
    if any(v > 1 for v in patch_geometry(m)["stem"]):
        return None
    strides = list(m.strides) if m.strides is not None else [1] + [2] * (len(m.channels) - 1)
    return dataclasses.replace(m, strides=[2] + strides[1:], train_at_stem=True)


def short_run_recipe(cfg, expected_steps: int | None) -> dict | None:
    """Rule 6: :data:`SHORT_RUN_RECIPE` (``{optimizer, lr, scheduler}``) when ``data.budget_recipe`` is
    ``auto``, the config trains nnU-Net's SGD + poly and fewer than :data:`SHORT_RUN_STEPS` steps are
    expected; else ``None`` (the config's own optimizer and schedule)."""
    if cfg.data.budget_recipe not in ("auto", True) or expected_steps is None or expected_steps >= SHORT_RUN_STEPS:
        return None
    if (cfg.train.optimizer, cfg.train.scheduler) != ("sgd", "poly"):
        return None
    return dict(SHORT_RUN_RECIPE)


def plan_nets(cfg, step_for: Callable, **kw) -> dict:
    """:func:`plan_for_budget` for the config's net and, where rule 5 of the module docstring calls
    for it, for the same net with a strided stem (:func:`stem_model`); returns the chosen plan with
    ``stem`` (bool), ``strides`` (the stem net's ``model.strides``, when chosen; ``planned`` then
    also lists ``"stem"``), the candidates of both (``net``: ``config`` | ``stem``) and ``recipe``
    (rule 6, :func:`short_run_recipe`: the optimizer settings to train with, or ``None``; ``planned``
    then also lists ``"recipe"``).

    ``step_for(model_cfg)`` gives the step-seconds function of a net; ``kw`` are
    :func:`plan_for_budget`'s other arguments but ``divisor``, ``max_voxels`` and ``spacings``.
    """
    plan = _plan_nets(cfg, step_for, **kw)
    plan["recipe"] = short_run_recipe(cfg, plan.get("expected_steps"))
    if plan["recipe"]:
        plan["planned"] = [*plan["planned"], "recipe"]
    return plan


def _plan_nets(cfg, step_for: Callable, **kw) -> dict:
    from medseg.nn.factory import patch_geometry

    def plan(model_cfg, spacings=None) -> dict:
        return plan_for_budget(step_seconds=step_for(model_cfg), divisor=patch_geometry(model_cfg)["divisor"],
                               max_voxels=_max_voxels(cfg, model_cfg), spacings=spacings, **kw)

    full = plan(cfg.model)
    tagged = lambda p, net: [dict(r, net=net) for r in p["candidates"]]  # noqa: E731
    out = {**full, "stem": False, "candidates": tagged(full, "config")}
    stem_cfg = stem_model(cfg)
    if stem_cfg is None or kw.get("patch") is not None:
        return out
    cands = [list(map(float, kw["spacing"]))] if kw.get("spacing") is not None else candidate_spacings(kw["target_spacing"])
    at = next((i for i, c in enumerate(cands) if np.allclose(c, full["spacing"])), len(cands))
    finer = cands[:at] if full["qualifies"] else cands
    if not finer:  # the config's net reaches the steps at the finest spacing
        return out
    stem = plan(stem_cfg, spacings=finer)
    use = stem["qualifies"] or not full["qualifies"]
    chosen = {**(stem if use else full), "stem": use, "candidates": out["candidates"] + tagged(stem, "stem")}
    if use:
        chosen["strides"] = [v if isinstance(v, int) else list(v) for v in stem_cfg.strides]
        chosen["planned"] = [*stem["planned"], "stem"]
    return chosen


# --------------------------------------------------------------------------- hooks
def apply_plan(cfg, plan: dict) -> None:
    """Write a plan's chosen parts into ``cfg`` (``data.target_spacing``, ``data.patch_size``,
    ``model.strides`` and ``model.train_at_stem`` when it chose the strided stem, ``train.optimizer`` / ``lr`` / ``scheduler``
    when it chose the short-run recipe)."""
    if "stem" in plan["planned"]:
        cfg.model.strides, cfg.model.train_at_stem = list(plan["strides"]), True
    if "spacing" in plan["planned"]:
        cfg.data.target_spacing = [float(v) for v in plan["spacing"]]
    if "patch" in plan["planned"]:
        cfg.data.patch_size = [int(v) for v in plan["patch"]]
    if "recipe" in plan["planned"] and plan.get("recipe"):
        r = plan["recipe"]
        cfg.train.optimizer, cfg.train.lr, cfg.train.scheduler = str(r["optimizer"]), float(r["lr"]), str(r["scheduler"])


def plan_job(cfg, data_dir: str | Path, *, workers: int = 1, progress: bool = True) -> dict:
    """``medseg run``'s plan: fingerprint the dataset, plan spacing and patch for ``cfg.train.max_minutes``,
    write them into ``cfg.data`` and log the choice; returns the plan (:func:`plan_for_budget`).
    The fingerprint is computed here and again by preprocessing (which has no way to be handed one):
    one extra read of the training images.

    Raises:
        InputError: the dataset cannot be discovered or every case fails the fingerprint.
    """
    from medseg.data.datasets import discover_cases, num_classes_of
    from medseg.data.fingerprint import compute_fingerprint
    from medseg.data.plan import target_spacing_nnunet

    fp = compute_fingerprint(discover_cases(data_dir), workers=workers, progress=progress)
    target = target_spacing_nnunet(fp["spacings"], fp["shapes_after_crop"])
    step_for = lambda m: make_step_seconds(  # noqa: E731
        cfg, in_channels=len(fp.get("channel_names") or {}) or cfg.model.in_channels,
        num_classes=num_classes_of(fp.get("labels") or {}), spacing=target, model_cfg=m)
    plan = plan_nets(cfg, step_for, extent_mm=median_extent_mm(fp["shapes_after_crop"], fp["spacings"]),
                     target_spacing=target, minutes=cfg.train.max_minutes, batch_size=cfg.train.batch_size,
                     min_steps=cfg.data.budget_min_steps, fov_mm=cfg.data.budget_fov_mm)
    apply_plan(cfg, plan)
    log.info(describe(plan))
    return plan


def plan_train_patch(cfg, plans: dict, run_dir: str | Path, info) -> dict | None:
    """``medseg train``'s plan: the patch (and the net, rule 5) at the preprocessed spacing for
    ``cfg.train.max_minutes``, made before the net is built.

    Applies when the budget does (:func:`budget_applies`) and ``data.patch_size`` is unset; sets
    ``cfg.data.patch_size`` (and ``cfg.model.strides`` when the plan chose the strided stem) and
    returns the plan (``None`` when it does not apply). A run being
    resumed (``run_dir`` holds ``checkpoints/latest.pt`` and ``config.yaml``) keeps the patch it
    was trained with. Under DDP rank 0 measures and the others take its plan.
    """
    if not budget_applies(cfg) or cfg.data.patch_size is not None:
        return None
    run_dir = Path(run_dir)
    plan = None
    if info.is_main:
        plan = _resumed_plan(run_dir)
        if plan is None:
            spacing = [float(v) for v in plans["target_spacing"]]
            step_for = lambda m: make_step_seconds(  # noqa: E731
                cfg, in_channels=len(plans.get("channel_names") or {}) or cfg.model.in_channels,
                num_classes=int(plans["num_classes"]), spacing=spacing, device=info.device, model_cfg=m)
            extent = [float(m) * s for m, s in zip(plans["median_shape"], spacing)]
            plan = plan_nets(cfg, step_for, extent_mm=extent, target_spacing=spacing, spacing=spacing,
                             minutes=cfg.train.max_minutes, batch_size=cfg.train.batch_size,
                             min_steps=cfg.data.budget_min_steps, fov_mm=cfg.data.budget_fov_mm)
            log.info(describe(plan))
    if getattr(info, "enabled", False):
        from medseg.train.distributed import all_gather_objects

        plan = all_gather_objects(plan, info)[0]
    apply_plan(cfg, plan)
    return plan


def _resumed_plan(run_dir: Path) -> dict | None:
    """The patch a run being resumed was trained with (its ``config.yaml``), as a plan; ``None`` for a new run."""
    import json

    import yaml

    conf = run_dir / "config.yaml"
    if not ((run_dir / "checkpoints" / "latest.pt").is_file() and conf.is_file()):
        return None
    patch = ((yaml.safe_load(conf.read_text()) or {}).get("data") or {}).get("patch_size")
    if not patch:
        return None
    saved = {}
    if (run_dir / "plans.json").is_file():
        saved = json.loads((run_dir / "plans.json").read_text()).get("budget_plan") or {}
    log.info("budget plan: resumed run keeps its patch %s", "x".join(map(str, patch)))
    return {"planned": ["patch"], **saved, "patch": [int(v) for v in patch], "resumed": True}
