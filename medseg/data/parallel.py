"""Run one function over many cases in worker processes, with a tqdm bar and per-case errors.

A case that raises a :class:`medseg.errors.MedsegError` is reported with its message; any
other exception is reported as ``"<Type>: <message>"`` (an unexpected failure) and the other
cases go on. Ctrl-C cancels the pending cases and re-raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import traceback
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from medseg.errors import MedsegError

__all__ = ["Outcome", "run_parallel"]


@dataclass
class Outcome:
    """What happened to one item: ``value`` on success, else ``error`` (+ ``unexpected``)."""

    key: str
    value: Any = None
    error: str | None = None
    unexpected: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def _call(fn: Callable, key: str, args: tuple) -> Outcome:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = fn(*args)
            out = Outcome(key, value)
        except MedsegError as err:
            out = Outcome(key, error=str(err))
        except (MemoryError, Exception) as err:  # noqa: BLE001  (reported per case, the run goes on)
            tb = traceback.extract_tb(err.__traceback__)[-1]
            out = Outcome(key, error=f"{type(err).__name__}: {err} (at {tb.filename}:{tb.lineno})", unexpected=True)
    out.warnings = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    return out


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_parallel(fn: Callable, jobs: Sequence[tuple[str, tuple]], *, workers: int = 1, desc: str = "",
                 progress: bool | None = True) -> Iterator[Outcome]:
    """Yield an :class:`Outcome` per ``(key, args)`` job as they finish (``fn(*args)`` in a worker).

    The one process pool of the package (fingerprint, preprocess, evaluate). ``workers <= 1``
    runs in this process (simplest to debug). ``fn`` must be importable at module level (it is
    pickled to the workers). ``progress``: a tqdm bar on stderr (``None``: only on a terminal).
    """
    disable = True if not jobs else (None if progress is None else not progress)
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=disable, file=sys.stderr, dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for key, args in jobs:
                out = _call(fn, key, args)
                bar.update(1)
                yield out
            return
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker)
        try:
            keys = {pool.submit(_call, fn, key, args): key for key, args in jobs}
            pending = set(keys)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    bar.update(1)
                    try:
                        yield fut.result()
                    except BrokenProcessPool:
                        yield Outcome(keys[fut], error="a worker process died (out of memory?); rerun with fewer --workers",
                                      unexpected=True)
        except BaseException:  # Ctrl-C: stop now (files are written atomically; stale temps are cleaned on re-run)
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    finally:
        bar.close()
