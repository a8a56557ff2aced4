"""DataLoaders of the evaluation / embedding / correspondence paths that never hang silently.

A decode worker stuck on a hung network file system used to hang ``esvit-knn``, ``-linear``,
``-embed`` and ``-correspondence`` forever with no message. :func:`make_loader` bounds the wait:

* with workers (``num_workers > 0``), the DataLoader ``timeout`` makes the wait for one batch
  finite; past it :class:`LoaderStalledError` says what stalled: the workers, the seconds
  waited, and the first files of the batch that never came;
* without workers the decode runs in the calling thread and cannot be interrupted safely; a
  watchdog logs the same message (naming the files) once the batch takes longer than the
  timeout, so a hang is never silent.

The timeout is :data:`DEFAULT_LOADER_TIMEOUT_S` seconds, or the ``ESVIT_LOADER_TIMEOUT``
environment variable (seconds; ``0`` waits forever), or the ``timeout`` argument.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from esvit.run.errors import LoaderStalledError as _RunLoaderStalledError
from esvit.run.loader import DEFAULT_TIMEOUT_S, ENV_TIMEOUT, kill_stalled_workers, loader_timeout_s

__all__ = [
    "DEFAULT_LOADER_TIMEOUT_S",
    "LOADER_TIMEOUT_ENV",
    "EvalLoader",
    "LoaderStalledError",
    "loader_timeout",
    "make_loader",
]

log = logging.getLogger("esvit.eval")

DEFAULT_LOADER_TIMEOUT_S = DEFAULT_TIMEOUT_S  # one rule for training and evaluation (esvit.run.loader)
LOADER_TIMEOUT_ENV = ENV_TIMEOUT
_NAMED = 3  # files named in a stall message


class LoaderStalledError(_RunLoaderStalledError, TimeoutError):
    """No batch came from the decoding workers within the timeout (one-line message).

    The run engine's stall error (CLI exit code 124, as ``timeout(1)``), also a ``TimeoutError``.
    """


def loader_timeout(timeout: float | None = None) -> float:
    """Seconds to wait for one batch: ``timeout``, else ``$ESVIT_LOADER_TIMEOUT``, else 600 (the
    same rule as training's :func:`esvit.run.loader.loader_timeout_s`).

    Raises:
        ValueError: A negative or non-numeric value.
    """
    from types import SimpleNamespace

    return loader_timeout_s(SimpleNamespace(loader_timeout_s=timeout))


class _RecordedBatches:
    """Batch sampler that remembers the index lists it handed out, to name a stalled batch."""

    def __init__(self, batches: Iterable[Sequence[int]]) -> None:
        self.batches = batches
        self.issued: dict[int, list[int]] = {}

    def __iter__(self) -> Iterator[list[int]]:
        self.issued.clear()
        for i, batch in enumerate(self.batches):
            indices = list(batch)
            self.issued[i] = indices
            yield indices

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def forget_before(self, seq: int) -> None:
        """Drop the record of batches already received."""
        for i in [i for i in self.issued if i < seq]:
            del self.issued[i]


def _item_names(dataset: Dataset, indices: Sequence[int]) -> list[str]:
    """File names of dataset items (through ``Subset``), else ``index i``."""
    names = []
    for i in indices[:_NAMED]:
        ds, j = dataset, int(i)
        while isinstance(ds, torch.utils.data.Subset):
            ds, j = ds.dataset, int(ds.indices[j])
        paths = getattr(ds, "paths", None)
        try:
            names.append(str(paths[j]) if paths is not None else f"index {j}")
        except (IndexError, TypeError):
            names.append(f"index {j}")
    return names


class EvalLoader(DataLoader):
    """A DataLoader whose iteration stops with :class:`LoaderStalledError` instead of hanging.

    Built by :func:`make_loader`; ``stall_timeout`` is the bound of the wait for one batch and
    ``what`` names the data in messages.
    """

    def __init__(self, dataset: Dataset, *, batch_sampler: _RecordedBatches, num_workers: int,
                 stall_timeout: float, what: str, **kwargs: Any) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                         timeout=stall_timeout if num_workers > 0 else 0, **kwargs)
        self.stall_timeout = stall_timeout
        self.what = what
        self.recorder = batch_sampler

    def stall_message(self, seq: int) -> str:
        """One line saying what stalled while batch ``seq`` was awaited."""
        indices = self.recorder.issued.get(seq, [])
        files = _item_names(self.dataset, indices)
        waiting = (f"; waiting for batch {seq} ({len(indices)} images: {', '.join(files)}"
                   f"{', ...' if len(indices) > len(files) else ''})" if indices else "")
        who = (f"{self.num_workers} DataLoader worker(s)" if self.num_workers
               else "the decoding main process")
        return (f"image decoding stalled: no batch of {self.what} from {who} in "
                f"{self.stall_timeout:g} s{waiting}; a hung network file system or a file that "
                f"blocks? Set {LOADER_TIMEOUT_ENV} (seconds) to wait longer")

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        it = super().__iter__()
        seq = 0
        while True:
            watch = None
            if self.num_workers == 0 and self.stall_timeout > 0:
                watch = threading.Timer(self.stall_timeout, self._warn_stall, args=(seq,))
                watch.daemon = True
                watch.start()
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                kill_stalled_workers(it)
                raise LoaderStalledError(self.stall_message(seq)) from None
            finally:
                if watch is not None:
                    watch.cancel()
            seq += 1
            self.recorder.forget_before(seq)
            yield batch

    def _warn_stall(self, seq: int) -> None:
        log.error("%s (still waiting)", self.stall_message(seq))


def make_loader(
    dataset: Dataset,
    batch_size: int = 1,
    num_workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    *,
    batch_sampler: Iterable[Sequence[int]] | None = None,
    timeout: float | None = None,
    what: str = "images",
) -> EvalLoader:
    """DataLoader for evaluation: pinned memory only with CUDA, seeded shuffling, bounded waits.

    Args:
        dataset: Map-style dataset.
        batch_size: Items per batch (ignored with ``batch_sampler``).
        num_workers: Decoding worker processes.
        shuffle: Shuffle with a generator seeded by ``seed`` (``loader.generator``).
        seed: Shuffling seed.
        drop_last: Drop a last incomplete batch.
        batch_sampler: Explicit batches of indices (instead of ``batch_size`` / ``shuffle``).
        timeout: Seconds to wait for one batch (see :func:`loader_timeout`; 0: forever).
        what: Names the data in stall messages (e.g. ``"train features"``).

    Returns:
        :class:`EvalLoader`; iterating it raises :class:`LoaderStalledError` when the workers
        deliver no batch within the timeout.
    """
    g = torch.Generator().manual_seed(seed) if shuffle else None
    if batch_sampler is None:
        sampler = RandomSampler(dataset, generator=g) if shuffle else SequentialSampler(dataset)
        batch_sampler = BatchSampler(sampler, batch_size, drop_last)
    return EvalLoader(dataset, batch_sampler=_RecordedBatches(batch_sampler),
                      num_workers=num_workers, stall_timeout=loader_timeout(timeout), what=what,
                      generator=g, pin_memory=torch.cuda.is_available(), persistent_workers=False)
