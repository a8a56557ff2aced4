"""Worker-side cost per image on photo-sized JPEGs: what a DataLoader worker does per image.

Generates 500x375 JPEGs (photo-like content: smooth colour fields, edges and sensor noise,
quality 90) and measures images per CPU-second (``time.process_time`` of this process, one
intra-op thread) of three worker paths, each decoding the file and collating batches of 32 as a
DataLoader worker would:

* ``letterbox``: the current training path, ``ImageFolderDataset(resize_mode="letterbox")`` with
  ``data.canvas_size`` 512: decode (JPEG draft mode when the photo is larger than the canvas),
  EXIF orientation, the whole photo copied into the canvas, plus its box; all crops and colour
  ops happen later, batched, on the training device.
* ``center_crop_256``: the previous path, a 256 px centre-crop square canvas
  (``resize_mode="short_side_center_crop"``).
* ``per_image``: lightly's ``DINOTransform`` (2 x 224 + 6 x 96) when lightly is installed, else
  the equivalent torchvision pipeline on PIL images (lightly's defaults: RandomResizedCrop 224
  scale (0.4, 1) and 96 scale (0.05, 0.4), flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8,
  grayscale 0.2, PIL Gaussian blur p 1.0 / 0.1 / 0.5 with sigma U(0.1, 2), solarize p 0.2 on the
  second global view, ToTensor, Normalize); the output says which one ran.

Targets (issue 12): letterbox >= 5x the per-image transform's images per CPU-second, and no
slower than the previous centre-crop canvas. The paths are timed alternately in every round
(best of ``--rounds``), so load from other processes hits all of them.

Usage::

    python benchmarks/bench_decode.py [--images 64] [--rounds 3] [--canvas 512] [--size 500x375]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset, default_collate

from esvit.augment import IMAGENET_MEAN, IMAGENET_STD
from esvit.data import ImageFolderDataset

BATCH = 32


def write_photos(root: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """``n`` photo-like ``size`` (w, h) JPEGs under ``root/photos``."""
    rng = np.random.default_rng(seed)
    out = root / "photos"
    out.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        edge = (np.sin(xx / rng.uniform(5, 40)) * np.cos(yy / rng.uniform(5, 40)) > 0.3)[..., None]
        img = np.where(edge, 255 - img, img) + rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out / f"{i:05d}.jpg", quality=90)
    return out


class _GaussianBlur:
    """PIL Gaussian blur with probability ``p`` and sigma U(0.1, 2) (DINO's / lightly's)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _Solarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, 128) if random.random() < self.p else img


def per_image_transform() -> tuple[str, Callable[[Image.Image], list[torch.Tensor]]]:
    """lightly's ``DINOTransform`` if importable, else the torchvision equivalent."""
    try:
        from lightly.transforms import DINOTransform  # type: ignore[import-not-found]

        return "lightly DINOTransform", DINOTransform()
    except ImportError:
        pass
    import torchvision.transforms as T

    common = [
        T.RandomHorizontalFlip(0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(0.2),
    ]
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    g1 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0)), *common, _GaussianBlur(1.0), *norm])
    g2 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0)), *common, _GaussianBlur(0.1), _Solarize(0.2),
                    *norm])
    loc = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.4)), *common, _GaussianBlur(0.5), *norm])

    def run(img: Image.Image) -> list[torch.Tensor]:
        return [g1(img), g2(img)] + [loc(img) for _ in range(6)]

    return "torchvision per-image pipeline (lightly not installed)", run


class PerImageDataset(Dataset):
    """Open, convert to RGB, apply the per-image multi-crop transform (as a worker would)."""

    def __init__(self, paths: list[str], transform: Callable[[Image.Image], list[torch.Tensor]]) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), 0


def images_per_cpu_second(ds: Dataset, n: int) -> float:
    """Decode all ``n`` items and collate them in batches of :data:`BATCH`; ``n / CPU seconds``."""
    t0 = time.process_time()
    for lo in range(0, n, BATCH):
        default_collate([ds[i] for i in range(lo, min(n, lo + BATCH))])
    return n / max(time.process_time() - t0, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--canvas", type=int, default=512, help="letterbox canvas side (data.canvas_size)")
    parser.add_argument("--size", default="500x375", help="photo size WxH (default 500x375, ImageNet's commonest)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(1)  # one DataLoader worker = one core
    random.seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_photos(Path(tmp), args.images, size)  # type: ignore[arg-type]
        name, transform = per_image_transform()
        letterbox = ImageFolderDataset(root, args.canvas, resize_mode="letterbox")
        paths = [letterbox.paths[i] for i in range(len(letterbox))]
        paths_ds = {
            f"letterbox_{args.canvas}": letterbox,
            "center_crop_256": ImageFolderDataset(root, 256),
            "per_image": PerImageDataset(paths, transform),
        }
        for ds in paths_ds.values():  # warm-up: page cache, lazy imports
            images_per_cpu_second(ds, min(BATCH, args.images))
        best = dict.fromkeys(paths_ds, 0.0)
        for _ in range(args.rounds):
            for key, ds in paths_ds.items():
                best[key] = max(best[key], images_per_cpu_second(ds, args.images))
    new, old, ref = best[f"letterbox_{args.canvas}"], best["center_crop_256"], best["per_image"]
    print(f"{args.size} JPEGs, {args.images} images, batches of {BATCH}, 1 thread, best of {args.rounds} rounds")
    print(f"per-image path: {name}")
    print(f"{'path':<22}{'img / CPU-s':>12}")
    for key, v in best.items():
        print(f"{key:<22}{v:>12.0f}")
    print(f"letterbox / per-image: {new / ref:.1f}x (target >= 5x)  {'yes' if new / ref >= 5 else 'NO'}")
    print(f"letterbox / centre-crop 256: {new / old:.2f}x (target >= 1x)  {'yes' if new / old >= 1 else 'NO'}")
    print(f"centre-crop 256 / per-image: {old / ref:.1f}x")


if __name__ == "__main__":
    main()
