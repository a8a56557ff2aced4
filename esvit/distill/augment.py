"""The distillation student's training augmentation, batched on the training device."""

from __future__ import annotations

import torch
from torch import Tensor

from esvit.augment.crop import resized_crop, sample_crop_boxes
from esvit.augment.multicrop import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["TrainAugment"]


class TrainAugment:
    """Batched random resized crop + horizontal flip + ImageNet normalisation, on the device.

    Box parameters come from an internal CPU ``torch.Generator`` (``get_state`` /
    ``set_state`` for exact resume); the crop, resize and flip are one ``roi_align`` call on
    the images' device (:func:`esvit.augment.crop.resized_crop`). With ``world_size`` ranks,
    every rank draws the parameters of the whole global batch from the same stream and keeps
    its own block, so a global batch is augmented identically whatever the number of ranks.

    Args:
        size: Output side.
        scale: Crop area range (fraction of the canvas).
        ratio: Aspect-ratio range.
        flip: Random horizontal flip with probability 0.5.
        seed: Generator seed (the same on every rank).
        rank: This rank.
        world_size: Number of ranks.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float], flip: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.size, self.scale, self.ratio, self.flip = int(size), tuple(scale), tuple(ratio), flip
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: Tensor) -> Tensor:
        """Args: images: uint8 ``(b, 3, H, W)``. Returns: float ``(b, 3, size, size)`` normalised."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"expected uint8 images (b, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        b, _, h, w = images.shape
        n, lo = b * self.world_size, b * self.rank
        boxes = sample_crop_boxes(h, w, n, self.scale, self.ratio, generator=self.generator)[lo:lo + b]
        flip = (torch.rand(n, generator=self.generator) < 0.5)[lo:lo + b] if self.flip else None
        x = resized_crop(images.float().div_(255.0), boxes, self.size, flip=flip)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def get_state(self) -> Tensor:
        """Generator state (CPU ByteTensor)."""
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        """Restore :meth:`get_state`."""
        self.generator.set_state(state)
