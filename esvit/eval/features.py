"""Feature extraction from a (frozen) backbone for kNN, linear probes and embeddings."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet, SwinTransformer, VisionTransformer

from esvit.backbones.registry import BackboneSpec
from esvit.wrapper import NetWrapper

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(
    images: Tensor,
    size: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """uint8 ``(b, 3, H, W)`` -> normalised float32, resized (antialiased) to ``size`` if given."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images (b, 3, H, W), got {images.dtype}")
    x = images.float().div_(255)
    if size is not None and (x.shape[-2] != size or x.shape[-1] != size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(
    encode: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``encode`` over ``(uint8 images, labels)`` batches.

    Args:
        encode: Maps normalised images ``(b, 3, s, s)`` to features ``(b, d)``.
        batches: Iterable of ``(images uint8 (b,3,H,W), labels (b,))``.
        device: Device to run on.
        size: Resize images to this side first (None keeps the canvas size).

    Returns:
        ``(features (N, d) float32 on CPU, labels (N,))``.
    """
    feats, labels = [], []
    for images, y in batches:
        x = preprocess(images.to(device, non_blocking=device.type == "cuda"), size)
        feats.append(encode(x).float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------- feature encoders

FEATURE_MODES = ("pooled", "last_n")


class _StopForward(Exception):
    """Raised by a hook once every needed output has been captured."""


@dataclass(frozen=True)
class LastNTaps:
    """Where the ``last_n`` features of a backbone family are read.

    Attributes:
        names: Dotted names of the candidate modules (blocks or stages), first to last.
        layout: Layout of their outputs (``"bnd"``, ``"bhwc"`` or ``"bchw"``).
        num_prefix_tokens: ``"bnd"`` only: leading (CLS) tokens.
        norm: Dotted name of a final norm applied to the tapped outputs (None: none).
        norm_last_only: Apply ``norm`` to the last candidate only (its width differs elsewhere).
        default_n: Default number of tapped modules.
    """

    names: tuple[str, ...]
    layout: str
    num_prefix_tokens: int = 0
    norm: str | None = None
    norm_last_only: bool = False
    default_n: int = 1


LastNResolver = Callable[[nn.Module], LastNTaps]
_LAST_N_RESOLVERS: list[tuple[type, LastNResolver]] = []


def register_last_n(cls: type) -> Callable[[LastNResolver], LastNResolver]:
    """Register how ``last_n`` features are read from networks of class ``cls`` (or subclasses)."""

    def decorator(fn: LastNResolver) -> LastNResolver:
        _LAST_N_RESOLVERS.insert(0, (cls, fn))
        return fn

    return decorator


@register_last_n(VisionTransformer)
def _vit_taps(net: nn.Module) -> LastNTaps:
    # DINO's get_intermediate_layers: the final LayerNorm is applied to every block output.
    names = tuple(f"encoder.layers.{child}" for child, _ in net.encoder.layers.named_children())
    return LastNTaps(names, "bnd", 1, "encoder.ln", False, default_n=min(4, len(names)))


@register_last_n(SwinTransformer)
def _swin_taps(net: nn.Module) -> LastNTaps:
    stages = tuple(
        f"features.{i}" for i, m in enumerate(net.features)
        if isinstance(m, nn.Sequential) and any("SwinTransformerBlock" in type(c).__name__ for c in m)
    )
    return LastNTaps(stages, "bhwc", 0, "norm", True, default_n=min(2, len(stages)))


@register_last_n(ResNet)
def _resnet_taps(net: nn.Module) -> LastNTaps:
    return LastNTaps(("layer1", "layer2", "layer3", "layer4"), "bchw", 0, None, False, default_n=2)


def last_n_taps(net: nn.Module) -> LastNTaps:
    """Return the :class:`LastNTaps` of ``net`` (see :func:`register_last_n`).

    Raises:
        ValueError: No resolver for this network class.
    """
    for cls, fn in _LAST_N_RESOLVERS:
        if isinstance(net, cls):
            return fn(net)
    supported = ", ".join(sorted({c.__name__ for c, _ in _LAST_N_RESOLVERS}))
    raise ValueError(
        f"feature='last_n' is not supported for {type(net).__name__} (supported: {supported}; "
        "register one with esvit.eval.features.register_last_n); use feature='pooled'"
    )


def _tokens(out: Tensor, layout: str, num_prefix_tokens: int) -> Tensor:
    """``(b, n, d)`` spatial tokens of a layer output (prefix tokens dropped)."""
    if layout == "bchw":
        return out.flatten(2).transpose(1, 2)
    if layout == "bhwc":
        return out.flatten(1, 2)
    return out[:, num_prefix_tokens:]


class FeatureEncoder(nn.Module):
    """Frozen-backbone feature extractor: ``pooled`` or ``last_n`` features.

    * ``pooled``: the :class:`~esvit.wrapper.NetWrapper` pooled output of the spec's layer
      (CLS token for ViTs, average pool otherwise).
    * ``last_n``: as in the official DINO / EsViT linear evaluation. ViT: the CLS tokens of the
      last ``n_last`` blocks (after the final LayerNorm) concatenated, plus with ``avgpool`` the
      mean patch token of the last block. Swin / CNN: the average-pooled outputs of the last
      ``n_last`` stages concatenated (Swin's last stage after its final norm).

    Args:
        net: The backbone.
        spec: Its :class:`~esvit.backbones.BackboneSpec` (used for ``pooled`` and for regions).
        feature: ``"pooled"`` or ``"last_n"``.
        n_last: Blocks / stages to concatenate (``last_n``; default 4 for ViT, 2 otherwise).
        avgpool: ``last_n`` on ViTs: append the average of the last block's patch tokens.
    """

    def __init__(
        self,
        net: nn.Module,
        spec: BackboneSpec,
        feature: str = "pooled",
        n_last: int | None = None,
        avgpool: bool = False,
    ) -> None:
        super().__init__()
        if feature not in FEATURE_MODES:
            raise ValueError(f"feature must be one of {FEATURE_MODES}, got {feature!r}")
        self.wrapper = NetWrapper.from_spec(net, spec)
        self.spec = spec
        self.feature = feature
        self.avgpool = avgpool
        self.taps: LastNTaps | None = None
        self.names: tuple[str, ...] = ()
        if feature == "pooled":
            if n_last is not None:
                raise ValueError("n_last applies to feature='last_n' only")
            if avgpool:
                raise ValueError("avgpool applies to feature='last_n' only "
                                 "(DINO's ViT-B setting is feature='last_n', n_last=1, avgpool=True)")
            self.n_last = 0
        else:
            taps = last_n_taps(net)
            n = taps.default_n if n_last is None else n_last
            if not 1 <= n <= len(taps.names):
                raise ValueError(f"n_last must be in [1, {len(taps.names)}] for "
                                 f"{type(net).__name__}, got {n}")
            if avgpool and taps.layout != "bnd":
                raise ValueError("avgpool applies to ViT (token) backbones only; CNN and Swin "
                                 "stage features are already average-pooled")
            self.taps, self.n_last, self.names = taps, n, taps.names[-n:]

    @property
    def net(self) -> nn.Module:
        """The wrapped backbone."""
        return self.wrapper.net

    def extra_repr(self) -> str:
        return f"feature={self.feature!r}, n_last={self.n_last}, avgpool={self.avgpool}"

    def _capture(self, x: Tensor, names: list[str]) -> dict[str, Tensor]:
        captured: dict[str, Tensor] = {}
        wanted = set(names)

        def make_hook(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _i: object, output: object) -> None:
                captured[name] = output[0] if isinstance(output, tuple) else output
                if wanted.issubset(captured):
                    raise _StopForward

            return hook

        handles = [self.net.get_submodule(n).register_forward_hook(make_hook(n)) for n in wanted]
        try:
            self.net(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = wanted.difference(captured)
        if missing:
            raise RuntimeError(f"modules {sorted(missing)} were not called during the forward pass")
        return captured

    def _last_n(self, outs: dict[str, Tensor]) -> Tensor:
        taps = self.taps
        assert taps is not None
        norm = self.net.get_submodule(taps.norm) if taps.norm else None
        parts: list[Tensor] = []
        last = None
        for i, name in enumerate(self.names):
            out = outs[name]
            if norm is not None and (not taps.norm_last_only or i == len(self.names) - 1):
                out = norm(out)
            last = out
            if taps.layout == "bnd":
                parts.append(out[:, 0])
            else:
                parts.append(_tokens(out, taps.layout, 0).mean(dim=1))
        if self.avgpool:
            parts.append(_tokens(last, "bnd", taps.num_prefix_tokens).mean(dim=1))
        return torch.cat(parts, dim=1)

    def forward_with_regions(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Features and the spec layer's region tokens in one pass.

        Args:
            x: ``(b, 3, h, w)`` normalised images.

        Returns:
            ``features (b, D)`` and ``regions (b, n, d)``.
        """
        if self.feature == "pooled":
            return self.wrapper(x)
        outs = self._capture(x, [*self.names, self.spec.layer])
        regions = _tokens(outs[self.spec.layer], self.spec.layout, self.spec.num_prefix_tokens)
        return self._last_n(outs), regions

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(b, 3, h, w)`` normalised images. Returns: features ``(b, D)``."""
        if self.feature == "pooled":
            return self.wrapper(x)[0]
        return self._last_n(self._capture(x, list(self.names)))
