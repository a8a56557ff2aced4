"""Feature cache shared by ``esvit-knn`` and ``esvit-linear``: each feature matrix computed once.

A cache entry is one file, ``{cache_dir}/features_{hash}.pt``, holding ``{"key", "features",
"labels"}`` for one *view* of one dataset. Its key (:func:`feature_cache_key`) says what the
features are and nothing about who asked for them:

* the backbone: checkpoint path, size, modification time, ``teacher`` / ``student`` weights,
  registry name and arguments (:attr:`~esvit.eval.features.EvalModel.cache_token`);
* the feature kind: ``pooled`` / ``last_n``, ``n_last``, ``avgpool`` and the evaluation size;
* the dataset: its image paths and labels, and how they are decoded (protocol, decode and crop
  sizes; :func:`~esvit.eval.features.dataset_identity`);
* the view: ``"plain"`` (the images) or ``"hflip"`` (flipped, the linear probe's ``flip`` mode).

So ``esvit-knn`` and then ``esvit-linear`` on the same checkpoint, images and protocol read the
features the first one stored, whichever role (bank, training or validation set) the images
play; ``--mode flip`` adds only the flipped view. Nothing is cached for in-memory models.

The cache folder is owned through a ledger (:class:`~esvit.eval.outputs.OutputFolder`): inside
a command's output folder it is that folder's ``features/``; a folder of its own (``cache_dir``,
by default ``<checkpoint dir>/eval_features`` for the CLIs) is locked only while a file is
written, so several commands can share it at the same time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from esvit.eval import features as _features
from esvit.eval.features import EvalModel, dataset_identity, options_hash

__all__ = [
    "CACHE_FORMAT",
    "cached_features",
    "feature_cache_key",
    "read_feature_cache",
    "resolve_cache_dir",
    "save_feature_cache",
]

log = logging.getLogger("esvit.eval")

CACHE_FORMAT = 2  # 2: one file per view, keyed without the command or the split
CACHE_LOCK_WAIT = 120.0  # seconds a writer waits for another process writing to the cache


def feature_cache_key(model: EvalModel, dataset: torch.utils.data.Dataset,
                      view: str = "plain") -> dict[str, Any] | None:
    """The JSON key of ``dataset``'s features in ``view`` (None: not cacheable)."""
    identity = dataset_identity(dataset)
    if model.cache_token is None or identity is None:
        return None
    key = {"cache_format": CACHE_FORMAT, **model.cache_token, "data": identity, "view": view}
    return json.loads(json.dumps(key, default=str))


def _cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"features_{options_hash(key)}.pt"


def cached_features(
    model: EvalModel,
    dataset: torch.utils.data.Dataset,
    split: str,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    flip: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    command: str = "esvit-eval",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`~esvit.eval.features.encode_dataset` through the cache in ``cache_dir``.

    Views found in the cache are read, the others computed in one pass and stored (``split``
    only names the progress bar; ``command`` is recorded in the cache folder's ledger).

    Returns:
        ``features (N, D)``, ``labels (N,)`` and with ``flip`` the flipped view's features.
    """
    views = _features.FEATURE_VIEWS if flip else ("plain",)
    keys = {v: feature_cache_key(model, dataset, v) for v in views} if cache_dir else {}
    found: dict[str, Tensor] = {}
    labels: Tensor | None = None
    for view, key in keys.items():
        hit = None if key is None else read_feature_cache(_cache_path(cache_dir, key), key,
                                                          len(dataset))
        if hit is not None and (labels is None or torch.equal(labels, hit[1])):
            found[view], labels = hit
    missing = [v for v in views if v not in found]
    if missing:
        new, new_labels = _features.encode_views(model, dataset, device, missing, batch_size,
                                                 num_workers, progress, desc=f"{split} features")
        if labels is not None and not torch.equal(labels, new_labels):  # readable images changed
            found, missing = {}, list(views)
            new, new_labels = _features.encode_views(model, dataset, device, views, batch_size,
                                                     num_workers, progress,
                                                     desc=f"{split} features")
        labels = new_labels
        found.update(new)
        for view in missing:
            key = keys.get(view)
            if key is not None:
                save_feature_cache({"key": key, "features": new[view], "labels": labels},
                                   _cache_path(cache_dir, key), command)
    assert labels is not None
    return found["plain"], labels, found.get("hflip")


def read_feature_cache(path: Path, key: dict[str, Any], n_items: int
                       ) -> tuple[Tensor, Tensor] | None:
    """The cached ``(features, labels)`` at ``path`` when it is intact and made for ``key``.

    Loaded with :func:`esvit.train.checkpoint.load_checkpoint` (kind ``feature_cache``). A missing
    or stale file is None; a damaged or forged one (empty, truncated, fields missing, of the wrong
    type or of inconsistent shapes, non-finite features) is None with a warning: the features are
    recomputed and the file rewritten.
    """
    from esvit.train.checkpoint import CheckpointError, load_checkpoint

    if not path.is_file():
        return None
    try:
        obj = load_checkpoint(path, "feature_cache")
        if obj["key"] != key:
            return None
        feats, labels = obj["features"], obj["labels"]
        n = feats.shape[0] if feats.ndim == 2 else -1
        if not (0 < n <= n_items and feats.is_floating_point() and bool(torch.isfinite(feats).all())):
            raise CheckpointError(f"{path}: field 'features' is not a finite (n <= {n_items}, dim) float matrix")
        if labels.shape != (n,) or labels.is_floating_point():
            raise CheckpointError(f"{path}: field 'labels' does not hold one integer label per feature row")
    except (CheckpointError, OSError) as e:
        log.warning("ignoring unusable feature cache (%s); recomputing the features", e)
        return None
    return feats, labels


def save_feature_cache(obj: dict[str, Any], path: str | Path, command: str = "esvit-eval") -> Path:
    """Write a feature cache file atomically, recorded in its folder's ledger.

    Inside an output folder claimed by this process the file goes through that folder; elsewhere
    the cache folder is claimed (waiting up to :data:`CACHE_LOCK_WAIT` s for another writer) for
    the time of the write.
    """
    from esvit.eval.outputs import OutputFolder, active_folder

    owner = active_folder(path)
    if owner is not None:
        folder, name = owner
        return folder.torch_save(name, obj)
    path = Path(path)
    folder = OutputFolder(path.parent, command).claim(wait=CACHE_LOCK_WAIT)
    try:
        return folder.torch_save(path.name, obj)
    finally:
        folder.release()


def resolve_cache_dir(folder: Any, cache: bool, cache_dir: str | Path | None,
                      command: str) -> Path | None:
    """Where a command caches features: ``cache_dir``, else ``features/`` in its output
    ``folder`` (None: no cache). A ``cache_dir`` outside ``folder`` is checked now (created,
    and refused when it holds files esvit did not write) so a refusal comes before any work."""
    from esvit.eval.outputs import OutputFolder, active_folder

    if not cache:
        return None
    if cache_dir is None:
        return folder.path("features") if folder is not None else None
    path = Path(cache_dir)
    if active_folder(path / "x") is None:
        OutputFolder(path, command).claim(wait=CACHE_LOCK_WAIT).release()
    return path

