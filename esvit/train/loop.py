"""The pretraining loop, readable top to bottom: set-up, resume, train, checkpoint.

``train(cfg, resume=...)`` is what ``train_ssl.py`` / ``esvit-train`` call. Every schedule value
comes from :class:`esvit.schedules.Schedules` at the global optimiser step, and the data order
is a pure function of (seed, epoch), so a checkpoint's step is all the position a resume needs.

The run machinery (output directory and its lock, resume checks, checkpoints, metrics, signals,
NaN guard, AMP, DDP, bounded data waits) is :class:`esvit.run.engine.Run`; this module keeps what
is specific to EsViT pretraining: the trainer, its schedules, its step and the kNN monitor.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esvit.config import Config
from esvit.data import BadImageCounter, build_dataset
from esvit.data.sampler import EpochBlockSampler
from esvit.run.engine import Run, RunSpec, Throughput
from esvit.run.errors import NonFiniteLossError
from esvit.run.loader import auto_num_workers
from esvit.run.resume import dataset_identity
from esvit.schedules import Schedules, ScheduleValues
from esvit.train import checkpoint as ckpt
from esvit.train.collapse import CollapseMonitor
from esvit.train.distributed import DistInfo, barrier, mean_over_ranks, sync_batchnorm_if_needed
from esvit.train.logger import MetricLogger
from esvit.train.optim import clip_gradients
from esvit.trainer import EsViTTrainer

__all__ = ["FREE_KEYS", "NonFiniteLossError", "TrainResult", "build_schedules", "build_trainer",
           "load_checkpoint_into", "save_checkpoint", "train"]

log = logging.getLogger("esvit.train")

FREE_KEYS = ("logging", "checkpoint", "knn", "device", "model.init_weights", "data.num_workers", "data.max_bad_fraction", "data.path",
             "data.loader_timeout_s")
"""Config keys a resume may change without ``--allow-config-change`` (the data's identity is checked)."""
HINT = "Lower optim.lr, check the data, or keep optim.clip_grad > 0, then resume with --resume auto."


@dataclass
class TrainResult:
    """Summary of a finished run."""

    output_dir: Path
    step: int
    last_checkpoint: Path | None
    losses: list[float]


@dataclass
class _Parts:
    """What one pretraining run works with."""

    sampler: EpochBlockSampler
    loader: torch.utils.data.DataLoader
    trainer: EsViTTrainer
    opt: torch.optim.Optimizer
    sched: Schedules
    steps_per_epoch: int
    total_steps: int
    bad_counter: BadImageCounter
    facts: dict[str, Any]


def build_trainer(cfg: Config, seed: int) -> EsViTTrainer:
    """Build the :class:`EsViTTrainer` described by ``cfg`` (augmentation seeded with ``seed``)."""
    m, a, t = cfg.model, cfg.augment, cfg.teacher
    kwargs = dict(m.backbone_kwargs)
    return EsViTTrainer.from_backbone(
        m.backbone, kwargs, drop_path_rate=m.drop_path_rate,
        global_size=a.global_size, local_size=a.local_size, n_local=a.n_local,
        global_scale=a.global_scale, local_scale=a.local_scale,
        out_dim=m.out_dim, hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim,
        use_bn_in_head=m.use_bn_in_head, norm_last_layer=m.norm_last_layer,
        student_temp=t.student_temp, center_momentum=t.center_momentum, region_loss=m.region_loss,
        region_out_dim=m.region_out_dim, use_bn_in_region_head=m.use_bn_in_region_head, region_weight=m.region_weight,
        augment_options={"blur_p": a.blur_p, "blur_sigma": a.blur_sigma, "solarize_p": a.solarize_p,
                         "extra_global": a.extra_global, "extra_local": a.extra_local},
        seed=seed,
    )


def init_backbone(trainer: EsViTTrainer, cfg: Config) -> None:
    """Start student and teacher backbones from ``model.init_weights`` (a local file; nothing is
    downloaded): any file :func:`esvit.export.load_backbone` reads, e.g. a timm / torchvision state
    dict or ``.safetensors`` of the same architecture, an esvit export or training checkpoint.
    A resumed run's checkpoint replaces these weights anyway."""
    from esvit.export import load_backbone_info

    m = cfg.model
    info = load_backbone_info(m.init_weights, backbone=m.backbone, backbone_kwargs=m.backbone_kwargs)
    state = info.net.state_dict()
    for side in (trainer.student, trainer.teacher):
        side.backbone.net.load_state_dict(state, strict=True)
    log.info("backbone initialised from %s", m.init_weights)


def build_schedules(cfg: Config, steps_per_epoch: int) -> Schedules:
    """All schedules of the run; the peak LR is ``optim.lr * batch_size / 256``."""
    o, t, m = cfg.optim, cfg.teacher, cfg.model
    return Schedules(
        steps_per_epoch=steps_per_epoch, epochs=o.epochs, lr=o.lr * o.batch_size / 256.0, min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs, weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum, momentum_teacher_end=t.momentum_end,
        warmup_teacher_temp=t.warmup_temp, teacher_temp=t.temp, warmup_teacher_temp_epochs=t.warmup_temp_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs,
        region_weight=m.region_weight, region_warmup_epochs=m.region_warmup_epochs,
    )


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(run: Run, step: int, trainer: EsViTTrainer, opt: torch.optim.Optimizer, cfg: Config) -> Path:
    """Checkpoint ``step`` (every rank calls this; rank 0 writes atomically and prunes).

    Raises:
        NonFiniteLossError: The student or teacher holds NaN/inf weights (nothing is written, so
            the previous checkpoint stays the last good one).
        OutputDirError: The write failed (disk full ...): one line naming the file and the cause.
    """
    def state() -> dict[str, Any]:
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "backbone": cfg.model.backbone,
            "student": trainer.student.state_dict(),
            "teacher": trainer.teacher.state_dict(),
            "view_center": trainer.view_loss.center.center,
            "region_center": trainer.region_loss.center.center if trainer.region_loss is not None else None,
            "optimizer": opt.state_dict(),
            "scaler": run.amp.state_dict() if run.amp is not None else {},
        }

    return run.save(step, state, trainer.extra_state(), _weights_finite(trainer))


def _weights_finite(trainer: EsViTTrainer) -> bool:
    """True when every floating-point tensor of the student and teacher state is finite."""
    return all(
        bool(torch.isfinite(v).all())
        for module in (trainer.student, trainer.teacher)
        for v in module.state_dict().values()
        if v.is_floating_point()
    )


def load_checkpoint_into(state: dict[str, Any], path: Path, trainer: EsViTTrainer, opt: torch.optim.Optimizer,
                         run: Run) -> int:
    """Validate and restore a training checkpoint; return its global step."""
    for key in ("step", "student", "teacher", "view_center", "optimizer"):
        if key not in state:
            raise ckpt.CheckpointError(f"{path} is not an esvit training checkpoint (missing '{key}')")
    ckpt.check_state_dict(trainer.student, state["student"], f"{path} [student]")
    ckpt.check_state_dict(trainer.teacher, state["teacher"], f"{path} [teacher]")
    trainer.student.load_state_dict(state["student"])
    trainer.teacher.load_state_dict(state["teacher"])
    trainer.view_loss.center.center.copy_(state["view_center"])
    if trainer.region_loss is not None and state.get("region_center") is not None:
        trainer.region_loss.center.center.copy_(state["region_center"])
    opt.load_state_dict(state["optimizer"])
    if run.amp is not None:
        run.amp.load_state_dict(state.get("scaler"))
    run.restore_rng(state.get("rng", []), trainer.load_extra_state)
    return int(state["step"])


# ------------------------------------------------------------------------------------ set-up


def _build(cfg: Config, run: Run, max_steps: int | None) -> _Parts:
    """Data (workers decode to a uint8 canvas; augmentation runs on the device), model, optimiser."""
    o, d, info = cfg.optim, cfg.data, run.info
    dataset = build_dataset(d.kind, d.path, d.canvas_size, synthetic_images=d.synthetic_images,
                            synthetic_classes=d.synthetic_classes, seed=cfg.seed,
                            max_bad_fraction=d.max_bad_fraction, resize_mode=d.resize_mode)
    sampler = EpochBlockSampler(len(dataset), run.micro_batch, info.rank, info.world_size, seed=cfg.seed)
    loader = run.loader(dataset, sampler, run.micro_batch, d)
    steps_per_epoch = sampler.batches_per_epoch // o.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"dataset has {len(dataset)} images: too few for one step of optim.batch_size="
                         f"{o.batch_size} (x accum); lower the batch size")
    _check_knn_folders(cfg, info)
    trainer, opt = _build_model(cfg, run)
    run.make_amp(o.amp)
    sched = build_schedules(cfg, steps_per_epoch)
    total = sched.total_steps if max_steps is None else min(max_steps, sched.total_steps)
    facts = {"steps_per_epoch": steps_per_epoch, "total_steps": sched.total_steps,
             **dataset_identity(getattr(dataset, "paths", None), getattr(dataset, "labels", None), len(dataset))}
    return _Parts(sampler, loader, trainer, opt, sched, steps_per_epoch, total,
                  BadImageCounter(d.max_bad_fraction, getattr(dataset, "paths", None)), facts)


def _check_knn_folders(cfg: Config, info: DistInfo) -> None:
    """Fail now on bad kNN monitor folders, not at the first epoch."""
    if cfg.knn.every_epochs and info.is_main and cfg.knn.train_path and cfg.knn.val_path:
        from esvit.eval.monitor import monitor_preprocess

        pre, _, _ = monitor_preprocess(cfg.knn.train_path, cfg.knn.val_path, cfg.data.canvas_size,
                                       cfg.augment.global_size, cfg.knn.preprocess, k=cfg.knn.k)
        log.info("kNN monitor every %d epochs, preprocessing: %s", cfg.knn.every_epochs, pre)


def _build_model(cfg: Config, run: Run) -> tuple[EsViTTrainer, torch.optim.Optimizer]:
    info = run.info
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (teacher = student copy)
    trainer = build_trainer(cfg, seed=cfg.seed)
    if cfg.model.init_weights:
        init_backbone(trainer, cfg)
    trainer = trainer.to(run.device)
    sync_batchnorm_if_needed(trainer, cfg.model.sync_bn, info)  # student and teacher, before DDP
    torch.manual_seed(cfg.seed * 1000 + 1 + info.rank)  # per-rank stream for dropout / drop-path
    trainer.set_shard(info.rank, info.world_size)
    if info.distributed:
        trainer.set_student_forward(run.ddp(trainer.student))
    return trainer, torch.optim.AdamW(trainer.param_groups(), lr=0.0)


# ------------------------------------------------------------------------------------ the run


def train(cfg: Config, resume: str | None = None, max_steps: int | None = None,
          allow_config_change: bool = False) -> TrainResult:
    """Run (or resume) a pretraining run described by ``cfg``.

    Args:
        cfg: Validated configuration.
        resume: None (fresh run; refuses a directory that already holds checkpoints), ``"auto"``
            (latest readable checkpoint in the output directory, fresh if none) or a path.
        max_steps: Stop after this global step (for tests and smoke runs); the schedules still
            span the full configured run.
        allow_config_change: Resume even if the config or the run's facts (batch split, steps
            per epoch, data set ...) differ from the checkpoint's; the differences are logged.

    Returns:
        :class:`TrainResult` with the final step, last checkpoint and this process's losses.

    Raises:
        Preempted: SIGTERM / SIGINT / SIGUSR1: a checkpoint was written (see :mod:`esvit.run`).
        RunError: The other expected faults (locked or unwritable output directory, resume
            mismatch, non-finite loss, stalled loader), each a one-line message.
    """
    spec = RunSpec("esvit-train", cfg, FREE_KEYS, cfg.optim.batch_size, cfg.optim.accum_steps, HINT)
    with Run(spec, resume, allow_config_change) as run:
        p = _build(cfg, run, max_steps)
        step = run.resume_state(p.facts, lambda path, state: load_checkpoint_into(state, path, p.trainer, p.opt, run))
        run.start_logging(step)
        if run.info.is_main:
            o = cfg.optim
            log.info("%d images, %d steps/epoch, %d epochs, global batch %d (%d/rank x %d ranks x %d accum), "
                     "device %s, amp %s", p.facts["dataset_size"], p.steps_per_epoch, o.epochs, o.batch_size,
                     run.micro_batch, run.info.world_size, o.accum_steps, run.device, run.amp.dtype)
        step, losses = _fit(cfg, run, p, step)
        if run.info.is_main and run.last_checkpoint is not None:
            _export_standard_files(run.out_dir, run.last_checkpoint)
        return TrainResult(run.out_dir, step, run.last_checkpoint, losses)


def _export_standard_files(out_dir: Path, checkpoint: Path) -> None:
    """``backbone.safetensors`` + its JSON card and ``checkpoint_last.pt`` (:func:`esvit.export.export_run`);
    a failure is a warning: the checkpoints are the run's record and are already written."""
    from esvit.export import export_run

    try:
        log.info("exported the teacher backbone to %s", export_run(out_dir, checkpoint))
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("could not export the backbone (%s); export it later with esvit-export --checkpoint %s",
                    " ".join(str(e).split())[:300], checkpoint)


def _fit(cfg: Config, run: Run, p: _Parts, step: int) -> tuple[int, list[float]]:
    """Train from ``step`` to ``p.total_steps``; returns the final step and this process's losses."""
    p.trainer.train()
    losses: list[float] = []
    monitor = CollapseMonitor(p.trainer.out_dim, region_out_dim=p.trainer.region_out_dim)
    bar, meter = run.progress(p.total_steps, step, "esvit"), Throughput()
    spe, every = p.steps_per_epoch, cfg.checkpoint.every_steps

    def save(at: int) -> Path:
        return save_checkpoint(run, at, p.trainer, p.opt, cfg)

    while step < p.total_steps:
        epoch = step // spe
        p.sampler.set_epoch(epoch)
        p.sampler.set_start((step - epoch * spe) * cfg.optim.accum_steps)
        it = run.batches(p.loader)
        for _ in range(spe - step % spe):
            if step >= p.total_steps:
                break
            run.stop_if_signalled(step, lambda at=step: save(at))
            metrics, vals, grad_norm = _train_step(cfg, run, p, it, step)
            step += 1
            losses.append(metrics["loss"])
            meter.add(cfg.optim.batch_size)
            if run.info.is_main:
                monitor.update(metrics, step)
            run.log_step(step, p.total_steps, p.steps_per_epoch, {**metrics, **_schedule_record(vals, p)},
                         grad_norm, meter, bar, p.bad_counter.bad)
            if every and step % every == 0 and step < p.total_steps:
                save(step)
        _end_of_epoch(cfg, run, p, step, save)
    _report_bad_images(p.bad_counter)
    if run.needs_save(step):
        save(step)
    return step, losses


def _train_step(cfg: Config, run: Run, p: _Parts, it: Any, step: int
                ) -> tuple[dict[str, float], ScheduleValues, torch.Tensor | None]:
    """One optimiser step (``accum_steps`` micro-batches) at 0-based global step ``step``."""
    o, trainer, amp = cfg.optim, p.trainer, run.amp
    epoch = step // p.steps_per_epoch
    vals = p.sched.at(step)
    for i, g in enumerate(p.opt.param_groups):
        g["lr"] = vals.lr
        if g.get("apply_wd", i == 0):
            g["weight_decay"] = vals.weight_decay
    p.opt.zero_grad(set_to_none=True)
    metrics: dict[str, float] = {}
    for micro in range(o.accum_steps):
        images, _, ok = next(it)
        p.bad_counter.update(ok)
        sync = micro == o.accum_steps - 1 or not run.info.distributed
        with contextlib.nullcontext() if sync else trainer._student_forward.no_sync():
            with amp.autocast():
                out = trainer(images, vals.teacher_temp, vals.region_weight)
            run.check_loss(out["loss"], step + 1, epoch)
            amp.backward(out["loss"] / o.accum_steps)
        for k, v in out.items():
            metrics[k] = metrics.get(k, 0.0) + float(v.detach()) / o.accum_steps
    metrics = mean_over_ranks(metrics, run.device, run.info)
    amp.unscale(p.opt)  # clip the true gradients, not the scaled ones
    # a frozen last layer's gradients are dropped first: they count in no norm
    grad_norm = clip_gradients(trainer.student.parameters(), o.clip_grad, o.clip_mode,
                               frozen=trainer.last_layer_parameters() if vals.freeze_last_layer else ())
    run.check_grad_norm(grad_norm, step + 1, epoch)
    amp.step(p.opt)
    trainer.update_teacher(vals.teacher_momentum)
    return metrics, vals, grad_norm


def _schedule_record(vals: ScheduleValues, p: _Parts) -> dict[str, float]:
    return {"lr": vals.lr, "weight_decay": vals.weight_decay, "teacher_momentum": vals.teacher_momentum,
            "teacher_temp": vals.teacher_temp,
            "region_weight": vals.region_weight if p.trainer.region_loss is not None else 0.0}


def _end_of_epoch(cfg: Config, run: Run, p: _Parts, step: int, save: Callable[[int], Path]) -> None:
    """Bad-image check, epoch checkpoint and kNN monitor when ``step`` closes an epoch."""
    if step % p.steps_per_epoch:
        return
    p.bad_counter.finalize()  # checks the limit even below the counter's min_samples
    if step >= p.total_steps:
        return
    e = step // p.steps_per_epoch
    if cfg.checkpoint.every_epochs and e % cfg.checkpoint.every_epochs == 0 and run.needs_save(step):
        save(step)
    if cfg.knn.every_epochs and e % cfg.knn.every_epochs == 0:
        _knn_monitor(cfg, p.trainer, run.device, run.info, run.logger, step)


def _report_bad_images(counter: BadImageCounter) -> None:
    counter.finalize()
    if counter.bad:
        log.warning("%d of %d samples (%.2f%%) were unreadable images replaced by substitutes "
                    "(data.max_bad_fraction=%g); first: %s", counter.bad, counter.seen,
                    100 * counter.fraction, counter.max_bad_fraction, "; ".join(counter.first_bad) or "unknown")


def _knn_monitor(cfg: Config, trainer: EsViTTrainer, device: torch.device, info: DistInfo,
                 logger: MetricLogger, step: int) -> None:
    """kNN top-1 of the teacher backbone's pooled features on a labeled val folder (rank 0)."""
    if not info.is_main or not (cfg.knn.train_path and cfg.knn.val_path):
        barrier()
        return
    from esvit.eval.monitor import knn_monitor

    was_training = trainer.training
    trainer.eval()
    try:
        res = knn_monitor(trainer.teacher.backbone, cfg.knn.train_path, cfg.knn.val_path,
                          cfg.data.canvas_size, cfg.augment.global_size, device, cfg.knn.k,
                          cfg.knn.temperature, cfg.knn.max_train_images, auto_num_workers(cfg.data.num_workers),
                          cfg.knn.preprocess)
    finally:
        trainer.train(was_training)
    logger.log({f"knn_{k}": v for k, v in res.items()}, step)
    log.info("step %d: kNN top-1 %.2f%%", step, res["top1"])
    barrier()
