"""Small torchvision Swin Transformer for 32-96 px images."""

from __future__ import annotations

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
SWIN_TINY_CIFAR_DIM = 96 * 2 ** (len(SWIN_TINY_CIFAR["depths"]) - 1)  # 384


def swin_tiny_cifar_torchvision(image_size: int = 32, drop_path_rate: float = 0.1) -> nn.Module:
    """``torchvision.models.SwinTransformer(**SWIN_TINY_CIFAR)`` with ``head = nn.Identity``.

    Args:
        image_size: Accepted for interface uniformity; no effect (any size works).
        drop_path_rate: ``stochastic_depth_prob`` of the last block.

    Returns:
        The model, mapping ``(b, 3, h, w)`` to ``(b, 384)``.
    """
    net = SwinTransformer(**SWIN_TINY_CIFAR, stochastic_depth_prob=drop_path_rate)
    net.head = nn.Identity()
    return net


@register_backbone("swin_tiny_cifar", equivalent=swin_tiny_cifar_torchvision)
def swin_tiny_cifar(
    image_size: int = 32, drop_path_rate: float = 0.1
) -> tuple[nn.Module, BackboneSpec]:
    """Swin (patch 2, dim 96, depths 2-2-6, window 4); hooks ``norm`` -> ``(b, h/8, w/8, 384)``."""
    spec = BackboneSpec(
        name="swin_tiny_cifar",
        layer="norm",
        layout="bhwc",
        num_prefix_tokens=0,
        pool="avg",
        embed_dim=SWIN_TINY_CIFAR_DIM,
        export_ctor="torchvision.models.SwinTransformer",
    )
    return swin_tiny_cifar_torchvision(image_size, drop_path_rate), spec


# A very small Swin for CPU benchmarks: patch 2, dim 32, depths 1-1-2, window 4: 32 px -> 4x4 tokens
# of 128 dims at the hooked norm, like swin_tiny_cifar but ~30x cheaper.
SWIN_NANO = dict(
    patch_size=[2, 2],
    embed_dim=32,
    depths=[1, 1, 2],
    num_heads=[1, 2, 4],
    window_size=[4, 4],
)
SWIN_NANO_DIM = 32 * 2 ** (len(SWIN_NANO["depths"]) - 1)  # 128


def swin_nano_torchvision(image_size: int = 32, drop_path_rate: float = 0.0) -> nn.Module:
    """``torchvision.models.SwinTransformer(**SWIN_NANO)`` with ``head = nn.Identity``."""
    net = SwinTransformer(**SWIN_NANO, stochastic_depth_prob=drop_path_rate)
    net.head = nn.Identity()
    return net


@register_backbone("swin_nano", equivalent=swin_nano_torchvision)
def swin_nano(image_size: int = 32, drop_path_rate: float = 0.0) -> tuple[nn.Module, BackboneSpec]:
    """A very small Swin (patch 2, dim 32, depths 1-1-2, window 4) for CPU benchmarks; hooks
    ``norm`` -> ``(b, h/8, w/8, 128)``. No stochastic depth by default."""
    spec = BackboneSpec(
        name="swin_nano",
        layer="norm",
        layout="bhwc",
        num_prefix_tokens=0,
        pool="avg",
        embed_dim=SWIN_NANO_DIM,
        export_ctor="torchvision.models.SwinTransformer",
    )
    return swin_nano_torchvision(image_size, drop_path_rate), spec
