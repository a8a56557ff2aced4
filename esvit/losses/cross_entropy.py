"""Memory-lean soft-target cross-entropy shared by the view and region losses.

With ``K = 65536`` prototypes a batch of a few thousand student rows makes ``(N, K)`` tensors of
hundreds of megabytes. Written with plain ops, ``log_softmax``, the temperature division, the
target gather and the product each read and write such a tensor (and the fresh allocations
page-fault on the CPU). Here every pass runs over a block of rows that stays in cache, the
teacher target of a student row is looked up by index instead of being materialised per pair,
and the backward pass writes the gradient once:

    L = sum_r sum_p w[r, p] * CE(Q[j(r, p)], log_softmax(S[r] / tau))
      = sum_r ( W_r * lse_r - sum_p w[r, p] <Q[j(r, p)], S[r]> / tau ),   W_r = sum_p w[r, p]
    dL/dS[r] = ( W_r * softmax(S[r] / tau) - sum_p w[r, p] Q[j(r, p)] ) / tau

(``sum_k Q[j, k] = 1``; ``lse_r = logsumexp(S[r] / tau)``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

# Elements per block of rows: ~4 MB of float32 stays in a CPU core's cache. On a GPU blocks are
# larger (fewer kernel launches) but bounded: the scratch buffers are ~5 blocks, 1.3 GB at 2^26
# elements, where a dense-region batch (e.g. 40k tokens x 65536) would need ~10 GB per temporary.
_CPU_BLOCK_ELEMENTS = 1 << 20
_GPU_BLOCK_ELEMENTS = 1 << 26


def _block_rows(x: Tensor) -> int:
    elements = _GPU_BLOCK_ELEMENTS if x.device.type != "cpu" else _CPU_BLOCK_ELEMENTS
    return max(1, elements // max(1, x.shape[-1]))


def _float32(x: Tensor) -> torch.autocast:
    """Autocast off: the blocks are float32 by construction and ``out=`` buffers are float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class _Scratch:
    """Float32 scratch blocks of ``rows x K`` reused for every row block of one call.

    Fresh multi-megabyte temporaries per block would be handed back to the OS by the allocator
    and page-faulted in again on the next block, which costs more than the arithmetic.
    """

    def __init__(self, rows: int, cols: int, device: torch.device) -> None:
        self.rows, self.cols, self.device = rows, cols, device
        self._buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, n: int, pairs: int = 1) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None:
            buf = torch.empty(self.rows * pairs, self.cols, dtype=torch.float32, device=self.device)
            self._buffers[name] = buf
        return buf[: n * pairs]


def _scaled_blocks(
    x: Tensor, temp: float, center: Tensor | None = None
) -> Iterator[tuple[slice, Tensor, _Scratch]]:
    """Row blocks of ``(x - center) / temp`` as float32 scratch (call under :func:`_float32`).

    Yields:
        The block's row slice, its scaled logits ``(rows, K)`` and the scratch buffers of the
        call (reused by every block).
    """
    step = _block_rows(x)
    scratch = _Scratch(step, x.shape[1], x.device)
    c = center.detach().float().reshape(1, -1) if center is not None else None
    for r in range(0, x.shape[0], step):
        rows = slice(r, min(r + step, x.shape[0]))
        block = scratch("logits", rows.stop - r).copy_(x[rows])
        if c is not None:
            block.sub_(c)
        yield rows, block.div_(temp), scratch


def teacher_probs(teacher_output: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Centred, sharpened teacher distribution ``softmax((t - c) / tau_t)`` in float32.

    Args:
        teacher_output: Tensor of shape ``(..., K)``.
        center: Tensor broadcastable to one row, usually ``(1, K)``.
        teacher_temp: Teacher temperature ``tau_t``.

    Returns:
        Probabilities of shape ``(..., K)``, detached.
    """
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be positive, got {teacher_temp}")
    t = teacher_output.detach()
    flat = t.reshape(-1, t.shape[-1])
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    with torch.no_grad(), _float32(flat):
        for rows, block, _ in _scaled_blocks(flat, teacher_temp, center):
            torch.softmax(block, dim=-1, out=out[rows])
    return out.reshape(t.shape)


@torch.no_grad()
def softmax_entropy(logits: Tensor, temp: float, center: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Entropy and mean of ``softmax((logits - center) / temp)`` without ``(N, K)`` temporaries.

    Args:
        logits: ``(..., K)``.
        temp: Temperature.
        center: Optional centre broadcastable to one row.

    Returns:
        Per-row entropy in nats ``(N,)`` (rows flattened) and the mean distribution ``(K,)``,
        both float32.
    """
    flat = logits.detach().reshape(-1, logits.shape[-1])
    entropy = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    mean = torch.zeros(flat.shape[1], dtype=torch.float32, device=flat.device)
    with _float32(flat):
        for rows, x, scratch in _scaled_blocks(flat, temp, center):
            log_p = torch.log_softmax(x, dim=-1, out=scratch("log_p", len(x)))
            p = torch.exp(log_p, out=scratch("probs", len(x)))
            entropy[rows] = torch.linalg.vecdot(p, log_p).neg_()
            mean += p.sum(0)
    return entropy, mean / max(1, flat.shape[0])


def _targets(probs: Tensor, index: Tensor, weight: Tensor, scratch: _Scratch) -> Tensor:
    """``sum_p weight[r, p] * probs[index[r, p]]`` for a block of rows: ``(rows, K)``."""
    rows, pairs = index.shape
    picked = torch.index_select(probs, 0, index.reshape(-1), out=scratch("picked", rows, pairs))
    out = scratch("target", rows)
    torch.bmm(weight.unsqueeze(1), picked.view(rows, pairs, -1), out=out.view(rows, 1, -1))
    return out


class _PairedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, student: Tensor, probs: Tensor, index: Tensor, weight: Tensor, student_temp: float
    ) -> Tensor:
        dots = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        with _float32(student):
            for rows, s, scratch in _scaled_blocks(student, student_temp):
                log_p = torch.log_softmax(s, dim=-1, out=scratch("log_p", len(s)))
                tgt = _targets(probs, index[rows], weight[rows], scratch)
                torch.linalg.vecdot(tgt, log_p, out=dots[rows])
        ctx.save_for_backward(student, probs, index, weight)
        ctx.student_temp = student_temp
        return -dots.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        student, probs, index, weight = ctx.saved_tensors
        scale = grad_out.float() / ctx.student_temp
        grad = torch.empty_like(student)
        with _float32(student):
            for rows, s, scratch in _scaled_blocks(student, ctx.student_temp):
                w = weight[rows]
                p = torch.softmax(s, dim=-1, out=scratch("probs", len(s)))
                # (W_r * softmax - sum_p w_p Q[j_p]) * g / tau, written straight into the gradient
                neg_tgt = _targets(probs, index[rows], w * -scale, scratch)
                if grad.dtype == torch.float32:
                    torch.addcmul(neg_tgt, p, w.sum(-1, keepdim=True) * scale, out=grad[rows])
                else:
                    grad[rows] = neg_tgt.addcmul_(p, w.sum(-1, keepdim=True) * scale)
        return grad, None, None, None, None


def paired_cross_entropy(
    student_logits: Tensor, probs: Tensor, index: Tensor, weight: Tensor, student_temp: float
) -> Tensor:
    """Weighted sum of cross-entropies between teacher rows and student rows.

    ``sum_r sum_p weight[r, p] * -<probs[index[r, p]], log_softmax(student_logits[r] / tau_s)>``,
    computed block by block (see the module docstring); the gradient flows to
    ``student_logits`` only.

    Args:
        student_logits: Student outputs ``(N, K)``, any float dtype (computed in float32).
        probs: Teacher distributions ``(M, K)`` (rows sum to 1), float32.
        index: Long tensor ``(N, P)``: the teacher rows each student row is compared with.
        weight: Float tensor ``(N, P)``: the weight of each pair (0 drops it).
        student_temp: Student temperature ``tau_s``.

    Returns:
        Scalar float32 loss.
    """
    if student_logits.ndim != 2 or probs.ndim != 2 or student_logits.shape[1] != probs.shape[1]:
        raise ValueError(
            f"expected student (N, K) and teacher (M, K) rows, got {tuple(student_logits.shape)} and "
            f"{tuple(probs.shape)}"
        )
    if index.shape != weight.shape or index.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"index {tuple(index.shape)} and weight {tuple(weight.shape)} must both be (N={student_logits.shape[0]}, P)"
        )
    return _PairedCrossEntropy.apply(
        student_logits, probs.detach().float(), index, weight.detach().float(), float(student_temp)
    )

