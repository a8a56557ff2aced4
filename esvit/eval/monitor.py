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
from esvit.eval.validity import evaluation_basis

log = logging.getLogger("esvit.eval")


def monitor_preprocess(
    train_path: str,
    val_path: str,
    canvas_size: int,
    image_size: int,
    preprocess: str = "auto",
    k: int | None = None,
    log_flags: bool = True,
) -> tuple[EvalPreprocess, LabeledImages, LabeledImages]:
    """The monitor's datasets and preprocessing (the same choice as ``esvit-knn``).

    ``resize`` decodes at the training canvas ``canvas_size`` and resizes to ``image_size``
    (what the monitor always did); ``dino`` decodes at ``round(image_size / 0.875)`` and
    centre-crops ``image_size``; ``auto`` picks ``dino`` when the images are larger than
    ``image_size`` (see :func:`~esvit.eval.features.resolve_preprocess`). Called at start-up,
    it refuses folders on which kNN accuracy cannot mean anything (one class in the bank, a
    validation class absent from it, ``k`` larger than the bank; see
    :mod:`esvit.eval.validity`) before the first training step.

    Args:
        train_path: Labeled folder of the feature bank.
        val_path: Labeled folder of the queries.
        canvas_size: Decode size of the ``resize`` protocol (the training canvas).
        image_size: Evaluation resolution.
        preprocess: ``"auto"``, ``"dino"`` or ``"resize"``.
        k: Neighbours (checked against the bank size when given).
        log_flags: Log the cautions (e.g. a tiny validation set) as warnings.

    Returns:
        ``(preprocess, train_ds, val_ds)``; the validation labels follow the training classes.

    Raises:
        esvit.eval.validity.MeaninglessEvaluationError: See above.
    """
    tr, va, classes = labeled_splits(train_path, val_path, None, canvas_size)
    evaluation_basis("knn", tr.labels, va.labels, len(classes), classes,
                     ks=(k,) if k is not None else (), bank_paths=tr.paths if log_flags else None,
                     val_paths=va.paths, log_flags=log_flags)
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
    for images, labels, ok, _ in make_loader(data, 256, num_workers, what="kNN monitor images"):
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
        ``{"top1": %, "top5": % (5 or more classes), "n_bank", "n_val", "chance_top1": %,
        "k"}``: every number with what it was computed on.

    Raises:
        esvit.eval.validity.MeaninglessEvaluationError: The readable bank has fewer than 2
            classes or fewer than ``k`` images, or a validation class has no bank image.
    """

    def encode(x: Tensor) -> Tensor:
        return backbone(x)[0]

    _, tr, va = monitor_preprocess(train_path, val_path, canvas_size, image_size, preprocess,
                                   log_flags=False)
    tr_x, tr_y = extract_features(encode, _labeled_batches(tr, num_workers, max_train_images),
                                  device, image_size)
    va_x, va_y = extract_features(encode, _labeled_batches(va, num_workers, None), device, image_size)
    num_classes = int(max(tr_y.max(), va_y.max())) + 1 if len(tr_y) and len(va_y) else 1
    basis = evaluation_basis("knn", tr_y, va_y, num_classes, ks=(k,), log_flags=False)
    res = knn_accuracy(tr_x, tr_y, va_x, va_y, k=k, temperature=temperature,
                       num_classes=basis.num_classes)
    return {**res, "n_bank": basis.n_bank, "n_val": basis.n_val,
            "chance_top1": basis.chance["top1"], "k": k}
