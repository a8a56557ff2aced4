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


def cross_entropy_to_targets(student_output: Tensor, target_sum: Tensor, student_temp: float) -> Tensor:
    """Summed cross-entropy of several teacher distributions against one student output.

    ``sum_j CE(q_j, s) = -<sum_j q_j, log_softmax(s / tau_s)>``: the targets of one student row
    are summed first, so the large ``(..., K)`` student output is read by one fused
    ``log_softmax`` and one dot product however many teacher views it is compared with.

    Args:
        student_output: Student logits ``(..., K)`` (any float dtype; computed in float32).
        target_sum: Sum of the teacher distributions for each row, ``(..., K)``.
        student_temp: Student temperature ``tau_s``.

    Returns:
        Per-row summed cross-entropy ``(...)`` in float32.
    """
    return -(target_sum * student_log_probs(student_output, student_temp)).sum(dim=-1)


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
        q = [teacher_probs(t, center, teacher_temp) for t in teacher_out]
        q_all = torch.stack(q).sum(dim=0) if n_t > 1 else q[0]
        total = student_out[0].new_zeros((), dtype=torch.float32)
        for v, s in enumerate(student_out):
            # every teacher view except the one showing the same crop as student view v
            target, m = (q_all - q[v], n_t - 1) if v < n_t else (q_all, n_t)
            if m > 0:
                total = total + cross_entropy_to_targets(s, target, self.student_temp).mean()
        return total / (n_t * (n_s - 1))

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[Tensor]) -> None:
        """Update the centre with the teacher outputs of all global views."""
        self.center.update(torch.cat(list(teacher_out)))
