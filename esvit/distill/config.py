"""Configuration of knowledge-distillation runs (dataclasses, YAML, dotted overrides).

Loaded with :func:`esvit.config.load_yaml_config` like the pretraining config: an unknown or
duplicate key or a wrong type is a :class:`~esvit.config.ConfigError` naming the dotted key, and
:func:`validate_distill` checks every key against its range table (``*_RANGES``, one per
dataclass, below it) and the constraints between keys (:data:`DISTILL_LINKS`); ``docs/config.md``
is generated from the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esvit.config import (
    AMP,
    CHECKPOINT_RANGES,
    FLAG,
    LOGGING_RANGES,
    MAPPING,
    PROB,
    RUN_RANGES,
    TEMPERATURE,
    CheckpointConfig,
    Link,
    LoggingConfig,
    Ranges,
    Rule,
    check_config,
    choice,
    load_yaml_config,
    num,
    pair,
    peak_lr,
    text,
)

__all__ = [
    "DISTILL_LINKS",
    "DISTILL_RANGES",
    "FEATURE_KINDS",
    "LABEL_FREE_KINDS",
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

TEACHER_KINDS = ("none", "linear", "torchvision", "classifier", "backbone")
TEACHER_MODES = ("online", "cached")
LOSS_KINDS = ("ce", "kd", "dkd", "dist", "deit_soft", "deit_hard", "nkd", "fitnet", "crd", "ofa", "feature")
#: Kinds that read intermediate stages of the networks (the teacher must run online).
FEATURE_KINDS = ("fitnet", "crd", "ofa", "feature")
#: Kinds that never read labels (the data may be unlabelled).
LABEL_FREE_KINDS = ("feature",)
DATA_KINDS = ("folder", "synthetic", "cifar10", "cifar100")

KD_TEMPERATURE = num(0, 100, lo_open=True, why="softens the logits; beyond 100 any classifier's softmax is "
                                                "uniform, inf gives a constant loss")
WEIGHT = num(0, why="a loss weight")
STAGES = Rule("a list of module names (empty: the default stages)",
              lambda v: all(isinstance(x, str) and x.strip() for x in v),
              why="stage names as esvit.distill.methods.list_stages prints them; checked when the models are built")
STAGE = text(null="the network's feature output, its last stage",
             why="a stage name as esvit.distill.methods.list_stages prints it; checked when the models are built")


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


STUDENT_RANGES: Ranges = {
    "backbone": text(why="a registered backbone name, checked when the model is built"),
    "backbone_kwargs": MAPPING,
    "deit": FLAG,
    "init_checkpoint": text(null="random initialisation"),
}


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
    * ``classifier``: a student written by ``esvit-distill`` (its checkpoint or ``student.pt``);
    * ``backbone``: a frozen esvit backbone, no head (``checkpoint``: any file
      :func:`esvit.export.load_backbone_info` reads: training checkpoint, ``backbone.safetensors``
      with its JSON card, ``.pt`` export; ``backbone`` / ``backbone_kwargs`` for bare state dicts):
      for the label-free kinds (``loss.kind=feature``), which read its features, never logits.

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


TEACHER_RANGES: Ranges = {
    "kind": choice(*TEACHER_KINDS),
    "checkpoint": text(null="none: required for the linear, classifier and backbone kinds"),
    "checkpoint_key": choice("teacher", "student"),
    "backbone": text(null="the recorded backbone"),
    "backbone_kwargs": MAPPING,
    "linear_head": text(null="<checkpoint dir>/linear_eval/linear_classifier.pt"),
    "arch": text(null="none: required for the torchvision kind"),
    "arch_kwargs": MAPPING,
    "weights": text(null="none: random weights only with random_init"),
    "random_init": FLAG,
    "image_size": num(8, null="the recorded size, else augment.image_size", why="pixels"),
    "mode": choice(*TEACHER_MODES),
}


@dataclass
class KDParams:
    """Hinton KD: ``alpha * CE + (1 - alpha) * T^2 * KL``."""

    alpha: float = 0.5
    temperature: float = 4.0


KD_RANGES: Ranges = {"alpha": PROB, "temperature": KD_TEMPERATURE}


@dataclass
class DKDParams:
    """DKD: ``ce_weight * CE + ramp * (alpha * TCKD + beta * NCKD)``; ramp 0 -> 1 over ``warmup_epochs``."""

    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    ce_weight: float = 1.0
    warmup_epochs: float = 0.0


DKD_RANGES: Ranges = {"alpha": WEIGHT, "beta": WEIGHT, "temperature": KD_TEMPERATURE, "ce_weight": WEIGHT,
                      "warmup_epochs": num(0)}


@dataclass
class DISTParams:
    """DIST: ``ce_weight * CE + tau^2 * (beta * inter + gamma * intra)``."""

    beta: float = 1.0
    gamma: float = 1.0
    tau: float = 1.0
    ce_weight: float = 1.0


DIST_RANGES: Ranges = {"beta": WEIGHT, "gamma": WEIGHT, "tau": KD_TEMPERATURE, "ce_weight": WEIGHT}


@dataclass
class DeiTParams:
    """DeiT: ``(1 - alpha) * CE(cls) + alpha * distill(dist)`` (``tau``: soft only)."""

    alpha: float = 0.5
    tau: float = 1.0


DEIT_RANGES: Ranges = {"alpha": PROB, "tau": KD_TEMPERATURE}


@dataclass
class NKDParams:
    """NKD (Yang 2023): ``ce_weight * CE - T_t log S_t - gamma * temperature^2 * sum_{i != t} N(T_i) log N(S_i)``."""

    gamma: float = 1.5
    temperature: float = 1.0
    ce_weight: float = 1.0


NKD_RANGES: Ranges = {"gamma": WEIGHT, "temperature": KD_TEMPERATURE, "ce_weight": WEIGHT}


@dataclass
class FitNetParams:
    """FitNet (Romero 2015): ``ce_weight * CE + weight * sum_pairs MSE(regressor(student stage), teacher stage)``;
    empty stage lists: the last stages of both networks (up to 4, deepest with deepest)."""

    student_stages: list[str] = field(default_factory=list)
    teacher_stages: list[str] = field(default_factory=list)
    weight: float = 1.0
    ce_weight: float = 1.0


FITNET_RANGES: Ranges = {"student_stages": STAGES, "teacher_stages": STAGES, "weight": WEIGHT, "ce_weight": WEIGHT}


@dataclass
class CRDParams:
    """CRD (Tian 2020): ``ce_weight * CE + weight * (NCE_student + NCE_teacher)`` with memory banks of
    ``num_negatives`` negatives (RepDistiller's defaults)."""

    student_stage: str | None = None
    teacher_stage: str | None = None
    feat_dim: int = 128
    num_negatives: int = 16384
    temperature: float = 0.07
    momentum: float = 0.5
    weight: float = 0.8
    ce_weight: float = 1.0


CRD_RANGES: Ranges = {
    "student_stage": STAGE, "teacher_stage": STAGE, "feat_dim": num(1),
    "num_negatives": num(1, why="below the number of training images, checked when the run starts"),
    "temperature": TEMPERATURE, "momentum": num(0, 1, hi_open=True, why="1 never updates the memory bank"),
    "weight": WEIGHT, "ce_weight": WEIGHT,
}


@dataclass
class OFAParams:
    """OFA-KD (Hao 2023): ``ce_weight * CE + logit_weight * OFA(head) + branch_weight * sum OFA(branch exits)``;
    empty ``stages``: the student's default stages (up to 4)."""

    stages: list[str] = field(default_factory=list)
    eps: float = 1.0
    temperature: float = 1.0
    form: str = "paper"
    branch_weight: float = 1.0
    logit_weight: float = 1.0
    ce_weight: float = 0.0


OFA_RANGES: Ranges = {
    "stages": STAGES, "eps": num(0, lo_open=True, why="target enhancement (1 + p)^eps; the paper uses eps >= 1"),
    "temperature": KD_TEMPERATURE, "form": choice("paper", "official"), "branch_weight": WEIGHT,
    "logit_weight": WEIGHT, "ce_weight": WEIGHT,
}


@dataclass
class FeatureParams:
    """Label-free: ``pooled_weight * d(proj(student pooled), teacher pooled) + region_weight * d(proj(student
    regions), teacher regions)``; null stages: the feature output of each network."""

    student_stage: str | None = None
    teacher_stage: str | None = None
    criterion: str = "cosine"
    pooled_weight: float = 1.0
    region_weight: float = 1.0


FEATURE_RANGES: Ranges = {"student_stage": STAGE, "teacher_stage": STAGE, "criterion": choice("cosine", "mse", "smooth_l1"),
                          "pooled_weight": WEIGHT, "region_weight": WEIGHT}


@dataclass
class DistillLossConfig:
    """Objective: ``kind`` picks a distiller of :mod:`esvit.distill.methods` (its registry name) and the
    parameter section of that name below (``ce``: none; ``deit_soft`` / ``deit_hard``: ``deit``).
    ``feature`` is label-free; ``fitnet``, ``crd``, ``ofa`` and ``feature`` read stages of the networks
    found by hooks (names as :func:`esvit.distill.methods.list_stages` prints them)."""

    kind: str = "kd"
    label_smoothing: float = 0.0
    kd: KDParams = field(default_factory=KDParams)
    dkd: DKDParams = field(default_factory=DKDParams)
    dist: DISTParams = field(default_factory=DISTParams)
    deit: DeiTParams = field(default_factory=DeiTParams)
    nkd: NKDParams = field(default_factory=NKDParams)
    fitnet: FitNetParams = field(default_factory=FitNetParams)
    crd: CRDParams = field(default_factory=CRDParams)
    ofa: OFAParams = field(default_factory=OFAParams)
    feature: FeatureParams = field(default_factory=FeatureParams)


LOSS_RANGES: Ranges = {"kind": choice(*LOSS_KINDS), "label_smoothing": num(0, 1, hi_open=True)}


@dataclass
class DistillDataConfig:
    """Training data and the validation split.

    ``kind``: ``folder`` (``path``: one subfolder per class; while ``loss.kind`` is label-free
    (``feature``) also a flat folder of images without classes), ``synthetic``, ``cifar10`` or
    ``cifar100`` (torchvision copies on disk). Label-free runs score the student's backbone by
    kNN and a linear probe on a labelled validation set (``val_path``, or the labelled data's
    own validation split); with none, no accuracy is reported. Validation: ``val_path`` (folder with the same
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
    loader_timeout_s: float | None = None


DATA_RANGES: Ranges = {
    "kind": choice(*DATA_KINDS),
    "path": text(null="none: for the synthetic and cifar kinds"),
    "val_path": text(null="data.val_split, else the kind's test split"),
    "val_split": num(0, why="images per class; 0: none"),
    "max_train_per_class": num(0, why="0: all"),
    "canvas_size": num(8, why="pixels"),
    "num_workers": num(0),
    "max_bad_fraction": PROB,
    "synthetic_images": num(1),
    "synthetic_classes": num(2, why="a classifier needs two classes"),
    "loader_timeout_s": num(0, null="$ESVIT_LOADER_TIMEOUT, else 600", why="seconds a decode worker may take for one batch before the run stops with a message; 0: wait forever"),
}


@dataclass
class DistillAugmentConfig:
    """Training augmentation, batched on the device: random resized crop + flip, normalise."""

    image_size: int = 32
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    flip: bool = True


AUGMENT_RANGES: Ranges = {
    "image_size": num(8, why="pixels"),
    "scale": pair(0, 1, lo_open=True, why="fractions of the image area"),
    "ratio": pair(0, lo_open=True, why="aspect ratios"),
    "flip": FLAG,
}


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


OPTIM_RANGES: Ranges = {
    "optimizer": choice("adamw", "sgd"),
    "epochs": num(1),
    "total_steps": num(0, why="0: optim.epochs decides"),
    "cpu_budget_s": num(0, why="seconds; 0: no budget"),
    "batch_size": num(2, why="BatchNorm needs at least 2 images"),
    "lr": num(0, lo_open=True, why="per 256 images"),
    "min_lr": num(0),
    "warmup_epochs": num(0),
    "weight_decay": num(0),
    "momentum": num(0, 1, hi_open=True, why="SGD only; 1 never forgets a gradient"),
    "clip_grad": num(0, why="0 disables clipping"),
    "amp": AMP,
}


@dataclass
class DistillEvalConfig:
    """Validation: every ``every_epochs`` epochs (0: only at the end); ``teacher``: also report
    the teacher's validation accuracy once."""

    every_epochs: int = 0
    batch_size: int = 256
    teacher: bool = True


EVAL_RANGES: Ranges = {"every_epochs": num(0, why="0: only at the end"), "batch_size": num(1), "teacher": FLAG}


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


DISTILL_RANGES: dict[type, Ranges] = {
    DistillConfig: RUN_RANGES, StudentConfig: STUDENT_RANGES, TeacherConfig: TEACHER_RANGES,
    DistillLossConfig: LOSS_RANGES, KDParams: KD_RANGES, DKDParams: DKD_RANGES, DISTParams: DIST_RANGES,
    DeiTParams: DEIT_RANGES, NKDParams: NKD_RANGES, FitNetParams: FITNET_RANGES, CRDParams: CRD_RANGES,
    OFAParams: OFA_RANGES, FeatureParams: FEATURE_RANGES, DistillDataConfig: DATA_RANGES, DistillAugmentConfig: AUGMENT_RANGES,
    DistillOptimConfig: OPTIM_RANGES, DistillEvalConfig: EVAL_RANGES, LoggingConfig: LOGGING_RANGES,
    CheckpointConfig: CHECKPOINT_RANGES,
}


def _some_weight(c: DistillConfig, kind: str, *names: str) -> bool:
    """Unless ``loss.kind`` is ``kind``, or one of its weights ``names`` is > 0."""
    params = getattr(c.loss, kind)
    return c.loss.kind != kind or any(getattr(params, n) > 0 for n in names)


DISTILL_LINKS: tuple[Link, ...] = (
    Link("loss.dkd.ce_weight", "> 0, or loss.dkd.alpha or loss.dkd.beta > 0, while loss.kind is dkd (else nothing "
         "trains)", lambda c: _some_weight(c, "dkd", "alpha", "beta", "ce_weight"),
         ("loss.dkd.alpha", "loss.dkd.beta")),
    Link("loss.dkd.warmup_epochs", "<= optim.epochs", lambda c: c.loss.dkd.warmup_epochs <= c.optim.epochs,
         ("optim.epochs",)),
    Link("loss.dist.ce_weight", "> 0, or loss.dist.beta or loss.dist.gamma > 0, while loss.kind is dist (else "
         "nothing trains)", lambda c: _some_weight(c, "dist", "beta", "gamma", "ce_weight"),
         ("loss.dist.beta", "loss.dist.gamma")),
    Link("loss.fitnet.ce_weight", "> 0, or loss.fitnet.weight > 0, while loss.kind is fitnet (else nothing trains)",
         lambda c: _some_weight(c, "fitnet", "weight", "ce_weight"), ("loss.fitnet.weight",)),
    Link("loss.crd.ce_weight", "> 0, or loss.crd.weight > 0, while loss.kind is crd (else nothing trains)",
         lambda c: _some_weight(c, "crd", "weight", "ce_weight"), ("loss.crd.weight",)),
    Link("loss.ofa.ce_weight", "> 0, or loss.ofa.logit_weight or loss.ofa.branch_weight > 0, while loss.kind is ofa "
         "(else nothing trains)", lambda c: _some_weight(c, "ofa", "logit_weight", "branch_weight", "ce_weight"),
         ("loss.ofa.logit_weight", "loss.ofa.branch_weight")),
    Link("loss.feature.region_weight", "> 0, or loss.feature.pooled_weight > 0, while loss.kind is feature (else "
         "nothing trains)", lambda c: _some_weight(c, "feature", "pooled_weight", "region_weight"),
         ("loss.feature.pooled_weight",)),
    Link("optim.min_lr", "<= the peak LR optim.lr * optim.batch_size / 256",
         lambda c: c.optim.min_lr <= peak_lr(c.optim), ("optim.lr", "optim.batch_size")),
    Link("optim.warmup_epochs", "<= optim.epochs", lambda c: c.optim.warmup_epochs <= c.optim.epochs,
         ("optim.epochs",)),
    Link("loss.kind", "deit_soft or deit_hard exactly when student.deit is true (a DeiT student: ViT backbone)",
         lambda c: c.loss.kind.startswith("deit") == c.student.deit, ("student.deit",)),
    Link("teacher.kind", "none exactly when loss.kind is ce (ce trains on labels only, the others distil from a "
         "teacher)", lambda c: (c.teacher.kind == "none") == (c.loss.kind == "ce"), ("loss.kind",)),
    Link("teacher.mode", "online while loss.kind is fitnet, crd, ofa or feature (they read the teacher's "
         "intermediate stages on the student's crops)",
         lambda c: c.teacher.mode == "online" or c.loss.kind not in FEATURE_KINDS, ("loss.kind",)),
    Link("teacher.checkpoint", "set while teacher.kind is linear or backbone (a pretrained backbone) or classifier "
         "(an esvit-distill checkpoint or student.pt)",
         lambda c: c.teacher.kind not in ("linear", "classifier", "backbone") or c.teacher.checkpoint is not None,
         ("teacher.kind",)),
    Link("teacher.kind", "backbone only while loss.kind is label-free (feature): a backbone teacher has no logits",
         lambda c: c.teacher.kind != "backbone" or c.loss.kind in LABEL_FREE_KINDS, ("loss.kind",)),
    Link("teacher.arch", "set while teacher.kind is torchvision (a torchvision classifier name, e.g. resnet50)",
         lambda c: c.teacher.kind != "torchvision" or c.teacher.arch is not None, ("teacher.kind",)),
    Link("teacher.weights", "set while teacher.kind is torchvision (weights are never downloaded), unless "
         "teacher.random_init is true (smoke tests)",
         lambda c: c.teacher.kind != "torchvision" or c.teacher.weights is not None or c.teacher.random_init,
         ("teacher.kind", "teacher.random_init")),
)


def validate_distill(cfg: DistillConfig) -> DistillConfig:
    """Check every key against :data:`DISTILL_RANGES` and the constraints :data:`DISTILL_LINKS`.

    Raises:
        ConfigError: One line naming the offending key, its valid range and its value.
    """
    check_config(cfg, DISTILL_RANGES, DISTILL_LINKS)
    return cfg


def load_distill_config(path: str | Path | None, overrides: list[str] | None = None) -> DistillConfig:
    """Load a YAML distillation config (defaults when ``path`` is None) with dotted overrides.

    Raises:
        FileNotFoundError: The file does not exist.
        ConfigError: Unknown key, wrong type or invalid value (the message names the key).
    """
    return load_yaml_config(DistillConfig, path, overrides, validate_distill)
