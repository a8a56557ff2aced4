"""The run engine shared by the long-running commands (``esvit-train``, ``esvit-distill``).

* :mod:`esvit.run.engine`: :class:`~esvit.run.engine.Run`, the run's life cycle (start-up checks,
  lock, resume, logging, checkpoints, NaN guard, graceful stop);
* :mod:`esvit.run.errors`: the expected faults and their exit codes;
* :mod:`esvit.run.fsio`: atomic writes and whole-line appends with one-line errors;
* :mod:`esvit.run.lock`: one run per output directory;
* :mod:`esvit.run.signals`: SIGTERM / SIGINT / SIGUSR1 handling;
* :mod:`esvit.run.resume`: what a resume may and may not change;
* :mod:`esvit.run.loader`: training data loaders with bounded waits;
* :mod:`esvit.run.amp`: mixed precision.

This package's ``__init__`` imports only the leaf modules (no torch at import time), so
:mod:`esvit.train.checkpoint` can use :mod:`esvit.run.fsio` without an import cycle.
"""

from esvit.run.errors import (
    LoaderStalledError,
    NonFiniteLossError,
    OutputDirError,
    Preempted,
    ResumeMismatchError,
    RunError,
    RunLockedError,
)

__all__ = [
    "LoaderStalledError",
    "NonFiniteLossError",
    "OutputDirError",
    "Preempted",
    "ResumeMismatchError",
    "RunError",
    "RunLockedError",
]
