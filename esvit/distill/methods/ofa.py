"""OFA-KD (Hao et al. 2023): branch exits on student stages, trained in the logit space.

"One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation"
(NeurIPS 2023). Intermediate student features are projected into the logit space, where
architecture-specific information is gone, by *branch exits* (one per chosen student stage);
every exit and the student's own head learn from the teacher's logits with the OFA loss (the
paper's adaptive target enhancement): with ``p^t`` / ``p^s`` the teacher's / student's softmax (temperature ``T``, 1 in the paper) and
``c`` the label,

    L_OFA = - (1 + p^t_c)^eps * log p^s_c  -  sum_{k != c} p^t_k * log p^s_k

(``eps >= 1`` enhances the target when the teacher is confident; ``eps = 1`` is KD plus the label
cross-entropy in cross-entropy form). ``form="official"`` is the released code's variant
(``ofa_loss`` of Hao840/OFAKD): ``- sum_k ((p^t_k + 1[k = c])^eps - 1[k = c]) * log p^s_k``, i.e.
the label term's constant 1 removed from the target weight (the official script adds a separate
label cross-entropy) and ``eps`` applied to the non-target probabilities too. Both reduce to the
same gradient on the student head at ``eps = 1`` when the official form gets ``ce_weight = 1``.

The run's loss: ``ce_weight * CE + logit_weight * L_OFA(head) + branch_weight * sum_exits L_OFA(exit)``
(paper form: ``ce_weight 0``, the label term is inside ``L_OFA``).

Branch exits (``OFABranch``), as in the official code:

* map stage (``bchw``): ``log2(h_stage / h_last)`` depthwise-separable stride-2 blocks (channels
  doubling, the last one to ``max(d_s, d_t)`` of the final stages), or one 1x1 convolution when
  the stage is already at the final resolution; global average pooling; linear to the classes;
* token stage (``bnd``, ``bhwc``): 2x2 patch merging down to a 7x7 grid (none on small grids),
  ``max(n_stages - i, 1)`` transformer blocks (``i``: 1-based stage position) of the student's
  final dimension, the first (CLS) token or the token mean, layer norm, linear to the classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esvit.distill.losses import _check, _up
from esvit.distill.methods.registry import (
    DistillContext,
    Distiller,
    DistillInputs,
    Needs,
    register_distiller,
)
from esvit.distill.methods.stages import Stage, StageError

__all__ = ["OFA", "OFA_FORMS", "OFABranch", "ofa_loss"]

OFA_FORMS = ("paper", "official")


def ofa_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, eps: float = 1.0,
             temperature: float = 1.0, form: str = "paper") -> Tensor:
    """The OFA loss (see the module docstring), averaged over the batch.

    Args:
        student_logits: ``(b, C)`` (a branch exit's or the head's).
        teacher_logits: ``(b, C)`` (detached here).
        target: ``(b,)`` labels.
        eps: Target-enhancement exponent (``>= 1`` in the paper).
        temperature: Softmax temperature of both sides.
        form: ``"paper"`` (the published formula) or ``"official"`` (the released code's variant).

    Returns:
        Scalar tensor.
    """
    if form not in OFA_FORMS:
        raise ValueError(f"form must be one of {OFA_FORMS}, got {form!r}")
    _check(student_logits, teacher_logits, target)
    log_p_s = F.log_softmax(_up(student_logits) / temperature, dim=1)
    p_t = F.softmax(_up(teacher_logits.detach()) / temperature, dim=1).to(log_p_s.dtype)
    mask = F.one_hot(target, student_logits.shape[1]).to(log_p_s.dtype)
    if form == "paper":
        weight = mask * (1 + p_t) ** eps + (1 - mask) * p_t
    else:
        weight = (p_t + mask) ** eps - mask
    return -(weight * log_p_s).sum(dim=1).mean()


class _SepConv(nn.Module):
    """Depthwise-separable stride-2 block (the official ``SepConv``): dw3x3/2, pw1x1, BN, ReLU,
    dw3x3, pw1x1, BN, ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class _PatchMerging(nn.Module):
    """2x2 patch merging of a ``(b, h, w, d)`` grid to ``(b, h/2, w/2, d_out)`` (Swin's)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class OFABranch(nn.Module):
    """Branch exit: a student stage output -> logits ``(b, num_classes)``.

    Args:
        stage: The student stage.
        last: The student's final stage (its resolution and dimension).
        teacher_dim: The teacher's final feature dimension.
        num_classes: Classes.
        position: 1-based position of the stage among the ``n_stages`` exits.
        n_stages: Number of exits.
        final_grid: Token grids are merged down to this side (7, as in the paper).
    """

    def __init__(self, stage: Stage, last: Stage, teacher_dim: int, num_classes: int, position: int = 1,
                 n_stages: int = 4, final_grid: int = 7) -> None:
        super().__init__()
        self.stage = stage
        if stage.layout == "bchw":
            g, g_last = stage.grid, last.grid
            assert g is not None
            side_last = g_last[0] if g_last else 1
            n_down = max(round(math.log2(max(g[0], 1) / max(side_last, 1))), 0)
            width = max(last.dim, teacher_dim)
            blocks: list[nn.Module] = []
            c = stage.dim
            for i in range(n_down):
                out = width if i == n_down - 1 else c * 2
                blocks.append(_SepConv(c, out))
                c = out
            if not blocks:
                blocks = [nn.Conv2d(c, width, 1)]
            self.body: nn.Module = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(width, num_classes)
        else:
            dim = last.dim
            grid = stage.grid
            merges = max(int(math.log2(grid[0] / final_grid)), 0) if grid else 0
            self.merges = nn.ModuleList()
            d = stage.dim
            for _ in range(merges):
                self.merges.append(_PatchMerging(d, dim))
                d = dim
            self.proj = nn.Linear(d, dim) if d != dim else nn.Identity()
            self.prefix_proj = nn.Linear(stage.dim, dim) if merges and stage.num_prefix_tokens and stage.dim != dim \
                else nn.Identity()
            heads = 4 if dim % 4 == 0 else 1
            depth = max(n_stages - position, 1)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True) for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, num_classes)
        self.apply(_init)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: the stage output (its layout). Returns: logits ``(b, num_classes)``."""
        if self.stage.layout == "bchw":
            return self.head(self.body(x))
        p = self.stage.num_prefix_tokens if self.stage.layout == "bnd" else 0
        prefix: Tensor | None = None
        if self.stage.layout == "bhwc":
            grid_x: Tensor | None = x
        else:
            g = self.stage.grid
            prefix, regions = x[:, :p], x[:, p:]
            grid_x = regions.reshape(regions.shape[0], g[0], g[1], -1) if g else None
        if len(self.merges) and grid_x is not None:
            for m in self.merges:
                grid_x = m(grid_x)
            tokens = grid_x.flatten(1, 2)
            if prefix is not None and prefix.shape[1]:
                tokens = torch.cat([self.prefix_proj(prefix), tokens], dim=1)
        else:
            tokens = x.flatten(1, 2) if self.stage.layout == "bhwc" else x
        tokens = self.proj(tokens)
        for blk in self.blocks:
            tokens = blk(tokens)
        pooled = tokens[:, 0] if p else tokens.mean(dim=1)
        return self.head(self.norm(pooled))


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@register_distiller("ofa")
class OFA(Distiller):
    """OFA-KD: branch exits on student stages + the OFA loss on every exit and the head (``loss.ofa``).

    Args:
        stages: Student stages that get a branch exit.
        last: The student's final stage.
        teacher_dim: The teacher's final feature dimension.
        num_classes: Classes.
        eps: ``eps`` of every exit and the head (one value, or one per exit then the head).
        temperature: Softmax temperature.
        form: ``"paper"`` or ``"official"``.
        branch_weight: Weight of the summed exit losses.
        logit_weight: Weight of the head's OFA loss.
        ce_weight: Weight of a separate label cross-entropy.
        label_smoothing: Its label smoothing.
    """

    def __init__(self, stages: Sequence[Stage], last: Stage, teacher_dim: int, num_classes: int,
                 eps: float | Sequence[float] = 1.0, temperature: float = 1.0, form: str = "paper",
                 branch_weight: float = 1.0, logit_weight: float = 1.0, ce_weight: float = 0.0,
                 label_smoothing: float = 0.0) -> None:
        if form not in OFA_FORMS:
            raise ValueError(f"loss.ofa.form must be one of {OFA_FORMS}, got {form!r}")
        if not stages:
            raise StageError("loss.ofa.stages: no student stage to attach a branch exit to")
        super().__init__(Needs(student_stages=tuple(s.name for s in stages)))
        eps_list = [float(eps)] * (len(stages) + 1) if isinstance(eps, (int, float)) else [float(e) for e in eps]
        if len(eps_list) != len(stages) + 1:
            raise ValueError(f"loss.ofa.eps: give one value, or one per exit ({len(stages)}) then one for the head; "
                             f"got {len(eps_list)}")
        self.stages = list(stages)
        self.branches = nn.ModuleList(OFABranch(s, last, teacher_dim, num_classes, i + 1, len(stages))
                                      for i, s in enumerate(stages))
        self.eps, self.temperature, self.form = eps_list, temperature, form
        self.branch_weight, self.logit_weight, self.ce_weight = branch_weight, logit_weight, ce_weight
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> OFA:
        p = loss.ofa
        stages = ctx.pick("student", p.stages, "loss.ofa.stages")
        last = ctx.final("student", None, "loss.ofa.stages")
        t_last = ctx.final("teacher", None, "loss.ofa")
        return cls(stages, last, t_last.dim, ctx.num_classes, p.eps, p.temperature, p.form, p.branch_weight,
                   p.logit_weight, p.ce_weight, loss.label_smoothing)

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        """Needs the hooked stages, the student and teacher logits and the labels."""
        inputs.require(teacher_logits=inputs.teacher_logits, labels=inputs.labels)
        assert inputs.teacher_logits is not None and inputs.labels is not None
        t, y = inputs.teacher_logits, inputs.labels
        exits = [ofa_loss(b(inputs.student_feats[s.name]), t, y, e, self.temperature, self.form)
                 for b, s, e in zip(self.branches, self.stages, self.eps, strict=False)]
        branch = torch.stack(exits).sum()
        logits = inputs.logits()
        head = ofa_loss(logits, t, y, self.eps[-1], self.temperature, self.form)
        loss = self.branch_weight * branch + self.logit_weight * head
        out = {"ofa_branches": branch.detach(), "ofa_head": head.detach()}
        return self.with_ce(inputs, loss, out)
