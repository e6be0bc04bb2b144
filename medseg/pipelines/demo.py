"""The whole pipeline on synthetic CT phantoms: phantoms -> preprocess -> train -> infer -> evaluate.

``run_demo(out_dir)`` writes, under ``out_dir``::

    data/          nnU-Net v2 phantom dataset (imagesTr/labelsTr for training, imagesTs/labelsTs held out)
    preprocessed/  plans.json, splits.json, cases/
    run/           the training run (config.yaml, plans.json, checkpoints/, tensorboard/, log.txt, validation/)
    predictions/   masks of the held-out phantoms, in each input's own geometry
    evaluation/    summary.json + summary.csv (medseg evaluate)
    job.json       the steps finished (a second call does not redo them)

The steps after the phantoms are ``medseg run`` (:func:`medseg.pipelines.job.run_job`), so the demo
exercises exactly what a user runs on a dataset of their own.
"""

from __future__ import annotations

import time
from pathlib import Path

from medseg.configs import CONFIG_DIR

__all__ = ["DEFAULT_CONFIG", "run_demo"]

DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"  # package data: found in a non-editable install too


def run_demo(out_dir: str | Path = "runs/demo", *, config: str | Path | None = None, minutes: float | None = None,
             overrides: list[str] | None = None, n_train: int = 10, n_test: int = 4, seed: int = 0,
             progress: bool = False) -> dict:
    """Run the demo into ``out_dir`` (see the module docstring): generate the phantoms, then
    :func:`medseg.pipelines.job.run_job` on them (resumable step by step, like ``medseg run``).

    Args:
        config: YAML config or a shipped config's name (default ``demo``: ``medseg/configs/demo.yaml``);
            ``overrides`` are applied on top.
        minutes: training time budget (``train.max_minutes``).
        n_train, n_test, seed: phantom cases for training / held out, and their seed.

    Returns:
        The evaluation summary (``summary.json``'s content) plus ``status``, ``run_dir`` and
        ``timings_s`` (the steps run by this call); ``{"status": "interrupted", "signal", "run_dir"}``
        when training was stopped.
    """
    from medseg.data.phantoms import make_phantom_dataset
    from medseg.pipelines.job import load_job_config, run_job

    cfg = load_job_config(config or DEFAULT_CONFIG, overrides, minutes)
    out = Path(out_dir)
    t0 = time.perf_counter()
    data = out / "data"
    timings: dict[str, float] = {}
    if not (data / "dataset.json").is_file():
        make_phantom_dataset(data, n_train=n_train, n_test=n_test, seed=seed)
        timings["phantoms"] = time.perf_counter() - t0
    job = run_job(data, out, cfg, progress=progress)
    if job["status"] != "finished":
        return {"status": job["status"], "signal": job["signal"], "run_dir": job["run_dir"]}
    summary = dict(job["evaluation"])
    summary.update(status="finished", run_dir=job["run_dir"], timings_s={**timings, **job["timings_s"]})
    return summary
