"""Correspondence picture: two views side by side, a line from each region of the first view to
its best match in the second (the official ``analyze_models.py --vis_correspondence``).

A region's best match is the region of the other view with the highest cosine similarity of the
backbone's region features, found by :func:`esvit.losses.region.match_regions`, exactly as the
region loss matches student to teacher tokens. Lines are ranked strongest first (highest cosine).

The second view is, by default, the official measure's: the image flipped and, with ``jitter``,
colour-jittered then made grey (:func:`esvit.eval.correspondence.flip_jitter`). The correct
match of region ``(r, c)`` is then the mirrored ``(r, gw - 1 - c)``, and the picture says how
many matches land there (:func:`esvit.eval.correspondence.flip_match_scores`). With a second
image there is no ground truth: the lines show what the backbone thinks corresponds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from esvit.viz.inputs import load_model, load_views

__all__ = [
    "Correspondence",
    "compute_correspondence",
    "draw_correspondence",
    "match_views",
    "mirror_index",
    "plot_correspondence",
    "token_centers",
]

MARGIN = 0.06  # gap between the two views, as a share of the image side
NUMBERED = 10  # the strongest matches are numbered at both ends


@dataclass
class Correspondence:
    """Best matches of the regions of view 1 in view 2.

    Attributes:
        views: ``(2, 3, s, s)`` the two views as fed (float in ``[0, 1]``).
        grid: ``(gh, gw)`` region tokens of each view.
        match: ``(n,)`` long: region of view 2 matched to every region of view 1.
        similarity: ``(n,)`` cosine similarity of each match.
        order: ``(n,)`` regions of view 1, strongest match first.
        flipped: View 2 is the mirrored (and maybe recoloured) view 1.
        scores: With ``flipped``: ``accuracy_all`` (share of matches on the mirrored region),
            ``accuracy_topk`` (among the 10 strongest), ``distance_all`` (tokens) and ``chance``.
        backbone: Registry name.
        png: The picture, once written.
    """

    views: Tensor
    grid: tuple[int, int]
    match: Tensor
    similarity: Tensor
    order: Tensor
    flipped: bool
    scores: dict[str, float] = field(default_factory=dict)
    backbone: str = ""
    png: Path | None = None


@torch.no_grad()
def match_views(feat1: Tensor, feat2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Best match in view 2 of every region of view 1, as the region loss matches them.

    Args:
        feat1: Region features of view 1 ``(n, d)``.
        feat2: Region features of view 2 ``(m, d)``.

    Returns:
        ``match (n,)`` long indices into view 2, ``similarity (n,)`` their cosine, and
        ``order (n,)`` the regions of view 1 sorted by decreasing similarity (ties: lower
        index first).
    """
    from esvit.losses.region import match_regions

    if feat1.ndim != 2 or feat2.ndim != 2 or feat1.shape[1] != feat2.shape[1]:
        raise ValueError(f"expected (n, d) and (m, d) features, got {tuple(feat1.shape)} and {tuple(feat2.shape)}")
    match = match_regions(feat1[None], feat2[None])[0]
    sim = F.normalize(feat1.float(), dim=-1) @ F.normalize(feat2.float(), dim=-1).T
    best = sim.gather(1, match[:, None])[:, 0]
    order = torch.sort(best, descending=True, stable=True).indices
    return match, best, order


def token_centers(grid: tuple[int, int], size: int) -> np.ndarray:
    """Pixel centres ``(n, 2)`` as ``(x, y)`` of the ``gh x gw`` regions of a ``size`` square,
    in row-major token order."""
    gh, gw = grid
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    return np.stack([(cols + 0.5) * size / gw, (rows + 0.5) * size / gh], axis=1)


def mirror_index(grid: tuple[int, int]) -> Tensor:
    """``(n,)`` index of the horizontally mirrored region ``(r, gw - 1 - c)`` of every region."""
    gh, gw = grid
    idx = torch.arange(gh * gw)
    return idx // gw * gw + (gw - 1 - idx % gw)


def compute_correspondence(
    backbone: Any,
    image: str | os.PathLike[str],
    image2: str | os.PathLike[str] | None = None,
    *,
    jitter: bool = True,
    seed: int = 0,
    image_size: int | None = None,
    checkpoint_key: str = "teacher",
    backbone_name: str | None = None,
    device: str | torch.device | None = "cpu",
) -> Correspondence:
    """Match the regions of two views of an image (or of two images).

    Args:
        backbone: Checkpoint path (any esvit format) or ``(net, spec)``.
        image: The first view.
        image2: The second view; default: ``image`` flipped (and recoloured with ``jitter``).
        jitter: Default second view only: colour jitter (p 0.8) then grey, as the official
            measure does.
        seed: Seed of the jitter.
        image_size: Input side (default: the recorded training crop size, else 224).
        checkpoint_key: ``"teacher"`` or ``"student"``.
        backbone_name: Registry name for bare state dicts.
        device: Where the backbone runs.

    Returns:
        :class:`Correspondence`.
    """
    from esvit.eval.correspondence import flip_jitter, flip_match_scores

    model = load_model(backbone, image_size=image_size, checkpoint_key=checkpoint_key,
                       backbone_name=backbone_name, device=device)
    x1 = load_views([image], model)
    x2 = load_views([image2], model) if image2 is not None else flip_jitter(x1, jitter, [seed])
    _, feat1 = model.features(x1)
    _, feat2 = model.features(x2)
    match, sim, order = match_views(feat1[0], feat2[0])
    scores: dict[str, float] = {}
    if image2 is None:
        s = flip_match_scores(feat1, feat2, model.grid, top_k=NUMBERED)
        scores = {k: float(s[k][0]) for k in ("accuracy_all", "accuracy_topk", "distance_all")}
        scores["chance"] = 1.0 / (model.grid[0] * model.grid[1])
    return Correspondence(torch.cat([x1, x2]).cpu(), model.grid, match, sim, order,
                          image2 is None, scores, model.name)


def _title(res: Correspondence, shown: int) -> str:
    n = res.grid[0] * res.grid[1]
    head = f"{res.backbone}: best match of {shown} of {n} regions (cosine of backbone features)"
    if not res.flipped:
        return head
    s = res.scores
    return (f"{head}\non the mirrored region: {100 * s['accuracy_all']:.0f}% of all, "
            f"{100 * s['accuracy_topk']:.0f}% of the {min(NUMBERED, n)} strongest "
            f"(chance {100 * s['chance']:.1f}%)")


def draw_correspondence(res: Correspondence, top_k: int | None = None) -> Any:
    """Draw the views side by side with a line per match, strongest on top and numbered.

    Args:
        res: :func:`compute_correspondence` 's result.
        top_k: Draw only the ``top_k`` strongest matches (default: every region).

    Returns:
        A matplotlib figure.
    """
    from esvit.viz.render import image_panel, pyplot, to_hwc

    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for every region), got {top_k}")
    plt = pyplot()
    from matplotlib.patheffects import withStroke

    outline = withStroke(linewidth=1.5, foreground="black")  # numbers readable on light and dark
    size = res.views.shape[-1]
    gap = max(1, round(MARGIN * size))
    canvas = np.concatenate([to_hwc(res.views[0]), np.ones((size, gap, 3), np.float32),
                             to_hwc(res.views[1])], axis=1)
    shown = res.order[: top_k or len(res.order)].tolist()
    centers = token_centers(res.grid, size)
    fig, ax = plt.subplots(figsize=(8, 4.4))
    image_panel(ax, canvas)
    cmap, sims = plt.get_cmap("viridis"), res.similarity.numpy()
    lo, hi = float(sims[shown].min()), float(sims[shown].max())
    norm = plt.Normalize(lo, hi if hi > lo else lo + 1e-6)
    for rank in reversed(range(len(shown))):  # weakest first, so the strongest lie on top
        i = shown[rank]
        (x1, y1), (x2, y2) = centers[i], centers[int(res.match[i])]
        x2 += size + gap
        ax.plot([x1, x2], [y1, y2], "-o", color=cmap(norm(sims[i])), lw=1.2 if rank < NUMBERED else 0.6,
                ms=4, mec="k", mew=0.5)
        if rank < NUMBERED:
            for x, y in ((x1, y1), (x2, y2)):
                ax.text(x, y - 0.02 * size, str(rank + 1), color="yellow", fontsize=7, ha="center",
                        path_effects=[outline])
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.025, pad=0.01,
                 label="cosine similarity")
    ax.set_title(_title(res, len(shown)), fontsize=9)
    return fig


def plot_correspondence(
    backbone: Any, image: str | os.PathLike[str], out: str | os.PathLike[str],
    image2: str | os.PathLike[str] | None = None, *, top_k: int | None = None, **kwargs: Any,
) -> Correspondence:
    """Compute (:func:`compute_correspondence`, ``**kwargs``) and write the PNG ``out``."""
    from esvit.viz.render import save_figure

    res = compute_correspondence(backbone, image, image2, **kwargs)
    res.png = save_figure(draw_correspondence(res, top_k), out)
    return res
