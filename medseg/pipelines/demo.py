"""The whole pipeline on synthetic CT phantoms: phantoms -> preprocess -> train -> infer -> evaluate.

``run_demo(out_dir)`` writes, under ``out_dir``::

    data/          nnU-Net v2 phantom dataset (imagesTr/labelsTr for training, imagesTs/labelsTs held out)
    preprocessed/  plans.json, splits.json, cases/
    run/           the training run (config.yaml, plans.json, checkpoints/, tensorboard/, log.txt, validation/)
    predictions/   masks of the held-out phantoms, in each input's own geometry
    evaluation/    summary.json + summary.csv (medseg evaluate)

Each step is the library function behind its command (``make_phantom_dataset``,
``preprocess_dataset``, :func:`medseg.train.train`, ``Predictor`` + ``run_inference``,
``evaluate_folders``), so the demo exercises exactly what a user runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from medseg.config import Config, load_config
from medseg.configs import CONFIG_DIR
from medseg.errors import ConfigError, InputError
from medseg.runtime import get_logger

__all__ = ["DEFAULT_CONFIG", "run_demo"]

DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"  # package data: found in a non-editable install too
log = get_logger("medseg.demo")


def _config(config: str | Path | None, overrides: list[str] | None, minutes: float | None) -> Config:
    cfg = load_config(config or DEFAULT_CONFIG, overrides)  # a file or a shipped config's name
    if minutes is not None:
        if minutes <= 0:
            raise ConfigError(f"--minutes: must be > 0, got {minutes}")
        cfg.train.max_minutes = float(minutes)
    return cfg


def run_demo(out_dir: str | Path = "runs/demo", *, config: str | Path | None = None, minutes: float | None = None,
             overrides: list[str] | None = None, n_train: int = 10, n_test: int = 4, seed: int = 0) -> dict:
    """Run the demo into ``out_dir`` (see the module docstring); returns the evaluation summary.

    Args:
        config: YAML config or a shipped config's name (default ``demo``: ``medseg/configs/demo.yaml``);
            ``overrides`` are applied on top.
        minutes: training time budget (``train.max_minutes``).
        n_train, n_test, seed: phantom cases for training / held out, and their seed.
    """
    from medseg.data.phantoms import make_phantom_dataset
    from medseg.data.pipeline import preprocess_dataset
    from medseg.evaluate import evaluate_folders, write_summary
    from medseg.infer.predictor import Predictor
    from medseg.infer.runner import run_inference
    from medseg.train import train

    cfg = _config(config, overrides, minutes)
    out = Path(out_dir)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    data = out / "data"
    if not (data / "dataset.json").is_file():
        make_phantom_dataset(data, n_train=n_train, n_test=n_test, seed=seed)
    pre = out / "preprocessed"
    report = preprocess_dataset(data, pre, data_cfg=cfg.data, model_cfg=cfg.model, progress=False)
    if not report.ok:
        raise InputError(f"{data}: preprocessing failed:\n{report.summary()}")
    timings["phantoms + preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg.data.preprocessed = str(pre)
    run = out / "run"
    if (run / "checkpoints" / "final.pt").is_file():
        log.info("%s holds a finished run; reusing it (delete the folder to train again)", run)
    else:  # a fresh run, or the continuation of an interrupted one
        result = train(cfg, run, resume=(run / "checkpoints" / "latest.pt").is_file())
        if result["status"] != "finished":
            return {"status": result["status"], "signal": result["signal"], "run_dir": str(run)}
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    predictor = Predictor.from_run(run)
    run_inference(predictor, data / "imagesTs", out / "predictions")
    timings["infer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = evaluate_folders(out / "predictions", data / "labelsTs", dataset_json=data / "dataset.json")
    write_summary(summary, out / "evaluation" / "summary.json")
    timings["evaluate"] = time.perf_counter() - t0
    summary["timings_s"] = timings
    summary["status"] = "finished"
    summary["run_dir"] = str(run)
    return summary
