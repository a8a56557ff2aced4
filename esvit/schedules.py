"""Training schedules, all pure functions of the global step, built in one place.

Every value used by the training loop (learning rate, weight decay, teacher momentum, teacher
temperature, last-layer freeze) is computed from the global optimisation step alone, so a
resumed run only needs to restore the step counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total_steps``)."""
    if total_steps <= 0:
        return end
    t = min(max(step, 0), total_steps) / total_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def linear(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear interpolation from ``start`` to ``end``, constant at ``end`` afterwards."""
    if total_steps <= 0:
        return end
    t = min(max(step, 0), total_steps) / total_steps
    return start + (end - start) * t


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, peak: float, final: float, warmup_start: float = 0.0
) -> float:
    """Linear warmup from ``warmup_start`` to ``peak`` over ``warmup_steps``, then cosine to ``final``."""
    if step < warmup_steps:
        return linear(step, warmup_steps, warmup_start, peak)
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


@dataclass(frozen=True)
class ScheduleValues:
    """Values of all schedules at one global step."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float
    freeze_last_layer: bool
    region_weight: float = 0.5


@dataclass(frozen=True)
class Schedules:
    """All EsViT/DINO schedules, as a pure function of the global step.

    Args:
        steps_per_epoch: Optimiser steps per epoch (after gradient accumulation).
        epochs: Total number of epochs.
        lr: Peak learning rate (already scaled by the global batch size).
        min_lr: Final learning rate.
        warmup_epochs: Linear LR warmup length.
        weight_decay: Initial weight decay.
        weight_decay_end: Final weight decay (cosine).
        momentum_teacher: Initial teacher EMA momentum (cosine to ``momentum_teacher_end``).
        momentum_teacher_end: Final teacher EMA momentum.
        warmup_teacher_temp: Teacher temperature at step 0.
        teacher_temp: Teacher temperature after ``warmup_teacher_temp_epochs`` (linear).
        warmup_teacher_temp_epochs: Length of the teacher temperature warmup.
        freeze_last_layer_epochs: Epochs during which the heads' last layer gets no update.
        region_weight: Weight ``w`` of the region loss (``(1 - w) * view + w * region``).
        region_warmup_epochs: Linear ramp of the region weight from 0 to ``region_weight``.
    """

    steps_per_epoch: int
    epochs: int
    lr: float
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0
    freeze_last_layer_epochs: float = 1
    region_weight: float = 0.5
    region_warmup_epochs: float = 0

    def __post_init__(self) -> None:
        if self.steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {self.steps_per_epoch}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")

    @property
    def total_steps(self) -> int:
        """Total number of optimiser steps in the run."""
        return self.steps_per_epoch * self.epochs

    def at(self, step: int) -> ScheduleValues:
        """Return every schedule's value at global optimiser step ``step``."""
        spe, total = self.steps_per_epoch, self.total_steps
        return ScheduleValues(
            lr=warmup_cosine(step, total, round(self.warmup_epochs * spe), self.lr, self.min_lr),
            weight_decay=cosine(step, total, self.weight_decay, self.weight_decay_end),
            teacher_momentum=cosine(step, total, self.momentum_teacher, self.momentum_teacher_end),
            teacher_temp=linear(
                step, round(self.warmup_teacher_temp_epochs * spe), self.warmup_teacher_temp, self.teacher_temp
            ),
            freeze_last_layer=step < round(self.freeze_last_layer_epochs * spe),
            region_weight=linear(step, round(self.region_warmup_epochs * spe), 0.0, self.region_weight),
        )
