"""One distillation step for any registered method: what the training loop calls.

:class:`MethodRunner` is built once per run (after the student and teacher, before the optimiser);
per step it runs teacher and student on the augmented batch with the hooks the distiller needs and
returns the student's output, the teacher's logits and the distiller's losses::

    runner = MethodRunner.build(cfg.loss, ctx)          # ctx: DistillContext of the run
    params = [*student.parameters(), *runner.parameters()]
    ...
    s_out, t_logits, losses = runner.step(x, labels, positions, step, student_call=ddp_student)
    losses["loss"].backward()

Checkpoints hold ``runner.state_dict()`` (the distiller's parameters and buffers: regressors, heads,
CRD's memory banks and sampler) next to the student's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from esvit.distill.methods.registry import (
    DistillContext,
    Distiller,
    DistillInputs,
    build_distiller,
    forward_features,
)
from esvit.distill.methods.stages import FeatureTap

__all__ = ["MethodRunner"]


class MethodRunner:
    """A distiller with its feature taps on the student and the teacher.

    Args:
        distiller: The method.
        ctx: The run's :class:`DistillContext` (student, teacher, their probed stages).
    """

    def __init__(self, distiller: Distiller, ctx: DistillContext) -> None:
        self.distiller, self.ctx = distiller, ctx
        needs = distiller.needs
        self.student_tap = (FeatureTap(ctx.student, needs.student_stages, ctx.stages("student"),
                                       f"loss.{distiller.name} (student)") if needs.student_stages else None)
        self.teacher_tap = None
        if needs.teacher_stages:
            if ctx.teacher is None:
                raise ValueError(f"loss.kind={distiller.name} reads teacher stages but teacher.kind is none")
            self.teacher_tap = FeatureTap(ctx.teacher, needs.teacher_stages, ctx.stages("teacher"),
                                          f"loss.{distiller.name} (teacher)")

    @classmethod
    def build(cls, loss: Any, ctx: DistillContext) -> MethodRunner:
        """The runner of ``loss.kind`` (see :func:`build_distiller`)."""
        return cls(build_distiller(loss, ctx), ctx)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The distiller's trainable parameters (add them to the optimiser)."""
        return self.distiller.parameters()

    def state_dict(self) -> dict[str, Any]:
        """The distiller's state (for the checkpoint)."""
        return self.distiller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (strict)."""
        self.distiller.load_state_dict(state)

    def sync_gradients(self) -> None:
        """Average the distiller's gradients over DDP ranks (call after ``backward``, before clipping).

        The distiller is not wrapped in DDP (its buffers, e.g. CRD's memory banks, are kept equal
        across ranks by the distiller itself, and DDP would broadcast rank 0's over them); its
        gradients are all-reduced here instead. A no-op in a single process.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad for p in self.distiller.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def train(self, mode: bool = True) -> MethodRunner:
        """Training mode of the distiller's modules (branch exits hold BatchNorm)."""
        self.distiller.train(mode)
        return self

    def step(self, x: Tensor, labels: Tensor | None, index: Tensor | None, step: int,
             student_call: Callable[[Tensor], Any] | None = None, teacher_logits: Tensor | None = None
             ) -> tuple[Any, Tensor | None, dict[str, Tensor]]:
        """Forward teacher and student on ``x``, then the distiller.

        Args:
            x: Augmented batch ``(b, 3, h, w)`` (both networks see it).
            labels: ``(b,)`` or None (label-free data).
            index: ``(b,)`` positions in the training split (CRD), or None.
            step: 0-based global step.
            student_call: The student as the loop calls it (its DDP wrapper); default the student.
            teacher_logits: Precomputed teacher logits (``teacher.mode=cached``); the teacher then
                runs only when the distiller reads its stages.

        Returns:
            ``(student output, teacher logits or None, losses)``.
        """
        needs = self.distiller.needs
        if needs.labels and labels is None:
            raise ValueError(f"loss.kind={self.distiller.name} needs labels; the data has none")
        run_needs = needs
        if teacher_logits is not None and needs.teacher_logits:
            run_needs = replace(needs, teacher_logits=False)
        s_out, t_logits, s_feats, t_feats = forward_features(
            run_needs, self.ctx.student, self.ctx.teacher, x, student_call, self.student_tap, self.teacher_tap)
        if teacher_logits is not None and needs.teacher_logits:
            t_logits = teacher_logits
        inputs = DistillInputs(s_out, t_logits, labels if needs.labels else None, s_feats, t_feats,
                               index if needs.index else None, step)
        return s_out, t_logits, self.distiller(inputs)
