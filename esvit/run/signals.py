"""Graceful stop on SIGTERM, SIGINT and SIGUSR1 (what SLURM, Kubernetes and Ctrl-C send).

The first signal only sets a flag: the training loop finishes its current step, every rank
agrees to stop at the same step (:meth:`StopSignals.agreed` all-reduces the flag once per
step, so one rank receiving the signal is enough), a checkpoint is written atomically and the
run raises :class:`~esvit.run.errors.Preempted` (exit code ``128 + signal``).

A second signal aborts at once (the default action of that signal: the process ends without
writing anything more). A repeat of the *same* signal within :data:`DEBOUNCE_S` seconds counts as
the first one: a terminal's Ctrl-C or ``srun`` reaches ``torchrun`` and its workers together, and
``torchrun`` then forwards the same signal to the workers a moment later.

DataLoader workers ignore these signals (:func:`ignore_in_worker`): they keep decoding until the
main process has finished the step, and exit with it.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DEBOUNCE_S", "STOP_SIGNALS", "StopSignals", "ignore_in_worker"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DEBOUNCE_S = 1.0


class StopSignals:
    """Installs the stop handlers for the duration of a ``with`` block (main thread only).

    Attributes:
        signum: The first stop signal received (0 if none).
    """

    def __init__(self) -> None:
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first_at = signum, now
            return
        if signum == self.signum and now - self._first_at < DEBOUNCE_S:
            return  # the same signal delivered twice (process group + launcher forwarding)
        # second signal: abort now, with that signal's default action
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        signal.raise_signal(signum)

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Act as if ``signum`` had been received (tests, programmatic stops)."""
        if not self.signum:
            self.signum, self._first_at = int(signum), time.monotonic()

    def agreed(self, device: torch.device) -> int:
        """The stop signal if any rank received one (0 otherwise); every rank must call this.

        One all-reduce (MAX) of one number per call under torchrun; free on one process.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum
        t = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def ignore_in_worker(worker_id: int) -> None:  # noqa: ARG001 - DataLoader worker_init_fn signature
    """DataLoader ``worker_init_fn``: workers ignore stop signals (the main process decides)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
