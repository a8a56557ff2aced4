"""Backbone registry and built-in backbones (torchvision-based, never downloading weights)."""

from . import cifar_resnet, swin, torchvision_models, vit  # noqa: F401  (register entries)
from .registry import (
    DROP_PATH_KWARG,
    BackboneSpec,
    build_backbone,
    check_drop_path_rate,
    drop_path_kwargs,
    list_backbones,
    register_backbone,
    supports_drop_path,
    torchvision_equivalent,
)
from .vit import FlexibleVisionTransformer

__all__ = [
    "DROP_PATH_KWARG",
    "BackboneSpec",
    "FlexibleVisionTransformer",
    "build_backbone",
    "check_drop_path_rate",
    "drop_path_kwargs",
    "list_backbones",
    "register_backbone",
    "supports_drop_path",
    "torchvision_equivalent",
]
