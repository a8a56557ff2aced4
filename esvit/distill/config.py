"""Configuration of knowledge-distillation runs (dataclasses, YAML, dotted overrides).

Loaded with :func:`esvit.config.load_yaml_config` like the pretraining config: an unknown key
or a wrong type is a :class:`~esvit.config.ConfigError` naming the dotted key, and
:func:`validate_distill` checks ranges and cross-field constraints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esvit.config import (
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    check_ranges,
    load_yaml_config,
)

__all__ = [
    "LOSS_KINDS",
    "TEACHER_KINDS",
    "DistillAugmentConfig",
    "DistillCheckpointConfig",
    "DistillConfig",
    "DistillDataConfig",
    "DistillEvalConfig",
    "DistillLoggingConfig",
    "DistillLossConfig",
    "DistillOptimConfig",
    "StudentConfig",
    "TeacherConfig",
    "load_distill_config",
    "validate_distill",
]

TEACHER_KINDS = ("none", "linear", "torchvision", "classifier")
TEACHER_MODES = ("online", "cached")
LOSS_KINDS = ("ce", "kd", "dkd", "dist", "deit_soft", "deit_hard")
DATA_KINDS = ("folder", "synthetic", "cifar10", "cifar100")


@dataclass
class StudentConfig:
    """The network being trained: a registry backbone plus a linear head.

    ``deit: true`` adds the DeiT distillation token and head (ViT backbones only; needs a
    ``deit_soft`` / ``deit_hard`` loss). ``init_checkpoint`` optionally initialises the
    backbone from an esvit checkpoint / export (e.g. a self-supervised one).
    """

    backbone: str = "vit_nano"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    deit: bool = False
    init_checkpoint: str | None = None


@dataclass
class TeacherConfig:
    """The frozen teacher.

    ``kind``:

    * ``none``: no teacher (labels only; ``loss.kind=ce``), the baseline;
    * ``linear``: a backbone pretrained here (``checkpoint``: training checkpoint, export or bare
      state dict with ``backbone``) plus the ``linear_classifier.pt`` written by
      ``esvit-linear`` (``linear_head``; default ``<checkpoint dir>/linear_eval/linear_classifier.pt``;
      ``backbone`` / ``backbone_kwargs`` describe bare state dicts, as in ``esvit-linear``);
    * ``torchvision``: ``torchvision.models.get_model(arch, num_classes=..., **arch_kwargs)``
      with weights from the local state-dict file ``weights`` (never downloaded;
      ``random_init: true`` allows random weights for smoke tests);
    * ``classifier``: a student written by ``esvit-distill`` (its checkpoint or ``student.pt``).

    ``mode``: ``online`` runs the teacher on every augmented crop (standard); ``cached``
    computes its logits once on the un-augmented training images (cheap; the crop the student
    sees then differs from the teacher's view). ``image_size``: teacher input resolution
    (default: the recorded one, else the student's).
    """

    kind: str = "linear"
    checkpoint: str | None = None
    checkpoint_key: str = "teacher"
    backbone: str | None = None
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    linear_head: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    random_init: bool = False
    image_size: int | None = None
    mode: str = "online"


@dataclass
class KDParams:
    """Hinton KD: ``alpha * CE + (1 - alpha) * T^2 * KL``."""

    alpha: float = 0.5
    temperature: float = 4.0


@dataclass
class DKDParams:
    """DKD: ``ce_weight * CE + ramp * (alpha * TCKD + beta * NCKD)``; ramp 0 -> 1 over ``warmup_epochs``."""

    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    ce_weight: float = 1.0
    warmup_epochs: float = 0.0


@dataclass
class DISTParams:
    """DIST: ``ce_weight * CE + tau^2 * (beta * inter + gamma * intra)``."""

    beta: float = 1.0
    gamma: float = 1.0
    tau: float = 1.0
    ce_weight: float = 1.0


@dataclass
class DeiTParams:
    """DeiT: ``(1 - alpha) * CE(cls) + alpha * distill(dist)`` (``tau``: soft only)."""

    alpha: float = 0.5
    tau: float = 1.0


@dataclass
class DistillLossConfig:
    """Objective: ``kind`` picks one of the parameter sections below."""

    kind: str = "kd"
    label_smoothing: float = 0.0
    kd: KDParams = field(default_factory=KDParams)
    dkd: DKDParams = field(default_factory=DKDParams)
    dist: DISTParams = field(default_factory=DISTParams)
    deit: DeiTParams = field(default_factory=DeiTParams)


@dataclass
class DistillDataConfig:
    """Labeled training data and the validation split.

    ``kind``: ``folder`` (``path``: one subfolder per class), ``synthetic``, ``cifar10`` or
    ``cifar100`` (torchvision copies on disk). Validation: ``val_path`` (folder with the same
    class names), else ``val_split`` > 0 (the last ``val_split`` images of every class of the
    training data, sorted order), else the test split of ``synthetic`` / ``cifar*`` kinds (none
    for folders). ``max_train_per_class`` > 0 keeps only the first images of every class.
    """

    kind: str = "folder"
    path: str | None = None
    val_path: str | None = None
    val_split: int = 0
    max_train_per_class: int = 0
    canvas_size: int = 32
    num_workers: int = 2
    max_bad_fraction: float = 0.01
    synthetic_images: int = 512
    synthetic_classes: int = 10


@dataclass
class DistillAugmentConfig:
    """Training augmentation, batched on the device: random resized crop + flip, normalise."""

    image_size: int = 32
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    flip: bool = True


@dataclass
class DistillOptimConfig:
    """Optimisation. ``lr`` is per 256 images (scaled by ``batch_size / 256``); cosine decay to
    ``min_lr`` after a linear warmup. ``total_steps`` > 0 fixes the run length in optimiser steps
    (instead of ``epochs``). ``cpu_budget_s`` > 0 trains for a fixed CPU time instead
    (``time.process_time()`` of the run, set-up and teacher included; the most-used rank decides):
    the schedule then follows the fraction of the budget used (warmup: ``warmup_epochs / epochs``
    of it), the run ends when the budget is spent (or after ``epochs`` / ``total_steps``), and a
    resumed run is not bit-identical to an uninterrupted one. Meant for compute-matched
    comparisons (``benchmarks/bench_distill.py``)."""

    optimizer: str = "adamw"
    epochs: int = 100
    total_steps: int = 0
    cpu_budget_s: float = 0.0
    batch_size: int = 128
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    momentum: float = 0.9
    clip_grad: float = 0.0
    amp: str = "auto"


@dataclass
class DistillEvalConfig:
    """Validation: every ``every_epochs`` epochs (0: only at the end); ``teacher``: also report
    the teacher's validation accuracy once."""

    every_epochs: int = 0
    batch_size: int = 256
    teacher: bool = True


@dataclass
class DistillLoggingConfig(LoggingConfig):
    """The pretraining :class:`~esvit.config.LoggingConfig` with distillation defaults."""

    output_dir: str = "runs/distill"
    wandb_project: str = "esvit-distill"


DistillCheckpointConfig = CheckpointConfig  # checkpoint frequency and retention, as in pretraining


@dataclass
class DistillConfig:
    """Full distillation configuration."""

    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    augment: DistillAugmentConfig = field(default_factory=DistillAugmentConfig)
    optim: DistillOptimConfig = field(default_factory=DistillOptimConfig)
    eval: DistillEvalConfig = field(default_factory=DistillEvalConfig)
    logging: DistillLoggingConfig = field(default_factory=DistillLoggingConfig)
    checkpoint: DistillCheckpointConfig = field(default_factory=DistillCheckpointConfig)
    seed: int = 0
    device: str = "auto"


_CHOICES: dict[str, tuple[str, ...]] = {
    "teacher.kind": TEACHER_KINDS,
    "teacher.mode": TEACHER_MODES,
    "teacher.checkpoint_key": ("teacher", "student"),
    "loss.kind": LOSS_KINDS,
    "data.kind": DATA_KINDS,
    "optim.optimizer": ("adamw", "sgd"),
    "optim.amp": ("auto", "none", "fp16", "bf16"),
    "logging.wandb": ("disabled", "offline", "online"),
}
_POSITIVE = (
    "loss.kd.temperature", "loss.dkd.temperature", "loss.dist.tau", "loss.deit.tau",
    "data.canvas_size", "data.synthetic_images", "data.synthetic_classes", "augment.image_size",
    "optim.epochs", "optim.batch_size", "optim.lr", "eval.batch_size", "logging.log_every",
    "checkpoint.keep_last",
)
_NON_NEGATIVE = (
    "loss.label_smoothing", "loss.dkd.alpha", "loss.dkd.beta", "loss.dkd.ce_weight",
    "loss.dkd.warmup_epochs", "loss.dist.beta", "loss.dist.gamma", "loss.dist.ce_weight",
    "data.val_split", "data.max_train_per_class", "data.num_workers", "data.max_bad_fraction",
    "optim.total_steps", "optim.cpu_budget_s", "optim.min_lr", "optim.warmup_epochs", "optim.weight_decay", "optim.momentum",
    "optim.clip_grad", "eval.every_epochs", "checkpoint.every_epochs", "checkpoint.every_steps",
)
_UNIT = ("loss.kd.alpha", "loss.deit.alpha", "data.max_bad_fraction")


def validate_distill(cfg: DistillConfig) -> DistillConfig:
    """Check value ranges and cross-field constraints.

    Raises:
        ConfigError: Naming the offending key and the expected value.
    """
    check_ranges(cfg, _CHOICES, _POSITIVE, _NON_NEGATIVE, _UNIT)
    if cfg.loss.label_smoothing >= 1:
        raise ConfigError(f"loss.label_smoothing: must be in [0, 1), got {cfg.loss.label_smoothing}")
    lo, hi = cfg.augment.scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"augment.scale: must satisfy 0 < min <= max <= 1, got {[lo, hi]}")
    lo, hi = cfg.augment.ratio
    if not 0 < lo <= hi:
        raise ConfigError(f"augment.ratio: must satisfy 0 < min <= max, got {[lo, hi]}")
    if cfg.teacher.image_size is not None and cfg.teacher.image_size < 1:
        raise ConfigError(f"teacher.image_size: must be > 0 or null, got {cfg.teacher.image_size}")

    s, t, loss = cfg.student, cfg.teacher, cfg.loss.kind
    if loss.startswith("deit") and not s.deit:
        raise ConfigError(f"loss.kind: {loss!r} needs a DeiT student; set student.deit=true (ViT backbone)")
    if s.deit and not loss.startswith("deit"):
        raise ConfigError(f"student.deit: a DeiT student trains with loss.kind deit_soft or deit_hard, "
                          f"got loss.kind={loss!r}")
    if t.kind == "none" and loss != "ce":
        raise ConfigError(f"teacher.kind: loss.kind={loss!r} distils from a teacher; set teacher.kind "
                          "(linear, torchvision or classifier) or use loss.kind=ce")
    if t.kind != "none" and loss == "ce":
        raise ConfigError(f"loss.kind: 'ce' trains on labels only; set teacher.kind=none (got "
                          f"teacher.kind={t.kind!r}) or choose kd, dkd, dist, deit_soft, deit_hard")
    if t.kind in ("linear", "classifier") and not t.checkpoint:
        raise ConfigError(f"teacher.checkpoint: required for teacher.kind={t.kind!r} (path to "
                          + ("a pretrained backbone checkpoint)" if t.kind == "linear"
                             else "an esvit-distill checkpoint or student.pt)"))
    if t.kind == "torchvision":
        if not t.arch:
            raise ConfigError("teacher.arch: required for teacher.kind='torchvision' (a torchvision "
                              "classifier name, e.g. resnet50)")
        if not t.weights and not t.random_init:
            raise ConfigError("teacher.weights: a local state_dict file is required for "
                              "teacher.kind='torchvision' (weights are never downloaded); "
                              "teacher.random_init=true allows random weights for smoke tests")
    if cfg.data.kind == "folder" and cfg.data.path is not None and not cfg.data.path.strip():
        raise ConfigError("data.path: empty string")
    if cfg.optim.clip_grad < 0:
        raise ConfigError(f"optim.clip_grad: must be >= 0, got {cfg.optim.clip_grad}")
    return cfg


def load_distill_config(path: str | Path | None, overrides: list[str] | None = None) -> DistillConfig:
    """Load a YAML distillation config (defaults when ``path`` is None) with dotted overrides.

    Raises:
        FileNotFoundError: The file does not exist.
        ConfigError: Unknown key, wrong type or invalid value (the message names the key).
    """
    return load_yaml_config(DistillConfig, path, overrides, validate_distill)
