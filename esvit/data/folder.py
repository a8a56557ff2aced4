"""Image folders: fast scanning, a dataset that decodes to a ``uint8`` canvas, bad-file accounting.

Item format shared by every dataset in :mod:`esvit.data`::

    image, label, status = dataset[i]
    image:  torch.uint8 (3, S, S), contiguous (resize_mode "short_side_center_crop" / "stretch"),
            or with resize_mode "letterbox" (training) a Canvas(image uint8 (3, S, S),
            box int64 (4,), source_size int64 (2,)): the whole image letterboxed, and where
            it lies (see esvit.data.decode.Canvas)
    label:  int, class index in [0, len(classes)); -1 when the data set is unlabeled
    status: SampleStatus(ok: bool, index: int, error: str)

``status.index`` is ``i``. When file ``i`` cannot be decoded, ``status.ok`` is False,
``status.error`` says why, and ``image``/``label`` come from a deterministic substitute: the next
index (cyclically) that decodes, or a black canvas with label -1 if none of the next
``max_substitute_tries`` do. Batches therefore keep their shape, and ``default_collate`` turns a
batch into ``(uint8 (B, 3, S, S), int64 (B,), SampleStatus(bool (B,), int64 (B,), list[str]))``
(the first element a ``Canvas`` of ``(B, 3, S, S)``, ``(B, 4)``, ``(B, 2)`` tensors when
letterboxed).

DataLoader workers are separate processes, so the dataset cannot count bad files for the whole
run; the main process does, from the statuses it receives::

    counter = BadImageCounter(max_bad_fraction, dataset.paths)
    for images, labels, status in loader:
        counter.update(status)   # logs the first bad files, raises past the limit
    counter.finalize()           # at epoch / run end: check even below ``min_samples``
"""

from __future__ import annotations

import csv
import logging
import operator
import os
import stat
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, overload

import numpy as np
import torch
from torch.utils.data import Dataset

from esvit.data.decode import (
    BadImageError,
    Canvas,
    blank_canvas,
    check_canvas_args,
    load_canvas,
    load_image,
)

__all__ = [
    "IMG_EXTENSIONS",
    "LIST_SUFFIXES",
    "BadImageCounter",
    "ImageFolderDataset",
    "PathTable",
    "SampleStatus",
    "check_regular_file",
    "file_kind",
    "read_image_list",
    "scan_image_folder",
]

log = logging.getLogger("esvit.data")

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
)
LIST_SUFFIXES: tuple[str, ...] = (".txt", ".csv")
_LIST_HEADERS = ("path", "file", "filename", "image", "img")


class SampleStatus(NamedTuple):
    """Third element of every item (see the module docstring).

    Attributes:
        ok: False when the file at ``index`` could not be decoded and a substitute was returned.
        index: Dataset index that was requested.
        error: Why decoding failed (``""`` when ``ok``).
    """

    ok: bool
    index: int
    error: str = ""


# --------------------------------------------------------------------------------------- scanning


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not exts:
        raise ValueError("extensions must not be empty, e.g. ('.jpg', '.png')")
    return exts


def file_kind(mode: int) -> str:
    """Human name of the file type in an ``st_mode`` (``"FIFO"``, ``"socket"``, ...)."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def check_regular_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`~esvit.data.decode.BadImageError` when ``path`` is not a regular file.

    Opening a FIFO, a socket or a device can block forever, so such inputs are named and never
    opened: the check is one ``os.stat`` (which follows symlinks and opens nothing). A missing
    or unreadable path is left to the decoder, which reports it.
    """
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise BadImageError(os.fspath(path), f"not a regular file ({file_kind(st.st_mode)}): "
                                             "not opened, it could block")


def _warn_special(skipped: list[str]) -> None:
    if skipped:
        log.warning("skipped %d image-named entr%s that %s not regular files (never opened: "
                    "reading a FIFO, socket or device can block): %s%s", len(skipped),
                    "y" if len(skipped) == 1 else "ies", "is" if len(skipped) == 1 else "are",
                    "; ".join(skipped[:10]), " ..." if len(skipped) > 10 else "")


def _walk_images(root_abs: str, exts: tuple[str, ...]) -> tuple[list[str], list[str | None], list[str]]:
    """``(paths, first-level folder of each path or None, first-level folders)`` under a root.

    See :func:`scan_image_folder` for the rules (hidden names, symlink loops, unreadable
    folders, non-regular files).
    """
    st = os.stat(root_abs)
    visited = {(st.st_dev, st.st_ino)}
    paths: list[str] = []
    tops: list[str | None] = []  # first-level folder of each path, None for files in root
    top_dirs: list[str] = []
    stack: list[tuple[str, str | None]] = [(root_abs, None)]
    special: list[str] = []  # image-named entries that are not regular files
    while stack:
        directory, top = stack.pop()
        try:
            it = os.scandir(directory)
        except OSError as e:
            if directory == root_abs:
                raise
            log.warning("skipping unreadable folder %s (%s)", directory, e)
            continue
        try:
            with it:
                for entry in it:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    try:
                        is_dir = entry.is_dir()  # dirent type; stat only for symlinks
                    except OSError:
                        is_dir = False
                    if is_dir:
                        try:
                            dst = entry.stat()  # follows symlinks
                        except OSError as e:
                            log.warning("skipping unreadable folder %s (%s)", entry.path, e)
                            continue
                        key = (dst.st_dev, dst.st_ino)
                        if key in visited:
                            log.debug("skipping %s: folder already visited (symlink loop?)", entry.path)
                            continue
                        visited.add(key)
                        if top is None:
                            top_dirs.append(name)
                        stack.append((entry.path, name if top is None else top))
                    elif name.lower().endswith(exts):
                        kind = _special_kind(entry)
                        if kind:
                            special.append(f"{entry.path} ({kind})")
                            continue
                        paths.append(entry.path)
                        tops.append(top)
        except OSError as e:
            log.warning("stopped listing %s part-way (%s)", directory, e)
    _warn_special(special)
    return paths, tops, top_dirs


def scan_image_folder(
    root: str | os.PathLike[str],
    extensions: Iterable[str] = IMG_EXTENSIONS,
) -> tuple[list[str], list[int] | None, list[str]]:
    """Find the images under ``root`` (recursively) or listed in a ``.txt``/``.csv`` list file.

    The walk uses ``os.scandir`` and its cached entry types, so files cost no ``stat`` call;
    only directories are stat'ed, to follow directory symlinks without looping (each directory
    ``(st_dev, st_ino)`` is entered once). Names starting with ``.`` are skipped (e.g. macOS
    ``._x.jpg`` files). Subdirectories that cannot be listed are skipped with a warning.
    Image-named entries that are not regular files (FIFOs, sockets, devices, also behind a
    symlink) are skipped with a warning naming them and their type: they are never opened,
    since reading a FIFO or a device can block forever. The check is the entry's cached type,
    and ``stat.S_ISREG`` of an ``os.stat`` for the others (broken symlinks stay listed: opening
    them fails at once, and they are reported as bad images).

    Labels: when no image sits directly in ``root``, every first-level subfolder is a class
    (sorted names, like ``torchvision.datasets.ImageFolder``; deeper nesting is fine, and an
    empty class folder keeps its index but is warned about). When images sit directly in
    ``root`` the data set is unlabeled: ``labels`` is None and ``classes`` is empty. List files
    are described in :func:`read_image_list`.

    Args:
        root: Image folder, or a ``.txt``/``.csv`` list file.
        extensions: Accepted file suffixes, case-insensitive (folders only).

    Returns:
        ``(paths, labels, classes)``: absolute file paths in sorted (deterministic) order,
        a class index per path or None, and the class names.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file that is not a ``.txt``/``.csv`` list.
        ValueError: No image found.
    """
    root_str = os.fspath(root)
    exts = _normalise_extensions(extensions)
    if os.path.isfile(root_str):
        if root_str.lower().endswith(LIST_SUFFIXES):
            return read_image_list(root_str)
        raise NotADirectoryError(
            f"{root_str!r} is a file: expected an image folder or a list file ending in "
            f"{' / '.join(LIST_SUFFIXES)}"
        )
    if not os.path.isdir(root_str):
        if os.path.exists(root_str):
            raise NotADirectoryError(f"{root_str!r} is a {file_kind(os.stat(root_str).st_mode)}, "
                                     "not an image folder or a list file: not opening it")
        raise FileNotFoundError(f"image folder not found: {root_str!r}")
    root_abs = os.path.abspath(root_str)

    paths, tops, top_dirs = _walk_images(root_abs, exts)

    if not paths:
        raise ValueError(f"no images found in {root_abs!r} (accepted extensions, case-insensitive: "
                         f"{', '.join(exts)})")
    order = sorted(range(len(paths)), key=paths.__getitem__)
    paths = [paths[i] for i in order]
    if any(t is None for t in tops):
        if top_dirs:
            log.info("%s has images directly inside it: treating it as unlabeled", root_abs)
        return paths, None, []
    classes = sorted(top_dirs)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    labels = [class_to_idx[tops[i]] for i in order]  # type: ignore[index]
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    empty = [c for c, k in zip(classes, counts, strict=True) if k == 0]
    if empty:
        log.warning("%d class folder(s) in %s hold no images (kept as classes): %s",
                    len(empty), root_abs, ", ".join(empty[:10]))
    return paths, labels, classes


def _special_kind(entry: os.DirEntry[str]) -> str:
    """The type of an entry that exists but is not a regular file (``""`` otherwise).

    Regular files cost nothing (the cached directory-entry type); other entries one ``stat``
    (following symlinks). Nothing is opened. A symlink that cannot be followed (broken, a
    loop) is not special: opening it fails at once, and the decoder reports it as a bad image.
    """
    try:
        if entry.is_file():
            return ""
        mode = entry.stat().st_mode
    except OSError:
        return ""
    return "" if stat.S_ISREG(mode) else file_kind(mode)


def read_image_list(list_path: str | os.PathLike[str]) -> tuple[list[str], list[int] | None, list[str]]:
    """Read a list file: one image per line, ``path`` or ``path,label`` (CSV quoting allowed).

    Relative paths are relative to the list file's folder. Blank lines and lines starting with
    ``#`` are skipped, as is a first line whose path field is a header word (``path``, ``file``,
    ``filename``, ``image``, ``img``). Either every entry has a label or none does. Integer
    labels are used as class indices (``classes`` = ``["0", ..., str(max)]``); other labels are
    class names, indexed in sorted order. Listed files are not checked here (a million
    ``stat`` calls on a network file system): missing ones, and ones that are not regular files
    (:func:`check_regular_file`, never opened), are bad images at load time.

    Returns:
        ``(paths, labels or None, classes)`` in file order.

    Raises:
        FileNotFoundError: The list file does not exist.
        ValueError: Malformed lines, mixed labeled/unlabeled lines, or no entries.
    """
    list_path = os.fspath(list_path)
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"image list file not found: {list_path!r}")
    base = os.path.dirname(os.path.abspath(list_path))
    paths: list[str] = []
    raw_labels: list[str | None] = []
    first_line: dict[bool, int] = {}
    with open(list_path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if not paths and row[0].lower() in _LIST_HEADERS:
                continue
            if len(row) > 2:
                raise ValueError(f"{list_path}:{lineno}: expected 'path' or 'path,label', got {len(row)} "
                                 f"fields: {row!r}")
            p = row[0]
            paths.append(p if os.path.isabs(p) else os.path.join(base, p))
            label = row[1] if len(row) == 2 and row[1] else None
            raw_labels.append(label)
            first_line.setdefault(label is not None, lineno)
    if not paths:
        raise ValueError(f"list file {list_path!r} has no entries (expected lines 'path' or 'path,label')")
    if len(first_line) == 2:
        raise ValueError(f"{list_path}: either every line or no line must have a label; line "
                         f"{first_line[True]} has one, line {first_line[False]} does not")
    if raw_labels[0] is None:
        return paths, None, []
    names: list[str] = raw_labels  # type: ignore[assignment]
    if all(_is_nonneg_int(s) for s in names):
        labels = [int(s) for s in names]
        return paths, labels, [str(i) for i in range(max(labels) + 1)]
    classes = sorted(set(names))
    idx = {c: i for i, c in enumerate(classes)}
    return paths, [idx[s] for s in names], classes


def _is_nonneg_int(s: str) -> bool:
    return s.isascii() and s.isdigit()


# ------------------------------------------------------------------------------------ path storage


class PathTable(Sequence[str]):
    """Immutable list of paths stored as one byte buffer plus offsets.

    A Python list of a million ``str`` objects gets copied page by page into every forked
    DataLoader worker as soon as the workers touch the strings' reference counts; this table
    holds two numpy arrays instead, so it stays shared (and pickles compactly for ``spawn``).
    A common directory prefix is stored once.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        prefix = os.path.commonprefix([min(paths), max(paths)]) if paths else ""
        cut = prefix.rfind(os.sep) + 1
        self._prefix = prefix[:cut]
        encoded = [os.fsencode(p[cut:]) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"path index {index} out of range for {n} paths")
        a, b = self._offsets[i], self._offsets[i + 1]
        return self._prefix + os.fsdecode(self._buf[a:b].tobytes())

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths under {self._prefix!r})"


# ----------------------------------------------------------------------------------------- dataset


class ImageFolderDataset(Dataset):
    """Images of a folder (or list file) decoded to a square ``uint8`` canvas.

    Workers only decode and resize (:func:`esvit.data.decode.load_image`, or
    :func:`esvit.data.decode.load_canvas` for ``resize_mode="letterbox"``); items follow the
    module-level format ``(image uint8 (3, S, S) or Canvas, label int, SampleStatus)``. A file that fails
    to decode never raises: the item is flagged (``status.ok`` False) and carries a
    deterministic substitute, and the index is added to :attr:`bad_indices` of the process that
    decoded it. Run-wide accounting against ``max_bad_fraction`` is :class:`BadImageCounter`'s
    job in the main process.

    Args:
        root_or_list: Image folder or ``.txt``/``.csv`` list file (:func:`scan_image_folder`).
        canvas_size: Canvas side ``S``.
        max_bad_fraction: Tolerated fraction of bad samples, for :meth:`bad_counter`.
        resize_mode: ``"short_side_center_crop"``, ``"stretch"`` or ``"letterbox"`` (items
            carry a :class:`~esvit.data.decode.Canvas`; a substitute carries its own box).
        extensions: Accepted suffixes when scanning a folder.
        max_substitute_tries: How many following indices to try as a substitute.

    Attributes:
        paths: :class:`PathTable` of absolute paths (index -> path).
        labels: ``np.int64`` array of class indices, or None when unlabeled.
        classes: Class names (empty when unlabeled).
        bad_indices: Indices found bad *in this process* (complete only with ``num_workers=0``).
    """

    def __init__(
        self,
        root_or_list: str | os.PathLike[str],
        canvas_size: int,
        max_bad_fraction: float = 0.01,
        resize_mode: str = "short_side_center_crop",
        extensions: Iterable[str] = IMG_EXTENSIONS,
        max_substitute_tries: int = 16,
    ) -> None:
        check_canvas_args(canvas_size, resize_mode)
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        if max_substitute_tries < 0:
            raise ValueError(f"max_substitute_tries must be >= 0, got {max_substitute_tries!r}")
        paths, labels, classes = scan_image_folder(root_or_list, extensions)
        self.root = os.fspath(root_or_list)
        self.canvas_size = canvas_size
        self.resize_mode = resize_mode
        self.max_bad_fraction = float(max_bad_fraction)
        self.max_substitute_tries = int(max_substitute_tries)
        self.paths = PathTable(paths)
        self.labels: np.ndarray | None = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.bad_indices: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _label(self, index: int) -> int:
        return -1 if self.labels is None else int(self.labels[index])

    def _try_load(self, index: int) -> tuple[torch.Tensor | Canvas | None, str]:
        try:
            if self.resize_mode == "letterbox":
                return load_canvas(self.paths[index], self.canvas_size), ""
            return load_image(self.paths[index], self.canvas_size, self.resize_mode), ""
        except BadImageError as e:
            self.bad_indices.add(index)
            return None, e.reason

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Canvas, int, SampleStatus]:
        n = len(self)
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        img, error = self._try_load(i)
        if img is not None:
            return img, self._label(i), SampleStatus(True, i, "")
        log.debug("bad image %s: %s", self.paths[i], error)
        for k in range(1, min(self.max_substitute_tries, n - 1) + 1):
            j = (i + k) % n
            sub, _ = self._try_load(j)
            if sub is not None:
                return sub, self._label(j), SampleStatus(False, i, error)
        blank = blank_canvas(self.canvas_size)
        return (blank if self.resize_mode == "letterbox" else blank.image), -1, SampleStatus(False, i, error)

    def bad_counter(self, min_samples: int = 100) -> BadImageCounter:
        """A :class:`BadImageCounter` with this dataset's limit and paths."""
        return BadImageCounter(self.max_bad_fraction, self.paths, min_samples=min_samples)

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.labels is not None else "unlabeled"
        return (f"ImageFolderDataset({self.root!r}, {len(self)} images, {kind}, "
                f"canvas_size={self.canvas_size}, resize_mode={self.resize_mode!r})")


# ---------------------------------------------------------------------------------- bad accounting


def _unpack_status(status: Any) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """(ok bool (B,), index int64 (B,) or None, errors or None) from a status or a bool batch."""
    if isinstance(status, SampleStatus):
        ok = torch.as_tensor(status.ok, dtype=torch.bool).reshape(-1)
        index = torch.as_tensor(status.index, dtype=torch.int64).reshape(-1)
        err = status.error
        errors = [err] * ok.numel() if isinstance(err, str) else list(err)
        return ok, index, errors
    ok = torch.as_tensor(status).reshape(-1)
    if ok.dtype != torch.bool:
        raise TypeError(f"expected a SampleStatus or a bool tensor of ok flags, got dtype {ok.dtype}")
    return ok, None, None


class BadImageCounter:
    """Counts bad samples seen by the main process and enforces ``max_bad_fraction``.

    Feed it the ``SampleStatus`` of every batch (:meth:`update`; a plain bool ``ok`` tensor also
    works, without file names). The first ``max_logged`` bad files are logged as warnings on
    ``logging.getLogger("esvit.data")``. Once at least ``min_samples`` samples were seen, a bad
    fraction above ``max_bad_fraction`` raises RuntimeError naming the count, fraction, limit and
    first bad files; :meth:`finalize` (call at epoch or run end) checks regardless of
    ``min_samples``. A file drawn twice counts twice: the fraction is over samples, not files.
    With several ranks, each rank counts the samples it loads.

    Args:
        max_bad_fraction: Limit in [0, 1].
        paths: Index -> path (e.g. ``dataset.paths``) to name files; None names indices.
        min_samples: Samples to see before :meth:`update` starts checking.
        max_logged: Bad files logged and kept for the error message.
    """

    def __init__(
        self,
        max_bad_fraction: float = 0.01,
        paths: Sequence[str] | None = None,
        min_samples: int = 100,
        max_logged: int = 5,
    ) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        self.max_bad_fraction = float(max_bad_fraction)
        self.paths = paths
        self.min_samples = int(min_samples)
        self.max_logged = int(max_logged)
        self.seen = 0
        self.bad = 0
        self.first_bad: list[str] = []  # "path (reason)" of the first bad samples

    @property
    def fraction(self) -> float:
        """Bad fraction of the samples seen so far (0 before any)."""
        return self.bad / self.seen if self.seen else 0.0

    def _name(self, index: int | None) -> str:
        if index is None:
            return "<unknown file>"
        if self.paths is not None:
            try:
                return str(self.paths[index])
            except (IndexError, TypeError):
                pass
        return f"index {index}"

    def update(self, status: SampleStatus | torch.Tensor | Sequence[bool]) -> int:
        """Count one batch (or one item) and check the limit.

        Args:
            status: Collated :class:`SampleStatus` (``ok`` bool ``(B,)``, ``index`` ``(B,)``,
                ``error`` list of B str), a single item's status, or ok flags ``(B,)``.

        Returns:
            Number of bad samples in this batch.

        Raises:
            RuntimeError: The bad fraction exceeds the limit after ``min_samples`` samples.
        """
        ok, index, errors = _unpack_status(status)
        n_bad = int((~ok).sum())
        self.seen += ok.numel()
        self.bad += n_bad
        if n_bad:
            for pos in torch.nonzero(~ok).flatten().tolist():
                if len(self.first_bad) >= self.max_logged:
                    break
                name = self._name(None if index is None else int(index[pos]))
                reason = errors[pos] if errors else ""
                self.first_bad.append(f"{name} ({reason})" if reason else name)
                log.warning("bad image %s%s: replaced by a substitute (%d bad of %d samples so far)",
                            name, f" ({reason})" if reason else "", self.bad, self.seen)
                if len(self.first_bad) == self.max_logged:
                    log.warning("further bad images are counted but not logged one by one")
        if self.seen >= self.min_samples:
            self.check()
        return n_bad

    def check(self) -> None:
        """Raise RuntimeError if the bad fraction so far exceeds ``max_bad_fraction``."""
        if self.seen and self.fraction > self.max_bad_fraction:
            raise RuntimeError(
                f"{self.bad} of {self.seen} samples ({self.fraction:.2%}) were unreadable images, above "
                f"max_bad_fraction={self.max_bad_fraction:g} ({self.max_bad_fraction:.2%}). First bad "
                f"files: {'; '.join(self.first_bad) or 'unknown'}. Remove or fix them, or raise the limit."
            )

    def finalize(self) -> None:
        """Epoch / run end: check the limit even if fewer than ``min_samples`` were seen."""
        self.check()

    def reset(self) -> None:
        """Forget all counts (e.g. per-epoch accounting)."""
        self.seen = self.bad = 0
        self.first_bad = []
