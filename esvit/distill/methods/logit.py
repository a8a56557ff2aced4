"""The logit losses of :mod:`esvit.distill.losses` as registered distillers.

``ce`` (labels only), ``kd`` (Hinton), ``dkd`` (with its warm-up ramp), ``dist``, ``deit_soft`` and
``deit_hard``: each wraps the existing loss module unchanged, so a run through the registry gives
the same numbers as the loss modules of :mod:`esvit.distill.losses` (which the training loop
used directly before the registry).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from esvit.distill.losses import DeiTDistillationLoss, DISTLoss, DKDLoss, KDLoss, LabelLoss
from esvit.distill.methods.registry import (
    DistillContext,
    Distiller,
    DistillInputs,
    Needs,
    register_distiller,
)

__all__ = ["CE", "DIST", "DKD", "KD", "DeiTHard", "DeiTSoft"]


def _labels_and_teacher(inputs: DistillInputs) -> tuple[Tensor, Tensor]:
    inputs.require(teacher_logits=inputs.teacher_logits, labels=inputs.labels)
    assert inputs.teacher_logits is not None and inputs.labels is not None
    return inputs.teacher_logits, inputs.labels


@register_distiller("ce")
class CE(Distiller):
    """Label cross-entropy only (the no-teacher baseline)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__(Needs(teacher_logits=False))
        self.criterion = LabelLoss(label_smoothing)

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> CE:
        return cls(loss.label_smoothing)

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        """Needs the student logits and labels."""
        inputs.require(labels=inputs.labels)
        assert inputs.labels is not None
        return self.criterion(inputs.logits(), None, inputs.labels)


@register_distiller("kd")
class KD(Distiller):
    """Hinton KD (``loss.kd``)."""

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0, label_smoothing: float = 0.0) -> None:
        super().__init__(Needs())
        self.criterion = KDLoss(alpha, temperature, label_smoothing)

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> KD:
        return cls(loss.kd.alpha, loss.kd.temperature, loss.label_smoothing)

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        t, y = _labels_and_teacher(inputs)
        return self.criterion(inputs.logits(), t, y)


@register_distiller("dkd")
class DKD(Distiller):
    """Decoupled KD (``loss.dkd``); the distillation terms ramp from 0 to 1 over ``warmup_steps``."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, ce_weight: float = 1.0,
                 warmup_steps: int = 0, label_smoothing: float = 0.0) -> None:
        super().__init__(Needs())
        self.criterion = DKDLoss(alpha, beta, temperature, ce_weight, label_smoothing)
        self.warmup_steps = int(warmup_steps)

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> DKD:
        p = loss.dkd
        return cls(p.alpha, p.beta, p.temperature, p.ce_weight, round(p.warmup_epochs * ctx.steps_per_epoch),
                   loss.label_smoothing)

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        t, y = _labels_and_teacher(inputs)
        ramp = min(inputs.step / self.warmup_steps, 1.0) if self.warmup_steps > 0 else 1.0
        return self.criterion(inputs.logits(), t, y, kd_scale=ramp)


@register_distiller("dist")
class DIST(Distiller):
    """DIST (``loss.dist``)."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(Needs())
        self.criterion = DISTLoss(beta, gamma, tau, ce_weight, label_smoothing)

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> DIST:
        p = loss.dist
        return cls(p.beta, p.gamma, p.tau, p.ce_weight, loss.label_smoothing)

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        t, y = _labels_and_teacher(inputs)
        return self.criterion(inputs.logits(), t, y)


class _DeiT(Distiller):
    kind = "hard"

    def __init__(self, alpha: float = 0.5, tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(Needs())
        self.criterion = DeiTDistillationLoss(self.kind, alpha, tau, label_smoothing)

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> _DeiT:
        return cls(loss.deit.alpha, loss.deit.tau, loss.label_smoothing)

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        """Needs the DeiT student's ``(cls_logits, dist_logits)``, teacher logits and labels."""
        t, y = _labels_and_teacher(inputs)
        if not isinstance(inputs.student_out, tuple):
            raise ValueError(f"loss {self.name}: the student must return (cls_logits, dist_logits) (student.deit)")
        return self.criterion(inputs.student_out, t, y)


@register_distiller("deit_soft")
class DeiTSoft(_DeiT):
    """DeiT soft distillation through the distillation token (``loss.deit``)."""

    kind = "soft"


@register_distiller("deit_hard")
class DeiTHard(_DeiT):
    """DeiT hard distillation through the distillation token (``loss.deit``)."""

    kind = "hard"
