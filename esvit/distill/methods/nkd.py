"""NKD: normalized knowledge distillation (Yang et al. 2023).

"From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized
Loss and Customized Soft Labels" (ICCV 2023), the NKD loss: with ``T`` the teacher's and ``S`` the
student's softmax, ``t`` the target class and ``N(.)`` the normalisation of the non-target
probabilities (``N(p_i) = p_i / (1 - p_t)``),

    L_NKD = - T_t log S_t  -  gamma * lambda^2 * sum_{i != t} N(T_i^lambda) log N(S_i^lambda)

where the target term uses temperature 1 and the non-target term temperature ``lambda``
(``N(p^lambda)`` over the non-target classes is the softmax of the non-target logits divided by
``lambda``). The paper trains with ``L_CE + L_NKD``; defaults ``gamma = 1.5``, ``lambda = 1``
(the official code's). Both terms are averaged over the batch.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from esvit.distill.losses import _ce, _check, _up
from esvit.distill.methods.registry import (
    DistillContext,
    Distiller,
    DistillInputs,
    Needs,
    register_distiller,
)

__all__ = ["NKD", "NKDLoss", "nkd_loss"]


def nkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, gamma: float = 1.5,
             temperature: float = 1.0, ce_weight: float = 1.0, label_smoothing: float = 0.0
             ) -> dict[str, Tensor]:
    """``ce_weight * CE + L_NKD`` (see the module docstring).

    Args:
        student_logits: ``(b, C)``, ``C >= 2``.
        teacher_logits: ``(b, C)`` (detached here).
        target: ``(b,)`` labels.
        gamma: Weight of the non-target term.
        temperature: ``lambda`` of the non-target term (the target term uses 1).
        ce_weight: Weight of the label cross-entropy (the paper adds it with weight 1).
        label_smoothing: Label smoothing of the cross-entropy.

    Returns:
        ``{"loss", "ce", "target", "non_target"}``; ``non_target`` includes ``gamma * lambda^2``.
    """
    _check(student_logits, teacher_logits, target)
    b, c = student_logits.shape
    if c < 2:
        raise ValueError(f"NKD needs at least 2 classes, got {c}")
    s = _up(student_logits)
    t = _up(teacher_logits.detach()).to(s.dtype)
    ce = _ce(student_logits, target, label_smoothing)
    idx = target[:, None]
    log_s_t = F.log_softmax(s, dim=1).gather(1, idx).squeeze(1)
    t_t = F.softmax(t, dim=1).gather(1, idx).squeeze(1)
    target_term = -(t_t * log_s_t).mean()
    rest = ~F.one_hot(target, c).bool()
    s_nt = s[rest].view(b, c - 1) / temperature
    t_nt = t[rest].view(b, c - 1) / temperature
    non_target = -gamma * temperature ** 2 * (F.softmax(t_nt, dim=1) * F.log_softmax(s_nt, dim=1)).sum(1).mean()
    loss = ce_weight * ce + target_term + non_target
    return {"loss": loss, "ce": ce.detach(), "target": target_term.detach(), "non_target": non_target.detach()}


class NKDLoss(nn.Module):
    """Module form of :func:`nkd_loss`."""

    def __init__(self, gamma: float = 1.5, temperature: float = 1.0, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.gamma, self.temperature, self.ce_weight, self.label_smoothing = gamma, temperature, ce_weight, label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Args: logits ``(b, C)``, labels ``(b,)``. Returns ``{"loss", "ce", "target", "non_target"}``."""
        return nkd_loss(student_logits, teacher_logits, target, self.gamma, self.temperature, self.ce_weight,
                        self.label_smoothing)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, temperature={self.temperature}, ce_weight={self.ce_weight}"


@register_distiller("nkd")
class NKD(Distiller):
    """NKD on the student's and teacher's logits (``loss.nkd``)."""

    def __init__(self, gamma: float = 1.5, temperature: float = 1.0, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(Needs())
        self.criterion = NKDLoss(gamma, temperature, ce_weight, label_smoothing)

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> NKD:
        p = loss.nkd
        return cls(p.gamma, p.temperature, p.ce_weight, loss.label_smoothing)

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        """Needs the student logits, teacher logits and labels."""
        inputs.require(teacher_logits=inputs.teacher_logits, labels=inputs.labels)
        assert inputs.teacher_logits is not None and inputs.labels is not None
        return self.criterion(inputs.logits(), inputs.teacher_logits, inputs.labels)
