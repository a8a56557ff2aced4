"""Student classifiers: any registry backbone + linear head, and the DeiT distillation-token ViT.

:class:`DeiTVisionTransformer` (Touvron et al. 2021) is a :class:`FlexibleVisionTransformer`
with a learned distillation token next to the class token and a second head on it:

* tokens ``[cls, dist, patch_1 .. patch_n]``; the class token and the patches use the ViT's own
  (interpolated) position embeddings, the distillation token its own ``dist_pos_embedding``, so
  any input size that is a multiple of the patch size works;
* ``forward`` in training mode returns ``(cls_logits, dist_logits)``; in eval mode it returns
  ``log((softmax(cls_logits) + softmax(dist_logits)) / 2)``: log-probabilities whose softmax is the
  average of the two heads' softmax outputs (usable as logits, e.g. as a teacher);
* :func:`to_plain_vit_state_dict` drops the distillation token, its position embedding and its
  head: the result loads with ``strict=True`` into ``torchvision.models.VisionTransformer`` (with
  ``num_classes``, head kept) or into our ViT backbone (``keep_head=False``). The class token then
  no longer attends to the distillation token, so outputs change somewhat (re-evaluate it).

:class:`ClassifierModel` is ``head(backbone(x))`` for any backbone of the registry (its forward
returns the pooled feature: CLS token for ViTs, average pool for CNN/Swin).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VisionTransformer

from esvit.backbones import FlexibleVisionTransformer, build_backbone, list_backbones
from esvit.backbones.vit import interpolate_pos_embedding

__all__ = [
    "ClassifierModel",
    "DeiTVisionTransformer",
    "build_student",
    "deit_from_vit",
    "plain_vit_from_deit",
    "to_plain_vit_state_dict",
    "vit_hyperparameters",
]

_DEIT_ONLY_KEYS = ("dist_token", "dist_pos_embedding")
_DEIT_HEAD_PREFIX = "head_dist."


def vit_hyperparameters(net: VisionTransformer) -> dict[str, Any]:
    """Constructor arguments of a torchvision ``VisionTransformer`` read back from the module."""
    layers = net.encoder.layers
    return dict(
        image_size=net.image_size, patch_size=net.patch_size, num_layers=len(layers),
        num_heads=layers[0].self_attention.num_heads, hidden_dim=net.hidden_dim,
        mlp_dim=net.mlp_dim, dropout=net.dropout, attention_dropout=net.attention_dropout,
    )


class DeiTVisionTransformer(FlexibleVisionTransformer):
    """Variable-resolution ViT with a distillation token and head (DeiT).

    Constructor arguments are those of ``torchvision.models.VisionTransformer`` (``num_classes``
    sets both heads). Parameters beyond torchvision's: ``dist_token`` ``(1, 1, d)``,
    ``dist_pos_embedding`` ``(1, 1, d)`` and ``head_dist`` (``Linear(d, num_classes)``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        d = self.hidden_dim
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_pos_embedding = nn.Parameter(torch.empty(1, 1, d).normal_(std=0.02))
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        self.head_dist = nn.Linear(d, self.num_classes)
        nn.init.trunc_normal_(self.head_dist.weight, std=0.02)
        nn.init.zeros_(self.head_dist.bias)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Final class and distillation tokens.

        Args:
            x: ``(b, 3, h, w)`` images, h and w multiples of the patch size.

        Returns:
            ``(cls (b, d), dist (b, d))`` after the final LayerNorm.
        """
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self._process_input(x)  # (b, n, d); checks the size
        b = tokens.shape[0]
        enc = self.encoder
        pos = interpolate_pos_embedding(enc.pos_embedding, grid, num_prefix_tokens=1)
        cls = (self.class_token + pos[:, :1]).expand(b, -1, -1)
        dist = (self.dist_token + self.dist_pos_embedding).expand(b, -1, -1)
        h = torch.cat([cls, dist, tokens + pos[:, 1:]], dim=1)
        h = enc.ln(enc.layers(enc.dropout(h)))
        return h[:, 0], h[:, 1]

    def forward_heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(cls_logits (b, C), dist_logits (b, C))`` whatever the mode."""
        cls, dist = self.forward_features(x)
        return self.heads(cls), self.head_dist(dist)

    @staticmethod
    def combine(cls_logits: Tensor, dist_logits: Tensor) -> Tensor:
        """``log((softmax(cls) + softmax(dist)) / 2)``: ``(b, C)`` log-probabilities."""
        lp = torch.stack([F.log_softmax(cls_logits.float(), dim=-1),
                          F.log_softmax(dist_logits.float(), dim=-1)])
        return torch.logsumexp(lp, dim=0) - math.log(2.0)

    def predict_proba(self, x: Tensor) -> Tensor:
        """Average of the two heads' softmax outputs ``(b, C)``."""
        return self.combine(*self.forward_heads(x)).exp()

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:  # type: ignore[override]
        """Training mode: ``(cls_logits, dist_logits)``; eval mode: :meth:`combine` of both."""
        cls_logits, dist_logits = self.forward_heads(x)
        if self.training:
            return cls_logits, dist_logits
        return self.combine(cls_logits, dist_logits)


def deit_from_vit(vit: VisionTransformer, num_classes: int) -> DeiTVisionTransformer:
    """DeiT student with the architecture (and weights, head excluded) of ``vit``.

    Args:
        vit: A torchvision / flexible ``VisionTransformer`` (e.g. a registry ViT backbone).
        num_classes: Number of classes of both heads.

    Returns:
        :class:`DeiTVisionTransformer` whose encoder, patch embedding and class token are
        copies of ``vit``'s, with its stochastic depth (``drop_path_rate``); heads and
        distillation token freshly initialised.
    """
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"a DeiT student needs a VisionTransformer backbone, got {type(vit).__name__}")
    model = DeiTVisionTransformer(**vit_hyperparameters(vit), num_classes=num_classes,
                                  drop_path_rate=getattr(vit, "drop_path_rate", 0.0))
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("heads.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    extra = [k for k in missing if not (k.startswith(("heads.", _DEIT_HEAD_PREFIX)) or k in _DEIT_ONLY_KEYS)]
    if unexpected or extra:
        raise RuntimeError(f"cannot copy the ViT into a DeiT student: missing {extra}, unexpected {unexpected}")
    return model


def to_plain_vit_state_dict(model: DeiTVisionTransformer, keep_head: bool = True) -> dict[str, Tensor]:
    """State dict of ``model`` without the distillation token, its position embedding and head.

    Args:
        model: A DeiT student (a DDP wrapper is unwrapped).
        keep_head: Keep the class-token head (``heads.head.*``): loads into
            ``torchvision.models.VisionTransformer(..., num_classes=C)``. False drops it: loads
            into our headless ViT backbone (``build_backbone("vit_tiny", ...)``).

    Returns:
        CPU tensors, torchvision key names.
    """
    model = getattr(model, "module", model)
    if not isinstance(model, DeiTVisionTransformer):
        raise TypeError(f"expected a DeiTVisionTransformer, got {type(model).__name__}")
    out = {}
    for k, v in model.state_dict().items():
        if k in _DEIT_ONLY_KEYS or k.startswith(_DEIT_HEAD_PREFIX):
            continue
        if not keep_head and k.startswith("heads."):
            continue
        out[k] = v.detach().cpu().clone()
    return out


def plain_vit_from_deit(model: DeiTVisionTransformer, keep_head: bool = True) -> FlexibleVisionTransformer:
    """A plain :class:`FlexibleVisionTransformer` holding :func:`to_plain_vit_state_dict`.

    With ``keep_head`` its ``heads`` is the class-token head (``forward`` gives logits), else
    ``nn.Identity`` (``forward`` gives the CLS feature, like our backbones).
    """
    model = getattr(model, "module", model)
    state = to_plain_vit_state_dict(model, keep_head)
    plain = FlexibleVisionTransformer(**vit_hyperparameters(model), num_classes=model.num_classes)
    if not keep_head:
        plain.heads = nn.Identity()
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).device)


class ClassifierModel(nn.Module):
    """``head(backbone(x))``: a registry backbone with a linear classifier.

    Args:
        backbone: Network mapping ``(b, 3, h, w)`` to pooled features ``(b, embed_dim)``.
        embed_dim: Feature dimension.
        num_classes: Number of classes.
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(b, 3, h, w)`` normalised images. Returns: logits ``(b, C)``."""
        feats = self.backbone(x)
        if feats.ndim != 2:
            raise RuntimeError(f"backbone returned shape {tuple(feats.shape)}; expected pooled features (b, d)")
        return self.head(feats)


def build_student(
    backbone: str, backbone_kwargs: dict[str, Any] | None, num_classes: int, deit: bool = False,
) -> nn.Module:
    """Build a student classifier from a registry backbone.

    Args:
        backbone: Registry name (see :func:`esvit.backbones.list_backbones`).
        backbone_kwargs: Factory options (e.g. ``{"image_size": 32, "depth": 6}``).
        num_classes: Number of classes.
        deit: Add the DeiT distillation token and head (ViT backbones only).

    Returns:
        :class:`DeiTVisionTransformer` when ``deit``, else :class:`ClassifierModel`.

    Raises:
        ValueError: Unknown backbone, or ``deit`` with a non-ViT backbone.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    net, spec = build_backbone(backbone, **dict(backbone_kwargs or {}))
    if deit:
        if not isinstance(net, VisionTransformer):
            vits = [n for n in list_backbones() if n.startswith("vit")]
            raise ValueError(f"student.deit=true needs a ViT backbone (e.g. {', '.join(vits)}), "
                             f"got {backbone!r} ({type(net).__name__})")
        return deit_from_vit(net, num_classes)
    return ClassifierModel(net, spec.embed_dim, num_classes)

