"""Vectorised RandomResizedCrop: box sampling and one-call crop + resize (+ flip).

``sample_crop_boxes`` reproduces ``torchvision.transforms.RandomResizedCrop.get_params``
(10 attempts, then the centre-crop fallback) for many boxes at once, each box on its own image
size if asked. It is split in two, so that a sharded global batch draws its random numbers once
for all ranks and each rank turns its rows into boxes with its own images' sizes:
``draw_crop_boxes`` (the random numbers, independent of the image size) and
``crop_boxes_from_draws`` (a pure function of those numbers and the sizes).
``boxes_to_canvas`` maps boxes drawn on an original image's pixel grid into the letterboxed
canvas that holds it (:class:`esvit.data.decode.Canvas`).

``resized_crop`` crops and resizes all boxes with a single ``torchvision.ops.roi_align`` call (on
CPU split over ``torch.get_num_threads()`` threads, as the kernel itself is single-threaded)
(``aligned=True``; adaptive ``sampling_ratio``, so a downscale averages
``ceil(box / output)`` samples per output pixel and is anti-aliased, an upscale is plain
bilinear interpolation). Boxes may be fractional. A horizontal flip is folded in by cropping the
mirrored box from a mirrored copy of the source.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = [
    "CropDraws",
    "boxes_to_canvas",
    "boxes_to_rois",
    "crop_boxes_from_draws",
    "draw_crop_boxes",
    "resized_crop",
    "sample_crop_boxes",
]


class CropDraws(NamedTuple):
    """The random numbers of ``n`` RandomResizedCrop boxes, before any image size is known.

    Attributes:
        area: ``(n, attempts)`` float64 area fractions ``U(scale)`` of each attempt.
        aspect: ``(n, attempts)`` float64 aspect ratios ``w / h``, log-uniform in ``ratio``.
        position: ``(n, 2)`` float64 ``U[0, 1)`` of the top and the left corner.
    """

    area: Tensor
    aspect: Tensor
    position: Tensor

    def rows(self, start: int, end: int) -> CropDraws:
        """Draws of boxes ``start:end`` (e.g. this rank's share of a global batch)."""
        return CropDraws(self.area[start:end], self.aspect[start:end], self.position[start:end])


def _check_box_ranges(scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    if not (0 < scale[0] <= scale[1]):
        raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")


def draw_crop_boxes(
    n: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> CropDraws:
    """Draw the random numbers of ``n`` boxes (a fixed amount, whatever the image sizes).

    Args:
        n: Number of boxes.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the aspect ratio ``w / h`` (sampled log-uniformly).
        generator: CPU random generator.
        attempts: Attempts per box before the fallback (torchvision uses 10).

    Returns:
        :class:`CropDraws` (CPU float64 tensors).
    """
    _check_box_ranges(scale, ratio)
    f64 = torch.float64
    area = torch.empty((n, attempts), dtype=f64).uniform_(scale[0], scale[1], generator=generator)
    aspect = torch.empty((n, attempts), dtype=f64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                            generator=generator)
    aspect.exp_()
    position = torch.rand((2, n), dtype=f64, generator=generator).T
    return CropDraws(area, aspect, position)


def _as_sizes(value: int | Tensor, n: int, name: str) -> Tensor:
    """An int or ``(n,)`` tensor of image sizes -> ``(n,)`` float64, checked >= 1."""
    t = torch.as_tensor(value).to(device="cpu", dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must be an int or have one entry per box ({n}), got shape {tuple(t.shape)}")
    if n and float(t.min()) < 1:
        raise ValueError(f"image size must be >= 1, got {name} {int(t.min())}")
    return t


def crop_boxes_from_draws(
    draws: CropDraws,
    height: int | Tensor,
    width: int | Tensor,
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> Tensor:
    """Turn :class:`CropDraws` into ``RandomResizedCrop.get_params`` boxes on given image sizes.

    Each box takes the first attempt whose rounded ``(h, w)`` fits in its image, with the top-left
    corner uniform over the valid integer positions; when none fits, torchvision's fallback: the
    centred crop with the aspect ratio clamped to ``ratio`` (at least 1x1, where torchvision
    would return an empty box for ratios far from 1 on a 1-pixel-wide image).

    Args:
        draws: Random numbers of ``n`` boxes.
        height, width: Image size: one for all boxes, or ``(n,)`` int tensors (one per box).
        ratio: The aspect-ratio range the draws were made with (fallback clamp).

    Returns:
        ``(n, 4)`` long tensor of ``(top, left, h, w)`` (CPU).
    """
    n = draws.area.shape[0]
    f64 = torch.float64
    hh, ww = _as_sizes(height, n, "height"), _as_sizes(width, n, "width")
    target = draws.area * (hh * ww)[:, None]
    w = torch.sqrt(target * draws.aspect).round_()
    h = torch.sqrt(target / draws.aspect).round_()
    ok = (w > 0) & (w <= ww[:, None]) & (h > 0) & (h <= hh[:, None])
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid attempt
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # torchvision's fallback: centre crop with the ratio clamped to the allowed range.
    lo, hi = min(ratio), max(ratio)
    in_ratio = ww / hh
    narrow, wide = in_ratio < lo, in_ratio > hi
    fw = torch.where(wide, torch.round(hh * hi), ww).clamp_(min=1)
    fh = torch.where(narrow, torch.round(ww / lo), hh).clamp_(min=1)
    w = torch.where(found, w, fw.minimum(ww))
    h = torch.where(found, h, fh.minimum(hh))

    u = draws.position.to(f64)
    top = torch.floor(u[:, 0] * (hh - h + 1))
    left = torch.floor(u[:, 1] * (ww - w + 1))
    top = torch.where(found, top, torch.floor((hh - h) / 2))
    left = torch.where(found, left, torch.floor((ww - w) / 2))
    return torch.stack((top, left, h, w), dim=1).to(torch.long)


def sample_crop_boxes(
    height: int | Tensor,
    width: int | Tensor,
    n: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """Sample ``n`` crop boxes like ``RandomResizedCrop.get_params``, vectorised.

    For each box, ``attempts`` (area fraction, log aspect ratio) pairs are drawn uniformly;
    the first whose rounded ``(h, w)`` fits in the image is used, with a uniform integer
    top-left corner. If none fits, the torchvision centre-crop fallback is used.
    (:func:`draw_crop_boxes` then :func:`crop_boxes_from_draws`.)

    Args:
        height, width: Image size, one for all boxes or ``(n,)`` tensors (one per box).
        n: Number of boxes.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the aspect ratio ``w / h`` (sampled log-uniformly).
        generator: CPU random generator.
        attempts: Attempts before the fallback (torchvision uses 10).

    Returns:
        ``(n, 4)`` long tensor of ``(top, left, h, w)`` (CPU).
    """
    _check_box_ranges(scale, ratio)
    _as_sizes(height, n, "height")  # check the sizes before drawing
    _as_sizes(width, n, "width")
    return crop_boxes_from_draws(draw_crop_boxes(n, scale, ratio, generator, attempts), height, width, ratio)


def boxes_to_canvas(boxes: Tensor, box: Tensor, source_size: Tensor) -> Tensor:
    """Map boxes on original images' pixel grids into the letterboxed canvases that hold them.

    An original of size ``(H, W)`` fills the canvas region ``box = (top, left, h, w)`` (scaled by
    ``h / H`` and ``w / W``), so a box ``(t, l, bh, bw)`` on the original covers
    ``(top + t * h / H, left + l * w / W, bh * h / H, bw * w / W)`` of the canvas. When the region
    is the original's own size, boxes only move by the region's corner (integers stay integers).

    Args:
        boxes: ``(n, 4)`` ``(top, left, h, w)`` in original-image pixels.
        box: ``(n, 4)`` or ``(4,)`` ``(top, left, h, w)`` of each image's region in its canvas.
        source_size: ``(n, 2)`` or ``(2,)`` ``(H, W)`` of each original.

    Returns:
        ``(n, 4)`` float32 ``(top, left, h, w)`` in canvas pixels (fractional in general).
    """
    f64 = torch.float64
    b = boxes.to(device="cpu", dtype=f64)
    region = box.to(device="cpu", dtype=f64).reshape(-1, 4)
    size = source_size.to(device="cpu", dtype=f64).reshape(-1, 2)
    sy = region[:, 2] / size[:, 0]
    sx = region[:, 3] / size[:, 1]
    top, left, h, w = b.unbind(1)
    out = torch.stack((region[:, 0] + top * sy, region[:, 1] + left * sx, h * sy, w * sx), dim=1)
    return out.to(torch.float32)


def boxes_to_rois(
    boxes: Tensor,
    batch_index: Tensor,
    width: int,
    flip: Tensor | None = None,
    batch_size: int = 0,
) -> Tensor:
    """Convert ``(top, left, h, w)`` boxes to ``roi_align`` rows ``(k, x1, y1, x2, y2)``.

    With ``flip``, flipped boxes are mirrored (``x1 = width - left - w``) and point to image
    ``batch_index + batch_size`` of a source that holds the mirrored images after the originals.

    Args:
        boxes: ``(n, 4)`` ``(top, left, h, w)``.
        batch_index: ``(n,)`` source image of each box.
        width: source image width.
        flip: optional ``(n,)`` bool.
        batch_size: number of original images (offset of the mirrored copies).

    Returns:
        ``(n, 5)`` float32 rois.
    """
    b = boxes.to(torch.float32)
    top, left, h, w = b.unbind(1)
    k = batch_index.to(torch.float32)
    if flip is not None:
        fl = flip.to(torch.bool)
        left = torch.where(fl, width - left - w, left)
        k = torch.where(fl, k + batch_size, k)
    return torch.stack((k, left, top, left + w, top + h), dim=1)


def _dispatch_modes_active() -> bool:
    """True when a ``TorchDispatchMode`` (fake tensors, tracing, op counting) is active."""
    stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return stack_len is None or stack_len() > 0


def _resize_rois(source: Tensor, rois: Tensor, size: tuple[int, int],
                 num_threads: int | None = None) -> Tensor:
    """``roi_align`` with adaptive sampling: ``(n, 5)`` rois -> ``(n, c, size[0], size[1])``.

    torchvision's CPU ``roi_align`` kernel is single-threaded but releases the GIL, so on CPU
    the rois are split into ``torch.get_num_threads()`` chunks computed by as many Python
    threads (a fixed number of ops, whatever the batch size). Elsewhere (CUDA, or under a
    dispatch mode, whose state is thread-local) it is one plain call.
    """
    threads = torch.get_num_threads() if num_threads is None else num_threads
    if source.device.type != "cpu" or threads <= 1 or _dispatch_modes_active():
        return roi_align(source, rois, output_size=size, spatial_scale=1.0, sampling_ratio=0,
                         aligned=True)
    out = torch.empty((rois.shape[0], source.shape[1], *size), dtype=source.dtype)
    bounds = [rois.shape[0] * i // threads for i in range(threads + 1)]
    errors: list[BaseException] = []
    # grad / inference mode are thread-local: run the workers in the caller's modes
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def work(i: int) -> None:
        try:
            lo, hi = bounds[i], bounds[i + 1]
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                out[lo:hi].copy_(roi_align(source, rois[lo:hi], output_size=size,
                                           spatial_scale=1.0, sampling_ratio=0, aligned=True))
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(1, threads)]
    for t in workers:
        t.start()
    work(0)
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return out


def resized_crop(
    images: Tensor,
    boxes: Tensor,
    size: int | tuple[int, int],
    batch_index: Tensor | None = None,
    flip: Tensor | None = None,
) -> Tensor:
    """Crop boxes from a batch and resize them, in one ``roi_align`` call.

    Args:
        images: float images ``(b, c, H, W)``.
        boxes: ``(n, 4)`` ``(top, left, h, w)`` in pixels (integers, as from
            ``sample_crop_boxes``, or fractional, as from ``boxes_to_canvas``).
        size: output size (int for square).
        batch_index: ``(n,)`` image of each box (default ``arange(n)``, requires ``n == b``).
        flip: optional ``(n,)`` bool, horizontally flip the crop.

    Returns:
        ``(n, c, size, size)`` crops.
    """
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim != 4:
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor)
               else type(images).__name__)
        raise TypeError(f"expected float images of shape (b, c, H, W), got {got}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {tuple(boxes.shape)}")
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    b, _, _, width = images.shape
    if batch_index is None:
        if boxes.shape[0] != b:
            raise ValueError(f"without batch_index, boxes must have {b} rows, got {boxes.shape[0]}")
        batch_index = torch.arange(b)
    source = images
    if flip is not None:
        source = torch.cat((images, images.flip(-1)), dim=0)
    rois = boxes_to_rois(boxes.cpu(), batch_index.cpu(), width,
                         None if flip is None else flip.cpu(), b)
    return _resize_rois(source, rois.to(device=images.device, dtype=images.dtype), out_size)
