"""Embedding extraction: a folder or list of images -> embeddings on disk, resumable.

Images are taken in a deterministic (sorted) order and processed in *shards* of
``shard_size`` images. Each shard is written atomically (temporary file + rename) as
``embeddings_00000.npy`` (or ``.pt`` / ``.safetensors``), with ``regions_00000.npy`` for region
tokens and ``paths_00000.csv`` for the embedded images; ``manifest.json`` records the finished
shards and the settings. A restarted run with the same settings skips finished shards, so a
killed extraction over a large folder loses at most one shard of work. At the end the shards are
merged (optional) into ``embeddings.npy`` through ``np.lib.format.open_memmap`` (bounded memory)
and ``embeddings.csv`` lists ``row,path,label`` for every row. Unreadable images are skipped,
counted and listed in ``bad_files.txt``.

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
import tempfile
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from esvit.eval.features import (
    EvalPreprocess,
    resolve_device,
    resolve_eval_model,
    resolve_preprocess,
)
from esvit.eval.features import preprocess as to_model_input

__all__ = ["EMBED_DTYPES", "EMBED_FORMATS", "EmbedResult", "embed", "embed_images"]

log = logging.getLogger("esvit.embed")

EMBED_DTYPES = ("float32", "float16")
EMBED_FORMATS = ("npy", "pt", "safetensors")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_COPY_ROWS = 4096  # rows copied at a time when compacting / merging memory maps


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
        shards: Shard embedding files, in order.
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


# --------------------------------------------------------------------------- shard files


def _tmp_path(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(tmp)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600 files; outputs follow the umask
    os.replace(tmp, final)


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text)
    _fsync_replace(tmp, path)


class _RowWriter:
    """Rows of one array written to ``final``: ``.npy`` through a memory map, else buffered."""

    def __init__(self, final: Path, capacity: int, row_shape: tuple[int, ...], dtype: np.dtype,
                 fmt: str, key: str) -> None:
        self.final, self.fmt, self.key, self.dtype = final, fmt, key, dtype
        self.rows = 0
        self.capacity = capacity
        self.row_shape = row_shape
        self.mapped = fmt == "npy" and capacity > 0
        if self.mapped:
            self.tmp = _tmp_path(final)
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
        if self.mapped:
            self.mm.flush()
            self.mm = None
            if self.rows == 0:
                self.tmp.unlink()
                _save_array(np.zeros((0, *self.row_shape), dtype=self.dtype), self.final,
                            "npy", self.key)
                return
            if self.rows != self.capacity:  # some images were unreadable: compact
                exact = _tmp_path(self.final)
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
            _fsync_replace(self.tmp, self.final)
            return
        arr = (np.concatenate(self.parts) if self.parts
               else np.zeros((0, *self.row_shape), dtype=self.dtype))
        _save_array(arr, self.final, self.fmt, self.key)

    def abort(self) -> None:
        if self.mapped:
            self.mm = None
            self.tmp.unlink(missing_ok=True)


def _save_array(arr: np.ndarray, final: Path, fmt: str, key: str) -> None:
    tmp = _tmp_path(final)
    if fmt == "npy":
        with open(tmp, "wb") as f:
            np.save(f, arr)
    elif fmt == "pt":
        torch.save({key: torch.from_numpy(np.ascontiguousarray(arr))}, tmp)
    else:
        from safetensors.numpy import save_file

        save_file({key: np.ascontiguousarray(arr)}, str(tmp))
    _fsync_replace(tmp, final)


def _load_array(path: Path, fmt: str, key: str) -> np.ndarray:
    if fmt == "npy":
        return np.load(path, mmap_mode="r")
    if fmt == "pt":
        from esvit.train.checkpoint import safe_load

        return safe_load(path)[key].numpy()
    from safetensors.numpy import load_file

    return load_file(str(path))[key]


def _check_format(fmt: str) -> None:
    if fmt not in EMBED_FORMATS:
        raise ValueError(f"format must be one of {EMBED_FORMATS}, got {fmt!r}")
    if fmt == "safetensors":
        try:
            import safetensors.numpy  # noqa: F401
        except ImportError:
            raise ValueError("format 'safetensors' needs the safetensors package: "
                             "pip install safetensors (or use --format npy / pt)") from None


_FILE_MODE = _file_mode()


# --------------------------------------------------------------------------- main entry


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


def _manifest_settings(**kw: Any) -> dict[str, Any]:
    return json.loads(json.dumps(kw, sort_keys=True, default=str))


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
        out_dir: Output folder (created).
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
        num_workers: DataLoader decode workers.
        device: Device (default CUDA when available).
        dtype: ``"float32"`` or ``"float16"`` storage.
        format: ``"npy"``, ``"pt"`` or ``"safetensors"`` (needs the safetensors package).
        shard_size: Images per shard (unit of resumption).
        merge: Merge shards into single files at the end (``.npy`` via a memory map; ``.pt`` and
            ``.safetensors`` need the whole matrix in memory once).
        overwrite: Discard an existing extraction made with other settings.
        progress: Show a tqdm bar.

    Returns:
        :class:`EmbedResult`.

    Raises:
        FileNotFoundError: ``inputs`` does not exist.
        ValueError: No images, bad option, or ``out_dir`` holds an extraction made with other
            settings (and ``overwrite`` is False).
    """
    from tqdm import tqdm

    if dtype not in EMBED_DTYPES:
        raise ValueError(f"dtype must be one of {EMBED_DTYPES}, got {dtype!r}")
    _check_format(format)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    np_dtype = np.dtype(dtype)
    paths, labels, described = _list_inputs(inputs)
    dev = resolve_device(device)
    model = resolve_eval_model(backbone, checkpoint_key=checkpoint_key, backbone_name=backbone_name,
                               image_size=image_size, feature=feature, n_last=n_last,
                               avgpool=avgpool, device=dev)
    pre = resolve_preprocess(preprocess, model.image_size, paths, canvas_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)
    ext = {"npy": ".npy", "pt": ".pt", "safetensors": ".safetensors"}[format]
    settings = _manifest_settings(
        model=model.cache_token or model.source, feature=feature, n_last=model.encoder.n_last,
        avgpool=avgpool, image_size=model.image_size, canvas_size=pre.decode_size,
        preprocess=pre.protocol, crop_size=pre.crop_size, dtype=dtype, format=format,
        regions=regions, shard_size=shard_size, inputs=described, num_inputs=len(paths),
        paths_hash=_paths_hash(paths),
    )
    manifest = _open_manifest(out, settings, overwrite)
    if manifest.get("preprocess") != pre.record():
        manifest["preprocess"] = pre.record()  # how auto decided, for the record
        _save_manifest(out, manifest)
    n_shards = (len(paths) + shard_size - 1) // shard_size
    done = manifest["shards"]

    def shard_files(i: int) -> tuple[Path, Path, Path]:
        return (out / f"embeddings_{i:05d}{ext}", out / f"regions_{i:05d}.npy",
                out / f"paths_{i:05d}.csv")

    def shard_complete(i: int) -> bool:
        rec = done.get(str(i))
        if rec is None:
            return False
        emb, reg, csv_path = shard_files(i)
        return emb.is_file() and csv_path.is_file() and (not regions or reg.is_file())

    pending = [i for i in range(n_shards) if not shard_complete(i)]
    skipped = n_shards - len(pending)
    for i in pending:
        done.pop(str(i), None)
    if skipped:
        log.info("resuming: %d of %d shards already done", skipped, n_shards)

    batches = _ShardBatches(pending, shard_size, len(paths), batch_size)
    dataset = _ImageList(paths, pre)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         pin_memory=dev.type == "cuda")
    bar = tqdm(total=batches.num_images(), desc="embedding", unit="img", disable=not progress)
    writers: dict[str, _RowWriter] = {}
    cur = -1
    cur_rows: list[int] = []
    cur_bad: list[str] = []
    dim = manifest.get("dim")
    tokens = manifest.get("tokens")

    def finish_shard(i: int) -> None:
        emb, reg, csv_path = shard_files(i)
        if "emb" not in writers:  # every image of the shard was unreadable
            d = dim or 0
            _RowWriter(emb, 0, (d,), np_dtype, format, "embeddings").close()
            if regions:
                _RowWriter(reg, 0, (tokens or 0, d), np_dtype, "npy", "regions").close()
        for w in writers.values():
            w.close()
        lines = ["path,label"] + [_csv_row(paths[j], labels[j]) for j in cur_rows]
        _write_text(csv_path, "\n".join(lines) + "\n")
        done[str(i)] = {"rows": len(cur_rows), "bad": list(cur_bad)}
        manifest.update(dim=dim, tokens=tokens)
        _save_manifest(out, manifest)
        writers.clear()

    try:
        with torch.no_grad():
            for images, ok, index, errors in loader:
                first = int(index[0])
                shard = first // shard_size
                if shard != cur:
                    if cur >= 0:
                        finish_shard(cur)
                    cur, cur_rows, cur_bad = shard, [], []
                ok = torch.as_tensor(ok, dtype=torch.bool)
                idx = [int(j) for j in index]
                cur_bad.extend(f"{paths[j]}\t{err}"
                               for j, good, err in zip(idx, ok.tolist(), errors, strict=True)
                               if not good)
                good_idx = [j for j, good in zip(idx, ok.tolist(), strict=True) if good]
                bar.update(len(idx))
                if not good_idx:
                    continue
                x = to_model_input(images[ok].to(dev, non_blocking=dev.type == "cuda"),
                                   model.image_size)
                if regions:
                    f, r = model.encoder.forward_with_regions(x)
                else:
                    f, r = model.encoder(x), None
                f_np = f.float().cpu().numpy()
                if "emb" not in writers:
                    dim = int(f_np.shape[1])
                    n_in_shard = min(shard_size, len(paths) - shard * shard_size)
                    emb, reg, _ = shard_files(shard)
                    writers["emb"] = _RowWriter(emb, n_in_shard, (dim,), np_dtype, format,
                                                "embeddings")
                    if r is not None:
                        tokens = int(r.shape[1])
                        writers["reg"] = _RowWriter(reg, n_in_shard, tuple(r.shape[1:]),
                                                    np_dtype, "npy", "regions")
                writers["emb"].append(f_np)
                if r is not None:
                    writers["reg"].append(r.float().cpu().numpy())
                cur_rows.extend(good_idx)
            if cur >= 0:
                finish_shard(cur)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()

    res = _finalize(out, manifest, n_shards, shard_files, paths, labels, format, np_dtype,
                    regions, merge, skipped)
    res.preprocess = pre.record()
    return res


def _csv_row(path: str, label: str) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([path, label])
    return buf.getvalue()


def _paths_hash(paths: Sequence[str]) -> str:
    import hashlib

    h = hashlib.sha1()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def _open_manifest(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    path = out / MANIFEST
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
                f"{out} already holds embeddings made with other settings (differs: "
                f"{', '.join(diff) or 'unreadable manifest'}); pass overwrite=True (--overwrite) "
                "or choose another output folder"
            )
        for pattern in ("embeddings*", "regions*", "paths_*.csv", "bad_files.txt", MANIFEST):
            for p in out.glob(pattern):
                if p.is_file():
                    p.unlink()
    manifest = {"format_version": MANIFEST_VERSION, "settings": settings, "shards": {},
                "dim": None, "tokens": None}
    _save_manifest(out, manifest)
    return manifest


def _save_manifest(out: Path, manifest: dict[str, Any]) -> None:
    _write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _finalize(
    out: Path, manifest: dict[str, Any], n_shards: int, shard_files: Any, paths: list[str],
    labels: list[str], fmt: str, np_dtype: np.dtype, regions: bool, merge: bool, skipped: int,
) -> EmbedResult:
    shards = manifest["shards"]
    rows = [int(shards[str(i)]["rows"]) for i in range(n_shards)]
    total = sum(rows)
    bad = [p for i in range(n_shards) for p in shards[str(i)]["bad"]]
    dim = int(manifest.get("dim") or 0)
    if total == 0:
        raise ValueError(f"none of the {len(paths)} images could be read "
                         f"(first: {', '.join(bad[:3])})")
    # combined CSV, streamed shard by shard
    csv_path = out / "embeddings.csv"
    tmp = _tmp_path(csv_path)
    with open(tmp, "w", newline="") as f:
        f.write("row,path,label\n")
        row = 0
        for i in range(n_shards):
            with open(shard_files(i)[2], newline="") as src:
                reader = csv.reader(src)
                next(reader, None)
                for rec in reader:
                    f.write(f"{row}," + _csv_row(rec[0], rec[1] if len(rec) > 1 else "") + "\n")
                    row += 1
    _fsync_replace(tmp, csv_path)
    bad_path = None
    if bad:
        bad_path = out / "bad_files.txt"
        _write_text(bad_path, "\n".join(bad) + "\n")
        log.warning("skipped %d unreadable image(s) (listed in %s), first: %s", len(bad),
                    bad_path, ", ".join(bad[:3]))
    emb_path = reg_path = None
    if merge:
        ext = {"npy": ".npy", "pt": ".pt", "safetensors": ".safetensors"}[fmt]
        emb_path = out / f"embeddings{ext}"
        _merge([shard_files(i)[0] for i in range(n_shards)], emb_path, fmt, "embeddings",
               (total, dim), np_dtype)
        if regions:
            reg_path = out / "regions.npy"
            tokens = int(manifest.get("tokens") or 0)
            _merge([shard_files(i)[1] for i in range(n_shards)], reg_path, "npy", "regions",
                   (total, tokens, dim), np_dtype)
    return EmbedResult(out, total, len(bad), dim, emb_path, reg_path, csv_path, bad_path,
                       [shard_files(i)[0] for i in range(n_shards)], skipped)


def _merge(parts: list[Path], final: Path, fmt: str, key: str, shape: tuple[int, ...],
           np_dtype: np.dtype) -> None:
    if fmt == "npy":
        tmp = _tmp_path(final)
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
        row = 0
        for p in parts:
            src = np.load(p, mmap_mode="r")
            for s in range(0, len(src), _COPY_ROWS):
                block = src[s:s + _COPY_ROWS]
                dst[row:row + len(block)] = block
                row += len(block)
            del src
        dst.flush()
        del dst
        _fsync_replace(tmp, final)
        return
    arrays = [a for a in (_load_array(p, fmt, key) for p in parts) if len(a)]
    _save_array(np.concatenate(arrays).astype(np_dtype, copy=False), final, fmt, key)


class _CallableModule(types.ModuleType):
    """Lets ``esvit.embed(...)`` call :func:`embed_images` while ``esvit.embed`` stays a module."""

    def __call__(self, *args: Any, **kwargs: Any) -> EmbedResult:
        return embed_images(*args, **kwargs)


embed = embed_images
sys.modules[__name__].__class__ = _CallableModule
