"""Run configuration: dataclasses validated from YAML, dotted command-line overrides.

``load_config(path, overrides)`` reads a YAML file, applies ``section.key=value`` overrides and
returns a :class:`Config`. Unknown keys and wrong types raise :class:`ConfigError` naming the
dotted key; ``save_config`` writes the resolved configuration beside the run.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""


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

    backbone: str = "cifar_resnet18"
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
    num_workers: int = 4
    max_bad_fraction: float = 0.01
    synthetic_images: int = 512
    synthetic_classes: int = 10


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


@dataclass
class LoggingConfig:
    """Where and how to log. ``wandb``: disabled, offline or online."""

    output_dir: str = "runs/esvit"
    wandb: str = "offline"
    wandb_project: str = "esvit"
    log_every: int = 10
    progress: bool = True


@dataclass
class CheckpointConfig:
    """Checkpoint frequency and retention (a checkpoint is always written at the end)."""

    every_epochs: int = 1
    every_steps: int = 0
    keep_last: int = 3


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


_CHOICES = {
    "data.kind": ("folder", "synthetic", "cifar10", "cifar100", "stl10"),
    "data.resize_mode": ("letterbox", "short_side_center_crop", "stretch"),
    "optim.amp": ("auto", "none", "fp16", "bf16"),
    "optim.clip_mode": ("per_param", "global"),
    "knn.preprocess": ("auto", "dino", "resize"),
    "logging.wandb": ("disabled", "offline", "online"),
}
_POSITIVE = (
    "model.out_dim", "model.hidden_dim", "model.bottleneck_dim", "augment.global_size", "augment.local_size",
    "data.canvas_size", "data.synthetic_images", "data.synthetic_classes", "optim.epochs", "optim.batch_size",
    "optim.accum_steps", "optim.lr", "teacher.temp", "teacher.warmup_temp", "teacher.student_temp",
    "logging.log_every", "checkpoint.keep_last", "knn.k", "knn.temperature",
)
_NON_NEGATIVE = (
    "augment.n_local", "data.num_workers", "data.max_bad_fraction", "optim.min_lr", "optim.warmup_epochs",
    "optim.weight_decay", "optim.weight_decay_end", "optim.clip_grad", "optim.freeze_last_layer_epochs",
    "model.region_warmup_epochs",
    "teacher.warmup_temp_epochs", "checkpoint.every_epochs", "checkpoint.every_steps", "knn.every_epochs",
)
_UNIT = ("augment.solarize_p", "model.region_weight")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (converting int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads 5e-4 as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    elif origin is dict:
        if isinstance(value, dict):
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
    unknown = sorted(set(data) - names)
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


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check_ranges(
    cfg: Any, choices: dict[str, tuple[str, ...]], positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (), unit: tuple[str, ...] = (),
) -> None:
    """Check dotted keys of any config dataclass: allowed choices, > 0, >= 0, in [0, 1].

    Raises:
        ConfigError: Naming the first offending key and its value.
    """
    for key, allowed in choices.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)}, got {_get(cfg, key)!r}")
    for key in positive:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)!r}")
    for key in non_negative:
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)!r}")
    for key in unit:
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"{key}: must be in [0, 1], got {_get(cfg, key)!r}")


def _validate_drop_path_and_sync_bn(m: ModelConfig) -> None:
    """``model.drop_path_rate`` in [0, 1), given once, and only for backbones with stochastic depth;
    ``model.sync_bn`` one of auto, true, false."""
    if not (isinstance(m.sync_bn, bool) or m.sync_bn == "auto"):
        raise ConfigError(f"model.sync_bn: must be auto, true or false, got {m.sync_bn!r}")
    rate = m.drop_path_rate
    if rate is None:
        return
    if not 0 <= rate < 1:
        raise ConfigError(f"model.drop_path_rate: must be in [0, 1) (or null: the backbone's default), got {rate!r}")
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
    check_ranges(cfg, _CHOICES, _POSITIVE, _NON_NEGATIVE, _UNIT)
    if cfg.model.region_out_dim is not None and cfg.model.region_out_dim <= 0:
        raise ConfigError(f"model.region_out_dim: must be > 0 (or null: model.out_dim), got {cfg.model.region_out_dim}")
    _validate_drop_path_and_sync_bn(cfg.model)
    if cfg.model.region_loss and cfg.model.region_weight == 0:
        raise ConfigError("model.region_weight: 0 trains nothing with the region loss; set model.region_loss=false "
                          "for plain DINO")
    a = cfg.augment
    if a.local_size > a.global_size:
        raise ConfigError(f"augment.local_size: {a.local_size} is larger than augment.global_size {a.global_size}")
    if not all(0 <= p <= 1 for p in a.blur_p):
        raise ConfigError(f"augment.blur_p: probabilities must be in [0, 1], got {a.blur_p}")
    if not 0 < a.blur_sigma[0] <= a.blur_sigma[1]:
        raise ConfigError(f"augment.blur_sigma: must satisfy 0 < min <= max, got {a.blur_sigma}")
    for key in ("augment.global_scale", "augment.local_scale"):
        lo, hi = _get(cfg, key)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{key}: must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
    if cfg.data.max_bad_fraction > 1:
        raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if not 0 <= cfg.teacher.momentum <= cfg.teacher.momentum_end <= 1:
        raise ConfigError("teacher.momentum: need 0 <= teacher.momentum <= teacher.momentum_end <= 1, "
                          f"got {cfg.teacher.momentum}, {cfg.teacher.momentum_end}")
    if cfg.data.kind == "folder" and cfg.data.path is not None and not cfg.data.path.strip():
        raise ConfigError("data.path: empty string")
    if cfg.optim.batch_size % cfg.optim.accum_steps:
        raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} is not divisible by "
                          f"optim.accum_steps={cfg.optim.accum_steps}")
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value`` (value parsed as YAML: numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=1e-3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
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
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
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
        ConfigError: Unknown key, wrong type or invalid value (message names the key and file).
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
