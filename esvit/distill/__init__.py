"""Knowledge distillation from a frozen pretrained teacher into a student classifier.

* :mod:`esvit.distill.losses`: Hinton KD, DKD, DIST and DeiT soft / hard objectives (pure
  functions and ``nn.Module`` forms);
* :mod:`esvit.distill.deit`: the DeiT distillation-token ViT, conversion back to a plain ViT,
  and student classifiers for any registry backbone;
* :mod:`esvit.distill.config`: the run configuration (YAML + dotted overrides);
* :mod:`esvit.distill.data`, :mod:`esvit.distill.augment`, :mod:`esvit.distill.teachers`,
  :mod:`esvit.distill.evaluate`, :mod:`esvit.distill.exports`: the splits, the on-device
  augmentation, the frozen teachers, validation and the files a run writes;
* :mod:`esvit.distill.train`: the training loop (:func:`distill`) on the shared run engine
  (:mod:`esvit.run`), used by ``esvit-distill`` / ``distill.py``.
"""

from esvit.distill.config import DistillConfig, load_distill_config, validate_distill
from esvit.distill.deit import (
    ClassifierModel,
    DeiTVisionTransformer,
    build_student,
    deit_from_vit,
    plain_vit_from_deit,
    to_plain_vit_state_dict,
)
from esvit.distill.losses import (
    DeiTDistillationLoss,
    DISTLoss,
    DKDLoss,
    KDLoss,
    LabelLoss,
    deit_loss,
    dist_loss,
    dkd_loss,
    kd_loss,
)
from esvit.distill.train import (
    DistillResult,
    FrozenTeacher,
    build_teacher,
    distill,
    evaluate,
    load_classifier,
)

__all__ = [
    "ClassifierModel",
    "DISTLoss",
    "DKDLoss",
    "DeiTDistillationLoss",
    "DeiTVisionTransformer",
    "DistillConfig",
    "DistillResult",
    "FrozenTeacher",
    "KDLoss",
    "LabelLoss",
    "build_student",
    "build_teacher",
    "deit_from_vit",
    "deit_loss",
    "dist_loss",
    "distill",
    "dkd_loss",
    "evaluate",
    "kd_loss",
    "load_classifier",
    "load_distill_config",
    "plain_vit_from_deit",
    "to_plain_vit_state_dict",
    "validate_distill",
]
