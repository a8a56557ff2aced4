"""Dataset factory (folder, synthetic, CIFAR / STL through torchvision) and the training loader.

Every dataset yields ``(image, label int, SampleStatus)``, the image a ``uint8 (3, S, S)`` square
or, with ``resize_mode="letterbox"`` (the training path), a :class:`~esvit.data.decode.Canvas`
(see :mod:`esvit.data.folder`). The loader's order is a pure function of ``(seed, epoch)``::

    loader = build_loader(ds, batch_size, num_workers, shuffle=True, seed=seed, drop_last=True)
    for epoch in range(start_epoch, epochs):
        loader.sampler.set_epoch(epoch)           # required: otherwise every epoch repeats epoch 0
        loader.sampler.set_start(skip_batches * batch_size)   # resume mid-epoch (else 0)
        for images, labels, status in loader: ...

``set_epoch`` and ``set_start`` take effect at the next ``iter(loader)``, which fixes the order
of that pass; changing them afterwards does not affect a pass already started.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from esvit.data.decode import Canvas, check_canvas_args, resize_to_canvas, to_canvas, to_chw_tensor
from esvit.data.folder import IMG_EXTENSIONS, ImageFolderDataset, SampleStatus
from esvit.data.synthetic import SyntheticImageDataset

__all__ = [
    "DATASET_KINDS",
    "ArrayImageDataset",
    "EpochDataLoader",
    "EpochSampler",
    "build_dataset",
    "build_loader",
    "worker_init_fn",
]

DATASET_KINDS = ("folder", "synthetic", "cifar10", "cifar100", "stl10")

_TV_LAYOUT = {
    "cifar10": "<root>/cifar-10-batches-py/ holding data_batch_1 ... data_batch_5, test_batch and "
               "batches.meta (the extracted cifar-10-python.tar.gz)",
    "cifar100": "<root>/cifar-100-python/ holding train, test and meta (the extracted "
                "cifar-100-python.tar.gz)",
    "stl10": "<root>/stl10_binary/ holding train_X.bin, train_y.bin, test_X.bin, test_y.bin, "
             "unlabeled_X.bin and class_names.txt (the extracted stl10_binary.tar.gz)",
}


# ----------------------------------------------------------------------------- in-memory datasets


class ArrayImageDataset(Dataset):
    """In-memory ``uint8`` images (e.g. CIFAR / STL arrays) in the common item format.

    Args:
        images: ``uint8`` array ``(N, H, W, 3)`` (``layout="nhwc"``) or ``(N, 3, H, W)``
            (``layout="nchw"``).
        labels: ``(N,)`` ints (-1 for unlabeled samples).
        classes: Class names.
        canvas_size: Output side ``S``; images of another size are resized like files
            (:func:`esvit.data.decode.resize_to_canvas`, or for ``"letterbox"``
            :func:`esvit.data.decode.to_canvas`: shrunk to fit when larger, never enlarged).
        layout: ``"nhwc"`` or ``"nchw"``.
        resize_mode: ``"short_side_center_crop"``, ``"stretch"`` or ``"letterbox"`` (items
            carry a :class:`~esvit.data.decode.Canvas`).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Any,
        classes: list[str],
        canvas_size: int,
        layout: str = "nhwc",
        resize_mode: str = "short_side_center_crop",
    ) -> None:
        check_canvas_args(canvas_size, resize_mode)
        if layout not in ("nhwc", "nchw"):
            raise ValueError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
        images = np.asarray(images)
        ch_axis = 3 if layout == "nhwc" else 1
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[ch_axis] != 3:
            raise ValueError(f"images must be uint8 with 3 channels in layout {layout!r}, got "
                             f"{images.dtype} {images.shape}")
        self.images = images
        self.layout = layout
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")
        self.classes = list(classes)
        self.canvas_size = canvas_size
        self.resize_mode = resize_mode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Canvas, int, SampleStatus]:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        arr = self.images[i]
        if self.layout == "nchw":
            arr = arr.transpose(1, 2, 0)
        s = self.canvas_size
        if self.resize_mode == "letterbox":
            img: torch.Tensor | Canvas = to_canvas(arr, s)
        elif arr.shape[:2] == (s, s):
            img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
        else:
            img = to_chw_tensor(resize_to_canvas(Image.fromarray(np.ascontiguousarray(arr)), s, self.resize_mode))
        return img, int(self.labels[i]), SampleStatus(True, i, "")


def _torchvision_dataset(kind: str, root: str, train: bool, split: str | None) -> tuple[np.ndarray, Any, list[str], str]:
    import torchvision.datasets as tvd

    try:
        if kind == "cifar10":
            ds = tvd.CIFAR10(root, train=train, download=False)
            return ds.data, ds.targets, list(ds.classes), "nhwc"
        if kind == "cifar100":
            ds = tvd.CIFAR100(root, train=train, download=False)
            return ds.data, ds.targets, list(ds.classes), "nhwc"
        split = split or ("train+unlabeled" if train else "test")
        ds = tvd.STL10(root, split=split, download=False)
        return ds.data, ds.labels, list(ds.classes), "nchw"
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"{kind} not found under {root!r} ({e}). Expected {_TV_LAYOUT[kind].replace('<root>', root)}. "
            "Nothing is downloaded; to train on your own images use data.kind: folder with data.path "
            "pointing at an image folder."
        ) from e


def build_dataset(
    kind: str,
    root: str | os.PathLike[str] | None,
    canvas_size: int,
    train: bool = True,
    *,
    max_bad_fraction: float = 0.01,
    resize_mode: str = "short_side_center_crop",
    extensions: tuple[str, ...] = IMG_EXTENSIONS,
    synthetic_images: int = 512,
    synthetic_classes: int = 10,
    seed: int = 0,
    split: str | None = None,
) -> Dataset:
    """Build a dataset yielding ``(image, label int, SampleStatus)``.

    The image is ``uint8 (3, S, S)``, or a :class:`~esvit.data.decode.Canvas` when
    ``resize_mode="letterbox"`` (every kind supports it; square images that already have the
    canvas size give ``box`` = the whole canvas).

    Keyword options that do not apply to ``kind`` are ignored, so one call site can pass the
    whole data config.

    Args:
        kind: ``"folder"`` (:class:`ImageFolderDataset`), ``"synthetic"``
            (:class:`SyntheticImageDataset`), ``"cifar10"``, ``"cifar100"`` or ``"stl10"``
            (torchvision, already on disk: ``download=False``).
        root: Folder / list file for ``folder``; torchvision root for the others; unused for
            ``synthetic``.
        canvas_size: Output side ``S`` (torchvision images are resized when it differs from
            their native 32 / 96).
        train: Training split (torchvision kinds; ``synthetic`` uses ``seed + 1`` when False).
        max_bad_fraction: ``folder`` only (see :class:`ImageFolderDataset`).
        resize_mode: ``"short_side_center_crop"``, ``"stretch"`` or ``"letterbox"``.
        extensions: ``folder`` only.
        synthetic_images: ``synthetic`` only: number of images.
        synthetic_classes: ``synthetic`` only: number of classes.
        seed: ``synthetic`` only: generation seed.
        split: ``stl10`` only: overrides the split (default ``"train+unlabeled"`` when
            ``train``, else ``"test"``; unlabeled images have label -1).

    Raises:
        ValueError: Unknown ``kind`` or missing ``root``.
        FileNotFoundError: Data not on disk (with the expected layout).
    """
    check_canvas_args(canvas_size, resize_mode)
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}: expected one of {DATASET_KINDS}")
    if kind == "synthetic":
        return SyntheticImageDataset(synthetic_images, canvas_size, synthetic_classes,
                                     seed=seed if train else seed + 1, resize_mode=resize_mode)
    if root is None or not os.fspath(root).strip():
        hint = "an image folder or a .txt/.csv list" if kind == "folder" else "the torchvision root folder"
        raise ValueError(f"dataset kind {kind!r} needs a root path (data.path): {hint}")
    root = os.fspath(root)
    if kind == "folder":
        return ImageFolderDataset(root, canvas_size, max_bad_fraction=max_bad_fraction,
                                  resize_mode=resize_mode, extensions=extensions)
    images, labels, classes, layout = _torchvision_dataset(kind, root, train, split)
    return ArrayImageDataset(images, labels, classes, canvas_size, layout=layout, resize_mode=resize_mode)


# ---------------------------------------------------------------------------------------- sampling


class EpochSampler(Sampler[int]):
    """Per-rank sample order that is a pure function of ``(seed, epoch)``, with mid-epoch skip.

    Same order as ``torch.utils.data.DistributedSampler`` (``randperm`` seeded with
    ``seed + epoch``, padded by repetition or truncated to a multiple of ``num_replicas``,
    then every ``num_replicas``-th index from ``rank``); ``num_replicas=1`` is the
    single-process case. :meth:`set_start` skips the first samples of this rank's order, so a
    resumed run continues exactly where it stopped.

    Args:
        data_source: Dataset (anything with ``len``) or its length.
        num_replicas: Number of ranks sharing the data.
        rank: This rank.
        shuffle: Random permutation (else ``0 .. n-1``).
        seed: Base seed, identical on every rank.
        drop_last: Drop the tail to make the data evenly divisible across ranks (else pad).
    """

    def __init__(
        self,
        data_source: Sized | int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        n = data_source if isinstance(data_source, int) else len(data_source)
        if n < 1:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got length {n}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=} {rank=}")
        self.n = n
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        if drop_last and n % num_replicas:
            self.num_samples = math.ceil((n - num_replicas) / num_replicas)
        else:
            self.num_samples = math.ceil(n / num_replicas)
        if self.num_samples < 1:
            raise ValueError(f"{n} samples are too few for {num_replicas} replicas with drop_last")
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start = 0
        self._frozen: list[int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next pass uses."""
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's order in the next passes (0 = none)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}] (samples per rank), got {start}")
        self.start = int(start)

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full order for ``epoch`` (default: the current one), before skipping."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            pad = self.total_size - len(order)
            if pad:
                order += (order * math.ceil(pad / len(order)))[:pad]
        return order[self.rank : self.total_size : self.num_replicas]

    def freeze(self) -> None:
        """Fix the order of the next pass now (called by :class:`EpochDataLoader` on ``iter``)."""
        self._frozen = self.indices()[self.start :]

    def __iter__(self) -> Iterator[int]:
        order, self._frozen = self._frozen, None
        if order is None:
            order = self.indices()[self.start :]
        return iter(order)

    def __len__(self) -> int:
        """Samples per rank in a full epoch (a pass after :meth:`set_start` yields fewer)."""
        return self.num_samples


class EpochDataLoader(DataLoader):
    """DataLoader that fixes its :class:`EpochSampler`'s order when ``iter()`` is called.

    A plain DataLoader without workers asks the sampler for indices only at the first
    ``next()``; freezing at ``iter()`` makes ``set_epoch`` / ``set_start`` behave the same with
    and without workers.
    """

    def __iter__(self) -> Iterator[Any]:
        freeze = getattr(self.sampler, "freeze", None)
        if callable(freeze):
            freeze()
        return super().__iter__()


def worker_init_fn(worker_id: int) -> None:
    """Per-worker set-up: one intra-op thread, ``random`` / ``numpy`` seeded from torch's
    per-worker seed (itself derived from the loader's seeded generator)."""
    torch.set_num_threads(1)
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    distributed: bool | None = None,
    start_index: int = 0,
    prefetch_factor: int | None = None,
) -> EpochDataLoader:
    """DataLoader over ``dataset`` with a deterministic, resumable :class:`EpochSampler`.

    The loop must call ``loader.sampler.set_epoch(epoch)`` before each epoch; to resume inside
    an epoch, ``loader.sampler.set_start(samples_already_seen_by_this_rank)`` before
    ``iter(loader)`` (and ``set_start(0)`` for the next epochs). Both take effect at ``iter``.

    Args:
        dataset: Map-style dataset (items collate with ``default_collate``).
        batch_size: Per-rank batch size.
        num_workers: Decoding worker processes (kept alive across epochs when > 0).
        shuffle: Shuffle with a permutation seeded by ``seed + epoch``.
        seed: Base seed; also seeds the workers' base seed generator.
        drop_last: Drop the last incomplete batch (and the tail that does not split evenly
            across ranks).
        distributed: Shard across ranks. None: when ``torch.distributed`` is initialised.
            True requires it to be initialised.
        start_index: Initial :meth:`EpochSampler.set_start` (samples of this rank to skip).
        prefetch_factor: Batches prefetched per worker (DataLoader default when None).

    Returns:
        :class:`EpochDataLoader`; ``pin_memory`` only when CUDA is available.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised
    if distributed and not initialised:
        raise RuntimeError("build_loader(distributed=True) needs torch.distributed to be initialised first")
    replicas, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    sampler = EpochSampler(dataset, replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)  # type: ignore[arg-type]
    sampler.set_start(start_index)
    g = torch.Generator()
    g.manual_seed(seed)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["persistent_workers"] = True
        extra["worker_init_fn"] = worker_init_fn
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return EpochDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), drop_last=drop_last, generator=g, **extra,
    )
