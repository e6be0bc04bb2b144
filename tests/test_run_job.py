"""`medseg run`: the whole job on a dataset in nnU-Net layout, resumable step by step."""

from __future__ import annotations

import json
import shutil

import pytest

from medseg.cli import main as cli_main
from medseg.config import load_config
from medseg.data.phantoms import make_phantom_dataset
from medseg.errors import ConfigError
from medseg.pipelines.job import STEPS, config_differences, run_job

from test_train_demo import TINY, one_thread  # noqa: F401  (a fixture: seconds of training, the liver is learnt)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 training phantoms + 2 test phantoms; the second test case is scored on the liver (label 1) only."""
    data = make_phantom_dataset(tmp_path_factory.mktemp("ds") / "Dataset042_Phantoms", n_train=3, n_test=2)
    meta = json.loads((data / "dataset.json").read_text())
    meta["scored_labels"] = {"phantom_004": [1]}
    (data / "dataset.json").write_text(json.dumps(meta))
    return data


def test_config_differences_names_dotted_keys():
    assert config_differences({"a": {"b": 1, "c": [1]}, "d": 2}, {"a": {"b": 1, "c": [2]}, "d": 2}) == ["a.c: [1] -> [2]"]
    assert config_differences({"a": 1}, {"a": 1}) == []


def test_run_whole_job_then_resume_step_by_step(dataset, tmp_path, capsys, one_thread):
    out = tmp_path / "job"
    assert cli_main(["run", "--data", str(dataset), "--out", str(out), "--config", "demo", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "foreground mean" in printed and f"tensorboard --logdir {out / 'run' / 'tensorboard'}" in printed
    record = json.loads((out / "job.json").read_text())
    assert list(record["steps"]) == list(STEPS)
    assert (out / "run" / "checkpoints" / "final.pt").is_file()
    assert sorted(p.name for p in (out / "predictions").glob("*.nii.gz")) == ["phantom_003.nii.gz", "phantom_004.nii.gz"]
    assert json.loads((out / "predictions" / "predict_args.json").read_text())["continue"] is True
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    per_case = {c["case"]: set(c["metrics"]) for c in summary["metric_per_case"]}
    assert per_case == {"phantom_003": {"1", "2", "3", "4"}, "phantom_004": {"1"}}  # scored_labels honoured
    assert summary["mean"]["1"]["Dice"] >= 0.5, summary["mean"]  # the liver is learnt (an untrained net: ~0)

    # a second call redoes nothing
    cfg = load_config("demo", TINY)
    again = run_job(dataset, out, cfg, progress=False)
    assert again["steps_run"] == [] and again["evaluation"]["mean"] == summary["mean"]

    # an interrupted inference: the infer and evaluate steps run again, and only the missing case is segmented
    before = (out / "predictions" / "phantom_003.nii.gz").stat().st_mtime_ns
    (out / "predictions" / "phantom_004.nii.gz").unlink()
    record["steps"] = {k: v for k, v in record["steps"].items() if k in ("preprocess", "train")}
    (out / "job.json").write_text(json.dumps(record))
    resumed = run_job(dataset, out, load_config("demo", TINY), progress=False)
    assert resumed["steps_run"] == ["infer", "evaluate"]
    assert (out / "predictions" / "phantom_004.nii.gz").is_file()
    assert (out / "predictions" / "phantom_003.nii.gz").stat().st_mtime_ns == before
    assert resumed["evaluation"]["mean"]["1"]["Dice"] == pytest.approx(summary["mean"]["1"]["Dice"])

    # other settings on the same folder: refused, naming the key, nothing run
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.02 -> 0\.05"):
        run_job(dataset, out, load_config("demo", [*TINY, "train.lr=0.05"]), progress=False)
    assert cli_main(["run", "--data", str(dataset), "--out", str(out), "--config", "demo", *TINY, "train.lr=0.05"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_run_without_test_labels_ends_after_inference(dataset, tmp_path, one_thread):
    data = tmp_path / "nolabels"
    shutil.copytree(dataset, data)
    shutil.rmtree(data / "labelsTs")
    fast = [*TINY, "train.epochs=1", "train.iters_per_epoch=2", "train.val_interval=1"]
    job = run_job(data, tmp_path / "job", load_config("demo", fast), progress=False)
    assert job["steps_run"] == ["preprocess", "train", "infer"]
    assert job["evaluation"] is None and not (tmp_path / "job" / "evaluation").exists()
    assert len(list((tmp_path / "job" / "predictions").glob("phantom_*.nii.gz"))) == 2


def test_run_refuses_missing_dataset_and_other_dataset(dataset, tmp_path, capsys):
    assert cli_main(["run", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "job.json").write_text(json.dumps({"dataset": "/elsewhere", "config": {}, "steps": {}}))
    with pytest.raises(ConfigError, match="holds a job on /elsewhere"):
        run_job(dataset, tmp_path / "o", load_config("demo", TINY), progress=False)
