"""``medseg demo``: phantoms -> preprocess -> train -> infer -> evaluate on CPU, then print where to look."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Writes under --out: data/ (phantom dataset), preprocessed/, run/ (the training run with\n"
        "tensorboard/), predictions/ (held-out phantoms, in their own geometry), evaluation/summary.json.\n"
        "A second call reuses a finished run and resumes an interrupted one.\n\n"
        "examples:\n"
        "  medseg demo                         # ~6 minutes on 2 CPU cores (the training budget + seconds)\n"
        "  medseg demo --minutes 2 --out runs/quick\n"
        "  medseg demo model.block_attention.name=cbam --out runs/demo_cbam"
    )
    parser.add_argument("-o", "--output", "--out", dest="out", default="runs/demo",
                        help="output folder (default: runs/demo)")
    parser.add_argument("--config", help="YAML config or a shipped config's name (default: demo)")
    parser.add_argument("--minutes", type=float, help="training time budget in minutes (default: train.max_minutes "
                        "of the config, 6); the LR schedule is fitted to it")
    parser.add_argument("--train-cases", type=int, default=10, help="phantom cases to train on (default 10)")
    parser.add_argument("--test-cases", type=int, default=4, help="held-out phantom cases to evaluate (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms (default 0)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.epochs=20 model.block_attention.name=cbam")


def idle_cpu_threads(threads: int, *, load: float | None, cpu_count: int | None, omp_set: bool) -> int:
    """``threads`` capped to the cores idle now (at least 1); unchanged when ``OMP_NUM_THREADS``
    is set (``omp_set``) or the load is unknown.

    On a machine shared with other work, a compute thread that loses its core stalls every
    parallel region of the others: with 2 threads on 2 busy cores a training step was measured
    ~40x slower than with 1 thread. A decision of the command line, not of the library (which
    uses the threads it is given).

    Args:
        threads: torch's current CPU threads.
        load: CPUs busy now (:func:`busy_cpus`: ``/proc/stat`` over half a second, else the 1-minute
            load average), ``None`` when unavailable.
        cpu_count: the cores this process may use (:func:`medseg.runtime.available_cores`).
        omp_set: whether the user set ``OMP_NUM_THREADS``.
    """
    if omp_set or load is None:
        return threads
    return max(1, min(threads, int((cpu_count or threads) - load + 0.5)))


def busy_from_proc_stat(before: str, after: str, cpu_count: int, cpus: Collection[int] | None = None) -> float | None:
    """CPUs busy between two readings of ``/proc/stat``: the share of non-idle jiffies (``user nice
    system irq softirq steal``; ``idle`` and ``iowait`` count as idle) times the CPUs counted.

    Without ``cpus``, the aggregate ``cpu`` line times ``cpu_count`` (the whole machine). With ``cpus``
    (the process's affinity mask), only their ``cpuN`` lines: work on cores this process cannot use
    does not count, work on the ones it can does, however idle the rest of the machine is.
    ``None`` when a reading has none of those lines or no time passed."""

    def row(values: list[str]) -> tuple[int, int]:
        v = [int(x) for x in values[:8]] + [0] * max(0, 8 - len(values[:8]))
        return sum(v), v[3] + v[4]  # all, idle + iowait (guest time is inside user)

    def totals(text: str) -> tuple[int, int, int] | None:
        total = idle = n = 0
        for line in text.splitlines():
            f = line.split()
            if not f or not f[0].startswith("cpu"):
                continue
            if cpus is None and f[0] == "cpu":
                a, i = row(f[1:])
                return a, i, cpu_count
            if cpus is not None and f[0][3:].isdigit() and int(f[0][3:]) in cpus:
                a, i = row(f[1:])
                total, idle, n = total + a, idle + i, n + 1
        return (total, idle, n) if n else None

    a, b = totals(before), totals(after)
    if a is None or b is None or b[0] <= a[0] or a[2] != b[2]:
        return None
    return b[2] * (1.0 - (b[1] - a[1]) / (b[0] - a[0]))


def busy_cpus(interval: float = 0.5) -> float | None:
    """CPUs busy now among those this process may use (its affinity mask): ``/proc/stat`` sampled over
    ``interval`` seconds (what runs *now*; the 1-minute load average still counts a job that ended
    seconds ago), else the 1-minute load average (whole machine), else None."""
    import os
    import time

    from medseg.runtime import affinity_mask

    cpus = os.cpu_count() or 1
    mask = affinity_mask()
    mask = mask if mask is not None and len(mask) < cpus else None  # the whole machine: its aggregate line
    try:
        with open("/proc/stat") as f:
            before = f.read()
        time.sleep(interval)
        with open("/proc/stat") as f:
            busy = busy_from_proc_stat(before, f.read(), cpus, mask)
        if busy is not None:
            return busy
    except OSError:
        pass
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def use_idle_cores() -> None:
    import os

    import torch

    from medseg.runtime import available_cores, get_logger

    omp_set = "OMP_NUM_THREADS" in os.environ
    load = None if omp_set else busy_cpus()  # the user decides: no half-second sample
    threads = idle_cpu_threads(torch.get_num_threads(), load=load, cpu_count=available_cores(), omp_set=omp_set)
    if threads != torch.get_num_threads():
        get_logger("medseg.demo").info("using %d CPU thread(s): the other cores are busy (set OMP_NUM_THREADS to override)",
                                       threads)
        torch.set_num_threads(threads)


def format_timings(timings: dict[str, float]) -> str:
    """``"phantoms + preprocess 3 s, train 360 s, ...; total 6 min 5 s"`` (what ``make demo`` prints)."""
    total = round(sum(timings.values()))
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    return f"{steps}; total {total // 60} min {total % 60} s"


def run(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.evaluate import format_table
    from medseg.pipelines.demo import run_demo
    from medseg.train.signals import exit_code

    if args.train_cases < 2 or args.test_cases < 1:
        raise ConfigError("--train-cases must be >= 2 and --test-cases >= 1")
    use_idle_cores()
    summary = run_demo(args.out, config=args.config, minutes=args.minutes, overrides=args.overrides,
                       n_train=args.train_cases, n_test=args.test_cases, seed=args.seed)
    if summary["status"] != "finished":
        print("demo stopped during training; run the same command again to resume")
        return exit_code(summary["signal"])
    print()
    print(f"Held-out phantoms ({len(summary['metric_per_case'])} cases), per-class mean:")
    print(format_table(summary))
    print(f"\ntimings: {format_timings(summary['timings_s'])}")
    print(f"evaluation: {Path(args.out) / 'evaluation' / 'summary.json'}")
    print(f"look at the training curves, overlays and attention-gate maps:\n  tensorboard --logdir {Path(summary['run_dir']) / 'tensorboard'}")
    return 0
