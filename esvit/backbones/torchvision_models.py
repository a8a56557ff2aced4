"""Standard torchvision backbones: ResNet-18/50, Swin-T and ViT-B/16 (random init, headless)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn
from torchvision import models

from .registry import BackboneSpec, register_backbone
from .vit import _check_image_size, flexible_vit, torchvision_vit

__all__ = ["resnet18", "resnet50", "swin_t", "vit_b_16"]


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


def _swin_t_net(drop_path_rate: float) -> nn.Module:
    # Same architecture as ``models.swin_t`` (which hardcodes stochastic_depth_prob=0.2).
    net = models.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=[7, 7],
        stochastic_depth_prob=drop_path_rate,
    )
    net.head = nn.Identity()
    return net


def _swin_t_equivalent(image_size: int = 224, drop_path_rate: float = 0.2) -> nn.Module:
    return _swin_t_net(drop_path_rate)


@register_backbone("swin_t", equivalent=_swin_t_equivalent)
def swin_t(image_size: int = 224, drop_path_rate: float = 0.2) -> tuple[nn.Module, BackboneSpec]:
    """torchvision Swin-T (head = Identity); hooks the final ``norm`` -> ``(b, h/32, w/32, 768)``.

    Args:
        image_size: Accepted for interface uniformity (Swin handles any size >= 32).
        drop_path_rate: Stochastic depth probability of the last block.
    """
    spec = BackboneSpec(
        name="swin_t",
        layer="norm",
        layout="bhwc",
        num_prefix_tokens=0,
        pool="avg",
        embed_dim=768,
        export_ctor="torchvision.models.swin_t",
    )
    return _swin_t_net(drop_path_rate), spec


def _vit_b_16_equivalent(image_size: int = 224) -> nn.Module:
    _check_image_size(image_size, 16)
    return torchvision_vit(image_size, 16, 12, 12, 768, 3072)


@register_backbone("vit_b_16", equivalent=_vit_b_16_equivalent)
def vit_b_16(image_size: int = 224) -> tuple[nn.Module, BackboneSpec]:
    """ViT-B/16 with torchvision's structure and flexible input size; hooks ``encoder``.

    Args:
        image_size: Native size of the position-embedding grid (any multiple of 16 works at
            run time by interpolation).
    """
    net, spec = flexible_vit("vit_b_16", image_size, 16, 12, 12, 768, 3072)
    return net, replace(spec, export_ctor="torchvision.models.vit_b_16")
