"""The pretraining loop, readable top to bottom: set-up, resume, train, checkpoint.

``train(cfg, resume=...)`` is what ``train_ssl.py`` / ``esvit-train`` call. Every schedule value
comes from :class:`esvit.schedules.Schedules` at the global optimiser step, and the data order
is a pure function of (seed, epoch), so a checkpoint's step is all the position a resume needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from esvit.config import Config, ConfigError, config_to_dict, save_config
from esvit.data import BadImageCounter, build_dataset
from esvit.data.sampler import EpochBlockSampler
from esvit.schedules import Schedules
from esvit.train import checkpoint as ckpt
from esvit.train.collapse import CollapseMonitor
from esvit.train.distributed import (
    DistInfo,
    all_true,
    barrier,
    gather_rng_states,
    init_distributed,
    sync_batchnorm_if_needed,
)
from esvit.train.logger import MetricLogger
from esvit.train.optim import clip_gradients
from esvit.trainer import EsViTTrainer

log = logging.getLogger("esvit.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped without writing a checkpoint."""


@dataclass
class TrainResult:
    """Summary of a finished run."""

    output_dir: Path
    step: int
    last_checkpoint: Path | None
    losses: list[float]


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
        augment_options={"blur_p": a.blur_p, "blur_sigma": a.blur_sigma, "solarize_p": a.solarize_p},
        seed=seed,
    )


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


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: none on CPU; on CUDA bf16 if supported else fp16 (``optim.amp=auto``)."""
    mode = cfg.optim.amp
    if device.type != "cuda" or mode == "none":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _restore_rng(trainer: EsViTTrainer, states: list[dict[str, Any]], info: DistInfo) -> None:
    if len(states) != info.world_size:
        log.warning("checkpoint has RNG states for %d ranks, run has %d: augmentation streams restart",
                    len(states), info.world_size)
        return
    s = states[info.rank]
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    trainer.load_extra_state(s)


def save_checkpoint(
    out_dir: Path, step: int, trainer: EsViTTrainer, opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None, cfg: Config, info: DistInfo, run_id: str | None,
) -> Path:
    """Gather RNG states from all ranks; rank 0 writes the checkpoint atomically and prunes.

    Every rank must call this (it gathers and synchronises); all ranks get the path back.

    Raises:
        NonFiniteLossError: The student or teacher holds NaN/inf weights (nothing is written, so
            the previous checkpoint stays the last good one).
    """
    device = next(trainer.student.parameters()).device
    if not all_true(_weights_finite(trainer), device):
        raise NonFiniteLossError(
            f"non-finite weights after step {step}: not writing a checkpoint (the newest checkpoint in "
            f"{out_dir} is the last good one). Lower optim.lr or keep optim.clip_grad > 0, then resume "
            "with --resume auto."
        )
    rng = gather_rng_states(trainer.extra_state(), info)
    path = ckpt.checkpoint_path(out_dir, step)
    if info.is_main:
        state = {
            "format_version": ckpt.FORMAT_VERSION,
            "step": step,
            "backbone": cfg.model.backbone,
            "student": trainer.student.state_dict(),
            "teacher": trainer.teacher.state_dict(),
            "view_center": trainer.view_loss.center.center,
            "region_center": trainer.region_loss.center.center if trainer.region_loss is not None else None,
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": rng,
            "config": config_to_dict(cfg),
            "wandb_run_id": run_id,
        }
        ckpt.atomic_save(state, path)
        ckpt.prune_checkpoints(out_dir, cfg.checkpoint.keep_last)
        log.info("saved %s", path)
    barrier()
    return path


def _weights_finite(trainer: EsViTTrainer) -> bool:
    """True when every floating-point tensor of the student and teacher state is finite."""
    return all(
        bool(torch.isfinite(v).all())
        for module in (trainer.student, trainer.teacher)
        for v in module.state_dict().values()
        if v.is_floating_point()
    )


def load_checkpoint_into(
    state: dict[str, Any], path: Path, trainer: EsViTTrainer, opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None, info: DistInfo,
) -> int:
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
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _restore_rng(trainer, state.get("rng", []), info)
    return int(state["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (they are re-logged by the resumed run)."""
    if not path.is_file():
        return
    import json

    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln) if ln.strip() else None
        except json.JSONDecodeError:
            rec = None
            log.warning("dropping a malformed line of %s (written by a killed run?)", path)
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def train(cfg: Config, resume: str | None = None, max_steps: int | None = None) -> TrainResult:
    """Run (or resume) a pretraining run described by ``cfg``.

    Args:
        cfg: Validated configuration.
        resume: None (fresh run; refuses a directory that already holds checkpoints), ``"auto"``
            (latest readable checkpoint in the output directory, fresh if none) or a path.
        max_steps: Stop after this global step (for tests and smoke runs); the schedules still
            span the full configured run.

    Returns:
        :class:`TrainResult` with the final step, last checkpoint and this process's losses.
    """
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {resume} (pass 'auto' or a checkpoint_*.pt file)")
    info, device = init_distributed(cfg.device)
    out_dir = Path(cfg.logging.output_dir)
    o = cfg.optim
    if o.batch_size % (info.world_size * o.accum_steps):
        raise ConfigError(f"optim.batch_size: {o.batch_size} is not divisible by world_size "
                          f"({info.world_size}) x optim.accum_steps ({o.accum_steps})")
    micro_batch = o.batch_size // (info.world_size * o.accum_steps)
    if resume is None and ckpt.list_checkpoints(out_dir):
        raise FileExistsError(f"{out_dir} already holds checkpoints: pass --resume auto to continue that run, "
                              "or choose another logging.output_dir")

    # ---- data: workers decode to a uint8 canvas; all augmentation runs on `device`
    dataset = build_dataset(
        cfg.data.kind, cfg.data.path, cfg.data.canvas_size,
        synthetic_images=cfg.data.synthetic_images, synthetic_classes=cfg.data.synthetic_classes,
        seed=cfg.seed, max_bad_fraction=cfg.data.max_bad_fraction, resize_mode=cfg.data.resize_mode,
    )
    sampler = EpochBlockSampler(len(dataset), micro_batch, info.rank, info.world_size, seed=cfg.seed)
    loader = build_loader(dataset, sampler, micro_batch, cfg.data.num_workers)
    batches_per_epoch = sampler.batches_per_epoch
    steps_per_epoch = batches_per_epoch // o.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"dataset has {len(dataset)} images: too few for one step of optim.batch_size="
                         f"{o.batch_size} (x accum); lower the batch size")
    bad_counter = BadImageCounter(cfg.data.max_bad_fraction, getattr(dataset, "paths", None))
    if cfg.knn.every_epochs and info.is_main and cfg.knn.train_path and cfg.knn.val_path:
        from esvit.eval.monitor import (
            monitor_preprocess,  # fail now on bad folders, not at the first epoch
        )

        pre, _, _ = monitor_preprocess(cfg.knn.train_path, cfg.knn.val_path, cfg.data.canvas_size,
                                       cfg.augment.global_size, cfg.knn.preprocess)
        log.info("kNN monitor every %d epochs, preprocessing: %s", cfg.knn.every_epochs, pre)

    # ---- model, optimiser, schedules
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (teacher = student copy)
    trainer = build_trainer(cfg, seed=cfg.seed).to(device)
    sync_batchnorm_if_needed(trainer, cfg.model.sync_bn, info)  # student and teacher, before DDP
    torch.manual_seed(cfg.seed * 1000 + 1 + info.rank)  # per-rank stream for dropout / drop-path
    trainer.set_shard(info.rank, info.world_size)
    if info.distributed:
        ddp = DDP(trainer.student, device_ids=[device.index] if device.type == "cuda" else None)
        trainer.set_student_forward(ddp)
    opt = torch.optim.AdamW(trainer.param_groups(), lr=0.0)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    sched = build_schedules(cfg, steps_per_epoch)
    total_steps = sched.total_steps if max_steps is None else min(max_steps, sched.total_steps)

    # ---- resume
    step, run_id, last_ckpt = 0, None, None
    if resume is not None:
        found = (ckpt.load_latest(out_dir) if resume == "auto"
                 else (Path(resume), ckpt.safe_load(resume)))
        if found is not None:
            last_ckpt, state = found
            step = load_checkpoint_into(state, last_ckpt, trainer, opt, scaler, info)
            run_id = state.get("wandb_run_id")
            log.info("resumed from %s at step %d", last_ckpt, step)
            if info.is_main:
                _truncate_metrics(out_dir / "metrics.jsonl", step)
        elif info.is_main:
            log.info("no checkpoint in %s: starting a fresh run", out_dir)
    if info.is_main:  # only now: a refused or failed resume leaves the run's config.yaml alone
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    logger = MetricLogger(out_dir, cfg.logging.wandb, cfg.logging.wandb_project, run_id,
                          config_to_dict(cfg), active=info.is_main)

    if info.is_main:
        log.info("%d images, %d steps/epoch, %d epochs, global batch %d (%d/rank x %d ranks x %d accum), "
                 "device %s, amp %s", len(dataset), steps_per_epoch, o.epochs, o.batch_size, micro_batch,
                 info.world_size, o.accum_steps, device, dtype)
    trainer.train()
    losses: list[float] = []
    monitor = CollapseMonitor(trainer.out_dim, region_out_dim=trainer.region_out_dim)
    bar = tqdm(total=total_steps, initial=step, disable=not (info.is_main and cfg.logging.progress),
               dynamic_ncols=True, desc="esvit")
    t_last, imgs_since = time.perf_counter(), 0
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            loader.sampler.set_epoch(epoch)
            loader.sampler.set_start((step - epoch * steps_per_epoch) * o.accum_steps)
            it = iter(loader)
            for _ in range(steps_per_epoch - step % steps_per_epoch):
                if step >= total_steps:
                    break
                vals = sched.at(step)
                for i, g in enumerate(opt.param_groups):
                    g["lr"] = vals.lr
                    if g.get("apply_wd", i == 0):
                        g["weight_decay"] = vals.weight_decay
                opt.zero_grad(set_to_none=True)
                step_metrics: dict[str, float] = {}
                for micro in range(o.accum_steps):
                    images, _, ok = next(it)
                    bad_counter.update(ok)
                    sync = micro == o.accum_steps - 1 or not info.distributed
                    ctx = contextlib.nullcontext() if sync else trainer._student_forward.no_sync()
                    with ctx:
                        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                            out = trainer(images, vals.teacher_temp, vals.region_weight)
                        loss = out["loss"]
                        if not all_true(bool(torch.isfinite(loss).item()), device):
                            raise NonFiniteLossError(
                                f"non-finite loss ({loss.item()}) at step {step + 1} (epoch {epoch}); stopping without "
                                f"saving. Last good checkpoint: {last_ckpt or 'none'}. Lower optim.lr, check the "
                                "data, or keep optim.clip_grad > 0, then resume with --resume auto."
                            )
                        loss_scaled = loss / o.accum_steps
                        (scaler.scale(loss_scaled) if scaler is not None else loss_scaled).backward()
                    for k, v in out.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + float(v.detach()) / o.accum_steps
                step_metrics = _mean_over_ranks(step_metrics, device, info)
                if scaler is not None:
                    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                # a frozen last layer's gradients are dropped first: they count in no norm
                grad_norm = clip_gradients(trainer.student.parameters(), o.clip_grad, o.clip_mode,
                                           frozen=trainer.last_layer_parameters() if vals.freeze_last_layer else ())
                if grad_norm is not None and scaler is None and not torch.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f"non-finite gradient norm ({float(grad_norm)}) at step {step + 1} (epoch {epoch}); "
                        f"stopping before the update. Last good checkpoint: {last_ckpt or 'none'}. Lower "
                        "optim.lr or check the data, then resume with --resume auto."
                    )
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                trainer.update_teacher(vals.teacher_momentum)
                step += 1
                losses.append(step_metrics["loss"])
                imgs_since += o.batch_size
                if info.is_main:
                    monitor.update(step_metrics, step)

                # ---- monitoring
                if step % cfg.logging.log_every == 0 or step == total_steps or step == 1:
                    now = time.perf_counter()
                    ips = imgs_since / max(now - t_last, 1e-9)
                    t_last, imgs_since = now, 0
                    rec = {**step_metrics, "lr": vals.lr, "weight_decay": vals.weight_decay,
                           "teacher_momentum": vals.teacher_momentum, "teacher_temp": vals.teacher_temp,
                           "region_weight": vals.region_weight if trainer.region_loss is not None else 0.0,
                           "epoch": step / steps_per_epoch, "images_per_s": ips, "bad_images": bad_counter.bad}
                    if grad_norm is not None:
                        rec["grad_norm"] = float(grad_norm)
                    logger.log(rec, step)
                    bar.set_postfix(loss=f"{step_metrics['loss']:.4f}", lr=f"{vals.lr:.2e}", img_s=f"{ips:.0f}")
                bar.update(1)
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total_steps:
                    last_ckpt = save_checkpoint(out_dir, step, trainer, opt, scaler, cfg, info, logger.run_id)
            epoch_done = step % steps_per_epoch == 0
            if epoch_done:
                bad_counter.finalize()  # checks the limit even below the counter's min_samples
            if epoch_done and step < total_steps:
                e = step // steps_per_epoch
                if cfg.checkpoint.every_epochs and e % cfg.checkpoint.every_epochs == 0:
                    last_ckpt = save_checkpoint(out_dir, step, trainer, opt, scaler, cfg, info, logger.run_id)
                if cfg.knn.every_epochs and e % cfg.knn.every_epochs == 0:
                    _knn_monitor(cfg, trainer, device, info, logger, step)
        bad_counter.finalize()
        if bad_counter.bad:
            log.warning("%d of %d samples (%.2f%%) were unreadable images replaced by substitutes "
                        "(data.max_bad_fraction=%g); first: %s", bad_counter.bad, bad_counter.seen,
                        100 * bad_counter.fraction, bad_counter.max_bad_fraction,
                        "; ".join(bad_counter.first_bad) or "unknown")
        if last_ckpt != ckpt.checkpoint_path(out_dir, step):
            last_ckpt = save_checkpoint(out_dir, step, trainer, opt, scaler, cfg, info, logger.run_id)
    finally:
        bar.close()
        logger.close()
    return TrainResult(out_dir, step, last_ckpt, losses)


def build_loader(dataset: Any, sampler: EpochBlockSampler, batch_size: int, num_workers: int) -> DataLoader:
    """DataLoader over uint8 canvases (letterboxed ``Canvas`` batches with ``data.resize_mode``
    letterbox); pinned memory and persistent workers only where useful."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def _mean_over_ranks(metrics: dict[str, float], device: torch.device, info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over ranks (the global-batch value, as one process would see it)."""
    if not info.distributed:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


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
                          cfg.knn.temperature, cfg.knn.max_train_images, cfg.data.num_workers,
                          cfg.knn.preprocess)
    finally:
        trainer.train(was_training)
    logger.log({f"knn_{k}": v for k, v in res.items()}, step)
    log.info("step %d: kNN top-1 %.2f%%", step, res["top1"])
    barrier()
