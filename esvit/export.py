"""Load a pretrained backbone from any esvit checkpoint, and export it for torchvision.

Three inputs are accepted by :func:`load_backbone`, always read with
``torch.load(weights_only=True)`` (a pickle that carries code is refused):

* a **training checkpoint** written by :func:`esvit.train.loop.save_checkpoint`: a dict with the
  ``"teacher"`` / ``"student"`` :class:`~esvit.model.EsViTModel` state dicts, the ``"backbone"``
  registry name and the run ``"config"`` (whose ``model.backbone_kwargs`` rebuilds the net);
* an **exported backbone** written by :func:`export_backbone`:
  ``{"format": "esvit-backbone", "backbone": name, "backbone_kwargs": {...}, "state_dict": {...}}``;
* a **bare state dict** of the backbone (``backbone=`` must then name the architecture).

The exported ``state_dict`` has exactly the keys of the plain torchvision model
(:func:`esvit.backbones.torchvision_equivalent`) and loads into it with ``strict=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from esvit.backbones import BackboneSpec, build_backbone, torchvision_equivalent
from esvit.train.checkpoint import CheckpointError, atomic_save, check_state_dict, safe_load

__all__ = [
    "BACKBONE_PREFIX",
    "EXPORT_FORMAT",
    "LoadedBackbone",
    "export_backbone",
    "load_backbone",
    "load_backbone_info",
]

log = logging.getLogger("esvit.export")

EXPORT_FORMAT = "esvit-backbone"
EXPORT_VERSION = 1
# EsViTModel keeps its NetWrapper as ``.backbone`` and NetWrapper keeps the raw network as
# ``.net``: the backbone's own keys follow this prefix in an EsViTModel state dict.
BACKBONE_PREFIX = "backbone.net."
CHECKPOINT_KEYS = ("teacher", "student")


@dataclass
class LoadedBackbone:
    """A backbone restored from a checkpoint, with what is known about how it was trained.

    Attributes:
        net: The backbone (eval mode, on CPU unless ``map_location`` said otherwise).
        spec: Its registry :class:`BackboneSpec`.
        name: Registry name.
        backbone_kwargs: Options it was built with.
        image_size: Training resolution (global crop size) when recorded, else None.
        source: ``"training"``, ``"export"`` or ``"state_dict"``.
        checkpoint_key: ``"teacher"`` / ``"student"`` for training checkpoints, else None.
    """

    net: nn.Module
    spec: BackboneSpec
    name: str
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    source: str = "state_dict"
    checkpoint_key: str | None = None


def _is_tensor_dict(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _bare_state(state: Mapping[str, Any], path: Path) -> dict[str, Tensor]:
    """Normalise a user-given state dict: unwrap ``{"state_dict": ...}``, strip common prefixes."""
    for key in ("state_dict", "model"):
        inner = state.get(key)
        if isinstance(inner, Mapping) and _is_tensor_dict(inner):
            state = inner
            break
    if not _is_tensor_dict(state):
        raise CheckpointError(
            f"{path} is neither an esvit training checkpoint (keys 'teacher'/'student'), an exported "
            f"backbone (format {EXPORT_FORMAT!r}) nor a state dict of tensors; top-level keys: "
            f"{sorted(map(str, state))[:10]}"
        )
    out = dict(state)
    for prefix in ("module.", BACKBONE_PREFIX):
        if any(k.startswith(prefix) for k in out):
            out = _strip_prefix(out, prefix)
    return out


def _int_or_none(x: Any) -> int | None:
    return int(x) if isinstance(x, int) and not isinstance(x, bool) else None


def load_backbone_info(
    checkpoint: str | Path,
    backbone: str | None = None,
    checkpoint_key: str = "teacher",
    backbone_kwargs: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedBackbone:
    """Like :func:`load_backbone` but also return the recorded metadata.

    Args: see :func:`load_backbone`.

    Returns:
        :class:`LoadedBackbone`.
    """
    path = Path(checkpoint)
    obj = safe_load(path, map_location=map_location)
    if checkpoint_key not in CHECKPOINT_KEYS:
        raise ValueError(f"checkpoint_key must be one of {CHECKPOINT_KEYS}, got {checkpoint_key!r}")
    recorded_name: str | None = None
    recorded_kwargs: dict[str, Any] = {}
    image_size: int | None = None
    key: str | None = None
    if obj.get("format") == EXPORT_FORMAT:
        source = "export"
        recorded_name = obj.get("backbone")
        recorded_kwargs = dict(obj.get("backbone_kwargs") or {})
        image_size = _int_or_none(obj.get("image_size"))
        state = obj.get("state_dict")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: exported backbone file has no 'state_dict'")
        state = dict(state)
    elif any(k in obj for k in CHECKPOINT_KEYS):
        source = "training"
        key = checkpoint_key
        if key not in obj or not isinstance(obj[key], Mapping):
            have = [k for k in CHECKPOINT_KEYS if k in obj]
            raise CheckpointError(f"{path} has no {key!r} weights; available: {have}")
        recorded_name = obj.get("backbone")
        cfg = obj.get("config") or {}
        model_cfg = cfg.get("model", {}) if isinstance(cfg, Mapping) else {}
        recorded_name = recorded_name or model_cfg.get("backbone")
        recorded_kwargs = dict(model_cfg.get("backbone_kwargs") or {})
        aug_cfg = cfg.get("augment", {}) if isinstance(cfg, Mapping) else {}
        image_size = _int_or_none(aug_cfg.get("global_size"))
        state = _strip_prefix(obj[key], BACKBONE_PREFIX)
        if not state:
            raise CheckpointError(
                f"{path} [{key}] holds no backbone weights (no keys starting with "
                f"{BACKBONE_PREFIX!r}); is it an esvit training checkpoint?"
            )
    else:
        source = "state_dict"
        if backbone is None:
            raise CheckpointError(
                f"{path} is a bare state dict (no 'teacher'/'student' and no format "
                f"{EXPORT_FORMAT!r}): pass backbone=<name> (CLI: --backbone) to say which "
                "architecture it belongs to"
            )
        state = _bare_state(obj, path)

    if backbone is not None and recorded_name is not None and backbone != recorded_name:
        raise CheckpointError(
            f"{path} holds backbone {recorded_name!r}, but backbone={backbone!r} was requested"
        )
    name = backbone or recorded_name
    if not isinstance(name, str):
        raise CheckpointError(f"{path} does not record its backbone name; pass backbone=<name>")
    kwargs = {**recorded_kwargs, **dict(backbone_kwargs or {})}
    net, spec = build_backbone(name, **kwargs)
    what = f"{path}" + (f" [{key}]" if key else "") + f" (backbone {name!r})"
    check_state_dict(net, state, what)
    net.load_state_dict(state, strict=True)
    net.to(map_location).eval()
    if image_size is None:
        image_size = _int_or_none(kwargs.get("image_size"))
    return LoadedBackbone(net, spec, name, kwargs, image_size, source, key)


def load_backbone(
    checkpoint: str | Path,
    backbone: str | None = None,
    checkpoint_key: str = "teacher",
    backbone_kwargs: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, BackboneSpec]:
    """Rebuild a pretrained backbone from a training checkpoint, an export or a state dict.

    Args:
        checkpoint: Path of the file (always loaded with ``weights_only=True``).
        backbone: Registry name; required for a bare state dict, else checked against the
            recorded name.
        checkpoint_key: ``"teacher"`` (default, as in DINO/EsViT evaluation) or ``"student"``
            (training checkpoints only).
        backbone_kwargs: Options overriding the recorded ``backbone_kwargs``.
        map_location: Device the weights are loaded to.

    Returns:
        ``(net, spec)``: the backbone in eval mode and its :class:`BackboneSpec`
        (wrap with ``NetWrapper.from_spec(net, spec)`` for pooled / region features).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: Unreadable or unsafe file, missing key, or weights of another
            architecture (the message lists the first mismatched keys).
        ValueError: Unknown backbone name or ``checkpoint_key``.
    """
    info = load_backbone_info(checkpoint, backbone, checkpoint_key, backbone_kwargs, map_location)
    return info.net, info.spec


def export_backbone(
    checkpoint: str | Path,
    out_path: str | Path,
    checkpoint_key: str = "teacher",
    backbone: str | None = None,
) -> Path:
    """Write the backbone weights of ``checkpoint`` as a standalone file (atomically).

    The file is ``{"format": "esvit-backbone", "format_version": 1, "backbone": name,
    "backbone_kwargs": {...}, "export_ctor": dotted torchvision constructor, "image_size": int
    or None, "state_dict": {...}}``. Its ``state_dict`` loads with ``strict=True`` into
    ``torchvision_equivalent(name, **backbone_kwargs)`` (checked before writing when the backbone
    has a registered equivalent) and into ``build_backbone(name, **backbone_kwargs)[0]``.

    Args:
        checkpoint: Training checkpoint, export or (with ``backbone``) bare state dict.
        out_path: Output ``.pt`` path.
        checkpoint_key: ``"teacher"`` or ``"student"``.
        backbone: Registry name (needed for bare state dicts only).

    Returns:
        The written path.
    """
    info = load_backbone_info(checkpoint, backbone, checkpoint_key)
    state = {k: v.detach().cpu().clone() for k, v in info.net.state_dict().items()}
    try:
        reference = torchvision_equivalent(info.name, **info.backbone_kwargs)
    except ValueError as e:
        log.warning("not checking torchvision compatibility: %s", e)
    else:
        check_state_dict(reference, state, f"exported backbone {info.name!r} vs torchvision model")
    payload = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "backbone": info.name,
        "backbone_kwargs": info.backbone_kwargs,
        "export_ctor": info.spec.export_ctor,
        "image_size": info.image_size,
        "checkpoint_key": info.checkpoint_key,
        "state_dict": state,
    }
    return atomic_save(payload, out_path)
