"""Pictures of what a backbone learned (``esvit-viz``): PNG files drawn with matplotlib.

Each picture is a ``compute_*`` function (torch / numpy, no matplotlib; returns the arrays the
picture shows), a ``draw_*`` function (a matplotlib figure) and a ``plot_*`` function (both, then
the PNG):

* :mod:`esvit.viz.correspondence`: lines from every region of a view to its best match in another
  view (cosine of backbone region features, as the region loss matches them);
* :mod:`esvit.viz.attention`: the CLS token's attention of the last ViT block per head, or the
  pooled feature's similarity to every region for CNN / Swin backbones;
* :mod:`esvit.viz.pca`: the first three principal components of the region features as RGB;
* :mod:`esvit.viz.embeddings`: a 2-D map of an ``esvit-embed`` output, coloured by label;
* :mod:`esvit.viz.curves`: a run's ``metrics.jsonl`` as plots.

matplotlib is the optional extra ``esvit[viz]``; see ``docs/viz.md``.
"""

from __future__ import annotations

from esvit.viz.attention import (
    AttentionMaps,
    cls_attention_maps,
    compute_attention,
    draw_attention,
    last_block_attention,
    plot_attention,
    pooled_similarity,
)
from esvit.viz.correspondence import (
    Correspondence,
    compute_correspondence,
    draw_correspondence,
    match_views,
    mirror_index,
    plot_correspondence,
    token_centers,
)
from esvit.viz.curves import Curves, compute_curves, draw_curves, plot_curves, read_metric_series
from esvit.viz.embeddings import (
    EmbeddingMap,
    EmbeddingTable,
    compute_embedding_map,
    draw_embedding_map,
    label_colors,
    plot_embeddings,
    project_2d,
    read_embeddings,
)
from esvit.viz.inputs import VizModel, load_model, load_views
from esvit.viz.pca import (
    PCAPicture,
    compute_pca,
    draw_pca,
    pca_colors,
    plot_pca,
    principal_components,
)
from esvit.viz.render import MissingDependencyError

__all__ = [
    "AttentionMaps", "Correspondence", "Curves", "EmbeddingMap", "EmbeddingTable", "MissingDependencyError",
    "PCAPicture", "VizModel", "cls_attention_maps", "compute_attention", "compute_correspondence",
    "compute_curves", "compute_embedding_map", "compute_pca", "draw_attention", "draw_correspondence",
    "draw_curves", "draw_embedding_map", "draw_pca", "label_colors", "last_block_attention", "load_model",
    "load_views", "match_views", "mirror_index", "pca_colors", "plot_attention", "plot_correspondence",
    "plot_curves", "plot_embeddings", "plot_pca", "pooled_similarity", "principal_components", "project_2d",
    "read_embeddings", "read_metric_series", "token_centers",
]
