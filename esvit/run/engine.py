"""The run engine: the machinery every long-running command shares, built once.

``esvit-train`` (:func:`esvit.train.loop.train`) and ``esvit-distill``
(:func:`esvit.distill.train.distill`) open a :class:`Run` and keep only what is specific to them
(model, loss, step, evaluation). The run provides, in the order a command uses it:

1. start-up (``with Run(spec, resume=...) as run``): a missing ``--resume`` file is an error
   before anything is written; torchrun / device set-up; the global batch split over ranks and
   accumulation steps; the output directory is created and a probe file written, fsynced and
   removed (before any data scan or model build); rank 0 takes the directory's lock
   (:mod:`esvit.run.lock`); a fresh run refuses a directory that holds checkpoints; the stop
   signal handlers are installed (:mod:`esvit.run.signals`). Rank 0's outcome is shared, so all
   ranks fail with the same one-line error;
2. :meth:`Run.loader` / :meth:`Run.batches`: bounded waits for data (:mod:`esvit.run.loader`);
3. :meth:`Run.resume_state`: the checkpoint to resume (newest readable one, or the one named),
   restored by the command's function, then compared with the current config and run facts
   (:mod:`esvit.run.resume`);
4. :meth:`Run.start_logging`: ``config.yaml`` (never overwritten: a resume with another config
   writes ``config.resume-N.yaml``), ``metrics.jsonl`` cut back to the resumed step, wandb;
5. per step: :meth:`Run.check_loss` / :meth:`Run.check_grad_norm` (NaN guard, all ranks agree),
   :class:`~esvit.run.amp.Amp`, :meth:`Run.stop_if_signalled` (graceful preemption);
6. :meth:`Run.save`: RNG states of all ranks, weights checked finite, rank 0 writes atomically,
   prunes old checkpoints, and every rank learns whether it worked.

Leaving the ``with`` block closes the metrics file and wandb, releases the lock and restores the
previous signal handlers, whatever happened.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from esvit.config import ConfigError, config_to_dict
from esvit.run import errors
from esvit.run.amp import Amp
from esvit.run.errors import NonFiniteLossError, Preempted, RunError
from esvit.run.fsio import atomic_write_text, describe_os_error, probe_writable
from esvit.run.loader import (
    GuardedBatches,
    StallWatchdog,
    auto_num_workers,
    build_loader,
    loader_timeout_s,
    stall_message,
)
from esvit.run.lock import OutputLock
from esvit.run.resume import check_resume, compare_runs
from esvit.run.signals import StopSignals
from esvit.train import checkpoint as ckpt
from esvit.train.distributed import all_true, broadcast_object, gather_rng_states, init_distributed
from esvit.train.logger import MetricLogger, truncate_metrics

__all__ = ["Run", "RunSpec", "Throughput"]

log = logging.getLogger("esvit.run")


@dataclass(frozen=True)
class RunSpec:
    """What the engine needs to know about a command.

    Attributes:
        command: Its name (``esvit-train``), written into the lock file.
        config: The resolved config dataclass (``logging``, ``checkpoint``, ``device`` sections).
        free_keys: Dotted config keys (or sections) a resume may change without
            ``--allow-config-change``: where and how to log, checkpoint frequency, loader
            workers, device, the data's location (its identity is a run fact).
        global_batch: ``optim.batch_size`` (all ranks, one optimiser step).
        accum_steps: Gradient accumulation steps.
        hint: Advice appended to a non-finite loss error.
        checkpoint_kind: What ``--resume`` accepts (a kind of
            :data:`esvit.train.checkpoint.SCHEMAS`: ``training`` or ``distill``).
    """

    command: str
    config: Any
    free_keys: tuple[str, ...]
    global_batch: int
    accum_steps: int = 1
    hint: str = "Lower optim.lr or check the data, then resume with --resume auto."
    checkpoint_kind: str = "training"


class Run:
    """One run of a command in its output directory (a context manager; see the module doc).

    Args:
        spec: :class:`RunSpec`.
        resume: None (fresh run), ``"auto"`` (newest readable checkpoint in the output
            directory, fresh if none) or a checkpoint path.
        allow_config_change: Accept a resume whose config or run facts differ (logged).
    """

    def __init__(self, spec: RunSpec, resume: str | None = None, allow_config_change: bool = False) -> None:
        self.spec, self.resume, self.allow_config_change = spec, resume, allow_config_change
        self.out_dir = Path(spec.config.logging.output_dir)
        self.config_dict = config_to_dict(spec.config)
        self.facts: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None
        self.resumed_from: Path | None = None
        self.run_id: str | None = None
        self.logger: MetricLogger | None = None
        self.amp: Amp | None = None
        self.loader_timeout = 0.0
        self._data_path: str | None = None
        self._watchdog: StallWatchdog | None = None
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------------------ start-up

    def __enter__(self) -> Run:
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _open(self) -> None:
        if self.resume not in (None, "auto") and not Path(self.resume).is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {self.resume} (pass 'auto' or a "
                                    "checkpoint_*.pt file)")
        self.info, self.device = init_distributed(self.spec.config.device)
        self.micro_batch = self._split_batch()
        self.on_rank0(self._prepare_output)
        self.signals = self._stack.enter_context(StopSignals())

    def _split_batch(self) -> int:
        s, w = self.spec, self.info.world_size
        if s.global_batch % (w * s.accum_steps):
            accum = f" x optim.accum_steps ({s.accum_steps})" if s.accum_steps > 1 else ""
            raise ConfigError(f"optim.batch_size: {s.global_batch} is not divisible by world_size ({w}){accum}")
        return s.global_batch // (w * s.accum_steps)

    def _prepare_output(self) -> None:
        """Rank 0: writable directory, lock, no checkpoints unless resuming."""
        probe_writable(self.out_dir)
        lock = OutputLock(self.out_dir, self.spec.command)
        if lock.acquire():
            self._stack.callback(lock.release)
        if self.resume is None and ckpt.list_checkpoints(self.out_dir):
            raise FileExistsError(f"{self.out_dir} already holds checkpoints: pass --resume auto to continue that "
                                  "run, or choose another logging.output_dir")

    def on_rank0(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on rank 0 and raise its expected error on every rank."""
        error: BaseException | None = None
        result = None
        if self.info.is_main:
            try:
                result = action()
            except (RunError, OSError, ConfigError) as e:
                error = e
        shared = broadcast_object(None if error is None else _describe(error), self.info)
        if error is not None:
            raise error
        if shared is not None:
            raise _rebuild(shared)
        return result

    # ------------------------------------------------------------------------------ data

    def loader(self, dataset: Dataset, sampler: Sampler, batch_size: int, data_cfg: Any) -> DataLoader:
        """The training DataLoader (bounded waits, workers that ignore stop signals)."""
        self.loader_timeout = loader_timeout_s(data_cfg)
        self._data_path = getattr(data_cfg, "path", None)
        workers = auto_num_workers(data_cfg.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if data_cfg.num_workers is None and self.info.is_main:
            log.info("data.num_workers: %d decode workers per process (auto, from the CPUs available)", workers)
        if workers == 0 and self.loader_timeout > 0 and self._watchdog is None:
            self._watchdog = StallWatchdog(self.loader_timeout, stall_message(0, self.loader_timeout, self._data_path))
            self._stack.callback(self._watchdog.close)
        return build_loader(dataset, sampler, batch_size, workers, self.loader_timeout)

    def batches(self, loader: DataLoader) -> GuardedBatches:
        """One epoch of ``loader``; a stall raises :class:`~esvit.run.errors.LoaderStalledError`."""
        return GuardedBatches(loader, self.loader_timeout, self._data_path, self._watchdog)

    # ------------------------------------------------------------------------------ model

    def ddp(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DDP under torchrun, else itself."""
        if not self.info.distributed:
            return module
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def make_amp(self, mode: str) -> Amp:
        """Mixed precision for ``optim.amp`` on this run's device."""
        self.amp = Amp(mode, self.device)
        return self.amp

    # ------------------------------------------------------------------------------ resume

    def resume_state(self, facts: dict[str, Any], restore: Callable[[Path, dict[str, Any]], int]) -> int:
        """Find, restore and check the checkpoint to resume; returns its step (0: fresh run).

        Args:
            facts: The run's derived facts (steps per epoch, total steps, data set identity ...);
                the world size and batch split are added here. Recorded in every checkpoint.
            restore: Loads a checkpoint's state into the command's objects, returns its step
                (raises :class:`~esvit.train.checkpoint.CheckpointError` on a mismatch).

        Raises:
            ResumeMismatchError: The config or facts differ (without ``allow_config_change``).
        """
        self.facts = {"world_size": self.info.world_size, "global_batch": self.spec.global_batch,
                      "micro_batch": self.micro_batch, "accum_steps": self.spec.accum_steps, **facts}
        if self.resume is None:
            return 0
        found = ckpt.load_resume(self.resume, self.out_dir, self.spec.checkpoint_kind)
        if found is None:
            if self.info.is_main:
                log.info("no checkpoint in %s: starting a fresh run", self.out_dir)
            return 0
        path, state = found
        step = restore(path, state)
        cmp = compare_runs(state.get("config"), state.get("run"), self.config_dict, self.facts, self.spec.free_keys)
        check_resume(cmp, path, self.allow_config_change, log_info=self.info.is_main)
        self.resumed_from = self.last_checkpoint = path
        if path.parent.resolve() == self.out_dir.resolve():
            self.saved_step = step
        self.run_id = state.get("wandb_run_id")
        if self.info.is_main:
            log.info("resumed from %s at step %d", path, step)
        return step

    def restore_rng(self, states: list[dict[str, Any]], extra: Callable[[dict[str, Any]], None]) -> None:
        """Restore this rank's torch / CUDA RNG states and the command's ``extra`` streams."""
        if len(states) != self.info.world_size:
            log.warning("checkpoint has RNG states for %d ranks, run has %d: augmentation streams restart",
                        len(states), self.info.world_size)
            return
        s = states[self.info.rank]
        torch.set_rng_state(s["torch"])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
        extra(s)

    # ------------------------------------------------------------------------------ logging

    def start_logging(self, step: int) -> MetricLogger:
        """Write the config (history kept), cut ``metrics.jsonl`` back to ``step``, open the logger."""
        cfg = self.spec.config.logging

        def open_logger() -> MetricLogger:
            self._write_config()
            truncate_metrics(self.out_dir / "metrics.jsonl", step)
            return MetricLogger(self.out_dir, cfg.wandb, cfg.wandb_project, self.run_id, self.config_dict,
                                tensorboard=getattr(cfg, "tensorboard", False))

        logger = self.on_rank0(open_logger)  # every rank calls it; only rank 0 writes
        self.logger = logger if logger is not None else MetricLogger(self.out_dir, run_id=self.run_id, active=False)
        self._stack.callback(self.logger.close)
        return self.logger

    def _write_config(self) -> None:
        """``config.yaml``; a resume with another config writes ``config.resume-N.yaml`` instead."""
        text = yaml.safe_dump(self.config_dict, sort_keys=False)
        first = self.out_dir / "config.yaml"
        try:
            old = first.read_text() if first.is_file() else None
        except OSError:
            old = None
        if old == text:
            return
        if old is not None and self.resumed_from is not None:
            n = _next_free(self.out_dir, "config.resume-{}.yaml")
            previous = self.out_dir / f"config.resume-{n - 1}.yaml"
            if n > 1 and previous.read_text() == text:
                return  # the same config as the previous resume
            path = self.out_dir / f"config.resume-{n}.yaml"
            atomic_write_text(path, text, "config")
            log.info("the config differs from config.yaml (the run's first): this resume's is %s", path)
            return
        if old is not None:  # a fresh start over an attempt that wrote no checkpoint
            kept = self.out_dir / f"config.previous-{_next_free(self.out_dir, 'config.previous-{}.yaml')}.yaml"
            try:
                os.replace(first, kept)
            except OSError as e:
                raise errors.OutputDirError(f"cannot rename {first} to {kept}: {describe_os_error(e)}") from e
            log.info("config.yaml of an earlier attempt (no checkpoint) kept as %s", kept)
        atomic_write_text(first, text, "config")

    def log_step(self, step: int, total: int, steps_per_epoch: int, rec: dict[str, float],
                 grad_norm: Tensor | None, meter: Any, bar: tqdm | PlainProgress, bad_images: int,
                 **postfix: str) -> None:
        """Advance the progress display; every ``logging.log_every`` steps (and the first and
        last) append the step's record to ``metrics.jsonl`` and show loss, LR, images/s (plus
        ``postfix``)."""
        bar.update(1)
        if not (step % self.spec.config.logging.log_every == 0 or step == total or step == 1):
            return
        ips = meter.read()
        rec = {**rec, "epoch": step / steps_per_epoch, "images_per_s": ips, "bad_images": bad_images}
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)
        self.logger.log(rec, step)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", **postfix, lr=f"{rec['lr']:.2e}", img_s=f"{ips:.0f}")

    def progress(self, total: int, initial: int, desc: str) -> tqdm | PlainProgress:
        """The run's progress display, closed with the run: a tqdm bar on a terminal (rank 0 with
        ``logging.progress``); when stderr is not a terminal (batch jobs, log files), plain
        periodic log lines with step, loss, LR and images/s instead of bar frames."""
        show = self.info.is_main and self.spec.config.logging.progress
        if show and not sys.stderr.isatty():
            bar: tqdm | PlainProgress = PlainProgress(total, initial, desc)
        else:
            bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not show)
        self._stack.callback(bar.close)
        return bar

    # ------------------------------------------------------------------------------ per step

    def check_loss(self, loss: Tensor, step: int, epoch: int) -> None:
        """Stop (every rank) when the loss of 1-based ``step`` is NaN/inf on any rank."""
        if not all_true(bool(torch.isfinite(loss.detach()).all().item()), self.device):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.detach().float().mean().item()}) at step {step} (epoch {epoch}); stopping "
                f"without saving. Last good checkpoint: {self.last_checkpoint or 'none'}. {self.spec.hint}")

    def check_grad_norm(self, norm: Tensor | None, step: int, epoch: int) -> None:
        """Stop before the update when the gradient norm is NaN/inf (the fp16 scaler skips such steps)."""
        if norm is None or (self.amp is not None and self.amp.scaler is not None) or torch.isfinite(norm):
            return
        raise NonFiniteLossError(
            f"non-finite gradient norm ({float(norm)}) at step {step} (epoch {epoch}); stopping before the "
            f"update. Last good checkpoint: {self.last_checkpoint or 'none'}. {self.spec.hint}")

    def stop_if_signalled(self, step: int, save: Callable[[], Path]) -> None:
        """If any rank got a stop signal: checkpoint ``step`` (unless saved) and raise :class:`Preempted`."""
        signum = self.signals.agreed(self.device)
        if not signum:
            return
        path = self.last_checkpoint if self.saved_step == step else save()
        raise Preempted(signum, step, path)

    # ------------------------------------------------------------------------------ checkpoints

    def needs_save(self, step: int) -> bool:
        """True unless ``step``'s checkpoint was just written (or resumed from, in this directory)."""
        return self.saved_step != step

    def save(self, step: int, state: Callable[[], dict[str, Any]], rng_extra: dict[str, Any],
             weights_finite: bool = True) -> Path:
        """Checkpoint ``step``; every rank must call this.

        Args:
            step: Global step.
            state: Rank 0 only: the command's part of the checkpoint (model, optimiser ...);
                the engine adds ``step``, ``rng``, ``config``, ``run`` and ``wandb_run_id``.
            rng_extra: This rank's extra RNG streams (gathered from all ranks).
            weights_finite: This rank's weights are all finite.

        Raises:
            NonFiniteLossError: Some weights are NaN/inf (nothing written).
            OutputDirError: The write failed (every rank raises; nothing torn, nothing lost).
        """
        if not all_true(weights_finite, self.device):
            raise NonFiniteLossError(
                f"non-finite weights after step {step}: not writing a checkpoint (the newest checkpoint in "
                f"{self.out_dir} is the last good one). {self.spec.hint}")
        rng = gather_rng_states(rng_extra, self.info)
        path = ckpt.checkpoint_path(self.out_dir, step)

        def write() -> None:
            full = {**state(), "step": step, "rng": rng, "config": self.config_dict, "run": self.facts,
                    "wandb_run_id": self.logger.run_id if self.logger is not None else self.run_id}
            if self.logger is not None:
                self.logger.sync()  # the metrics up to this step survive with the checkpoint
            ckpt.atomic_save(full, path)
            ckpt.prune_checkpoints(self.out_dir, self.spec.config.checkpoint.keep_last)
            log.info("saved %s", path)

        self.on_rank0(write)
        self.last_checkpoint, self.saved_step = path, step
        return path


class Throughput:
    """Images per second between two readings."""

    def __init__(self) -> None:
        self._t, self._n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        """Count ``n`` more images."""
        self._n += n

    def read(self) -> float:
        """Images/s since the last reading (and start a new interval)."""
        now = time.perf_counter()
        rate = self._n / max(now - self._t, 1e-9)
        self._t, self._n = now, 0
        return rate


_REBUILDABLE = {c.__name__: c for c in (
    errors.RunError, errors.NonFiniteLossError, errors.ResumeMismatchError, errors.OutputDirError,
    errors.RunLockedError, errors.LoaderStalledError, ConfigError, FileExistsError, FileNotFoundError,
    ckpt.CheckpointError,
)}


def _describe(error: BaseException) -> tuple[str, str]:
    return type(error).__name__, str(error)


def _rebuild(shared: tuple[str, str]) -> BaseException:
    """Rank 0's error, raised again on another rank (same class when known, else a RunError)."""
    name, message = shared
    cls = _REBUILDABLE.get(name) or getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = errors.RunError
    return cls(message)


def _next_free(directory: Path, pattern: str) -> int:
    """The smallest ``n >= 1`` for which ``directory / pattern.format(n)`` does not exist."""
    n = 1
    while (directory / pattern.format(n)).exists():
        n += 1
    return n


class PlainProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as plain log lines, at most one every
    ``every_s`` seconds (and the last step), for output that is not a terminal."""

    def __init__(self, total: int, initial: int, desc: str, every_s: float = 30.0) -> None:
        self.total, self.n, self.desc, self.every_s = total, initial, desc, every_s
        self._last = float("-inf")

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and self.n < self.total:
            return
        self._last = now
        shown = ", ".join(f"{k} {v}" for k, v in values.items())
        log.info("%s: step %d/%d (%.0f%%), %s", self.desc, self.n, self.total, 100.0 * self.n / max(self.total, 1), shown)

    def close(self) -> None:
        return None

