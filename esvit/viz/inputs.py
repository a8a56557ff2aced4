"""What the pictures are made from: a frozen backbone (any checkpoint esvit reads, or random
weights) and images decoded to the square it is fed.

The backbone comes from :func:`esvit.eval.correspondence` 's resolver (training checkpoint,
exported backbone, bare state dict with its name, or a ``(net, spec)`` pair such as
``build_backbone(name)``), is wrapped in :class:`~esvit.wrapper.NetWrapper` (pooled feature and
region tokens for CNN, Swin and ViT backbones) and fed ImageNet-normalised images
(:func:`esvit.eval.features.normalize`). Only backbone features are used, never the region
(dense) head: a checkpoint trained with ``model.region_loss=false`` has no region head but its
backbone still has region tokens, so every picture works for it too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from esvit.backbones.registry import BackboneSpec
from esvit.wrapper import NetWrapper

__all__ = ["VizModel", "load_model", "load_views"]


@dataclass
class VizModel:
    """A frozen backbone ready for pictures.

    Attributes:
        wrapper: The backbone wrapped for ``(pooled, regions)`` features (eval mode).
        spec: Its registry spec.
        image_size: Side of the square input, in pixels.
        grid: ``(gh, gw)`` region tokens of that input.
        device: Where it runs.
        source: Checkpoint path, or ``"<module>"`` for a ``(net, spec)`` pair.
    """

    wrapper: NetWrapper
    spec: BackboneSpec
    image_size: int
    grid: tuple[int, int]
    device: torch.device
    source: str

    @property
    def patch(self) -> float:
        """Side of the image square one region token stands for, in input pixels."""
        return self.image_size / self.grid[1]

    @property
    def name(self) -> str:
        """Registry name of the backbone."""
        return self.spec.name

    @torch.no_grad()
    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features of images.

        Args:
            x: ``(b, 3, s, s)`` float images in ``[0, 1]`` (``s = image_size``).

        Returns:
            ``pooled (b, d)`` and ``regions (b, n, d)``, float32 on the CPU, regions in
            row-major grid order.
        """
        from esvit.eval.features import normalize

        pooled, regions = self.wrapper(normalize(x.to(self.device)))
        return pooled.float().cpu(), regions.float().cpu()


def load_model(
    backbone: Any,
    *,
    image_size: int | None = None,
    checkpoint_key: str = "teacher",
    backbone_name: str | None = None,
    device: str | torch.device | None = "cpu",
) -> VizModel:
    """Load a backbone for pictures and find its region grid.

    Args:
        backbone: Checkpoint path (any format :func:`esvit.load_backbone` reads) or a
            ``(net, spec)`` pair.
        image_size: Input side (default: the recorded training crop size, else 224).
        checkpoint_key: ``"teacher"`` or ``"student"`` weights of a training checkpoint.
        backbone_name: Registry name, for bare state dicts.
        device: ``"cpu"``, ``"auto"`` / None (CUDA when available), ``"cuda:1"``, ...

    Returns:
        :class:`VizModel`.

    Raises:
        ValueError: The input size does not fit the backbone (e.g. smaller than one patch).
    """
    from esvit.eval.correspondence import _resolve_backbone, square_grid
    from esvit.eval.features import resolve_device

    net, spec, size, source = _resolve_backbone(backbone, checkpoint_key, backbone_name, image_size)
    patch = getattr(net, "patch_size", 1)
    if size < max(1, patch if isinstance(patch, int) else 1):
        raise ValueError(f"image size {size} is smaller than one {patch}-px patch of {spec.name}: "
                         "use a larger --image-size")
    dev = resolve_device(device)
    wrapper = NetWrapper.from_spec(net, spec).eval().to(dev)
    try:
        _, n_tokens = wrapper.probe(size)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"image size {size} does not fit backbone {spec.name!r}: {e}") from None
    return VizModel(wrapper, spec, size, square_grid(n_tokens), dev, source)


def _decode(path: str | os.PathLike[str], size: int) -> tuple[Tensor, tuple[int, int]]:
    """``(uint8 (3, size, size), (height, width) of the original)``: :func:`load_image` 's decode."""
    from esvit.data.decode import decode_image, resize_to_canvas, to_chw_tensor

    def finish(img: Any, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        return to_chw_tensor(resize_to_canvas(img, size, "short_side_center_crop")), hw

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no image file {p}")
    try:
        return decode_image(p, size, "short_side_center_crop", finish)
    except Exception as e:  # noqa: BLE001 - any decode failure is a bad image, said in one line
        raise ValueError(f"cannot decode image {p}: {type(e).__name__}: {e}") from None


def load_views(paths: Sequence[str | os.PathLike[str]], model: VizModel) -> Tensor:
    """Decode images as the backbone sees them: EXIF-upright, short side scaled, centre square.

    Args:
        paths: Image files.
        model: The backbone they are for (its ``image_size`` and patch).

    Returns:
        ``(b, 3, s, s)`` float32 in ``[0, 1]``.

    Raises:
        FileNotFoundError: A file does not exist.
        ValueError: A file cannot be decoded, or the image is smaller than one patch (its short
            side, in its own pixels, is shorter than one region token's side).
    """
    out = []
    for path in paths:
        img, (h, w) = _decode(path, model.image_size)
        if min(h, w) < model.patch:
            raise ValueError(
                f"image {path} is {w}x{h} px, smaller than one {model.patch:g}-px patch (region token) "
                f"of {model.name}: use an image at least {model.patch:g} px on its short side"
            )
        out.append(img)
    if not out:
        raise ValueError("no image given")
    return torch.stack(out).float().div_(255)
