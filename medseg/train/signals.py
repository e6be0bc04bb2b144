"""Graceful stop on Ctrl-C / SIGTERM: finish the current iteration, save ``latest``, exit.

Inside :class:`StopRequest` the first SIGINT or SIGTERM only records the signal (the training
loop checks :attr:`StopRequest.signum` after every iteration); a second Ctrl-C raises
``KeyboardInterrupt`` at once. Loader workers ignore both signals (:func:`ignore_in_worker`):
they are stopped by the main process, which must stay the one to decide.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StopRequest", "exit_code", "ignore_in_worker"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that turns SIGINT / SIGTERM into a flag (only in the main thread)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def ignore_in_worker(worker_id: int) -> None:
    """``worker_init_fn`` for loader workers: leave SIGINT / SIGTERM to the main process."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def exit_code(signum: int | None) -> int:
    """Shell convention for a run stopped by ``signum``: 128 + signal number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + int(signum) if signum else 0
