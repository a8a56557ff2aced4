"""Writes into the run directory that never leave a torn file and fail with one clear line.

* :func:`atomic_write`: temp file in the same folder, written through :class:`FdWriter`, fsynced,
  renamed over the final name, folder fsynced. A failure (disk full, quota, I/O error) removes
  the temp file, leaves the previous version of the file intact, and raises
  :class:`~esvit.run.errors.OutputDirError` naming the path and the operating system's cause,
  even when the writer was ``torch.save`` (which reports a failed write as
  ``unexpected pos ...``).
* :class:`LineAppender`: appends whole lines; a write that fails partway is cut off again, so a
  reader never sees half a line written by this process.
* :func:`probe_writable`: creates the folder and writes, fsyncs and removes a probe file whose
  name is as long as the longest name a run writes, before any expensive work.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esvit.run.errors import OutputDirError

__all__ = ["FdWriter", "LineAppender", "atomic_write", "describe_os_error", "probe_writable"]

LONGEST_NAME = ".checkpoint_00000000.pt.xxxxxxxx.tmp"  # mkstemp temp name of a checkpoint
_CHUNK = 1 << 20


def describe_os_error(e: BaseException) -> str:
    """``"OSError: [Errno 28] No space left on device"`` (no file name: the caller names it)."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{type(e).__name__}: [Errno {e.errno}] {e.strerror or os.strerror(e.errno)}"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written (a short write is retried, an error raised)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - regular files never return 0 for a non-empty write
            raise OSError(errno.EIO, "write returned 0")
        view = view[n:]


class FdWriter:
    """A minimal binary file object over a raw descriptor that keeps the first ``OSError``.

    ``torch.save`` wraps a failed ``write`` into a ``RuntimeError`` that hides the cause;
    :attr:`error` keeps it. Small writes are coalesced into 1 MiB chunks.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.error: OSError | None = None
        self._buf = bytearray()
        self._written = 0

    def write(self, data: Any) -> int:
        """Buffer or write ``data``; returns its length."""
        data = memoryview(data).cast("B")
        self._buf += data
        if len(self._buf) >= _CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        """Write the buffered bytes."""
        if not self._buf:
            return
        try:
            write_all(self.fd, self._buf)
        except OSError as e:
            self.error = self.error or e
            raise
        self._written += len(self._buf)
        self._buf.clear()

    def tell(self) -> int:
        """Bytes written so far (buffered ones included)."""
        return self._written + len(self._buf)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[FdWriter], None], what: str = "file") -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temp file that then replaces ``path``.

    Args:
        path: Final path (its folder is created).
        write: Called with an :class:`FdWriter`; may raise.
        what: What the file is, for the error message (``checkpoint``, ``config`` ...).

    Returns:
        ``path``.

    Raises:
        OutputDirError: An ``OSError`` while creating, writing, syncing or renaming (the temp file
            is removed and an existing ``path`` is left as it was).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputDirError(f"cannot write {what} {path}: {describe_os_error(e)}") from e
    writer = FdWriter(fd)
    try:
        try:
            write(writer)
            writer.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = writer.error or (e if isinstance(e, OSError) else None)
        if cause is not None and isinstance(e, Exception):
            raise OutputDirError(f"cannot write {what} {path}: {describe_os_error(cause)}") from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), what)


class LineAppender:
    """Appends whole lines to a file (``O_APPEND``); a failed append leaves no partial line.

    Args:
        path: The file (created if missing).
        what: What the file is, for error messages.

    Raises:
        OutputDirError: The file cannot be opened or a line cannot be written.
    """

    def __init__(self, path: str | Path, what: str = "file") -> None:
        self.path, self.what = Path(path), what
        try:
            self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise OutputDirError(f"cannot open {what} {self.path}: {describe_os_error(e)}") from e

    def append(self, line: str) -> None:
        """Write ``line`` plus a newline in one piece (cut back to the old end on failure)."""
        if self.fd is None:
            raise OutputDirError(f"cannot append to {self.what} {self.path}: file closed")
        data = (line.rstrip("\n") + "\n").encode("utf-8")
        end = os.fstat(self.fd).st_size
        try:
            write_all(self.fd, data)
        except OSError as e:
            try:
                os.ftruncate(self.fd, end)  # no torn line left behind
            except OSError:
                pass
            raise OutputDirError(f"cannot append to {self.what} {self.path}: {describe_os_error(e)}") from e

    def sync(self) -> None:
        """fsync the file (records up to here survive a crash of the machine)."""
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError as e:
                raise OutputDirError(f"cannot sync {self.what} {self.path}: {describe_os_error(e)}") from e

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def probe_writable(directory: str | Path, what: str = "output directory") -> Path:
    """Create ``directory`` and check a file can be created, written, synced and removed in it.

    The probe file's name is as long as the longest name a run writes, so an over-long path
    fails here rather than at the first checkpoint.

    Returns:
        The directory as a :class:`~pathlib.Path`.

    Raises:
        OutputDirError: Naming the directory (or the probe file) and the cause.
    """
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create {what} {d}: {describe_os_error(e)}") from e
    if not d.is_dir():
        raise OutputDirError(f"{what} {d} is not a directory")
    name = f".esvit-write-probe-{os.getpid()}"
    probe = d / (name + "x" * max(0, len(LONGEST_NAME) - len(name)))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, b"esvit write probe\n" * 228)  # 4 KiB: one block really allocated
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise OutputDirError(f"{what} {d} is not writable: cannot write {probe.name}: "
                             f"{describe_os_error(e)}") from e
    return d
