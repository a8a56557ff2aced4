"""Gradient clipping, in one place for the pretraining and the distillation loops.

Two rules (``optim.clip_mode``):

- ``per_param`` (the official EsViT / DINO ``utils.clip_gradients``): every parameter tensor's
  gradient ``g`` is scaled by ``min(1, clip / (||g||_2 + 1e-6))`` on its own, so one exploding
  tensor does not shrink the others.
- ``global`` (``torch.nn.utils.clip_grad_norm_``): all gradients are scaled together by
  ``min(1, clip / (||G||_2 + 1e-6))`` with ``G`` their concatenation.

Gradients of frozen parameters (the heads' last layer during ``optim.freeze_last_layer_epochs``,
the official ``cancel_gradients_last_layer``) are dropped first, so they neither count in any
norm nor get an update. Under a ``GradScaler`` call ``scaler.unscale_(optimizer)`` before
:func:`clip_gradients` so the threshold applies to the true gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["CLIP_MODES", "clip_gradients"]

CLIP_MODES = ("per_param", "global")
_EPS = 1e-6  # as in the official clip_gradients and in clip_grad_norm_


def clip_gradients(
    params: Iterable[Tensor],
    max_norm: float,
    mode: str = "per_param",
    frozen: Iterable[Tensor] = (),
) -> Tensor | None:
    """Drop the gradients of ``frozen`` parameters, then clip the remaining gradients in place.

    Args:
        params: Parameters whose ``.grad`` is clipped (those without a gradient are skipped).
        max_norm: Clipping threshold; 0 disables clipping (frozen gradients are still dropped).
        mode: ``"per_param"`` (each tensor's gradient norm clipped to ``max_norm`` separately,
            the official rule) or ``"global"`` (the norm of all gradients together).
        frozen: Parameters whose ``.grad`` is set to ``None`` before anything else.

    Returns:
        The L2 norm of all remaining gradients before clipping (a scalar tensor, the value to
        log; ``inf``/``nan`` when a gradient is not finite), or ``None`` when ``max_norm`` is 0.

    Raises:
        ValueError: ``mode`` is not one of :data:`CLIP_MODES` or ``max_norm`` is negative.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    for p in frozen:
        p.grad = None
    with_grad = [p for p in params if p.grad is not None]
    if max_norm == 0:
        return None
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    if not with_grad:
        return torch.zeros(())
    grads = [p.grad for p in with_grad]
    norms = torch._foreach_norm(grads)  # one ||g||_2 per tensor, (,) each
    coefs = [(max_norm / (n.float() + _EPS)).clamp_(max=1.0).to(g.dtype) for n, g in zip(norms, grads, strict=True)]
    total = torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))
    torch._foreach_mul_(grads, coefs)
    return total
