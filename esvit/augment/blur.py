"""Batched Gaussian blur with a per-sample sigma.

The blur is separable; each pass is a batched matrix product with per-sample banded
matrices that fold in the reflect padding (a depthwise convolution whose kernel differs per
sample). The number of tensor operations is fixed (never depends on the batch size). Border
handling (reflect) and the kernel
(``exp(-x^2 / (2 sigma^2))`` sampled at integer offsets, normalised) match torchvision's
``gaussian_blur``.
"""

from __future__ import annotations

import math

import torch
from kornia.filters import get_gaussian_kernel1d
from torch import Tensor

__all__ = ["blur_kernel_size", "blur_matrix", "gaussian_blur", "gaussian_kernel1d"]


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


def blur_matrix(weights: Tensor, size: int) -> Tensor:
    """Per-sample ``(size, size)`` matrices of a 1-D convolution with reflect padding.

    ``out[i] = sum_j M[i, j] x[j]`` equals convolving ``x`` (reflect-padded by
    ``kernel_size // 2``) with the kernel, as torchvision's ``gaussian_blur`` does.

    Args:
        weights: ``(m, k)`` kernels (odd ``k``, ``k // 2 < size``).
        size: length of the signal.

    Returns:
        ``(m, size, size)`` matrices.
    """
    m, k = weights.shape
    r = k // 2
    if r >= size:
        raise ValueError(f"kernel size {k} too large for reflect padding of size {size} "
                         f"(need kernel_size // 2 < {size})")
    dev = weights.device
    src = torch.arange(size, device=dev).view(size, 1) + torch.arange(k, device=dev) - r
    src = src.abs()
    src = torch.where(src > size - 1, 2 * (size - 1) - src, src)  # reflect (no edge repeat)
    mat = torch.zeros((m, size, size), device=dev, dtype=weights.dtype)
    return mat.scatter_add_(2, src.expand(m, size, k), weights.view(m, 1, k).expand(m, size, k))


def _blur_(y: Tensor, weights: Tensor) -> Tensor:
    """Separable blur of contiguous ``y`` ``(m, c, h, w)`` with per-sample ``weights`` ``(m, k)``.

    Both passes are one ``bmm`` with per-sample banded matrices (reflect borders folded in):
    the W pass ``(m, c*h, w) @ (m, w, w)``, then, after one transposing copy to
    ``(m, h, c, w)``, the H pass ``(m, h, h) @ (m, h, c*w)``. On CPU this is as fast as or
    faster than ``k`` shifted multiply-adds and a fixed, small number of ops; only native ops
    with explicit shapes are used, so the op sequence never depends on ``m``.

    Returns:
        ``(m, h, c, w)`` blurred images (note the layout; ``.permute(0, 2, 1, 3)`` gives
        ``(m, c, h, w)``).
    """
    m, c, h, w = y.shape
    weights = weights.to(dtype=y.dtype)
    mat_w = blur_matrix(weights, w)
    mat_h = mat_w if h == w else blur_matrix(weights, h)
    rows = torch.bmm(y.view(m, c * h, w), mat_w.transpose(1, 2)).view(m, c, h, w)
    rows_hcw = torch.empty((m, h, c, w), dtype=y.dtype, device=y.device)
    rows_hcw.copy_(rows.transpose(1, 2))
    return torch.bmm(mat_h, rows_hcw.view(m, h, c * w)).view(m, h, c, w)


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
    return _blur_(x.contiguous(), weights).permute(0, 2, 1, 3).contiguous()
