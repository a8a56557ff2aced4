"""Any timm or torchvision model as a backbone, by name: ``timm/<name>``, ``torchvision/<name>``.

The model is built with random weights (nothing is downloaded; start from local weights with
``model.init_weights``), its classifier removed, and its :class:`BackboneSpec` found by running
it once on a ``(1, 3, image_size, image_size)`` input with a forward hook on every module
(:func:`probe_spec`): the hooked layer is the last module, in execution order, whose output is
still a feature map (3-D tokens, or 4-D with a spatial grid larger than 1x1), i.e. the layer
just before global pooling. Its layout follows from which output dimensions hold the square
grid (``bchw`` or ``bhwc``) or is ``bnd`` for tokens; prefix tokens (CLS and register tokens,
timm's ``num_prefix_tokens``) are never region tokens. Variable input sizes: timm ViTs are built
with ``dynamic_img_size=True``; torchvision ViTs become :class:`~esvit.backbones.vit.FlexibleVisionTransformer`
(same state dict); CNNs and Swins take any size their strides allow.

Stochastic depth: timm models take ``drop_path_rate`` (a model that does not is a one-line
error); torchvision Swins, ConvNeXts, EfficientNets and MaxViTs get it as
``stochastic_depth_prob``, torchvision ViTs per-block drop-path like the built-in ViTs; other
torchvision models have none (``drop_path_rate > 0`` is an error).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .registry import BackboneSpec

__all__ = ["HUB_PREFIXES", "hub_factory", "probe_spec"]

HUB_PREFIXES = ("timm/", "torchvision/")
_CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")
#: torchvision families whose builders take ``stochastic_depth_prob``.
_TV_STOCHASTIC_DEPTH = ("swin", "convnext", "efficientnet", "maxvit")


def _is_bchw(s: tuple[int, ...]) -> bool:
    return s[2] == s[3] > 1 and s[1] != s[2]


def _is_bhwc(s: tuple[int, ...]) -> bool:
    return s[1] == s[2] > 1 and s[3] != s[2]


def probe_spec(net: nn.Module, name: str, image_size: int = 224, *, num_prefix_tokens: int | None = None,
               cls_pool: bool | None = None) -> BackboneSpec:
    """Find the feature layer of ``net`` and describe it (see the module docstring).

    Args:
        net: The headless model.
        name: Backbone name for the spec and the messages.
        image_size: Side of the square probe input.
        num_prefix_tokens: Leading non-region tokens of a ``bnd`` output (None: inferred as
            ``n - isqrt(n)**2``).
        cls_pool: Pool a ``bnd`` output by its first token (None: when it has prefix tokens).

    Returns:
        The :class:`BackboneSpec`.

    Raises:
        ValueError: no module outputs a feature map (then pass ``layer=`` / ``layout=`` to
            :class:`~esvit.trainer.EsViTTrainer` yourself).
    """
    outputs: list[tuple[str, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: outputs.append((n, tuple(out.shape)))
                                     if isinstance(out, torch.Tensor) else None)
             for n, m in net.named_modules() if n]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    maps = [(n, s) for n, s in outputs if len(s) == 3 or (len(s) == 4 and (_is_bchw(s) or _is_bhwc(s)))]
    if not maps:
        raise ValueError(f"backbone {name!r}: no layer outputs a feature map at {image_size}px; build it yourself and "
                         "pass layer=<module name> and layout='bchw'|'bhwc'|'bnd' to EsViTTrainer")
    layer, shape = maps[-1]
    if len(shape) == 3:
        n = shape[1]
        prefix = n - math.isqrt(n) ** 2 if num_prefix_tokens is None else num_prefix_tokens
        pool = "cls" if (prefix > 0 if cls_pool is None else cls_pool) else "avg"
        return BackboneSpec(name, layer, "bnd", prefix, pool, shape[2], name)
    layout = "bchw" if _is_bchw(shape) else "bhwc"
    dim = shape[1] if layout == "bchw" else shape[3]
    return BackboneSpec(name, layer, layout, 0, "avg", dim, name)


def _drop_classifier(net: nn.Module) -> None:
    for attr in _CLASSIFIER_ATTRS:
        if isinstance(getattr(net, attr, None), nn.Module):
            setattr(net, attr, nn.Identity())
            return


# ---------------------------------------------------------------------------- timm


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ImportError("timm/<name> backbones need timm: pip install 'esvit[timm]'") from None
    return timm


def _timm_factory(model: str, name: str) -> Callable[..., tuple[nn.Module, BackboneSpec]]:
    timm = _timm()
    if model not in timm.list_models():
        close = difflib.get_close_matches(model, timm.list_models(), n=3, cutoff=0.5)
        raise ValueError(f"unknown timm model {model!r}" + (f"; closest: {', '.join('timm/' + c for c in close)}"
                                                            if close else ""))

    def build(image_size: int = 224, drop_path_rate: float | None = None, **kwargs: Any
              ) -> tuple[nn.Module, BackboneSpec]:
        kw = dict(kwargs, pretrained=False, num_classes=0)
        if drop_path_rate is not None:
            kw["drop_path_rate"] = drop_path_rate
        try:
            net = timm.create_model(model, dynamic_img_size=True, **kw)
        except TypeError:  # not a ViT-style model: fixed-size flag unknown
            try:
                net = timm.create_model(model, **kw)
            except TypeError as e:
                raise ValueError(f"backbone {name!r}: timm refused {sorted(kwargs) + (['drop_path_rate'] if drop_path_rate else [])}"
                                 f" ({e})") from None
        prefix = getattr(net, "num_prefix_tokens", None)
        cls_pool = getattr(net, "global_pool", None) == "token" if prefix else None
        return net, probe_spec(net, name, image_size, num_prefix_tokens=prefix, cls_pool=cls_pool)

    return build


# ---------------------------------------------------------------------------- torchvision


def _torchvision_factory(model: str, name: str) -> Callable[..., tuple[nn.Module, BackboneSpec]]:
    from torchvision import models

    available = models.list_models(module=models)
    if model not in available:
        close = difflib.get_close_matches(model, available, n=3, cutoff=0.5)
        raise ValueError(f"unknown torchvision classification model {model!r}"
                         + (f"; closest: {', '.join('torchvision/' + c for c in close)}" if close else ""))

    def make(image_size: int, rate: float | None, kwargs: dict[str, Any]) -> tuple[nn.Module, BackboneSpec]:
        if model.startswith(_TV_STOCHASTIC_DEPTH) and rate is not None:
            kwargs = dict(kwargs, stochastic_depth_prob=rate)
        if model.startswith("vit_"):
            kwargs = dict(kwargs, image_size=image_size)
        net = models.get_model(model, weights=None, **kwargs)
        _drop_classifier(net)
        if isinstance(net, models.VisionTransformer):
            from .vit import FlexibleEncoder, FlexibleVisionTransformer, set_drop_path_rate

            net.__class__, net.encoder.__class__ = FlexibleVisionTransformer, FlexibleEncoder
            net.drop_path_rate = float(rate or 0.0)
            set_drop_path_rate(net.encoder, net.drop_path_rate)
            return net, BackboneSpec(name, "encoder", "bnd", 1, "cls", net.hidden_dim, name)
        return net, probe_spec(net, name, image_size)

    if model.startswith((*_TV_STOCHASTIC_DEPTH, "vit_")):
        def build(image_size: int = 224, drop_path_rate: float | None = None, **kwargs: Any
                  ) -> tuple[nn.Module, BackboneSpec]:
            return make(image_size, drop_path_rate, kwargs)
    else:
        def build(image_size: int = 224, **kwargs: Any) -> tuple[nn.Module, BackboneSpec]:  # type: ignore[misc]
            return make(image_size, None, kwargs)
    return build


def hub_factory(name: str) -> Callable[..., tuple[nn.Module, BackboneSpec]]:
    """The factory of a ``timm/<model>`` or ``torchvision/<model>`` backbone name.

    Its signature declares ``drop_path_rate`` exactly when the family has stochastic depth
    (timm: always offered, refused by timm where absent; torchvision: Swin and ViT).

    Raises:
        ValueError: an unknown model (the message lists the closest names) or prefix.
        ImportError: ``timm/`` without timm installed (names the extra).
    """
    prefix, _, model = name.partition("/")
    if not model:
        raise ValueError(f"backbone {name!r}: give a model after the prefix, e.g. timm/resnet18")
    if prefix == "timm":
        return _timm_factory(model, name)
    if prefix == "torchvision":
        return _torchvision_factory(model, name)
    raise ValueError(f"unknown backbone prefix in {name!r}; use one of {', '.join(HUB_PREFIXES)}")
