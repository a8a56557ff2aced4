"""Backbone registry (timm-like): name -> factory returning ``(nn.Module, BackboneSpec)``.

Every factory builds its network with random initialisation (``weights=None``; nothing is ever
downloaded) and replaces the classifier head by ``nn.Identity``. The returned
:class:`BackboneSpec` tells :class:`esvit.wrapper.NetWrapper` which layer to hook and how to read
its output.

**Stochastic depth.** A backbone supports drop-path exactly when its factory declares a keyword
parameter named ``drop_path_rate`` (:data:`DROP_PATH_KWARG`; a bare ``**kwargs`` does not count):
the per-block rate then increases linearly from 0 at the first block to ``drop_path_rate`` at the
last, as in the official Swin and DINO ViT. :func:`supports_drop_path` reads this from the
signature, so user-registered backbones follow the same contract, and :func:`build_backbone`
checks the value lies in ``[0, 1)``. Factories without the parameter have no stochastic depth;
asking them for some is an error (:func:`drop_path_kwargs`).

Each entry may also register a *torchvision equivalent*: a builder for the plain torchvision model
(classifier also replaced by ``nn.Identity``) into which the backbone's ``state_dict`` loads with
``strict=True`` and which gives the same outputs at the native input size. Backbone export uses it
through :func:`torchvision_equivalent`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "BackboneSpec",
    "DROP_PATH_KWARG",
    "build_backbone",
    "check_drop_path_rate",
    "drop_path_kwargs",
    "list_backbones",
    "register_backbone",
    "supports_drop_path",
    "torchvision_equivalent",
]

LAYOUTS = ("bchw", "bhwc", "bnd")
#: The factory keyword a backbone declares to support stochastic depth (see the module docstring).
DROP_PATH_KWARG = "drop_path_rate"
POOLS = ("avg", "cls")

Factory = Callable[..., tuple[nn.Module, "BackboneSpec"]]
EquivalentFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class BackboneSpec:
    """How to read features out of a backbone.

    Attributes:
        name: Registry name.
        layer: Dotted module name (as in ``named_modules()``) whose output is hooked.
        layout: ``"bchw"`` (CNN feature map), ``"bhwc"`` (Swin) or ``"bnd"`` (ViT tokens).
        num_prefix_tokens: ``"bnd"`` only: leading tokens (CLS) excluded from region tokens.
        pool: ``"avg"`` (mean of region tokens) or ``"cls"`` (first token, ``"bnd"`` only).
        embed_dim: Channel dim of the hooked output.
        export_ctor: Dotted torchvision constructor the exported state_dict loads into.
    """

    name: str
    layer: str
    layout: str
    num_prefix_tokens: int
    pool: str
    embed_dim: int
    export_ctor: str | None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"BackboneSpec.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.pool not in POOLS:
            raise ValueError(f"BackboneSpec.pool must be one of {POOLS}, got {self.pool!r}")
        if self.num_prefix_tokens < 0:
            raise ValueError(
                f"BackboneSpec.num_prefix_tokens must be >= 0, got {self.num_prefix_tokens}"
            )
        if self.layout != "bnd" and self.num_prefix_tokens != 0:
            raise ValueError(
                f"BackboneSpec.num_prefix_tokens must be 0 for layout {self.layout!r}, "
                f"got {self.num_prefix_tokens}"
            )
        if self.pool == "cls" and (self.layout != "bnd" or self.num_prefix_tokens < 1):
            raise ValueError(
                "BackboneSpec.pool='cls' requires layout 'bnd' and num_prefix_tokens >= 1, got "
                f"layout={self.layout!r}, num_prefix_tokens={self.num_prefix_tokens}"
            )
        if self.embed_dim <= 0:
            raise ValueError(f"BackboneSpec.embed_dim must be > 0, got {self.embed_dim}")


_REGISTRY: dict[str, Factory] = {}
_EQUIVALENTS: dict[str, EquivalentFactory] = {}


def register_backbone(
    name: str, *, equivalent: EquivalentFactory | None = None
) -> Callable[[Factory], Factory]:
    """Decorator registering a backbone factory under ``name``.

    Args:
        name: Registry name (must be new).
        equivalent: Optional builder ``(**kwargs) -> nn.Module`` of the plain torchvision model
            (classifier replaced by ``nn.Identity``) that the backbone's state_dict loads into.
            It is called with the same kwargs as the factory.

    Returns:
        A decorator that registers and returns the factory unchanged.
    """

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        if equivalent is not None:
            _EQUIVALENTS[name] = equivalent
        return factory

    return decorator


def list_backbones() -> list[str]:
    """Return the sorted registered backbone names."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> Factory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "/" in name:
        from .hub import hub_factory  # timm/<model>, torchvision/<model>

        return hub_factory(name)
    close = difflib.get_close_matches(name, list_backbones(), n=3, cutoff=0.5)
    raise ValueError(
        f"unknown backbone {name!r}" + (f"; closest: {', '.join(close)}" if close else "")
        + f"; built in: {', '.join(list_backbones())}; or any timm/<model> or torchvision/<model>"
    )


def _check_kwargs(name: str, fn: Callable[..., object], kwargs: dict[str, object]) -> None:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"backbone {name!r} got unexpected keyword argument(s) {unknown}; accepted: {accepted}"
        )


def supports_drop_path(name: str) -> bool:
    """Whether backbone ``name`` has stochastic depth: its factory declares ``drop_path_rate``.

    Raises:
        ValueError: unknown ``name``.
    """
    param = inspect.signature(_lookup(name)).parameters.get(DROP_PATH_KWARG)
    return param is not None and param.kind in (
        inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
    )


def check_drop_path_rate(rate: object, what: str = DROP_PATH_KWARG) -> float:
    """Return ``rate`` as a float after checking it lies in ``[0, 1)``.

    Raises:
        ValueError: not a number in ``[0, 1)`` (the message names ``what``).
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {rate!r}")
    return float(rate)


def drop_path_kwargs(
    name: str, kwargs: dict[str, object] | None, drop_path_rate: float | None
) -> dict[str, object]:
    """Factory kwargs for backbone ``name`` with the student's stochastic-depth rate merged in.

    Args:
        name: Registry name.
        kwargs: Other factory options (not modified).
        drop_path_rate: None keeps the factory's default; 0 on a backbone without stochastic
            depth is accepted (and passes nothing); > 0 needs :func:`supports_drop_path`.

    Returns:
        A new dict: ``kwargs`` plus ``drop_path_rate`` where the backbone takes it.

    Raises:
        ValueError: unknown ``name``, a rate outside ``[0, 1)``, a rate > 0 for a backbone
            without stochastic depth, or the rate given both here and in ``kwargs``.
    """
    out = dict(kwargs or {})
    if drop_path_rate is None:
        return out
    rate = check_drop_path_rate(drop_path_rate)
    if DROP_PATH_KWARG in out:
        raise ValueError(
            f"drop_path_rate given twice for backbone {name!r} (also in its backbone kwargs); give it once"
        )
    if supports_drop_path(name):
        out[DROP_PATH_KWARG] = rate
    elif rate > 0:
        raise ValueError(
            f"drop_path_rate={rate:g} asked for, but backbone {name!r} has no stochastic depth (its "
            f"factory takes no '{DROP_PATH_KWARG}'); use 0"
        )
    return out


def build_backbone(name: str, **kwargs: object) -> tuple[nn.Module, BackboneSpec]:
    """Build a registered backbone.

    Args:
        name: Registry name (see :func:`list_backbones`).
        **kwargs: Factory options (e.g. ``image_size``, ``drop_path_rate`` where
            :func:`supports_drop_path`); unknown ones raise ``TypeError``.

    Returns:
        ``(module, spec)``. ``module`` maps ``(b, 3, h, w)`` images to its (headless) output;
        ``spec`` describes the hooked layer.

    Raises:
        ValueError: unknown ``name`` (the message lists the available names), or a
            ``drop_path_rate`` outside ``[0, 1)``.
        TypeError: unknown keyword argument for this backbone.
    """
    factory = _lookup(name)
    _check_kwargs(name, factory, kwargs)
    if DROP_PATH_KWARG in kwargs:
        check_drop_path_rate(kwargs[DROP_PATH_KWARG], f"backbone {name!r}: {DROP_PATH_KWARG}")
    net, spec = factory(**kwargs)
    if spec.name != name:
        raise RuntimeError(f"factory for {name!r} returned a spec named {spec.name!r}")
    return net, spec


def torchvision_equivalent(name: str, **kwargs: object) -> nn.Module:
    """Build the plain torchvision model matching backbone ``name`` built with ``kwargs``.

    ``build_backbone(name, **kwargs)[0].state_dict()`` loads into the returned model with
    ``strict=True`` (classifier replaced by ``nn.Identity``) and, at the native input size, both
    give the same outputs.

    Args:
        name: Registry name.
        **kwargs: Same options as given to :func:`build_backbone`.

    Returns:
        The torchvision model, randomly initialised.

    Raises:
        ValueError: unknown ``name`` or no torchvision equivalent registered for it.
        TypeError: unknown keyword argument.
    """
    _lookup(name)
    if name not in _EQUIVALENTS:
        have = ", ".join(sorted(_EQUIVALENTS))
        raise ValueError(
            f"backbone {name!r} has no registered torchvision equivalent; backbones with one: {have}"
        )
    builder = _EQUIVALENTS[name]
    _check_kwargs(name, builder, kwargs)
    return builder(**kwargs)
