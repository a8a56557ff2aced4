"""Feature extraction from a (frozen) backbone for kNN, linear probes and embeddings."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet, SwinTransformer, VisionTransformer

from esvit.backbones.registry import BackboneSpec
from esvit.eval.loader import LoaderStalledError, make_loader  # noqa: F401 - re-exported
from esvit.wrapper import NetWrapper

log = logging.getLogger("esvit.eval")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(
    x: Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """Float images ``(b, 3, h, w)`` in ``[0, 1]`` -> normalised with ``mean`` / ``std``."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


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
    return normalize(x, mean, std)


# --------------------------------------------------------------------------- preprocessing protocols

PREPROCESS_MODES = ("auto", "dino", "resize")
DINO_CROP_FRACTION = 0.875  # DINO / EsViT evaluation: Resize(256) + CenterCrop(224)
AUTO_PROBE_IMAGES = 64  # images whose headers ``auto`` reads


def dino_resize_size(image_size: int) -> int:
    """Short side of the DINO evaluation resize: ``round(image_size / 0.875)`` (224 -> 256)."""
    return int(round(image_size / DINO_CROP_FRACTION))


def center_crop(images: Tensor, size: int) -> Tensor:
    """Centre ``size x size`` crop of ``(..., H, W)`` images (offsets rounded as torchvision's).

    Args:
        images: ``(..., H, W)`` with ``H, W >= size``.
        size: Output side.

    Returns:
        ``(..., size, size)`` view of ``images``.
    """
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size} px from {h}x{w} images")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def image_short_sides(paths: Sequence[str], max_images: int = AUTO_PROBE_IMAGES) -> list[int]:
    """Short sides of up to ``max_images`` evenly spaced images of ``paths`` (headers only).

    Unreadable files are skipped. The short side does not depend on the EXIF orientation.

    Args:
        paths: Image paths.
        max_images: Images to look at (deterministic: evenly spaced over ``paths``).

    Returns:
        The short sides in pixels, one per readable probed image.
    """
    from PIL import Image

    n = len(paths)
    if n == 0 or max_images < 1:
        return []
    from esvit.data.folder import check_regular_file

    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(n, max_images))})
    sides: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for i in picks:
            try:
                check_regular_file(paths[i])  # a FIFO or device could block: never opened
                with Image.open(paths[i]) as img:
                    sides.append(min(img.size))
            except Exception as e:  # noqa: BLE001 - an unreadable file just does not vote
                log.debug("auto preprocess: cannot read the size of %s (%s)", paths[i], e)
    return sides


@dataclass(frozen=True)
class EvalPreprocess:
    """How evaluation images are decoded and brought to the evaluation size.

    * ``dino``: the DINO / official EsViT protocol, ``Resize(image_size / 0.875, bicubic)`` of
      the short side then ``CenterCrop(image_size)``: images are decoded with
      :func:`~esvit.data.decode.load_image` at ``decode_size = round(image_size / 0.875)``
      (short side scaled to it, bicubic, centre square) and centre-cropped to ``image_size``.
    * ``resize``: the short side is scaled to ``decode_size`` (default ``image_size``), the centre
      square kept and, when ``decode_size != image_size``, resized (bilinear, antialiased) to
      ``image_size`` on the evaluation device. No crop: the whole centre square is seen.

    Attributes:
        protocol: ``"dino"`` or ``"resize"``.
        image_size: Side ``s`` fed to the backbone.
        decode_size: Decode canvas side ``S`` (:func:`~esvit.data.decode.load_image`).
        requested: The mode asked for (``"auto"``, ``"dino"`` or ``"resize"``).
        median_short_side: ``auto``: median short side of the probed images (None otherwise).
    """

    protocol: str
    image_size: int
    decode_size: int
    requested: str = ""
    median_short_side: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in ("dino", "resize"):
            raise ValueError(f"protocol must be 'dino' or 'resize', got {self.protocol!r}")
        if self.image_size < 1 or self.decode_size < 1:
            raise ValueError(f"image_size and decode_size must be >= 1, got {self.image_size}, "
                             f"{self.decode_size}")
        if self.protocol == "dino" and self.decode_size < self.image_size:
            raise ValueError(f"dino: decode_size {self.decode_size} < image_size {self.image_size}")

    @property
    def crop_size(self) -> int | None:
        """Centre crop applied after decoding (``dino``), None for ``resize``."""
        return self.image_size if self.protocol == "dino" else None

    @property
    def item_size(self) -> int:
        """Side of the decoded (and cropped) ``uint8`` images a dataset returns."""
        return self.crop_size or self.decode_size

    def decode(self, path: str | os.PathLike[str]) -> Tensor:
        """Decode one file: ``uint8 (3, item_size, item_size)``.

        Raises:
            esvit.data.decode.BadImageError: The file cannot be decoded.
        """
        from esvit.data.decode import load_image
        from esvit.data.folder import check_regular_file

        check_regular_file(path)  # a FIFO or device could block: never opened
        image = load_image(path, self.decode_size)
        return image if self.crop_size is None else center_crop(image, self.crop_size).contiguous()

    def record(self) -> dict[str, Any]:
        """JSON-able description, written into results, manifests and feature-cache keys."""
        rec: dict[str, Any] = {"protocol": self.protocol, "requested": self.requested or self.protocol,
                               "image_size": self.image_size, "decode_size": self.decode_size,
                               "crop_size": self.crop_size}
        if self.median_short_side is not None:
            rec["median_short_side"] = self.median_short_side
        return rec

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalPreprocess:
        """Inverse of :meth:`record`."""
        return cls(record["protocol"], int(record["image_size"]), int(record["decode_size"]),
                   record.get("requested", ""), record.get("median_short_side"))

    def describe(self) -> str:
        """One line for logs, e.g. ``dino (short side 256 bicubic, centre crop 224), auto``."""
        if self.protocol == "dino":
            text = f"dino (short side {self.decode_size} bicubic, centre crop {self.image_size})"
        else:
            resize = "" if self.decode_size == self.image_size else f", resized to {self.image_size}"
            text = f"resize (short side {self.decode_size}, centre square{resize})"
        if self.requested == "auto":
            text += ", auto" + ("" if self.median_short_side is None
                                else f": median short side {self.median_short_side} px")
        return text


def resolve_preprocess(
    preprocess: str,
    image_size: int,
    paths: Sequence[str] = (),
    canvas_size: int | None = None,
    *,
    allow_canvas: bool = False,
) -> EvalPreprocess:
    """Choose the evaluation preprocessing.

    ``auto`` picks ``dino`` when the images are larger than the evaluation size (the median short
    side of up to :data:`AUTO_PROBE_IMAGES` evenly spaced images of ``paths`` exceeds
    ``image_size``) and ``resize`` (decode at the image's own scale, e.g. 32 px CIFAR images at
    32) otherwise, or when ``canvas_size`` is given (an explicit decode size is the ``resize``
    protocol's).

    Args:
        preprocess: ``"auto"``, ``"dino"`` or ``"resize"``.
        image_size: Evaluation resolution.
        paths: The images (``auto`` only).
        canvas_size: ``resize``: decode size (default ``image_size``).
        allow_canvas: Accept ``canvas_size`` with ``dino`` (it is then not used here; the linear
            probe's ``mode='augment'`` decodes its training crops at it).

    Returns:
        :class:`EvalPreprocess`.

    Raises:
        ValueError: Unknown mode, or ``canvas_size`` with ``dino`` (unless ``allow_canvas``).
    """
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    if canvas_size is not None and canvas_size < 1:
        raise ValueError(f"canvas_size must be >= 1, got {canvas_size}")
    median = None
    protocol = preprocess
    if preprocess == "auto":
        protocol = "resize"
        if canvas_size is None:
            sides = image_short_sides(paths)
            if sides:
                median = int(np.median(sides))
                protocol = "dino" if median > image_size else "resize"
    if protocol == "dino":
        if canvas_size is not None and not allow_canvas:
            raise ValueError(f"canvas_size is the decode size of preprocess='resize'; "
                             f"preprocess='dino' decodes at round(image_size / 0.875) = "
                             f"{dino_resize_size(image_size)}")
        pre = EvalPreprocess("dino", image_size, dino_resize_size(image_size), preprocess, median)
    else:
        pre = EvalPreprocess("resize", image_size, canvas_size or image_size, preprocess, median)
    log.info("evaluation preprocessing: %s", pre.describe())
    return pre


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


# --------------------------------------------------------------------------- evaluation pipeline


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class EvalModel:
    """A frozen feature encoder ready for evaluation.

    Attributes:
        encoder: :class:`FeatureEncoder` in eval mode on the evaluation device.
        image_size: Evaluation resolution (images are resized to it).
        source: Checkpoint path, or ``"<module>"`` for an in-memory model.
        cache_token: JSON-able identity of weights + feature options (None: not cacheable).
    """

    encoder: FeatureEncoder
    image_size: int
    source: str
    cache_token: dict[str, Any] | None


def resolve_eval_model(
    backbone: Any,
    *,
    checkpoint_key: str = "teacher",
    backbone_name: str | None = None,
    image_size: int | None = None,
    feature: str = "pooled",
    n_last: int | None = None,
    avgpool: bool = False,
    device: torch.device | None = None,
) -> EvalModel:
    """Build a frozen :class:`FeatureEncoder` from a checkpoint path or an in-memory model.

    Args:
        backbone: Checkpoint path (see :func:`esvit.export.load_backbone`), ``(net, spec)``,
            or a :class:`FeatureEncoder` (``feature`` / ``n_last`` / ``avgpool`` then ignored).
        checkpoint_key: ``"teacher"`` or ``"student"`` (training checkpoints).
        backbone_name: Registry name for bare state dicts.
        image_size: Evaluation resolution; default: recorded training global crop size, else
            the backbone's ``image_size`` option, else 224.
        feature: ``"pooled"`` or ``"last_n"``.
        n_last: ``last_n``: number of blocks / stages.
        avgpool: ``last_n`` ViT: append the mean patch token.
        device: Evaluation device (default: CUDA when available).

    Returns:
        :class:`EvalModel`.
    """
    device = resolve_device(device)
    token: dict[str, Any] | None = None
    recorded: int | None = None
    if isinstance(backbone, (str, os.PathLike)):
        from esvit.export import load_backbone_info

        path = Path(backbone)
        info = load_backbone_info(path, backbone_name, checkpoint_key)
        encoder = FeatureEncoder(info.net, info.spec, feature, n_last, avgpool)
        recorded = info.image_size
        st = path.stat()
        source = str(path.resolve())
        token = {"checkpoint": source, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 "key": info.checkpoint_key, "backbone": info.name,
                 "backbone_kwargs": info.backbone_kwargs}
    elif isinstance(backbone, FeatureEncoder):
        encoder, source = backbone, "<module>"
    elif isinstance(backbone, tuple) and len(backbone) == 2 and isinstance(backbone[0], nn.Module):
        encoder = FeatureEncoder(backbone[0], backbone[1], feature, n_last, avgpool)
        source = "<module>"
    else:
        raise TypeError("backbone must be a checkpoint path, a (net, spec) tuple or a "
                        f"FeatureEncoder, got {type(backbone).__name__}")
    size = int(image_size or recorded or 224)
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {size}")
    encoder.eval().requires_grad_(False).to(device)
    if token is not None:
        token.update(feature=encoder.feature, n_last=encoder.n_last, avgpool=encoder.avgpool,
                     image_size=size)
    return EvalModel(encoder, size, source, token)


def options_hash(options: Mapping[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable mapping (cache file names)."""
    blob = json.dumps(options, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


FEATURE_VIEWS = ("plain", "hflip")  # the images themselves; horizontally flipped


@torch.no_grad()
def encode_views(
    model: EvalModel,
    dataset: torch.utils.data.Dataset,
    device: torch.device,
    views: Sequence[str] = ("plain",),
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> tuple[dict[str, Tensor], Tensor]:
    """Features of every readable item ``(image uint8 (3, S, S), label, ...)`` of ``dataset``,
    in each of ``views`` (:data:`FEATURE_VIEWS`), decoding every image once.

    Returns:
        ``({view: features (N, D) float32 CPU}, labels (N,))``; unreadable items (``ok`` False)
        are dropped and logged.
    """
    from tqdm import tqdm

    unknown = sorted(set(views) - set(FEATURE_VIEWS))
    if unknown or not views:
        raise ValueError(f"views must be among {FEATURE_VIEWS}, got {list(views)}")
    loader = make_loader(dataset, batch_size, num_workers, what=desc)
    feats: dict[str, list[Tensor]] = {v: [] for v in views}
    labels: list[Tensor] = []
    bad: list[int] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, y = batch[0], torch.as_tensor(batch[1]).long()
        if len(batch) > 3 and isinstance(batch[2], Tensor) and batch[2].dtype == torch.bool:
            ok = batch[2]
            if not ok.all():
                bad.extend(torch.as_tensor(batch[3])[~ok].tolist())
                images, y = images[ok], y[ok]
            if not len(y):
                continue
        x = preprocess(images.to(device, non_blocking=device.type == "cuda"), model.image_size)
        for view, out in feats.items():
            out.append(model.encoder(x.flip(-1) if view == "hflip" else x).float().cpu())
        labels.append(y)
    if bad:
        names = getattr(dataset, "paths", None)
        first = [str(names[i]) if names is not None else f"index {i}" for i in bad[:5]]
        log.warning("%s: skipped %d unreadable image(s): %s%s", desc, len(bad), ", ".join(first),
                    " ..." if len(bad) > 5 else "")
    if not labels:
        raise ValueError("no readable images to extract features from")
    return {v: torch.cat(f) for v, f in feats.items()}, torch.cat(labels)


def encode_dataset(
    model: EvalModel,
    dataset: torch.utils.data.Dataset,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    flip: bool = False,
    progress: bool = False,
    desc: str = "features",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Features of every item ``(image uint8 (3, S, S), label, ...)`` of ``dataset``.

    Returns:
        ``features (N, D)`` float32 CPU, ``labels (N,)``, and with ``flip`` the features of the
        horizontally flipped images ``(N, D)`` (else None).
    """
    views = FEATURE_VIEWS if flip else ("plain",)
    out, labels = encode_views(model, dataset, device, views, batch_size, num_workers, progress,
                               desc)
    return out["plain"], labels, out.get("hflip")


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + rename)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- labeled data


class LabeledImages(torch.utils.data.Dataset):
    """Images decoded to a ``uint8`` canvas with integer labels, for evaluation.

    Item ``i`` is ``(image uint8 (3, s, s), label, ok, i)`` with ``s = crop_size or canvas_size``.
    An unreadable file gives a black image and ``ok=False`` (no substitute: evaluation drops such
    rows, see :func:`encode_dataset`).

    Args:
        paths: Image paths.
        labels: Class index per path.
        canvas_size: Decode size ``S`` (:func:`~esvit.data.decode.load_image`: short side scaled
            to ``S``, centre square).
        crop_size: Centre crop of the decoded canvas (the ``dino`` protocol); None: none.
    """

    def __init__(self, paths: list[str], labels: list[int], canvas_size: int,
                 crop_size: int | None = None) -> None:
        from esvit.data.folder import PathTable

        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = PathTable(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.canvas_size = int(canvas_size)
        self.crop_size = None
        self._set_crop(crop_size)

    def _set_crop(self, crop_size: int | None) -> None:
        if crop_size is not None and not 1 <= crop_size <= self.canvas_size:
            raise ValueError(f"crop_size must be in [1, canvas_size={self.canvas_size}], "
                             f"got {crop_size}")
        self.crop_size = None if crop_size is None else int(crop_size)

    @property
    def protocol(self) -> str:
        """``"dino"`` (decoded then centre-cropped) or ``"resize"`` (the whole canvas)."""
        return "resize" if self.crop_size is None else "dino"

    def with_preprocess(self, pre: EvalPreprocess) -> LabeledImages:
        """The same images and labels decoded as ``pre`` says (paths are shared, not copied)."""
        import copy

        out = copy.copy(self)
        out.canvas_size = pre.decode_size
        out._set_crop(pre.crop_size)
        return out

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int, bool, int]:
        from esvit.data.decode import BadImageError, load_image
        from esvit.data.folder import check_regular_file

        side = self.crop_size or self.canvas_size
        try:
            check_regular_file(self.paths[i])  # a FIFO or device could block: never opened
            image, ok = load_image(self.paths[i], self.canvas_size), True
            if self.crop_size is not None:
                image = center_crop(image, self.crop_size).contiguous()
        except BadImageError as e:
            log.debug("%s", e)
            image, ok = torch.zeros(3, side, side, dtype=torch.uint8), False
        return image, int(self.labels[i]), ok, i


def dataset_identity(dataset: torch.utils.data.Dataset) -> dict[str, Any] | None:
    """JSON-able identity of a :class:`LabeledImages`: paths, labels and how they are decoded
    (protocol, canvas, crop); None for other datasets."""
    if not isinstance(dataset, LabeledImages):
        return None
    h = hashlib.sha1()
    for p in dataset.paths:
        h.update(os.fsencode(p) + b"\0")
    h.update(dataset.labels.tobytes())
    return {"n": len(dataset), "paths_labels": h.hexdigest(), "canvas_size": dataset.canvas_size,
            "preprocess": dataset.protocol, "crop_size": dataset.crop_size}


def probe_paths(*datasets: Any, max_images: int = AUTO_PROBE_IMAGES) -> list[str]:
    """Up to ``max_images`` paths spread evenly over the ``paths`` of every dataset (``auto``)."""
    per = max(1, max_images // max(1, len(datasets)))
    out: list[str] = []
    for ds in datasets:
        n = len(ds.paths)
        if n:
            picks = sorted({int(j) for j in np.linspace(0, n - 1, min(n, per))})
            out.extend(ds.paths[i] for i in picks)
    return out


def labeled_splits(
    train: str | Path,
    val: str | Path | None,
    val_split: int | None,
    canvas_size: int,
) -> tuple[LabeledImages, LabeledImages, list[str]]:
    """Train / validation datasets from labeled image folders (or labeled list files).

    Args:
        train: Folder with one subfolder per class (or a ``path,label`` list file).
        val: Validation folder / list with class names among ``train``'s; or None with
            ``val_split``.
        val_split: Hold out the last ``val_split`` images (sorted order) of every class of
            ``train`` (deterministic).
        canvas_size: Decode size.

    Returns:
        ``(train_ds, val_ds, classes)``; labels index ``classes`` (the train classes).

    Raises:
        ValueError: Unlabeled folder, no images, both or neither of ``val``/``val_split``,
            unknown validation classes, or a class too small for ``val_split``.
    """
    from esvit.data.folder import scan_image_folder

    if (val is None) == (val_split is None):
        raise ValueError("give exactly one of val (a validation folder) and val_split "
                         "(images held out per class of the training folder)")
    paths, labels, classes = scan_image_folder(train)
    if labels is None:
        raise ValueError(f"{train} is not labeled: put the images in one subfolder per class "
                         "(e.g. train/cat/*.jpg, train/dog/*.jpg)")
    if val_split is not None:
        if val_split < 1:
            raise ValueError(f"val_split must be >= 1 images per class, got {val_split}")
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(y, []).append(i)
        small = [f"{classes[c]} ({len(ix)})" for c, ix in sorted(by_class.items())
                 if len(ix) <= val_split]
        if small:
            raise ValueError(f"val_split={val_split} needs more than {val_split} images in every "
                             f"class; too small: {', '.join(small[:5])}")
        held = {i for ix in by_class.values() for i in ix[-val_split:]}
        tr = [i for i in range(len(paths)) if i not in held]
        va = sorted(held)
        return (LabeledImages([paths[i] for i in tr], [labels[i] for i in tr], canvas_size),
                LabeledImages([paths[i] for i in va], [labels[i] for i in va], canvas_size),
                list(classes))
    v_paths, v_labels, v_classes = scan_image_folder(val)
    if v_labels is None:
        raise ValueError(f"{val} is not labeled: put the images in one subfolder per class")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(v_classes[y] for y in v_labels) - set(index))
    if unknown:
        raise ValueError(f"validation classes not in the training folder: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    mapped = [index[v_classes[y]] for y in v_labels]
    return (LabeledImages(paths, labels, canvas_size), LabeledImages(v_paths, mapped, canvas_size),
            list(classes))
