"""Flip correspondence of region features: the official EsViT ``analyze_models.py`` measure.

An image and its horizontally flipped copy (optionally colour-jittered and made grey, as in the
official ``accuracy_correspondence``) go through the frozen backbone. Every region token of the
image is matched to the flipped copy's token with the highest cosine similarity of the backbone's
region features (what the region loss matches). A match is correct when it lands on the mirrored
position: token ``(r, c)`` of a ``gh x gw`` grid corresponds to ``(r, gw - 1 - c)``.

Scores per image, then averaged over images:

* ``accuracy_all``: share of all tokens matched to their mirrored position;
* ``accuracy_topk``: the same among the ``top_k`` most similar pairs (the official number,
  ``top_k = 10``);
* ``distance_all`` / ``distance_topk``: mean Euclidean distance between the matched token and
  the mirrored position, in tokens (``*_px``: in input pixels, as the official code reports);
* ``similarity_topk``: mean cosine similarity of the ``top_k`` pairs.

Random weights are the baseline to compare with: a random ViT already scores well above chance
(``1 / n_tokens``) because patches of similar colour have similar features.

A grid of one token (every match "correct") is refused; fewer than :data:`TINY_IMAGE_SET`
images are flagged. The result records what it was computed on: ``images``, ``n_tokens``,
``grid``, ``chance`` and ``flags``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esvit.augment.color import color_jitter, rgb_to_grayscale
from esvit.backbones.registry import BackboneSpec
from esvit.wrapper import NetWrapper

__all__ = ["SCORE_KEYS", "flip_jitter", "flip_match_scores", "measure_correspondence", "square_grid"]

log = logging.getLogger("esvit.eval")

#: Per-image scores returned by :func:`flip_match_scores` (and averaged by
#: :func:`measure_correspondence`).
SCORE_KEYS = ("accuracy_all", "accuracy_topk", "distance_all", "distance_topk", "similarity_topk")

# The official second view: ``RandomHorizontalFlip(p=1)``, ``ColorJitter(0.4, 0.4, 0.2, 0.1)``
# with p 0.8, ``RandomGrayscale(p=1)``.
JITTER_P, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.8, 0.4, 0.4, 0.2, 0.1
TINY_IMAGE_SET = 10  # fewer scored images than this are flagged


def square_grid(n_tokens: int) -> tuple[int, int]:
    """Grid ``(g, g)`` of the ``n_tokens`` region tokens of a square input.

    Raises:
        ValueError: ``n_tokens`` is not a square number.
    """
    g = math.isqrt(n_tokens)
    if g * g != n_tokens:
        raise ValueError(f"{n_tokens} region tokens do not form a square grid for a square input")
    return g, g


@torch.no_grad()
def flip_match_scores(feat: Tensor, feat_flipped: Tensor, grid: tuple[int, int], top_k: int = 10
                      ) -> dict[str, Tensor]:
    """Score the matches of every token of an image to the tokens of its mirrored copy.

    Args:
        feat: Region features of the images ``(b, n, d)``, tokens in row-major grid order.
        feat_flipped: Region features of the flipped copies ``(b, n, d)``.
        grid: ``(gh, gw)`` with ``gh * gw == n``.
        top_k: Number of most similar pairs for the ``*_topk`` scores (clipped to ``n``).

    Returns:
        One ``(b,)`` float32 tensor per key of :data:`SCORE_KEYS`; distances in tokens.
    """
    if feat.shape != feat_flipped.shape or feat.ndim != 3:
        raise ValueError(f"expected two (b, n, d) feature tensors of one shape, got {tuple(feat.shape)} "
                         f"and {tuple(feat_flipped.shape)}")
    gh, gw = grid
    n = feat.shape[1]
    if gh * gw != n:
        raise ValueError(f"grid {grid} does not hold {n} tokens")
    sim = F.normalize(feat.float(), dim=-1) @ F.normalize(feat_flipped.float(), dim=-1).transpose(1, 2)
    best_sim, match = sim.max(dim=2)  # (b, n): best token of the flipped copy for every token
    rows = torch.arange(n, device=feat.device) // gw
    cols = torch.arange(n, device=feat.device) % gw
    dr = (match // gw - rows).float()
    dc = (match % gw - (gw - 1 - cols)).float()
    dist = torch.sqrt(dr * dr + dc * dc)  # (b, n), 0 where the match is the mirrored token
    k = min(top_k, n)
    top_sim, top = best_sim.topk(k, dim=1)
    top_dist = dist.gather(1, top)
    return {
        "accuracy_all": (dist == 0).float().mean(1),
        "accuracy_topk": (top_dist == 0).float().mean(1),
        "distance_all": dist.mean(1),
        "distance_topk": top_dist.mean(1),
        "similarity_topk": top_sim.mean(1),
    }


def flip_jitter(x: Tensor, jitter: bool, seeds: Sequence[int] = ()) -> Tensor:
    """The official second view: flip and, with ``jitter``, colour jitter (p 0.8) then grey.

    Args:
        x: Images ``(b, 3, h, w)`` in ``[0, 1]``.
        jitter: Apply ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` with probability 0.8 per image, then
            convert to (3-channel) grayscale, as ``analyze_models.py`` does.
        seeds: One seed per image for its jitter parameters (so an image gets the same jitter
            whatever batch it is in); required with ``jitter``.

    Returns:
        ``(b, 3, h, w)`` in ``[0, 1]``.
    """
    out = x.flip(-1)
    if not jitter:
        return out
    if len(seeds) != x.shape[0]:
        raise ValueError(f"jitter needs one seed per image: {x.shape[0]} images, {len(seeds)} seeds")
    u, order = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        u.append(torch.rand(5, generator=g))
        order.append(torch.rand(4, generator=g).argsort())
    p = torch.stack(u, dim=1).to(x.device)  # (5, b)
    out = color_jitter(
        out, brightness=1 - BRIGHTNESS + 2 * BRIGHTNESS * p[0], contrast=1 - CONTRAST + 2 * CONTRAST * p[1],
        saturation=1 - SATURATION + 2 * SATURATION * p[2], hue=HUE * (2 * p[3] - 1),
        order=torch.stack(order).to(x.device), apply=p[4] < JITTER_P,
    )
    return rgb_to_grayscale(out, 3)


def _resolve_backbone(
    backbone: Any, checkpoint_key: str, backbone_name: str | None, image_size: int | None
) -> tuple[nn.Module, BackboneSpec, int, str]:
    """``(net, spec, image size, source)`` from a checkpoint path or a ``(net, spec)`` pair."""
    if isinstance(backbone, (str, os.PathLike)):
        from esvit.export import load_backbone_info

        info = load_backbone_info(backbone, backbone_name, checkpoint_key)
        return info.net, info.spec, int(image_size or info.image_size or 224), str(backbone)
    if isinstance(backbone, tuple) and len(backbone) == 2 and isinstance(backbone[0], nn.Module):
        return backbone[0], backbone[1], int(image_size or 224), "<module>"
    raise TypeError(f"backbone must be a checkpoint path or a (net, spec) tuple, got {type(backbone).__name__}")


def _checked_grid(n_tokens: int) -> tuple[int, int]:
    """:func:`square_grid`, refusing a single token (every match would be correct)."""
    if n_tokens < 2:
        raise ValueError(f"the backbone gives {n_tokens} region token(s) at this image size: "
                         "every match would be correct (chance 100%); use a larger --image-size")
    return square_grid(n_tokens)


def _flags(images: int) -> list[str]:
    """Cautions about a result over ``images`` images (also logged)."""
    flags = []
    if images < TINY_IMAGE_SET:
        flags.append(f"tiny image set: the scores are means over {images} image(s)")
    for flag in flags:
        log.warning("correspondence: %s", flag)
    return flags


@torch.no_grad()
def measure_correspondence(
    backbone: Any,
    images: str | Path | Sequence[str | Path],
    *,
    image_size: int | None = None,
    jitter: bool = False,
    top_k: int = 10,
    seed: int = 0,
    max_images: int | None = None,
    checkpoint_key: str = "teacher",
    backbone_name: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    per_image: bool = False,
) -> dict[str, Any]:
    """Flip correspondence of a backbone's region features on a folder of images.

    Every image is decoded to an ``image_size`` square (short side scaled, centre crop).

    Args:
        backbone: Checkpoint / exported backbone path (any format :func:`esvit.load_backbone`
            reads) or a ``(net, spec)`` pair (e.g. ``build_backbone(name)`` for random weights).
        images: Image folder (recursive), list file, or a sequence of paths.
        image_size: Input side (default: the recorded training crop size, else 224).
        jitter: Colour-jitter and grey the flipped copy, as the official measure does.
        top_k: Pairs scored by ``accuracy_topk`` / ``distance_topk`` (official: 10).
        seed: Seed of the jitter parameters.
        max_images: Score only the first N images (sorted order).
        checkpoint_key: ``"teacher"`` or ``"student"`` for training checkpoints.
        backbone_name: Registry name, for bare state dicts.
        batch_size: Images per forward pass.
        num_workers: Decoding workers.
        device: ``"auto"``/None (CUDA when available), ``"cpu"``, ...
        per_image: Also return every image's scores under ``"per_image"``.

    Returns:
        JSON-able dict: the mean of every :data:`SCORE_KEYS` score over the images,
        ``distance_all_px`` / ``distance_topk_px``, ``protocol``, ``chance`` (``1 / n_tokens``),
        ``grid``, ``n_tokens``, ``images`` (scored), ``skipped`` (unreadable files), ``flags``
        and the settings.

    Raises:
        ValueError: No readable image, a grid of a single token (nothing to match), or
            non-finite features.
    """
    from esvit.embed import _ImageList, _list_inputs
    from esvit.eval.features import make_loader, normalize, resolve_device

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    net, spec, size, source = _resolve_backbone(backbone, checkpoint_key, backbone_name, image_size)
    dev = resolve_device(device)
    wrapper = NetWrapper.from_spec(net, spec).eval().to(dev)
    paths, _, where = _list_inputs(images)
    if max_images is not None:
        paths = paths[:max_images]
    if not paths:
        raise ValueError(f"no images in {where}")
    sums: dict[str, float] = dict.fromkeys(SCORE_KEYS, 0.0)
    rows: list[dict[str, Any]] = []
    grid: tuple[int, int] | None = None
    count, skipped = 0, []
    loader = make_loader(_ImageList(paths, size), batch_size, num_workers,
                         what="correspondence images")
    for images_u8, ok, idx, _ in loader:
        skipped += [paths[i] for i in idx[~ok].tolist()]
        if not ok.any():
            continue
        x = images_u8[ok].to(dev).float().div_(255)
        _, feat = wrapper(normalize(x))
        seeds = [seed * 1_000_003 + i for i in idx[ok].tolist()]
        _, feat_f = wrapper(normalize(flip_jitter(x, jitter, seeds)))
        if grid is None:
            grid = _checked_grid(feat.shape[1])
        scores = flip_match_scores(feat, feat_f, grid, top_k)
        for key in SCORE_KEYS:
            sums[key] += float(scores[key].sum())
        if per_image:
            for j, i in enumerate(idx[ok].tolist()):
                rows.append({"path": paths[i], **{key: float(scores[key][j]) for key in SCORE_KEYS}})
        count += int(ok.sum())
    if count == 0:
        raise ValueError(f"none of the {len(paths)} images in {where} could be read (first: {skipped[0]})")
    if skipped:
        log.warning("correspondence: skipped %d unreadable image(s): %s", len(skipped), ", ".join(skipped[:5]))
    assert grid is not None
    stride = size / grid[1]
    out: dict[str, Any] = {key: sums[key] / count for key in SCORE_KEYS}
    out.update(
        distance_all_px=out["distance_all"] * stride, distance_topk_px=out["distance_topk"] * stride,
        protocol="flip correspondence", chance=1.0 / (grid[0] * grid[1]), grid=list(grid),
        n_tokens=grid[0] * grid[1], images=count, skipped=len(skipped), flags=_flags(count),
        settings={"backbone": source, "name": spec.name, "images": where, "image_size": size, "jitter": jitter,
                  "top_k": min(top_k, grid[0] * grid[1]), "seed": seed, "checkpoint_key": checkpoint_key},
    )
    if per_image:
        out["per_image"] = rows
    if math.isnan(out["accuracy_all"]):
        raise ValueError("correspondence scores are NaN: the backbone's features are not finite")
    return out
