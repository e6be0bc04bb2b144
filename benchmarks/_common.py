"""Helpers shared by the benchmark scripts: threads, machine and commit, peak RSS, child
processes, synthetic CT, run directories and the ``benchmarks/results/<name>.{md,json}`` files.

Every benchmark measures everything it compares in the same run and writes its table with the
commit and the machine that produced it; ``benchmarks/update_readme.py`` splices those tables
into README.md. Nothing here is timed by a test.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"
WIDTHS = (16, 32, 64, 128, 256)

# The medseg a benchmark measures is the one of its own checkout: an editable install (`pip install -e .`)
# maps `import medseg` to the folder it was installed from, so a script run from another clone or a
# `git worktree` would otherwise time and score that folder's code under this checkout's commit.
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))  # after the script's own folder (sys.path[0]), before site-packages


# --------------------------------------------------------------------------- process set-up
def set_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch (and in the BLAS / OpenMP pools of child processes)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (``ru_maxrss`` is in KiB on Linux)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1.0 if sys.platform != "darwin" else 1 / 1024) / 1024**2


# --------------------------------------------------------------------------- provenance
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit() -> str:
    """``git describe``-like id of the checkout: short hash, ``+dirty`` when tracked code changed
    (results in ``benchmarks/results`` are outputs, not code: a chain of benchmarks stays clean)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "medseg", "benchmarks", "configs",
                ":(exclude)benchmarks/results")
    return sha + ("+dirty" if dirty else "")


def machine(threads: int) -> dict[str, Any]:
    """What produced the numbers: CPU, cores, threads, bf16 support, library versions."""
    import monai
    import torch

    from medseg.runtime import available_cores, cpu_supports_bf16

    return {"cpu": cpu_model(), "cores": available_cores(), "threads": threads, "bf16_native": cpu_supports_bf16(),
            "torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()}


def native_bf16_tag(meta: dict) -> str:
    """``"(native bf16: yes)"`` or ``"(native bf16: no)"`` from a :func:`meta_now` dict (``machine.bf16_native``):
    the suffix of the titles of results that depend on it, so that two machines' tables differ by heading."""
    return f"(native bf16: {'yes' if (meta.get('machine') or {}).get('bf16_native') else 'no'})"


def provenance_line(meta: dict) -> str:
    m = meta["machine"]
    load = meta.get("loadavg_start"), meta.get("loadavg_end")
    busy = f", 1-min load average {load[0]:.1f} at the start / {load[1]:.1f} at the end" if None not in load else ""
    return (f"commit `{meta['commit']}`, {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads, "
            f"native bf16: {'yes' if m['bf16_native'] else 'no'}), torch {m['torch']}, MONAI {m['monai']}, "
            f"{meta['date']}{busy}")


# --------------------------------------------------------------------------- child processes
def run_child(argv: Sequence[str], *, timeout: float | None = None) -> dict:
    """Run ``python <argv>`` and return the JSON object printed on its last stdout line.

    Raises:
        RuntimeError: the child failed or printed no JSON (its stderr tail is in the message).
    """
    proc = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines or not lines[-1].lstrip().startswith("{"):
        raise RuntimeError(f"child {' '.join(map(str, argv))} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- synthetic CT
def write_phantom_ct(path: Path, shape: Sequence[int] = (512, 512, 133), spacing: Sequence[float] = (0.7, 0.7, 2.5),
                     seed: int = 0) -> Path:
    """A phantom CT (``medseg.data.phantoms``) of ``shape`` voxels at ``spacing`` mm, LAS, as NIfTI.

    Stands in for ``real_ct/organs/imagesTr/lidc0001_chest.nii.gz`` when that file is absent, and
    for ``--quick`` runs (small shapes). Only its size and intensity range matter to a timing.
    """
    from medseg.data.phantoms import NOMINAL_SPACING, make_phantom_case
    from medseg.io import write_volume

    nominal = [round(n * s / ns) for n, s, ns in zip(shape, spacing, NOMINAL_SPACING)]  # field of view in nominal voxels
    image, _ = make_phantom_case(seed, shape=nominal, orientation="LAS", spacing=spacing, noise_hu=15.0)
    return write_volume(image, path)


# --------------------------------------------------------------------------- run directories
def make_run_dir(run_dir: Path, config: Path, plans: dict, *, overrides: Sequence[str] = (), seed: int = 0) -> Path:
    """A run directory with an untrained network: ``config.yaml`` (``config`` + ``overrides``),
    ``plans.json`` and ``checkpoints/best.pt`` -- exactly what ``Predictor.from_run`` reads."""
    import torch

    from medseg.config import load_config, save_config
    from medseg.io import atomic_write_text
    from medseg.nn import build_model

    cfg = load_config(config, list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=cfg.model.num_classes or plans["num_classes"],
                        spacing=plans["target_spacing"])
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    atomic_write_text(run_dir / "plans.json", json.dumps(plans, indent=1))
    torch.save({"model": model.state_dict()}, run_dir / "checkpoints" / "best.pt")
    return run_dir


def plan_for_image(image: Path, labels: dict[str, int], *, target_spacing: Sequence[float],
                   patch_size: Sequence[int] | None = None, divisor: Sequence[int] | int = 16, features: float = 32,
                   fingerprint_cache: dict | None = None) -> dict:
    """``plans.json`` for a one-image "dataset", made by the data layer (fingerprint -> ``make_plan``)
    with a fixed target spacing and CT normalization (foreground = body, since there is no label);
    the patch size is planned for a net of total stride ``divisor`` and first-stage width ``features``.
    ``fingerprint_cache``: a dict that keeps the image's fingerprint for the next call (one plan per net)."""
    from medseg.config import DataConfig
    from medseg.data.datasets import Case, DatasetInfo
    from medseg.data.fingerprint import compute_fingerprint
    from medseg.data.plan import make_plan

    info = DatasetInfo(root=image.parent, name="benchmark", labels=dict(labels), channel_names={"0": "CT"},
                       cases=[Case("benchmark", [image], None)])
    cache = {} if fingerprint_cache is None else fingerprint_cache
    key = str(Path(image).resolve())
    if key not in cache:
        cache[key] = compute_fingerprint(info, progress=False)
    fp = cache[key]
    cfg = DataConfig(normalization="ct", target_spacing=[float(s) for s in target_spacing],
                     patch_size=[int(p) for p in patch_size] if patch_size else None)
    return make_plan(fp, cfg, divisor=divisor, features=features)


def num_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` runs over ``shape``: the library's own count,
    :func:`medseg.infer.sliding.count_windows` (imported here, not at module level: torch loads lazily)."""
    from medseg.infer.sliding import count_windows

    return count_windows(shape, roi, overlap)


# --------------------------------------------------------------------------- output
def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with 3 significant digits (2 decimals from 10 on)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if v != v else (f"{v:.2f}" if abs(v) >= 10 else f"{v:.3g}")
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def write_results(name: str, title: str, body_md: str, data: dict, meta: dict, *, command: str,
                  out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.md`` (title, table, command, provenance) and ``<name>.json``."""
    from medseg.io import atomic_write_text

    meta = {**meta, "loadavg_end": os.getloadavg()[0]}
    command = public_command(command)
    md = (f"### {title}\n\n{body_md.strip()}\n\n"
          f"Reproduce: `{command}`  \nMeasured on: {provenance_line(meta)}.\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = atomic_write_text(out_dir / f"{name}.md", md)
    js_path = atomic_write_text(out_dir / f"{name}.json", json.dumps({**data, "meta": meta}, indent=1, default=float))
    return md_path, js_path


def repo_relative(value: str | Path) -> str:
    """An absolute path as a path relative to the repository, or to ``$TMPDIR`` for one under the
    temp folder (published results hold no machine paths); anything else unchanged."""
    text = str(value)
    if not os.path.isabs(text):
        return text
    tmp, near = tempfile.gettempdir(), str(ROOT.parent)  # the repository and its siblings (../shared) first
    path = os.path.abspath(text)
    if os.path.commonpath([path, near]) != near and os.path.commonpath([path, tmp]) == tmp:  # a work folder
        return "$TMPDIR/" + os.path.relpath(text, tmp)
    return os.path.relpath(text, ROOT)


def public_command(command: str) -> str:
    """A command line with each absolute path made public (:func:`repo_relative`): the Reproduce line of
    a result holds no path of the machine it ran on."""
    return " ".join(repo_relative(tok) for tok in command.split(" "))


def meta_now(threads: int, argv: Sequence[str] | None = None) -> dict:
    """Commit, machine, date and command line of this run."""
    import datetime

    return {"commit": commit(), "machine": machine(threads),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "argv": [repo_relative(a) for a in (sys.argv if argv is None else argv)],
            "loadavg_start": os.getloadavg()[0]}  # other work on the machine skews wall-clock timings
