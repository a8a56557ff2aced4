"""Deterministic synthetic images: a data set that needs no download, for debug runs and tests.

Each class has its own hue, background gradient direction, shape (disc, square, triangle,
ring) and stripe texture (orientation and frequency); position, size, exact colours and pixel
noise vary per image. Nearest neighbours on raw pixels or features are well above chance.
"""

from __future__ import annotations

import colorsys
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from esvit.data.decode import Canvas, check_canvas_args
from esvit.data.folder import SampleStatus

__all__ = ["SyntheticImageDataset", "render_synthetic_image", "write_synthetic_image_folder"]

_FORMATS = ("png", "jpg", "mixed")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def render_synthetic_image(index: int, label: int, num_classes: int, size: int, seed: int = 0) -> np.ndarray:
    """Render one image, a pure function of ``(seed, index, label, num_classes, size)``.

    Returns:
        ``uint8`` array ``(size, size, 3)``.
    """
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    frac = label / num_classes
    hue = frac + rng.uniform(-0.03, 0.03)
    fg = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    bg = _hsv(hue + 0.5, rng.uniform(0.2, 0.5), rng.uniform(0.25, 0.5))

    # background: gradient along a class-specific direction
    angle = 2 * math.pi * frac + rng.uniform(-0.2, 0.2)
    grad = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle) + 0.5
    img = bg[None, None, :] * (0.5 + grad[..., None])

    # foreground shape with a striped texture
    cx, cy = rng.uniform(0.35, 0.65, size=2)
    r = rng.uniform(0.2, 0.32)
    dx, dy = xx - cx, yy - cy
    kind = label % 4
    if kind == 0:
        mask = dx * dx + dy * dy <= r * r
    elif kind == 1:
        mask = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    elif kind == 2:
        mask = (dy <= 0.7 * r) & (dy >= -r + 1.7 * np.abs(dx))
    else:
        d2 = dx * dx + dy * dy
        mask = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    phi = math.pi * frac
    freq = 3 + 2 * ((label // 4) % 4)
    stripes = 0.7 + 0.3 * np.sin(2 * math.pi * freq * (xx * math.cos(phi) + yy * math.sin(phi)))
    img = np.where(mask[..., None], fg[None, None, :] * stripes[..., None], img)

    img = img + rng.normal(0.0, 0.03, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


class SyntheticImageDataset(Dataset):
    """Generated images in the common item format ``(uint8 (3, S, S), label, SampleStatus)``
    (with ``resize_mode="letterbox"`` a :class:`~esvit.data.decode.Canvas` that the square
    rendering fills: ``box`` = the whole canvas, ``source_size`` = ``(S, S)``).

    Item ``i`` has label ``i % num_classes`` and is a pure function of ``(seed, i)``, whatever
    process generates it. ``status.ok`` is always True.

    Args:
        n: Number of images.
        canvas_size: Side ``S``.
        num_classes: Number of classes (``>= 1``).
        seed: Changes every image (use another seed for a disjoint validation set).
        resize_mode: ``"letterbox"`` for :class:`~esvit.data.decode.Canvas` items; the square
            modes give plain tensors (identical for a square rendering).
    """

    def __init__(self, n: int, canvas_size: int, num_classes: int = 10, seed: int = 0,
                 resize_mode: str = "stretch") -> None:
        check_canvas_args(canvas_size, resize_mode)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.n = int(n)
        self.canvas_size = canvas_size
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.resize_mode = resize_mode
        self.labels = np.arange(self.n, dtype=np.int64) % self.num_classes
        width = len(str(self.num_classes - 1))
        self.classes = [f"class_{c:0{width}d}" for c in range(self.num_classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Canvas, int, SampleStatus]:
        i = int(index)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"index {index} out of range for {self.n} synthetic images")
        label = int(self.labels[i])
        arr = render_synthetic_image(i, label, self.num_classes, self.canvas_size, self.seed)
        img = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if self.resize_mode == "letterbox":
            return Canvas.full(img), label, SampleStatus(True, i, "")
        return img, label, SampleStatus(True, i, "")


def write_synthetic_image_folder(
    root: str | os.PathLike[str],
    n_per_class: int,
    num_classes: int = 10,
    size: int = 64,
    seed: int = 0,
    image_format: str = "png",
) -> Path:
    """Write synthetic images as ``root/class_XX/NNNNN.{png,jpg}`` (an image folder with labels).

    Image ``j`` of class ``c`` is :class:`SyntheticImageDataset` item ``j * num_classes + c``.

    Args:
        root: Output folder (created; existing files with the same names are overwritten).
        n_per_class: Images per class.
        num_classes: Number of class folders.
        size: Image side in pixels.
        seed: Generation seed.
        image_format: ``"png"``, ``"jpg"`` or ``"mixed"`` (alternating per image).

    Returns:
        ``root`` as a Path.
    """
    if image_format not in _FORMATS:
        raise ValueError(f"image_format must be one of {_FORMATS}, got {image_format!r}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class!r}")
    ds = SyntheticImageDataset(n_per_class * num_classes, size, num_classes, seed)
    root = Path(root)
    for c, name in enumerate(ds.classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            i = j * num_classes + c
            arr = render_synthetic_image(i, c, num_classes, size, seed)
            fmt = image_format if image_format != "mixed" else ("png", "jpg")[j % 2]
            out = root / name / f"{j:05d}.{fmt}"
            if fmt == "png":
                Image.fromarray(arr).save(out, format="PNG")
            else:
                Image.fromarray(arr).save(out, format="JPEG", quality=95)
    return root
