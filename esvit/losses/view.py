"""View-level DINO loss: cross-entropy between teacher and student views of the image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esvit.losses.center import Center


def teacher_probs(teacher_output: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Centred, sharpened teacher distribution ``softmax((t - c) / tau_t)`` in float32.

    Args:
        teacher_output: Tensor of shape ``(..., K)``.
        center: Tensor broadcastable to ``teacher_output`` (usually ``(1, K)``).
        teacher_temp: Teacher temperature ``tau_t``.

    Returns:
        Probabilities of shape ``(..., K)``, detached.
    """
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be positive, got {teacher_temp}")
    t = (teacher_output.detach().float() - center.float()) / teacher_temp
    return F.softmax(t, dim=-1)


def student_log_probs(student_output: Tensor, student_temp: float) -> Tensor:
    """Student log-distribution ``log_softmax(s / tau_s)`` computed in float32 (stable)."""
    return F.log_softmax(student_output.float() / student_temp, dim=-1)


class ViewLoss(nn.Module):
    """DINO view-level loss over all (teacher global view i, student view v != i) pairs.

    ``L = mean_{i, v != i} mean_b  sum_k -P_t^i[b, k] * log P_s^v[b, k]`` with
    ``P_t = softmax((t - center) / tau_t)`` and ``log P_s = log_softmax(s / tau_s)``.

    The module is pure apart from its EMA centre: the temperature is passed in, and the centre
    is only changed by an explicit :meth:`update_center` call.

    Args:
        out_dim: Projection output dimension ``K``.
        student_temp: Student temperature ``tau_s``.
        center_momentum: EMA momentum of the centre.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center = Center(out_dim, center_momentum)

    def forward(
        self, student_out: Sequence[Tensor], teacher_out: Sequence[Tensor], teacher_temp: float
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_out: One ``(b, K)`` tensor per student view; the first ``len(teacher_out)``
                are the global views seen by the teacher, in the same order.
            teacher_out: One ``(b, K)`` tensor per teacher (global) view.
            teacher_temp: Current teacher temperature.

        Returns:
            Scalar loss (float32).
        """
        n_t, n_s = len(teacher_out), len(student_out)
        if n_t < 1 or n_s < 2 or n_s < n_t:
            raise ValueError(f"need >=1 teacher view and >=2 student views (>= teacher views), got {n_t}, {n_s}")
        center = self.center.center
        log_p = [student_log_probs(s, self.student_temp) for s in student_out]
        # sum over all student views once, then remove the matching view for each teacher view
        log_p_sum = torch.stack(log_p).sum(dim=0)
        total = student_out[0].new_zeros((), dtype=torch.float32)
        for i, t in enumerate(teacher_out):
            q = teacher_probs(t, center, teacher_temp)
            total = total - (q * (log_p_sum - log_p[i])).sum(dim=-1).mean()
        return total / (n_t * (n_s - 1))

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[Tensor]) -> None:
        """Update the centre with the teacher outputs of all global views."""
        self.center.update(torch.cat(list(teacher_out)))
