"""CRD: contrastive representation distillation (Tian et al. 2020), as RepDistiller implements it.

"Contrastive Representation Distillation" (ICLR 2020), its NCE objective. Student and teacher features
(pooled outputs of one stage each) go through linear embedding heads and are L2-normalised:
``f_s = g_s(s) / ||g_s(s)||``, ``f_t = g_t(t) / ||g_t(t)||`` (dimension ``feat_dim``). Two memory
banks of ``N`` (training-set size) unit vectors, ``M_s`` (student side) and ``M_t`` (teacher
side), hold a momentum average of each image's past embeddings. For image ``i`` of the batch and
``K`` negatives ``j_1..j_K`` drawn uniformly from the data set:

    P(i, j) = exp(<M_t[j], f_s(i)> / tau) / Z_s      (student anchor, teacher-bank candidates)
    Q(i, j) = exp(<M_s[j], f_t(i)> / tau) / Z_t      (teacher anchor, student-bank candidates)

with ``Z`` fixed at the first step to ``N * mean`` of that step's exponentials (RepDistiller). The
NCE critic ``h = P / (P + K / N)`` (the probability that a pair comes from the data, not
the noise distribution ``1 / N``) gives, per side,

    L_nce = - 1/b * sum_i [ log h(i, i) + sum_k log(1 - h(i, j_k)) ]

(position 0 of each row is the positive ``j_0 = i``), and ``L_CRD = L_nce(P) + L_nce(Q)``; the
run's loss is ``ce_weight * CE + weight * L_CRD`` (RepDistiller: ``beta = 0.8``). After the scores,
both banks move towards the batch: ``M[i] <- normalise(m * M[i] + (1 - m) * f(i))`` (``m = 0.5``).
Defaults as RepDistiller: ``feat_dim 128, K 16384, tau 0.07, m 0.5``.

Resuming exactly: the banks, the ``Z`` constants and the state of the negative sampler's
``torch.Generator`` (CPU) are all in :meth:`ContrastMemory.state_dict`. Under DDP the banks are
updated with the embeddings of every rank (all-gather), so they stay identical across ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
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
from esvit.distill.methods.stages import Stage, stage_tokens

__all__ = ["CRD", "CRDLoss", "ContrastMemory", "Embed", "nce_loss"]


class Embed(nn.Module):
    """Linear embedding head followed by L2 normalisation.

    Args:
        dim_in: Input feature dimension (a pooled stage feature; any trailing shape is flattened).
        dim_out: Embedding dimension.
    """

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(b, dim_in)``. Returns: ``(b, dim_out)`` unit vectors."""
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), dim=1)


def nce_loss(scores: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    """NCE loss of CRD (RepDistiller's ``ContrastLoss``).

    Args:
        scores: ``(b, K + 1)`` normalised scores ``P``; column 0 is the positive pair.
        num_data: ``N``, the size of the data set (noise distribution ``1 / N``).
        eps: Added to the denominators (RepDistiller's ``1e-7``).

    Returns:
        ``- (sum_i log(P_i0 / (P_i0 + K/N)) + sum_ik log((K/N) / (P_ik + K/N))) / b``.
    """
    b, k1 = scores.shape
    m = k1 - 1
    noise = m / float(num_data)
    pos = scores[:, 0]
    neg = scores[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + eps))
    log_d0 = torch.log(noise / (neg + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / b


class ContrastMemory(nn.Module):
    """Momentum memory banks of both sides and the sampling of negatives.

    Args:
        feat_dim: Embedding dimension.
        num_data: ``N``: one slot per training image.
        num_negatives: ``K`` negatives per anchor.
        temperature: ``tau``.
        momentum: ``m`` of the bank update.
        seed: Seed of the bank initialisation and of the negative sampler (a CPU
            ``torch.Generator`` whose state is part of the state dict).

    Raises:
        ValueError: ``K`` is not below ``N`` (more negatives than other images).
    """

    def __init__(self, feat_dim: int, num_data: int, num_negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if num_negatives >= num_data:
            raise ValueError(f"loss.crd.num_negatives: the memory bank draws {num_negatives} negatives per image but "
                             f"the training set has {num_data} images; lower it below {num_data}")
        if num_negatives < 1:
            raise ValueError(f"loss.crd.num_negatives must be >= 1, got {num_negatives}")
        self.num_data, self.num_negatives = int(num_data), int(num_negatives)
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.generator = torch.Generator().manual_seed(int(seed))
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        init = (torch.rand(2, num_data, feat_dim, generator=self.generator) * 2 - 1) * stdv
        self.register_buffer("memory_s", init[0].contiguous())
        self.register_buffer("memory_t", init[1].contiguous())
        self.register_buffer("z", torch.full((2,), -1.0, dtype=torch.float64))  # Z_s, Z_t (-1: not set)

    def get_extra_state(self) -> dict[str, Any]:
        """The sampler's generator state (saved in the state dict: a resume draws the same negatives)."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the sampler's generator state."""
        self.generator.set_state(state["generator"])

    def sample(self, index: Tensor) -> Tensor:
        """``(b, K + 1)`` bank indices: column 0 the images themselves, then ``K`` uniform draws."""
        b = index.shape[0]
        neg = torch.randint(0, self.num_data, (b, self.num_negatives), generator=self.generator)
        return torch.cat([index.detach().cpu().view(b, 1), neg], dim=1).to(self.memory_s.device)

    def forward(self, f_s: Tensor, f_t: Tensor, index: Tensor, contrast_index: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """Scores of both anchors, then the bank update.

        Args:
            f_s: ``(b, feat_dim)`` student embeddings (unit norm).
            f_t: ``(b, feat_dim)`` teacher embeddings (unit norm).
            index: ``(b,)`` positions of the images in the training split.
            contrast_index: ``(b, K + 1)`` bank indices (default: :meth:`sample`).

        Returns:
            ``(P (b, K + 1), Q (b, K + 1))``: normalised scores of the student anchor against the
            teacher bank and of the teacher anchor against the student bank.
        """
        if index.min() < 0 or index.max() >= self.num_data:
            raise IndexError(f"CRD: image positions must be in [0, {self.num_data}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        idx = self.sample(index) if contrast_index is None else contrast_index.to(self.memory_s.device)
        b, k1 = idx.shape
        f_s32, f_t32 = f_s.to(self.memory_s.dtype), f_t.to(self.memory_s.dtype)  # banks stay float32 under AMP
        w_t = self.memory_t.index_select(0, idx.view(-1)).view(b, k1, -1)
        w_s = self.memory_s.index_select(0, idx.view(-1)).view(b, k1, -1)
        p = torch.exp(torch.bmm(w_t, f_s32.unsqueeze(2)).squeeze(2) / self.temperature)
        q = torch.exp(torch.bmm(w_s, f_t32.unsqueeze(2)).squeeze(2) / self.temperature)
        if self.z[0] < 0:
            with torch.no_grad():
                z = torch.stack([p.mean(), q.mean()]).double() * self.num_data
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(z)
                    z /= dist.get_world_size()
                self.z.copy_(z)
        p = p / self.z[0].to(p.dtype)
        q = q / self.z[1].to(q.dtype)
        self._update(f_s32.detach(), f_t32.detach(), index)
        return p, q

    @torch.no_grad()
    def _update(self, f_s: Tensor, f_t: Tensor, index: Tensor) -> None:
        index = index.to(self.memory_s.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            f_s, f_t, index = (_all_gather(t) for t in (f_s, f_t, index))
        for bank, f in ((self.memory_s, f_s), (self.memory_t, f_t)):
            pos = bank.index_select(0, index) * self.momentum + f * (1 - self.momentum)
            bank.index_copy_(0, index, F.normalize(pos, dim=1))

    def extra_repr(self) -> str:
        return (f"num_data={self.num_data}, num_negatives={self.num_negatives}, temperature={self.temperature}, "
                f"momentum={self.momentum}")


def _all_gather(t: Tensor) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class CRDLoss(nn.Module):
    """``L_CRD``: embedding heads, memory banks and the two NCE losses (RepDistiller's ``CRDLoss``).

    Args:
        s_dim: Student feature dimension.
        t_dim: Teacher feature dimension.
        num_data: Training-set size ``N``.
        feat_dim: Embedding dimension.
        num_negatives: ``K``.
        temperature: ``tau``.
        momentum: Bank momentum ``m``.
        seed: Seed of the banks and the negative sampler.
    """

    def __init__(self, s_dim: int, t_dim: int, num_data: int, feat_dim: int = 128, num_negatives: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, num_data, num_negatives, temperature, momentum, seed)

    def forward(self, f_s: Tensor, f_t: Tensor, index: Tensor, contrast_index: Tensor | None = None
                ) -> dict[str, Tensor]:
        """Args: student ``(b, s_dim)``, teacher ``(b, t_dim)`` (detached here) features, positions ``(b,)``.

        Returns:
            ``{"loss": L_s + L_t, "nce_s", "nce_t"}``.
        """
        e_s = self.embed_s(_up(f_s))
        e_t = self.embed_t(_up(f_t.detach()))
        with torch.autocast(e_s.device.type, enabled=False):  # exp(score / 0.07) needs float32
            p, q = self.contrast(e_s.float(), e_t.float(), index, contrast_index)
            n = self.contrast.num_data
            nce_s, nce_t = nce_loss(p, n), nce_loss(q, n)
        return {"loss": nce_s + nce_t, "nce_s": nce_s.detach(), "nce_t": nce_t.detach()}


@register_distiller("crd")
class CRD(Distiller):
    """CRD on one student and one teacher stage (pooled) + label cross-entropy (``loss.crd``).

    Args:
        student: Student stage (pooled: CLS token or region mean).
        teacher: Teacher stage.
        num_data: Training-set size.
        feat_dim, num_negatives, temperature, momentum, seed: see :class:`CRDLoss`.
        weight: Weight of ``L_CRD``.
        ce_weight: Weight of the label cross-entropy.
        label_smoothing: Label smoothing of the cross-entropy.
    """

    def __init__(self, student: Stage, teacher: Stage, num_data: int, feat_dim: int = 128,
                 num_negatives: int = 16384, temperature: float = 0.07, momentum: float = 0.5, weight: float = 0.8,
                 ce_weight: float = 1.0, label_smoothing: float = 0.0, seed: int = 0) -> None:
        super().__init__(Needs(student_stages=(student.name,), teacher_stages=(teacher.name,), teacher_logits=False,
                               labels=ce_weight > 0, index=True))
        self.student_stage, self.teacher_stage = student, teacher
        self.criterion = CRDLoss(student.dim, teacher.dim, num_data, feat_dim, num_negatives, temperature, momentum,
                                 seed)
        self.weight, self.ce_weight, self.label_smoothing = weight, ce_weight, label_smoothing

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> CRD:
        p = loss.crd
        what = "loss.crd.student_stage / teacher_stage"
        s = ctx.final("student", p.student_stage, what)
        t = ctx.final("teacher", p.teacher_stage, what)
        return cls(s, t, ctx.num_data, p.feat_dim, p.num_negatives, p.temperature, p.momentum, p.weight, p.ce_weight,
                   loss.label_smoothing, ctx.seed)

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        """Needs both hooked stages and the images' positions (and labels when ``ce_weight > 0``)."""
        inputs.require(index=inputs.index)
        assert inputs.index is not None
        f_s, _ = stage_tokens(inputs.student_feats[self.student_stage.name], self.student_stage)
        f_t, _ = stage_tokens(inputs.teacher_feats[self.teacher_stage.name], self.teacher_stage)
        parts = self.criterion(f_s, f_t, inputs.index)
        loss = self.weight * parts["loss"]
        out = {"crd": parts["loss"].detach(), "nce_s": parts["nce_s"], "nce_t": parts["nce_t"]}
        return self.with_ce(inputs, loss, out)
