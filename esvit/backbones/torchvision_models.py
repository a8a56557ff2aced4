"""Standard torchvision backbones: ResNet-18/50, Swin-T/S/B and ViT-B/16 (random init, headless).

The Swins and ViT-B/16 take ``drop_path_rate`` (stochastic depth, see
:mod:`esvit.backbones.registry`); the ResNets have no stochastic depth and do not take it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn
from torchvision import models

from .registry import BackboneSpec, register_backbone
from .vit import _check_image_size, flexible_vit, torchvision_vit

__all__ = ["SWIN_VARIANTS", "resnet18", "resnet50", "swin_b", "swin_s", "swin_t", "vit_b_16"]


def _resnet(arch: str) -> nn.Module:
    net = getattr(models, arch)(weights=None)
    net.fc = nn.Identity()
    return net


def _resnet_spec(name: str, dim: int, export_ctor: str) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        layer="layer4",
        layout="bchw",
        num_prefix_tokens=0,
        pool="avg",
        embed_dim=dim,
        export_ctor=export_ctor,
    )


def _resnet18_equivalent(image_size: int = 224) -> nn.Module:
    return _resnet("resnet18")


def _resnet50_equivalent(image_size: int = 224) -> nn.Module:
    return _resnet("resnet50")


@register_backbone("resnet18", equivalent=_resnet18_equivalent)
def resnet18(image_size: int = 224) -> tuple[nn.Module, BackboneSpec]:
    """torchvision ResNet-18 (fc = Identity); hooks ``layer4`` -> ``(b, 512, h/32, w/32)``.

    ``image_size`` is accepted for interface uniformity and has no effect.
    """
    return _resnet("resnet18"), _resnet_spec("resnet18", 512, "torchvision.models.resnet18")


@register_backbone("resnet50", equivalent=_resnet50_equivalent)
def resnet50(image_size: int = 224) -> tuple[nn.Module, BackboneSpec]:
    """torchvision ResNet-50 (fc = Identity); hooks ``layer4`` -> ``(b, 2048, h/32, w/32)``.

    ``image_size`` is accepted for interface uniformity and has no effect.
    """
    return _resnet("resnet50"), _resnet_spec("resnet50", 2048, "torchvision.models.resnet50")


# The Swin variants of the official EsViT repository (``experiments/imagenet/swin/*_window7_224.yaml``):
# name -> (embed_dim, depths, num_heads, official student drop-path rate). torchvision's
# ``models.swin_t/s/b`` hardcode the supervised recipe's stochastic depth (0.2 / 0.3 / 0.5), so
# the network is built from ``models.SwinTransformer`` with the same architecture; its per-block
# rate is linear from 0 to ``stochastic_depth_prob`` over the blocks, like the official Swin's.
SWIN_VARIANTS: dict[str, tuple[int, list[int], list[int], float]] = {
    "swin_t": (96, [2, 2, 6, 2], [3, 6, 12, 24], 0.1),
    "swin_s": (96, [2, 2, 18, 2], [3, 6, 12, 24], 0.2),
    "swin_b": (128, [2, 2, 18, 2], [4, 8, 16, 32], 0.2),
}


def _swin_net(name: str, drop_path_rate: float) -> nn.Module:
    dim, depths, heads, _ = SWIN_VARIANTS[name]
    net = models.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=dim,
        depths=depths,
        num_heads=heads,
        window_size=[7, 7],
        stochastic_depth_prob=drop_path_rate,
    )
    net.head = nn.Identity()
    return net


def _swin_spec(name: str) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        layer="norm",
        layout="bhwc",
        num_prefix_tokens=0,
        pool="avg",
        embed_dim=SWIN_VARIANTS[name][0] * 8,
        export_ctor=f"torchvision.models.{name}",
    )


def _register_swin(name: str, config_file: str) -> Callable[..., tuple[nn.Module, BackboneSpec]]:
    """Register torchvision Swin ``name`` (head = Identity) with its official student drop-path."""
    dim, _, _, default_rate = SWIN_VARIANTS[name]

    def equivalent(image_size: int = 224, drop_path_rate: float = default_rate) -> nn.Module:
        return _swin_net(name, drop_path_rate)

    def factory(image_size: int = 224, drop_path_rate: float = default_rate) -> tuple[nn.Module, BackboneSpec]:
        return _swin_net(name, drop_path_rate), _swin_spec(name)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"torchvision {name.replace('_', '-').title()} (head = Identity); hooks the final ``norm`` -> "
        f"``(b, h/32, w/32, {dim * 8})``.\n\n"
        "Args:\n"
        "    image_size: Accepted for interface uniformity (Swin handles any size >= 32).\n"
        "    drop_path_rate: Stochastic depth of the last block (linear from 0 over the blocks); "
        f"default {default_rate}, the official EsViT value (``experiments/imagenet/swin/{config_file}``).\n"
    )
    return register_backbone(name, equivalent=equivalent)(factory)


swin_t = _register_swin("swin_t", "swin_tiny_patch4_window7_224.yaml")
swin_s = _register_swin("swin_s", "swin_small_patch4_window7_224.yaml")
swin_b = _register_swin("swin_b", "swin_base_patch4_window7_224.yaml")


def _vit_b_16_equivalent(image_size: int = 224, drop_path_rate: float = 0.0) -> nn.Module:
    _check_image_size(image_size, 16)
    return torchvision_vit(image_size, 16, 12, 12, 768, 3072)  # no stochastic depth in eval


@register_backbone("vit_b_16", equivalent=_vit_b_16_equivalent)
def vit_b_16(image_size: int = 224, drop_path_rate: float = 0.0) -> tuple[nn.Module, BackboneSpec]:
    """ViT-B/16 with torchvision's structure and flexible input size; hooks ``encoder``.

    Args:
        image_size: Native size of the position-embedding grid (any multiple of 16 works at
            run time by interpolation).
        drop_path_rate: Stochastic depth of the last block (linear from 0, as in DINO's ViT;
            the official EsViT / DINO students use 0.1, set by ``model.drop_path_rate``).
    """
    net, spec = flexible_vit("vit_b_16", image_size, 16, 12, 12, 768, 3072, drop_path_rate)
    return net, replace(spec, export_ctor="torchvision.models.vit_b_16")
