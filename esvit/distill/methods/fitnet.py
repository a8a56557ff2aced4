"""FitNet hint loss (Romero et al. 2015) between hooked student and teacher stages.

"FitNets: Hints for Thin Deep Nets" (ICLR 2015), the hint-based training loss: the guided (student) layer's output
``v_g`` goes through a learned regressor ``r`` to the hint (teacher) layer's output ``u_h``:

    L_HT = 1/2 * || u_h(x) - r(v_g(x)) ||^2

Here, as in the modern toolboxes (OFA-KD's ``FitNet``, mdistiller), the squared error is averaged
over all elements (``F.mse_loss``) rather than halved and summed, and the hint loss is trained
jointly with the label cross-entropy instead of in a separate first stage:
``ce_weight * CE + weight * sum_stages MSE(align(r(s)), t)``.

* Regressor: a 1x1 convolution for a map stage (``bchw``; Romero's convolutional regressor with a
  1x1 kernel), a linear layer for token / channels-last stages (``bnd``, ``bhwc``), each mapping
  the student's channels to the teacher's.
* Spatial alignment (:func:`~esvit.distill.methods.stages.align_grid`): the regressed student map
  is average-pooled onto a smaller teacher grid or bilinearly interpolated onto a larger one.
  Prefix tokens (CLS) are dropped; token sequences that are not square grids align only when the
  counts are equal; otherwise building the distiller is a one-line error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
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
from esvit.distill.methods.stages import Stage, align_grid, stage_map

__all__ = ["FitNet", "HintRegressor", "fitnet_loss"]


class HintRegressor(nn.Module):
    """``r``: student stage output -> ``(b, d_t, h_t, w_t)`` on the teacher stage's grid.

    Args:
        student: The guided student stage.
        teacher: The hint teacher stage.
        what: Prefix of error messages.

    Raises:
        StageError: The two grids cannot be aligned.
    """

    def __init__(self, student: Stage, teacher: Stage, what: str = "loss.fitnet") -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.align: Callable[[Tensor], Tensor] = align_grid(student, teacher, what)
        if student.layout == "bchw":
            self.proj: nn.Module = nn.Conv2d(student.dim, teacher.dim, kernel_size=1, bias=False)
        else:
            self.proj = nn.Linear(student.dim, teacher.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: the student stage output (its layout). Returns: ``(b, d_t, h_t, w_t)``."""
        if self.student.layout == "bchw":
            return self.align(self.proj(x))
        if self.student.layout == "bhwc":
            return self.align(self.proj(x).permute(0, 3, 1, 2))
        projected = self.proj(x)  # (b, n, d_t), prefix tokens included
        shape = (*projected.shape[:2], self.teacher.dim)
        return self.align(stage_map(projected, Stage(self.student.name, shape, "bnd", self.student.num_prefix_tokens)))

    def extra_repr(self) -> str:
        return f"{self.student.describe()} -> {self.teacher.describe()}"


def fitnet_loss(regressed: Sequence[Tensor], hints: Sequence[Tensor]) -> Tensor:
    """Sum over stage pairs of the mean squared error ``mean((r(s) - t)^2)``.

    Args:
        regressed: Per pair, the regressed student map ``(b, d_t, h_t, w_t)``.
        hints: Per pair, the teacher map ``(b, d_t, h_t, w_t)`` (detached here).

    Returns:
        Scalar tensor.
    """
    if len(regressed) != len(hints) or not regressed:
        raise ValueError(f"fitnet_loss needs as many student as teacher maps (>= 1), got {len(regressed)} and "
                         f"{len(hints)}")
    total = torch.zeros((), device=regressed[0].device, dtype=_up(regressed[0]).dtype)
    for r, t in zip(regressed, hints, strict=True):
        if r.shape != t.shape:
            raise ValueError(f"regressed student map {tuple(r.shape)} and teacher map {tuple(t.shape)} differ")
        r = _up(r)
        total = total + F.mse_loss(r, _up(t.detach()).to(r.dtype))
    return total


@register_distiller("fitnet")
class FitNet(Distiller):
    """Hint loss on stage pairs + label cross-entropy (``loss.fitnet``).

    Args:
        pairs: ``(student stage, teacher stage)`` pairs.
        weight: Weight of the summed hint losses.
        ce_weight: Weight of the label cross-entropy.
        label_smoothing: Label smoothing of the cross-entropy.
    """

    def __init__(self, pairs: Sequence[tuple[Stage, Stage]], weight: float = 1.0, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        if not pairs:
            raise ValueError("loss.fitnet: no stage pairs")
        super().__init__(Needs(student_stages=tuple(s.name for s, _ in pairs),
                               teacher_stages=tuple(t.name for _, t in pairs), teacher_logits=False,
                               labels=ce_weight > 0))
        self.pairs = list(pairs)
        self.regressors = nn.ModuleList(HintRegressor(s, t) for s, t in pairs)
        self.weight, self.ce_weight, self.label_smoothing = weight, ce_weight, label_smoothing

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> FitNet:
        p = loss.fitnet
        pairs = ctx.pair(p.student_stages, p.teacher_stages, "loss.fitnet.student_stages / teacher_stages")
        return cls(pairs, p.weight, p.ce_weight, loss.label_smoothing)

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        """Needs the hooked stages (and the student logits and labels when ``ce_weight > 0``)."""
        regressed = [reg(inputs.student_feats[s.name]) for reg, (s, _) in zip(self.regressors, self.pairs, strict=True)]
        hints = [stage_map(inputs.teacher_feats[t.name], t) for _, t in self.pairs]
        hint = fitnet_loss(regressed, hints)
        out = {"hint": hint.detach()}
        loss = self.weight * hint
        return self.with_ce(inputs, loss, out)
