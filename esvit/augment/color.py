"""Batched colour operations with per-sample parameters.

Every function takes float images ``(b, 3, h, w)`` with values in ``[0, 1]`` and per-sample
parameters of shape ``(b,)`` (a Python float is broadcast to the whole batch). The semantics
follow ``torchvision.transforms.v2.functional`` on float tensors (same formulas, same clamping),
so for a single sample the results agree with torchvision up to float rounding (~1e-6).

None of the functions loops over samples: the number of tensor operations is independent of
the batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "GRAY_WEIGHTS",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "jitter_plan",
    "rgb_to_grayscale",
    "solarize",
    "to_grayscale",
]

#: ITU-R 601-2 luma weights, as used by torchvision's ``rgb_to_grayscale``.
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)

#: Channel offsets (in sixths of the hue circle) of the closed-form HSV -> RGB conversion
#: ``c_n = V - V * S * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 * H) mod 6``.
_HSV_OFFSETS: tuple[float, float, float] = (5.0, 3.0, 1.0)

# Op ids used in ``order`` (same numbering as torchvision's ColorJitter ``fn_idx``).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of shape (b, 3, h, w), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating point image tensor in [0, 1], got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (b, 3, h, w), got {tuple(x.shape)}")


def _per_sample(value: Tensor | float, x: Tensor, name: str) -> Tensor:
    """Return ``value`` as a ``(b, 1, 1, 1)`` tensor on ``x``'s device and dtype."""
    b = x.shape[0]
    if isinstance(value, Tensor):
        if value.ndim == 0:
            value = value.expand(b)
        if value.shape != (b,):
            raise ValueError(f"{name} must have shape ({b},) (one value per sample), got "
                             f"{tuple(value.shape)}")
        return value.to(device=x.device, dtype=x.dtype).view(b, 1, 1, 1)
    return torch.full((b, 1, 1, 1), float(value), device=x.device, dtype=x.dtype)


def _gray(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Luma of ``x`` ``(b, 3, h, w)`` -> ``(b, 1, h, w)`` (torchvision's op order)."""
    wr, wg, wb = GRAY_WEIGHTS
    g = torch.mul(x[:, 0:1], wr, out=out) if out is not None else x[:, 0:1].mul(wr)
    return g.add_(x[:, 1:2], alpha=wg).add_(x[:, 2:3], alpha=wb)


def rgb_to_grayscale(x: Tensor, num_output_channels: int = 3) -> Tensor:
    """Convert RGB to grayscale with ITU-R 601-2 weights (0.2989, 0.587, 0.114).

    Args:
        x: images ``(b, 3, h, w)`` in ``[0, 1]``.
        num_output_channels: 1 or 3 (the luma repeated, as torchvision's ``RandomGrayscale``).

    Returns:
        ``(b, num_output_channels, h, w)`` (a 3-channel result is a contiguous copy).
    """
    _check_images(x)
    if num_output_channels not in (1, 3):
        raise ValueError(f"num_output_channels must be 1 or 3, got {num_output_channels}")
    g = _gray(x)
    return g if num_output_channels == 1 else g.expand(-1, 3, -1, -1).contiguous()


to_grayscale = rgb_to_grayscale


def _blend_(x: Tensor, target: Tensor, factor: Tensor) -> Tensor:
    """In place ``x = clamp(factor * x + (1 - factor) * target, 0, 1)``; ``target`` is consumed."""
    x.mul_(factor)
    x.add_(target.mul_(1.0 - factor))
    return x.clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Multiply by a per-sample factor and clamp to ``[0, 1]``.

    Args:
        x: images ``(b, 3, h, w)`` in ``[0, 1]``.
        factor: ``(b,)`` non-negative brightness factors (1 = identity).

    Returns:
        ``(b, 3, h, w)`` adjusted images.
    """
    _check_images(x)
    return x.mul(_per_sample(factor, x, "factor")).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with the mean of its grayscale version (torchvision semantics).

    Args:
        x: images ``(b, 3, h, w)`` in ``[0, 1]``.
        factor: ``(b,)`` non-negative contrast factors (1 = identity, 0 = flat gray).

    Returns:
        ``(b, 3, h, w)`` adjusted images.
    """
    _check_images(x)
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend_(x.clone(), mean, _per_sample(factor, x, "factor"))


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each pixel with its luma (torchvision semantics).

    Args:
        x: images ``(b, 3, h, w)`` in ``[0, 1]``.
        factor: ``(b,)`` non-negative saturation factors (1 = identity, 0 = grayscale).

    Returns:
        ``(b, 3, h, w)`` adjusted images.
    """
    _check_images(x)
    return _blend_(x.clone(), _gray(x), _per_sample(factor, x, "factor"))


def _hue_(y: Tensor, hue6: Tensor) -> Tensor:
    """Hue rotation; ``y`` ``(m, 3, h, w)`` is used as scratch. ``hue6``: ``(m, 1, 1)`` = 6 * hue.

    RGB -> HSV as torchvision's ``_rgb_to_hsv`` (hue in sixths), then the closed-form
    HSV -> RGB ``c_n = V - (V - min) * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 H) mod 6``,
    which equals torchvision's table-based ``_hsv_to_rgb`` (p, q, t are between min and V).
    """
    r, g, b = y[:, 0], y[:, 1], y[:, 2]
    maxc = y.amax(dim=1)  # (amax + amin is much faster than aminmax over dim 1 on CPU)
    chroma = torch.sub(maxc, y.amin(dim=1))
    # Hue numerator in sixths, with torchvision's priority: max == r, then max == g, else b.
    h_g = (b - r).add_(chroma, alpha=2.0)
    h_b = (r - g).add_(chroma, alpha=4.0)
    h = torch.where(maxc == r, g - b, torch.where(maxc == g, h_g, h_b))
    h.div_(chroma.masked_fill(chroma == 0, 1.0)).add_(hue6)
    offsets = torch.tensor(_HSV_OFFSETS, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
    k = torch.add(h.unsqueeze(1), offsets, out=y)
    k.add_(torch.mul(k, 1.0 / 6.0).floor_(), alpha=-6.0)  # k mod 6 (faster than remainder_)
    t = torch.rsub(k, 4.0)
    torch.minimum(k, t, out=t).clamp_(0.0, 1.0)
    return torch.addcmul(maxc.unsqueeze(1), t, chroma.unsqueeze(1), value=-1.0, out=y)


def adjust_hue(x: Tensor, factor: Tensor | float) -> Tensor:
    """Shift the hue (HSV) by a per-sample fraction of the colour circle.

    Args:
        x: images ``(b, 3, h, w)`` in ``[0, 1]``.
        factor: ``(b,)`` hue shifts in ``[-0.5, 0.5]`` (0 = identity up to rounding).

    Returns:
        ``(b, 3, h, w)`` adjusted images.
    """
    _check_images(x)
    f = _per_sample(factor, x, "factor")
    if bool(((f < -0.5) | (f > 0.5)).any()):
        raise ValueError("hue factor must be in [-0.5, 0.5]")
    return _hue_(x.clone(), 6.0 * f.view(-1, 1, 1))


def solarize(x: Tensor, threshold: Tensor | float = 0.5) -> Tensor:
    """Invert pixels ``>= threshold`` (torchvision semantics, inversion is ``1 - x``).

    Args:
        x: images ``(b, 3, h, w)`` in ``[0, 1]``.
        threshold: scalar or ``(b,)`` per-sample thresholds (> 1 disables solarization).

    Returns:
        ``(b, 3, h, w)`` solarized images.
    """
    _check_images(x)
    thr = _per_sample(threshold, x, "threshold")
    return torch.where(x >= thr, 1.0 - x, x)


def _jitter_(
    x: Tensor,
    blend: Tensor,
    hue6: Tensor,
    hue_index: list[Tensor],
    gray_buf: Tensor | None = None,
) -> Tensor:
    """In-place random-order colour jitter on ``x`` ``(n, 3, h, w)``.

    Brightness, contrast and saturation are all ``clamp(f x + (1 - f) T)`` with target
    ``T = 0``, ``mean(luma)`` or ``luma``; at each of the 4 positions every sample gets the
    generic blend with ``T = a * luma + c * mean(luma)`` and per-sample ``(f, a, c)`` chosen so
    that it is exactly the op scheduled at that position for that sample (or exactly the
    identity: ``f = 1``, ``a = c = 0``). The hue op is applied to the subset ``hue_index[k]``
    only.

    Args:
        x: images ``(n, 3, h, w)``, modified in place.
        blend: ``(4, 3, n)``: per position, rows ``f``, ``a * (1 - f)``, ``c * (1 - f)``.
        hue6: ``(n,)`` 6 * hue factor.
        hue_index: 4 long tensors, samples whose hue op is at position k.
        gray_buf: optional ``(n, 1, h, w)`` scratch buffer.
    """
    n = x.shape[0]
    if gray_buf is None:
        gray_buf = torch.empty((n, 1, *x.shape[2:]), device=x.device, dtype=x.dtype)
    for k in range(4):
        f, a1f, c1f = (v.view(n, 1, 1, 1) for v in blend[k].unbind(0))
        g = _gray(x, out=gray_buf)
        mean = g.mean(dim=(-2, -1), keepdim=True)
        # target (1 - f) * (a * luma + c * mean(luma)), then x = clamp(f * x + target)
        target = torch.addcmul(mean.mul_(c1f), g, a1f, out=g)
        torch.addcmul(target, x, f, out=x).clamp_(0.0, 1.0)
        idx = hue_index[k]
        sub = x[idx]  # advanced indexing: much faster than index_select on CPU
        x.index_copy_(0, idx, _hue_(sub, hue6[idx].view(-1, 1, 1)))
    return x


def jitter_plan(
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
    order: Tensor,
    apply: Tensor | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Turn per-sample jitter parameters into the ``(blend, hue6, hue_index)`` of ``_jitter_``.

    Args:
        brightness, contrast, saturation, hue: ``(n,)`` factors.
        order: ``(n, 4)`` permutation of the op ids (0 brightness, 1 contrast, 2 saturation, 3 hue).
        apply: optional ``(n,)`` bool; samples with ``False`` are left unchanged.

    Returns:
        ``blend`` ``(4, 3, n)``, ``hue6`` ``(n,)``, ``hue_index`` (4 long tensors).
    """
    n = order.shape[0]
    if apply is None:
        apply = torch.ones(n, dtype=torch.bool, device=order.device)
    dtype = brightness.dtype if brightness.is_floating_point() else torch.float32
    order_t = order.t()  # (4, n)
    on = apply.unsqueeze(0)
    is_b = (order_t == BRIGHTNESS) & on
    is_c = (order_t == CONTRAST) & on
    is_s = (order_t == SATURATION) & on
    one = torch.ones((), dtype=dtype, device=order.device)
    f = torch.where(is_b, brightness.to(dtype), one)
    f = torch.where(is_c, contrast.to(dtype), f)
    f = torch.where(is_s, saturation.to(dtype), f)
    one_minus_f = 1.0 - f
    blend = torch.stack((f, is_s.to(dtype) * one_minus_f, is_c.to(dtype) * one_minus_f), dim=1)
    is_h = (order_t == HUE) & on
    hue_index = [torch.nonzero(is_h[k]).flatten() for k in range(4)]
    return blend, 6.0 * hue.to(dtype), hue_index


def color_jitter(
    x: Tensor,
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
    order: Tensor,
    apply: Tensor | None = None,
) -> Tensor:
    """Per-sample ColorJitter with a per-sample random op order (torchvision semantics).

    Equivalent, for each sample ``i`` with ``apply[i]``, to applying torchvision's
    ``adjust_brightness/contrast/saturation/hue`` in the order ``order[i]``.

    Args:
        x: images ``(n, 3, h, w)`` in ``[0, 1]``.
        brightness, contrast, saturation: ``(n,)`` non-negative factors.
        hue: ``(n,)`` hue shifts in ``[-0.5, 0.5]``.
        order: ``(n, 4)`` long, a permutation of ``0..3`` per sample
            (0 brightness, 1 contrast, 2 saturation, 3 hue).
        apply: optional ``(n,)`` bool mask; samples with ``False`` are returned unchanged.

    Returns:
        ``(n, 3, h, w)`` jittered images (a new tensor).
    """
    _check_images(x)
    n = x.shape[0]
    if order.shape != (n, 4):
        raise ValueError(f"order must have shape ({n}, 4), got {tuple(order.shape)}")
    dev = x.device
    blend, hue6, hue_index = jitter_plan(
        brightness.to(dev), contrast.to(dev), saturation.to(dev), hue.to(dev), order.to(dev),
        None if apply is None else apply.to(dev),
    )
    return _jitter_(x.clone(), blend.to(x.dtype), hue6.to(x.dtype), hue_index)
