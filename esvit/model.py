"""EsViTModel: a backbone (through :class:`NetWrapper`) plus the view and region heads.

The student and the EMA teacher are two instances of this module with identical structure. The
teacher is made deterministic (:meth:`EsViTModel.make_deterministic`): no dropout and no
stochastic depth, as the official teacher is built with drop-path 0, while its BatchNorm layers
still normalise with batch statistics in train mode, as there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torchvision.ops import StochasticDepth

from esvit.heads import DINOHead
from esvit.wrapper import NetWrapper


class ModelOutput(TypedDict):
    """Per-view outputs of :class:`EsViTModel`, views in input order (a plain dict, so DDP
    can traverse it).

    Keys:
        view_out: Per view, view-head output ``(b, K)``.
        view_stack: All view-head outputs as one ``(n_views, b, K)`` tensor (the storage the
            ``view_out`` entries are views of; losses take it to avoid copies).
        region_out: Per view, region-head output ``(b, n_v, K)`` (empty if no region head).
        region_flat: All region-head outputs ``(sum_v b * n_v, K)`` in view order (None if no
            region head); ``region_out`` entries are views of it.
        region_feat: Per view, backbone region tokens ``(b, n_v, d)``.
        pooled: Per view, pooled backbone feature ``(b, d)``.
    """

    view_out: list[Tensor]
    view_stack: Tensor
    region_out: list[Tensor]
    region_flat: Tensor | None
    region_feat: list[Tensor]
    pooled: list[Tensor]


#: Float attributes that hold a dropout / drop-path rate read at forward time: ``drop_prob``
#: (timm / official ``DropPath``), ``dropout`` (``nn.MultiheadAttention``; torchvision Swin's
#: ``ShiftedWindowAttention``), ``attention_dropout`` (torchvision Swin), ``drop_path_prob``.
RATE_ATTRIBUTES = ("drop_prob", "drop_path_prob", "dropout", "attention_dropout")


def zero_stochastic_rates(module: nn.Module) -> int:
    """Set every dropout and stochastic-depth rate inside ``module`` to 0.

    Covers ``nn.Dropout*`` and torchvision ``StochasticDepth`` (``.p``) and the float rate
    attributes of :data:`RATE_ATTRIBUTES` (timm-style ``DropPath.drop_prob``,
    ``nn.MultiheadAttention.dropout``, ...). Parameters and buffers are untouched.

    Returns:
        How many rates were non-zero before.
    """
    changed = 0
    for m in module.modules():
        if isinstance(m, (_DropoutNd, StochasticDepth)):
            changed += m.p != 0
            m.p = 0.0
        for attr in RATE_ATTRIBUTES:
            value = getattr(m, attr, None)
            if isinstance(value, float):
                changed += value != 0
                setattr(m, attr, 0.0)
    return int(changed)


def group_by_resolution(crops: Sequence[Tensor]) -> list[tuple[int, int]]:
    """Split crop indices into runs of consecutive crops with the same shape.

    Returns:
        List of ``(start, end)`` index ranges (end exclusive).
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape != crops[start].shape:
            groups.append((start, i))
            start = i
    return groups


class EsViTModel(nn.Module):
    """Backbone wrapper with a view-level and a region-level DINO head.

    Args:
        wrapper: :class:`NetWrapper` around the backbone.
        view_head: Head applied to the pooled feature ``(b, d) -> (b, K)``.
        region_head: Head applied to every region token ``(b, n, d) -> (b, n, K)``, or None
            to train the view loss only (plain DINO).
    """

    def __init__(
        self, wrapper: NetWrapper, view_head: nn.Module, region_head: nn.Module | None, channels_last: bool = False
    ) -> None:
        super().__init__()
        self.backbone = wrapper
        self.view_head = view_head
        self.region_head = region_head
        self.channels_last = channels_last
        self.deterministic = False
        if channels_last:  # NHWC convolutions are faster with oneDNN (CPU) and cuDNN under AMP
            wrapper.to(memory_format=torch.channels_last)

    def make_deterministic(self) -> EsViTModel:
        """Make the forward a function of the input batch alone (the EMA teacher's setting).

        Zeroes every dropout / stochastic-depth rate (:func:`zero_stochastic_rates`), and from now
        on :meth:`train` keeps every submodule except normalisation layers (``_NormBase``:
        BatchNorm, SyncBatchNorm, InstanceNorm) in eval mode, so that randomness a module draws
        only while ``training`` (in backbones registered by users too) stays off. In train mode
        BatchNorm still normalises with the statistics of the batch and updates its running
        statistics, as the official teacher does. Both survive ``load_state_dict``, SyncBatchNorm
        conversion and repeated ``train()`` / ``eval()`` calls.

        Returns:
            ``self``.
        """
        zero_stochastic_rates(self)
        self.deterministic = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> EsViTModel:
        """Set the training mode; see :meth:`make_deterministic` for the teacher's exception."""
        super().train(mode)
        if self.deterministic and mode:
            for m in self.modules():
                if m is not self and not isinstance(m, _NormBase):
                    m.training = False
        return self

    @classmethod
    def build(
        cls,
        wrapper: NetWrapper,
        probe_size: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        region: bool = True,
        channels_last: bool = False,
        region_out_dim: int | None = None,
        region_use_bn: bool | None = None,
    ) -> EsViTModel:
        """Build the heads eagerly from a shape probe of the backbone at ``probe_size`` pixels.

        ``region_out_dim`` / ``region_use_bn`` set the region head's output dim and BatchNorm
        (None: the view head's ``out_dim`` / ``use_bn``, one setting for both heads as in the
        official code; :class:`~esvit.trainer.EsViTTrainer` passes its own, off by default).
        """
        dim, _ = wrapper.probe(probe_size)

        def head(k: int, bn: bool) -> DINOHead:
            return DINOHead(dim, k, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                            use_bn=bn, norm_last_layer=norm_last_layer)

        region_head = None
        if region:
            region_head = head(region_out_dim or out_dim, use_bn if region_use_bn is None else region_use_bn)
        return cls(wrapper, head(out_dim, use_bn), region_head, channels_last=channels_last)

    def forward(self, crops: Sequence[Tensor]) -> ModelOutput:
        """Run the backbone once per crop resolution and the heads once over all views.

        Args:
            crops: Views ``(b, 3, h_v, w_v)``; consecutive views of equal size are batched.

        Returns:
            :class:`ModelOutput` with one entry per view.
        """
        if len(crops) == 0:
            raise ValueError("EsViTModel needs at least one crop")
        b = crops[0].shape[0]
        pooled: list[Tensor] = []
        feats: list[Tensor] = []
        for start, end in group_by_resolution(crops):
            x = torch.cat(list(crops[start:end]))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            p, r = self.backbone(x)
            pooled.extend(p.chunk(end - start))
            feats.extend(r.chunk(end - start))
        view_stack = self.view_head(torch.cat(pooled)).reshape(len(crops), b, -1)
        region_out: list[Tensor] = []
        region_flat = None
        if self.region_head is not None:
            sizes = [f.shape[1] for f in feats]
            region_flat = self.region_head(torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]))
            out = region_flat.split([b * n for n in sizes])
            region_out = [o.reshape(b, n, -1) for o, n in zip(out, sizes, strict=True)]
        return {"view_out": list(view_stack.unbind(0)), "view_stack": view_stack, "region_out": region_out,
                "region_flat": region_flat, "region_feat": feats, "pooled": pooled}
