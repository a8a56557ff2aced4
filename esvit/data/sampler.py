"""Deterministic, resumable, rank-partitioned sampling for pretraining.

The order of an epoch is a pure function of ``(seed, epoch)``. Each global batch of
``batch_size * world_size`` consecutive indices of that order is split into contiguous blocks, one
per rank, so the global batch at every step is the same whatever the number of ranks (a
1-process run and an N-process run see the same images at step k). Resuming mid-epoch skips
whole batches without touching the data.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochBlockSampler(Sampler[int]):
    """Per-epoch shuffled indices, partitioned by rank in contiguous per-batch blocks.

    Args:
        num_samples: Dataset length.
        batch_size: Per-rank batch size ``b``.
        rank: This process's rank.
        world_size: Number of ranks.
        seed: Base seed; epoch ``e`` uses a permutation seeded with ``seed`` and ``e``.
        shuffle: False keeps the dataset order.

    Only full global batches are used (drop-last semantics), so every rank yields the same
    number of batches.
    """

    def __init__(
        self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch."""
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (call before iterating, like ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def set_start(self, start_batch: int) -> None:
        """Skip the first ``start_batch`` batches of the epoch on the next iteration."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.start_batch = start_batch

    def permutation(self) -> torch.Tensor:
        """The epoch's full index order (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[int]:
        perm = self.permutation()
        gb, b = self.batch_size * self.world_size, self.batch_size
        start = self.start_batch
        for s in range(start, self.batches_per_epoch):
            lo = s * gb + self.rank * b
            yield from perm[lo:lo + b].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
