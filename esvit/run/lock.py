"""One run per output directory: an exclusive ``flock`` that the kernel releases when the holder dies.

The lock file ``<output_dir>/.esvit.lock`` holds the holder's pid, host and start time (for the
message a second run prints). The lock itself is the ``flock`` on the open file, not the file's
existence: a SIGKILLed or crashed holder never leaves a stale lock, and the file is left in place
(removing it would let two runs lock two different files of the same name).

Forked children (DataLoader workers) close their inherited copy of the descriptor right after
the fork, so the lock lives exactly as long as the process that took it. Locks conflict between
open files even within one process, so a second run started in the same process is refused too.

Shared file systems: NFS clients implement ``flock`` with NFS byte-range locks (Linux >= 2.6.12),
so runs on different nodes exclude each other; Lustre needs the ``flock`` mount option. Where the
file system does not support locks at all (``ENOLCK``, ``EOPNOTSUPP``) the run warns once and
continues unlocked.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from esvit.run.errors import OutputDirError, RunLockedError
from esvit.run.fsio import describe_os_error, write_all

__all__ = ["LOCK_NAME", "OutputLock"]

log = logging.getLogger("esvit.run")

LOCK_NAME = ".esvit.lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds (closed in forked children)


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class OutputLock:
    """Exclusive lock on a run directory.

    Args:
        directory: The run's output directory (must exist).
        command: Name of the command holding it (written into the lock file).
    """

    def __init__(self, directory: str | Path, command: str = "esvit") -> None:
        self.path = Path(directory) / LOCK_NAME
        self.command = command
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock or fail at once.

        Returns:
            True when locked, False when the file system cannot lock (a warning is logged).

        Raises:
            RunLockedError: Another process holds it (naming its pid and host).
            OutputDirError: The lock file cannot be created or written.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise OutputDirError(f"cannot create lock file {self.path}: {describe_os_error(e)}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another run ({holder}; lock file {self.path}): wait for it "
                "to finish or stop it, or choose another logging.output_dir"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                log.warning("cannot lock %s (%s): this file system does not support locks; nothing stops a "
                            "second run from writing into %s", self.path, describe_os_error(e), self.path.parent)
                return False
            raise OutputDirError(f"cannot lock {self.path}: {describe_os_error(e)}") from e
        self.fd = fd
        _HELD.add(fd)
        self._write_holder()
        return True

    def _write_holder(self) -> None:
        assert self.fd is not None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        text = f"pid {os.getpid()} on host {socket.gethostname()} ({self.command}, started {started})\n"
        try:
            os.ftruncate(self.fd, 0)
            write_all(self.fd, text.encode())
        except OSError as e:
            self.release()
            raise OutputDirError(f"cannot write lock file {self.path}: {describe_os_error(e)}") from e

    def release(self) -> None:
        """Unlock and close (idempotent); the file stays."""
        if self.fd is None:
            return
        _HELD.discard(self.fd)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """The holder line of a lock file (``pid 123 on host n1 (...)``), or a placeholder."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "holder unknown: the lock file is empty"
