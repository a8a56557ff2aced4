"""Label-free feature distillation: the student matches a frozen backbone's features.

The way users compress a backbone they pretrained here: no labels, no classifier. The teacher
(a frozen backbone) and the student see the same augmented crops; the student's pooled feature
and region features of one stage are projected to the teacher's dimension and pulled towards the
teacher's pooled and region features of its stage:

    L = pooled_weight * d(P_p s_pooled, t_pooled) + region_weight * d(align(P_r s_regions), t_regions)

* ``P_p``, ``P_r``: linear projections (student dim -> teacher dim), initialised with a
  truncated normal (std 0.02);
* ``align``: the student's region grid is bilinearly resized (or average-pooled when larger) to
  the teacher's grid, as lightly-train does;
* ``d``: ``mse`` (mean squared error on raw features: lightly-train's ``distillationv2``, its
  default ``distillation`` method from v0.7 to v0.14), ``cosine`` (``1 - cos`` per vector, mean: invariant
  to the teacher's feature scale, the default here) or ``smooth_l1`` (Huber with ``beta = 1``, mean).

Pooled features: the CLS token for token stages with a prefix token, else the mean of the region
tokens (:func:`~esvit.distill.methods.stages.stage_tokens`), as :class:`~esvit.wrapper.NetWrapper`
pools. lightly-train's ``distillationv2`` matches only the spatial features (of the teacher's last
blocks, concatenated) after a random mixup of the batch; the pooled term and the choice of stages
are ours (``region_weight=1, pooled_weight=0, criterion=mse`` is its objective on one stage).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from esvit.distill.losses import _up
from esvit.distill.methods.registry import (
    DistillContext,
    Distiller,
    DistillInputs,
    Needs,
    register_distiller,
)
from esvit.distill.methods.stages import Stage, align_grid, stage_tokens

__all__ = ["FEATURE_CRITERIA", "FeatureDistiller", "feature_distance"]

FEATURE_CRITERIA = ("cosine", "mse", "smooth_l1")


def feature_distance(student: Tensor, teacher: Tensor, criterion: str = "cosine") -> Tensor:
    """Distance between projected student features and teacher features (teacher detached).

    Args:
        student: ``(..., d)``.
        teacher: ``(..., d)``, same shape.
        criterion: ``cosine`` (mean of ``1 - cos`` over the vectors), ``mse`` or ``smooth_l1``
            (means over all elements; Huber ``beta = 1``).

    Returns:
        Scalar tensor.
    """
    if criterion not in FEATURE_CRITERIA:
        raise ValueError(f"criterion must be one of {FEATURE_CRITERIA}, got {criterion!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} differ")
    s = _up(student)
    t = _up(teacher.detach()).to(s.dtype)
    if criterion == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    if criterion == "mse":
        return F.mse_loss(s, t)
    return F.smooth_l1_loss(s, t, beta=1.0)


@register_distiller("feature")
class FeatureDistiller(Distiller):
    """Label-free matching of pooled and region features (``loss.feature``).

    Args:
        student: Student stage (its pooled feature and regions).
        teacher: Teacher stage.
        criterion: ``cosine``, ``mse`` or ``smooth_l1``.
        pooled_weight: Weight of the pooled term.
        region_weight: Weight of the region term.

    Raises:
        StageError: The region grids cannot be aligned (only when ``region_weight > 0``).
    """

    def __init__(self, student: Stage, teacher: Stage, criterion: str = "cosine", pooled_weight: float = 1.0,
                 region_weight: float = 1.0) -> None:
        if criterion not in FEATURE_CRITERIA:
            raise ValueError(f"loss.feature.criterion must be one of {FEATURE_CRITERIA}, got {criterion!r}")
        super().__init__(Needs(student_stages=(student.name,), teacher_stages=(teacher.name,), teacher_logits=False,
                               labels=False))
        self.student_stage, self.teacher_stage = student, teacher
        self.criterion, self.pooled_weight, self.region_weight = criterion, pooled_weight, region_weight
        self.align = align_grid(student, teacher, "loss.feature") if region_weight > 0 else None
        self.pooled_proj = nn.Linear(student.dim, teacher.dim)
        self.region_proj = nn.Linear(student.dim, teacher.dim)
        for m in (self.pooled_proj, self.region_proj):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> FeatureDistiller:
        p = loss.feature
        what = "loss.feature.student_stage / teacher_stage"
        s = ctx.final("student", p.student_stage, what)
        t = ctx.final("teacher", p.teacher_stage, what)
        return cls(s, t, p.criterion, p.pooled_weight, p.region_weight)

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        """Needs the two hooked stages only (no labels, no logits)."""
        s_pooled, s_regions = stage_tokens(inputs.student_feats[self.student_stage.name], self.student_stage)
        t_pooled, t_regions = stage_tokens(inputs.teacher_feats[self.teacher_stage.name], self.teacher_stage)
        pooled = feature_distance(self.pooled_proj(s_pooled), t_pooled, self.criterion)
        loss = self.pooled_weight * pooled
        out = {"pooled": pooled.detach()}
        if self.align is not None:
            regions = self._regions(self.region_proj(s_regions))
            region = feature_distance(regions, t_regions, self.criterion)
            loss = loss + self.region_weight * region
            out["region"] = region.detach()
        return {"loss": loss, **out}

    def _regions(self, projected: Tensor) -> Tensor:
        """``(b, n_s, d_t)`` projected student regions -> ``(b, n_t, d_t)`` on the teacher's grid."""
        assert self.align is not None
        b, n, d = projected.shape
        g = self.student_stage.grid or (n, 1)
        grid = projected.transpose(1, 2).reshape(b, d, g[0], g[1])
        return self.align(grid).flatten(2).transpose(1, 2)
