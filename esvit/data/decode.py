"""Decode one image file into a fixed-size ``uint8`` RGB canvas.

This is the only image work DataLoader workers do: open, convert to RGB, resize to a square
canvas. Every random augmentation happens later, batched, on the training device.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from PIL import Image

__all__ = ["RESIZE_MODES", "BadImageError", "load_image", "resize_to_canvas", "to_chw_tensor", "to_rgb"]

RESIZE_MODES = ("short_side_center_crop", "stretch")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class BadImageError(Exception):
    """A file that cannot be decoded: missing, unreadable, empty, truncated, not an image, or a
    decompression bomb (more than ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels).

    Attributes:
        path: The file.
        reason: ``"ExceptionType: message"`` of the underlying error.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot decode image {self.path}: {self.reason}"


def check_canvas_args(canvas_size: int, resize_mode: str) -> None:
    """Raise ValueError unless ``canvas_size`` is a positive int and ``resize_mode`` is known."""
    if isinstance(canvas_size, bool) or not isinstance(canvas_size, int) or canvas_size < 1:
        raise ValueError(f"canvas_size must be a positive int, got {canvas_size!r}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-channel high-bit-depth array to uint8.

    16-bit modes are divided by 257 (65535 -> 255, exact for 257 * k). Mode ``I`` (int32) is
    treated as 16-bit when all values lie in [0, 65535] and min-max normalised otherwise. Mode
    ``F`` is multiplied by 255 when all values lie in [0, 1] and min-max normalised otherwise.
    """
    a = a.astype(np.float64)
    if mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        else:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    elif mode in _SIXTEEN_BIT_MODES:
        a = a / 257.0
    else:  # "I"
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0 and hi <= 65535:
            a = a / 257.0
        else:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit ``RGB``.

    Transparent images (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a transparency key)
    are composited onto black. 16-bit and 32-bit integer / float grayscale images are scaled to
    8 bits (see :func:`_scale_to_uint8`) instead of being clipped. ``CMYK``, ``YCbCr``, ``1``,
    ``L``, ``P`` etc. go through PIL's own conversion.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    has_alpha = "A" in mode or "a" in mode or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _source_box(width: int, height: int, resize_mode: str) -> tuple[float, float, float, float]:
    """Region of the source that maps onto the canvas (centered square, or everything)."""
    if resize_mode == "stretch":
        return (0.0, 0.0, float(width), float(height))
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return (left, top, left + side, top + side)


def resize_to_canvas(img: Image.Image, canvas_size: int, resize_mode: str = "short_side_center_crop") -> Image.Image:
    """Resize an RGB image to a ``canvas_size`` square.

    ``"short_side_center_crop"`` scales the short side to ``canvas_size`` (upscaling small
    images too) and keeps the centered square; ``"stretch"`` resizes the whole image to the square
    ignoring the aspect ratio. The crop is applied through PIL's ``box`` argument, so only the
    kept region is resampled. Resampling is antialiased bicubic with ``reducing_gap=3`` (large
    reductions first use a fast box reduction).
    """
    w, h = img.size
    box = _source_box(w, h, resize_mode)
    if (w, h) == (canvas_size, canvas_size):
        return img
    return img.resize((canvas_size, canvas_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def to_chw_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous ``uint8`` tensor ``(3, H, W)``."""
    arr = np.array(img, dtype=np.uint8, copy=True)  # writable (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _draft_jpeg(img: Image.Image, canvas_size: int, resize_mode: str) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result still covers the canvas.

    ``Image.draft`` picks the largest reduction whose size is at least the requested size in
    both dimensions, so the short side never drops below ``canvas_size``.
    """
    w, h = img.size
    if resize_mode == "stretch":
        req = (canvas_size, canvas_size)
    else:
        short = min(w, h)
        req = (math.ceil(w * canvas_size / short), math.ceil(h * canvas_size / short))
    if req[0] < w and req[1] < h:
        img.draft(None, req)


def load_image(
    path: str | os.PathLike[str],
    canvas_size: int,
    resize_mode: str = "short_side_center_crop",
) -> torch.Tensor:
    """Decode an image file to a square RGB canvas.

    Any PIL mode is converted to RGB (:func:`to_rgb`); JPEGs are decoded at reduced scale when
    possible (``Image.draft``), so huge photos are cheap. PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) is kept: above twice the limit the file counts as bad.
    Truncated files are bad (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left as is).

    Args:
        path: Image file.
        canvas_size: Side ``S`` of the output canvas.
        resize_mode: ``"short_side_center_crop"`` (default) or ``"stretch"``.

    Returns:
        Contiguous ``torch.uint8`` tensor ``(3, S, S)``.

    Raises:
        ValueError: Invalid ``canvas_size`` / ``resize_mode``.
        BadImageError: The file cannot be decoded (the reason is in ``.reason``).
    """
    check_canvas_args(canvas_size, resize_mode)
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that PIL only warns; keep workers' stderr quiet.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format == "JPEG":
                    _draft_jpeg(img, canvas_size, resize_mode)
                img.load()
                out = resize_to_canvas(to_rgb(img), canvas_size, resize_mode)
                return to_chw_tensor(out)
    except Exception as e:  # noqa: BLE001 - any failure to decode a file makes it a bad image
        raise BadImageError(path, f"{type(e).__name__}: {e}") from e
