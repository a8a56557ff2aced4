"""Load a pretrained backbone from any esvit checkpoint, and export it for torchvision.

Three inputs are accepted by :func:`load_backbone`, always read with
:func:`esvit.train.checkpoint.safe_load` (``weights_only=True``: a pickle that carries code is
refused; a damaged or forged file is a one-line error naming the file and the field; a file of
another kind, e.g. a distillation checkpoint, says what it is and what to pass instead):

* a **training checkpoint** written by :func:`esvit.train.loop.save_checkpoint`: a dict with the
  ``"teacher"`` / ``"student"`` :class:`~esvit.model.EsViTModel` state dicts, the ``"backbone"``
  registry name and the run ``"config"`` (whose ``model.backbone_kwargs`` rebuilds the net);
* an **exported backbone** written by :func:`export_backbone`: a ``.safetensors`` or plain
  ``.pt`` state dict with its JSON card beside it (:mod:`esvit.formats`), or the older single-file
  ``{"format": "esvit-backbone", "backbone": name, "backbone_kwargs": {...}, "state_dict": {...}}``;
* a **bare state dict** of the backbone (``backbone=`` must then name the architecture).

The exported state dict has exactly the keys of the plain torchvision model
(:func:`esvit.backbones.torchvision_equivalent`) and loads into it with ``strict=True``.
ONNX and TorchScript exports are for deployment and are not read back.
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
from esvit.formats import (
    EXTENSIONS,
    backbone_card,
    card_path,
    format_for,
    load_safetensors,
    read_card,
    write_backbone,
)
from esvit.train.checkpoint import (
    KIND_NAMES,
    CheckpointError,
    check_fields,
    check_state_dict,
    identify,
    is_state_dict,
    safe_load,
)

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


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and is_state_dict(obj)


def _strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _bare_state(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Normalise a user-given state dict: unwrap ``{"state_dict": ...}``, strip common prefixes."""
    for key in ("state_dict", "model"):
        if _is_tensor_dict(state.get(key)):
            state = state[key]
            break
    out = dict(state)
    for prefix in ("module.", BACKBONE_PREFIX):
        if any(k.startswith(prefix) for k in out):
            out = _strip_prefix(out, prefix)
    return out


def _int_or_none(x: Any) -> int | None:
    return int(x) if isinstance(x, int) and not isinstance(x, bool) else None


@dataclass
class _Recorded:
    """What a file says about its backbone: weights, name, options, resolution."""

    state: dict[str, Tensor]
    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None


def _from_export(obj: Mapping[str, Any]) -> _Recorded:
    return _Recorded(dict(obj["state_dict"]), obj["backbone"], dict(obj.get("backbone_kwargs") or {}),
                     _int_or_none(obj.get("image_size")))


def _from_training(obj: Mapping[str, Any], path: Path, key: str) -> _Recorded:
    if not _is_tensor_dict(obj.get(key)):
        have = [k for k in CHECKPOINT_KEYS if _is_tensor_dict(obj.get(k))]
        raise CheckpointError(f"{path} has no {key!r} weights; available: {have}")
    cfg = obj.get("config") or {}
    model_cfg, aug_cfg = cfg.get("model") or {}, cfg.get("augment") or {}
    state = _strip_prefix(obj[key], BACKBONE_PREFIX)
    if not state:
        raise CheckpointError(f"{path} [{key}] holds no backbone weights (no keys starting with "
                              f"{BACKBONE_PREFIX!r}); is it an esvit training checkpoint?")
    return _Recorded(state, obj.get("backbone") or model_cfg.get("backbone"),
                     dict(model_cfg.get("backbone_kwargs") or {}), _int_or_none(aug_cfg.get("global_size")))


def _not_a_backbone(path: Path, kind: str, obj: Mapping[str, Any]) -> CheckpointError:
    """The error for a file of another kind: what it is and what to pass instead."""
    if kind in ("distill", "classifier", "plain_vit"):
        hint = "its student's backbone is student_backbone.pt in the same run folder"
    elif kind in ("linear_head", "feature_cache", "teacher_logits"):
        hint = "pass the checkpoint it was computed from"
    else:
        hint = (f"expected an esvit training checkpoint (keys 'teacher'/'student'), an exported backbone "
                f"(format {EXPORT_FORMAT!r}) or a state dict of tensors; top-level keys: {sorted(map(str, obj))[:10]}")
    return CheckpointError(f"{path} is {KIND_NAMES[kind]}, not a backbone: {hint}")


def _from_card(state: dict[str, Tensor], path: Path) -> _Recorded | None:
    """A plain state dict / safetensors file with the JSON card :func:`export_backbone` wrote."""
    try:
        card = read_card(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if card is None:
        return None
    return _Recorded(_bare_state(state), card["backbone"], dict(card.get("backbone_kwargs") or {}),
                     _int_or_none(card.get("image_size")))


def _read_backbone_file(path: Path, backbone: str | None, key: str, map_location: str | torch.device
                        ) -> tuple[_Recorded, str]:
    """Load ``path`` once (:func:`safe_load` checks its fields) and say what it records."""
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt in ("onnx", "torchscript"):
        raise CheckpointError(f"{path} is a {fmt} export, a deployment format esvit does not train or evaluate "
                              "from: pass the .safetensors / .pt export or the training checkpoint")
    if fmt == "safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            state = load_safetensors(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        rec = _from_card(state, path) or _Recorded(_bare_state(state))
        if rec.name is None and backbone is None:
            raise CheckpointError(f"{path} has no card ({card_path(path).name}) naming its backbone: pass "
                                  "backbone=<name> (CLI: --backbone)")
        return rec, "export"
    obj = safe_load(path, map_location=map_location)
    kind = identify(obj)
    if kind == "state_dict" and (rec := _from_card(obj, path)) is not None:
        return rec, "export"
    if kind == "export":
        check_fields(obj, path, kind)
        return _from_export(obj), "export"
    if kind == "training":
        return _from_training(obj, path, key), "training"
    if kind != "state_dict":
        raise _not_a_backbone(path, kind, obj)
    if backbone is None:
        raise CheckpointError(
            f"{path} is a bare state dict (no 'teacher'/'student' and no format {EXPORT_FORMAT!r}): pass "
            "backbone=<name> (CLI: --backbone) to say which architecture it belongs to"
        )
    return _Recorded(_bare_state(obj)), "state_dict"


def _build(name: str, kwargs: dict[str, Any], path: Path) -> tuple[nn.Module, BackboneSpec]:
    """``build_backbone`` with options a file recorded: a bad option names the file."""
    try:
        return build_backbone(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build backbone {name!r} with options {kwargs} (field "
                              f"'backbone_kwargs' or --backbone): {' '.join(str(e).split())}") from None


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
    if checkpoint_key not in CHECKPOINT_KEYS:
        raise ValueError(f"checkpoint_key must be one of {CHECKPOINT_KEYS}, got {checkpoint_key!r}")
    rec, source = _read_backbone_file(path, backbone, checkpoint_key, map_location)
    key = checkpoint_key if source == "training" else None
    if backbone is not None and rec.name is not None and backbone != rec.name:
        raise CheckpointError(f"{path} holds backbone {rec.name!r}, but backbone={backbone!r} was requested")
    name = backbone or rec.name
    if not isinstance(name, str):
        raise CheckpointError(f"{path} does not record its backbone name; pass backbone=<name>")
    kwargs = {**rec.kwargs, **dict(backbone_kwargs or {})}
    net, spec = _build(name, kwargs, path)
    what = f"{path}" + (f" [{key}]" if key else "") + f" (backbone {name!r})"
    check_state_dict(net, rec.state, what)
    net.load_state_dict(rec.state, strict=True)
    net.to(map_location).eval()
    image_size = rec.image_size if rec.image_size is not None else _int_or_none(kwargs.get("image_size"))
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
    fmt: str | None = None,
) -> Path:
    """Write the backbone of ``checkpoint`` as a standard file, with a JSON card beside it.

    Formats (:mod:`esvit.formats`; by default from the extension, a mismatch is an error):
    ``safetensors`` and ``pt`` (a plain state dict that loads with ``strict=True`` into the
    matching torchvision model, ``torchvision_equivalent(name, **backbone_kwargs)``, checked
    before writing where one is registered, or ``timm.create_model(name, num_classes=0)``),
    ``onnx`` and ``torchscript`` (pooled features, checked against PyTorch). The card
    ``<out>.json`` holds the backbone name and options, the constructor, the input size, the
    normalisation and the evaluation protocol; :func:`load_backbone` reads both files back.

    Args:
        checkpoint: Training checkpoint, export or (with ``backbone``) bare state dict.
        out_path: Output path (``.safetensors``, ``.pt``/``.pth``, ``.onnx``, ``.ts``).
        checkpoint_key: ``"teacher"`` or ``"student"``.
        backbone: Registry name (needed for bare state dicts only).
        fmt: ``safetensors``, ``pt``, ``onnx`` or ``torchscript`` (None: from the extension).

    Returns:
        The written path.
    """
    fmt = format_for(out_path, fmt)
    info = load_backbone_info(checkpoint, backbone, checkpoint_key)
    if fmt in ("pt", "safetensors"):
        try:
            reference = torchvision_equivalent(info.name, **info.backbone_kwargs)
        except ValueError as e:
            log.info("not checking torchvision compatibility: %s", e)
        else:
            check_state_dict(reference, info.net.state_dict(), f"exported backbone {info.name!r} vs torchvision model")
    card = backbone_card(info.name, info.backbone_kwargs, info.spec.export_ctor, info.image_size,
                         Path(out_path).name, fmt, info.checkpoint_key)
    return write_backbone(info.net, out_path, fmt, card, info.image_size)


def export_run(out_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The standard files at the end of a training run: ``backbone.safetensors`` + ``backbone.json``
    (the teacher backbone, :func:`export_backbone`) and ``checkpoint_last.pt``, an alias (hard link,
    else copy) of the last checkpoint, in ``out_dir``.

    Args:
        out_dir: The run folder.
        checkpoint: The checkpoint to export (None: the newest in ``out_dir``).

    Returns:
        The path of ``backbone.safetensors``.

    Raises:
        FileNotFoundError: the run folder holds no checkpoint.
    """
    import os
    import shutil

    from esvit.train.checkpoint import list_checkpoints

    out_dir = Path(out_dir)
    if checkpoint is None:
        found = list_checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"{out_dir} holds no checkpoint to export")
        checkpoint = found[-1]
    out = export_backbone(checkpoint, out_dir / "backbone.safetensors")
    last, tmp = out_dir / "checkpoint_last.pt", out_dir / ".checkpoint_last.pt.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(checkpoint, tmp)
    except OSError:  # no hard links on this filesystem
        shutil.copyfile(checkpoint, tmp)
    os.replace(tmp, last)
    return out
