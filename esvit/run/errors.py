"""Errors of the run engine and the exit codes the command-line tools map them to.

Every expected fault of a long run is one of these classes; the CLIs print ``str(error)`` as one
line (``error: ...``, or ``stopped: ...`` for a preemption) and exit with ``error.exit_code``:

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     finished
2     invalid input: config, arguments, data, checkpoint; a resume that would change the run;
      a non-finite loss
74    the output directory cannot be written (read-only, path too long, disk full, ...)
75    the output directory is in use by another run (the lock holder's pid and host are named)
124   the data loader stalled: no batch within the loader timeout
130   stopped by SIGINT after a checkpoint (``128 + signal number``; resume with ``--resume auto``)
138   stopped by SIGUSR1 after a checkpoint
143   stopped by SIGTERM after a checkpoint
====  ==========================================================================================
"""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = [
    "EXIT_CODES_HELP",
    "EXIT_INVALID",
    "EXIT_IO",
    "EXIT_LOCKED",
    "EXIT_STALLED",
    "LoaderStalledError",
    "NonFiniteLossError",
    "OutputDirError",
    "Preempted",
    "ResumeMismatchError",
    "RunError",
    "RunLockedError",
]

EXIT_CODES_HELP = """\
exit codes: 0 finished; 2 invalid input (config, data, checkpoint, a resume that would change the
run, non-finite loss); 74 output directory not writable (read-only, path too long, disk full);
75 output directory in use by another run; 124 data loader stalled; 130 / 138 / 143 stopped by
SIGINT / SIGUSR1 / SIGTERM after writing a checkpoint (continue with --resume auto)."""

EXIT_INVALID = 2
EXIT_IO = 74  # sysexits.h EX_IOERR
EXIT_LOCKED = 75  # sysexits.h EX_TEMPFAIL: try again once the other run is over
EXIT_STALLED = 124  # as coreutils timeout(1)


class RunError(RuntimeError):
    """An expected fault of a run: the CLI prints it as one line and exits with ``exit_code``."""

    exit_code: int = EXIT_INVALID
    label: str = "error"


class NonFiniteLossError(RunError):
    """The loss, a gradient norm or the weights became NaN/inf; nothing non-finite was saved."""


class ResumeMismatchError(RunError):
    """Resuming would silently change the run (batch size, schedule, data ...)."""


class OutputDirError(RunError):
    """The output directory cannot be created or written; the message names the path and cause."""

    exit_code = EXIT_IO


class RunLockedError(RunError):
    """Another live run holds the output directory's lock."""

    exit_code = EXIT_LOCKED


class LoaderStalledError(RunError):
    """No batch arrived from the data loader within its timeout."""

    exit_code = EXIT_STALLED


class Preempted(RunError):
    """A stop signal arrived; the run wrote a checkpoint and stopped.

    Args:
        signum: The signal (SIGTERM, SIGINT or SIGUSR1).
        step: Global step of the checkpoint written.
        checkpoint: Its path.
    """

    label = "stopped"

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        super().__init__(
            f"{signal_name(signum)} received: stopped after step {step}, checkpoint {checkpoint} written; "
            f"continue with --resume auto (exit code {self.exit_code})"
        )

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        """``128 + signal number``, as a shell reports a process ended by that signal."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, etc."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
