"""Users' own ``kornia.augmentation`` ops, appended to the global and/or local views.

The built-in multi-crop pipeline (:mod:`esvit.augment.multicrop`) is batched by hand because
that is 2-4x faster than kornia's generic ops. Anything else a user wants per view (for example
``RandomErasing``, ``RandomAffine``, ``RandomPerspective``) comes from kornia, configured by
name (``augment.extra_global`` / ``augment.extra_local``: ``[{op: RandomErasing, p: 0.25}]``),
and runs on the training device on ``[0, 1]`` images after the built-in colour ops and before
normalisation, with per-sample parameters.

Seeded and resumable like the rest: each view's ops are driven by one seed drawn from the
augmentation's own generator (saved in checkpoints), under a forked CPU RNG, so the global torch
RNG is neither used nor disturbed. Rank-count invariant: parameters are drawn for the global batch
and each rank applies its rows (kornia's ``forward_parameters`` + ``forward(params=...)``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ExtraOps", "build_kornia_op"]


def _kornia_augmentation() -> Any:
    import kornia.augmentation as K

    return K


def build_kornia_op(spec: Mapping[str, Any], where: str = "augment.extra") -> nn.Module:
    """Build one ``kornia.augmentation`` 2-D op from ``{"op": name, **kwargs}``.

    Raises:
        ValueError: a missing / unknown op name (with the closest names), an op that is not a
            per-image 2-D augmentation, or arguments kornia refuses (one line naming ``where``).
    """
    K = _kornia_augmentation()
    from kornia.augmentation._2d.base import AugmentationBase2D

    if not isinstance(spec, Mapping) or "op" not in spec:
        raise ValueError(f"{where}: each entry needs an 'op' (a kornia.augmentation name), got {spec!r}")
    name, kwargs = spec["op"], {k: v for k, v in spec.items() if k != "op"}
    cls = getattr(K, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, AugmentationBase2D)):
        names = [n for n in dir(K) if isinstance(getattr(K, n), type) and issubclass(getattr(K, n), AugmentationBase2D)]
        close = difflib.get_close_matches(str(name), names, n=3)
        raise ValueError(f"{where}: {name!r} is not a kornia.augmentation 2-D op"
                         + (f"; closest: {', '.join(close)}" if close else ""))
    p = kwargs.get("p", 0.5)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{where}: {name} p must be a probability in [0, 1], got {p!r}")
    try:
        return cls(**kwargs)
    except Exception as e:  # kornia raises TypeError / ValueError / AssertionError for bad args
        raise ValueError(f"{where}: {name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _rows(params: dict[str, Tensor], lo: int, hi: int, n: int, shape: torch.Size) -> dict[str, Tensor]:
    """Rows ``lo:hi`` of per-sample kornia parameters drawn for a batch of ``n``."""
    out = {}
    for k, v in params.items():
        if k == "forward_input_shape":
            out[k] = torch.tensor(tuple(shape))
        elif isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
            out[k] = v[lo:hi]
        else:
            out[k] = v
    return out


class ExtraOps(nn.Module):
    """Kornia ops for the global views and for the local views.

    Args:
        global_ops: Op specs (``{"op": name, **kwargs}``) applied to both global views.
        local_ops: Op specs applied to every local view.
    """

    def __init__(self, global_ops: Sequence[Mapping[str, Any]] = (),
                 local_ops: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__()
        self.global_ops = nn.ModuleList(build_kornia_op(s, "augment.extra_global") for s in global_ops)
        self.local_ops = nn.ModuleList(build_kornia_op(s, "augment.extra_local") for s in local_ops)

    def __bool__(self) -> bool:
        return bool(len(self.global_ops) or len(self.local_ops))

    @property
    def geometric(self) -> bool:
        """True when an op moves pixels (then crop boxes no longer say where a token lies)."""
        from kornia.augmentation._2d.intensity.base import IntensityAugmentationBase2D

        return any(not isinstance(op, IntensityAugmentationBase2D) for op in (*self.global_ops, *self.local_ops))

    def apply(self, x: Tensor, kind: str, seed: int, row_offset: int = 0, global_batch: int | None = None
              ) -> Tensor:
        """Apply the ops of ``kind``'s views to ``x``.

        Args:
            x: ``(b, 3, s, s)`` float images in ``[0, 1]`` (one view of this rank's samples).
            kind: ``"global1"``, ``"global2"`` or ``"local"``.
            seed: The view's seed (drawn from the augmentation's generator).
            row_offset: This rank's first row in the global batch.
            global_batch: Samples in the global batch (None: ``b``).

        Returns:
            ``(b, 3, s, s)`` augmented images.
        """
        ops = self.local_ops if kind == "local" else self.global_ops
        if not len(ops):
            return x
        n = global_batch or x.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for op in ops:
                params = op.forward_parameters(torch.Size((n, *x.shape[1:])))
                x = op(x, params=_rows(params, row_offset, row_offset + x.shape[0], n, x.shape))
        return x.clamp_(0.0, 1.0)
