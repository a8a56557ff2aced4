"""One-line Python API: ``esvit.pretrain(data="path/to/images", model="resnet18", out="runs/x")``.

In the spirit of ``lightly_train.pretrain``: a folder of unlabelled images in, the exported
backbone out (``<out>/backbone.safetensors`` with its JSON card, see :mod:`esvit.formats`).
``esvit.embed``, ``esvit.knn_eval`` and ``esvit.linear_probe`` stay plain functions.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["pretrain"]

_module_ids = itertools.count()


def _register_module(module: nn.Module, image_size: int) -> str:
    """Register a user's ``nn.Module`` as a backbone whose spec is found by probing it."""
    from esvit.backbones import register_backbone
    from esvit.backbones.hub import probe_spec

    name = f"_module_{type(module).__name__}_{next(_module_ids)}"
    spec = probe_spec(module, name, image_size)

    @register_backbone(name)
    def factory(image_size: int = image_size) -> tuple[nn.Module, Any]:
        return module, spec

    return name


def pretrain(
    data: str | Path,
    model: str | nn.Module = "resnet18",
    out: str | Path = "runs/esvit",
    config: str | Path | None = None,
    resume: bool = False,
    **overrides: Any,
) -> Path:
    """Pretrain a backbone with EsViT on a folder of images and export it.

    Args:
        data: Image folder (any layout; labels are not used).
        model: A backbone name (``resnet18``, ``vit_small``, ``timm/<name>``,
            ``torchvision/<name>``; see ``esvit.list_backbones()``) or any ``nn.Module`` (its
            feature layer is found by running it once; it is trained in place, and a run
            resumed in a new process needs it registered again under the same name). A
            backbone other than the recipe's drops the recipe's ``model.backbone_kwargs``.
        out: Run folder (checkpoints, metrics, the exported backbone).
        config: A recipe (path or shipped name, e.g. ``"cifar10_resnet18"``); None: the defaults.
        resume: Continue the run in ``out`` (``--resume auto``).
        **overrides: Config keys with ``__`` for the dots: ``optim__epochs=10``,
            ``augment__global_size=128``.

    Returns:
        The path of ``<out>/backbone.safetensors``.
    """
    from esvit.config import load_config
    from esvit.export import export_run
    from esvit.train.loop import train

    dotted = [f"{k.replace('__', '.')}={_yaml(v)}" for k, v in overrides.items()]
    base = [f"data.path={data}", "data.kind=folder", f"logging.output_dir={out}"]
    cfg = load_config(config, [*base, *dotted])
    name = model if isinstance(model, str) else _register_module(model, cfg.augment.global_size)
    if name != cfg.model.backbone:  # the recipe's backbone options belong to its own backbone
        cfg = load_config(config, [*base, f"model.backbone={name}", "model.backbone_kwargs={}", *dotted])
    result = train(cfg, resume="auto" if resume else None)
    backbone = Path(out) / "backbone.safetensors"
    return backbone if backbone.is_file() else export_run(out, result.last_checkpoint)


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
