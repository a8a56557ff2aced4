"""Validation of a distillation student (or teacher): top-1 / top-5, per head for DeiT; for the
label-free kinds, kNN and linear-probe top-1 of a backbone's pooled features (:func:`score_features`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from esvit.distill.deit import DeiTVisionTransformer
from esvit.eval.features import make_loader, preprocess
from esvit.eval.linear import accuracy
from esvit.train.logger import MetricLogger

__all__ = ["FEATURE_PROTOCOL", "evaluate", "log_eval", "score_features"]

FEATURE_PROTOCOL = ("labelled validation set split in two by position within each class (even: kNN bank and "
                    "linear-probe training set, odd: queries); kNN k=min(20, bank) T=0.07 cosine; linear: "
                    "L-BFGS logistic regression, standardised features, l2=1e-4, 300 iterations")


def _readable_batches(dataset: Dataset, image_size: int, device: torch.device, batch_size: int,
                      num_workers: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(normalised images on device, labels)`` batches of ``dataset``, unreadable images dropped."""
    for images, y, ok, _ in make_loader(dataset, batch_size, num_workers):
        ok = torch.as_tensor(ok, dtype=torch.bool)
        if ok.any():
            yield preprocess(images[ok].to(device, non_blocking=device.type == "cuda"), image_size), \
                torch.as_tensor(y)[ok]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, image_size: int, device: torch.device,
             batch_size: int = 256, num_workers: int = 0) -> dict[str, Any]:
    """Top-1 / top-5 (percent) of a classifier on a split; unreadable images are skipped.

    Args:
        model: Maps normalised images to logits (a DeiT student is scored on the average of its
            two heads' softmax outputs, and per head under ``"heads"``).
        dataset: Items ``(image uint8, label, ok, position)``.
        image_size: Images are resized (antialiased) to this side.
        device: Device.
        batch_size: Batch size.
        num_workers: Decoding workers.

    Returns:
        ``{"top1", "top5" (>= 5 classes), "n"}`` plus ``"heads": {"cls": ..., "dist": ...}``
        for DeiT students.
    """
    was_training = model.training
    model.eval()
    deit = isinstance(model, DeiTVisionTransformer)
    outs: list[Tensor] = []
    heads: list[tuple[Tensor, Tensor]] = []
    labels: list[Tensor] = []
    try:
        for x, y in _readable_batches(dataset, image_size, device, batch_size, num_workers):
            if deit:
                c, d = model.forward_heads(x)
                heads.append((c.float().cpu(), d.float().cpu()))
                outs.append(model.combine(c, d).cpu())
            else:
                outs.append(model(x).float().cpu())
            labels.append(y)
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("no readable validation images")
    logits, target = torch.cat(outs), torch.cat(labels)
    res: dict[str, Any] = {**accuracy(logits, target), "n": int(target.numel())}
    if deit:
        res["heads"] = {"cls": accuracy(torch.cat([h[0] for h in heads]), target),
                        "dist": accuracy(torch.cat([h[1] for h in heads]), target)}
    return res


@torch.no_grad()
def score_features(encoder: nn.Module, dataset: Dataset, image_size: int, device: torch.device,
                   batch_size: int = 256, num_workers: int = 0) -> dict[str, Any]:
    """kNN and linear-probe top-1 (percent) of an encoder's pooled features on a labelled split
    (:data:`FEATURE_PROTOCOL`); unreadable images are skipped.

    Args:
        encoder: Maps normalised images ``(b, 3, s, s)`` to features ``(b, d)`` (a student's
            backbone, a :class:`~esvit.eval.features.FeatureEncoder`).
        dataset: Items ``(image uint8, label, ok, position)`` with labels ``>= 0``.
        image_size: Images are resized (antialiased) to this side.
        device: Device.
        batch_size: Batch size.
        num_workers: Decoding workers.

    Returns:
        ``{"knn_top1", "linear_top1", "n_bank", "n_query", "protocol"}``, or ``{"skipped": reason,
        ...}`` when the split cannot score (a class with fewer than 2 images, fewer than 2 classes).
    """
    from esvit.eval.knn import knn_accuracy
    from esvit.eval.linear import train_linear_lbfgs

    was_training = encoder.training
    encoder.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for x, y in _readable_batches(dataset, image_size, device, batch_size, num_workers):
            feats.append(encoder(x).float().cpu())
            labels.append(y)
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("no readable validation images")
    x, y = torch.cat(feats), torch.cat(labels).long()
    rank = torch.zeros_like(y)  # position of every image within its class
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        rank[idx] = torch.arange(len(idx))
    bank, query = rank % 2 == 0, rank % 2 == 1
    res: dict[str, Any] = {"n_bank": int(bank.sum()), "n_query": int(query.sum()), "protocol": FEATURE_PROTOCOL}
    classes = int(y.max()) + 1
    small = [int(c) for c in y.unique() if int((y == c).sum()) < 2]
    if len(y.unique()) < 2 or small:
        res["skipped"] = (f"the validation set needs >= 2 classes of >= 2 images each (has {len(y.unique())} "
                          f"classes; with one image: {small[:5]})")
        return res
    knn = knn_accuracy(x[bank], y[bank], x[query], y[query], k=min(20, int(bank.sum())), temperature=0.07,
                       num_classes=classes)
    with torch.enable_grad():
        clf = train_linear_lbfgs(x[bank], y[bank], classes, l2=1e-4, max_iter=300)
    res["knn_top1"] = knn["top1"]
    res["linear_top1"] = accuracy(clf(x[query]), y[query])["top1"]
    return res


def log_eval(logger: MetricLogger, res: dict[str, Any], step: int, prefix: str = "val") -> None:
    rec = {f"{prefix}_{k}": v for k, v in res.items() if k in ("top1", "top5", "knn_top1", "linear_top1")}
    for head, acc in (res.get("heads") or {}).items():
        rec.update({f"{prefix}_{head}_{k}": v for k, v in acc.items()})
    logger.log(rec, step)
