"""Validation of a distillation student (or teacher): top-1 / top-5, per head for DeiT."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from esvit.distill.deit import DeiTVisionTransformer
from esvit.eval.features import make_loader, preprocess
from esvit.eval.linear import accuracy
from esvit.train.logger import MetricLogger

__all__ = ["evaluate", "log_eval"]


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
        for images, y, ok, _ in make_loader(dataset, batch_size, num_workers):
            ok = torch.as_tensor(ok, dtype=torch.bool)
            if not ok.any():
                continue
            x = preprocess(images[ok].to(device, non_blocking=device.type == "cuda"), image_size)
            if deit:
                c, d = model.forward_heads(x)
                heads.append((c.float().cpu(), d.float().cpu()))
                outs.append(model.combine(c, d).cpu())
            else:
                outs.append(model(x).float().cpu())
            labels.append(torch.as_tensor(y)[ok])
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


def log_eval(logger: MetricLogger, res: dict[str, Any], step: int, prefix: str = "val") -> None:
    rec = {f"{prefix}_{k}": v for k, v in res.items() if k in ("top1", "top5")}
    for head, acc in (res.get("heads") or {}).items():
        rec.update({f"{prefix}_{head}_{k}": v for k, v in acc.items()})
    logger.log(rec, step)
