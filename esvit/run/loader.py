"""Training data loaders that never hang without a message.

With decode workers, the DataLoader waits at most :func:`loader_timeout_s` seconds for a batch
(``DataLoader(timeout=...)``); a stalled worker (a read blocked on a hung network file system,
a decoder stuck on one file) becomes :class:`~esvit.run.errors.LoaderStalledError`, whose one
line says what stalled and what to check, and the stuck workers are killed. Without workers the
main process decodes, and a watchdog thread ends the process with the same message (exit code
124) when one batch takes longer than the timeout, since a blocked read cannot be interrupted.

The timeout is ``data.loader_timeout_s`` when the config has that key, else the environment
variable ``ESVIT_LOADER_TIMEOUT`` (as for the evaluation loaders), else :data:`DEFAULT_TIMEOUT_S`
(600); 0 waits forever.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from esvit.run.errors import EXIT_STALLED, LoaderStalledError
from esvit.run.signals import ignore_in_worker

__all__ = ["DEFAULT_TIMEOUT_S", "GuardedBatches", "StallWatchdog", "auto_num_workers", "build_loader",
           "kill_stalled_workers", "loader_timeout_s"]

DEFAULT_TIMEOUT_S = 600.0
ENV_TIMEOUT = "ESVIT_LOADER_TIMEOUT"  # the same variable as the evaluation loaders (esvit.eval.loader)


def loader_timeout_s(data_cfg: Any = None) -> float:
    """Seconds to wait for one batch (0: forever): ``data.loader_timeout_s``, ``$ESVIT_LOADER_TIMEOUT`` or 600.

    Raises:
        ValueError: Not a finite number >= 0.
    """
    value = getattr(data_cfg, "loader_timeout_s", None)
    source = "data.loader_timeout_s"
    if value is None:
        value, source = os.environ.get(ENV_TIMEOUT, "").strip() or DEFAULT_TIMEOUT_S, ENV_TIMEOUT
    try:
        t = float(value)
    except ValueError:
        raise ValueError(f"{source} must be a number of seconds, got {value!r}") from None
    if not 0 <= t < float("inf"):
        raise ValueError(f"{source}: must be a finite number of seconds >= 0 (0: wait forever), got {value!r}")
    return t


def auto_num_workers(requested: int | None, local_world_size: int = 1, cap: int = 8) -> int:
    """Decode workers per process: ``requested``, or (None) the CPUs this process may use
    (``os.sched_getaffinity``, which honours SLURM / container CPU limits) divided among the
    processes on this node, leaving one for the training process itself, at most ``cap``."""
    if requested is not None:
        return int(requested)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(cap, cpus // max(1, local_world_size) - 1))


def build_loader(dataset: Dataset, sampler: Sampler, batch_size: int, num_workers: int,
                 timeout_s: float) -> DataLoader:
    """DataLoader over uint8 canvases: workers ignore stop signals, wait for a batch is bounded.

    Pinned memory and persistent workers only where useful.
    """
    workers = num_workers > 0
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers,
        prefetch_factor=4 if workers else None, timeout=timeout_s if workers else 0.0,
        worker_init_fn=ignore_in_worker if workers else None,
    )


def stall_message(num_workers: int, timeout_s: float, data_path: str | None) -> str:
    """The one-line explanation of a stalled loader."""
    who = f"the {num_workers} decode worker(s)" if num_workers else "the main process (data.num_workers=0)"
    where = f"the files under data.path={data_path}" if data_path else "the data files"
    return (f"data loader stalled: no batch from {who} within {timeout_s:g} s; a read or decode is blocked "
            f"(e.g. a hung network file system): check that {where} can be read (ls, cat one), or raise "
            f"${ENV_TIMEOUT} (seconds) if decoding is only slow")


class StallWatchdog:
    """Ends the process (exit code 124, one line on stderr) when an armed wait outlasts ``timeout_s``.

    For loaders without workers: a read blocked in the main process cannot be interrupted.
    """

    def __init__(self, timeout_s: float, message: str) -> None:
        self.timeout_s, self.message = timeout_s, message
        self._deadline: float | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self) -> None:
        """Start timing one wait."""
        with self._cond:
            self._deadline = time.monotonic() + self.timeout_s
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="esvit-loader-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> None:
        """The wait ended in time."""
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def close(self) -> None:
        """Stop the watchdog thread."""
        with self._cond:
            self._closed, self._deadline = True, None
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                os.write(sys.stderr.fileno(), f"error: {self.message}\n".encode())
                os._exit(EXIT_STALLED)


class GuardedBatches(Iterator[Any]):
    """Iterator over one epoch of ``loader`` that turns a stall into :class:`LoaderStalledError`.

    Args:
        loader: From :func:`build_loader`.
        timeout_s: Its timeout.
        data_path: Named in the message.
        watchdog: Times each batch when the loader has no workers (one per loader, reused by
            every epoch).
    """

    def __init__(self, loader: DataLoader, timeout_s: float, data_path: str | None = None,
                 watchdog: StallWatchdog | None = None) -> None:
        self.loader = loader
        self.message = stall_message(loader.num_workers, timeout_s, data_path)
        self._watchdog = watchdog if loader.num_workers == 0 else None
        self._it = iter(loader)

    def __next__(self) -> Any:
        if self._watchdog is not None:
            self._watchdog.arm()
            try:
                return next(self._it)
            finally:
                self._watchdog.disarm()
        try:
            return next(self._it)
        except RuntimeError as e:
            if "DataLoader timed out" not in str(e):
                raise
            self._kill_workers()
            raise LoaderStalledError(self.message) from None

    def _kill_workers(self) -> None:
        """SIGKILL the stuck workers and drop the persistent iterator."""
        kill_stalled_workers(self._it)
        if getattr(self.loader, "_iterator", None) is self._it:
            self.loader._iterator = None


def kill_stalled_workers(it: Any) -> None:
    """SIGKILL the decode workers of a stalled DataLoader iterator (stuck, and they ignore SIGTERM),
    and shut the iterator down; training and evaluation loaders both use it. The workers' pids are
    first taken from torch's SIGCHLD handler, which would otherwise report the kill as a crash.
    Uses DataLoader internals (``_workers``, ``_worker_pids_set``), guarded with ``getattr``."""
    if getattr(it, "_worker_pids_set", False):
        from torch.utils.data import _utils

        _utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    workers = list(getattr(it, "_workers", []))
    for w in workers:
        if w.is_alive():
            w.kill()
    for w in workers:
        w.join(timeout=5)
    shutdown = getattr(it, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
