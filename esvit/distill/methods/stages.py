"""Stages of any backbone found by hooks: one probe run lists them, :class:`FeatureTap` reads them.

Feature-based distillation (FitNet, CRD, OFA-KD, label-free feature matching) needs intermediate
outputs of both networks. Instead of rewriting each model's ``forward`` (as timm-based KD
toolboxes do), a forward hook on every module records what each one returns for one dummy
input (:func:`list_stages`, the idea of :func:`esvit.backbones.hub.probe_spec`); a *stage* is a
module whose output is a feature map:

* ``bchw``: a 4-D CNN map (``(b, c, h, w)``, ``h == w``);
* ``bhwc``: a 4-D channels-last map (torchvision Swin);
* ``bnd``: 3-D tokens ``(b, n, d)``; the leading ``n - isqrt(n)**2`` tokens are prefix tokens (CLS,
  DeiT distillation token) unless ``num_prefix_tokens`` is given.

A parameter-free module that pools a larger grid down to ``1 x 1`` (global average pooling) is not a
stage. :func:`default_stages` picks ``n`` stages the way the KD literature splits networks: the end
of every resolution (the last, outermost module of each run of equal grids), or evenly spaced blocks
of a constant-resolution network (ViT). Names are relative to the module probed, so the student
classifier (``backbone.layer3``) and the frozen teacher (``net.layer3``) are named as they are.

:class:`FeatureTap` hooks chosen stages during one forward call and removes its hooks afterwards
(deep copies and DDP wrappers never carry hook state); a name the model does not have is a one-line
error listing the stages it has.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LAYOUTS",
    "FeatureTap",
    "Stage",
    "StageError",
    "align_grid",
    "candidate_stages",
    "check_stage_names",
    "default_stages",
    "describe_stages",
    "final_stage",
    "list_stages",
    "stage_map",
    "stage_tokens",
]

LAYOUTS = ("bchw", "bhwc", "bnd")


class StageError(ValueError):
    """A stage that does not exist, or two stages whose grids cannot be aligned (one line)."""


@dataclass(frozen=True)
class Stage:
    """One module whose output is a feature map.

    Attributes:
        name: Dotted module name (``named_modules()`` of the probed module).
        shape: Output shape for one probe image (batch 1).
        layout: ``bchw``, ``bhwc`` or ``bnd``.
        num_prefix_tokens: ``bnd`` only: leading non-region tokens.
    """

    name: str
    shape: tuple[int, ...]
    layout: str
    num_prefix_tokens: int = 0

    @property
    def dim(self) -> int:
        """Channels / token dimension."""
        return self.shape[1] if self.layout == "bchw" else self.shape[-1]

    @property
    def num_regions(self) -> int:
        """Spatial positions (region tokens) per image."""
        if self.layout == "bnd":
            return self.shape[1] - self.num_prefix_tokens
        return self.shape[2] * self.shape[3] if self.layout == "bchw" else self.shape[1] * self.shape[2]

    @property
    def grid(self) -> tuple[int, int] | None:
        """``(h, w)`` of the regions; None for tokens that are not a square grid."""
        if self.layout == "bchw":
            return self.shape[2], self.shape[3]
        if self.layout == "bhwc":
            return self.shape[1], self.shape[2]
        n = self.num_regions
        side = math.isqrt(n)
        return (side, side) if side * side == n else None

    @property
    def depth(self) -> int:
        """Nesting depth of the module (``layer1`` 1, ``layer1.0`` 2)."""
        return self.name.count(".") + 1

    def describe(self) -> str:
        """``name (layout d x h x w)`` for messages."""
        g = self.grid
        where = f"{g[0]}x{g[1]}" if g else f"{self.num_regions} tokens"
        extra = f" + {self.num_prefix_tokens} prefix" if self.num_prefix_tokens else ""
        return f"{self.name} ({self.layout} {self.dim}x{where}{extra})"


def _is_bchw(s: tuple[int, ...]) -> bool:
    return s[2] == s[3] >= 1 and s[1] != s[2]


def _is_bhwc(s: tuple[int, ...]) -> bool:
    return s[1] == s[2] >= 1 and s[3] != s[2]


def _spatial(s: tuple[int, ...]) -> int | None:
    """Grid side of a 4-D map output (None: not a map)."""
    if len(s) != 4:
        return None
    if _is_bchw(s):
        return s[2]
    if _is_bhwc(s):
        return s[1]
    return None


#: Classifier heads: not feature stages (their norm layers may output 1 x 1 maps).
HEAD_NAMES = frozenset({"head", "heads", "head_dist", "fc", "classifier", "pre_logits"})


def _in_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


def _device_dtype(net: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    ref = next(net.parameters(), None)
    if ref is None:
        ref = next(net.buffers(), None)
    if ref is None:
        return None, None
    return ref.device, (ref.dtype if ref.is_floating_point() else None)


def list_stages(net: nn.Module, image_size: int, in_chans: int = 3, num_prefix_tokens: int | None = None
                ) -> list[Stage]:
    """Every module of ``net`` whose output is a feature map, in the order their outputs are ready.

    One no-grad forward of zeros ``(1, in_chans, image_size, image_size)`` in eval mode (each
    submodule's training flag is restored), with a forward hook on every named module.

    Args:
        net: Any module taking images (our registry backbones, student classifiers, frozen
            teachers, torchvision and timm models).
        image_size: Side of the square probe input (the training resolution).
        in_chans: Input channels.
        num_prefix_tokens: Prefix tokens of every ``bnd`` output (None: ``n - isqrt(n)**2``, or
            the model's ``num_prefix_tokens`` attribute when it has one, as timm ViTs do).

    Returns:
        The stages; a module called several times is listed once, with its last output.

    Raises:
        StageError: No module outputs a feature map at this size.
    """
    known = num_prefix_tokens
    if known is None:
        attrs = [m.num_prefix_tokens for m in net.modules()
                 if isinstance(getattr(m, "num_prefix_tokens", None), int)]
        known = attrs[0] if attrs else None
    seen: dict[str, Stage] = {}
    order: list[str] = []

    def prefix_of(n: int) -> int:
        if known is not None and (num_prefix_tokens is not None or math.isqrt(n - known) ** 2 == n - known):
            return known
        return n - math.isqrt(n) ** 2

    def record(name: str, module: nn.Module, out: Any) -> None:
        if isinstance(out, tuple) and out:
            out = out[0]
        if not isinstance(out, Tensor) or out.ndim not in (3, 4) or out.shape[0] != 1:
            return  # batch 1 only: window-attention internals fold windows into the batch
        if _in_head(name):
            return
        s = tuple(out.shape)
        stage: Stage | None = None
        if len(s) == 3:
            prefix = prefix_of(s[1])
            if 0 <= prefix < s[1]:
                stage = Stage(name, s, "bnd", prefix)
        elif _spatial(s) is not None:
            global_pool = (_spatial(s) == 1 and "pool" in type(module).__name__.lower()
                           and next(module.parameters(), None) is None)
            if not global_pool:
                stage = Stage(name, s, "bchw" if _is_bchw(s) else "bhwc")
        if stage is not None:
            if name in seen:
                order.remove(name)
            seen[name] = stage
            order.append(name)

    hooks = [m.register_forward_hook(lambda mod, _i, o, n=n: record(n, mod, o))
             for n, m in net.named_modules() if n]
    modes = [(m, m.training) for m in net.modules()]
    device, dtype = _device_dtype(net)
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, in_chans, image_size, image_size, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
    if not order:
        raise StageError(f"{type(net).__name__}: no module outputs a feature map at {image_size}px")
    return [seen[n] for n in order]


def _runs(stages: Sequence[Stage]) -> list[list[Stage]]:
    """Consecutive stages with the same region grid."""
    runs: list[list[Stage]] = []
    for s in stages:
        key = s.grid or (s.num_regions, 0)
        if runs and (runs[-1][-1].grid or (runs[-1][-1].num_regions, 0)) == key:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def _representative(run: Sequence[Stage]) -> Stage:
    """The last, outermost module of a run (``layer2`` rather than ``layer2.1.bn2``)."""
    depth = min(s.depth for s in run)
    return [s for s in run if s.depth == depth][-1]


def _blocks(run: Sequence[Stage]) -> list[Stage]:
    """Children of the container holding the most block outputs in ``run`` (a ViT's blocks)."""
    by_parent: dict[str, list[Stage]] = {}
    for s in run:
        parent, _, leaf = s.name.rpartition(".")
        if leaf.isdigit() or leaf.startswith(("encoder_layer_", "block", "layer")):
            by_parent.setdefault(parent, []).append(s)
    groups = [g for g in by_parent.values() if len(g) >= 2]
    if not groups:
        return []
    return min(groups, key=lambda g: (g[0].depth, -len(g)))  # the outermost container (blocks, not MLP layers)


def candidate_stages(stages: Sequence[Stage]) -> list[Stage]:
    """The coarse stages a user picks from: one per resolution, plus the blocks of the last one."""
    runs = _runs(stages)
    reps = [_representative(r) for r in runs]
    blocks = _blocks(runs[-1])
    out = reps[:-1] + [b for b in blocks if b not in reps] + [reps[-1]]
    return list(dict.fromkeys(out))


def final_stage(stages: Sequence[Stage]) -> Stage:
    """The network's feature output: the last, outermost stage at its final resolution (``layer4``;
    a ViT's ``encoder``, after its final norm)."""
    return _representative(_runs(stages)[-1])


def default_stages(stages: Sequence[Stage], n: int = 4) -> list[Stage]:
    """``n`` stages to distil (fewer when the network has fewer), shallow to deep.

    The end of each of the last ``n`` resolutions; when the network keeps one resolution (a ViT),
    ``n`` evenly spaced blocks of its outermost block container, ending with its last block.

    Args:
        stages: :func:`list_stages` of the network.
        n: How many stages (``>= 1``).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    runs = _runs(stages)
    reps = [_representative(r) for r in runs if r]
    if len(reps) >= n:
        return reps[-n:]
    blocks = _blocks(runs[-1]) if len(reps) == 1 else []
    if len(blocks) >= 2:
        m = min(n, len(blocks))
        return [blocks[round((i + 1) * len(blocks) / m) - 1] for i in range(m)]
    return reps


def describe_stages(stages: Sequence[Stage], limit: int = 24) -> str:
    """The coarse stages of a network as one line."""
    cands = candidate_stages(stages)
    text = ", ".join(s.describe() for s in cands[:limit])
    return text + (f", ... ({len(cands) - limit} more)" if len(cands) > limit else "")


def check_stage_names(stages: Sequence[Stage], names: Sequence[str], what: str) -> list[Stage]:
    """The stages named ``names`` (in that order).

    Raises:
        StageError: One line: the missing name and the stages the network has.
    """
    by_name = {s.name: s for s in stages}
    out = []
    for name in names:
        if name not in by_name:
            raise StageError(f"{what}: no stage {name!r} in the network; its stages: {describe_stages(stages)} "
                             f"({len(stages)} modules output feature maps; any of them may be named)")
        out.append(by_name[name])
    return out


# --------------------------------------------------------------------------------- layouts


def stage_tokens(x: Tensor, stage: Stage) -> tuple[Tensor, Tensor]:
    """Pooled feature and region tokens of a stage output.

    Args:
        x: The stage output: ``(b, c, h, w)``, ``(b, h, w, c)`` or ``(b, n, d)``.
        stage: Its :class:`Stage` (layout, prefix tokens).

    Returns:
        ``pooled (b, d)``: the first token when the stage has prefix tokens (CLS), else the mean
        of the regions; ``regions (b, n, d)``.
    """
    if stage.layout == "bchw":
        regions = x.flatten(2).transpose(1, 2)
    elif stage.layout == "bhwc":
        regions = x.flatten(1, 2)
    else:
        p = stage.num_prefix_tokens
        regions = x[:, p:]
        if p:
            return x[:, 0], regions
    return regions.mean(dim=1), regions


def stage_map(x: Tensor, stage: Stage) -> Tensor:
    """A stage output as a ``(b, d, h, w)`` map (prefix tokens dropped; non-square tokens
    become an ``n x 1`` grid)."""
    if stage.layout == "bchw":
        return x
    if stage.layout == "bhwc":
        return x.permute(0, 3, 1, 2)
    _, regions = stage_tokens(x, stage)
    h, w = stage.grid or (regions.shape[1], 1)
    return regions.transpose(1, 2).reshape(regions.shape[0], regions.shape[2], h, w)


def align_grid(student: Stage, teacher: Stage, what: str) -> Callable[[Tensor], Tensor]:
    """How to bring a ``(b, d, h_s, w_s)`` student map onto the teacher's grid.

    A larger student grid is average-pooled (``adaptive_avg_pool2d``), a smaller one bilinearly
    interpolated; equal grids pass through.

    Raises:
        StageError: One of the two is a token sequence that is not a square grid and the token
            counts differ (no spatial correspondence).
    """
    gs, gt = student.grid, teacher.grid
    if gs is None or gt is None:
        if student.num_regions != teacher.num_regions:
            raise StageError(f"{what}: cannot align student stage {student.describe()} with teacher stage "
                             f"{teacher.describe()}: tokens that are not a square grid need equal counts")
        return lambda x: x
    if gs == gt:
        return lambda x: x
    if gs[0] >= gt[0] and gs[1] >= gt[1]:
        return lambda x: F.adaptive_avg_pool2d(x, gt)
    return lambda x: F.interpolate(x, size=gt, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------ feature tap


class FeatureTap:
    """Read the outputs of named modules during a forward call.

    Args:
        model: The module whose submodules are hooked (names relative to it; call it, or a DDP /
            other wrapper around it, inside :meth:`capture`).
        names: Dotted module names to record.
        stages: The model's :func:`list_stages` (for the error message of a missing name).
        what: Prefix of error messages (e.g. the config key).

    Raises:
        StageError: A name is not a module of ``model`` (the message lists its stages).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], stages: Sequence[Stage] | None = None,
                 what: str = "stage") -> None:
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules or not name:
                listing = describe_stages(stages) if stages else ", ".join(n for n in modules if n and "." not in n)
                raise StageError(f"{what}: no stage {name!r} in {type(model).__name__}; its stages: {listing}")
        self.model = model
        self.names = tuple(dict.fromkeys(names))
        self._modules = [modules[n] for n in self.names]

    @contextmanager
    def capture(self, stop_after: bool = False) -> Iterator[dict[str, Tensor]]:
        """Hook the stages for the ``with`` block; the yielded dict fills as the forward runs.

        Args:
            stop_after: Abort the forward once every stage has been recorded (when its final
                output is not needed, e.g. a label-free teacher); the abort is swallowed here.

        Raises:
            RuntimeError: (on exit) a stage was not called during the forward.
        """
        feats: dict[str, Tensor] = {}
        want = set(self.names)

        def hook(name: str, out: Any) -> None:
            if isinstance(out, tuple) and out:
                out = out[0]
            if not isinstance(out, Tensor):
                raise TypeError(f"stage {name!r} returned {type(out).__name__}, expected a Tensor")
            feats[name] = out
            if stop_after and want <= feats.keys():
                raise _StopForward

        handles = [m.register_forward_hook(lambda _m, _i, o, n=n: hook(n, o)) for n, m in zip(self.names, self._modules,
                                                                                              strict=True)]
        try:
            yield feats
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise RuntimeError(f"stages {missing} of {type(self.model).__name__} were not called during the forward")

    def __call__(self, x: Tensor, stop_after: bool = False, call: Callable[[Tensor], Any] | None = None
                 ) -> tuple[Any, dict[str, Tensor]]:
        """Run ``call(x)`` (default: the model) and return ``(its output or None, features)``."""
        out = None
        with self.capture(stop_after) as feats:
            out = (call or self.model)(x)
        return out, feats


class _StopForward(Exception):
    """Raised by a hook to skip the layers after the last recorded stage."""
