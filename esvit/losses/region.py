"""Region-level EsViT loss: each student region token is matched to its most similar
teacher region token (cosine similarity of backbone features) and distilled from it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esvit.losses.center import Center
from esvit.losses.view import cross_entropy_to_targets, teacher_probs


@torch.no_grad()
def match_regions(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Index of the most similar teacher token for every student token.

    Args:
        student_feat: Backbone region features ``(b, n_s, d)``.
        teacher_feat: Backbone region features ``(b, n_t, d)``.

    Returns:
        Long tensor ``(b, n_s)`` of indices into the teacher tokens (no gradient).
    """
    s = F.normalize(student_feat.detach().float(), dim=-1)
    t = F.normalize(teacher_feat.detach().float(), dim=-1)
    return torch.bmm(s, t.transpose(1, 2)).argmax(dim=-1)


class RegionLoss(nn.Module):
    """EsViT region-matching loss over all (teacher global view i, student view v != i) pairs.

    For student view ``v`` and teacher view ``i``:
    ``j*(n) = argmax_j cos(z_s^v[n], z_t^i[j])`` on backbone features ``z``, then
    ``L_vi = mean_b mean_n sum_k -P_t^i[b, j*(n), k] * log P_s^v[b, n, k]`` on the dense
    heads' outputs. The result is the mean of ``L_vi`` over all pairs.

    Args:
        out_dim: Dense projection output dimension ``K``.
        student_temp: Student temperature ``tau_s``.
        center_momentum: EMA momentum of the region centre (separate from the view centre).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center = Center(out_dim, center_momentum)

    def forward(
        self,
        student_out: Sequence[Tensor],
        student_feat: Sequence[Tensor],
        teacher_out: Sequence[Tensor],
        teacher_feat: Sequence[Tensor],
        teacher_temp: float,
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_out: Per student view, dense head outputs ``(b, n_v, K)``; the first
                ``len(teacher_out)`` views are the teacher's global views in the same order.
            student_feat: Per student view, backbone region features ``(b, n_v, d)``.
            teacher_out: Per teacher view, dense head outputs ``(b, n_t, K)``.
            teacher_feat: Per teacher view, backbone region features ``(b, n_t, d)``.
            teacher_temp: Current teacher temperature.

        Returns:
            Scalar loss (float32).
        """
        n_t, n_s = len(teacher_out), len(student_out)
        if len(student_feat) != n_s or len(teacher_feat) != n_t:
            raise ValueError("student/teacher outputs and features must have one entry per view")
        if n_t < 1 or n_s < 2 or n_s < n_t:
            raise ValueError(f"need >=1 teacher view and >=2 student views (>= teacher views), got {n_t}, {n_s}")
        center = self.center.center
        q = [teacher_probs(t, center, teacher_temp) for t in teacher_out]
        total = student_out[0].new_zeros((), dtype=torch.float32)
        for v, (s_out, s_feat) in enumerate(zip(student_out, student_feat, strict=True)):
            # sum over the other teacher views of the matched teacher token distributions
            target, m = None, 0
            for i in range(n_t):
                if i == v:
                    continue
                idx = match_regions(s_feat, teacher_feat[i])  # (b, n_v)
                matched = torch.gather(q[i], 1, idx.unsqueeze(-1).expand(-1, -1, q[i].shape[-1]))
                target = matched if target is None else target.add_(matched)
                m += 1
            if m > 0:
                total = total + cross_entropy_to_targets(s_out, target, self.student_temp).mean()
        return total / (n_t * (n_s - 1))

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[Tensor]) -> None:
        """Update the region centre with every teacher region token of all global views."""
        self.center.update(torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher_out]))
