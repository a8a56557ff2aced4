"""What an evaluation number was computed on, and refusing numbers that cannot mean anything.

A kNN vote or a linear probe over a bank (training set) of a single class answers that class for
every query: top-1 is the share of that class in the validation set, 100 % when it is the only
one, whatever the features. Such results are refused with a one-line
:class:`MeaninglessEvaluationError`:

* fewer than two classes in the bank;
* a validation class with no bank image (it can never be predicted);
* an empty bank or validation set;
* a kNN ``k`` larger than the bank (every query would vote with the whole bank).

Results that mean something but little are *flagged* (``flags`` in the results, a warning in
the log and in the printed lines):

* a validation set of fewer than :data:`TINY_VAL_SET` images (one image moves top-1 by
  ``100 / n`` points);
* validation images that are also bank images (the same file): a kNN query finds itself.

Every result records what it was computed on (:meth:`EvalBasis.record`): images and classes in
the bank and the validation set, and the *chance level*: the top-1 (top-5) accuracy of always
answering the most frequent validation class(es), the best any constant answer can score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["PERCENT_DECIMALS", "TINY_VAL_SET", "EvalBasis", "MeaninglessEvaluationError",
           "evaluation_basis", "percent"]

log = logging.getLogger("esvit.eval")

TINY_VAL_SET = 100  # validation sets smaller than this are flagged
PERCENT_DECIMALS = 4  # accuracies and chance levels: 1e-4 points, finer than 1 image in 10^6
_SHOWN = 5  # class names shown in a message


class MeaninglessEvaluationError(ValueError):
    """The evaluation cannot give a meaningful number (one-line message says why)."""


@dataclass
class EvalBasis:
    """What an evaluation was computed on.

    Attributes:
        protocol: ``"knn"`` or ``"linear"``.
        n_bank: Bank (kNN) / training (linear) images.
        n_val: Validation images.
        num_classes: Classes of the label space.
        bank_classes: Classes with at least one bank image.
        val_classes: Classes with at least one validation image.
        chance: ``{"top1": %, "top5": %}`` of always answering the most frequent validation
            class(es) (``top5`` with 5 or more classes).
        val_in_bank: Validation images that are also bank images (None: not checked).
        flags: Why the numbers deserve caution (empty when none).
    """

    protocol: str
    n_bank: int
    n_val: int
    num_classes: int
    bank_classes: int
    val_classes: int
    chance: dict[str, float]
    val_in_bank: int | None = None
    flags: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """JSON-able fields merged into the results."""
        return {"protocol": self.protocol, "n_bank": self.n_bank, "n_val": self.n_val,
                "num_classes": self.num_classes, "bank_classes": self.bank_classes,
                "val_classes": self.val_classes, "chance": dict(self.chance),
                "val_in_bank": self.val_in_bank, "flags": list(self.flags)}

    def describe(self, bank_word: str = "bank") -> str:
        """E.g. ``9 val images, bank 21 images, 3 classes; chance top-1 33.33%``."""
        classes = (f"{self.bank_classes} classes" if self.bank_classes == self.val_classes
                   else f"{self.bank_classes} {bank_word} / {self.val_classes} val classes")
        return (f"{self.n_val} val images, {bank_word} {self.n_bank} images, {classes}; "
                f"chance top-1 {self.chance['top1']:.2f}%")


def _counts(labels: torch.Tensor | np.ndarray | Sequence[int], num_classes: int) -> np.ndarray:
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(y.min())}")
    return np.bincount(y.reshape(-1), minlength=num_classes)


def _names(idx: Sequence[int], classes: Sequence[str] | None) -> str:
    shown = [classes[i] if classes is not None and i < len(classes) else str(i)
             for i in idx[:_SHOWN]]
    return ", ".join(shown) + (f" (+{len(idx) - _SHOWN} more)" if len(idx) > _SHOWN else "")


def percent(count: int | float, total: int) -> float:
    """``100 * count / total`` computed in float64 from exact counts and rounded to
    :data:`PERCENT_DECIMALS` decimals (``122 / 500`` -> ``24.4``, never ``24.400000274181366``);
    NaN when ``total`` is 0."""
    if total == 0:
        return float("nan")
    return round(100.0 * float(count) / int(total), PERCENT_DECIMALS)


def chance_levels(val_counts: np.ndarray) -> dict[str, float]:
    """Top-1 (and with 5+ classes top-5) accuracy in % of answering the most frequent classes."""
    n = int(val_counts.sum())
    if n == 0:
        return {"top1": 0.0}
    order = np.sort(val_counts)[::-1]
    out = {"top1": percent(int(order[0]), n)}
    if len(val_counts) >= 5:
        out["top5"] = percent(int(order[:5].sum()), n)
    return out


def _overlap(bank_paths: Sequence[str] | None, val_paths: Sequence[str] | None) -> int | None:
    if bank_paths is None or val_paths is None:
        return None
    val = set(val_paths)
    return sum(1 for p in bank_paths if p in val)


def evaluation_basis(
    protocol: str,
    bank_labels: torch.Tensor | np.ndarray | Sequence[int],
    val_labels: torch.Tensor | np.ndarray | Sequence[int],
    num_classes: int,
    classes: Sequence[str] | None = None,
    *,
    ks: Sequence[int] = (),
    bank_paths: Sequence[str] | None = None,
    val_paths: Sequence[str] | None = None,
    val_in_bank: int | None = None,
    bank_word: str = "bank",
    log_flags: bool = True,
) -> EvalBasis:
    """Check that an evaluation can mean something and describe what it is computed on.

    Args:
        protocol: ``"knn"`` or ``"linear"`` (recorded).
        bank_labels: Labels of the bank / training images, in ``[0, num_classes)``.
        val_labels: Labels of the validation images.
        num_classes: Size of the label space.
        classes: Class names (messages only).
        ks: kNN neighbour counts (each must not exceed the bank).
        bank_paths: Bank image paths, to count validation images that are also bank images.
        val_paths: Validation image paths.
        val_in_bank: The overlap when already known (instead of the paths).
        bank_word: What the bank is called in messages (``"bank"``, ``"training set"``).
        log_flags: Log every flag as a warning.

    Returns:
        :class:`EvalBasis`.

    Raises:
        MeaninglessEvaluationError: Empty sets, fewer than 2 bank classes, a validation class
            absent from the bank, or ``k`` larger than the bank.
    """
    num_classes = max(int(num_classes), 1)
    bank, val = _counts(bank_labels, num_classes), _counts(val_labels, num_classes)
    n_bank, n_val = int(bank.sum()), int(val.sum())
    if n_bank == 0:
        raise MeaninglessEvaluationError(f"the {bank_word} is empty: nothing to evaluate against")
    if n_val == 0:
        raise MeaninglessEvaluationError("the validation set is empty: nothing to evaluate")
    present = np.flatnonzero(bank)
    if len(present) < 2:
        only = int(present[0])
        share = 100.0 * val[only] / n_val
        raise MeaninglessEvaluationError(
            f"the {bank_word} holds {n_bank} images of a single class ({_names([only], classes)}): "
            f"every prediction is that class, so top-1 would be {share:.0f}% whatever the "
            "features; an evaluation needs at least 2 classes")
    missing = [int(c) for c in np.flatnonzero((val > 0) & (bank == 0))]
    if missing:
        raise MeaninglessEvaluationError(
            f"validation class(es) with no {bank_word} image: {_names(missing, classes)} "
            f"({int(val[missing].sum())} of {n_val} validation images): they can never be "
            f"predicted; add {bank_word} images of them or remove them from the validation set")
    too_big = [int(k) for k in ks if k > n_bank]
    if too_big:
        raise MeaninglessEvaluationError(
            f"k={too_big[0]} is larger than the {bank_word} ({n_bank} images): every query would "
            f"vote with the whole {bank_word}; use k <= {n_bank}")
    basis = EvalBasis(protocol, n_bank, n_val, num_classes, len(present),
                      int((val > 0).sum()), chance_levels(val),
                      _overlap(bank_paths, val_paths) if val_in_bank is None else val_in_bank)
    if n_val < TINY_VAL_SET:
        basis.flags.append(
            f"tiny validation set: {n_val} images (one image is {100.0 / n_val:.3g} points of "
            f"top-1; chance top-1 {basis.chance['top1']:.2f}%)")
    if basis.val_in_bank:
        basis.flags.append(
            f"{basis.val_in_bank} of {n_val} validation images are also {bank_word} images (same "
            f"file): the scores are inflated{' (a query finds itself)' if protocol == 'knn' else ''}")
    for flag in basis.flags if log_flags else ():
        log.warning("%s: %s", protocol, flag)
    return basis
