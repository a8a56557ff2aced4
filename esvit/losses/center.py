"""Exponential-moving-average centre of the teacher outputs (DINO's anti-collapse term)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class Center(nn.Module):
    """EMA of the teacher's output mean, all-reduced across ranks when distributed.

    Args:
        dim: Output dimension ``K`` of the projection head.
        momentum: EMA momentum; ``center = m * center + (1 - m) * batch_mean``.

    Attributes:
        center: Buffer of shape ``(1, K)``; saved in the state dict so resume is exact.
    """

    center: Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"Center dim must be positive, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Center momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, teacher_output: Tensor) -> None:
        """Update the centre with a batch of teacher outputs.

        Args:
            teacher_output: Tensor of shape ``(..., K)``, any float dtype (summed in float32);
                every leading position counts as one sample (for region outputs that is every
                token of every image).
        """
        flat = teacher_output.detach().reshape(-1, teacher_output.shape[-1]).float()
        stats = torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
        self.center.mul_(self.momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.momentum)
