"""torch.distributed helpers (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPU, gloo on CPU).

Also SyncBatchNorm (``model.sync_bn``): :func:`sync_batchnorm_if_needed` converts the student's
and the teacher's BatchNorm layers before DDP wrapping, as the official ``main_esvit.py`` does,
to ``torch.nn.SyncBatchNorm`` on CUDA and to :class:`CPUSyncBatchNorm` on CPU, where torch's
refuses to run (and DDP refuses to wrap it).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger("esvit.train")


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


def mean_over_ranks(metrics: dict[str, float], device: torch.device, info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over ranks (the global-batch value, as one process would see it)."""
    if not info.distributed:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (picklable); every rank must call this."""
    if not info.distributed:
        return obj
    payload = [obj if info.is_main else None]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


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


# ---------------------------------------------------------------------------- SyncBatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the ranks of ``group``: the gradient is summed over ranks too
    (every rank's loss depends on the sum)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are those of the batch of all ranks, on any device.

    The same state and semantics as ``torch.nn.SyncBatchNorm`` (which only runs on GPU): in train
    mode with an initialised process group of more than one rank, the mean and (biased) variance
    used to normalise are over the samples of every rank, with gradients flowing back through
    the all-reduces, and the running statistics are updated with the global mean and unbiased
    variance, so they stay equal on every rank. Otherwise (eval mode, one process) it is plain
    BatchNorm. Statistics are computed in float32 (two all-reduces: sum, then centred squares).

    Args:
        num_features: Channels ``C`` of the ``(N, C, ...)`` input.
        eps, momentum, affine, track_running_stats: As ``nn.BatchNorm2d``.
        process_group: Group to synchronise over (None: the default group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group_size(self) -> int:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``(N, C, ...)`` input; returns the same shape and dtype."""
        if self._group_size() <= 1:
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        if c != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got input of shape {tuple(input.shape)}")
        dims = [0, *range(2, input.dim())]
        shape = [1, c] + [1] * (input.dim() - 2)
        x = input.float()
        group = self.process_group
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_full((1,), input.numel() // max(c, 1))]), group)
        count = float(stats[c].detach())
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
        mean = stats[:c] / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                unbiased = var.detach() * (count / (count - 1))
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y.to(input.dtype)


def is_sync_batchnorm(module: nn.Module) -> bool:
    """True for ``torch.nn.SyncBatchNorm`` and :class:`CPUSyncBatchNorm` layers."""
    return isinstance(module, (nn.SyncBatchNorm, CPUSyncBatchNorm))


def _to_cpu_sync(module: nn.Module, process_group: Any) -> nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` with :class:`CPUSyncBatchNorm` layers."""
    out = module
    if isinstance(module, _BatchNorm) and not is_sync_batchnorm(module):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _to_cpu_sync(child, process_group))
    return out


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a synchronised one, keeping its state.

    On CUDA (and any device but CPU) this is ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``;
    on CPU the layers become :class:`CPUSyncBatchNorm`. Parameters and buffers are the same
    objects, so state dict keys and optimiser parameters are unchanged; the training flags are
    kept. Layers already synchronised are left alone.

    Args:
        module: The model, on its final device.
        process_group: Group to synchronise over (None: the default group).

    Returns:
        The converted module (``module`` itself unless it is a BatchNorm layer).
    """
    ref = next(module.parameters(), None)
    if ref is None:
        ref = next(module.buffers(), None)
    if ref is not None and ref.device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _to_cpu_sync(module, process_group)


class _SyncBNTrainer(Protocol):
    def has_batchnorm(self) -> bool: ...

    def convert_sync_batchnorm(self, process_group: Any = None) -> int: ...


def resolve_sync_bn(mode: bool | str, has_batchnorm: bool, world_size: int, warn: bool = True) -> bool:
    """Whether ``model.sync_bn`` asks for SyncBatchNorm in this run.

    Args:
        mode: ``"auto"`` (on when ``world_size > 1`` and there is a BatchNorm layer), True or False.
        has_batchnorm: The student (backbone or heads) has a BatchNorm layer.
        world_size: Number of processes.
        warn: Log a one-line warning when ``True`` cannot act (one process, or no BatchNorm).

    Returns:
        True when the BatchNorm layers are to be converted.

    Raises:
        ValueError: ``mode`` is not one of auto, true, false.
    """
    if isinstance(mode, bool):
        wanted = mode
    elif mode == "auto":
        return has_batchnorm and world_size > 1
    else:
        raise ValueError(f"model.sync_bn: must be auto, true or false, got {mode!r}")
    if not wanted:
        return False
    if world_size <= 1:
        if warn:
            log.warning("model.sync_bn=true has no effect: a single process (world size 1) has nothing to "
                        "synchronise BatchNorm statistics with")
        return False
    if not has_batchnorm:
        if warn:
            log.warning("model.sync_bn=true has no effect: the student and its heads have no BatchNorm layer")
        return False
    return True


def sync_batchnorm_if_needed(trainer: _SyncBNTrainer, mode: bool | str, info: DistInfo) -> bool:
    """Apply ``model.sync_bn`` to ``trainer`` (an :class:`~esvit.trainer.EsViTTrainer`) before DDP.

    Converts student and teacher when :func:`resolve_sync_bn` says so and logs it (rank 0).

    Returns:
        Whether the BatchNorm layers were converted.
    """
    if not resolve_sync_bn(mode, trainer.has_batchnorm(), info.world_size, warn=info.is_main):
        return False
    n = trainer.convert_sync_batchnorm()
    if info.is_main:
        log.info("model.sync_bn: %d BatchNorm layers of the student (and the teacher's) synchronised over %d ranks",
                 n, info.world_size)
    return True
