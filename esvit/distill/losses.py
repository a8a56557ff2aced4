"""Logit distillation losses: Hinton KD, DKD, DIST and the two DeiT objectives.

Every loss is a pure function of ``(student logits, teacher logits, labels)`` plus
hyper-parameters, also available as an ``nn.Module`` holding those hyper-parameters. They
return a dict of scalar tensors: ``"loss"`` (what to back-propagate) and its unweighted
components (for logging). Teacher logits are always detached: no gradient ever reaches the
teacher. Half-precision logits are upcast to float32; float64 stays float64.

Notation: ``z_s`` student logits ``(b, C)``, ``z_t`` teacher logits ``(b, C)``, ``y`` labels
``(b,)`` int64, ``CE`` mean cross-entropy, ``KL(p || q)`` summed over classes and averaged over
the batch ("batchmean").

* Hinton et al. 2015 (KD): ``alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(p_t || p_s)`` with
  ``p = softmax(z / T)``.
* Zhao et al. 2022 (DKD): ``ce_weight * CE + alpha * TCKD + beta * NCKD``. TCKD is the binary KL
  between ``[p_target, 1 - p_target]`` of teacher and student; NCKD the KL between the
  distributions over the non-target classes (target logit removed, renormalised); both on
  ``softmax(z / T)`` and scaled by ``T^2``.
* Huang et al. 2022 (DIST): ``ce_weight * CE + tau^2 * (beta * inter + gamma * intra)`` with
  ``inter = 1 - mean_i pearson(p_s[i, :], p_t[i, :])`` (per sample, over classes) and
  ``intra = 1 - mean_c pearson(p_s[:, c], p_t[:, c])`` (per class, over the batch),
  ``p = softmax(z / tau)``.
* Touvron et al. 2021 (DeiT), class-token logits ``z_cls`` and distillation-token logits
  ``z_dist``: soft ``(1 - alpha) * CE(z_cls, y) + alpha * tau^2 * KL(softmax(z_t / tau) ||
  softmax(z_dist / tau))``; hard ``(1 - alpha) * CE(z_cls, y) + alpha * CE(z_dist, argmax z_t)``
  (the paper's hard distillation is ``alpha = 0.5``). The official DeiT code divides the soft KL
  by ``b * C`` instead of ``b``; here it is the batch mean, as in the paper's formula (scale
  ``alpha`` to match the official weighting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEIT_KINDS",
    "DISTLoss",
    "DKDLoss",
    "DeiTDistillationLoss",
    "KDLoss",
    "LabelLoss",
    "deit_loss",
    "dist_loss",
    "dkd_loss",
    "kd_loss",
    "pearson_rows",
    "soft_kl",
]

DEIT_KINDS = ("soft", "hard")


def _up(x: Tensor) -> Tensor:
    """Upcast half / bfloat16 to float32 (float32 / float64 unchanged)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check(student: Tensor, teacher: Tensor | None, target: Tensor | None) -> None:
    if student.ndim != 2:
        raise ValueError(f"student logits must have shape (b, C), got {tuple(student.shape)}")
    if teacher is not None and teacher.shape != student.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits "
                         f"{tuple(student.shape)} must have the same shape (b, C)")
    if target is not None and (target.ndim != 1 or target.shape[0] != student.shape[0]):
        raise ValueError(f"labels must have shape ({student.shape[0]},), got {tuple(target.shape)}")


def _ce(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    return F.cross_entropy(_up(logits), target, label_smoothing=label_smoothing)


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(z_t / T) || softmax(z_s / T))``, summed over classes, mean over the batch.

    Args:
        student_logits: ``(b, C)``.
        teacher_logits: ``(b, C)`` (detached here).
        temperature: ``T > 0``.

    Returns:
        Scalar tensor (not multiplied by ``T^2``).
    """
    _check(student_logits, teacher_logits, None)
    log_p_s = F.log_softmax(_up(student_logits) / temperature, dim=1)
    log_p_t = F.log_softmax(_up(teacher_logits.detach()) / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t.to(log_p_s.dtype), reduction="batchmean", log_target=True)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 0.5,
    temperature: float = 4.0, label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """Hinton KD: ``alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(p_t || p_s)``.

    Args:
        student_logits: ``(b, C)``.
        teacher_logits: ``(b, C)``.
        target: ``(b,)`` labels.
        alpha: Weight of the label cross-entropy, in [0, 1].
        temperature: Softmax temperature ``T``.
        label_smoothing: Label smoothing of the cross-entropy.

    Returns:
        ``{"loss", "ce", "kd"}`` with ``kd = T^2 * KL``.
    """
    _check(student_logits, teacher_logits, target)
    ce = _ce(student_logits, target, label_smoothing)
    kd = temperature ** 2 * soft_kl(student_logits, teacher_logits, temperature)
    return {"loss": alpha * ce + (1.0 - alpha) * kd, "ce": ce.detach(), "kd": kd.detach()}


def dkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
    beta: float = 8.0, temperature: float = 4.0, ce_weight: float = 1.0, kd_scale: float = 1.0,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """Decoupled KD: ``ce_weight * CE + kd_scale * (alpha * TCKD + beta * NCKD)``.

    TCKD and NCKD are computed in log space (``log(1 - p_target)`` as a log-sum-exp over the
    non-target logits), so extreme logits do not produce ``log(0)``.

    Args:
        student_logits: ``(b, C)``, ``C >= 2``.
        teacher_logits: ``(b, C)``.
        target: ``(b,)`` labels.
        alpha: TCKD weight.
        beta: NCKD weight.
        temperature: ``T``; both terms are multiplied by ``T^2``.
        ce_weight: Weight of the label cross-entropy.
        kd_scale: Extra factor on the distillation terms (DKD's warm-up ramp, in [0, 1]).
        label_smoothing: Label smoothing of the cross-entropy.

    Returns:
        ``{"loss", "ce", "tckd", "nckd"}``.
    """
    _check(student_logits, teacher_logits, target)
    b, c = student_logits.shape
    if c < 2:
        raise ValueError(f"DKD needs at least 2 classes, got {c}")
    ce = _ce(student_logits, target, label_smoothing)
    s = _up(student_logits) / temperature
    t = _up(teacher_logits.detach()).to(s.dtype) / temperature
    gt = F.one_hot(target, c).bool()

    def target_and_rest(z: Tensor) -> tuple[Tensor, Tensor]:
        """log p_target ``(b,)`` and log(1 - p_target) ``(b,)``."""
        lse = torch.logsumexp(z, dim=1)
        log_pt = z.gather(1, target[:, None]).squeeze(1) - lse
        log_rest = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1) - lse
        return log_pt, log_rest

    ls_t, lr_t = target_and_rest(t)
    ls_s, lr_s = target_and_rest(s)
    tckd = (ls_t.exp() * (ls_t - ls_s) + lr_t.exp() * (lr_t - lr_s)).mean() * temperature ** 2
    rest = ~gt
    s_nt = s[rest].view(b, c - 1)
    t_nt = t[rest].view(b, c - 1)
    nckd = F.kl_div(F.log_softmax(s_nt, dim=1), F.log_softmax(t_nt, dim=1), reduction="batchmean",
                    log_target=True) * temperature ** 2
    loss = ce_weight * ce + kd_scale * (alpha * tckd + beta * nckd)
    return {"loss": loss, "ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``.

    Args:
        a, b: ``(n, m)``.
        eps: Added to the product of norms (DIST's official value).

    Returns:
        ``(n,)`` correlations.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, beta: float = 1.0,
    gamma: float = 1.0, tau: float = 1.0, ce_weight: float = 1.0, label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """DIST: ``ce_weight * CE + tau^2 * (beta * inter + gamma * intra)``.

    Args:
        student_logits: ``(b, C)``.
        teacher_logits: ``(b, C)``.
        target: ``(b,)`` labels (for the cross-entropy term).
        beta: Inter-class relation weight.
        gamma: Intra-class relation weight.
        tau: Softmax temperature.
        ce_weight: Weight of the label cross-entropy.
        label_smoothing: Label smoothing of the cross-entropy.

    Returns:
        ``{"loss", "ce", "inter", "intra"}`` (``inter`` / ``intra`` without ``tau^2``).
    """
    _check(student_logits, teacher_logits, target)
    ce = _ce(student_logits, target, label_smoothing)
    p_s = F.softmax(_up(student_logits) / tau, dim=1)
    p_t = F.softmax(_up(teacher_logits.detach()) / tau, dim=1).to(p_s.dtype)
    inter = 1.0 - pearson_rows(p_s, p_t).mean()
    intra = 1.0 - pearson_rows(p_s.t(), p_t.t()).mean()
    loss = ce_weight * ce + tau ** 2 * (beta * inter + gamma * intra)
    return {"loss": loss, "ce": ce.detach(), "inter": inter.detach(), "intra": intra.detach()}


def deit_loss(
    cls_logits: Tensor, dist_logits: Tensor, teacher_logits: Tensor, target: Tensor,
    kind: str = "hard", alpha: float = 0.5, tau: float = 1.0, label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """DeiT objective on the class-token and distillation-token logits.

    Args:
        cls_logits: ``(b, C)`` class-token head.
        dist_logits: ``(b, C)`` distillation-token head.
        teacher_logits: ``(b, C)``.
        target: ``(b,)`` labels.
        kind: ``"soft"`` (KL to the teacher's softened distribution, times ``tau^2``) or
            ``"hard"`` (cross-entropy to the teacher's argmax).
        alpha: Distillation weight ``lambda`` (``1 - alpha`` on the label cross-entropy).
        tau: Soft-distillation temperature.
        label_smoothing: Label smoothing of the class-token cross-entropy.

    Returns:
        ``{"loss", "ce", "distill"}``.
    """
    if kind not in DEIT_KINDS:
        raise ValueError(f"kind must be one of {DEIT_KINDS}, got {kind!r}")
    _check(cls_logits, teacher_logits, target)
    _check(dist_logits, teacher_logits, target)
    ce = _ce(cls_logits, target, label_smoothing)
    if kind == "soft":
        distill = tau ** 2 * soft_kl(dist_logits, teacher_logits, tau)
    else:
        distill = F.cross_entropy(_up(dist_logits), teacher_logits.detach().argmax(dim=1))
    loss = (1.0 - alpha) * ce + alpha * distill
    return {"loss": loss, "ce": ce.detach(), "distill": distill.detach()}


# ------------------------------------------------------------------------------------- modules


class LabelLoss(nn.Module):
    """Plain cross-entropy on labels (the no-teacher baseline); ignores teacher logits.

    Args:
        label_smoothing: Label smoothing.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor) -> dict[str, Tensor]:
        """Returns ``{"loss", "ce"}``."""
        _check(student_logits, None, target)
        ce = _ce(student_logits, target, self.label_smoothing)
        return {"loss": ce, "ce": ce.detach()}


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss` (``alpha`` weights the label cross-entropy)."""

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Args: logits ``(b, C)``, labels ``(b,)``. Returns ``{"loss", "ce", "kd"}``."""
        return kd_loss(student_logits, teacher_logits, target, self.alpha, self.temperature,
                       self.label_smoothing)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}"


class DKDLoss(nn.Module):
    """Module form of :func:`dkd_loss` (defaults: the DKD paper's CIFAR-100 setting)."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 ce_weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.label_smoothing = ce_weight, label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                kd_scale: float = 1.0) -> dict[str, Tensor]:
        """Args: logits ``(b, C)``, labels ``(b,)``, warm-up factor. Returns ``{"loss", "ce", "tckd", "nckd"}``."""
        return dkd_loss(student_logits, teacher_logits, target, self.alpha, self.beta,
                        self.temperature, self.ce_weight, kd_scale, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


class DISTLoss(nn.Module):
    """Module form of :func:`dist_loss` (defaults: the DIST paper's ``beta = gamma = tau = 1``)."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.beta, self.gamma, self.tau = beta, gamma, tau
        self.ce_weight, self.label_smoothing = ce_weight, label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Args: logits ``(b, C)``, labels ``(b,)``. Returns ``{"loss", "ce", "inter", "intra"}``."""
        return dist_loss(student_logits, teacher_logits, target, self.beta, self.gamma, self.tau,
                         self.ce_weight, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}"


class DeiTDistillationLoss(nn.Module):
    """Module form of :func:`deit_loss`; ``forward`` takes the student's ``(cls, dist)`` pair."""

    def __init__(self, kind: str = "hard", alpha: float = 0.5, tau: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if kind not in DEIT_KINDS:
            raise ValueError(f"kind must be one of {DEIT_KINDS}, got {kind!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.kind, self.alpha, self.tau, self.label_smoothing = kind, alpha, tau, label_smoothing

    def forward(self, student_out: tuple[Tensor, Tensor], teacher_logits: Tensor,
                target: Tensor) -> dict[str, Tensor]:
        """Args: ``(cls (b, C), dist (b, C))``, teacher ``(b, C)``, labels ``(b,)``."""
        if not (isinstance(student_out, (tuple, list)) and len(student_out) == 2):
            raise TypeError("DeiT distillation needs the student's (cls_logits, dist_logits) pair: "
                            "use a DeiT student (student.deit=true) in training mode")
        cls_logits, dist_logits = student_out
        return deit_loss(cls_logits, dist_logits, teacher_logits, target, self.kind, self.alpha,
                         self.tau, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, alpha={self.alpha}, tau={self.tau}"
