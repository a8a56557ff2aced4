"""Batched DINO/EsViT multi-crop augmentation.

``MultiCropAugmentation`` turns a ``uint8`` batch ``(b, 3, H, W)`` (any device), or a batch of
letterboxed :class:`~esvit.data.decode.Canvas` images, into 2 global views and ``n_local`` local
views, each with its own random parameters per sample, with the DINO recipe:

==================  =========================  =========================  =====================
op                  global 1                   global 2                   local
==================  =========================  =========================  =====================
RandomResizedCrop   ``global_scale``           ``global_scale``           ``local_scale``
horizontal flip     0.5                        0.5                        0.5
ColorJitter         p 0.8 (0.4, 0.4, 0.2, 0.1) same                       same
grayscale           0.2                        0.2                        0.2
Gaussian blur       1.0, sigma U(0.1, 2)       0.1                        0.5
solarize (>= 0.5)   --                         0.2                        --
normalise           ImageNet mean / std        same                       same
==================  =========================  =========================  =====================

Crop boxes follow ``RandomResizedCrop.get_params`` on each sample's *original* image size
(``Canvas.source_size``; the canvas size for a plain tensor): the area fraction is relative to
the original's area, the aspect ratio log-uniform, 10 attempts then the centred fallback, so
every pixel of the photo can appear in a crop. The boxes are then mapped into the image's region
of the canvas (``Canvas.box``) and resampled from there: a photo that fits the canvas is cropped
on its own pixel grid, as torchvision would crop the original.

Users' own ``kornia.augmentation`` ops (``extra_global`` / ``extra_local``,
:mod:`esvit.augment.extra`) run after the colour ops and before normalisation, seeded from the
same generator.

All views of one output size are processed as one batch: one ``roi_align`` call crops and
resizes them (from the part of the canvases any box reaches, converted to float once), one
indexed copy flips the selected crops, and every other op is a batched tensor op with per-sample
parameters (ops with ``p < 1`` run on the selected subset via indexing /
``index_copy_``). The number of tensor operations per call does not depend on the batch
size. Random parameters are drawn from an internal CPU ``torch.Generator``
(``get_rng_state`` / ``set_rng_state`` for exact resume) and moved to the images' device in
one transfer per view size. The number of random draws per call depends on the (global) batch
size only, never on the images' sizes, so a sharded global batch (``shard``) draws once for all
ranks and every sample gets the same views whatever the number of ranks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from esvit.augment.blur import _blur_, gaussian_kernel1d
from esvit.augment.blur import blur_kernel_size as blur_kernel_size_fn
from esvit.augment.color import _gray, _jitter_, jitter_plan
from esvit.augment.crop import (
    _resize_rois,
    boxes_to_canvas,
    boxes_to_rois,
    crop_boxes_from_draws,
    draw_crop_boxes,
)
from esvit.augment.extra import ExtraOps
from esvit.data.decode import Canvas

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIN_IMAGE_SIZE",
    "MultiCropAugmentation",
    "ViewParams",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Smallest accepted input height / width.
MIN_IMAGE_SIZE = 8

VIEW_KINDS = ("global1", "global2", "local")


@dataclass
class ViewParams:
    """Random parameters of one view for a batch of ``b`` samples (CPU tensors).

    Attributes:
        kind: ``"global1"``, ``"global2"`` or ``"local"``.
        size: output side length.
        boxes: ``(b, 4)`` float32 crop boxes ``(top, left, h, w)`` in input (canvas) pixels,
            what is resampled; fractional when an image was shrunk into its canvas, the
            integers of ``source_boxes`` shifted by the image's corner otherwise.
        source_boxes: ``(b, 4)`` long ``(top, left, h, w)`` on the original image's pixel grid:
            ``RandomResizedCrop.get_params`` on the original's size.
        flip: ``(b,)`` bool, horizontal flip.
        jitter: ``(b,)`` bool, colour jitter applied.
        brightness, contrast, saturation: ``(b,)`` float jitter factors.
        hue: ``(b,)`` float hue shift.
        order: ``(b, 4)`` long permutation of the jitter ops
            (0 brightness, 1 contrast, 2 saturation, 3 hue).
        grayscale: ``(b,)`` bool.
        blur: ``(b,)`` bool.
        sigma: ``(b,)`` float blur sigma (used where ``blur``).
        solarize: ``(b,)`` bool.
        extra_seed: Seed of the view's extra kornia ops (:class:`~esvit.augment.extra.ExtraOps`).
        row_offset, global_batch: Where these rows sit in the global batch the parameters
            were drawn for (``global_batch`` 0: these rows are the whole batch).
    """

    kind: str
    size: int
    boxes: Tensor
    source_boxes: Tensor
    flip: Tensor
    jitter: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor
    extra_seed: int = 0
    row_offset: int = 0
    global_batch: int = 0

    def rows(self, start: int, end: int) -> ViewParams:
        """Parameters of samples ``start:end`` (e.g. this rank's share of a global batch)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[start:end]
            for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)
        })


def _range(value: float | Sequence[float], name: str, center: float, bound: tuple[float, float]
           ) -> tuple[float, float]:
    """torchvision ColorJitter ``_check_input``: ``v -> [center - v, center + v]`` clipped."""
    if isinstance(value, numbers.Number):
        v = float(value)
        if v < 0:
            raise ValueError(f"{name} must be non-negative, got {v}")
        lo, hi = center - v, center + v
        lo = max(lo, bound[0])
    else:
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or a (min, max) pair, got {value}")
        lo, hi = float(value[0]), float(value[1])
    if not (bound[0] <= lo <= hi <= bound[1]):
        raise ValueError(f"{name} range must satisfy {bound[0]} <= min <= max <= {bound[1]}, "
                         f"got ({lo}, {hi})")
    return lo, hi


def _prob(p: float, name: str) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return p


def _pair(v: Sequence[float], name: str, lo_bound: float, hi_bound: float) -> tuple[float, float]:
    if len(v) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {v}")
    lo, hi = float(v[0]), float(v[1])
    if not (lo_bound < lo <= hi <= hi_bound):
        raise ValueError(f"{name} must satisfy {lo_bound} < min <= max <= {hi_bound}, got {v}")
    return lo, hi


class MultiCropAugmentation(nn.Module):
    """Batched multi-crop augmentation (2 global + ``n_local`` local views).

    Args:
        global_size: side of the global views (e.g. 224, or 32 for CIFAR).
        local_size: side of the local views (e.g. 96, or 16).
        n_local: number of local views (0 allowed).
        global_scale: area fraction range of the global crops.
        local_scale: area fraction range of the local crops.
        ratio: aspect ratio range of all crops.
        flip_p: horizontal flip probability.
        jitter_p: probability of applying ColorJitter.
        brightness, contrast, saturation: jitter strength ``v`` (factor in
            ``[max(0, 1 - v), 1 + v]``) or an explicit ``(min, max)`` range.
        hue: hue strength ``v`` (shift in ``[-v, v]``, ``v <= 0.5``) or a range.
        grayscale_p: probability of converting to (3-channel) grayscale.
        blur_p: blur probabilities for (global 1, global 2, locals).
        blur_sigma: range of the uniform blur sigma.
        blur_kernel_size: odd number of taps; default ``2 * ceil(3 * sigma_max) + 1`` (13).
            Clamped to the largest odd size <= the view size.
        solarize_p: solarization probability of the second global view (others: never).
        solarize_threshold: solarization threshold in ``[0, 1]`` units (0.5 ~ 128 / 255).
        mean, std: normalisation constants (RGB, ``[0, 1]`` units).
        seed: seed of the internal CPU generator; ``None`` draws a random seed.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        brightness: float | tuple[float, float] = 0.4,
        contrast: float | tuple[float, float] = 0.4,
        saturation: float | tuple[float, float] = 0.2,
        hue: float | tuple[float, float] = 0.1,
        grayscale_p: float = 0.2,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int | None = None,
        solarize_p: float = 0.2,
        solarize_threshold: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int | None = None,
        extra_global: Sequence[Mapping[str, Any]] = (),
        extra_local: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__()
        self.extras = ExtraOps(extra_global, extra_local)
        for name, v in (("global_size", global_size), ("local_size", local_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(n_local, int) or n_local < 0:
            raise ValueError(f"n_local must be an int >= 0, got {n_local!r}")
        self.global_size = global_size
        self.local_size = local_size
        self.n_local = n_local
        self.global_scale = _pair(global_scale, "global_scale", 0.0, 1.0)
        self.local_scale = _pair(local_scale, "local_scale", 0.0, 1.0)
        self.ratio = _pair(ratio, "ratio", 0.0, float("inf"))
        self.flip_p = _prob(flip_p, "flip_p")
        self.jitter_p = _prob(jitter_p, "jitter_p")
        self.brightness = _range(brightness, "brightness", 1.0, (0.0, float("inf")))
        self.contrast = _range(contrast, "contrast", 1.0, (0.0, float("inf")))
        self.saturation = _range(saturation, "saturation", 1.0, (0.0, float("inf")))
        self.hue = _range(hue, "hue", 0.0, (-0.5, 0.5))
        self.grayscale_p = _prob(grayscale_p, "grayscale_p")
        if len(blur_p) != 3:
            raise ValueError(f"blur_p must be 3 probabilities (global1, global2, local), got {blur_p}")
        self.blur_p = tuple(_prob(p, "blur_p") for p in blur_p)
        self.blur_sigma = _pair(blur_sigma, "blur_sigma", 0.0, float("inf"))
        if blur_kernel_size is None:
            blur_kernel_size = blur_kernel_size_fn(self.blur_sigma[1])
        if blur_kernel_size < 1 or blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be a positive odd int, got {blur_kernel_size}")
        self.blur_kernel_size = int(blur_kernel_size)
        self.solarize_p = _prob(solarize_p, "solarize_p")
        self.solarize_threshold = float(solarize_threshold)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 values (RGB), got {mean} and {std}")
        if min(std) <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._generator = torch.Generator(device="cpu")
        if seed is None:
            self.seed = int(self._generator.seed())
        else:
            self.seed = int(seed)
            self._generator.manual_seed(self.seed)

    # ------------------------------------------------------------------ RNG state
    def get_rng_state(self) -> Tensor:
        """Return the state of the internal generator (a CPU ``uint8`` tensor)."""
        return self._generator.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        """Restore a state returned by ``get_rng_state`` (exact resume)."""
        if not isinstance(state, Tensor) or state.dtype != torch.uint8:
            got = state.dtype if isinstance(state, Tensor) else type(state).__name__
            raise TypeError(f"expected a torch.uint8 state tensor from get_rng_state(), got {got}")
        self._generator.set_state(state.cpu())

    # ------------------------------------------------------------------ views
    @property
    def exact_geometry(self) -> bool:
        """Whether crop boxes and flips say exactly where each output pixel comes from (False
        when an extra kornia op moves pixels, e.g. ``RandomAffine``)."""
        return not (self.extras and self.extras.geometric)

    @property
    def view_kinds(self) -> list[str]:
        """Kinds of the output views, in order."""
        return ["global1", "global2"] + ["local"] * self.n_local

    @property
    def num_views(self) -> int:
        """Number of output views (``2 + n_local``)."""
        return 2 + self.n_local

    def _kind_settings(self, kind: str) -> tuple[int, tuple[float, float], float, float]:
        if kind == "global1":
            return self.global_size, self.global_scale, self.blur_p[0], 0.0
        if kind == "global2":
            return self.global_size, self.global_scale, self.blur_p[1], self.solarize_p
        return self.local_size, self.local_scale, self.blur_p[2], 0.0

    def sample_params(
        self,
        b: int,
        height: int,
        width: int,
        box: Tensor | None = None,
        source_size: Tensor | None = None,
        shard: tuple[int, int] | None = None,
    ) -> list[ViewParams]:
        """Draw the random parameters of all views for a batch (advances the generator).

        Args:
            b: Batch size (this rank's, with ``shard``).
            height, width: Input (canvas) size.
            box: ``(b, 4)`` ``(top, left, h, w)`` of each image in its canvas (default: the
                whole canvas).
            source_size: ``(b, 2)`` ``(H, W)`` of each original image, whose pixel grid crop
                boxes are drawn on (default: the size of ``box``).
            shard: ``(rank, world_size)``: draw for the global batch of ``b * world_size`` and
                return rank ``rank``'s rows (see :meth:`forward`).

        Returns:
            ``2 + n_local`` ``ViewParams`` (global 1, global 2, then the locals).
        """
        rank, world = (0, 1) if shard is None else shard
        if not 0 <= rank < world:
            raise ValueError(f"shard rank {rank} out of range for world size {world}")
        box, source_size = self._frames(b, height, width, box, source_size)
        n, lo, hi = b * world, rank * b, (rank + 1) * b
        g = self._generator
        out = []
        for kind in self.view_kinds:
            size, scale, blur_p, sol_p = self._kind_settings(kind)
            draws = draw_crop_boxes(n, scale, self.ratio, generator=g).rows(lo, hi)
            u = torch.rand((5, n), generator=g)[:, lo:hi]
            fac = torch.rand((4, n), generator=g)[:, lo:hi]
            lo_f = torch.tensor((self.brightness[0], self.contrast[0], self.saturation[0],
                                 self.hue[0])).view(4, 1)
            hi_f = torch.tensor((self.brightness[1], self.contrast[1], self.saturation[1],
                                 self.hue[1])).view(4, 1)
            fac = lo_f + (hi_f - lo_f) * fac
            order = torch.rand((n, 4), generator=g)[lo:hi].argsort(dim=1)
            s_lo, s_hi = self.blur_sigma
            sigma = s_lo + (s_hi - s_lo) * torch.rand(n, generator=g)[lo:hi]
            source_boxes = crop_boxes_from_draws(draws, source_size[:, 0], source_size[:, 1], self.ratio)
            # drawn only when there are extra ops: without them the stream is unchanged
            extra_seed = int(torch.randint(0, 2**62, (1,), generator=g)) if self.extras else 0
            out.append(ViewParams(
                kind=kind, size=size, boxes=boxes_to_canvas(source_boxes, box, source_size),
                source_boxes=source_boxes,
                flip=u[0] < self.flip_p, jitter=u[1] < self.jitter_p,
                brightness=fac[0], contrast=fac[1], saturation=fac[2], hue=fac[3],
                order=order, grayscale=u[2] < self.grayscale_p, blur=u[3] < blur_p,
                sigma=sigma, solarize=u[4] < sol_p,
                extra_seed=extra_seed, row_offset=lo, global_batch=n,
            ))
        return out

    @staticmethod
    def _frames(b: int, height: int, width: int, box: Tensor | None, source_size: Tensor | None
                ) -> tuple[Tensor, Tensor]:
        """Checked CPU ``int64`` ``box (b, 4)`` and ``source_size (b, 2)`` (defaults filled in)."""
        if box is None:
            box = torch.tensor((0, 0, height, width), dtype=torch.int64).expand(b, 4)
        box = torch.as_tensor(box).to(device="cpu", dtype=torch.int64)
        if box.shape != (b, 4):
            raise ValueError(f"box must have shape ({b}, 4) (top, left, height, width), got {tuple(box.shape)}")
        top, left, h, w = box.unbind(1)
        inside = (top >= 0) & (left >= 0) & (h >= 1) & (w >= 1) & (top + h <= height) & (left + w <= width)
        if not bool(inside.all()):
            bad = box[~inside][0].tolist()
            raise ValueError(f"every box (top, left, height, width) must lie in the {height}x{width} canvas "
                             f"with height, width >= 1, got {bad}")
        if source_size is None:
            source_size = box[:, 2:]
        source_size = torch.as_tensor(source_size).to(device="cpu", dtype=torch.int64)
        if source_size.shape != (b, 2) or bool((source_size < 1).any()):
            raise ValueError(f"source_size must be ({b}, 2) (height, width) >= 1, got shape "
                             f"{tuple(source_size.shape)}, min {int(source_size.min())}")
        return box, source_size

    # ------------------------------------------------------------------ forward
    @staticmethod
    def check_images(images: Tensor | Canvas) -> None:
        """Raise ``TypeError`` / ``ValueError`` unless ``images`` is ``uint8 (b, 3, H, W)`` (or a
        :class:`~esvit.data.decode.Canvas` batch holding one)."""
        if isinstance(images, Canvas):
            images = images.image
        if not isinstance(images, Tensor):
            raise TypeError(f"expected a torch.uint8 tensor of shape (b, 3, H, W), got "
                            f"{type(images).__name__}")
        if images.dtype != torch.uint8:
            raise TypeError(f"expected images of dtype torch.uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (b, 3, H, W), got {tuple(images.shape)}")
        if images.shape[0] < 1:
            raise ValueError("expected a batch of at least 1 image, got 0")
        h, w = images.shape[-2:]
        if h < MIN_IMAGE_SIZE or w < MIN_IMAGE_SIZE:
            raise ValueError(f"expected H, W >= {MIN_IMAGE_SIZE}, got {h}x{w}")

    def forward(self, images: Tensor | Canvas, shard: tuple[int, int] | None = None) -> list[Tensor]:
        """Augment a batch.

        Args:
            images: ``uint8`` ``(b, 3, H, W)`` on any device, or a
                :class:`~esvit.data.decode.Canvas` batch (``image`` ``(b, 3, H, W)``, ``box``
                ``(b, 4)``, ``source_size`` ``(b, 2)``): crops are then drawn on each original's
                size and taken from its box. A plain tensor is a canvas every image fills.
            shard: ``(rank, world_size)`` when ``images`` is rank ``rank``'s contiguous block of
                a global batch of ``b * world_size``: parameters are drawn for the global batch
                (generators stay in step on every rank) and this rank applies its rows, so the
                result does not depend on how the global batch is split across ranks.

        Returns:
            ``2 + n_local`` float32 tensors on the images' device: 2 global views
            ``(b, 3, global_size, global_size)`` then the local views
            ``(b, 3, local_size, local_size)``, normalised with ``mean`` / ``std``.
        """
        return self.forward_with_params(images, shard)[0]

    def forward_with_params(self, images: Tensor | Canvas, shard: tuple[int, int] | None = None
                            ) -> tuple[list[Tensor], list[ViewParams]]:
        """:meth:`forward`, also returning the parameters of this rank's rows (crop boxes, flips,
        ...) of every view."""
        self.check_images(images)
        box = source_size = None
        if isinstance(images, Canvas):
            images, box, source_size = images
        b, _, h, w = images.shape
        if shard is not None and shard[1] == 1:
            shard = None
        params = self.sample_params(b, h, w, box, source_size, shard)
        return self.apply_params(images, params), params

    def apply_params(self, images: Tensor | Canvas, params: list[ViewParams]) -> list[Tensor]:
        """Apply previously sampled parameters (``sample_params``) to a ``uint8`` batch.

        Args:
            images: ``uint8`` ``(b, 3, H, W)`` (or a Canvas batch: its ``image``; the boxes in
                ``params`` already hold the canvas geometry).
            params: one ``ViewParams`` per view, each for ``b`` samples.

        Returns:
            One float32 ``(b, 3, size, size)`` tensor per view, in the order of ``params``.
        """
        self.check_images(images)
        if isinstance(images, Canvas):
            images = images.image
        b, _, h, w = images.shape
        for p in params:
            if p.boxes.shape != (b, 4):
                raise ValueError(f"params were sampled for a batch of {p.boxes.shape[0]}, "
                                 f"images have {b}")
        device = images.device
        # uint8 -> float32 [0, 1] once, of the part any crop box reaches (letterboxed canvases
        # leave the padding out) plus one pixel for the bilinear neighbours: cropping the source
        # there changes no sample of roi_align.
        reach = torch.stack([p.boxes[:, :2] + p.boxes[:, 2:] for p in params]).flatten(0, 1).amax(0)
        h_used = min(h, math.ceil(float(reach[0])) + 1)
        w_used = min(w, math.ceil(float(reach[1])) + 1)
        source = torch.empty((b, 3, h_used, w_used), dtype=torch.float32, device=device)
        # as_strided: one op whatever the extent (indexing a full extent gives an alias instead)
        source.copy_(images.as_strided((b, 3, h_used, w_used), images.stride(), images.storage_offset()))
        source.mul_(1.0 / 255.0)

        outputs: list[Tensor | None] = [None] * len(params)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.size, []).append(i)
        for size, members in groups.items():
            views = self._apply_group(source, [params[i] for i in members], b, size)
            for i, v in zip(members, views, strict=True):
                outputs[i] = v
        return outputs  # type: ignore[return-value]

    def _apply_group(self, source: Tensor, params: list[ViewParams], b: int, size: int) -> list[Tensor]:
        """Process all views of one output size as a single batch of ``len(params) * b``."""
        device = source.device
        n_views = len(params)

        def cat(name: str) -> Tensor:
            return torch.cat([getattr(p, name) for p in params], dim=0)

        # ---- CPU: per-sample plan for the whole group (view-major sample order)
        flip_index = torch.nonzero(cat("flip")).flatten()
        batch_index = torch.arange(b).repeat(n_views)
        rois = boxes_to_rois(cat("boxes"), batch_index, source.shape[-1])
        blend, hue6, hue_index = jitter_plan(cat("brightness"), cat("contrast"),
                                             cat("saturation"), cat("hue"), cat("order"),
                                             apply=cat("jitter"))
        gray_index = torch.nonzero(cat("grayscale")).flatten()
        blur_index = torch.nonzero(cat("blur")).flatten()
        # clamp the kernel for tiny views (reflect padding needs kernel // 2 < size)
        ksize = min(self.blur_kernel_size, size if size % 2 == 1 else size - 1)
        weights = gaussian_kernel1d(cat("sigma").index_select(0, blur_index), ksize)
        sol_thr = torch.tensor(self.solarize_threshold)
        sol_index = torch.nonzero(cat("solarize")).flatten()
        norm = torch.tensor((*self.mean, *self.std))

        # ---- one host -> device transfer for floats, one for indices
        floats = [rois, blend, hue6, weights, sol_thr, norm]
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in floats]).to(device)
        rois, blend, hue6, weights, sol_thr, norm = (
            t.view(s.shape) for t, s in zip(flat.split([t.numel() for t in floats]), floats,
                                            strict=True))
        longs = [flip_index, *hue_index, gray_index, blur_index, sol_index]
        flat_idx = torch.cat(longs).to(device)
        flip_index, *hue_index, gray_index, blur_index, sol_index = flat_idx.split([t.numel() for t in longs])

        # ---- crop + resize: one roi_align call
        x = _resize_rois(source, rois, (size, size))  # (n_views * b, 3, size, size)
        # ---- flip the selected crops (exact: a permutation of the output pixels)
        x.index_copy_(0, flip_index, x[flip_index].flip(-1))
        # ---- colour jitter, random order per sample
        _jitter_(x, blend, hue6, list(hue_index))
        # ---- grayscale
        sub = x[gray_index]
        x.index_copy_(0, gray_index, _gray(sub).expand(-1, 3, -1, -1))
        # ---- blur
        blurred = _blur_(x[blur_index], weights)  # (m, h, c, w) layout
        x.permute(0, 2, 1, 3).index_copy_(0, blur_index, blurred)
        # ---- solarize
        sub = x[sol_index]
        x.index_copy_(0, sol_index, torch.where(sub >= sol_thr, 1.0 - sub, sub))
        # ---- the user's kornia ops, per view (each view's rows are one contiguous block)
        if self.extras:
            for i, p in enumerate(params):
                block = x[i * b:(i + 1) * b]
                block.copy_(self.extras.apply(block.clone(), p.kind, p.extra_seed, p.row_offset, p.global_batch))
        # ---- normalise
        mean, std = norm.view(2, 1, 3, 1, 1).unbind(0)
        x.sub_(mean).div_(std)
        return list(x.view(n_views, b, 3, size, size).unbind(0))

    def extra_repr(self) -> str:
        return (f"global_size={self.global_size}, local_size={self.local_size}, "
                f"n_local={self.n_local}, global_scale={self.global_scale}, "
                f"local_scale={self.local_scale}, blur_p={self.blur_p}, "
                f"solarize_p={self.solarize_p}, seed={self.seed}")

