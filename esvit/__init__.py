"""esvit: EsViT self-supervised pretraining (DINO + region-level self-distillation) for any backbone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "NetWrapper": "esvit.wrapper",
    "DINOHead": "esvit.heads",
    "EsViTModel": "esvit.model",
    "EsViTTrainer": "esvit.trainer",
    "MultiCropAugmentation": "esvit.augment",
    "build_backbone": "esvit.backbones",
    "list_backbones": "esvit.backbones",
    "register_backbone": "esvit.backbones",
    "BackboneSpec": "esvit.backbones",
    "ViewLoss": "esvit.losses",
    "RegionLoss": "esvit.losses",
    "Schedules": "esvit.schedules",
    "Config": "esvit.config",
    "load_config": "esvit.config",
    "load_backbone": "esvit.export",
    "export_backbone": "esvit.export",
    "linear_probe": "esvit.eval",
    "knn_eval": "esvit.eval",
    "measure_correspondence": "esvit.eval.correspondence",
    "pretrain": "esvit.api",
}

__all__ = [
    "BackboneSpec", "Config", "DINOHead", "EsViTModel", "EsViTTrainer", "MultiCropAugmentation",
    "NetWrapper", "RegionLoss", "Schedules", "ViewLoss", "build_backbone", "list_backbones",
    "load_config", "register_backbone", "load_backbone", "export_backbone", "linear_probe", "knn_eval",
    "embed", "measure_correspondence", "pretrain",
]

if TYPE_CHECKING:  # pragma: no cover
    from esvit.api import pretrain
    from esvit.augment import MultiCropAugmentation
    from esvit.backbones import BackboneSpec, build_backbone, list_backbones, register_backbone
    from esvit.config import Config, load_config
    from esvit.eval import knn_eval, linear_probe
    from esvit.eval.correspondence import measure_correspondence
    from esvit.export import export_backbone, load_backbone
    from esvit.heads import DINOHead
    from esvit.losses import RegionLoss, ViewLoss
    from esvit.model import EsViTModel
    from esvit.schedules import Schedules
    from esvit.trainer import EsViTTrainer
    from esvit.wrapper import NetWrapper


def __getattr__(name: str) -> Any:
    """Import public names lazily so ``import esvit`` stays fast."""
    if name == "embed":  # the callable module esvit.embed (``esvit.embed(...)`` extracts embeddings)
        import importlib

        return importlib.import_module("esvit.embed")
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'esvit' has no attribute {name!r}")
