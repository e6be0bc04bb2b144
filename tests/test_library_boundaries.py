"""Decisions that belong to the command line stay there (issue 14 item 4): the library raises typed
errors instead of exiting, and uses the threads it is given instead of reading the machine's load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medseg.commands.demo import busy_from_proc_stat, idle_cpu_threads

PKG = Path(__file__).resolve().parents[1] / "medseg"
CLI_LAYER = {"cli.py", "__main__.py"}


def _library_files():
    return [p for p in sorted(PKG.rglob("*.py")) if p.name not in CLI_LAYER and "commands" not in p.relative_to(PKG).parts]


def test_library_code_neither_exits_nor_reads_the_load_average():
    offenders = []
    for path in _library_files():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bSystemExit\b|\bsys\.exit\b|\bgetloadavg\b|/proc/stat", code) and "raise SystemExit(main())" not in code:
                offenders.append(f"{path.relative_to(PKG)}:{i}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("threads,load,cpus,omp,expected", [
    (2, 0.0, 2, False, 2),   # idle machine: every thread
    (2, 1.2, 2, False, 1),   # one core busy: int(2 - 1.2 + 0.5) = 1
    (8, 2.6, 8, False, 5),   # int(8 - 2.6 + 0.5) = 5
    (2, 7.0, 2, False, 1),   # overloaded: never below 1
    (4, 0.0, 16, False, 4),  # never above what torch was given
    (2, 1.9, 2, True, 2),    # OMP_NUM_THREADS set: the user decides
    (2, None, 2, False, 2),  # no load average on this platform
])
def test_the_demo_command_picks_threads_from_idle_cores(threads, load, cpus, omp, expected):
    assert idle_cpu_threads(threads, load=load, cpu_count=cpus, omp_set=omp) == expected


def test_busy_cpus_come_from_the_proc_stat_delta():
    # cpu  user nice system idle iowait irq softirq steal: 2 CPUs, 100 jiffies each between the readings
    before = "cpu  1000 0 500 8000 100 0 0 0 0 0\ncpu0 500 0 250 4000 50 0 0 0 0 0\n"
    one_busy = "cpu  1090 0 510 8095 105 0 0 0 0 0\n"    # 100 busy of 200: one CPU's worth
    idle = "cpu  1000 0 500 8190 110 0 0 0 0 0\n"        # all 200 idle or iowait
    assert busy_from_proc_stat(before, one_busy, 2) == pytest.approx(1.0)
    assert busy_from_proc_stat(before, idle, 2) == pytest.approx(0.0)
    assert busy_from_proc_stat(before, before, 2) is None   # no time passed
    assert busy_from_proc_stat("intr 1 2 3", one_busy, 2) is None
    assert idle_cpu_threads(2, load=busy_from_proc_stat(before, one_busy, 2), cpu_count=2, omp_set=False) == 1


def test_busy_cpus_count_only_the_cores_of_the_affinity_mask():
    # 4 CPUs, 100 jiffies each; this process may use cpu2 and cpu3. cpu0 and cpu1 are fully busy (someone
    # else's cores), cpu2 is fully busy, cpu3 idle: the machine has 3 busy CPUs, the mask 1
    before = ("cpu  0 0 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0\n"
              "cpu2 0 0 0 0 0 0 0 0\ncpu3 0 0 0 0 0 0 0 0\n")
    after = ("cpu  300 0 0 100 0 0 0 0\ncpu0 100 0 0 0 0 0 0 0\ncpu1 90 0 10 0 0 0 0 0\n"
             "cpu2 100 0 0 0 0 0 0 0\ncpu3 0 0 0 95 5 0 0 0\n")
    assert busy_from_proc_stat(before, after, 4) == pytest.approx(3.0)
    assert busy_from_proc_stat(before, after, 4, {2, 3}) == pytest.approx(1.0)
    assert busy_from_proc_stat(before, after, 4, {3}) == pytest.approx(0.0)
    assert busy_from_proc_stat(before, after, 4, {7}) is None           # no line of the mask
    assert idle_cpu_threads(2, load=busy_from_proc_stat(before, after, 4, {2, 3}), cpu_count=2, omp_set=False) == 1
    assert idle_cpu_threads(2, load=busy_from_proc_stat(before, after, 4), cpu_count=4, omp_set=False) == 1
    assert idle_cpu_threads(2, load=busy_from_proc_stat(before, after, 4, {3}), cpu_count=1, omp_set=False) == 1


def test_available_cores_is_the_affinity_mask():
    import os

    from medseg.runtime import available_cores

    n = available_cores()
    assert 1 <= n <= (os.cpu_count() or n)
    if hasattr(os, "sched_getaffinity"):
        assert n == len(os.sched_getaffinity(0))
