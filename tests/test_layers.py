"""The layer rule of DESIGN.md, checked on the source: data flows top to bottom, an upper layer may
import a lower one (or one of its own layer), never the reverse. Every ``import`` counts, the lazy
ones inside functions too: a lazy import still ties the lower layer to the upper one."""

from __future__ import annotations

import ast
from pathlib import Path

import medseg

ROOT = Path(medseg.__file__).parent

# DESIGN.md "Layers", bottom (0) to top
LAYER = {
    "errors": 0, "io": 0, "config": 0, "registry": 0, "runtime": 0, "configs": 0,  # configs: packaged YAML
    "data": 1,
    "nn": 2,
    "train": 3, "infer": 3, "evaluate": 3,
    "pipelines": 4, "commands": 4, "cli": 4, "__main__": 4, "__init__": 4,
}

# Known exceptions, each with its reason; a new upward import fails the test until it is removed or listed.
ALLOWED = {
    # the planner reads the net's patch divisor and stem stride from the model *config* (no net is built);
    # the geometry rules live with the nets they describe
    ("medseg/data/plan.py", "medseg.nn.factory"),
}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "medseg" and len(parts) > 1 else None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "medseg":  # from medseg import data (a submodule; not __version__)
                yield from (f"medseg.{a.name}" for a in node.names
                            if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").is_file())
            elif node.module.startswith("medseg."):
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("medseg."))


def test_no_module_imports_a_higher_layer():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 50 and (ROOT / "data" / "plan.py") in files
    upward = []
    for path in files:
        rel = path.relative_to(ROOT.parent).as_posix()
        own = path.relative_to(ROOT).with_suffix("").parts[0]
        assert own in LAYER, f"{rel}: top-level module {own!r} has no layer (add it to LAYER as DESIGN.md places it)"
        for module in _imports(path):
            top = _top(module)
            if top is None or top in ("__init__",):
                continue
            assert top in LAYER, f"{rel} imports {module}: no layer for {top!r}"
            if LAYER[top] > LAYER[own] and (rel, module) not in ALLOWED:
                upward.append(f"{rel} -> {module}")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_the_checker_sees_lazy_and_package_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom medseg import data, __version__\n\ndef f():\n    from medseg.train.engine import train\n"
                   "    import medseg.nn.unet\n    from . import x\n")
    assert list(_imports(src)) == ["medseg.data", "medseg.train.engine", "medseg.nn.unet"]
    assert [_top(m) for m in _imports(src)] == ["data", "train", "nn"]
