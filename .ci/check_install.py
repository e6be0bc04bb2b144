"""Checks run by `make check-install` inside a scratch venv holding a non-editable `pip install .`.

Run from a folder outside the source tree: medseg must come from the venv's site-packages (not the
checkout), and every shipped config must load by name (package data, no source tree needed),
the demo's default config included (it must resolve inside the installed package). Prints one
line per config and a final "ok" line.
"""

import sys
from pathlib import Path

import medseg
from medseg.config import load_config
from medseg.configs import shipped_configs

root = Path(__file__).resolve().parents[1]
package = Path(medseg.__file__).resolve().parent
if package.is_relative_to(root) or "site-packages" not in package.parts:
    sys.exit(f"check-install: medseg was imported from {package}, not from an installed copy")
names = sorted(shipped_configs())
expected = sorted(p.stem for p in (root / "medseg" / "configs").glob("*.yaml"))
if names != expected:
    sys.exit(f"check-install: the installed package ships {names}, the source tree has {expected}")
for name in names:
    cfg = load_config(name)
    print(f"{name}: {cfg.model.arch}, channels {cfg.model.channels}")
from medseg.pipelines.demo import DEFAULT_CONFIG  # noqa: E402  (after the import-location check)

if not DEFAULT_CONFIG.is_file() or not DEFAULT_CONFIG.resolve().is_relative_to(package):
    sys.exit(f"check-install: the demo's default config {DEFAULT_CONFIG} is not in the installed package")
print(f"check-install ok: medseg {medseg.__version__} from {package}, {len(names)} configs load by name")
