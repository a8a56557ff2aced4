"""Collapse and matching metrics of the view and region branches, pure functions of tensors.

:class:`esvit.trainer.EsViTTrainer` reports them every step, :mod:`esvit.train.collapse` warns
about them, and the benchmarks score final backbones with them (``docs/region.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from esvit.augment.geometry import token_correspondence
from esvit.augment.multicrop import ViewParams
from esvit.losses.cross_entropy import softmax_entropy
from esvit.losses.region import match_regions, match_share

__all__ = ["MATCH_MIN_TOKENS", "entropy_and_kl", "global_view_matching", "token_similarity"]

#: Matching metrics need grids of at least this many tokens (on a 2x2 grid half the tokens
#: share a match by chance).
MATCH_MIN_TOKENS = 9


@torch.no_grad()
def token_similarity(tokens: Tensor) -> Tensor:
    """Mean cosine similarity of all pairs of backbone tokens of a batch ``(b, n, d)``.

    ``|mean of the L2-normalised tokens|^2`` (self-pairs included, negligible for many tokens):
    about 0.1 for a random ViT, near 1 when the backbone maps every token of every image to one
    vector (its features have collapsed, whatever the heads still output).
    """
    z = F.normalize(tokens.detach().float().reshape(-1, tokens.shape[-1]), dim=-1)
    return z.mean(0).square().sum()


@torch.no_grad()
def entropy_and_kl(logits: Tensor, temp: float, center: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean entropy of ``softmax((logits - center) / temp)`` over rows ``(..., K)`` and the KL
    divergence of the rows' mean distribution to uniform (near ``log K`` when one prototype wins
    everywhere, near 0 when the mean is uniform)."""
    ent, mean_p = softmax_entropy(logits, temp, center)
    kl_uniform = (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum() + math.log(mean_p.shape[-1])
    return ent.mean(), kl_uniform


@torch.no_grad()
def global_view_matching(student_feat: Sequence[Tensor], teacher_feat: Sequence[Tensor],
                         params: Sequence[ViewParams] | None = None) -> dict[str, Tensor]:
    """Match each global view's tokens into the other global view as the region loss does.

    Args:
        student_feat: Backbone region tokens of the two global views ``(b, n, d)`` (student).
        teacher_feat: The same views' tokens from the teacher (or the same backbone).
        params: The two views' augmentation parameters (crop boxes, flips), for the accuracy.

    Returns:
        ``region_match_share``: the share of a view's tokens matched to its single most matched
        token (mean over images and both directions; near ``1 / n`` when spread out, 1 for a
        hub). With ``params`` and a square grid, ``region_match_accuracy``: the share of matches
        on the token under the same image point (:func:`~esvit.augment.geometry.token_correspondence`;
        tokens outside the other view do not count). Empty for grids under
        :data:`MATCH_MIN_TOKENS` tokens.
    """
    n = teacher_feat[0].shape[1]
    if n < MATCH_MIN_TOKENS:
        return {}
    g = math.isqrt(n)
    shares, hits, inside = [], [], []
    for v in (0, 1):
        matches = match_regions(student_feat[v], teacher_feat[1 - v])
        shares.append(match_share(matches, n))
        if params is not None and g * g == n:
            b = matches.shape[0]
            p, q = params[v], params[1 - v]
            geo, ok = token_correspondence(p.boxes[:b], p.flip[:b], g, q.boxes[:b], q.flip[:b], g)
            ok = ok.to(matches.device)
            hits.append(((matches == geo.to(matches.device)) & ok).sum())
            inside.append(ok.sum())
    out = {"region_match_share": torch.cat(shares).mean()}
    if inside:
        out["region_match_accuracy"] = sum(hits) / sum(inside).clamp_min(1)
    return out
