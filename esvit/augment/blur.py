"""Batched Gaussian blur with a per-sample sigma.

The blur is separable and computed as a sum of shifted, per-sample weighted views of a
reflect-padded image (one ``addcmul_`` per tap and direction), i.e. a depthwise convolution
whose kernels differ per sample. The number of tensor operations depends on the kernel size
only, never on the batch size. Border handling (reflect) and the kernel
(``exp(-x^2 / (2 sigma^2))`` sampled at integer offsets, normalised) match torchvision's
``gaussian_blur``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel1d
from torch import Tensor

__all__ = ["blur_kernel_size", "gaussian_blur", "gaussian_kernel1d"]


def blur_kernel_size(sigma_max: float, image_size: int | None = None) -> int:
    """Odd kernel size covering ``+-3 sigma_max``, clamped to the largest odd size <= image_size.

    Args:
        sigma_max: largest sigma that will be used.
        image_size: smallest spatial side of the images to blur (reflect padding needs
            ``kernel_size // 2 < image_size``).

    Returns:
        ``2 * ceil(3 * sigma_max) + 1`` (13 for sigma 2), clamped for tiny images.
    """
    if sigma_max <= 0:
        raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
    k = 2 * math.ceil(3.0 * sigma_max) + 1
    if image_size is not None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        k = min(k, image_size if image_size % 2 == 1 else image_size - 1)
    return k


def gaussian_kernel1d(sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-sample normalised 1-D Gaussian kernels (kornia's ``get_gaussian_kernel1d``).

    Args:
        sigma: ``(n,)`` positive standard deviations.
        kernel_size: odd number of taps.

    Returns:
        ``(n, kernel_size)`` kernels, each summing to 1.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
    return get_gaussian_kernel1d(kernel_size, sigma.to(dtype).reshape(-1, 1))


def _blur_(y: Tensor, weights: Tensor) -> Tensor:
    """Separable blur of ``y`` ``(m, c, h, w)`` (used as scratch) with ``weights`` ``(m, k)``."""
    m, _, h, w = y.shape
    k = weights.shape[1]
    r = k // 2
    taps = weights.t().reshape(k, m, 1, 1, 1).to(dtype=y.dtype)
    pad = F.pad(y, (0, 0, r, r), mode="reflect")  # (m, c, h + 2r, w)
    acc = torch.mul(pad[:, :, 0:h], taps[0], out=y)
    for t in range(1, k):
        acc.addcmul_(pad[:, :, t:t + h], taps[t])
    pad = F.pad(acc, (r, r, 0, 0), mode="reflect")  # (m, c, h, w + 2r)
    out = torch.mul(pad[..., 0:w], taps[0], out=acc)
    for t in range(1, k):
        out.addcmul_(pad[..., t:t + w], taps[t])
    return out


def gaussian_blur(x: Tensor, sigma: Tensor | float, kernel_size: int | None = None) -> Tensor:
    """Gaussian blur with a per-sample sigma (torchvision ``gaussian_blur`` semantics).

    Args:
        x: float images ``(b, c, h, w)``.
        sigma: ``(b,)`` per-sample sigmas (or one float for all).
        kernel_size: odd number of taps (same in both directions); default
            ``blur_kernel_size(max sigma, min(h, w))``. Must satisfy ``kernel_size // 2 < min(h, w)``.

    Returns:
        ``(b, c, h, w)`` blurred images (a new tensor).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"expected float images of shape (b, c, h, w), got {got}")
    b = x.shape[0]
    if not isinstance(sigma, Tensor):
        sigma = torch.full((b,), float(sigma))
    if sigma.shape != (b,):
        raise ValueError(f"sigma must have shape ({b},), got {tuple(sigma.shape)}")
    if kernel_size is None:
        kernel_size = blur_kernel_size(float(sigma.max()) if b else 1.0, min(x.shape[-2:]))
    if kernel_size // 2 >= min(x.shape[-2:]):
        raise ValueError(f"kernel_size must be < 2 * min(h, w) = {2 * min(x.shape[-2:])} for "
                         f"reflect padding, got {kernel_size}")
    weights = gaussian_kernel1d(sigma.to(device=x.device), kernel_size)
    return _blur_(x.clone(), weights)
