"""Feature extraction from a (frozen) backbone for kNN, linear probes and embeddings."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(
    images: Tensor,
    size: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """uint8 ``(b, 3, H, W)`` -> normalised float32, resized (antialiased) to ``size`` if given."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images (b, 3, H, W), got {images.dtype}")
    x = images.float().div_(255)
    if size is not None and (x.shape[-2] != size or x.shape[-1] != size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(
    encode: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``encode`` over ``(uint8 images, labels)`` batches.

    Args:
        encode: Maps normalised images ``(b, 3, s, s)`` to features ``(b, d)``.
        batches: Iterable of ``(images uint8 (b,3,H,W), labels (b,))``.
        device: Device to run on.
        size: Resize images to this side first (None keeps the canvas size).

    Returns:
        ``(features (N, d) float32 on CPU, labels (N,))``.
    """
    feats, labels = [], []
    for images, y in batches:
        x = preprocess(images.to(device, non_blocking=device.type == "cuda"), size)
        feats.append(encode(x).float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats), torch.cat(labels)
