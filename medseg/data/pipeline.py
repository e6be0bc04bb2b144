"""Preprocess a whole dataset into the preprocessed folder (see docs/architecture.md).

``preprocess_dataset``: discover the cases -> fingerprint them (in parallel) -> plan ->
``plans.json``, ``dataset.json`` (the source's), ``splits.json`` -> preprocess every case in
worker processes. Per case ``cases/<case>_image.npy``, ``cases/<case>_label.npy`` and, written
last, ``cases/<case>.json`` (its properties): a case is complete exactly when its JSON exists,
so a re-run skips complete cases and a crash or Ctrl-C never leaves a half-written one (every
file goes through :func:`medseg.io.atomic_write`). A bad case is reported with its reason while
the others go on.

Empty labels (no foreground voxel) are accepted with a warning: such a case is a valid
negative example for training; its ``class_locations`` are empty.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.checks import check_case_name, safe_child
from medseg.data.datasets import Case, build_dataset_json, discover_cases
from medseg.data.fingerprint import compute_fingerprint
from medseg.data.parallel import run_parallel
from medseg.data.plan import make_plan, model_plan_args, plan_request
from medseg.data.preprocess import preprocess_volume
from medseg.data.splits import make_splits, read_splits, write_splits
from medseg.errors import ConfigError, InputError
from medseg.io import atomic_write, atomic_write_text, read_volume

__all__ = ["PreprocessReport", "case_file", "load_case", "load_plans", "load_props", "preprocess_dataset"]


@dataclass
class PreprocessReport:
    """The outcome of :func:`preprocess_dataset`."""

    out_dir: Path
    total: int
    done: list[str] = field(default_factory=list)  # preprocessed by this run
    skipped: list[str] = field(default_factory=list)  # complete from an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # case -> reason
    unexpected: list[str] = field(default_factory=list)  # failed cases whose error was not an InputError
    warnings: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    plans: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """A few human-readable lines: counts, plan, warnings, failures with their reasons."""
        n_ok = len(self.done) + len(self.skipped)
        lines = [f"preprocessed {n_ok} of {self.total} cases into {self.out_dir} "
                 f"({len(self.done)} new, {len(self.skipped)} already done, {len(self.failed)} failed) in {self.seconds:.1f} s"]
        p = self.plans
        if p:
            norm = p["normalization"] if isinstance(p["normalization"], dict) else p["normalization"][0]
            desc = (f"clip {norm['clip'][0]:.0f}..{norm['clip'][1]:.0f}, mean {norm['mean']:.1f}, std {norm['std']:.1f}"
                    if norm["scheme"] == "ct" else f"window {norm.get('window')}")
            lines.append(f"  target spacing {' x '.join(f'{v:.3g}' for v in p['target_spacing'])} mm, patch "
                         f"{' x '.join(str(v) for v in p['patch_size'])}, normalization {norm['scheme']} ({desc}), "
                         f"{p['num_classes']} classes" + (f" (+ ignore label {p['ignore_label']}, not trained on)"
                                                           if p.get("ignore_label") is not None else ""))
        for case, ws in sorted(self.warnings.items()):
            lines += [f"  warning: {case}: {w}" for w in ws]
        if self.failed:
            lines.append(f"  FAILED {len(self.failed)} case(s):")
            lines += [f"    {case}: {why}" for case, why in sorted(self.failed.items())]
        return "\n".join(lines)


def load_plans(pre_dir: str | Path) -> dict:
    """``plans.json`` of a preprocessed folder (or a run directory)."""
    p = Path(pre_dir) / "plans.json"
    if not p.is_file():
        raise InputError(f"{p}: file not found (run `medseg preprocess` first)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{p}: not valid JSON: {err}") from None


def case_file(cases_dir: str | Path, name: str, suffix: str) -> Path:
    """``cases_dir/<name><suffix>``, refusing a case name that would leave ``cases_dir``.

    Raises:
        InputError: ``name`` holds a path separator or ``..``.
    """
    check_case_name(name, cases_dir)
    return safe_child(cases_dir, f"{name}{suffix}")


def load_props(pre_dir: str | Path, name: str) -> dict:
    """The preprocessing properties of one case (``cases/<name>.json``: spacing, crop box, ``class_locations``,
    ``class_component_share``, ...) without opening its arrays.

    Raises:
        InputError: the case is not (completely) preprocessed, or its name is not a safe file name.
    """
    pj = case_file(Path(pre_dir) / "cases", name, ".json")
    if not pj.is_file():
        raise InputError(f"{pj}: case '{name}' is not (completely) preprocessed")
    return json.loads(pj.read_text())


def load_case(pre_dir: str | Path, name: str, *, mmap: bool = False) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """One preprocessed case: ``image (C, X, Y, Z) float32``, ``label (1, X, Y, Z) uint8 | None``, properties.

    ``mmap=True`` memory-maps the arrays (read-only) instead of loading them.

    Raises:
        InputError: the case is not (completely) preprocessed, or its name is not a safe file name.
    """
    cases = Path(pre_dir) / "cases"
    props = load_props(pre_dir, name)
    mode = "r" if mmap else None
    image = np.load(case_file(cases, name, "_image.npy"), mmap_mode=mode)
    lp = case_file(cases, name, "_label.npy")
    label = np.load(lp, mmap_mode=mode) if lp.is_file() else None
    return image, label, props


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        np.save(tmp, array)


def _preprocess_job(case: Case, plans: dict, cases_dir: Path) -> dict:
    images = [read_volume(p) for p in case.images]
    label = read_volume(case.label) if case.label is not None else None
    if label is not None and not np.any(label.array):
        warnings.warn(f"{case.label}: label is empty (no foreground voxel); kept as a negative example")
    image, lab, props = preprocess_volume(images if len(images) > 1 else images[0], plans, label, case=case.name)
    _save_npy(case_file(cases_dir, case.name, "_image.npy"), image)
    if lab is not None:
        _save_npy(case_file(cases_dir, case.name, "_label.npy"), lab)
    atomic_write_text(case_file(cases_dir, case.name, ".json"), json.dumps(props))  # last: marks the case complete
    return {"shape": props["shape"]}


def _plans_for(info, out: Path, cfg, *, workers: int, overwrite: bool, progress: bool,
               model_cfg=None) -> tuple[dict, dict, dict]:
    """Existing plans (when made with the same settings) or a new fingerprint + plan."""
    path = out / "plans.json"
    if path.is_file() and not overwrite:
        plans = load_plans(out)
        want = plan_request(cfg)
        if plans.get("data_config") != want:
            diff = {k: (plans.get("data_config", {}).get(k), v) for k, v in want.items() if plans.get("data_config", {}).get(k) != v}
            raise ConfigError(f"{path}: was planned with other data settings ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                              "pass --overwrite to redo the folder, or choose another --out")
        return plans, {}, {}
    fp = compute_fingerprint(info, workers=workers, progress=progress)
    plans = make_plan(fp, cfg, **model_plan_args(model_cfg))
    atomic_write_text(path, json.dumps(plans, indent=1))
    return plans, fp["failed"], fp["warnings"]


def _clear(out: Path) -> None:
    """Remove what an earlier run wrote (only our own files)."""
    for name in ("plans.json", "splits.json"):
        (out / name).unlink(missing_ok=True)
    cases = out / "cases"
    if cases.is_dir():
        for f in cases.iterdir():
            if f.is_file() and f.suffix in (".npy", ".json"):
                f.unlink()


def preprocess_dataset(data_dir: str | Path, out_dir: str | Path, *, workers: int = 1, data_cfg=None,
                       model_cfg=None, overwrite: bool = False, progress: bool = True) -> PreprocessReport:
    """Fingerprint, plan and preprocess every training case of ``data_dir`` into ``out_dir``.

    Args:
        data_dir: dataset folder (nnU-Net v2, Decathlon, or images/ + labels/).
        out_dir: the preprocessed folder (created).
        workers: worker processes (1 = in this process).
        data_cfg: :class:`medseg.config.DataConfig` (plan choices, folds, split seed); ``None`` = defaults.
        model_cfg: :class:`medseg.config.ModelConfig` the patch size is planned for (its total
            stride and first-stage width, :func:`medseg.data.plan.model_plan_args`); ``None`` =
            nnU-Net's reference (stride 16, 32 features).
        overwrite: redo everything (otherwise complete cases are skipped).

    Raises:
        InputError: the dataset cannot be discovered, or every case failed the fingerprint.
        ConfigError: ``out_dir`` holds a plan made with other settings (and not ``overwrite``).
    """
    from medseg.config import DataConfig

    t0 = time.time()
    cfg = data_cfg or DataConfig()
    info = discover_cases(data_dir)
    out = Path(out_dir)
    cases_dir = out / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear(out)
    for stale in cases_dir.glob(".*.tmp*"):  # left by a killed worker (kill -9)
        stale.unlink(missing_ok=True)
    plans, failed, warns = _plans_for(info, out, cfg, workers=workers, overwrite=overwrite, progress=progress,
                                      model_cfg=model_cfg)
    src = info.root / "dataset.json"
    atomic_write_text(out / "dataset.json", src.read_text() if src.is_file() else json.dumps(build_dataset_json(info), indent=1))

    report = PreprocessReport(out, len(info.cases), failed=dict(failed), warnings={k: list(v) for k, v in warns.items()}, plans=plans)
    jobs = []
    for case in info.cases:
        if case.name in report.failed:
            continue
        if case_file(cases_dir, case.name, ".json").is_file():
            report.skipped.append(case.name)
        else:
            jobs.append((case.name, (case, plans, cases_dir)))
    for res in run_parallel(_preprocess_job, jobs, workers=workers, desc="preprocess", progress=progress):
        if res.warnings:
            report.warnings.setdefault(res.key, []).extend(res.warnings)
        if res.ok:
            report.done.append(res.key)
        else:
            report.failed[res.key] = res.error
            if res.unexpected:
                report.unexpected.append(res.key)
    _update_splits(out / "splits.json", sorted(report.done + report.skipped), cfg)
    report.seconds = time.time() - t0
    return report


def _update_splits(path: Path, names: list[str], cfg) -> None:
    """(Re)write ``splits.json`` when the complete cases or the fold settings changed."""
    if not names:
        return
    if path.is_file():
        doc = read_splits(path)
        if sorted(doc.get("cases", [])) == names and doc.get("seed") == cfg.split_seed:
            return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folds = make_splits(names, cfg.num_folds, cfg.split_seed)
    write_splits(path, folds, seed=cfg.split_seed, case_names=names)
