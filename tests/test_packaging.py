"""pyproject.toml and environment.yml name the same dependencies; the CLI lists its commands."""

import re
import subprocess
import sys
import tomllib

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


def test_cli_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "medseg", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("preprocess", "train", "infer", "evaluate", "demo"):
        assert cmd in out
