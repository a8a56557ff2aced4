"""Decode one image file into a fixed-size ``uint8`` RGB canvas.

This is the only image work DataLoader workers do: open, apply the EXIF orientation, convert to
RGB, resize. Every random augmentation happens later, batched, on the training device.

Two outputs:

* :func:`load_image` (evaluation, embedding, the legacy training path): a square canvas, the
  image's short side scaled to the canvas and the centre kept (``"short_side_center_crop"``) or
  the whole image squashed (``"stretch"``).
* :func:`load_canvas` (training, ``resize_mode="letterbox"``): the *whole* image, with its own
  aspect ratio, in the top-left corner of a square canvas, shrunk only when its long side
  exceeds the canvas, never enlarged, plus the :class:`Canvas` metadata that says where it lies
  (``box``) and how large the original was (``source_size``). The training device draws crop
  boxes with ``RandomResizedCrop``'s distribution on the original size and maps them into the
  box (:mod:`esvit.augment.multicrop`), so crops see the whole photo.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image

T = TypeVar("T")

__all__ = [
    "LETTERBOX_DRAFT_SLACK",
    "RESIZE_MODES",
    "SQUARE_MODES",
    "BadImageError",
    "Canvas",
    "blank_canvas",
    "decode_image",
    "letterbox_size",
    "load_canvas",
    "load_image",
    "resize_to_canvas",
    "to_canvas",
    "to_chw_tensor",
    "to_rgb",
]

RESIZE_MODES = ("short_side_center_crop", "stretch", "letterbox")
#: Modes :func:`load_image` / :func:`resize_to_canvas` produce a plain square tensor for.
SQUARE_MODES = ("short_side_center_crop", "stretch")

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


class Canvas(NamedTuple):
    """A letterboxed image: a square ``uint8`` canvas and where the whole image lies in it.

    One item holds ``image`` ``(3, S, S)``, ``box`` ``(4,)`` and ``source_size`` ``(2,)``;
    ``default_collate`` stacks a batch field by field into a ``Canvas`` of ``(B, 3, S, S)``,
    ``(B, 4)`` and ``(B, 2)``, and DataLoader pinning keeps the type.

    Attributes:
        image: ``uint8`` canvas. The image fills ``box``; the column right of the box and the
            row below it repeat the box's last column / row (so bilinear sampling at the box's
            edge never blends in padding), every other pixel is 0.
        box: ``int64`` ``(top, left, height, width)`` of the image in canvas pixels; ``top``
            and ``left`` are 0 for every dataset in :mod:`esvit.data`.
        source_size: ``int64`` ``(height, width)`` of the original image (after the EXIF
            orientation), whose pixel grid crop boxes are drawn on. Equal to ``box``'s size
            unless the image was shrunk to fit the canvas.
    """

    image: torch.Tensor
    box: torch.Tensor
    source_size: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Canvas:
        """Move ``image`` to ``device``; ``box`` and ``source_size`` stay where they are (the
        augmentation turns them into crop boxes on the CPU without a device synchronisation)."""
        return self._replace(image=self.image.to(device, non_blocking=non_blocking))

    @staticmethod
    def full(image: torch.Tensor) -> Canvas:
        """The canvas of a square image that fills it: ``box`` = the whole canvas and
        ``source_size`` = its size (``image`` ``(3, H, W)`` or a batch ``(B, 3, H, W)``)."""
        h, w = image.shape[-2:]
        box = torch.tensor((0, 0, h, w), dtype=torch.int64)
        size = torch.tensor((h, w), dtype=torch.int64)
        if image.ndim == 4:
            box, size = box.expand(image.shape[0], 4).clone(), size.expand(image.shape[0], 2).clone()
        return Canvas(image, box, size)


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


def _check_square_mode(resize_mode: str) -> None:
    if resize_mode == "letterbox":
        raise ValueError("resize_mode 'letterbox' gives a Canvas, not a square image: use load_canvas / "
                         "to_canvas, or 'short_side_center_crop' / 'stretch' here")


def resize_to_canvas(img: Image.Image, canvas_size: int, resize_mode: str = "short_side_center_crop") -> Image.Image:
    """Resize an RGB image to a ``canvas_size`` square.

    ``"short_side_center_crop"`` scales the short side to ``canvas_size`` (upscaling small
    images too) and keeps the centered square; ``"stretch"`` resizes the whole image to the square
    ignoring the aspect ratio. The crop is applied through PIL's ``box`` argument, so only the
    kept region is resampled. Resampling is antialiased bicubic with ``reducing_gap=3`` (large
    reductions first use a fast box reduction). ``"letterbox"`` is :func:`to_canvas`'s job.
    """
    _check_square_mode(resize_mode)
    w, h = img.size
    box = _source_box(w, h, resize_mode)
    if (w, h) == (canvas_size, canvas_size):
        return img
    return img.resize((canvas_size, canvas_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def to_chw_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous ``uint8`` tensor ``(3, H, W)``."""
    arr = np.array(img, dtype=np.uint8, copy=True)  # writable (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def letterbox_size(width: int, height: int, canvas_size: int) -> tuple[int, int]:
    """``(width, height)`` of an image in a letterboxed canvas: unchanged when both sides fit,
    else scaled (aspect ratio kept) so that the long side equals ``canvas_size``; at least 1."""
    long_side = max(width, height)
    if long_side <= canvas_size:
        return width, height
    s = canvas_size / long_side
    return (min(canvas_size, max(1, round(width * s))), min(canvas_size, max(1, round(height * s))))


def to_canvas(
    img: Image.Image | np.ndarray,
    canvas_size: int,
    source_size: tuple[int, int] | None = None,
) -> Canvas:
    """Letterbox an RGB image into a ``canvas_size`` square (see :class:`Canvas`).

    The image is shrunk (antialiased bicubic, ``reducing_gap=3``) only when its long side
    exceeds the canvas, never enlarged, and is placed in the top-left corner.

    Args:
        img: RGB PIL image, or a ``uint8`` array ``(H, W, 3)``.
        canvas_size: Canvas side ``S``.
        source_size: ``(height, width)`` of the original when ``img`` is a reduced decode of
            it (JPEG draft mode); default ``img``'s own size.

    Returns:
        :class:`Canvas` with ``image`` ``uint8 (3, S, S)``, ``box`` and ``source_size``.
    """
    if isinstance(img, np.ndarray):
        h0, w0 = img.shape[:2]
    else:
        w0, h0 = img.size
    src_h, src_w = (h0, w0) if source_size is None else (int(source_size[0]), int(source_size[1]))
    w, h = letterbox_size(w0, h0, canvas_size)
    if (w, h) != (w0, h0):
        pil = Image.fromarray(img) if isinstance(img, np.ndarray) else img
        img = pil.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    arr = np.asarray(img)
    s = canvas_size
    out = np.empty((3, s, s), dtype=np.uint8)
    out[:, :h, :w] = arr.transpose(2, 0, 1)
    if w < s:  # replicate the last column once, zeros beyond
        out[:, :h, w] = out[:, :h, w - 1]
        out[:, :h, w + 1:] = 0
    if h < s:  # replicate the last row (its replicated corner included) once, zeros beyond
        out[:, h, :] = out[:, h - 1, :]
        out[:, h + 1:, :] = 0
    return Canvas(torch.from_numpy(out), torch.tensor((0, 0, h, w), dtype=torch.int64),
                  torch.tensor((src_h, src_w), dtype=torch.int64))


def blank_canvas(canvas_size: int) -> Canvas:
    """A black canvas filling its box (the substitute when no image decodes)."""
    return Canvas.full(torch.zeros(3, canvas_size, canvas_size, dtype=torch.uint8))


#: ``"letterbox"`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale as long as the long side keeps at
#: least this fraction of the canvas: a 2000x1500 photo is decoded at 500x375 for a 512 canvas
#: (and left at that size) instead of at 1000x750 and resampled, 2.5x less work for 2 % fewer
#: pixels per side.
LETTERBOX_DRAFT_SLACK = 7 / 8


def _draft_request(width: int, height: int, canvas_size: int, resize_mode: str) -> tuple[int, int]:
    """Smallest decode size that still covers what ``resize_mode`` needs (orientation-free:
    every mode's scale factor is the same for an image and its transpose)."""
    if resize_mode == "stretch":
        return (canvas_size, canvas_size)
    if resize_mode == "letterbox":
        s = min(1.0, LETTERBOX_DRAFT_SLACK * canvas_size / max(width, height))
    else:
        s = canvas_size / min(width, height)
    return (math.ceil(width * s), math.ceil(height * s))


def _draft_jpeg(img: Image.Image, canvas_size: int, resize_mode: str) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result still covers the canvas.

    ``Image.draft`` picks the largest reduction whose size is at least the requested size in
    both dimensions, so the short side never drops below the canvas (for ``"letterbox"`` the
    long side never below :data:`LETTERBOX_DRAFT_SLACK` of it).
    """
    w, h = img.size
    req = _draft_request(w, h, canvas_size, resize_mode)
    if req[0] < w and req[1] < h:
        img.draft(None, req)


_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> int:
    """EXIF orientation tag (1-8; 1 when absent or unreadable)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in _TRANSPOSE else 1
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image bad
        return 1


def decode_image(
    path: str | os.PathLike[str],
    canvas_size: int,
    resize_mode: str,
    finish: Callable[[Image.Image, tuple[int, int]], T],
) -> T:
    """Decode a file to an upright RGB PIL image and hand it to ``finish`` while the file is open.

    The one decode used by training, evaluation and embedding: PIL open, ``Image.draft`` for
    JPEGs (:func:`_draft_jpeg`, sized for ``resize_mode``), load, the EXIF orientation (as
    ``PIL.ImageOps.exif_transpose``, without its copy when there is nothing to do),
    :func:`to_rgb`. ``finish`` runs inside the ``with Image.open`` block because a closed PIL
    image loses its pixels.

    Args:
        path: Image file.
        canvas_size: Canvas side the image is decoded for.
        resize_mode: One of :data:`RESIZE_MODES` (decides the JPEG draft size).
        finish: ``finish(rgb_image, (height, width))`` with the original's size after the EXIF
            orientation (larger than the image when libjpeg decoded at reduced scale).

    Returns:
        What ``finish`` returns.

    Raises:
        Exception: Whatever PIL raises (callers turn it into :class:`BadImageError`).
    """
    from esvit.data.folder import check_regular_file  # here: folder imports this module

    check_regular_file(path)  # a FIFO / device named in a list file could block forever: never opened
    with warnings.catch_warnings():
        # Between MAX_IMAGE_PIXELS and twice that PIL only warns; keep workers' stderr quiet.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            full_w, full_h = img.size
            if img.format == "JPEG":
                _draft_jpeg(img, canvas_size, resize_mode)
            img.load()
            orientation = _orientation(img)
            upright = img
            if orientation != 1:
                upright = img.transpose(_TRANSPOSE[orientation])
                if orientation >= 5:  # transposed: width and height swap
                    full_w, full_h = full_h, full_w
            return finish(to_rgb(upright), (full_h, full_w))


def load_image(
    path: str | os.PathLike[str],
    canvas_size: int,
    resize_mode: str = "short_side_center_crop",
) -> torch.Tensor:
    """Decode an image file to a square RGB canvas (evaluation and embedding).

    The EXIF orientation is applied and any PIL mode is converted to RGB (:func:`decode_image`);
    JPEGs are decoded at reduced scale when possible (``Image.draft``), so huge photos are cheap.
    PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is kept: above twice the
    limit the file counts as bad. Truncated files are bad (``ImageFile.LOAD_TRUNCATED_IMAGES`` is
    left as is).

    Args:
        path: Image file.
        canvas_size: Side ``S`` of the output canvas.
        resize_mode: ``"short_side_center_crop"`` (default) or ``"stretch"``
            (``"letterbox"``: use :func:`load_canvas`).

    Returns:
        Contiguous ``torch.uint8`` tensor ``(3, S, S)``.

    Raises:
        ValueError: Invalid ``canvas_size`` / ``resize_mode``.
        BadImageError: The file cannot be decoded (the reason is in ``.reason``).
    """
    check_canvas_args(canvas_size, resize_mode)
    _check_square_mode(resize_mode)
    path = os.fspath(path)
    try:
        return decode_image(path, canvas_size, resize_mode,
                            lambda img, _: to_chw_tensor(resize_to_canvas(img, canvas_size, resize_mode)))
    except Exception as e:  # noqa: BLE001 - any failure to decode a file makes it a bad image
        raise BadImageError(path, f"{type(e).__name__}: {e}") from e


def load_canvas(path: str | os.PathLike[str], canvas_size: int) -> Canvas:
    """Decode an image file into a letterboxed canvas (the training path, see :class:`Canvas`).

    Same decode as :func:`load_image` (EXIF orientation, any mode to RGB, JPEG draft mode, bomb
    limit), but the whole image is kept with its aspect ratio: shrunk only when its long side
    exceeds ``canvas_size``, never enlarged. A 500x375 photo in a 512 canvas is copied
    pixel for pixel; a large JPEG is decoded at 1/2, 1/4 or 1/8 scale when that keeps its long
    side at least :data:`LETTERBOX_DRAFT_SLACK` of the canvas (a 4000x3000 photo: 500x375).

    Args:
        path: Image file.
        canvas_size: Canvas side ``S``.

    Returns:
        :class:`Canvas`: ``image`` ``uint8 (3, S, S)``, ``box`` ``int64 (4,)`` ``(top, left,
        height, width)`` and ``source_size`` ``int64 (2,)`` ``(height, width)`` of the original.

    Raises:
        ValueError: Invalid ``canvas_size``.
        BadImageError: The file cannot be decoded (the reason is in ``.reason``).
    """
    check_canvas_args(canvas_size, "letterbox")
    path = os.fspath(path)
    try:
        return decode_image(path, canvas_size, "letterbox",
                            lambda img, size: to_canvas(img, canvas_size, size))
    except Exception as e:  # noqa: BLE001 - any failure to decode a file makes it a bad image
        raise BadImageError(path, f"{type(e).__name__}: {e}") from e
