"""Region-level EsViT loss: each student region token is matched to its most similar
teacher region token (cosine similarity of backbone features) and distilled from it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esvit.losses.center import Center
from esvit.losses.cross_entropy import paired_cross_entropy, teacher_probs


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


@torch.no_grad()
def match_share(matches: Tensor, n_teacher: int) -> Tensor:
    """Share of an image's student tokens matched to its single most matched teacher token.

    ``1 / n_s``-ish when the matches spread over the teacher tokens, 1 when every student token
    is matched to the same teacher token (a hub: the region task then degenerates into
    predicting one token's output from every token).

    Args:
        matches: ``(b, n_s)`` teacher token index of every student token (:func:`match_regions`).
        n_teacher: Number of teacher tokens ``n_t``.

    Returns:
        ``(b,)`` float32 shares in ``[1 / n_s, 1]``.
    """
    b, n_s = matches.shape
    counts = torch.zeros(b, n_teacher, device=matches.device)
    counts.scatter_add_(1, matches, torch.ones(b, n_s, device=matches.device))
    return counts.amax(dim=1) / n_s


def flatten_tokens(out: Tensor | Sequence[Tensor], feats: Sequence[Tensor]) -> Tensor:
    """Region outputs as one ``(sum_v b * n_v, K)`` tensor in view order (no copy if already flat)."""
    rows = sum(f.shape[0] * f.shape[1] for f in feats)
    if isinstance(out, Tensor):
        if out.ndim != 2 or out.shape[0] != rows:
            raise ValueError(f"flat region outputs must be ({rows}, K) for the given features, got {tuple(out.shape)}")
        return out
    for v, (o, f) in enumerate(zip(out, feats, strict=True)):
        if o.shape[:2] != f.shape[:2]:
            raise ValueError(f"view {v}: region outputs {tuple(o.shape)} and features {tuple(f.shape)} disagree")
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in out])


class RegionLoss(nn.Module):
    """EsViT region-matching loss over all (teacher global view i, student view v != i) pairs.

    For student view ``v`` and teacher view ``i``:
    ``j*(n) = argmax_j cos(z_s^v[n], z_t^i[j])`` on backbone features ``z``, then
    ``L_vi = mean_b mean_n sum_k -P_t^i[b, j*(n), k] * log P_s^v[b, n, k]`` on the dense
    heads' outputs. The result is the mean of ``L_vi`` over all pairs. The matched teacher
    rows are looked up by index inside :func:`paired_cross_entropy`, never gathered into
    ``(b, n_v, K)`` tensors.

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
        student_out: Tensor | Sequence[Tensor],
        student_feat: Sequence[Tensor],
        teacher_out: Tensor | Sequence[Tensor],
        teacher_feat: Sequence[Tensor],
        teacher_temp: float,
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_out: Dense head outputs, one ``(b, n_v, K)`` tensor per student view, or
                all of them flattened and concatenated in view order, ``(sum_v b * n_v, K)``
                (what :class:`~esvit.model.EsViTModel` returns; avoids a copy). The first
                ``len(teacher_feat)`` views are the teacher's global views in the same order.
            student_feat: Per student view, backbone region features ``(b, n_v, d)``.
            teacher_out: Teacher dense outputs, ``(b, n_t, K)`` per view or flattened likewise.
            teacher_feat: Per teacher view, backbone region features ``(b, n_t, d)``.
            teacher_temp: Current teacher temperature.

        Inputs of any float dtype are read into float32 (blocks of rows for the outputs):
        matching, centring, both softmaxes and the cross-entropy run in float32 whatever the
        ambient autocast.

        Returns:
            Scalar loss (float32).
        """
        n_t, n_s = len(teacher_feat), len(student_feat)
        if not isinstance(student_out, Tensor) and len(student_out) != n_s:
            raise ValueError(f"got {len(student_out)} student outputs for {n_s} student feature views")
        if not isinstance(teacher_out, Tensor) and len(teacher_out) != n_t:
            raise ValueError(f"got {len(teacher_out)} teacher outputs for {n_t} teacher feature views")
        if n_t < 1 or n_s < 2 or n_s < n_t:
            raise ValueError(f"need >=1 teacher view and >=2 student views (>= teacher views), got {n_t}, {n_s}")
        s = flatten_tokens(student_out, student_feat)
        t = flatten_tokens(teacher_out, teacher_feat)
        q = teacher_probs(t, self.center.center, teacher_temp)
        index, weight = self._pairs(student_feat, teacher_feat)
        return paired_cross_entropy(s, q, index, weight, self.student_temp)

    @staticmethod
    @torch.no_grad()
    def _pairs(student_feat: Sequence[Tensor], teacher_feat: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Matched teacher row and pair weight for every student token and teacher view.

        Returns:
            ``index`` (long) and ``weight`` (float32), ``(sum_v b * n_v, n_t)``; the pair of a
            student view with its own global view has weight 0.
        """
        n_t, n_s = len(teacher_feat), len(student_feat)
        n_pairs = n_t * (n_s - 1)
        t_offsets = [0]
        for f in teacher_feat:
            t_offsets.append(t_offsets[-1] + f.shape[0] * f.shape[1])
        index, weight = [], []
        for v, s_feat in enumerate(student_feat):
            b, n_v = s_feat.shape[:2]
            cols, wcols = [], []
            for i, t_feat in enumerate(teacher_feat):
                if i == v:
                    cols.append(torch.zeros(b * n_v, dtype=torch.long, device=s_feat.device))
                    wcols.append(torch.zeros(b * n_v, device=s_feat.device))
                    continue
                n_ti = t_feat.shape[1]
                rows = torch.arange(b, device=s_feat.device)[:, None] * n_ti + match_regions(s_feat, t_feat)
                cols.append((t_offsets[i] + rows).reshape(-1))
                wcols.append(torch.full((b * n_v,), 1.0 / (b * n_v * n_pairs), device=s_feat.device))
            index.append(torch.stack(cols, dim=1))
            weight.append(torch.stack(wcols, dim=1))
        return torch.cat(index), torch.cat(weight)

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor | Sequence[Tensor]) -> None:
        """Update the region centre with every teacher region token of all global views."""
        if isinstance(teacher_out, Tensor):
            self.center.update(teacher_out)
        else:
            self.center.update(torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher_out]))
