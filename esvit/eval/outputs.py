"""Output folders that a command owns: a ledger of what it wrote, and nothing else is touched.

Every command that writes into a user-given folder (``esvit-embed --out``, ``esvit-knn`` /
``esvit-linear --output-dir`` and their feature caches) goes through :class:`OutputFolder`:

* the folder's ledger, :data:`LEDGER` (``esvit_outputs.json``), lists every file and folder an
  esvit command wrote there (relative paths, with the command that wrote them);
* a name is added to the ledger *before* the file is created, so a killed command never leaves
  an unlisted file behind; files are written to a temporary file in the ledger-listed folder
  :data:`TMP_DIR` and renamed into place (a reader never sees a partial file);
* a command only deletes or replaces files the ledger lists; a folder holding anything else (a
  user's file, another tool's ``embeddings.npy``) is refused with a one-line
  :class:`ForeignFilesError` naming one of the foreign files, before any work is done;
* while a command writes, it holds an exclusive ``flock`` on the folder (the kernel releases it
  when the process dies, so a killed command leaves no stale lock); a second command on the same
  folder stops at once with :class:`FolderBusyError` naming the holder's pid and host.

Single output *files* (``esvit-correspondence --out result.json``) carry their own record: the
JSON object holds ``"written_by"``; an existing file without it is not replaced
(:func:`check_replaceable_json`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "LEDGER",
    "TMP_DIR",
    "FolderBusyError",
    "ForeignFilesError",
    "OutputFolder",
    "active_folder",
    "check_replaceable_json",
    "natural_key_order",
    "write_owned_json",
]

log = logging.getLogger("esvit.outputs")

LEDGER = "esvit_outputs.json"
TMP_DIR = ".esvit-tmp"
LEDGER_FORMAT = "esvit-outputs"
LEDGER_VERSION = 1

_ACTIVE: list[OutputFolder] = []  # claimed folders of this process (see active_folder)


class ForeignFilesError(FileExistsError):
    """An output folder (or file) holds something the command did not write."""


class FolderBusyError(FileExistsError):
    """Another process holds the output folder (CLI exit code 75, as a locked run directory)."""

    exit_code = 75


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class OutputFolder:
    """A user-given output folder written through a ledger (see the module docstring).

    Use as a context manager (or :meth:`claim` / :meth:`release`)::

        with OutputFolder(out_dir, "esvit-knn") as folder:
            folder.write_json("knn_results.json", results)

    Args:
        root: The folder (created if missing).
        command: Name of the command, recorded with every file it writes.
        adopt: Optional callback for folders written before ledgers existed: given the folder,
            returns the relative names that the earlier version of ``command`` wrote there
            (derived from its own manifest). Only those names are adopted.
    """

    def __init__(self, root: str | os.PathLike[str], command: str,
                 adopt: Callable[[Path], Iterable[str]] | None = None) -> None:
        self.root = Path(root)
        self.command = command
        self._adopt = adopt
        self._files: dict[str, str] = {}
        self._dirs: set[str] = set()
        self._lock_fd: int | None = None
        self._created = False

    # ------------------------------------------------------------------ claim / release

    def __enter__(self) -> OutputFolder:
        return self.claim()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def claim(self, wait: float = 0.0) -> OutputFolder:
        """Create / lock the folder and refuse it if it holds foreign files.

        Args:
            wait: Seconds to wait for another process's lock (0: fail at once). Shared folders
                that are held only briefly (feature caches) are claimed with a wait.

        Raises:
            NotADirectoryError: ``root`` exists and is not a folder.
            FolderBusyError: Another process holds the folder.
            ForeignFilesError: The folder holds a file no esvit command recorded writing.
        """
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"output folder {self.root} exists and is not a folder")
        while True:
            self._created = not self.root.exists()
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock(wait)
            if self._locked_is_root():
                break
            os.close(self._lock_fd)  # the holder removed the (empty) folder while we waited
            self._lock_fd = None
        try:
            self._load_ledger()
            foreign = self._foreign()
            if foreign:
                more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
                raise ForeignFilesError(
                    f"output folder {self.root} holds files esvit did not write, e.g. "
                    f"{foreign[0]!r}{more}: esvit only replaces files it recorded in {LEDGER}; "
                    "choose an empty or new folder, or move those files away")
            self._clear_tmp()
            self._dirs.add(TMP_DIR)
            self._save_ledger()
            (self.root / TMP_DIR).mkdir(exist_ok=True)
        except BaseException:
            self.release()
            raise
        _ACTIVE.append(self)
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). Temporary files of this process are removed, and so is a
        folder this claim created when nothing was written into it (a command that failed)."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._lock_fd is None:
            return
        self._clear_tmp()
        if self._created and not self._files:
            with contextlib.suppress(OSError):
                (self.root / TMP_DIR).rmdir()
                (self.root / LEDGER).unlink()
                self.root.rmdir()
        os.close(self._lock_fd)  # closing the descriptor releases the flock
        self._lock_fd = None

    def _lock(self, wait: float = 0.0) -> None:
        import fcntl
        import time

        fd = os.open(self.root, os.O_RDONLY)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
        except BlockingIOError:
            os.close(fd)
            holder = self._holder()
            raise FolderBusyError(f"output folder {self.root} is in use by another process "
                                  f"({holder}); wait for it or choose another folder") from None
        except OSError as e:  # e.g. a network file system without flock: carry on unlocked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL):
                os.close(fd)
                raise
            log.debug("cannot lock %s (%s): continuing without a lock", self.root, e)
        self._lock_fd = fd

    def _locked_is_root(self) -> bool:
        """Whether the locked folder is still the one at ``root`` (not removed meanwhile)."""
        assert self._lock_fd is not None
        try:
            st, locked = os.stat(self.root), os.fstat(self._lock_fd)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (locked.st_dev, locked.st_ino)

    def _holder(self) -> str:
        try:
            w = json.loads((self.root / LEDGER).read_text()).get("writer") or {}
            return f"{w.get('command', '?')}, pid {w.get('pid', '?')} on {w.get('host', '?')}"
        except (OSError, ValueError, AttributeError):
            return "unknown holder"

    # ------------------------------------------------------------------ the ledger

    def _load_ledger(self) -> None:
        path = self.root / LEDGER
        self._files, self._dirs = {}, set()
        if not path.exists():
            if self._adopt is not None:
                names = [n for n in self._adopt(self.root) if (self.root / n).exists()]
                self._files = dict.fromkeys(names, self.command)
                if names:
                    log.info("adopting %d file(s) of an earlier %s in %s", len(names),
                             self.command, self.root)
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != LEDGER_FORMAT:
                raise ValueError("not an esvit ledger")
            self._files = {str(k): str(v) for k, v in data["files"].items()}
            self._dirs = {str(d) for d in data.get("dirs", [])}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise ForeignFilesError(f"output folder {self.root}: {LEDGER} is not a readable esvit "
                                    f"ledger ({e}); choose another folder") from None

    def _save_ledger(self) -> None:
        data = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
                "writer": {"command": self.command, "pid": os.getpid(),
                           "host": socket.gethostname()},
                "dirs": sorted(self._dirs), "files": dict(sorted(self._files.items()))}
        fd, tmp = tempfile.mkstemp(prefix=f".{LEDGER}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode())
            os.replace(tmp, self.root / LEDGER)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)

    def _foreign(self) -> list[str]:
        """Relative names of entries that neither the ledger nor the lock's temp files cover."""
        found: list[str] = []
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            with os.scandir(self.root / rel_dir if rel_dir else self.root) as it:
                for entry in it:
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    if not rel_dir and (entry.name == LEDGER or entry.name.startswith(f".{LEDGER}.")):
                        continue  # the ledger and its temporary files
                    if rel == TMP_DIR and TMP_DIR in self._dirs:
                        continue  # our temporary files: cleared by claim()
                    if entry.is_dir(follow_symlinks=False) and rel in self._dirs:
                        stack.append(rel)
                    elif rel not in self._files or entry.is_dir(follow_symlinks=False):
                        found.append(rel)
        return sorted(found)

    def _clear_tmp(self) -> None:
        tmp = self.root / TMP_DIR
        if TMP_DIR not in self._dirs or not tmp.is_dir():
            return
        for entry in os.scandir(tmp):
            if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def owns(self, name: str) -> bool:
        """Whether the ledger lists ``name`` (a relative path)."""
        return name in self._files

    def files(self, command: str | None = None) -> list[str]:
        """Listed files, optionally only those written by ``command``."""
        return sorted(n for n, c in self._files.items() if command is None or c == command)

    def record(self, *names: str) -> None:
        """Add relative file names (and their parent folders) to the ledger, saved at once."""
        changed = False
        for name in names:
            parts = Path(name).parts
            if not parts or Path(name).is_absolute() or ".." in parts:
                raise ValueError(f"output name must be a relative path inside the folder: {name!r}")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in self._dirs:
                    self._dirs.add(d)
                    changed = True
            key = "/".join(parts)
            if self._files.get(key) != self.command:
                self._files[key] = self.command
                changed = True
        if changed:
            self._save_ledger()
        for name in names:
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)

    def remove(self, names: Iterable[str]) -> int:
        """Delete listed files (unlisted names are left alone) and drop them from the ledger.

        Returns:
            Number of files deleted.
        """
        deleted = 0
        for name in names:
            if name not in self._files:
                log.warning("not deleting %s: %s does not list it", self.root / name, LEDGER)
                continue
            path = self.root / name
            if path.is_file() or path.is_symlink():
                path.unlink()
                deleted += 1
            del self._files[name]
        self._save_ledger()
        return deleted

    # ------------------------------------------------------------------ writing

    def path(self, name: str) -> Path:
        """Absolute-or-relative path of ``name`` inside the folder."""
        return self.root / name

    def temp(self, name: str) -> Path:
        """Record ``name`` and return a fresh temporary path for it (see :meth:`commit`)."""
        if self._lock_fd is None:
            raise RuntimeError(f"output folder {self.root} is not claimed")
        self.record(name)
        fd, tmp = tempfile.mkstemp(prefix=Path(name).name + ".", suffix=".tmp",
                                   dir=self.root / TMP_DIR)
        os.close(fd)
        return Path(tmp)

    def commit(self, tmp: Path, name: str) -> Path:
        """fsync ``tmp`` and rename it to ``name`` (which :meth:`temp` recorded)."""
        _fsync_file(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600 files; outputs follow the umask
        final = self.root / name
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """Context: a temporary path to fill; renamed to ``name`` on success, removed on error."""
        tmp = self.temp(name)
        try:
            yield tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.commit(tmp, name)

    def write_text(self, name: str, text: str, errors: str = "strict") -> Path:
        """Write UTF-8 ``text`` to ``name`` atomically."""
        with self.writing(name) as tmp:
            tmp.write_text(text, encoding="utf-8", errors=errors)
        return self.root / name

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as indented JSON to ``name`` atomically, keys in natural order
        (:func:`natural_key_order`: ``"10"``, ``"20"``, ``"100"``; other keys sorted)."""
        return self.write_text(name, json.dumps(natural_key_order(obj), indent=2) + "\n")

    def torch_save(self, name: str, obj: Any) -> Path:
        """``torch.save`` ``obj`` to ``name`` atomically."""
        import torch

        with self.writing(name) as tmp:
            torch.save(obj, tmp)
        return self.root / name


def natural_key_order(obj: Any) -> Any:
    """``obj`` with the keys of every mapping sorted: integer keys (``"10"``, ``"20"``,
    ``"100"``) numerically and before the others, the others alphabetically."""
    if isinstance(obj, dict):
        def order(key: Any) -> tuple[int, int, str]:
            text = str(key)
            try:
                return (0, int(text), text)
            except ValueError:
                return (1, 0, text)

        return {k: natural_key_order(obj[k]) for k in sorted(obj, key=order)}
    if isinstance(obj, (list, tuple)):
        return [natural_key_order(v) for v in obj]
    return obj


def active_folder(path: str | os.PathLike[str]) -> tuple[OutputFolder, str] | None:
    """The folder claimed by this process that contains ``path``, with ``path``'s name in it."""
    p = Path(os.path.abspath(path))
    for folder in reversed(_ACTIVE):
        root = Path(os.path.abspath(folder.root))
        if root in p.parents:
            return folder, p.relative_to(root).as_posix()
    return None


# ---------------------------------------------------------------------- single output files


def check_replaceable_json(path: str | os.PathLike[str], command: str) -> None:
    """Refuse to replace ``path`` unless it is a JSON object that ``command`` wrote.

    Raises:
        ForeignFilesError: ``path`` exists and is not ``command``'s output.
    """
    p = Path(path)
    if not os.path.lexists(p):
        return
    try:
        if not p.is_file() or p.stat().st_size > 64 << 20:
            raise ValueError("not a small regular file")
        data = json.loads(p.read_text(encoding="utf-8"))
        ours = isinstance(data, dict) and data.get("written_by") == command
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ForeignFilesError(f"{p} exists and was not written by {command}: not replacing it; "
                                "choose another output file or move it away")


def write_owned_json(path: str | os.PathLike[str], obj: dict[str, Any], command: str) -> Path:
    """Write ``obj`` (tagged ``"written_by": command``) to ``path`` after
    :func:`check_replaceable_json`."""
    from esvit.eval.features import write_json

    check_replaceable_json(path, command)
    return write_json({**obj, "written_by": command}, path)
