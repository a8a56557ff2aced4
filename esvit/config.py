"""Run configuration: dataclasses validated from YAML, dotted command-line overrides.

``load_config(path, overrides)`` reads a YAML file, applies ``section.key=value`` overrides and
returns a :class:`Config`. Unknown keys, wrong types, duplicate YAML keys and values out of range
raise :class:`ConfigError` naming the dotted key; ``save_config`` writes the resolved configuration
beside the run.

Every dataclass is followed by its range table (``*_RANGES``: key -> :class:`Rule`) and
``TRAIN_LINKS`` lists the constraints between keys (:class:`Link`). The validator
(:func:`check_config`) and the reference page ``docs/config.md`` (:func:`reference_markdown`,
``python -m esvit.config``) are both generated from these tables, so they cannot diverge.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""


class NonFiniteError(ConfigError):
    """A number is inf or nan (never valid, whichever type a union key would try next)."""


# ------------------------------------------------------------------------------------ range rules


@dataclass(frozen=True)
class Rule:
    """The valid values of one config key (its type is checked before, by the annotation).

    Attributes:
        doc: The range as a phrase that completes "must be ...": ``> 0``, ``in [0, 1]``.
        check: True for a valid non-null value.
        null: What null means when null is allowed (else None: null is not valid).
        why: Why the range is what it is (docs only).
        options: The allowed values of a choice.
        bounds: ``(lo, hi, lo_open, hi_open)`` of a number (None: unbounded on that side).
    """

    doc: str
    check: Callable[[Any], bool]
    null: str | None = None
    why: str = ""
    options: tuple[str, ...] | None = None
    bounds: tuple[float | None, float | None, bool, bool] | None = None

    def describe(self) -> str:
        """``doc`` with what null means, as error messages and the docs state it."""
        return self.doc + (f", or null ({self.null})" if self.null else "")

    def accepts(self, value: Any) -> bool:
        """True when ``value`` is valid (null only when the rule allows it)."""
        if value is None:
            return self.null is not None
        try:
            return bool(self.check(value))
        except (TypeError, ValueError):
            return False


@dataclass(frozen=True)
class Link:
    """A constraint between keys, reported on ``key``.

    Attributes:
        key: The dotted key the error names.
        doc: The constraint as a phrase completing "must be ...": ``<= augment.global_size``.
        check: True when the whole config satisfies it.
        refs: The other keys involved (their values are quoted in the error).
    """

    key: str
    doc: str
    check: Callable[[Any], bool]
    refs: tuple[str, ...] = ()


Ranges = dict[str, Rule]


def _fmt(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> tuple[str, Callable[[Any], bool]]:
    if lo is not None and hi is not None:
        doc = f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        doc = f"{'>' if lo_open else '>='} {_fmt(lo)}"
    elif hi is not None:
        doc = f"{'<' if hi_open else '<='} {_fmt(hi)}"
    else:
        doc = "a finite number"

    def check(x: Any) -> bool:
        if not _finite(x):
            return False
        above = lo is None or (x > lo if lo_open else x >= lo)
        below = hi is None or (x < hi if hi_open else x <= hi)
        return above and below

    return doc, check


def num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
        null: str | None = None, why: str = "") -> Rule:
    """A finite number in an interval (closed ends unless ``*_open``)."""
    doc, check = _interval(lo, hi, lo_open, hi_open)
    return Rule(doc, check, null, why, bounds=(lo, hi, lo_open, hi_open))


def pair(lo: float, hi: float | None = None, *, lo_open: bool = False, why: str = "") -> Rule:
    """``[min, max]``: finite, ``lo <= min <= max <= hi`` (``lo < min`` with ``lo_open``)."""
    top = f" <= {_fmt(hi)}" if hi is not None else ""
    doc = f"[min, max] with {_fmt(lo)} {'<' if lo_open else '<='} min <= max{top}"
    _, inside = _interval(lo, hi, lo_open, False)
    return Rule(doc, lambda v: inside(v[0]) and inside(v[1]) and v[0] <= v[1], why=why)


def each(rule: Rule, doc: str) -> Rule:
    """Every item of a tuple satisfies ``rule``."""
    return Rule(doc, lambda v: all(rule.accepts(x) for x in v), why=rule.why)


def choice(*options: str, why: str = "") -> Rule:
    """One of ``options``."""
    return Rule(f"one of {', '.join(options)}", lambda v: v in options, why=why, options=tuple(options))


def text(null: str | None = None, why: str = "") -> Rule:
    """A non-empty string (null allowed when ``null`` says what it means)."""
    return Rule("a non-empty string", lambda v: bool(v.strip()), null, why)


FLAG = Rule("true or false", lambda v: isinstance(v, bool))
MAPPING = Rule("a mapping", lambda v: isinstance(v, dict))
SEED = num(0, 2**32 - 1, why="numpy's seed range")
DEVICE = Rule("auto, cpu, cuda, cuda:N or mps", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None)
EPOCHS = num(0)
PROB = num(0, 1)
TEMPERATURE = num(0, 1, lo_open=True, why="logits are cosine similarities in [-1, 1]: above 1 the softmax is "
                                          "nearly uniform, inf gives a constant loss")
# DINO head sizes: with K prototypes the loss is at most log K; K = 1 is a constant loss of 0.
MIN_OUT_DIM = 16


# ----------------------------------------------------------------------------------- dataclasses


@dataclass
class ModelConfig:
    """Backbone, heads and the region-level task.

    ``region_loss`` false gives plain DINO. The loss is ``(1 - w) * view + w * region`` with
    ``w = region_weight`` (official: 0.5), ramped linearly from 0 over ``region_warmup_epochs``.
    ``region_out_dim`` null is ``out_dim``. ``use_bn_in_region_head`` is separate from
    ``use_bn_in_head``: the official code has one flag for both heads (off in its recipes), but
    BatchNorm over region tokens lets the backbone's tokens collapse (docs/region.md), so it is
    off unless asked for.

    ``drop_path_rate``: the student's stochastic depth, in ``[0, 1)`` (rate of the last block,
    linear from 0); null (the default) keeps the backbone factory's default: 0.1 for ``swin_t``
    and ``swin_tiny_cifar``, 0 for ``swin_nano`` and the ViTs (the CIFAR recipes were measured
    without). The official recipes use 0.1 for Swin and ViT students. A rate > 0 on a backbone
    without stochastic depth (the ResNets) is an error. The teacher never drops paths.
    ``sync_bn``: ``auto`` (SyncBatchNorm when several processes run and the student or its heads
    have BatchNorm, as the official code), ``true`` (a logged no-op on one process) or ``false``.
    """

    backbone: str = "resnet18"  # the defaults are a photo recipe: 2x224 + 8x96 crops on an ImageNet-style ResNet-18
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    region_loss: bool = True
    region_out_dim: int | None = None
    use_bn_in_region_head: bool = False
    region_weight: float = 0.5
    region_warmup_epochs: float = 0.0
    drop_path_rate: float | None = None
    sync_bn: bool | str = "auto"
    init_weights: str | None = None


_OUT_DIM_WHY = f"the DINO loss is at most log K: K = 1 trains at loss 0, K < {MIN_OUT_DIM} is nearly trivial"
MODEL_RANGES: Ranges = {
    "backbone": text(why="a registered backbone name, checked when the model is built"),
    "backbone_kwargs": MAPPING,
    "out_dim": num(MIN_OUT_DIM, why=_OUT_DIM_WHY),
    "hidden_dim": num(1),
    "bottleneck_dim": num(1),
    "use_bn_in_head": FLAG,
    "norm_last_layer": FLAG,
    "region_loss": FLAG,
    "region_out_dim": num(MIN_OUT_DIM, null="model.out_dim", why=_OUT_DIM_WHY),
    "use_bn_in_region_head": FLAG,
    "region_weight": PROB,
    "region_warmup_epochs": EPOCHS,
    "drop_path_rate": num(0, 1, hi_open=True, null="the backbone's default"),
    "init_weights": text(null="random initialisation",
                         why="a local file of backbone weights to start from (state dict, .safetensors, esvit export "
                             "or checkpoint); nothing is downloaded"),
    "sync_bn": Rule("auto, true or false", lambda v: isinstance(v, bool) or v == "auto"),
}


@dataclass
class AugmentConfig:
    """Multi-crop augmentation (runs on the training device)."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    # Gaussian blur probability of (global view 1, global view 2, local views), as in DINO. Small
    # images (CIFAR, 32 px) need none: a sigma of 2 px erases most of a 32 px image.
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    # Users' own kornia.augmentation ops, e.g. [{op: RandomErasing, p: 0.25}] (esvit/augment/extra.py)
    extra_global: list[dict[str, Any]] = field(default_factory=list)
    extra_local: list[dict[str, Any]] = field(default_factory=list)


KORNIA_OPS = Rule("a list of {op: <kornia.augmentation 2-D op>, <its arguments>}",
                  lambda v: all(isinstance(x, dict) and "op" in x for x in v),
                  why="run on the device after the colour ops, before normalisation; checked by building them")

AUGMENT_RANGES: Ranges = {
    "global_size": num(8, why="pixels; the augmentation needs images of at least 8 px"),
    "local_size": num(8),
    "n_local": num(0),
    "global_scale": pair(0, 1, lo_open=True, why="fractions of the image area"),
    "local_scale": pair(0, 1, lo_open=True),
    "blur_p": each(PROB, "3 probabilities, each in [0, 1]"),
    "blur_sigma": pair(0, lo_open=True, why="pixels"),
    "solarize_p": PROB,
    "extra_global": KORNIA_OPS,
    "extra_local": KORNIA_OPS,
}


@dataclass
class DataConfig:
    """Training data. ``kind``: folder, synthetic, cifar10, cifar100 or stl10.

    ``resize_mode``: ``letterbox`` (default): workers keep the whole image, with its aspect ratio,
    in a ``canvas_size`` square (shrunk only when its long side is larger, never enlarged) and
    send where it lies; the training device draws ``RandomResizedCrop`` boxes on the original
    image's size, over the whole photo. ``short_side_center_crop`` / ``stretch``: the previous
    square canvas (crops never see the parts a centre crop cuts off).
    ``canvas_size``: 512 keeps ImageNet-sized photos (long side <= 500) at their own resolution,
    so 224 px global crops of ``global_scale`` (0.4, 1) downsample; it costs 768 KiB per image in
    worker memory and host-to-device transfer. Images that already have the canvas size (CIFAR at
    32) fill it, and training on them is unchanged.
    """

    kind: str = "folder"
    path: str | None = None
    canvas_size: int = 512
    resize_mode: str = "letterbox"
    num_workers: int | None = None
    max_bad_fraction: float = 0.01
    synthetic_images: int = 512
    synthetic_classes: int = 10
    loader_timeout_s: float | None = None


DATA_RANGES: Ranges = {
    "kind": choice("folder", "synthetic", "cifar10", "cifar100", "stl10"),
    "path": text(null="none: for the synthetic and torchvision kinds"),
    "canvas_size": num(8, why="pixels"),
    "resize_mode": choice("letterbox", "short_side_center_crop", "stretch"),
    "num_workers": num(0, null="auto: the CPUs this process may use, shared by the processes on the node, minus one, at most 8"),
    "max_bad_fraction": PROB,
    "synthetic_images": num(1),
    "synthetic_classes": num(1),
    "loader_timeout_s": num(0, null="$ESVIT_LOADER_TIMEOUT, else 600", why="seconds a decode worker may take for one batch before the run stops with a message; 0: wait forever"),
}


@dataclass
class OptimConfig:
    """Optimisation. ``batch_size`` is the global batch (all ranks, one optimiser step);
    ``lr`` is per 256 images and scaled by ``batch_size / 256``.

    ``clip_mode``: ``per_param`` clips every parameter tensor's gradient norm to ``clip_grad``
    separately (the official EsViT/DINO rule, the default); ``global`` clips the norm of all
    gradients together (``torch.nn.utils.clip_grad_norm_``). ``clip_grad`` 0 disables both.
    """

    epochs: int = 100
    batch_size: int = 256
    accum_steps: int = 1
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    clip_mode: str = "per_param"
    freeze_last_layer_epochs: float = 1.0
    amp: str = "auto"


AMP = choice("auto", "none", "fp16", "bf16")
OPTIM_RANGES: Ranges = {
    "epochs": num(1),
    "batch_size": num(2, why="BatchNorm and the teacher centre need at least 2 images"),
    "accum_steps": num(1),
    "lr": num(0, lo_open=True, why="per 256 images"),
    "min_lr": num(0),
    "warmup_epochs": EPOCHS,
    "weight_decay": num(0),
    "weight_decay_end": num(0),
    "clip_grad": num(0, why="0 disables clipping"),
    "clip_mode": choice("per_param", "global"),
    "freeze_last_layer_epochs": EPOCHS,
    "amp": AMP,
}


@dataclass
class TeacherConfig:
    """EMA teacher, temperatures and centring."""

    momentum: float = 0.996
    momentum_end: float = 1.0
    temp: float = 0.07
    warmup_temp: float = 0.04
    warmup_temp_epochs: float = 30.0
    student_temp: float = 0.1
    center_momentum: float = 0.9


TEACHER_RANGES: Ranges = {
    "momentum": PROB,
    "momentum_end": PROB,
    "temp": TEMPERATURE,
    "warmup_temp": TEMPERATURE,
    "warmup_temp_epochs": EPOCHS,
    "student_temp": TEMPERATURE,
    "center_momentum": num(0, 1, why="1 keeps the centre at 0 (no centring)"),
}


@dataclass
class LoggingConfig:
    """Where and how to log. ``wandb``: disabled, offline or online."""

    output_dir: str = "runs/esvit"
    wandb: str = "offline"
    wandb_project: str = "esvit"
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = False


LOGGING_RANGES: Ranges = {
    "output_dir": text(),
    "wandb": choice("disabled", "offline", "online"),
    "wandb_project": text(),
    "log_every": num(1, why="steps"),
    "progress": FLAG,
    "tensorboard": Rule("true or false", lambda v: isinstance(v, bool),
                        why="true: also write TensorBoard event files to <output_dir>/tensorboard (pip install 'esvit[tensorboard]')"),
}


@dataclass
class CheckpointConfig:
    """Checkpoint frequency and retention (a checkpoint is always written at the end)."""

    every_epochs: int = 1
    every_steps: int = 0
    keep_last: int = 3


CHECKPOINT_RANGES: Ranges = {
    "every_epochs": num(0, why="0: not by epoch"),
    "every_steps": num(0, why="0: not by step"),
    "keep_last": num(1),
}


@dataclass
class KnnConfig:
    """Optional online kNN monitor on a labeled folder (``every_epochs`` 0 disables).

    ``preprocess``: evaluation preprocessing, as ``esvit-knn --preprocess``: ``dino`` (short side
    to ``global_size / 0.875``, centre crop ``global_size``), ``resize`` (the training canvas
    resized to ``global_size``) or ``auto`` (``dino`` when the images are larger than
    ``global_size``).
    """

    every_epochs: int = 0
    train_path: str | None = None
    val_path: str | None = None
    k: int = 20
    temperature: float = 0.07
    max_train_images: int = 10000
    preprocess: str = "auto"


KNN_RANGES: Ranges = {
    "every_epochs": num(0, why="0 disables the monitor"),
    "train_path": text(null="no monitor"),
    "val_path": text(null="no monitor"),
    "k": num(1),
    "temperature": num(0, 1, lo_open=True, why="similarities are cosines in [-1, 1]: above 1 all neighbours "
                                               "weigh nearly the same"),
    "max_train_images": num(1),
    "preprocess": choice("auto", "dino", "resize"),
}


@dataclass
class Config:
    """Full training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    seed: int = 0
    device: str = "auto"


RUN_RANGES: Ranges = {"seed": SEED, "device": DEVICE}

TRAIN_RANGES: dict[type, Ranges] = {
    Config: RUN_RANGES, ModelConfig: MODEL_RANGES, AugmentConfig: AUGMENT_RANGES, DataConfig: DATA_RANGES,
    OptimConfig: OPTIM_RANGES, TeacherConfig: TEACHER_RANGES, LoggingConfig: LOGGING_RANGES,
    CheckpointConfig: CHECKPOINT_RANGES, KnnConfig: KNN_RANGES,
}


def peak_lr(o: Any) -> float:
    """The learning rate after warmup: ``optim.lr * optim.batch_size / 256``."""
    return o.lr * o.batch_size / 256.0


def no_longer_than_the_run(key: str) -> Link:
    """``key`` (in epochs) <= ``optim.epochs``: a ramp longer than the run never reaches its end."""
    section, name = key.split(".")
    return Link(key, "<= optim.epochs", lambda c: getattr(getattr(c, section), name) <= c.optim.epochs,
                ("optim.epochs",))


TRAIN_LINKS: tuple[Link, ...] = (
    Link("model.region_weight", "> 0 while model.region_loss is true (model.region_loss=false: plain DINO)",
         lambda c: not c.model.region_loss or c.model.region_weight > 0, ("model.region_loss",)),
    no_longer_than_the_run("model.region_warmup_epochs"),
    Link("augment.local_size", "<= augment.global_size", lambda c: c.augment.local_size <= c.augment.global_size,
         ("augment.global_size",)),
    Link("optim.batch_size", "a multiple of optim.accum_steps",
         lambda c: c.optim.batch_size % c.optim.accum_steps == 0, ("optim.accum_steps",)),
    Link("optim.accum_steps", "<= optim.batch_size / 2 (at least 2 images per forward pass)",
         lambda c: c.optim.batch_size >= 2 * c.optim.accum_steps, ("optim.batch_size",)),
    Link("optim.min_lr", "<= the peak LR optim.lr * optim.batch_size / 256",
         lambda c: c.optim.min_lr <= peak_lr(c.optim), ("optim.lr", "optim.batch_size")),
    no_longer_than_the_run("optim.warmup_epochs"),
    no_longer_than_the_run("optim.freeze_last_layer_epochs"),
    Link("teacher.momentum", "<= teacher.momentum_end", lambda c: c.teacher.momentum <= c.teacher.momentum_end,
         ("teacher.momentum_end",)),
    Link("teacher.temp", "< teacher.student_temp (the teacher sharpens)",
         lambda c: c.teacher.temp < c.teacher.student_temp, ("teacher.student_temp",)),
    Link("teacher.warmup_temp", "< teacher.student_temp (the teacher sharpens)",
         lambda c: c.teacher.warmup_temp < c.teacher.student_temp, ("teacher.student_temp",)),
    no_longer_than_the_run("teacher.warmup_temp_epochs"),
    Link("knn.train_path", "set while knn.every_epochs > 0 (else the monitor never runs)",
         lambda c: not c.knn.every_epochs or c.knn.train_path is not None, ("knn.every_epochs",)),
    Link("knn.val_path", "set while knn.every_epochs > 0 (else the monitor never runs)",
         lambda c: not c.knn.every_epochs or c.knn.val_path is not None, ("knn.every_epochs",)),
    Link("knn.k", "<= knn.max_train_images (more neighbours than the bank holds)",
         lambda c: c.knn.k <= c.knn.max_train_images, ("knn.max_train_images",)),
)

# Allowed values of the choice keys (derived from the range tables).
_CHOICES: dict[str, tuple[str, ...]] = {}  # filled below, once the walker is defined


# ----------------------------------------------------------------------------- checking ranges


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# The rule of a key missing from its table (``tests/test_config_ranges.py`` fails for such a key;
# at load time its type and finiteness are still checked).
UNCHECKED = Rule("any value of its type", lambda v: True)


def _rules_of(cls: type, ranges: Mapping[type, Ranges], strict: bool) -> Ranges:
    for klass in cls.__mro__:
        if klass in ranges:
            return ranges[klass]
    if strict:
        raise KeyError(f"no range table for {cls.__name__}")
    return {}


def iter_keys(obj: Any, ranges: Mapping[type, Ranges], prefix: str = "", strict: bool = True,
              ) -> Iterator[tuple[str, Any, Any, Rule]]:
    """Every leaf key of a config dataclass instance: ``(dotted key, annotation, value, rule)``.

    Raises:
        KeyError: With ``strict``, a dataclass or a field has no rule (else :data:`UNCHECKED`).
    """
    hints = typing.get_type_hints(type(obj))
    rules = _rules_of(type(obj), ranges, strict)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_keys(value, ranges, f"{prefix}{f.name}.", strict)
            continue
        if strict and f.name not in rules:
            raise KeyError(f"no range rule for config key {prefix}{f.name}")
        yield f"{prefix}{f.name}", hints[f.name], value, rules.get(f.name, UNCHECKED)


def get_key(cfg: Any, key: str) -> Any:
    """Value of dotted ``key`` in a config dataclass."""
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check_config(cfg: Any, ranges: Mapping[type, Ranges], links: Sequence[Link] = ()) -> None:
    """Check every key against its rule, then the constraints between keys.

    Raises:
        ConfigError: One line naming the first offending key, what it must be and its value.
    """
    for key, _, value, rule in iter_keys(cfg, ranges, strict=False):
        if not rule.accepts(value):
            why = f" ({rule.why})" if rule.why else ""
            raise ConfigError(f"{key}: must be {rule.describe()}, got {value!r}{why}")
    for link in links:
        if not link.check(cfg):
            refs = ", ".join(f"{r}={get_key(cfg, r)!r}" for r in link.refs)
            raise ConfigError(f"{link.key}: must be {link.doc}, got {get_key(cfg, link.key)!r}"
                              + (f" ({refs})" if refs else ""))


_CHOICES.update({key: rule.options for key, _, _, rule in iter_keys(Config(), TRAIN_RANGES) if rule.options})


def _validate_drop_path(m: ModelConfig) -> None:
    """``model.drop_path_rate`` given once, and only for backbones with stochastic depth."""
    rate = m.drop_path_rate
    if rate is None:
        return
    if "drop_path_rate" in m.backbone_kwargs:
        raise ConfigError("model.drop_path_rate: also set as model.backbone_kwargs.drop_path_rate; set it once, "
                          "as model.drop_path_rate")
    # imported here: torch is loaded only when a rate is set
    from esvit.backbones import list_backbones, supports_drop_path

    if rate > 0 and m.backbone in list_backbones() and not supports_drop_path(m.backbone):
        raise ConfigError(f"model.drop_path_rate: backbone {m.backbone!r} has no stochastic depth (drop-path), "
                          f"got {rate:g}; set model.drop_path_rate to 0 or null")


def validate(cfg: Config) -> Config:
    """Check value ranges and cross-field constraints; raise :class:`ConfigError` naming the key."""
    check_config(cfg, TRAIN_RANGES, TRAIN_LINKS)
    _validate_drop_path(cfg.model)
    _validate_kornia_ops(cfg.augment)
    _validate_tensorboard(cfg.logging)
    return cfg


def _validate_tensorboard(lg: LoggingConfig) -> None:
    """``logging.tensorboard: true`` without the package fails at load time, not after the data scan."""
    import importlib.util

    if lg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard: needs the tensorboard package: pip install 'esvit[tensorboard]' "
                          "(or set logging.tensorboard=false)")


def _validate_kornia_ops(a: AugmentConfig) -> None:
    """Build the extra kornia ops once, so a typo fails at load time with kornia's reason."""
    from esvit.augment.extra import build_kornia_op

    for key in ("extra_global", "extra_local"):
        for spec in getattr(a, key):
            try:
                build_kornia_op(spec, f"augment.{key}")
            except ValueError as e:
                raise ConfigError(str(e)) from None


# ------------------------------------------------------------------------- types and overrides


def _check_finite_tree(value: Any, key: str) -> None:
    """Reject inf / nan anywhere inside a free-form mapping (e.g. ``model.backbone_kwargs``)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise NonFiniteError(f"{key}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite_tree(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite_tree(v, f"{key}[{i}]")


def _coerce_union(value: Any, tp: Any, args: tuple[Any, ...], key: str) -> Any:
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except NonFiniteError:
            raise
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _coerce_float(value: Any, key: str) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads 5e-4 as a string
        out = float(value)
    else:
        return None
    if not math.isfinite(out):
        raise NonFiniteError(f"{key}: must be a finite number, got {out!r}")
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (converting int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, args, key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        out = _coerce_float(value, key)
        if out is not None:
            return out
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    elif origin is dict:
        if isinstance(value, dict):
            _check_finite_tree(value, key)
            return dict(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    else:
        raise ConfigError(f"{key}: unsupported annotation {tp}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (valid keys in {where}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value`` (value parsed as YAML: numbers, bools, lists, null).

    Raises:
        ConfigError: No ``=``, an empty key, or a mapping value with a duplicate key.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=1e-3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader
    except DuplicateKeyError as e:
        raise ConfigError(f"override {text!r}: {e.problem}") from None
    except yaml.YAMLError:
        value = raw
    return key, value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config dict (in place) and return it."""
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a (nested) dict."""
    return validate(_from_dict(Config, data or {}, ""))


def dataclass_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build any (nested) config dataclass from a dict; unknown keys / wrong types raise
    :class:`ConfigError` naming the dotted key. Other tools (e.g. distillation) reuse this."""
    return _from_dict(cls, data or {}, "")


# ------------------------------------------------------------------------------------ YAML files


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping names the same key twice (PyYAML would keep the last one silently)."""


def _check_unique_keys(node: yaml.Node, prefix: str) -> None:
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{prefix}[{i}]")
        return
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden, as YAML says
            continue
        name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else key_node.start_mark.line
        dotted = f"{prefix}.{name}" if prefix else str(name)
        if name in seen:
            raise DuplicateKeyError(None, None, f"duplicate key '{dotted}' (first at line {seen[name] + 1})",
                                    key_node.start_mark)
        seen[name] = key_node.start_mark.line
        _check_unique_keys(value_node, dotted)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping naming a key twice, at any depth."""

    def construct_document(self, node: yaml.Node) -> Any:
        """Check the composed document for duplicate keys, then construct it as SafeLoader."""
        _check_unique_keys(node, "")
        return super().construct_document(node)


def load_yaml_config(
    cls: type[T], path: str | Path | None, overrides: list[str] | None = None,
    validator: Callable[[T], T] | None = None,
) -> T:
    """Load a YAML file into dataclass ``cls`` with dotted overrides and an optional validator."""
    data = _read_yaml(path)
    apply_overrides(data, overrides or [])
    try:
        cfg = dataclass_from_dict(cls, data)
        return validator(cfg) if validator is not None else cfg
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def _read_yaml(path: str | Path | None) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if path is not None:
        from esvit.recipes import find_config

        p = find_config(path)  # a path, or the name of a shipped recipe
        try:
            data = yaml.load(p.read_text(), Loader=UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as e:  # one line: where and what (PyYAML's text spans several)
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{p}: invalid YAML{where}: {what}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        FileNotFoundError: The file does not exist.
        ConfigError: Unknown or duplicate key, wrong type or value out of range (the message
            names the key and the file).
    """
    return load_yaml_config(Config, path, overrides, validate)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON and checkpoints."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved configuration as YAML (temp file + rename: a killed run never leaves
    a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- reference docs


def _yaml_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _type_doc(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_doc(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return "[" + ", ".join(_type_doc(a) for a in args) + "]"
    if typing.get_origin(tp) is dict:
        return "mapping"
    return _type_name(tp)


def reference_table(cfg: Any, ranges: Mapping[type, Ranges], links: Sequence[Link]) -> str:
    """Markdown table of every key of ``cfg`` (an instance holding the defaults): type, default,
    valid values (the key's rule, then the constraints reported on it) and why."""
    extra: dict[str, list[str]] = {}
    for link in links:
        extra.setdefault(link.key, []).append(link.doc)
    rows = ["| Key | Type | Default | Valid values | Why |", "| --- | --- | --- | --- | --- |"]
    for key, tp, value, rule in iter_keys(cfg, ranges):
        cells = [f"`{key}`", _type_doc(tp), f"`{_yaml_value(value)}`", "; ".join([rule.describe(), *extra.get(key, [])]),
                 rule.why]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


REFERENCE_HEADER = """\
# Configuration reference

Generated by `python -m esvit.config > docs/config.md` from the range tables the validator uses
(`esvit/config.py`, `esvit/distill/config.py`); `tests/test_config_ranges.py` fails when this page
and the tables differ.

Every key is checked when the configuration is loaded (YAML file, then `key=value` overrides):
a value out of range, `inf` or `nan` anywhere, an unknown key, a wrong type or a key given twice in
one YAML mapping (at any depth) is a one-line error naming the key (and the file and line for
duplicates). Numbers are finite; "in [a, b)" is an interval; "[min, max] with ..." is a pair.
"""


def reference_markdown() -> str:
    """The whole of ``docs/config.md``: training and distillation keys."""
    from esvit.distill.config import DISTILL_LINKS, DISTILL_RANGES, DistillConfig

    return "\n".join([
        REFERENCE_HEADER,
        "## Training (`esvit-train`, `train_ssl.py`)\n",
        reference_table(Config(), TRAIN_RANGES, TRAIN_LINKS),
        "## Distillation (`esvit-distill`, `distill.py`)\n",
        "The loss parameters of the kinds not chosen by `loss.kind` are checked too.\n",
        reference_table(DistillConfig(), DISTILL_RANGES, DISTILL_LINKS),
    ])


if __name__ == "__main__":
    print(reference_markdown(), end="")
