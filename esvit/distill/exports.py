"""The files a distillation run writes besides its checkpoints: formats and exports.

``student.pt`` (the classifier; a valid ``teacher.kind=classifier`` input),
``student_backbone.pt`` (an esvit backbone export: usable by ``esvit-linear`` / ``esvit-knn``) and,
for DeiT students, ``student_vit.pt`` (plain torchvision ``VisionTransformer`` state dict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from esvit.distill.deit import (
    ClassifierModel,
    DeiTVisionTransformer,
    to_plain_vit_state_dict,
    vit_hyperparameters,
)
from esvit.train import checkpoint as ckpt

__all__ = ["CHECKPOINT_FORMAT", "CLASSIFIER_FORMAT", "FORMAT_VERSION", "PLAIN_VIT_FORMAT", "RESULTS_FILE",
           "write_exports"]

CHECKPOINT_FORMAT = "esvit-distill"
CLASSIFIER_FORMAT = "esvit-classifier"
PLAIN_VIT_FORMAT = "esvit-plain-vit"
FORMAT_VERSION = 1
RESULTS_FILE = "distill_results.json"


def write_exports(out_dir: Path, student: nn.Module, meta: dict[str, Any]) -> dict[str, str]:
    """``student.pt``, ``student_backbone.pt`` and (DeiT) ``student_vit.pt``; returns their paths."""
    from esvit.backbones import build_backbone
    from esvit.export import EXPORT_FORMAT

    files = {}
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    files["student"] = str(ckpt.atomic_save({"format": CLASSIFIER_FORMAT, "format_version": FORMAT_VERSION,
                                             **meta, "state_dict": state}, out_dir / "student.pt", "student export"))
    _, spec = build_backbone(meta["backbone"], **meta["backbone_kwargs"])
    if isinstance(student, DeiTVisionTransformer):
        backbone_state = to_plain_vit_state_dict(student, keep_head=False)
        files["student_vit"] = str(ckpt.atomic_save(
            {"format": PLAIN_VIT_FORMAT, "format_version": FORMAT_VERSION,
             "vit_kwargs": vit_hyperparameters(student), "num_classes": meta["num_classes"],
             "classes": meta["classes"], "state_dict": to_plain_vit_state_dict(student, keep_head=True)},
            out_dir / "student_vit.pt", "student export"))
    else:
        assert isinstance(student, ClassifierModel)
        backbone_state = {k: v.detach().cpu().clone() for k, v in student.backbone.state_dict().items()}
    files["student_backbone"] = str(ckpt.atomic_save(
        {"format": EXPORT_FORMAT, "format_version": 1, "backbone": meta["backbone"],
         "backbone_kwargs": meta["backbone_kwargs"], "export_ctor": spec.export_ctor,
         "image_size": meta["image_size"], "checkpoint_key": None, "state_dict": backbone_state},
        out_dir / "student_backbone.pt", "backbone export"))
    return files
