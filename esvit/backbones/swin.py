"""Small torchvision Swin Transformers for 32-96 px images.

``drop_path_rate`` is torchvision's ``stochastic_depth_prob``: the last block's rate, linear from 0
over the blocks (the official Swin rule); see :mod:`esvit.backbones.registry`.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import SwinTransformer

from .registry import BackboneSpec, register_backbone

__all__ = ["swin_nano", "swin_nano_torchvision", "swin_tiny_cifar", "swin_tiny_cifar_torchvision"]

# patch 2 and three stages: 32 px -> 16x16 -> 8x8 -> 4x4 tokens (96 px -> 12x12); window 4.
SWIN_TINY_CIFAR = dict(
    patch_size=[2, 2],
    embed_dim=96,
    depths=[2, 2, 6],
    num_heads=[3, 6, 12],
    window_size=[4, 4],
)
# The same layout, very small, for CPU benchmarks (~30x cheaper than swin_tiny_cifar).
SWIN_NANO = dict(
    patch_size=[2, 2],
    embed_dim=32,
    depths=[1, 1, 2],
    num_heads=[1, 2, 4],
    window_size=[4, 4],
)


def _out_dim(settings: dict[str, Any]) -> int:
    """Channels of the last stage: the embedding width doubles at every stage after the first."""
    return settings["embed_dim"] * 2 ** (len(settings["depths"]) - 1)


SWIN_TINY_CIFAR_DIM = _out_dim(SWIN_TINY_CIFAR)  # 384
SWIN_NANO_DIM = _out_dim(SWIN_NANO)  # 128


def _torchvision_swin(settings: dict[str, Any], drop_path_rate: float) -> nn.Module:
    net = SwinTransformer(**settings, stochastic_depth_prob=drop_path_rate)
    net.head = nn.Identity()
    return net


def _spec(name: str, settings: dict[str, Any]) -> BackboneSpec:
    """Hook the final ``norm``: ``(b, h/8, w/8, C)`` tokens, average-pooled."""
    return BackboneSpec(name=name, layer="norm", layout="bhwc", num_prefix_tokens=0, pool="avg",
                        embed_dim=_out_dim(settings), export_ctor="torchvision.models.SwinTransformer")


def swin_tiny_cifar_torchvision(image_size: int = 32, drop_path_rate: float = 0.1) -> nn.Module:
    """``torchvision.models.SwinTransformer(**SWIN_TINY_CIFAR)`` with ``head = nn.Identity``.

    Args:
        image_size: Accepted for interface uniformity; no effect (any size works).
        drop_path_rate: ``stochastic_depth_prob`` of the last block.

    Returns:
        The model, mapping ``(b, 3, h, w)`` to ``(b, 384)``.
    """
    return _torchvision_swin(SWIN_TINY_CIFAR, drop_path_rate)


@register_backbone("swin_tiny_cifar", equivalent=swin_tiny_cifar_torchvision)
def swin_tiny_cifar(
    image_size: int = 32, drop_path_rate: float = 0.1
) -> tuple[nn.Module, BackboneSpec]:
    """Swin (patch 2, dim 96, depths 2-2-6, window 4); hooks ``norm`` -> ``(b, h/8, w/8, 384)``."""
    return swin_tiny_cifar_torchvision(image_size, drop_path_rate), _spec("swin_tiny_cifar", SWIN_TINY_CIFAR)


def swin_nano_torchvision(image_size: int = 32, drop_path_rate: float = 0.0) -> nn.Module:
    """``torchvision.models.SwinTransformer(**SWIN_NANO)`` with ``head = nn.Identity``."""
    return _torchvision_swin(SWIN_NANO, drop_path_rate)


@register_backbone("swin_nano", equivalent=swin_nano_torchvision)
def swin_nano(image_size: int = 32, drop_path_rate: float = 0.0) -> tuple[nn.Module, BackboneSpec]:
    """A very small Swin (patch 2, dim 32, depths 1-1-2, window 4) for CPU benchmarks; hooks
    ``norm`` -> ``(b, h/8, w/8, 128)``. No stochastic depth by default (``drop_path_rate`` 0)."""
    return swin_nano_torchvision(image_size, drop_path_rate), _spec("swin_nano", SWIN_NANO)
