"""Distiller registry: a distillation method is one module that declares what it needs.

A *distiller* (:class:`Distiller`) is an ``nn.Module`` holding the method's trainable parts
(regressors, embedding heads, branch exits) and state (memory banks). It declares its inputs in
:attr:`Distiller.needs` (:class:`Needs`: which teacher / student stages, teacher logits, labels,
data-set indices) and maps a :class:`DistillInputs` to a dict of losses (``"loss"``: what to
back-propagate; the other entries are detached components for logging).

The training loop is the same for every method (see :func:`forward_features`):

1. hook ``needs.student_stages`` on the student and ``needs.teacher_stages`` on the teacher with
   :class:`~esvit.distill.methods.stages.FeatureTap`;
2. run the frozen teacher (no grad; stopped after its last hooked stage when its logits are not
   needed) and the student on the same augmented batch;
3. ``losses = distiller(DistillInputs(...))``; back-propagate ``losses["loss"]``; the optimiser
   holds the student's and the distiller's parameters, the checkpoint both state dicts.

A new method is one file::

    @register_distiller("mine")
    class Mine(Distiller):
        @classmethod
        def from_config(cls, loss, ctx):
            return cls(...)

        def forward(self, inputs):
            ...
            return {"loss": loss, "part": part.detach()}

:class:`DistillContext` gives ``from_config`` what it needs to size its modules: the student and
teacher, their probed stages (:func:`~esvit.distill.methods.stages.list_stages`, run once and
cached), the number of classes and the training-set size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from esvit.distill.methods.stages import (
    FeatureTap,
    Stage,
    StageError,
    check_stage_names,
    default_stages,
    final_stage,
    list_stages,
)

__all__ = [
    "DistillContext",
    "DistillInputs",
    "Distiller",
    "Needs",
    "build_distiller",
    "forward_features",
    "get_distiller",
    "list_distillers",
    "register_distiller",
]

_REGISTRY: dict[str, type[Distiller]] = {}
D = TypeVar("D", bound="type[Distiller]")


@dataclass(frozen=True)
class Needs:
    """What a distiller reads from a training step.

    Attributes:
        student_stages: Student module names to hook (outputs in ``DistillInputs.student_feats``).
        teacher_stages: Teacher module names to hook (``DistillInputs.teacher_feats``).
        teacher_logits: The teacher's output (logits ``(b, C)``) is used.
        labels: Labels are used (False: label-free; the data may be unlabelled).
        index: Positions of the images in the training split are used (CRD's memory bank).
    """

    student_stages: tuple[str, ...] = ()
    teacher_stages: tuple[str, ...] = ()
    teacher_logits: bool = True
    labels: bool = True
    index: bool = False


@dataclass
class DistillInputs:
    """One training step as a distiller sees it.

    Attributes:
        student_out: Student logits ``(b, C)``, or ``(cls_logits, dist_logits)`` for a DeiT
            student, or None (label-free feature distillation of a headless student).
        teacher_logits: ``(b, C)`` (no grad), or None when not needed.
        labels: ``(b,)`` int64, or None.
        student_feats: Stage name -> output, for ``needs.student_stages`` (with grad).
        teacher_feats: Stage name -> output, for ``needs.teacher_stages`` (no grad).
        index: ``(b,)`` int64 positions of the images in the training split, or None.
        step: 0-based global optimiser step (warm-up ramps).
    """

    student_out: Tensor | tuple[Tensor, Tensor] | None
    teacher_logits: Tensor | None = None
    labels: Tensor | None = None
    student_feats: dict[str, Tensor] = field(default_factory=dict)
    teacher_feats: dict[str, Tensor] = field(default_factory=dict)
    index: Tensor | None = None
    step: int = 0

    def logits(self) -> Tensor:
        """The student's logits ``(b, C)`` (the class-token head of a DeiT student)."""
        out = self.student_out
        if out is None:
            raise ValueError("this distiller needs the student's logits, but the student has no head")
        return out[0] if isinstance(out, tuple) else out

    def require(self, **named: Any) -> None:
        """Raise a one-line error naming every input in ``named`` that is None."""
        missing = [k for k, v in named.items() if v is None]
        if missing:
            raise ValueError(f"distiller inputs missing: {', '.join(missing)}")


@dataclass
class DistillContext:
    """What a distiller's ``from_config`` may use to build itself.

    Attributes:
        student: The student (unwrapped, on its device); stage names are relative to it.
        teacher: The frozen teacher, or None.
        num_classes: Classes of the data (0: label-free).
        num_data: Images in the training split (CRD's memory bank size).
        image_size: Student input side (the probe resolution of both networks; a teacher that
            resizes its input, like :class:`~esvit.distill.teachers.FrozenTeacher`, does so in
            the probe too).
        steps_per_epoch: Optimiser steps per epoch (warm-ups given in epochs).
        label_smoothing: Label smoothing of the label cross-entropy terms.
        seed: The run's seed (seeds a distiller's own random streams, e.g. CRD's sampler).
    """

    student: nn.Module
    teacher: nn.Module | None
    num_classes: int
    num_data: int
    image_size: int
    steps_per_epoch: int = 1
    label_smoothing: float = 0.0
    seed: int = 0
    _stages: dict[str, list[Stage]] = field(default_factory=dict, repr=False)

    def stages(self, side: str) -> list[Stage]:
        """:func:`list_stages` of ``"student"`` or ``"teacher"`` (probed once, then cached)."""
        if side not in ("student", "teacher"):
            raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
        if side not in self._stages:
            net = self.student if side == "student" else self.teacher
            if net is None:
                raise ValueError("this distiller needs a teacher (teacher.kind is none)")
            self._stages[side] = list_stages(net, self.image_size)
        return self._stages[side]

    def pick(self, side: str, names: Sequence[str], what: str, n: int = 4) -> list[Stage]:
        """The stages named ``names`` of one side, or its :func:`default_stages` (``n``) when empty.

        Raises:
            StageError: A name the network does not have (the message lists its stages).
        """
        stages = self.stages(side)
        if names:
            return check_stage_names(stages, names, f"{what} ({side})")
        return default_stages(stages, n)

    def final(self, side: str, name: str | None, what: str) -> Stage:
        """The stage named ``name`` of one side, or its :func:`final_stage` (the feature output) when None.

        Raises:
            StageError: A name the network does not have (the message lists its stages).
        """
        stages = self.stages(side)
        if name:
            return check_stage_names(stages, [name], f"{what} ({side})")[0]
        return final_stage(stages)

    def pair(self, student_names: Sequence[str], teacher_names: Sequence[str], what: str, n: int = 4
             ) -> list[tuple[Stage, Stage]]:
        """Student / teacher stage pairs (defaults: the last ``min`` of both default lists, deepest
        with deepest).

        Raises:
            StageError: Unknown names, or lists of different lengths.
        """
        s = self.pick("student", student_names, what, n)
        t = self.pick("teacher", teacher_names, what, n)
        if student_names and teacher_names and len(s) != len(t):
            raise StageError(f"{what}: {len(s)} student stages but {len(t)} teacher stages; give one teacher "
                             "stage per student stage")
        k = min(len(s), len(t))
        return list(zip(s[len(s) - k:], t[len(t) - k:], strict=True))


class Distiller(nn.Module):
    """Base class of distillation methods (see the module docstring).

    Attributes:
        name: Registry name (set by :func:`register_distiller`).
        needs: What :meth:`forward` reads.
    """

    name: ClassVar[str] = ""
    needs: Needs
    ce_weight: float = 0.0
    label_smoothing: float = 0.0

    def __init__(self, needs: Needs | None = None) -> None:
        super().__init__()
        self.needs = needs or Needs()

    def with_ce(self, inputs: DistillInputs, loss: Tensor, parts: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss": loss + ce_weight * CE(student logits, labels), **parts, "ce": ...}``; the
        cross-entropy term only when ``ce_weight > 0`` (it then needs labels)."""
        if self.ce_weight > 0:
            from esvit.distill.losses import _ce

            inputs.require(labels=inputs.labels)
            assert inputs.labels is not None
            ce = _ce(inputs.logits(), inputs.labels, self.label_smoothing)
            loss = loss + self.ce_weight * ce
            parts = {**parts, "ce": ce.detach()}
        return {"loss": loss, **parts}

    @classmethod
    def from_config(cls, loss: Any, ctx: DistillContext) -> Distiller:
        """Build from the ``loss`` section of a :class:`~esvit.distill.config.DistillConfig`."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a config")

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Losses of one step: ``{"loss": scalar to back-propagate, <component>: detached scalar}``."""
        raise NotImplementedError


def register_distiller(name: str) -> Callable[[D], D]:
    """Class decorator: register a :class:`Distiller` subclass under ``name``.

    Raises:
        ValueError: ``name`` is taken by another class.
    """
    def deco(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            raise TypeError(f"register_distiller({name!r}): {cls!r} is not a Distiller subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"distiller {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def list_distillers() -> list[str]:
    """Registered distiller names, sorted."""
    return sorted(_REGISTRY)


def get_distiller(name: str) -> type[Distiller]:
    """The class registered as ``name``.

    Raises:
        ValueError: Unknown name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown distiller {name!r}; registered: {', '.join(list_distillers())}")
    return _REGISTRY[name]


def build_distiller(loss: Any, ctx: DistillContext) -> Distiller:
    """The distiller of ``loss.kind`` built from the ``loss`` config section, on the student's device."""
    distiller = get_distiller(loss.kind).from_config(loss, ctx)
    ref = next(ctx.student.parameters(), None)
    return distiller.to(ref.device) if ref is not None else distiller


def forward_features(
    needs: Needs, student: nn.Module, teacher: nn.Module | None, x: Tensor,
    student_call: Callable[[Tensor], Any] | None = None,
    student_taps: FeatureTap | None = None, teacher_taps: FeatureTap | None = None,
) -> tuple[Any, Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
    """Run teacher and student on ``x`` and collect what ``needs`` asks for.

    Args:
        needs: The distiller's :class:`Needs`.
        student: The (unwrapped) student; stage names are relative to it.
        teacher: The frozen teacher (None: no teacher).
        x: The augmented batch ``(b, 3, h, w)``; both networks see the same crops.
        student_call: How to call the student (e.g. its DDP wrapper); default ``student``.
        student_taps, teacher_taps: Prebuilt taps (build them once per run); default: built here.

    Returns:
        ``(student_out, teacher_logits or None, student_feats, teacher_feats)``.
    """
    t_logits: Tensor | None = None
    t_feats: dict[str, Tensor] = {}
    if teacher is not None and (needs.teacher_logits or needs.teacher_stages):
        with torch.no_grad():
            if needs.teacher_stages:
                tap = teacher_taps or FeatureTap(teacher, needs.teacher_stages)
                out, t_feats = tap(x, stop_after=not needs.teacher_logits)
                t_logits = out if needs.teacher_logits else None
            else:
                t_logits = teacher(x)
        t_feats = {k: v.detach() for k, v in t_feats.items()}
    call = student_call or student
    if needs.student_stages:
        tap_s = student_taps or FeatureTap(student, needs.student_stages)
        s_out, s_feats = tap_s(x, call=call)
    else:
        s_out, s_feats = call(x), {}
    return s_out, t_logits, s_feats, t_feats
