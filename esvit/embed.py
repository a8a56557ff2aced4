"""Embedding extraction: a folder or list of images -> embeddings on disk, resumable.

Images are taken in a deterministic (sorted) order and processed in *shards* of
``shard_size`` images. Each shard is written atomically (temporary file + rename) as
``embeddings_00000.npy`` (or ``.pt`` / ``.safetensors``), with ``regions_00000.npy`` for region
tokens and ``paths_00000.csv`` for the embedded images; ``manifest.json`` records the finished
shards and the settings. A restarted run with the same settings skips finished shards, so a
killed extraction over a large folder loses at most one shard of work. ``embeddings.csv`` lists
``row,path,label`` for every row. Unreadable images (and inputs that are not regular files:
FIFOs, devices, never opened) are skipped, counted and listed in ``bad_files.txt``.

At the end the shards are merged (``merge=True``, the default) into ``embeddings.npy`` (and
``regions.npy``) through ``np.lib.format.open_memmap`` (bounded memory); once the merged files
are written and checked (shape, dtype, each shard's first and last rows), ``manifest.json``
records them (``"merged"``) and the shards are deleted, so a finished folder holds each
embedding once. A crash at any point loses nothing: before the manifest says ``merged`` the
shards are the data (a rerun merges again), after it the merged files are (a rerun deletes any
shard left over). With ``merge=False`` the shards are the result.

The output folder is owned through a ledger (:class:`esvit.eval.outputs.OutputFolder`):
``esvit-embed`` only creates, replaces or (with ``overwrite``) deletes files that the ledger
lists as its own, and refuses a folder holding anything else, naming one of the foreign files.

CSV files (``embeddings.csv``, ``paths_*.csv``) are RFC 4180: comma-separated, CRLF line ends,
fields holding a comma, a quote, CR or LF are quoted (quotes doubled), so any file name,
newlines included, is one field of one row. They are UTF-8; a file name that is not valid UTF-8
is written as its original bytes (Python's ``surrogateescape``), so read them with
:func:`read_embeddings_csv`, ``open(path, newline="", encoding="utf-8",
errors="surrogateescape")`` + ``csv.reader``, or ``pandas.read_csv(path, dtype=str,
keep_default_na=False, encoding_errors="surrogateescape")``. ``bad_files.txt`` holds
``path<TAB>reason`` lines, quoted the same way when a field holds a tab, quote, CR or LF
(``csv.reader(f, delimiter="\\t")`` reads it).

Memory does not grow with the number of images: ``.npy`` shards are filled in place through a
memory map, and only a batch of images is in flight at a time.

The module is callable: ``esvit.embed(...)`` is :func:`embed_images`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from esvit.eval.features import (
    EvalModel,
    EvalPreprocess,
    make_loader,
    resolve_device,
    resolve_eval_model,
    resolve_preprocess,
)
from esvit.eval.features import preprocess as to_model_input
from esvit.eval.outputs import OutputFolder

__all__ = ["EMBED_DTYPES", "EMBED_FORMATS", "EmbedResult", "embed", "embed_images",
           "read_embeddings_csv"]

log = logging.getLogger("esvit.embed")

COMMAND = "esvit-embed"
EMBED_DTYPES = ("float32", "float16")
EMBED_FORMATS = ("npy", "pt", "safetensors")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 3  # 2: bad images as [index, reason], ledger; 3: "merged", shards deleted
CSV_ENCODING, CSV_ERRORS = "utf-8", "surrogateescape"
_COPY_ROWS = 4096  # rows copied at a time when compacting / merging memory maps
_EXT = {"npy": ".npy", "pt": ".pt", "safetensors": ".safetensors"}


@dataclass
class EmbedResult:
    """What :func:`embed_images` wrote.

    Attributes:
        out_dir: Output folder.
        num_images: Images embedded (rows).
        num_bad: Unreadable images skipped (listed in ``bad_files.txt``).
        dim: Embedding dimension.
        embeddings: Merged embeddings file (None with ``merge=False``).
        regions: Merged region tokens ``(n, tokens, d)`` ``.npy`` (None if not requested/merged).
        csv: ``embeddings.csv`` (``row,path,label``).
        bad_files: ``bad_files.txt`` or None when every image was readable.
        shards: Shard embedding files, in order (empty once merged: the shards are deleted).
        skipped_shards: Shards found complete and not recomputed.
        preprocess: The evaluation preprocessing used
            (:meth:`~esvit.eval.features.EvalPreprocess.record`; also in ``manifest.json``).
    """

    out_dir: Path
    num_images: int
    num_bad: int
    dim: int
    embeddings: Path | None
    regions: Path | None
    csv: Path
    bad_files: Path | None
    shards: list[Path] = field(default_factory=list)
    skipped_shards: int = 0
    preprocess: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs


def _list_inputs(inputs: str | Path | Sequence[str | Path]) -> tuple[list[str], list[str], str]:
    """``(paths, labels, description)`` of a folder, a list file or a sequence of paths.

    Folders are scanned recursively in sorted order (:func:`esvit.data.scan_image_folder`); the
    label is the class (first-level subfolder) name, ``""`` for unlabeled folders. List files
    (``.txt`` / ``.csv``, lines ``path`` or ``path,label``) keep their order.
    """
    from esvit.data.folder import scan_image_folder

    if isinstance(inputs, (str, os.PathLike)):
        paths, labels, classes = scan_image_folder(inputs)
        names = [classes[y] for y in labels] if labels is not None else [""] * len(paths)
        return paths, names, str(Path(inputs).resolve())
    paths = [os.path.abspath(os.fspath(x)) for x in inputs]
    if not paths:
        raise ValueError("no input images given")
    return paths, [""] * len(paths), f"<{len(paths)} paths>"


class _ImageList(torch.utils.data.Dataset):
    """Decode images as ``pre`` says: item ``i`` -> ``(image (3, s, s), ok, i, error)``.

    ``pre`` may be a plain decode size ``S`` (the whole centre square at ``S``, no crop), as
    :mod:`esvit.eval.correspondence` uses it.
    """

    def __init__(self, paths: Sequence[str], pre: EvalPreprocess | int) -> None:
        from esvit.data.folder import PathTable

        self.paths = PathTable(list(paths))
        self.pre = pre if isinstance(pre, EvalPreprocess) else EvalPreprocess("resize", pre, pre)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, bool, int, str]:
        from esvit.data.decode import BadImageError

        try:
            return self.pre.decode(self.paths[i]), True, i, ""
        except BadImageError as e:
            side = self.pre.item_size
            return torch.zeros(3, side, side, dtype=torch.uint8), False, i, e.reason


# --------------------------------------------------------------------------- CSV files


def _open_csv(path: Path, mode: str) -> Any:
    return open(path, mode, newline="", encoding=CSV_ENCODING, errors=CSV_ERRORS)


def read_embeddings_csv(path: str | os.PathLike[str]) -> list[list[str]]:
    """Rows (header first) of an ``embeddings.csv`` / ``paths_*.csv`` written by esvit-embed.

    File names that are not valid UTF-8 come back as the ``str`` Python gives them
    (``surrogateescape``): the same string as the path the folder scan found.
    """
    with _open_csv(Path(path), "r") as f:
        return list(csv.reader(f))


def _tsv_field(text: str) -> str:
    """A ``bad_files.txt`` field: quoted (CSV rules) when it holds a tab, quote, CR or LF."""
    if any(c in text for c in '\t"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


# --------------------------------------------------------------------------- array files


class _RowWriter:
    """Rows of one array written to ``name``: ``.npy`` through a memory map, else buffered."""

    def __init__(self, folder: OutputFolder, name: str, capacity: int,
                 row_shape: tuple[int, ...], dtype: np.dtype, fmt: str, key: str) -> None:
        self.folder, self.name, self.fmt, self.key, self.dtype = folder, name, fmt, key, dtype
        self.rows = 0
        self.capacity = capacity
        self.row_shape = row_shape
        self.mapped = fmt == "npy" and capacity > 0
        if self.mapped:
            self.tmp = folder.temp(name)
            self.mm = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype,
                                                shape=(capacity, *row_shape))
        else:
            self.parts: list[np.ndarray] = []

    def append(self, block: np.ndarray) -> None:
        block = block.astype(self.dtype, copy=False)
        if self.mapped:
            self.mm[self.rows:self.rows + len(block)] = block
        else:
            self.parts.append(block)
        self.rows += len(block)

    def close(self) -> None:
        if not self.mapped:
            arr = (np.concatenate(self.parts) if self.parts
                   else np.zeros((0, *self.row_shape), dtype=self.dtype))
            _save_array(self.folder, self.name, arr, self.fmt, self.key)
            return
        self.mm.flush()
        self.mm = None
        if self.rows != self.capacity:  # some images were unreadable: compact
            exact = self.folder.temp(self.name)
            src = np.load(self.tmp, mmap_mode="r")
            dst = np.lib.format.open_memmap(exact, mode="w+", dtype=self.dtype,
                                            shape=(self.rows, *self.row_shape))
            for s in range(0, self.rows, _COPY_ROWS):
                e = min(s + _COPY_ROWS, self.rows)
                dst[s:e] = src[s:e]
            dst.flush()
            del src, dst
            self.tmp.unlink()
            self.tmp = exact
        self.folder.commit(self.tmp, self.name)

    def abort(self) -> None:
        if self.mapped:
            self.mm = None
            self.tmp.unlink(missing_ok=True)


def _save_array(folder: OutputFolder, name: str, arr: np.ndarray, fmt: str, key: str) -> None:
    with folder.writing(name) as tmp:
        if fmt == "npy":
            with open(tmp, "wb") as f:
                np.save(f, arr)
        elif fmt == "pt":
            torch.save({key: torch.from_numpy(np.ascontiguousarray(arr))}, tmp)
        else:
            from safetensors.numpy import save_file

            save_file({key: np.ascontiguousarray(arr)}, str(tmp))


def _load_array(path: Path, fmt: str, key: str) -> np.ndarray:
    if fmt == "npy":
        return np.load(path, mmap_mode="r")
    if fmt == "pt":
        from esvit.train.checkpoint import safe_load

        return safe_load(path)[key].numpy()
    from safetensors.numpy import load_file

    return load_file(str(path))[key]


def _merge(folder: OutputFolder, parts: list[str], name: str, fmt: str, key: str,
           shape: tuple[int, ...], np_dtype: np.dtype) -> None:
    if fmt != "npy":
        arrays = [a for a in (_load_array(folder.path(p), fmt, key) for p in parts) if len(a)]
        _save_array(folder, name, np.concatenate(arrays).astype(np_dtype, copy=False), fmt, key)
        return
    with folder.writing(name) as tmp:
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
        row = 0
        for p in parts:
            src = np.load(folder.path(p), mmap_mode="r")
            for s in range(0, len(src), _COPY_ROWS):
                block = src[s:s + _COPY_ROWS]
                dst[row:row + len(block)] = block
                row += len(block)
            del src
        dst.flush()
        del dst


def _check_options(dtype: str, fmt: str, shard_size: int, batch_size: int) -> None:
    if dtype not in EMBED_DTYPES:
        raise ValueError(f"dtype must be one of {EMBED_DTYPES}, got {dtype!r}")
    if fmt not in EMBED_FORMATS:
        raise ValueError(f"format must be one of {EMBED_FORMATS}, got {fmt!r}")
    if fmt == "safetensors":
        try:
            import safetensors.numpy  # noqa: F401
        except ImportError:
            raise ValueError("format 'safetensors' needs the safetensors package: "
                             "pip install safetensors (or use --format npy / pt)") from None
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")


# --------------------------------------------------------------------------- shards and manifest


class _ShardBatches:
    """Batch sampler over the pending shards; a batch never straddles two shards (O(1) memory)."""

    def __init__(self, shards: Sequence[int], shard_size: int, n: int, batch_size: int) -> None:
        self.shards, self.shard_size, self.n, self.batch_size = list(shards), shard_size, n, batch_size

    def _range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.n))

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.shards:
            r = self._range(shard)
            for s in range(r.start, r.stop, self.batch_size):
                yield list(range(s, min(s + self.batch_size, r.stop)))

    def __len__(self) -> int:
        return sum(-(-len(self._range(i)) // self.batch_size) for i in self.shards)

    def num_images(self) -> int:
        """Images in the pending shards."""
        return sum(len(self._range(i)) for i in self.shards)


def _shard_names(i: int, ext: str) -> tuple[str, str, str]:
    """``(embeddings, regions, paths csv)`` file names of shard ``i``."""
    return f"embeddings_{i:05d}{ext}", f"regions_{i:05d}.npy", f"paths_{i:05d}.csv"


def _output_names(n_shards: int, ext: str) -> list[str]:
    """Every file an extraction of ``n_shards`` shards may write (recorded in the ledger)."""
    names = [n for i in range(n_shards) for n in _shard_names(i, ext)]
    return [*names, f"embeddings{ext}", "regions.npy", "embeddings.csv", "bad_files.txt",
            MANIFEST]


def _legacy_names(root: Path) -> list[str]:
    """Files that an esvit-embed from before the ledger wrote in ``root`` (from its manifest)."""
    try:
        st = json.loads((root / MANIFEST).read_text())["settings"]
        n_shards = -(-int(st["num_inputs"]) // int(st["shard_size"]))
        names = _output_names(n_shards, _EXT[st["format"]])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return []
    prefixes = tuple(f".{n}." for n in names)  # its temporary files: .<name>.<random>.tmp
    temps = [e.name for e in os.scandir(root) if e.name.endswith(".tmp")
             and e.name.startswith(prefixes)]
    return names + temps


def _manifest_settings(**kw: Any) -> dict[str, Any]:
    return json.loads(json.dumps(kw, sort_keys=True, default=str))


def _paths_hash(paths: Sequence[str]) -> str:
    import hashlib

    h = hashlib.sha1()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def _bad_records(shard: dict[str, Any], paths: Sequence[str], span: range) -> list[list[Any]]:
    """``[[index, reason], ...]`` of a shard record (version 1 stored ``"path\\treason"``)."""
    out = []
    where = None
    for rec in shard.get("bad", []):
        if isinstance(rec, str):  # version 1
            if where is None:
                where = {paths[j]: j for j in span}
            path, _, reason = rec.rpartition("\t")
            if path not in where:
                raise ValueError(f"bad-image record {rec!r} names no image of the shard")
            out.append([where[path], reason])
        else:
            out.append([int(rec[0]), str(rec[1])])
    return out


def _open_manifest(folder: OutputFolder, settings: dict[str, Any],
                   overwrite: bool) -> dict[str, Any]:
    path = folder.path(MANIFEST)
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError:
            manifest = None
        old = dict((manifest or {}).get("settings", {}))
        if old and "preprocess" not in old:  # written before the protocol was recorded
            old.update(preprocess="resize", crop_size=None)
        if manifest is not None and old == settings:
            manifest["settings"] = settings
            manifest.setdefault("shards", {})
            return manifest
        if not overwrite:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{folder.root} already holds embeddings made with other settings (differs: "
                f"{', '.join(diff) or 'unreadable manifest'}); pass overwrite=True (--overwrite) "
                "or choose another output folder"
            )
    if overwrite:  # only what esvit-embed recorded writing here
        n = folder.remove(folder.files(COMMAND))
        if n:
            log.info("overwrite: deleted %d file(s) of the previous extraction in %s", n,
                     folder.root)
    manifest = {"format_version": MANIFEST_VERSION, "settings": settings, "shards": {},
                "dim": None, "tokens": None}
    _save_manifest(folder, manifest)
    return manifest


def _save_manifest(folder: OutputFolder, manifest: dict[str, Any]) -> None:
    manifest["format_version"] = MANIFEST_VERSION
    folder.write_text(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@dataclass
class _Job:
    """One extraction: inputs, options and the output folder."""

    folder: OutputFolder
    manifest: dict[str, Any]
    paths: list[str]
    labels: list[str]
    shard_size: int
    fmt: str
    np_dtype: np.dtype
    regions: bool

    @property
    def ext(self) -> str:
        return _EXT[self.fmt]

    @property
    def n_shards(self) -> int:
        return -(-len(self.paths) // self.shard_size)

    def span(self, i: int) -> range:
        """Indices of shard ``i``."""
        return range(i * self.shard_size, min((i + 1) * self.shard_size, len(self.paths)))

    def rows(self, i: int) -> list[int]:
        """Indices embedded in finished shard ``i`` (its images minus the unreadable ones)."""
        bad = {j for j, _ in self.manifest["shards"][str(i)]["bad"]}
        return [j for j in self.span(i) if j not in bad]

    @property
    def merged(self) -> bool:
        """Whether the manifest records merged files (the shards are then deleted)."""
        return bool(self.manifest.get("merged"))

    def merged_names(self) -> list[str]:
        """The merged files: embeddings, then regions when requested."""
        return [f"embeddings{self.ext}", *(["regions.npy"] if self.regions else [])]

    def complete(self, i: int) -> bool:
        """Whether shard ``i`` is finished and its rows are on disk."""
        rec = self.manifest["shards"].get(str(i))
        if rec is None:
            return False
        try:
            rec["bad"] = _bad_records(rec, self.paths, self.span(i))
        except (ValueError, TypeError, IndexError, KeyError):
            return False
        if len(self.rows(i)) != int(rec.get("rows", -1)):
            return False
        if self.merged:  # its rows live in the merged files (checked by _check_merged)
            return True
        emb, reg, csv_name = _shard_names(i, self.ext)
        return all(self.folder.path(n).is_file()
                   for n in (emb, csv_name, *((reg,) if self.regions else ())))


class _ShardSink:
    """Rows of the shard being embedded, written (files + manifest) once the shard is done."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.cur = -1
        self.rows: list[int] = []
        self.bad: list[list[Any]] = []
        self.writers: dict[str, _RowWriter] = {}

    def add(self, shard: int, idx: list[int], ok: list[bool], errors: Sequence[str],
            emb: np.ndarray | None, reg: np.ndarray | None) -> None:
        """Add one batch (``emb`` / ``reg``: rows of the readable images, in order)."""
        if shard != self.cur:
            self.finish()
            self.cur, self.rows, self.bad = shard, [], []
        self.bad.extend([j, err] for j, good, err in zip(idx, ok, errors, strict=True) if not good)
        good = [j for j, g in zip(idx, ok, strict=True) if g]
        if not good or emb is None:
            return
        job = self.job
        if "emb" not in self.writers:
            job.manifest["dim"] = int(emb.shape[1])
            n = len(job.span(shard))
            emb_name, reg_name, _ = _shard_names(shard, job.ext)
            self.writers["emb"] = _RowWriter(job.folder, emb_name, n, (emb.shape[1],),
                                             job.np_dtype, job.fmt, "embeddings")
            if reg is not None:
                job.manifest["tokens"] = int(reg.shape[1])
                self.writers["reg"] = _RowWriter(job.folder, reg_name, n, tuple(reg.shape[1:]),
                                                 job.np_dtype, "npy", "regions")
        self.writers["emb"].append(emb)
        if reg is not None:
            self.writers["reg"].append(reg)
        self.rows.extend(good)

    def finish(self) -> None:
        """Write the current shard's files, then record it in the manifest."""
        if self.cur < 0:
            return
        job, i = self.job, self.cur
        emb_name, reg_name, csv_name = _shard_names(i, job.ext)
        if "emb" not in self.writers:  # every image of the shard was unreadable
            d, t = job.manifest.get("dim") or 0, job.manifest.get("tokens") or 0
            _RowWriter(job.folder, emb_name, 0, (d,), job.np_dtype, job.fmt, "embeddings").close()
            if job.regions:
                _RowWriter(job.folder, reg_name, 0, (t, d), job.np_dtype, "npy", "regions").close()
        for w in self.writers.values():
            w.close()
        self.writers.clear()
        with job.folder.writing(csv_name) as tmp, _open_csv(tmp, "w") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows([job.paths[j], job.labels[j]] for j in self.rows)
        job.manifest["shards"][str(i)] = {"rows": len(self.rows), "bad": list(self.bad)}
        _save_manifest(job.folder, job.manifest)
        self.cur = -1

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        self.writers.clear()


# --------------------------------------------------------------------------- main entry


def embed_images(
    backbone: Any,
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    checkpoint_key: str = "teacher",
    backbone_name: str | None = None,
    image_size: int | None = None,
    canvas_size: int | None = None,
    preprocess: str = "auto",
    feature: str = "pooled",
    n_last: int | None = None,
    avgpool: bool = False,
    regions: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    format: str = "npy",
    shard_size: int = 10000,
    merge: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> EmbedResult:
    """Embed every image of a folder / list file with a frozen backbone.

    Args:
        backbone: Checkpoint path (training checkpoint, export, or bare state dict with
            ``backbone_name``), ``(net, spec)``, or a :class:`~esvit.eval.features.FeatureEncoder`.
        inputs: Image folder (scanned recursively, sorted; the first-level subfolder is the
            label), a list file (one path per line, optional ``<TAB>label``), or a list of paths.
        out_dir: Output folder (created). It must hold only files esvit recorded writing there
            (:class:`~esvit.eval.outputs.OutputFolder`); anything else is refused.
        checkpoint_key: ``"teacher"`` or ``"student"`` weights of a training checkpoint.
        backbone_name: Registry name for bare state dicts.
        image_size: Resolution fed to the backbone (default: recorded training size, else 224).
        canvas_size: ``preprocess='resize'``: decode size (default ``image_size``); giving it
            makes ``auto`` choose ``resize``.
        preprocess: ``"auto"`` (default: ``dino`` when the images are larger than
            ``image_size``, judged on up to 64 evenly spaced images, else ``resize``),
            ``"dino"`` (short side to ``image_size / 0.875``, centre crop ``image_size``: DINO's
            ``Resize(256) + CenterCrop(224)``) or ``"resize"`` (short side to ``canvas_size``,
            centre square, resized to ``image_size``); see
            :class:`~esvit.eval.features.EvalPreprocess`. The protocol used is recorded in
            ``manifest.json`` and :attr:`EmbedResult.preprocess`.
        feature: ``"pooled"`` or ``"last_n"``.
        n_last: Blocks / stages for ``last_n``.
        avgpool: ``last_n`` ViT: append the mean patch token.
        regions: Also save region tokens ``(n, tokens, d)`` per shard (``regions_*.npy``).
        batch_size: Images per forward pass.
        num_workers: DataLoader decode workers (a batch that takes longer than
            ``$ESVIT_LOADER_TIMEOUT`` seconds, default 600, stops the run with a message).
        device: Device (default CUDA when available).
        dtype: ``"float32"`` or ``"float16"`` storage.
        format: ``"npy"``, ``"pt"`` or ``"safetensors"`` (needs the safetensors package).
        shard_size: Images per shard (unit of resumption).
        merge: Merge the shards into single files at the end and delete them (``.npy`` via a
            memory map; ``.pt`` and ``.safetensors`` need the whole matrix in memory once).
            False keeps the shards (a folder merged earlier stays merged).
        overwrite: Discard an existing extraction made with other settings (only the files
            esvit-embed recorded writing are deleted).
        progress: Show a tqdm bar.

    Returns:
        :class:`EmbedResult`.

    Raises:
        FileNotFoundError: ``inputs`` does not exist.
        esvit.eval.outputs.ForeignFilesError: ``out_dir`` holds files esvit did not write.
        esvit.eval.outputs.FolderBusyError: Another process writes to ``out_dir``.
        esvit.eval.loader.LoaderStalledError: The decoding workers stalled.
        ValueError: No images, bad option, or ``out_dir`` holds an extraction made with other
            settings (and ``overwrite`` is False).
    """
    _check_options(dtype, format, shard_size, batch_size)
    paths, labels, described = _list_inputs(inputs)
    folder = OutputFolder(out_dir, COMMAND, adopt=_legacy_names).claim()
    try:
        folder.remove([n for n in folder.files(COMMAND) if n.endswith(".tmp")])  # adopted temps
        dev = resolve_device(device)
        model = resolve_eval_model(backbone, checkpoint_key=checkpoint_key,
                                   backbone_name=backbone_name, image_size=image_size,
                                   feature=feature, n_last=n_last, avgpool=avgpool, device=dev)
        pre = resolve_preprocess(preprocess, model.image_size, paths, canvas_size)
        job = _open_job(folder, model, pre, paths, labels, described, overwrite,
                        feature=feature, avgpool=avgpool, dtype=dtype, format=format,
                        regions=regions, shard_size=shard_size)
        skipped = _embed_pending(job, model, pre, dev, batch_size, num_workers, progress)
        res = _finalize(job, merge, skipped)
    finally:
        folder.release()
    res.preprocess = pre.record()
    return res


def _open_job(folder: OutputFolder, model: EvalModel, pre: EvalPreprocess, paths: list[str],
              labels: list[str], described: str, overwrite: bool, **options: Any) -> _Job:
    """The extraction in ``folder``: its settings (``options``: feature, avgpool, dtype,
    format, regions, shard_size) checked against (or written to) the manifest."""
    settings = _manifest_settings(
        model=model.cache_token or model.source, n_last=model.encoder.n_last,
        image_size=model.image_size, canvas_size=pre.decode_size, preprocess=pre.protocol,
        crop_size=pre.crop_size, inputs=described, num_inputs=len(paths),
        paths_hash=_paths_hash(paths), **options,
    )
    manifest = _open_manifest(folder, settings, overwrite)
    job = _Job(folder, manifest, paths, labels, options["shard_size"], options["format"],
               np.dtype(options["dtype"]), options["regions"])
    if manifest.get("preprocess") != pre.record():
        manifest["preprocess"] = pre.record()  # how auto decided, for the record
        _save_manifest(folder, manifest)
    _check_merged(job)
    return job


def _check_merged(job: _Job) -> None:
    """A manifest that records merged files whose rows are not all there is reset: every shard
    is embedded again (the merged files were the only copy)."""
    if not job.merged:
        return
    rows = int(job.manifest["merged"].get("rows", -1))
    try:
        intact = all(job.complete(i) for i in range(job.n_shards)) and rows == sum(
            int(job.manifest["shards"][str(i)]["rows"]) for i in range(job.n_shards))
        intact = intact and all(
            len(_load_array(job.folder.path(n), "npy" if n == "regions.npy" else job.fmt,
                            "regions" if n == "regions.npy" else "embeddings")) == rows
            for n in job.merged_names())
    except Exception:  # a damaged file fails in its reader's own way
        intact = False
    if intact:
        return
    log.warning("%s: the merged embeddings are missing or damaged; embedding every shard again",
                job.folder.root)
    job.folder.remove([n for n in job.merged_names() if job.folder.owns(n)])
    job.manifest.pop("merged")
    job.manifest["shards"] = {}
    _save_manifest(job.folder, job.manifest)


def _embed_pending(job: _Job, model: EvalModel, pre: EvalPreprocess, dev: torch.device,
                   batch_size: int, num_workers: int, progress: bool) -> int:
    """Embed the shards that are not complete; returns the number of complete ones skipped."""
    from tqdm import tqdm

    pending = [i for i in range(job.n_shards) if not job.complete(i)]
    for i in pending:
        job.manifest["shards"].pop(str(i), None)
    skipped = job.n_shards - len(pending)
    if skipped:
        log.info("resuming: %d of %d shards already done", skipped, job.n_shards)
    batches = _ShardBatches(pending, job.shard_size, len(job.paths), batch_size)
    loader = make_loader(_ImageList(job.paths, pre), num_workers=num_workers,
                         batch_sampler=batches, what="images to embed")
    sink = _ShardSink(job)
    bar = tqdm(total=batches.num_images(), desc="embedding", unit="img", disable=not progress)
    try:
        with torch.no_grad():
            for images, ok, index, errors in loader:
                ok = torch.as_tensor(ok, dtype=torch.bool)
                idx = [int(j) for j in index]
                emb = reg = None
                if ok.any():
                    x = to_model_input(images[ok].to(dev, non_blocking=dev.type == "cuda"),
                                       model.image_size)
                    if job.regions:
                        f, r = model.encoder.forward_with_regions(x)
                        reg = r.float().cpu().numpy()
                    else:
                        f = model.encoder(x)
                    emb = f.float().cpu().numpy()
                sink.add(idx[0] // job.shard_size, idx, ok.tolist(), list(errors), emb, reg)
                bar.update(len(idx))
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    return skipped


def _finalize(job: _Job, merge: bool, skipped: int) -> EmbedResult:
    """Write ``embeddings.csv`` and ``bad_files.txt``, merge (with ``merge``) and list the result."""
    folder, n_shards = job.folder, job.n_shards
    total = sum(int(job.manifest["shards"][str(i)]["rows"]) for i in range(n_shards))
    bad = [(job.paths[j], reason) for i in range(n_shards)
           for j, reason in job.manifest["shards"][str(i)]["bad"]]
    if total == 0:
        raise ValueError(f"none of the {len(job.paths)} images could be read (first: "
                         f"{', '.join(f'{p} ({r})' for p, r in bad[:3])})")
    with folder.writing("embeddings.csv") as tmp, _open_csv(tmp, "w") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "label"])
        rows = (j for i in range(n_shards) for j in job.rows(i))
        w.writerows([r, job.paths[j], job.labels[j]] for r, j in enumerate(rows))
    bad_path = _write_bad_files(folder, bad)
    if merge or job.merged:
        _merge_and_drop_shards(job, total)
    folder.remove([n for n in folder.files(COMMAND) if not folder.path(n).exists()])  # ledger
    merged = [folder.path(n) for n in job.merged_names()] if job.merged else []
    shards = [] if job.merged else [folder.path(_shard_names(i, job.ext)[0]) for i in range(n_shards)]
    return EmbedResult(folder.root, total, len(bad), int(job.manifest.get("dim") or 0),
                       merged[0] if merged else None, merged[1] if len(merged) > 1 else None,
                       folder.path("embeddings.csv"), bad_path, shards, skipped)


def _write_bad_files(folder: OutputFolder, bad: list[tuple[str, str]]) -> Path | None:
    """``bad_files.txt`` (``path<TAB>reason``) when an image was unreadable, else none."""
    if not bad:
        if folder.path("bad_files.txt").exists():
            folder.remove(["bad_files.txt"])  # left by an earlier run; every image is readable now
        return None
    path = folder.write_text(
        "bad_files.txt", "".join(f"{_tsv_field(p)}\t{_tsv_field(r)}\n" for p, r in bad),
        errors=CSV_ERRORS)
    log.warning("skipped %d unreadable image(s) (listed in %s), first: %s", len(bad), path,
                ", ".join(p for p, _ in bad[:3]))
    return path


def _merge_and_drop_shards(job: _Job, total: int) -> None:
    """Merge the shards, check the merged files, record them in the manifest, delete the shards.

    The manifest is saved between the check and the deletion, so a crash anywhere leaves either
    complete shards (merged again by the next run) or checked merged files (the next run deletes
    the shards left over).
    """
    folder, names = job.folder, [_shard_names(i, job.ext) for i in range(job.n_shards)]
    if not job.merged:
        dim, tokens = int(job.manifest.get("dim") or 0), int(job.manifest.get("tokens") or 0)
        parts = [("embeddings", job.fmt, [n[0] for n in names], (total, dim))]
        if job.regions:
            parts.append(("regions", "npy", [n[1] for n in names], (total, tokens, dim)))
        for (key, fmt, shard_files, shape), merged in zip(parts, job.merged_names(), strict=True):
            _merge(folder, shard_files, merged, fmt, key, shape, job.np_dtype)
            _check_merge(job, merged, fmt, key, shard_files, shape)
        job.manifest["merged"] = {"rows": total, "files": job.merged_names()}
        _save_manifest(folder, job.manifest)
    n = folder.remove([name for shard in names for name in shard if folder.owns(name)])
    if n:
        log.info("merged %d shard(s) into %s; shard files deleted", job.n_shards,
                 ", ".join(job.merged_names()))


def _check_merge(job: _Job, merged: str, fmt: str, key: str, shard_files: list[str],
                 shape: tuple[int, ...]) -> None:
    """Raise unless ``merged`` has ``shape`` and the job's dtype and holds each shard's first
    and last rows where they belong (the shards are deleted next)."""
    out = _load_array(job.folder.path(merged), fmt, key)
    if out.shape != shape or out.dtype != job.np_dtype:
        raise RuntimeError(f"{job.folder.path(merged)}: merged {out.shape} {out.dtype}, expected "
                           f"{shape} {job.np_dtype}; the shards are kept")
    row = 0
    for name in shard_files:
        part = _load_array(job.folder.path(name), fmt, key)
        for i in {0, len(part) - 1} if len(part) else ():
            if not np.array_equal(out[row + i], part[i], equal_nan=True):
                raise RuntimeError(f"{job.folder.path(merged)}: row {row + i} differs from "
                                   f"{name}; the shards are kept")
        row += len(part)
        del part


class _CallableModule(types.ModuleType):
    """Lets ``esvit.embed(...)`` call :func:`embed_images` while ``esvit.embed`` stays a module."""

    def __call__(self, *args: Any, **kwargs: Any) -> EmbedResult:
        return embed_images(*args, **kwargs)


embed = embed_images
sys.modules[__name__].__class__ = _CallableModule
