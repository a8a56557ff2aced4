"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
) -> Tensor:
    """Class scores of a temperature-weighted kNN vote (Wu et al. 2018, as in DINO).

    Never builds the full ``N_test x N_train`` similarity matrix: test features are processed in
    chunks of ``chunk_size`` rows, and for each chunk the bank is scanned in chunks of
    ``train_chunk_size`` columns keeping a running top-k.

    Args:
        train_features: ``(N, d)`` feature bank (normalised here).
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(M, d)`` queries (normalised here).
        num_classes: Number of classes ``C``.
        k: Number of neighbours (clipped to ``N``).
        temperature: Softmax temperature of the similarity weights.
        chunk_size: Queries per chunk.
        train_chunk_size: Bank columns per chunk.

    Returns:
        Scores ``(M, C)``; ``argmax`` gives the prediction.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"train_features has {train_features.shape[0]} rows but train_labels {train_labels.shape[0]}"
        )
    if train_features.shape[0] == 0:
        raise ValueError("kNN feature bank is empty")
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long().to(bank.device)
    out = []
    for q in F.normalize(test_features.float(), dim=1).to(bank.device).split(chunk_size):
        best_sim = q.new_full((q.shape[0], 0), float("-inf"))
        best_idx = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for start in range(0, bank.shape[0], train_chunk_size):
            sim = q @ bank[start:start + train_chunk_size].T
            sim_k, idx_k = sim.topk(min(k, sim.shape[1]), dim=1)
            best_sim, pos = torch.cat([best_sim, sim_k], 1).topk(min(k, best_sim.shape[1] + sim_k.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx_k + start], 1).gather(1, pos)
        weights = (best_sim / temperature).exp()
        scores = q.new_zeros(q.shape[0], num_classes)
        scores.scatter_add_(1, labels[best_idx], weights)
        out.append(scores)
    return torch.cat(out)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are >= 5 classes) kNN accuracy in percent."""
    c = num_classes or int(max(train_labels.max(), test_labels.max()).item()) + 1
    scores = knn_predict(train_features, train_labels, test_features, c, k, temperature)
    target = test_labels.to(scores.device).long()
    res = {"top1": (scores.argmax(1) == target).float().mean().item() * 100}
    if c >= 5:
        top5 = scores.topk(5, dim=1).indices
        res["top5"] = (top5 == target[:, None]).any(1).float().mean().item() * 100
    return res
