"""View-level DINO loss: cross-entropy between teacher and student views of the image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from esvit.losses.center import Center
from esvit.losses.cross_entropy import paired_cross_entropy, teacher_probs


def stack_views(views: Tensor | Sequence[Tensor]) -> Tensor:
    """Views as one ``(n_views, b, K)`` tensor: a stacked tensor is returned as is (no copy)."""
    if isinstance(views, Tensor):
        if views.ndim != 3:
            raise ValueError(f"stacked views must be (n_views, b, K), got {tuple(views.shape)}")
        return views
    if len(views) == 0:
        return torch.empty(0, 0, 0)
    return torch.stack(list(views))


def view_pairs(n_student: int, n_teacher: int, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Index and weight of every (teacher view i, student view v != i) pair, per student row.

    Student row ``v * b + n`` is compared with teacher rows ``i * b + n`` for ``i != v``; each
    pair weighs ``1 / (b * n_pairs)``, so the loss is the mean over pairs of the batch mean.

    Returns:
        ``index`` (long) and ``weight`` (float32), both ``(n_student * b, n_teacher)``.
    """
    v = torch.arange(n_student, device=device).repeat_interleave(batch)  # student view of each row
    n = torch.arange(batch, device=device).repeat(n_student)  # sample of each row
    i = torch.arange(n_teacher, device=device)
    index = i[None, :] * batch + n[:, None]
    weight = (v[:, None] != i[None, :]).float() / (batch * n_teacher * (n_student - 1))
    return index, weight


class ViewLoss(nn.Module):
    """DINO view-level loss over all (teacher global view i, student view v != i) pairs.

    ``L = mean_{i, v != i} mean_b  sum_k -P_t^i[b, k] * log P_s^v[b, k]`` with
    ``P_t = softmax((t - center) / tau_t)`` and ``log P_s = log_softmax(s / tau_s)``, computed
    block by block without ``(n_pairs, b, K)`` temporaries (:func:`paired_cross_entropy`).

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
        self,
        student_out: Tensor | Sequence[Tensor],
        teacher_out: Tensor | Sequence[Tensor],
        teacher_temp: float,
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_out: Student views, one ``(b, K)`` tensor per view or all of them stacked
                ``(n_s, b, K)``; the first ``n_t`` are the global views seen by the teacher, in
                the same order.
            teacher_out: Teacher (global) views, ``(b, K)`` each or stacked ``(n_t, b, K)``.
            teacher_temp: Current teacher temperature.

        Inputs of any float dtype are read into float32 blocks: centring, both softmaxes and
        the cross-entropy run in float32 whatever the ambient autocast.

        Returns:
            Scalar loss (float32).
        """
        s, t = stack_views(student_out), stack_views(teacher_out)
        n_s, n_t = s.shape[0], t.shape[0]
        if n_t < 1 or n_s < 2 or n_s < n_t:
            raise ValueError(f"need >=1 teacher view and >=2 student views (>= teacher views), got {n_t}, {n_s}")
        if s.shape[1:] != t.shape[1:]:
            raise ValueError(f"student views {tuple(s.shape[1:])} and teacher views {tuple(t.shape[1:])} differ")
        b, k = s.shape[1], s.shape[2]
        q = teacher_probs(t.reshape(n_t * b, k), self.center.center, teacher_temp)
        index, weight = view_pairs(n_s, n_t, b, s.device)
        return paired_cross_entropy(s.reshape(n_s * b, k), q, index, weight, self.student_temp)

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor | Sequence[Tensor]) -> None:
        """Update the centre with the teacher outputs of all global views."""
        self.center.update(stack_views(teacher_out))
