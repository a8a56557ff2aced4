"""Mixed precision for both training loops: autocast dtype, GradScaler and the optimiser step."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import Tensor

__all__ = ["Amp", "amp_dtype"]


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: none on CPU; on CUDA bf16 if supported else fp16 (``optim.amp=auto``).

    ``fp16`` / ``bf16`` asked for on another device is a logged warning, not silence: the run
    goes on in float32 (CPU bf16 matmuls are far slower than float32 ones)."""
    if device.type != "cuda" and mode in ("fp16", "bf16"):
        logging.getLogger("esvit.train").warning(
            "optim.amp=%s asked for, but the device is %s: training in float32 (mixed precision is for CUDA)",
            mode, device.type)
    if device.type != "cuda" or mode == "none":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


class Amp:
    """Autocast plus, for fp16, a ``GradScaler``; one place for backward, unscale and step.

    Args:
        mode: ``optim.amp`` (``auto``, ``none``, ``fp16``, ``bf16``).
        device: Training device.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        self.device = device
        self.dtype = amp_dtype(mode, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's autocast context (disabled without a dtype)."""
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, scaled under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Unscale the gradients in place (before clipping: clip the true gradients)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """Optimiser step (skipped by the scaler on inf/NaN gradients under fp16)."""
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (empty without one)."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (ignored when either side has no scaler)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
