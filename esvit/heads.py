"""DINO projection head (as in the official DINO / EsViT code).

The head runs in float32 even under autocast: its logits feed a softmax at the teacher
temperature (0.04), which multiplies a logit error by 25, so bf16 logits (8-bit mantissa) give
teacher targets with percent-level relative error (measured: ~4% at the official sizes). Running
only the last layer in float32 is not enough: the bf16 MLP alone still leaves ~3%.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "WeightNormLinear"]


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """Context with autocast disabled on ``x``'s device (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, ``W = g * v / ||v||`` (row-wise).

    Parameters ``weight_v`` ``(out, in)`` and ``weight_g`` ``(out, 1)`` have the same names and
    shapes as ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))``, so official DINO
    checkpoints load directly.

    Args:
        in_features: Input dim.
        out_features: Output dim.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        # nn.Linear's default init for v; g = 1 as in DINO (weight_g.data.fill_(1)).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        """Effective weight ``(out, in)``; each row has norm ``weight_g``."""
        norm = self.weight_v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            x: ``(..., in_features)``.

        Returns:
            ``(..., out_features)``.
        """
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2 normalisation -> weight-normalised linear layer.

    Args:
        in_dim: Input feature dim.
        out_dim: Number of prototypes (output dim).
        hidden_dim: Hidden width of the MLP.
        bottleneck_dim: Dim of the L2-normalised bottleneck.
        nlayers: Number of Linear layers in the MLP (>= 1; 1 means ``in_dim -> bottleneck``).
        use_bn: BatchNorm1d after each hidden Linear.
        norm_last_layer: Fix the last layer's row norms ``weight_g`` to 1 (frozen).
        fp32: Run the whole head (MLP, L2 norm, last layer) with autocast disabled, in the
            parameters' dtype (float32), whatever the input dtype. False: follow the ambient
            autocast as the official code does (faster, but bf16 teacher targets are off by
            percents at temperature 0.04).

    The last layer's parameters are ``last_layer.weight_v`` and ``last_layer.weight_g``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        fp32: bool = True,
    ) -> None:
        super().__init__()
        for arg, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("nlayers", nlayers),
        ):
            if value < 1:
                raise ValueError(f"DINOHead {arg} must be >= 1, got {value}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.fp32 = fp32
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.norm_last_layer = norm_last_layer
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Project features.

        Args:
            x: ``(..., in_dim)``, e.g. ``(b, d)`` pooled features or ``(b, n, d)`` region tokens.

        Returns:
            ``(..., out_dim)`` logits; float32 (the parameters' dtype) under any autocast
            unless the head was built with ``fp32=False``.
        """
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"DINOHead expected inputs with last dim in_dim={self.in_dim}, "
                f"got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_dim)  # BatchNorm1d needs (N, C)
        ctx: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if self.fp32:
            ctx = autocast_off(x)
            x = x.to(self.last_layer.weight_v.dtype)
        with ctx:
            x = self.mlp(x)
            # eps 1e-6 stays representable in fp16 (the default 1e-12 underflows to 0).
            x = F.normalize(x, dim=-1, p=2, eps=1e-6)
            x = self.last_layer(x)
        return x.reshape(*lead, self.out_dim)
