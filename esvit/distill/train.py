"""Knowledge distillation from a frozen teacher into a student classifier: the training loop.

``distill(cfg, resume=...)`` is what ``esvit-distill`` / ``distill.py`` call. The run machinery
(output directory and its lock, resume checks, atomic checkpoints, metrics, stop signals, NaN
guard, AMP, DDP, bounded data waits) is :class:`esvit.run.engine.Run`, shared with pretraining;
the pieces by role are :mod:`esvit.distill.data` (splits), :mod:`esvit.distill.augment`
(:class:`TrainAugment`, batched on the device), :mod:`esvit.distill.teachers`,
:mod:`esvit.distill.evaluate`, :mod:`esvit.distill.exports` and the objective,
:class:`esvit.distill.methods.MethodRunner` (any registered ``loss.kind``: its trainable parts are
optimised with the student and its state is the checkpoint's ``distiller``). This module keeps the
distillation step, its learning-rate rule (epochs or a CPU budget) and the final report.

Output directory: ``config.yaml``, ``metrics.jsonl``, ``checkpoint_XXXXXXXX.pt``,
``distill_results.json`` (validation top-1 / top-5 of the student and the teacher; for the
label-free kinds kNN / linear top-1 of ``student_backbone.pt`` and of the teacher's features on a
labelled validation set, or ``"val": null`` with the reason when there is none),
``student.pt`` (the classifier; a valid ``teacher.kind=classifier`` input),
``student_backbone.pt`` (an esvit backbone export: usable by ``esvit-linear`` / ``esvit-knn``)
and, for DeiT students, ``student_vit.pt`` (plain torchvision ``VisionTransformer`` state dict).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from esvit.config import config_to_dict
from esvit.data import BadImageCounter
from esvit.data.sampler import EpochBlockSampler
from esvit.distill.augment import TrainAugment
from esvit.distill.config import LABEL_FREE_KINDS, DistillConfig
from esvit.distill.data import DataSplits, build_splits
from esvit.distill.deit import DeiTVisionTransformer, build_student
from esvit.distill.evaluate import evaluate, log_eval, score_features
from esvit.distill.exports import (
    CHECKPOINT_FORMAT,
    CLASSIFIER_FORMAT,
    FORMAT_VERSION,
    PLAIN_VIT_FORMAT,
    RESULTS_FILE,
    write_exports,
)
from esvit.distill.methods import DistillContext, MethodRunner
from esvit.distill.teachers import FrozenTeacher, build_teacher, load_classifier
from esvit.eval.features import make_loader, preprocess
from esvit.run.engine import Run, RunSpec, Throughput
from esvit.run.errors import NonFiniteLossError
from esvit.run.fsio import atomic_write_text
from esvit.run.resume import dataset_identity
from esvit.schedules import warmup_cosine
from esvit.train import checkpoint as ckpt
from esvit.train.distributed import barrier, mean_over_ranks
from esvit.train.optim import clip_gradients

__all__ = [
    "CHECKPOINT_FORMAT",
    "CLASSIFIER_FORMAT",
    "FREE_KEYS",
    "PLAIN_VIT_FORMAT",
    "RESULTS_FILE",
    "DataSplits",
    "DistillResult",
    "FrozenTeacher",
    "NonFiniteLossError",
    "TrainAugment",
    "build_splits",
    "build_teacher",
    "distill",
    "evaluate",
    "load_classifier",
]

log = logging.getLogger("esvit.distill")

FREE_KEYS = ("logging", "checkpoint", "eval", "device", "data.num_workers", "data.max_bad_fraction", "data.path",
             "data.val_path", "data.loader_timeout_s")
"""Config keys a resume may change without ``--allow-config-change`` (the data's identity is checked)."""
HINT = "Lower optim.lr or set optim.clip_grad, then resume with --resume auto."


@dataclass
class DistillResult:
    """Summary of a finished run.

    Attributes:
        output_dir: Run directory.
        step: Final global optimiser step.
        last_checkpoint: Last checkpoint written (or resumed from).
        losses: Per-step training loss of this process (this invocation only).
        results: What ``distill_results.json`` holds (rank 0; empty elsewhere).
    """

    output_dir: Path
    step: int
    last_checkpoint: Path | None
    losses: list[float]
    results: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Parts:
    """What one distillation run works with."""

    splits: DataSplits
    sampler: EpochBlockSampler
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    total: int
    stop: int
    student: nn.Module
    teacher: FrozenTeacher | None
    augment: TrainAugment
    runner: MethodRunner  # the loss.kind distiller with its feature taps
    opt: torch.optim.Optimizer
    meta: dict[str, Any]
    bad_counter: BadImageCounter
    facts: dict[str, Any]
    model: nn.Module | None = None  # the student, DDP-wrapped under torchrun
    cached: Tensor | None = None  # teacher.mode=cached: logits of the training images


class _CpuClock:
    """CPU seconds of the run (``time.process_time``), including those before a resume."""

    def __init__(self) -> None:
        self.before, self._t0 = 0.0, time.process_time()

    def __call__(self) -> float:
        return self.before + time.process_time() - self._t0

    def fraction(self, budget: float, run: Run) -> float:
        """Fraction of ``budget`` used, maximum over ranks (identical on all ranks)."""
        t = torch.tensor([self() / budget], dtype=torch.float64, device=run.device)
        if run.info.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())


# ------------------------------------------------------------------------------------ set-up


def _build(cfg: DistillConfig, run: Run, max_steps: int | None) -> _Parts:
    """Data (workers decode to a uint8 canvas; augmentation runs on the device), models, optimiser."""
    o, info = cfg.optim, run.info
    splits = build_splits(cfg)
    sampler = EpochBlockSampler(len(splits.train), run.micro_batch, info.rank, info.world_size, seed=cfg.seed)
    steps_per_epoch = sampler.batches_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(splits.train)} images: too few for one step of "
                         f"optim.batch_size={o.batch_size}; lower the batch size")
    loader = run.loader(splits.train, sampler, run.micro_batch, cfg.data)
    total = o.total_steps or o.epochs * steps_per_epoch
    base_paths = getattr(splits.train.base, "paths", None)
    student, teacher, augment = _build_models(cfg, run, splits.classes)
    torch.manual_seed(cfg.seed)  # identical distiller (regressors, heads, exits) on every rank
    ctx = DistillContext(student, teacher, len(splits.classes) if splits.labeled else 0, len(splits.train),
                         cfg.augment.image_size,
                         steps_per_epoch, cfg.loss.label_smoothing, cfg.seed)
    runner = MethodRunner.build(cfg.loss, ctx)
    torch.manual_seed(cfg.seed * 1000 + 1 + info.rank)  # per-rank stream for dropout
    run.make_amp(o.amp)
    names = _Take(base_paths, splits.train.indices) if base_paths is not None else None
    facts = {"steps_per_epoch": steps_per_epoch, "total_steps": total,
             "num_classes": len(splits.classes) if splits.labeled else 0,
             **dataset_identity(names, splits.train.labels, len(splits.train))}
    return _Parts(splits, sampler, loader, steps_per_epoch, total, total if max_steps is None else min(max_steps, total),
                  student, teacher, augment, runner, _build_optimizer(student, cfg, runner.distiller),
                  _student_meta(cfg, splits.classes), BadImageCounter(cfg.data.max_bad_fraction, base_paths), facts)


def _build_models(cfg: DistillConfig, run: Run, classes: list[str]
                  ) -> tuple[nn.Module, FrozenTeacher | None, TrainAugment]:
    torch.manual_seed(cfg.seed)  # identical initial student on every rank
    # a flat folder (label-free kinds) has no classes: the student keeps a one-class head, never trained
    student = build_student(cfg.student.backbone, cfg.student.backbone_kwargs, max(len(classes), 1), cfg.student.deit)
    if cfg.student.init_checkpoint:
        _init_student(student, cfg)
    student.to(run.device)
    teacher = (build_teacher(cfg.teacher, classes, cfg.augment.image_size, run.device)
               if cfg.teacher.kind != "none" else None)
    a = cfg.augment
    augment = TrainAugment(a.image_size, a.scale, a.ratio, a.flip, seed=cfg.seed * 1_000_003 + 1,
                           rank=run.info.rank, world_size=run.info.world_size)
    return student, teacher, augment


class _Take(Sequence[str]):
    """``seq[indices[i]]`` without building the list (the file names of a split)."""

    def __init__(self, seq: Sequence[str], indices: np.ndarray) -> None:
        self.seq, self.indices = seq, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self.seq[int(self.indices[i])]


def _build_optimizer(model: nn.Module, cfg: DistillConfig, extra: nn.Module | None = None
                     ) -> torch.optim.Optimizer:
    """AdamW / SGD over the student's then ``extra``'s (the distiller's) parameters; no weight decay
    on biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    named = itertools.chain(model.named_parameters(), extra.named_parameters() if extra is not None else ())
    for name, p in named:
        if not p.requires_grad:
            continue
        last = name.rsplit(".", 1)[-1]
        (no_decay if p.ndim <= 1 or "token" in last or "pos_embedding" in last else decay).append(p)
    groups = [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, nesterov=o.momentum > 0,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=o.weight_decay)


def _init_student(student: nn.Module, cfg: DistillConfig) -> None:
    """Copy the backbone weights of ``student.init_checkpoint`` into the student."""
    from esvit.export import load_backbone_info

    s = cfg.student
    info = load_backbone_info(s.init_checkpoint, s.backbone, "teacher", s.backbone_kwargs)
    state = info.net.state_dict()
    if isinstance(student, DeiTVisionTransformer):
        missing, unexpected = student.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith(("heads.", "head_dist.", "dist_"))]
        if bad or unexpected:
            raise ckpt.CheckpointError(f"student.init_checkpoint: {s.init_checkpoint} does not fit the DeiT "
                                       f"student (missing {bad[:5]}, unexpected {unexpected[:5]})")
    else:
        student.backbone.load_state_dict(state)
    log.info("student backbone initialised from %s", s.init_checkpoint)


def _student_meta(cfg: DistillConfig, classes: list[str]) -> dict[str, Any]:
    s = cfg.student
    return {"backbone": s.backbone, "backbone_kwargs": dict(s.backbone_kwargs), "deit": s.deit,
            "num_classes": max(len(classes), 1), "classes": list(classes), "image_size": cfg.augment.image_size}


def _teacher_logits_cache(cfg: DistillConfig, run: Run, p: _Parts) -> Tensor:
    """Teacher logits ``(N, C)`` of the un-augmented training images (computed once, cached on disk)."""
    teacher, train, info, device = p.teacher, p.splits.train, run.info, run.device
    assert teacher is not None
    key = json.loads(json.dumps({"teacher": config_to_dict(cfg.teacher), "data": config_to_dict(cfg.data),
                                 "n": len(train), "indices_sum": int(train.indices.sum()),
                                 "size": teacher.image_size, "seed": cfg.seed}, default=str))
    path = run.out_dir / "teacher_logits.pt"
    if path.is_file():
        try:
            obj = ckpt.safe_load(path)
            if obj.get("key") == key:
                log.info("teacher logits loaded from %s", path)
                return obj["logits"]
        except ckpt.CheckpointError as e:
            log.warning("ignoring unreadable %s (%s)", path, e)
    shard = np.arange(info.rank, len(train), info.world_size)
    out = torch.zeros(len(train), teacher.num_classes, device=device)
    loader = make_loader(torch.utils.data.Subset(train, shard.tolist()), cfg.eval.batch_size, cfg.data.num_workers)
    for images, _, _, pos in tqdm(loader, desc="teacher logits", disable=not (info.is_main and cfg.logging.progress),
                                  leave=False):
        x = preprocess(images.to(device, non_blocking=device.type == "cuda"), teacher.image_size)
        out[torch.as_tensor(pos, device=device)] = teacher(x)
    if info.distributed:
        torch.distributed.all_reduce(out)
    out = out.cpu()
    run.on_rank0(lambda: ckpt.atomic_save({"key": key, "logits": out}, path, "teacher logits cache"))
    return out


# ------------------------------------------------------------------------------------ checkpoints


def _save_checkpoint(run: Run, step: int, p: _Parts, cpu_s: float) -> Path:
    """Every rank calls this (RNG states are gathered); rank 0 writes atomically and prunes."""
    def state() -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "student": p.student.state_dict(),
                "student_meta": p.meta, "optimizer": p.opt.state_dict(), "scaler": run.amp.state_dict(),
                "cpu_s": cpu_s, "distiller": p.runner.state_dict()}

    tensors = itertools.chain(p.student.state_dict().values(), p.runner.state_dict().values())
    finite = all(bool(torch.isfinite(v).all()) for v in tensors if isinstance(v, Tensor) and v.is_floating_point())
    return run.save(step, state, {"augment": p.augment.get_state()}, finite)


def _load_checkpoint(state: dict[str, Any], path: Path, p: _Parts, run: Run, clock: _CpuClock) -> int:
    """Validate and restore a distillation checkpoint; return its step."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ckpt.CheckpointError(f"{path} is not an esvit-distill checkpoint (format {state.get('format')!r})")
    for key in ("step", "student", "optimizer"):
        if key not in state:
            raise ckpt.CheckpointError(f"{path} is not a complete esvit-distill checkpoint (missing {key!r})")
    ckpt.check_state_dict(p.student, state["student"], f"{path} [student]")
    p.student.load_state_dict(state["student"])
    distiller = state.get("distiller", {})  # absent in checkpoints of logit kinds written before the registry
    try:
        p.runner.load_state_dict(distiller)
    except (RuntimeError, KeyError, TypeError) as e:
        raise ckpt.CheckpointError(f"{path} [distiller] does not match loss.kind={p.runner.distiller.name}: "
                                   f"{str(e).splitlines()[0]}") from None
    p.opt.load_state_dict(state["optimizer"])
    run.amp.load_state_dict(state.get("scaler"))
    run.restore_rng(state.get("rng") or [], lambda s: p.augment.set_state(s["augment"]))
    clock.before = float(state.get("cpu_s", 0.0))
    return int(state["step"])


# ------------------------------------------------------------------------------------------- loop


def distill(cfg: DistillConfig, resume: str | None = None, max_steps: int | None = None,
            allow_config_change: bool = False) -> DistillResult:
    """Run (or resume) a distillation run described by ``cfg``.

    Args:
        cfg: Validated configuration (:func:`esvit.distill.config.load_distill_config`).
        resume: None (fresh run; refuses a directory holding checkpoints), ``"auto"`` (latest
            readable checkpoint in the output directory, fresh if none) or a checkpoint path.
        max_steps: Stop after this global step (smoke tests); schedules span the full run, and
            no final evaluation / export happens before the last step.
        allow_config_change: Resume even if the config or the run's facts differ from the
            checkpoint's; the differences are logged.

    Returns:
        :class:`DistillResult`.

    Raises:
        Preempted: SIGTERM / SIGINT / SIGUSR1: a checkpoint was written (see :mod:`esvit.run`).
        RunError: The other expected faults, each a one-line message.
    """
    wall0, clock = time.perf_counter(), _CpuClock()
    spec = RunSpec("esvit-distill", cfg, FREE_KEYS, cfg.optim.batch_size, 1, HINT, checkpoint_kind="distill")
    with Run(spec, resume, allow_config_change) as run:
        p = _build(cfg, run, max_steps)
        step = run.resume_state(p.facts, lambda path, state: _load_checkpoint(state, path, p, run, clock))
        run.start_logging(step)
        if p.teacher is not None and cfg.teacher.mode == "cached":
            p.cached = _teacher_logits_cache(cfg, run, p)
        p.model = run.ddp(p.student)
        _log_summary(cfg, run, p)
        step, losses, exhausted = _fit(cfg, run, p, step, clock)
        results: dict[str, Any] = {}
        if (step >= p.total or exhausted) and run.info.is_main:
            results = _final_report(cfg, run, p, step, clock(), time.perf_counter() - wall0, losses)
        barrier()
        return DistillResult(run.out_dir, step, run.last_checkpoint, losses, results)


def _log_summary(cfg: DistillConfig, run: Run, p: _Parts) -> None:
    if not run.info.is_main:
        return
    s, val = p.splits, p.splits.val
    log.info("student %s%s (%d params), teacher: %s, loss %s; %d train / %s val images (%s), %d classes, "
             "%d steps/epoch, %d steps, global batch %d on %d rank(s), device %s",
             cfg.student.backbone, " + DeiT token" if cfg.student.deit else "",
             sum(q.numel() for q in p.student.parameters()), p.teacher.description if p.teacher else "none",
             cfg.loss.kind, len(s.train), len(val) if val is not None else 0, s.val_source, len(s.classes),
             p.steps_per_epoch, p.total, cfg.optim.batch_size, run.info.world_size, run.device)


def _fit(cfg: DistillConfig, run: Run, p: _Parts, step: int, clock: _CpuClock) -> tuple[int, list[float], bool]:
    """Train from ``step``; returns the final step, this process's losses and whether the CPU budget ran out."""
    losses: list[float] = []
    p.student.train()
    p.runner.train()
    bar, meter = run.progress(p.stop, step, "distill"), Throughput()
    spe, every, exhausted = p.steps_per_epoch, cfg.checkpoint.every_steps, False

    def save(at: int) -> Path:
        return _save_checkpoint(run, at, p, clock())

    while step < p.stop and not exhausted:
        epoch = step // spe
        p.sampler.set_epoch(epoch)
        p.sampler.set_start(step - epoch * spe)
        it = run.batches(p.loader)
        for _ in range(spe - step % spe):
            if step >= p.stop:
                break
            run.stop_if_signalled(step, lambda at=step: save(at))
            lr = _lr_at(cfg, run, p, step, clock)
            if lr is None:
                exhausted = True
                break
            metrics, grad_norm = _train_step(cfg, run, p, it, step, lr)
            step += 1
            losses.append(metrics["loss"])
            meter.add(cfg.optim.batch_size)
            rec = {**metrics, "lr": lr, "cpu_s": clock()}
            run.log_step(step, p.stop, p.steps_per_epoch, rec, grad_norm, meter, bar, p.bad_counter.bad,
                         **({"acc": f"{rec['acc']:.1f}"} if "acc" in rec else {}))
            if every and step % every == 0 and step < p.stop:
                save(step)
        if step % spe == 0 and step < p.stop and not exhausted:
            _end_of_epoch(cfg, run, p, step, save)
    p.bad_counter.finalize()
    if run.needs_save(step):
        save(step)
    run.stop_if_signalled(step, lambda: save(step))  # a stop signal skips the final report (the resume does it)
    return step, losses, exhausted


def _lr_at(cfg: DistillConfig, run: Run, p: _Parts, step: int, clock: _CpuClock) -> float | None:
    """Learning rate of ``step``: warmup + cosine over the run, or over the CPU budget (None: spent)."""
    o = cfg.optim
    peak = o.lr * o.batch_size / 256.0
    if o.cpu_budget_s <= 0:
        return warmup_cosine(step, p.total, round(o.warmup_epochs * p.steps_per_epoch), peak, o.min_lr)
    frac = clock.fraction(o.cpu_budget_s, run)
    if frac >= 1.0:
        return None
    n = 1_000_000  # schedule over the used fraction of the budget
    return warmup_cosine(round(frac * n), n, round(min(o.warmup_epochs / o.epochs, 1.0) * n), peak, o.min_lr)


def _train_step(cfg: DistillConfig, run: Run, p: _Parts, it: Any, step: int, lr: float
                ) -> tuple[dict[str, float], Tensor | None]:
    """One optimiser step at 0-based global step ``step``; returns the metrics (mean over ranks)."""
    o, device, amp = cfg.optim, run.device, run.amp
    for g in p.opt.param_groups:
        g["lr"] = lr
        if g["apply_wd"]:
            g["weight_decay"] = o.weight_decay
    images, labels, ok, pos = next(it)
    p.bad_counter.update(torch.as_tensor(ok, dtype=torch.bool))
    nb = device.type == "cuda"
    images, labels = images.to(device, non_blocking=nb), labels.to(device, non_blocking=nb)
    if not p.splits.labeled:
        labels = None  # a flat folder (label-free kinds)
    x = p.augment(images)
    cached = p.cached[pos].to(device, non_blocking=nb) if p.cached is not None else None
    with amp.autocast():
        out, t_logits, parts = p.runner.step(x, labels, torch.as_tensor(pos, device=device), step,
                                             student_call=p.model, teacher_logits=cached)
    epoch = step // p.steps_per_epoch
    run.check_loss(parts["loss"], step + 1, epoch)
    p.opt.zero_grad(set_to_none=True)
    amp.backward(parts["loss"])
    p.runner.sync_gradients()  # the distiller is not DDP-wrapped: average its gradients here
    amp.unscale(p.opt)
    # one global norm, as DeiT clips (timm NativeScaler: clip_grad_norm_)
    grad_norm = clip_gradients(itertools.chain(p.student.parameters(), p.runner.parameters()), o.clip_grad,
                               "global")
    run.check_grad_norm(grad_norm, step + 1, epoch)
    amp.step(p.opt)
    with torch.no_grad():
        logits = out[0] if isinstance(out, tuple) else out
        metrics = {k: float(v.detach()) for k, v in parts.items()}
        if logits is None:
            return mean_over_ranks(metrics, device, run.info), grad_norm
        if labels is not None:
            metrics["acc"] = float((logits.argmax(1) == labels).float().mean()) * 100
        if t_logits is not None:
            metrics["teacher_agree"] = float((logits.argmax(1) == t_logits.argmax(1)).float().mean()) * 100
    return mean_over_ranks(metrics, device, run.info), grad_norm


def _end_of_epoch(cfg: DistillConfig, run: Run, p: _Parts, step: int, save: Callable[[int], Path]) -> None:
    """Epoch checkpoint and validation when ``step`` closes an epoch."""
    e = step // p.steps_per_epoch
    if cfg.checkpoint.every_epochs and e % cfg.checkpoint.every_epochs == 0 and run.needs_save(step):
        save(step)
    if cfg.eval.every_epochs and e % cfg.eval.every_epochs == 0:
        if run.info.is_main and p.splits.val is not None and cfg.loss.kind in LABEL_FREE_KINDS:
            res = score_features(p.student.backbone, p.splits.val, cfg.augment.image_size, run.device,
                                 cfg.eval.batch_size, cfg.data.num_workers)
            log_eval(run.logger, res, step)
            log.info("step %d: val kNN top-1 %s, linear top-1 %s", step, res.get("knn_top1"), res.get("linear_top1"))
        elif run.info.is_main and p.splits.val is not None:
            res = evaluate(p.student, p.splits.val, cfg.augment.image_size, run.device, cfg.eval.batch_size,
                           cfg.data.num_workers)
            log_eval(run.logger, res, step)
            log.info("step %d: val top-1 %.2f%%", step, res["top1"])
        barrier()


def _final_report(cfg: DistillConfig, run: Run, p: _Parts, step: int, cpu: float, wall: float,
                  losses: list[float]) -> dict[str, Any]:
    """Rank 0: validation of student (and teacher), exports, ``distill_results.json``."""
    nw, splits, teacher = cfg.data.num_workers, p.splits, p.teacher
    results: dict[str, Any] = {
        "student": {**p.meta, "deit": cfg.student.deit}, "loss": cfg.loss.kind,
        "teacher": {"kind": cfg.teacher.kind, "mode": cfg.teacher.mode,
                    "description": teacher.description if teacher else None,
                    "image_size": teacher.image_size if teacher else None},
        "num_classes": len(splits.classes), "classes": splits.classes, "n_train": len(splits.train),
        "n_val": len(splits.val) if splits.val is not None else 0, "val_source": splits.val_source,
        "steps": step, "epochs": step / p.steps_per_epoch, "total_steps": p.total, "cpu_s": cpu,
        "cpu_budget_s": cfg.optim.cpu_budget_s or None,
        "wall_s": wall, "final_train_loss": losses[-1] if losses else None,
    }
    if cfg.loss.kind in LABEL_FREE_KINDS:
        results["files"] = write_exports(run.out_dir, p.student, p.meta)
        results.update(_label_free_scores(cfg, run, p, step))
    elif splits.val is not None:
        results["val"] = evaluate(p.student, splits.val, cfg.augment.image_size, run.device, cfg.eval.batch_size, nw)
        log_eval(run.logger, results["val"], step)
        if teacher is not None and cfg.eval.teacher:
            results["teacher_val"] = evaluate(teacher, splits.val, teacher.image_size, run.device,
                                              cfg.eval.batch_size, nw)
            log_eval(run.logger, results["teacher_val"], step, "teacher_val")
    else:
        log.warning("no validation split (set data.val_path or data.val_split): accuracy not reported")
    if "files" not in results:
        results["files"] = write_exports(run.out_dir, p.student, p.meta)
    atomic_write_text(run.out_dir / RESULTS_FILE, json.dumps(results, indent=2, sort_keys=True) + "\n", "results")
    return results



def _label_free_scores(cfg: DistillConfig, run: Run, p: _Parts, step: int) -> dict[str, Any]:
    """kNN / linear top-1 of ``student_backbone.pt`` (reloaded as esvit-knn would) and of the teacher's
    features on the labelled validation set; ``val: None`` and the reason when there is none."""
    from esvit.eval.features import FeatureEncoder
    from esvit.export import load_backbone_info

    val, nw, bs = p.splits.val, cfg.data.num_workers, cfg.eval.batch_size
    if val is None:
        why = ("no labelled validation set (set data.val_path to a folder with one subfolder per class): "
               "kNN / linear accuracy not reported")
        log.warning(why)
        return {"val": None, "val_note": why}
    info = load_backbone_info(run.out_dir / "student_backbone.pt", map_location=run.device)
    res: dict[str, Any] = {"val": score_features(FeatureEncoder(info.net, info.spec), val, cfg.augment.image_size,
                                                 run.device, bs, nw)}
    res["val"]["scored"] = "student_backbone.pt (pooled features)"
    log_eval(run.logger, res["val"], step)
    teacher = p.teacher
    if teacher is not None and cfg.eval.teacher:
        encoder = teacher if teacher.output == "features" else None
        if encoder is None and isinstance(getattr(teacher, "net", None), nn.Sequential):
            encoder = teacher.net[0]  # a linear teacher: its backbone's features
        if encoder is not None:
            res["teacher_val"] = score_features(encoder, val, teacher.image_size, run.device, bs, nw)
            log_eval(run.logger, res["teacher_val"], step, "teacher_val")
    return res
