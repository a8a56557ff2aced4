"""Embedding map: a 2-D scatter of an ``esvit-embed`` output folder, coloured by label.

The folder is read as :mod:`esvit.embed` writes it (with its CSV reader,
:func:`esvit.embed.read_embeddings_csv`): ``manifest.json`` (settings, shards),
the merged ``embeddings.{npy,pt,safetensors}`` with ``embeddings.csv`` (``row,path,label``) of a
finished extraction (its shards are then deleted), or the shards ``embeddings_NNNNN.*`` with
``paths_NNNNN.csv`` of an unfinished one (the finished shards so far) or of ``--no-merge``.
The label is the class folder of an image folder (or the list file's label); ``""`` means none.

Projections: ``pca`` (default, no extra package), ``tsne`` (scikit-learn) and ``umap``
(umap-learn), the last two when installed.
"""

from __future__ import annotations

import colorsys
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PROJECTIONS",
    "EmbeddingMap",
    "EmbeddingTable",
    "compute_embedding_map",
    "draw_embedding_map",
    "label_colors",
    "plot_embeddings",
    "project_2d",
    "read_embeddings",
]

PROJECTIONS = ("pca", "tsne", "umap")
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf")
UNLABELED = (0.6, 0.6, 0.6, 1.0)


@dataclass
class EmbeddingTable:
    """An ``esvit-embed`` output read back.

    Attributes:
        x: ``(n, d)`` embeddings as stored (float32 / float16; a read-only memory map for a
            merged ``.npy``, so only the rows used are read).
        paths: ``n`` image paths.
        labels: ``n`` labels (``""`` when the image has none).
    """

    x: np.ndarray
    paths: list[str]
    labels: list[str]


@dataclass
class EmbeddingMap:
    """Embeddings projected to 2-D with a colour per point.

    Attributes:
        points: ``(n, 2)`` coordinates.
        labels: ``n`` labels (``""``: none).
        classes: Distinct labels in colour order (empty when no point has a label).
        colors: ``(n, 4)`` RGBA per point: one colour per class, grey for unlabeled points.
        method: Projection used.
        source: The folder.
        png: The picture, once written.
    """

    points: np.ndarray
    labels: list[str]
    classes: list[str]
    colors: np.ndarray
    method: str
    source: str = ""
    png: Path | None = None


def _read_rows(csv_files: list[Path]) -> tuple[list[str], list[str]]:
    """``(paths, labels)`` of ``embeddings.csv`` (``row,path,label``) or ``paths_*.csv`` files."""
    from esvit.embed import read_embeddings_csv

    paths, labels = [], []
    for f in csv_files:
        header, *rows = read_embeddings_csv(f) or [[]]
        col = 1 if header and header[0] == "row" else 0  # embeddings.csv has a row column
        for rec in rows:
            paths.append(rec[col])
            labels.append(rec[col + 1] if len(rec) > col + 1 else "")
    return paths, labels


def read_embeddings(folder: str | os.PathLike[str]) -> EmbeddingTable:
    """Read an ``esvit-embed`` output folder: finished (merged) or not (the finished shards).

    Raises:
        FileNotFoundError: No folder, no ``manifest.json``, or no embeddings file.
        ValueError: Rows of the embeddings and of the path lists disagree, or no rows.
    """
    from esvit.embed import MANIFEST, _load_array

    out = Path(folder)
    if not (out / MANIFEST).is_file():
        raise FileNotFoundError(f"{out} has no {MANIFEST}: not an esvit-embed output folder "
                                "(make one with esvit-embed --checkpoint CK --input IMAGES --out DIR)")
    manifest = json.loads((out / MANIFEST).read_text())
    fmt = manifest.get("settings", {}).get("format", "npy")
    ext = {"npy": ".npy", "pt": ".pt", "safetensors": ".safetensors"}[fmt]
    if (out / f"embeddings{ext}").is_file() and (out / "embeddings.csv").is_file():
        x = _load_array(out / f"embeddings{ext}", fmt, "embeddings")  # .npy: a memory map
        paths, labels = _read_rows([out / "embeddings.csv"])
    else:
        shards = sorted(int(i) for i in manifest.get("shards", {}))
        files = [out / f"embeddings_{i:05d}{ext}" for i in shards]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"{out} holds no embeddings{ext} nor complete shards: the "
                                    "extraction has not finished (run esvit-embed again to resume)")
        x = np.concatenate([np.asarray(_load_array(f, fmt, "embeddings"), dtype=np.float32) for f in files])
        paths, labels = _read_rows([out / f"paths_{i:05d}.csv" for i in shards])
    if len(x) != len(paths):
        raise ValueError(f"{out}: {len(x)} embeddings but {len(paths)} listed images")
    if len(x) == 0:
        raise ValueError(f"{out} holds no embeddings (every image was unreadable?)")
    return EmbeddingTable(x.reshape(len(x), -1), paths, labels)


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Project ``(n, d)`` embeddings to ``(n, 2)``.

    Args:
        x: Embeddings.
        method: ``"pca"`` (first two principal components, signs fixed so the largest loading is
            positive), ``"tsne"`` (scikit-learn) or ``"umap"`` (umap-learn).
        seed: Random state of t-SNE / UMAP.

    Raises:
        MissingDependencyError: t-SNE / UMAP without its package.
    """
    from esvit.viz.render import MissingDependencyError

    x = np.asarray(x, dtype=np.float64)
    if method not in PROJECTIONS:
        raise ValueError(f"method must be one of {PROJECTIONS}, got {method!r}")
    if method == "pca":
        from esvit.viz.pca import principal_components

        return principal_components(x, 2)[0]
    if len(x) < 5:
        raise ValueError(f"{method} needs at least 5 embeddings, got {len(x)}: use method pca")
    try:
        if method == "tsne":
            from sklearn.manifold import TSNE

            return TSNE(2, perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed, init="pca").fit_transform(x)
        import umap

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    except ImportError:
        pkg = "scikit-learn" if method == "tsne" else "umap-learn"
        raise MissingDependencyError(f"projection {method} needs {pkg}: pip install {pkg} "
                                     "(or use the default, pca)") from None


def label_colors(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """One colour per distinct label.

    Args:
        labels: ``n`` labels; ``""`` is no label.

    Returns:
        ``classes`` (distinct non-empty labels, sorted) and ``colors (n, 4)`` RGBA: the
        tab10 palette up to 10 classes, evenly spaced hues beyond; unlabeled points grey; with
        no label at all, every point has the first palette colour.
    """
    classes = sorted({lab for lab in labels if lab})
    if len(classes) <= len(_TAB10):
        palette = [tuple(int(h[i:i + 2], 16) / 255 for i in (1, 3, 5)) + (1.0,) for h in _TAB10]
    else:
        palette = [colorsys.hsv_to_rgb(i / len(classes), 0.75, 0.9) + (1.0,) for i in range(len(classes))]
    index = {c: i for i, c in enumerate(classes)}
    if not classes:
        return [], np.tile(np.array(palette[0]), (len(labels), 1))
    return classes, np.array([palette[index[lab]] if lab else UNLABELED for lab in labels])


def compute_embedding_map(folder: str | os.PathLike[str], method: str = "pca", max_points: int | None = 20000,
                          seed: int = 0) -> EmbeddingMap:
    """Read an ``esvit-embed`` folder, subsample to ``max_points`` (seeded), project to 2-D."""
    table = read_embeddings(folder)
    keep = np.arange(len(table.x))
    if max_points is not None and len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(keep), max_points, replace=False))
    labels = [table.labels[i] for i in keep]
    classes, colors = label_colors(labels)
    x = np.asarray(table.x[keep], dtype=np.float32)
    return EmbeddingMap(project_2d(x, method, seed), labels, classes, colors, method, str(folder))


def draw_embedding_map(res: EmbeddingMap) -> Any:
    """Scatter the points, one colour per class, with a legend of the classes (up to 20).

    Returns:
        A matplotlib figure.
    """
    from esvit.viz.render import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    size = float(np.clip(3000 / max(len(res.points), 1), 2, 40))
    ax.scatter(res.points[:, 0], res.points[:, 1], c=res.colors, s=size, linewidths=0)
    if 0 < len(res.classes) <= 20:
        index = {c: i for i, c in enumerate(res.labels)}
        handles = [plt.Line2D([], [], ls="", marker="o", color=res.colors[index[c]], label=c) for c in res.classes]
        ax.legend(handles=handles, fontsize=7, loc="best", markerscale=0.8)
    axis = {"pca": "PC", "tsne": "t-SNE ", "umap": "UMAP "}[res.method]
    ax.set_xlabel(f"{axis}1")
    ax.set_ylabel(f"{axis}2")
    what = f"{len(res.classes)} labels" if res.classes else "no labels"
    ax.set_title(f"{Path(res.source).name}: {len(res.points)} embeddings, {res.method}, {what}", fontsize=9)
    return fig


def plot_embeddings(folder: str | os.PathLike[str], out: str | os.PathLike[str], **kwargs: Any) -> EmbeddingMap:
    """Compute (:func:`compute_embedding_map`, ``**kwargs``) and write the PNG ``out``."""
    from esvit.viz.render import save_figure

    res = compute_embedding_map(folder, **kwargs)
    res.png = save_figure(draw_embedding_map(res), out)
    return res
