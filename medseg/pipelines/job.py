"""The whole job on a dataset: preprocess -> train -> infer on ``imagesTs`` -> evaluate against ``labelsTs``.

``run_job(data_dir, out_dir, cfg)`` (``medseg run``) writes, under ``out_dir``::

    job.json       the job's record: dataset, resolved config, each finished step (time, seconds) and,
                   under ``--minutes``, the budget plan (:mod:`medseg.train.budget`: spacing and patch
                   chosen for the budget before preprocessing, when the config leaves them unset)
    preprocessed/  plans.json, splits.json, cases/                  (medseg preprocess)
    run/           config.yaml, plans.json, checkpoints/, tensorboard/, log.txt, validation/   (medseg train)
    predictions/   masks of imagesTs in each input's own geometry, predict_args.json          (medseg infer)
    evaluation/    summary.json + summary.csv against labelsTs, dataset.json's scored_labels honoured
                   (medseg evaluate)

Resumable step by step, as nnU-Net's commands are: a step recorded as finished in ``job.json`` is
not redone; an interrupted training continues from ``run/checkpoints/latest.pt``; an interrupted
inference skips the cases already written (writes are atomic). A second call with other settings
(config, overrides, dataset) is refused with the keys that differ, rather than mixing two recipes
in one folder. Without ``imagesTs`` the job ends after training; without ``labelsTs`` after
inference. ``medseg demo`` is this job on a generated phantom dataset.

Each step is the library function behind its command (``preprocess_dataset``,
:func:`medseg.train.train`, ``Predictor`` + ``run_inference``, ``evaluate_folders``).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from medseg.config import Config, config_to_dict, load_config
from medseg.errors import ConfigError, InputError
from medseg.runtime import get_logger

__all__ = ["JOB_RECORD", "STEPS", "config_differences", "load_job_config", "run_job"]

STEPS = ("preprocess", "train", "infer", "evaluate")
JOB_RECORD = "job.json"
log = get_logger("medseg.run")


def load_job_config(config: str | Path | None, overrides: list[str] | None, minutes: float | None) -> Config:
    """The config of a job (``medseg run`` / ``medseg demo``): a file or a shipped config's name (``None``:
    the defaults), the overrides, and ``--minutes`` as ``train.max_minutes``.

    Raises:
        ConfigError: a bad config or override, or ``minutes <= 0``.
    """
    cfg = load_config(config, overrides)
    if minutes is not None:
        if minutes <= 0:
            raise ConfigError(f"--minutes: must be > 0, got {minutes}")
        cfg.train.max_minutes = float(minutes)
    return cfg


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings (``"model.channels: [8, 16] -> [16, 32]"``)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _job_config(cfg: Config) -> dict:
    data = config_to_dict(cfg)
    data["data"].pop("preprocessed", None)  # the job's own folder, set by run_job
    data["data"].pop("dataset", None)  # recorded as the job's dataset
    return data


def _open_record(out: Path, data_dir: Path, cfg: Config) -> dict:
    """The job's record, new or continued; refuses a folder made with another dataset or config.

    A continued job whose record holds a budget plan (``budget_plan``) gets that plan's spacing and
    patch written into ``cfg`` first (when the budget would plan them), so that the same call
    compares equal and the job goes on with the recipe it started with."""
    from medseg.train import budget

    path = out / JOB_RECORD
    if not path.is_file():
        return {"dataset": str(data_dir.resolve()), "config": _job_config(cfg), "steps": {}}
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable job record ({err}); delete it (and the folder) to start over") from None
    if record.get("dataset") != str(data_dir.resolve()):
        raise ConfigError(f"{out}: holds a job on {record.get('dataset')}, not {data_dir.resolve()}; "
                          "choose another --out")
    if record.get("budget_plan") and budget.job_plan_applies(cfg):
        budget.apply_plan(cfg, record["budget_plan"])
    diff = config_differences(record.get("config", {}), _job_config(cfg))
    if diff:
        raise ConfigError(f"{out}: holds a job made with other settings ({'; '.join(diff[:5])}"
                          f"{'; ...' if len(diff) > 5 else ''}); choose another --out, or delete the folder to redo it")
    return record


def _write_record(record: dict, out: Path) -> None:
    from medseg.io import atomic_write_text

    atomic_write_text(out / JOB_RECORD, json.dumps(record, indent=2) + "\n")


def _finish(record: dict, out: Path, step: str, seconds: float) -> None:
    record["steps"][step] = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "seconds": round(seconds, 1)}
    _write_record(record, out)


def _skip(record: dict, step: str) -> bool:
    if step in record["steps"]:
        log.info("%s: finished earlier (%s), not redone", step, record["steps"][step]["finished"])
        return True
    return False


def run_job(data_dir: str | Path, out_dir: str | Path, cfg: Config, *, workers: int = 1,
            progress: bool = True) -> dict:
    """Run (or continue) the whole job of ``data_dir`` into ``out_dir`` (see the module docstring).

    Args:
        data_dir: the dataset (nnU-Net v2 layout with dataset.json + imagesTr/labelsTr, optional
            imagesTs/labelsTs; or Decathlon; or images/ + labels/, which has no test set).
        out_dir: the job's folder (created).
        cfg: the resolved config (``data.preprocessed`` is set to ``out_dir/preprocessed``).
        workers: worker processes for preprocessing and evaluation.
        progress: progress bars.

    Returns:
        ``{"status": "finished" | "interrupted", "signal", "run_dir", "out_dir", "steps_run",
        "timings_s", "predictions" (folder or None), "evaluation" (summary dict or None)}``.

    Raises:
        InputError: the dataset cannot be read, or preprocessing failed for some case.
        ConfigError: ``out_dir`` holds a job made with another dataset or other settings.
    """
    from medseg.train import budget
    from medseg.data.pipeline import preprocess_dataset

    data, out = Path(data_dir), Path(out_dir)
    if not data.is_dir():
        raise InputError(f"{data}: dataset folder not found")
    record = _open_record(out, data, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if budget.job_plan_applies(cfg):  # under --minutes: spacing and patch for the budget, recorded before preprocessing
        record["budget_plan"] = budget.plan_job(cfg, data, workers=workers, progress=progress)
        record["config"] = _job_config(cfg)
        _write_record(record, out)
    cfg.data.dataset, cfg.data.preprocessed = str(data), str(out / "preprocessed")
    result: dict = {"status": "finished", "signal": None, "run_dir": str(out / "run"), "out_dir": str(out),
                    "steps_run": [], "timings_s": {}, "predictions": None, "evaluation": None}

    def step(name: str, fn) -> bool:
        """Run ``fn`` unless finished earlier; False when it stopped the job (an interrupted training)."""
        if _skip(record, name):
            return True
        t0 = time.perf_counter()
        log.info("%s ...", name)
        if fn() is False:
            return False
        seconds = time.perf_counter() - t0
        result["steps_run"].append(name)
        result["timings_s"][name] = seconds
        _finish(record, out, name, seconds)
        return True

    def preprocess():
        report = preprocess_dataset(data, out / "preprocessed", workers=workers, data_cfg=cfg.data,
                                    model_cfg=cfg.model, progress=progress)
        if not report.ok:
            raise InputError(f"{data}: preprocessing failed:\n{report.summary()}")

    def train_():
        from medseg.train import train

        run = out / "run"
        if (run / "checkpoints" / "final.pt").is_file():  # finished before job.json recorded it
            log.info("%s holds a finished run; reusing it", run)
            return True
        res = train(cfg, run, resume=(run / "checkpoints" / "latest.pt").is_file())
        if res["status"] != "finished":
            result.update(status=res["status"], signal=res["signal"])
            return False
        return True

    step("preprocess", preprocess)
    if not step("train", train_):
        return result
    images, labels = data / "imagesTs", data / "labelsTs"
    if not images.is_dir():
        log.info("%s has no imagesTs: the job ends with the trained run", data)
        return result
    result["predictions"] = str(out / "predictions")
    step("infer", lambda: _infer(out, images, progress))
    if not labels.is_dir():
        log.info("%s has no labelsTs: predictions written, nothing to evaluate", data)
        return result
    step("evaluate", lambda: _evaluate(out, labels, data, workers, progress))
    result["evaluation"] = json.loads((out / "evaluation" / "summary.json").read_text())
    return result


def _infer(out: Path, images: Path, progress: bool) -> None:
    from medseg.infer.predictor import Predictor
    from medseg.infer.runner import run_inference, write_predict_args

    run, predictions = out / "run", out / "predictions"
    predictor = Predictor.from_run(run, checkpoint=None, progress=progress)  # None: the run's infer.checkpoint
    run_inference(predictor, images, predictions, skip_existing=True)
    write_predict_args(predictions, predictor, run=run, input_path=images, continue_=True)


def _evaluate(out: Path, labels: Path, data: Path, workers: int, progress: bool) -> None:
    from medseg.evaluate import evaluate_folders, write_summary

    dataset_json = data / "dataset.json"
    summary = evaluate_folders(out / "predictions", labels, dataset_json=dataset_json if dataset_json.is_file() else None,
                               workers=workers, progress=progress)
    write_summary(summary, out / "evaluation" / "summary.json")
