"""Backbone registry and built-in backbones (torchvision-based, never downloading weights)."""

from . import cifar_resnet, swin, torchvision_models, vit  # noqa: F401  (register entries)
from .registry import (
    BackboneSpec,
    build_backbone,
    list_backbones,
    register_backbone,
    torchvision_equivalent,
)
from .vit import FlexibleVisionTransformer

__all__ = [
    "BackboneSpec",
    "FlexibleVisionTransformer",
    "build_backbone",
    "list_backbones",
    "register_backbone",
    "torchvision_equivalent",
]
