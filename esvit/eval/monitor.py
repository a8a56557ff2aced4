"""Online kNN monitor used during pretraining (rank 0, teacher backbone)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from esvit.eval.features import (
    EvalPreprocess,
    LabeledImages,
    extract_features,
    labeled_splits,
    make_loader,
    probe_paths,
    resolve_preprocess,
)
from esvit.eval.knn import knn_accuracy

log = logging.getLogger("esvit.eval")


def monitor_preprocess(
    train_path: str,
    val_path: str,
    canvas_size: int,
    image_size: int,
    preprocess: str = "auto",
) -> tuple[EvalPreprocess, LabeledImages, LabeledImages]:
    """The monitor's datasets and preprocessing (the same choice as ``esvit-knn``).

    ``resize`` decodes at the training canvas ``canvas_size`` and resizes to ``image_size``
    (what the monitor always did); ``dino`` decodes at ``round(image_size / 0.875)`` and
    centre-crops ``image_size``; ``auto`` picks ``dino`` when the images are larger than
    ``image_size`` (see :func:`~esvit.eval.features.resolve_preprocess`).

    Returns:
        ``(preprocess, train_ds, val_ds)``; the validation labels follow the training classes.
    """
    tr, va, _ = labeled_splits(train_path, val_path, None, canvas_size)
    pre = resolve_preprocess(preprocess, image_size, probe_paths(tr, va))
    if pre.protocol == "resize":
        pre = dataclasses.replace(pre, decode_size=canvas_size)
    return pre, tr.with_preprocess(pre), va.with_preprocess(pre)


def _labeled_batches(ds: LabeledImages, num_workers: int, limit: int | None,
                     ) -> Iterator[tuple[Tensor, Tensor]]:
    """``(uint8 images (b, 3, s, s), labels (b,))`` of ``ds`` (unreadable images dropped)."""
    data: torch.utils.data.Dataset = ds
    if limit is not None and len(ds) > limit:
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=g)[:limit].tolist())
    for images, labels, ok, _ in make_loader(data, 256, num_workers):
        if ok.any():
            yield images[ok], labels[ok]


@torch.no_grad()
def knn_monitor(
    backbone: nn.Module,
    train_path: str,
    val_path: str,
    canvas_size: int,
    image_size: int,
    device: torch.device,
    k: int = 20,
    temperature: float = 0.07,
    max_train_images: int | None = 10000,
    num_workers: int = 0,
    preprocess: str = "auto",
) -> dict[str, float]:
    """kNN accuracy of ``backbone``'s pooled features (a :class:`NetWrapper`) on labeled folders.

    Args:
        backbone: :class:`~esvit.wrapper.NetWrapper` (``backbone(x)[0]`` are the features).
        train_path: Labeled folder of the feature bank.
        val_path: Labeled folder of the queries (class names among ``train_path``'s).
        canvas_size: Decode size of the ``resize`` protocol (the training canvas).
        image_size: Evaluation resolution.
        device: Device to run on.
        k: Neighbours.
        temperature: Vote temperature.
        max_train_images: Random (seed 0) subset of the bank; None: all.
        num_workers: DataLoader workers.
        preprocess: ``"auto"``, ``"dino"`` or ``"resize"`` (see :func:`monitor_preprocess`).

    Returns:
        ``{"top1": %, ...}`` (``top5`` with 5 or more classes).
    """

    def encode(x: Tensor) -> Tensor:
        return backbone(x)[0]

    _, tr, va = monitor_preprocess(train_path, val_path, canvas_size, image_size, preprocess)
    tr_x, tr_y = extract_features(encode, _labeled_batches(tr, num_workers, max_train_images),
                                  device, image_size)
    va_x, va_y = extract_features(encode, _labeled_batches(va, num_workers, None), device, image_size)
    return knn_accuracy(tr_x, tr_y, va_x, va_y, k=k, temperature=temperature)
