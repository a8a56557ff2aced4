"""PCA picture: the first three principal components of the region features as RGB over the
image grid (the DINOv2-style feature picture).

The components are fitted jointly on the region tokens of all the images given, so one colour
means the same feature direction in every image. Each component is scaled to ``[0, 1]`` over
all tokens (red = first component, green = second, blue = third); a component's sign is fixed so
that its largest loading is positive, which makes the colours reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from esvit.viz.inputs import load_model, load_views

__all__ = ["PCAPicture", "compute_pca", "draw_pca", "pca_colors", "plot_pca", "principal_components"]


@dataclass
class PCAPicture:
    """Region features of some images as colours.

    Attributes:
        images: ``(b, 3, s, s)`` the images as fed (float in ``[0, 1]``).
        colors: ``(b, gh, gw, 3)`` float in ``[0, 1]``: components 1-3 as red, green, blue.
        explained: ``(3,)`` share of the feature variance each component explains (0 for a
            component that does not exist, e.g. fewer than 3 feature dimensions).
        names: Image file names.
        backbone: Registry name.
        png: The picture, once written.
    """

    images: Tensor
    colors: np.ndarray
    explained: np.ndarray
    names: list[str]
    backbone: str = ""
    png: Path | None = None


def principal_components(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre the rows of ``x`` and project them on the first ``k`` principal components.

    A component's sign is fixed so that its largest loading is positive (reproducible output).

    Args:
        x: ``(N, d)`` rows.
        k: Components wanted.

    Returns:
        ``proj (N, k)`` (a component that does not exist, ``k > min(N, d)``, is all zeros) and
        ``explained (k,)``, the share of the variance of each component.
    """
    c = np.asarray(x, dtype=np.float64)
    c = c - c.mean(axis=0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    r = min(k, vt.shape[0])
    comps = vt[:r]
    comps = comps * np.sign(comps[np.arange(r), np.abs(comps).argmax(axis=1)])[:, None]
    proj, explained = np.zeros((len(c), k)), np.zeros(k)
    proj[:, :r] = c @ comps.T
    total = float((s**2).sum())
    if total > 0:
        explained[:r] = s[:r] ** 2 / total
    return proj, explained


def pca_colors(regions: Tensor | np.ndarray, grid: tuple[int, int], k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Project region features on their first ``k`` principal components and scale to colours.

    Args:
        regions: ``(b, n, d)`` region features, row-major grid order (``n = gh * gw``).
        grid: ``(gh, gw)``.
        k: Components kept (3 for RGB).

    Returns:
        ``colors (b, gh, gw, k)`` in ``[0, 1]`` (a missing or constant component is 0.5) and
        ``explained (k,)`` variance shares.
    """
    x = np.asarray(regions.detach().cpu() if isinstance(regions, Tensor) else regions, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"expected (b, {grid[0] * grid[1]}, d) region features, got {x.shape}")
    b, n, d = x.shape
    if b * n < 2:
        raise ValueError(f"PCA needs at least 2 region tokens, got {b * n}: use a larger image size or more images")
    proj, explained = principal_components(x.reshape(b * n, d), k)
    lo, spread = proj.min(axis=0), np.ptp(proj, axis=0)
    live = np.flatnonzero(spread > 1e-9 * max(1.0, float(np.abs(proj).max())))
    out = np.full((b * n, k), 0.5)
    out[:, live] = (proj[:, live] - lo[live]) / spread[live]
    return out.reshape(b, *grid, k).astype(np.float32), explained


def compute_pca(
    backbone: Any,
    images: Sequence[str | os.PathLike[str]],
    *,
    image_size: int | None = None,
    checkpoint_key: str = "teacher",
    backbone_name: str | None = None,
    device: str | torch.device | None = "cpu",
) -> PCAPicture:
    """PCA colours of the region features of one or more images (fitted jointly).

    Args:
        backbone: Checkpoint path (any esvit format) or ``(net, spec)``.
        images: Image files.
        image_size, checkpoint_key, backbone_name, device: As for
            :func:`esvit.viz.inputs.load_model`.

    Returns:
        :class:`PCAPicture`.
    """
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    model = load_model(backbone, image_size=image_size, checkpoint_key=checkpoint_key,
                       backbone_name=backbone_name, device=device)
    x = load_views(images, model)
    _, regions = model.features(x)
    colors, explained = pca_colors(regions, model.grid)
    return PCAPicture(x, colors, explained, [Path(p).name for p in images], model.name)


def draw_pca(res: PCAPicture) -> Any:
    """Draw every image above its PCA colours.

    Returns:
        A matplotlib figure.
    """
    from esvit.viz.render import grid_to_pixels, image_panel, pyplot, to_hwc

    plt = pyplot()
    b = res.images.shape[0]
    fig, axes = plt.subplots(2, b, figsize=(2.6 * b, 5.4), squeeze=False)
    for i in range(b):
        image = to_hwc(res.images[i])
        image_panel(axes[0, i], image, res.names[i])
        image_panel(axes[1, i], grid_to_pixels(res.colors[i], image.shape[0]))
    ev = ", ".join(f"{100 * e:.0f}%" for e in res.explained)
    fig.suptitle(f"{res.backbone}: region features, PCA 1-3 as RGB (variance {ev})", fontsize=10)
    return fig


def plot_pca(backbone: Any, images: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
             **kwargs: Any) -> PCAPicture:
    """Compute (:func:`compute_pca`, ``**kwargs``) and write the PNG ``out``."""
    from esvit.viz.render import save_figure

    res = compute_pca(backbone, images, **kwargs)
    res.png = save_figure(draw_pca(res), out)
    return res
