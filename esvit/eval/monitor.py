"""Online kNN monitor used during pretraining (rank 0, teacher backbone)."""

from __future__ import annotations

import torch
from torch import nn

from esvit.eval.features import extract_features
from esvit.eval.knn import knn_accuracy


def _labeled_batches(path: str, canvas_size: int, num_workers: int, limit: int | None):
    from esvit.data import build_dataset

    ds = build_dataset("folder", path, canvas_size)
    if limit is not None and len(ds) > limit:
        g = torch.Generator().manual_seed(0)
        ds = torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=g)[:limit].tolist())
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=num_workers, shuffle=False)
    for images, labels, *_ in loader:
        yield images, labels


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
) -> dict[str, float]:
    """kNN accuracy of ``backbone``'s pooled features (a :class:`NetWrapper`) on labeled folders."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        return backbone(x)[0]

    tr_x, tr_y = extract_features(encode, _labeled_batches(train_path, canvas_size, num_workers, max_train_images),
                                  device, image_size)
    va_x, va_y = extract_features(encode, _labeled_batches(val_path, canvas_size, num_workers, None),
                                  device, image_size)
    return knn_accuracy(tr_x, tr_y, va_x, va_y, k=k, temperature=temperature)
