"""The `medseg` command line as a whole: --version, --quiet, one meaning per flag across commands (old spellings
kept as aliases), model.* overrides in `medseg preprocess`, configs named by their shipped name."""

from __future__ import annotations

import argparse
import json
import logging
import tomllib
import types

import pytest

import medseg
from conftest import ROOT
from medseg import cli
from medseg.cli import build_parser, main


def _args(command: str, *argv: str) -> argparse.Namespace:
    return build_parser(command).parse_args([command, *argv])


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"medseg {version}" == f"medseg {medseg.__version__}"


@pytest.fixture
def loud(monkeypatch):
    """The medseg logger and its console at INFO, MEDSEG_LOGLEVEL=INFO, restored afterwards (--quiet changes
    the console and the variable)."""
    from medseg.runtime import _console, get_logger

    monkeypatch.setenv("MEDSEG_LOGLEVEL", "INFO")
    logger = get_logger()
    old = logger.level, _console().level
    logger.setLevel(logging.INFO)
    _console().setLevel(logging.INFO)
    yield logger
    logger.setLevel(old[0])
    _console().setLevel(old[1])


@pytest.fixture
def spy_command(monkeypatch, loud):
    """Replace every command module by one whose run() records the logging level and the progress switches."""
    from medseg.runtime import _console, progress_enabled

    seen = {}

    def run(args):
        seen.update(level=_console().level, progress=progress_enabled(), show=cli.show_progress(args))
        return 0

    fake = types.SimpleNamespace(add_arguments=lambda p: None, run=run)
    monkeypatch.setattr(cli, "_module", lambda name: fake)
    return seen


@pytest.mark.parametrize("argv", [["--quiet", "train"], ["-q", "infer"], ["evaluate", "--quiet"], ["demo", "-q"]])
def test_quiet_before_or_after_the_command_turns_logs_and_bars_down(spy_command, argv):
    import os

    assert main(argv) == 0
    assert spy_command == {"level": logging.WARNING, "progress": False, "show": False}
    assert os.environ["MEDSEG_LOGLEVEL"] == "WARNING"  # for worker processes and torchrun ranks


def test_without_quiet_bars_and_info_logs_stay(spy_command):
    assert main(["train"]) == 0
    assert spy_command == {"level": logging.INFO, "progress": True, "show": True}


def test_quiet_preprocess_draws_no_bar_and_logs_no_info(tmp_path, capsys, loud):
    from medseg.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "raw", n_train=2, n_test=0, seed=1, shape=(24, 24, 12))
    assert main(["preprocess", "--data", str(data), "--out", str(tmp_path / "loud")]) == 0
    assert "fingerprint" in capsys.readouterr().err  # the bar, without --quiet
    assert main(["--quiet", "preprocess", "--data", str(data), "--out", str(tmp_path / "quiet")]) == 0
    err = capsys.readouterr().err
    assert "fingerprint" not in err and "preprocess" not in err and " INFO " not in err
    assert (tmp_path / "quiet" / "plans.json").is_file()


def test_quiet_keeps_the_info_lines_of_the_run_log(tmp_path, loud):
    """`--quiet` quiets the console only: a run's log.txt (train.setup.open_log) still gets INFO lines."""
    import io

    from medseg.cli import set_quiet
    from medseg.runtime import _console, get_logger, progress_enabled
    from medseg.train.distributed import DistInfo
    from medseg.train.setup import open_log

    console = io.StringIO()
    old_stream = _console().setStream(console)
    set_quiet(True)
    handler = open_log(tmp_path / "run", DistInfo())
    try:
        get_logger("medseg.train.engine").info("epoch 1/2  loss 0.5")
        get_logger("medseg.train.engine").warning("something odd")
    finally:
        get_logger().removeHandler(handler)
        handler.close()
        _console().setStream(old_stream)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert " INFO epoch 1/2  loss 0.5" in log and " WARNING something odd" in log
    assert "something odd" in console.getvalue() and "epoch 1/2" not in console.getvalue()
    assert not progress_enabled()


# --------------------------------------------------------------------------- one meaning per flag
@pytest.mark.parametrize("command,required", [("preprocess", []), ("train", []), ("demo", []),
                                              ("infer", ["-m", "R", "-i", "I"]), ("evaluate", ["--pred", "P", "--ref", "R"])])
def test_out_and_output_are_one_flag_everywhere(command, required):
    dest = "output" if command in ("infer", "evaluate") else "out"
    for flag in ("--out", "--output", "-o"):
        assert str(getattr(_args(command, *required, flag, "X"), dest)) == "X", flag


def test_evaluate_output_is_a_json_file_or_a_folder(tmp_path):
    from medseg.commands.evaluate import summary_path

    pred = tmp_path / "pred"
    assert summary_path(None, pred) == pred / "summary.json"
    assert summary_path(tmp_path / "scores.json", pred) == tmp_path / "scores.json"
    assert summary_path(tmp_path / "eval", pred) == tmp_path / "eval" / "summary.json"


def test_train_preprocessed_flag_and_deprecated_data_alias(capsys):
    from medseg.commands.train import preprocessed_folder
    from medseg.errors import ConfigError

    assert preprocessed_folder(_args("train", "--preprocessed", "pre/A")) == "pre/A"
    assert "deprecated" not in capsys.readouterr().err
    assert preprocessed_folder(_args("train", "--data", "pre/A")) == "pre/A"  # the old spelling still works
    assert "`medseg train --data` is deprecated; use --preprocessed" in capsys.readouterr().err
    assert preprocessed_folder(_args("train", "--data", "pre/A", "--preprocessed", "pre/A")) == "pre/A"
    with pytest.raises(ConfigError, match="--data pre/A and --preprocessed pre/B disagree"):
        preprocessed_folder(_args("train", "--data", "pre/A", "--preprocessed", "pre/B"))
    assert main(["train", "--data", "pre/A", "--preprocessed", "pre/B"]) == 2


def test_train_reads_the_preprocessed_folder_it_is_given(tmp_path, capsys):
    """`--preprocessed` reaches data.preprocessed: a missing folder is named in the error (exit 2)."""
    missing = tmp_path / "nowhere"
    assert main(["train", "--config", "unet3d", "--preprocessed", str(missing), "--out", str(tmp_path / "run")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_train_without_a_preprocessed_folder_names_the_flag(tmp_path, capsys):
    assert main(["train", "--config", "unet3d", "--out", str(tmp_path / "run")]) == 2
    assert "data.preprocessed: not set; pass --preprocessed DIR" in capsys.readouterr().err


# --------------------------------------------------------------------------- preprocess: model overrides
def test_preprocess_plans_for_the_model_of_the_overrides(tmp_path, capsys):
    """model.* overrides reach the plan: a 6-level net (total stride 32) gets patch axes divisible by 32."""
    from medseg.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "raw", n_train=2, n_test=0, seed=1, shape=(40, 40, 20))
    def run(out, *overrides):
        return main(["preprocess", "--data", str(data), "--no-progress", "--out", str(tmp_path / out),
                     "data.target_spacing=[1,1,1]", *overrides])

    assert run("a") == 0
    default = json.loads((tmp_path / "a" / "plans.json").read_text())["patch_size"]
    assert run("b", "model.channels=[4,8,16,32,64,128]") == 0
    deep = json.loads((tmp_path / "b" / "plans.json").read_text())["patch_size"]
    assert all(p % 16 == 0 for p in default) and any(p % 32 for p in default), default
    assert all(p % 32 == 0 for p in deep), deep
    assert run("c", "train.epochs=3") == 2
    assert "takes data.* and model.* overrides only" in capsys.readouterr().err


# --------------------------------------------------------------------------- demo
def test_demo_lives_above_the_engines_and_finds_its_config_in_the_package():
    from medseg.configs import CONFIG_DIR
    from medseg.pipelines.demo import DEFAULT_CONFIG

    assert not (ROOT / "medseg" / "train" / "demo.py").exists()
    assert DEFAULT_CONFIG == CONFIG_DIR / "demo.yaml" and DEFAULT_CONFIG.is_file()
    train_code = "\n".join(p.read_text() for p in (ROOT / "medseg" / "train").glob("*.py"))
    assert "medseg.pipelines" not in train_code and "evaluate_folders" not in train_code


def test_demo_time_is_one_number_in_help_readme_and_output():
    """The demo's time: the help, the README and demo.yaml's budget say the same; the output prints the total."""
    import re

    from medseg.commands.demo import format_timings
    from medseg.config import load_config

    budget = load_config("demo").train.max_minutes
    help_text = _demo_help()
    assert re.search(r"medseg demo +# ~(\d+) minutes", help_text).group(1) == f"{budget:.0f}"
    demo = (ROOT / "README.md").read_text().split("\n## Demo\n", 1)[1].split("\n## ", 1)[0]
    assert f"(default {budget:.0f};" in demo and f"about\n{budget:.0f} minutes" in demo
    assert format_timings({"phantoms + preprocess": 3.2, "train": 360.4, "infer": 1.6}) == \
        "phantoms + preprocess 3 s, train 360 s, infer 2 s; total 6 min 5 s"


def _demo_help() -> str:
    parser = build_parser("demo")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["demo"].format_help()
