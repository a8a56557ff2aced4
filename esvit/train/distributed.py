"""torch.distributed helpers (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Rank information of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that logs and writes checkpoints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> tuple[DistInfo, torch.device]:
    """Initialise the process group if launched by torchrun and choose the device.

    Args:
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.
        timeout_s: Collective timeout; a dead rank makes the others fail after this long
            instead of hanging forever.

    Returns:
        ``(DistInfo, device)``.
    """
    use_cuda = torch.cuda.is_available() and device in ("auto",) or device.startswith("cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
        info = DistInfo(rank, world, local)
    elif dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    else:
        info = DistInfo()
    if use_cuda:
        dev = torch.device(device if ":" in device else f"cuda:{info.local_rank}")
    else:
        dev = torch.device("cpu")
    return info, dev


def barrier() -> None:
    """Barrier if distributed, else a no-op."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_true(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is True on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_rng_states(extra: dict[str, Any], info: DistInfo) -> list[dict[str, Any]]:
    """RNG states of every rank (torch, CUDA and ``extra``, e.g. augmentation generators).

    Every rank must call this; each gets the list indexed by rank, for the checkpoint.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), **extra}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if not info.distributed:
        return [state]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, {k: v.cpu() if torch.is_tensor(v) else v for k, v in state.items()})
    return out
