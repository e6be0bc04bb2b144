"""pyproject.toml and environment.yml name the same dependencies; every CLI subcommand is registered."""

import json
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from conftest import ROOT


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in py["dependencies"] + py["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    have = {_name(r): r for r in pip}
    assert set(have) == set(wanted), (set(have) ^ set(wanted))
    # torch is pinned to the version the Makefile installs first, inside pyproject's range
    make = (ROOT / "Makefile").read_text()
    pin = re.search(r"TORCH_VERSION \?= ([\d.]+)", make).group(1)
    assert have["torch"] == f"torch=={pin}"
    major, minor = (int(x) for x in pin.split(".")[:2])
    upper = re.search(r"<(\d+)\.(\d+)", wanted["torch"])
    assert (major, minor) < (int(upper.group(1)), int(upper.group(2)))
    for name, req in wanted.items():
        if name != "torch":
            assert have[name].replace(" ", "") == req.replace(" ", ""), name


def test_bench_extra_installs_nnunet_with_the_pinned_torch():
    """The optional `bench` extra (nnU-Net for benchmarks/head_to_head.py) is installed with a constraints
    file that holds torch at the Makefile's version (nnunetv2 -> timm -> torchvision would replace it)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["bench"] == ["nnunetv2==2.8.1"]
    pin = re.search(r"TORCH_VERSION \?= ([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    text = (ROOT / "benchmarks" / "constraints-bench.txt").read_text()
    assert [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")] == [f"torch=={pin}"]
    assert "pip install -c benchmarks/constraints-bench.txt -e '.[bench]'" in (ROOT / "README.md").read_text()


def _medseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("cmd,option", [("preprocess", "--workers"), ("train", "--resume"), ("infer", "--model"),
                                        ("evaluate", "--pred"), ("demo", "--out")])
def test_each_subcommand_is_registered(cmd, option):
    """`python -m medseg <cmd> --help` is that command's own help (its usage line and one of its options)."""
    res = _medseg(cmd, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: medseg {cmd} ")
    assert option in res.stdout


def test_unknown_subcommand_fails():
    res = _medseg("segment", "--help")
    assert res.returncode == 2
    assert "invalid choice: 'segment'" in res.stderr and "usage: medseg" in res.stderr


# --------------------------------------------------------------------------- shipped configs
def test_configs_ship_inside_the_package():
    """The YAML configs live in medseg/configs/ (package data); configs/ at the root is a link to them."""
    from medseg.configs import CONFIG_DIR, shipped_configs

    assert CONFIG_DIR == ROOT / "medseg" / "configs"
    assert (ROOT / "configs").resolve() == CONFIG_DIR
    names = set(shipped_configs())
    assert {"demo", "unet3d", "attention_unet3d", "cbam_unet3d", "real_organs"} <= names
    assert names == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert data == {"medseg.configs": ["*.yaml"]}


def test_configs_load_by_name_from_anywhere(tmp_path, monkeypatch):
    """`--config attention_unet3d`, `attention_unet3d.yaml` and `configs/attention_unet3d.yaml` name the shipped
    file from any working directory; an existing file wins; an unknown name lists the shipped ones."""
    from medseg.config import config_to_dict, load_config
    from medseg.configs import resolve_config
    from medseg.errors import ConfigError

    shipped = ROOT / "medseg" / "configs" / "attention_unet3d.yaml"
    monkeypatch.chdir(tmp_path)
    for spec in ("attention_unet3d", "attention_unet3d.yaml", "configs/attention_unet3d.yaml"):
        assert resolve_config(spec) == shipped
    by_name = load_config("attention_unet3d", ["train.epochs=7"])
    assert by_name.model.skip_fusion.name == "gate" and by_name.train.epochs == 7
    assert config_to_dict(load_config("attention_unet3d")) == config_to_dict(load_config(shipped))
    (tmp_path / "unet3d").write_text("name: mine\n")  # a local file of a shipped config's name wins
    assert load_config("unet3d").name == "mine"
    with pytest.raises(ConfigError, match=r"config file not found: atention_unet3d .*attention_unet3d, bam_unet3d"):
        load_config("atention_unet3d")
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config("elsewhere/unet3d.yaml")  # a path with another folder is a path, not a name


# --------------------------------------------------------------------------- non-editable install
def test_ci_checks_a_non_editable_install_after_the_tests():
    """CI (.ci/run) runs `make check-install` after `make test`; the target installs `.` without -e into a venv
    without the system site-packages and runs the checks from outside the source tree."""
    steps = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip().startswith("make ")]
    assert steps == ["make test", "make check-install"]
    make = (ROOT / "Makefile").read_text()
    recipe = make.split("\ncheck-install:\n", 1)[1].split("\n\n", 1)[0]
    assert "-m venv $(CHECK_VENV)" in recipe and "system-site-packages" not in recipe
    assert "pip install -q torch==$(TORCH_VERSION)" in recipe and "pip install -q .\n" in recipe + "\n"
    assert " -e " not in recipe and "cd $(CHECK_VENV) && bin/medseg demo --help" in recipe
    assert "cd $(CHECK_VENV) && bin/python $(CURDIR)/.ci/check_install.py" in recipe


def test_check_install_script_refuses_the_source_tree(tmp_path):
    """.ci/check_install.py fails when medseg is imported from the checkout (an editable install)."""
    res = subprocess.run([sys.executable, str(ROOT / ".ci" / "check_install.py")], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode != 0
    assert "not from an installed copy" in res.stderr


@pytest.mark.slow
def test_non_editable_install_ships_the_configs(tmp_path):
    """`make check-install` (minutes: a scratch venv, torch, `pip install .`): medseg demo --help works and every
    shipped config loads by name from outside the source tree."""
    venv = tmp_path / "venv"
    res = subprocess.run(["make", "check-install", f"CHECK_VENV={venv}"], capture_output=True, text=True, cwd=ROOT,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    n = len(list((ROOT / "medseg" / "configs").glob("*.yaml")))
    assert f"{n} configs load by name" in res.stdout
    assert str(venv) in res.stdout.split("check-install ok:")[1]  # imported from the scratch venv


# --------------------------------------------------------------------------- docs a newcomer can trust
def test_license_is_the_apache_2_text_pyproject_names():
    text = (ROOT / "LICENSE").read_text()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.split()) > 1500  # the full text, not a notice


def _section(readme: str, title: str) -> str:
    return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_lists_every_shipped_config_and_how_to_cite():
    from medseg.configs import shipped_configs

    readme = (ROOT / "README.md").read_text()
    table = _section(readme, "Shipped configs")
    named = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)?", table, flags=re.M))
    assert {n for pair in named for n in pair if n} == set(shipped_configs())
    cite = _section(readme, "Citing")
    for who in ("Oktay", "Woo", "Hu", "ECA-Net", "BAM: Bottleneck", "Non-local", "Attentional Feature Fusion",
                "Isensee", "MONAI"):
        assert who in cite, who
    for section in ("Bring your own dataset", "On a GPU", "License"):
        assert _section(readme, section).strip()
    gpu = _section(readme, "On a GPU")
    results = ROOT / "benchmarks" / "results" / "gpu_check.json"
    if not results.exists():
        assert "GPU figures are pending" in gpu
    else:  # the section names the card the committed check ran on, and claims a pass only if it passed
        data = json.loads(results.read_text())
        assert data["meta"]["gpu"]["gpu"] in gpu
        assert ("every check passed" in gpu) == bool(data["summary"]["ok"] and not data["summary"]["failed"])


def test_readme_states_what_each_command_records():
    """No 'the resolved config is saved by every command': train saves config.yaml, infer predict_args.json."""
    readme = (ROOT / "README.md").read_text()
    assert "the resolved config is saved next to\nwhat it produced" not in readme
    usage = _section(readme, "Usage")
    assert "`RUN/config.yaml`" in usage and "`predict_args.json`" in usage
    assert "--data PREPROCESSED" not in readme and "--preprocessed PREPROCESSED" in readme


def test_architecture_doc_names_the_resampling_the_code_uses():
    """docs/architecture.md once said scipy.ndimage.zoom; medseg/data/resample.py resamples with torch."""
    code = (ROOT / "medseg" / "data" / "resample.py").read_text()
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert "import scipy" not in code and 'mode="bicubic"' in code
    resampling = doc.split("**Resampling**", 1)[1].split("\n- **", 1)[0]
    assert 'mode="bicubic"' in resampling and "grid_mode=True" not in resampling
