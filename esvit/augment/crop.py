"""Vectorised RandomResizedCrop: box sampling and one-call crop + resize (+ flip).

``sample_crop_boxes`` reproduces ``torchvision.transforms.RandomResizedCrop.get_params``
(10 attempts, then the centre-crop fallback) for many boxes at once. ``resized_crop``
crops and resizes all boxes with a single ``torchvision.ops.roi_align`` call (on CPU split
over ``torch.get_num_threads()`` threads, as the kernel itself is single-threaded)
(``aligned=True``; adaptive ``sampling_ratio``, so a downscale averages
``ceil(box / output)`` samples per output pixel and is anti-aliased, an upscale is plain
bilinear interpolation). A horizontal flip is folded in by cropping the mirrored box from a
mirrored copy of the source.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["boxes_to_rois", "resized_crop", "sample_crop_boxes"]


def sample_crop_boxes(
    height: int,
    width: int,
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

    Args:
        height, width: image size.
        n: number of boxes.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the aspect ratio ``w / h`` (sampled log-uniformly).
        generator: CPU random generator.
        attempts: attempts before the fallback (torchvision uses 10).

    Returns:
        ``(n, 4)`` long tensor of ``(top, left, h, w)`` (CPU).
    """
    if not (0 < scale[0] <= scale[1]):
        raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be >= 1, got {height}x{width}")
    f64 = torch.float64
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = torch.empty((n, attempts), dtype=f64).uniform_(scale[0], scale[1], generator=generator)
    target.mul_(area)
    aspect = torch.empty((n, attempts), dtype=f64).uniform_(log_lo, log_hi, generator=generator)
    aspect.exp_()
    w = torch.sqrt(target * aspect).round_()
    h = torch.sqrt(target / aspect).round_()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid attempt
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # torchvision's fallback: centre crop with the ratio clamped to the allowed range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.tensor(float(fw), dtype=f64))
    h = torch.where(found, h, torch.tensor(float(fh), dtype=f64))

    u = torch.rand((2, n), dtype=f64, generator=generator)
    top = torch.floor(u[0] * (height - h + 1))
    left = torch.floor(u[1] * (width - w + 1))
    top = torch.where(found, top, torch.floor((height - h) / 2))
    left = torch.where(found, left, torch.floor((width - w) / 2))
    return torch.stack((top, left, h, w), dim=1).to(torch.long)


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
            ``sample_crop_boxes``).
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
