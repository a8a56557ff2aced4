"""Distillation data: training and validation splits of one or two image sources.

The training data is labelled, except for the label-free kinds (``loss.kind=feature``), which
also accept a flat folder of images (labels ``-1``, ``classes`` empty).

Items are ``(image uint8 (3, S, S), label, ok, position)``; workers only decode (the crop, flip
and normalisation run batched on the training device: :mod:`esvit.distill.augment`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from esvit.data import build_dataset
from esvit.distill.config import LABEL_FREE_KINDS, DistillConfig

__all__ = ["DataSplits", "build_splits"]


class _Split(Dataset):
    """Items ``(image uint8 (3, S, S), label, ok, position)`` of ``base[indices]``.

    ``position`` indexes this split (cached teacher logits use it); ``ok`` is False when the
    file could not be decoded (``image`` / ``label`` then come from the base dataset's
    substitute). ``label_map`` remaps base labels (validation folders with other class order).
    """

    def __init__(self, base: Any, indices: np.ndarray, label_map: np.ndarray | None = None) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.label_map = label_map
        labels = np.asarray(base.labels, dtype=np.int64)[self.indices]
        self.labels = label_map[labels] if label_map is not None else labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int, bool, int]:
        image, label, status = self.base[int(self.indices[i])]
        if self.label_map is not None and label >= 0:
            label = int(self.label_map[label])
        return image, int(label), bool(status.ok), int(i)


@dataclass
class DataSplits:
    """Training / validation splits and the class names (labels index ``classes``).

    ``labeled``: whether the training split has labels (False: a flat folder, label-free kinds
    only; ``classes`` then holds the validation set's classes, possibly none).
    """

    train: _Split
    val: _Split | None
    classes: list[str]
    val_source: str
    labeled: bool = True


def _labeled_base(kind: str, path: str | None, cfg: DistillConfig, train: bool, what: str,
                  allow_unlabeled: bool = False) -> Any:
    d = cfg.data
    ds = build_dataset(kind, path, d.canvas_size, train=train, max_bad_fraction=d.max_bad_fraction,
                       synthetic_images=d.synthetic_images if train else max(d.synthetic_images // 4, d.synthetic_classes),
                       synthetic_classes=d.synthetic_classes, seed=cfg.seed)
    if getattr(ds, "labels", None) is None and not allow_unlabeled:
        raise ValueError(f"{what}: {path} is not labeled; put the images in one subfolder per class "
                         "(e.g. train/cat/*.jpg, train/dog/*.jpg)" +
                         ("" if what != "data.path" else f" (only loss.kind={'|'.join(LABEL_FREE_KINDS)} "
                          "trains on a flat folder)"))
    return ds


def _unlabeled_splits(base: Any, cfg: DistillConfig) -> DataSplits:
    """A flat training folder (label-free kinds): validation only from ``data.val_path``."""
    d = cfg.data
    if d.val_split > 0:
        raise ValueError(f"data.val_split={d.val_split}: {d.path} has no classes to hold images out of; "
                         "set data.val_split=0 and give a labelled data.val_path for kNN / linear scores")
    if d.max_train_per_class > 0:
        raise ValueError(f"data.max_train_per_class={d.max_train_per_class}: {d.path} has no classes; set it to 0")
    train = _Split(_Unlabeled(base), np.arange(len(base)))
    if not d.val_path:
        return DataSplits(train, None, [], "none", labeled=False)
    vbase = _labeled_base("folder", d.val_path, cfg, True, "data.val_path")
    return DataSplits(train, _Split(vbase, np.arange(len(vbase))), list(vbase.classes), f"folder {d.val_path}",
                      labeled=False)


class _Unlabeled:
    """A dataset without labels seen with ``labels`` all -1 (what :class:`_Split` indexes)."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.labels = np.full(len(base), -1, dtype=np.int64)
        self.paths = getattr(base, "paths", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        return self.base[i]


def build_splits(cfg: DistillConfig) -> DataSplits:
    """Training and validation datasets described by ``cfg.data``.

    Validation is ``data.val_path`` if given, else the last ``data.val_split`` images of every
    class (sorted order, deterministic), else the test split of ``synthetic`` / ``cifar*`` kinds,
    else none. ``data.max_train_per_class`` then keeps the first images of every class. A flat
    folder (label-free kinds only) has validation only from ``data.val_path`` (any classes).

    Raises:
        ValueError: Missing / unlabeled data, unknown validation classes, classes too small.
    """
    d = cfg.data
    label_free = cfg.loss.kind in LABEL_FREE_KINDS
    base = _labeled_base(d.kind, d.path, cfg, True, "data.path", allow_unlabeled=label_free)
    if getattr(base, "labels", None) is None:
        return _unlabeled_splits(base, cfg)
    classes = list(base.classes)
    labels = np.asarray(base.labels, dtype=np.int64)
    all_idx = np.arange(len(labels))
    val: _Split | None = None
    train_idx = all_idx[labels >= 0]
    source = "none"
    if d.val_path:
        vbase = _labeled_base("folder", d.val_path, cfg, True, "data.val_path")
        index = {c: i for i, c in enumerate(classes)}
        unknown = [c for c in vbase.classes if c not in index]
        if unknown and label_free:  # the classes only score the backbone (kNN / linear on val_path)
            index = {c: i for i, c in enumerate(vbase.classes)}
            unknown = []
        if unknown:
            raise ValueError(f"data.val_path: classes not in the training data: {', '.join(unknown[:5])}")
        lmap = np.asarray([index[c] for c in vbase.classes], dtype=np.int64)
        val = _Split(vbase, np.arange(len(vbase)), lmap)
        source = f"folder {d.val_path}"
    elif d.val_split > 0:
        held, small = [], []
        for c in range(len(classes)):
            idx = all_idx[labels == c]
            if len(idx) <= d.val_split:
                small.append(f"{classes[c]} ({len(idx)})")
            held.append(idx[-d.val_split:])
        if small:
            raise ValueError(f"data.val_split={d.val_split} needs more than {d.val_split} images in every "
                             f"class; too small: {', '.join(small[:5])}")
        held_idx = np.sort(np.concatenate(held))
        train_idx = np.setdiff1d(train_idx, held_idx)
        val = _Split(base, held_idx)
        source = f"last {d.val_split} images per class of the training data"
    elif d.kind != "folder":
        vbase = _labeled_base(d.kind, d.path, cfg, False, "data.path")
        val = _Split(vbase, np.arange(len(vbase)))
        source = f"{d.kind} test split"
    if d.max_train_per_class > 0:
        keep = [train_idx[labels[train_idx] == c][: d.max_train_per_class] for c in range(len(classes))]
        train_idx = np.sort(np.concatenate(keep))
    return DataSplits(_Split(base, train_idx), val, classes, source)
