"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO protocol)."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DINO_KS", "describe_knn", "knn_accuracies", "knn_accuracy", "knn_eval", "knn_neighbors",
    "knn_predict",
]

log = logging.getLogger("esvit.eval")


def _similarity(queries: Tensor, bank_chunk: Tensor) -> Tensor:
    """Cosine similarities ``(q, c)`` of normalised queries ``(q, d)`` and bank rows ``(c, d)``.

    The only place a similarity block is materialised (tests check its size).
    """
    return queries @ bank_chunk.T


@torch.no_grad()
def knn_neighbors(
    train_features: Tensor,
    test_features: Tensor,
    k: int,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` cosine neighbours of every query, never building the ``M x N`` matrix.

    Queries are processed in chunks of ``chunk_size`` rows; for each chunk the bank is scanned in
    chunks of ``train_chunk_size`` rows keeping a running top-k, so the largest similarity block
    is ``chunk_size x train_chunk_size``.

    Args:
        train_features: ``(N, d)`` feature bank (normalised here).
        test_features: ``(M, d)`` queries (normalised here, moved to the bank's device).
        k: Neighbours per query (clipped to ``N``).
        chunk_size: Queries per chunk.
        train_chunk_size: Bank rows per chunk.

    Returns:
        ``similarities (M, k)`` sorted in decreasing order and bank ``indices (M, k)``.
    """
    if train_features.shape[0] == 0:
        raise ValueError("kNN feature bank is empty")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dims differ: bank {train_features.shape[1]}, "
                         f"queries {test_features.shape[1]}")
    if k < 1 or chunk_size < 1 or train_chunk_size < 1:
        raise ValueError(f"k, chunk_size and train_chunk_size must be >= 1, got "
                         f"{k}, {chunk_size}, {train_chunk_size}")
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    sims, idxs = [], []
    for q in F.normalize(test_features.float(), dim=1).to(bank.device).split(chunk_size):
        best_sim = q.new_full((q.shape[0], 0), float("-inf"))
        best_idx = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for start in range(0, bank.shape[0], train_chunk_size):
            sim = _similarity(q, bank[start:start + train_chunk_size])
            sim_k, idx_k = sim.topk(min(k, sim.shape[1]), dim=1)
            best_sim, pos = torch.cat([best_sim, sim_k], 1).topk(
                min(k, best_sim.shape[1] + sim_k.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx_k + start], 1).gather(1, pos)
        sims.append(best_sim)
        idxs.append(best_idx)
    if not sims:
        empty = test_features.new_zeros((0, k), dtype=torch.float32)
        return empty.to(bank.device), empty.long().to(bank.device)
    return torch.cat(sims), torch.cat(idxs)


def _vote(sim: Tensor, idx: Tensor, labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    weights = (sim / temperature).exp()
    scores = sim.new_zeros(sim.shape[0], num_classes)
    scores.scatter_add_(1, labels[idx], weights)
    return scores


def _check_labels(train_features: Tensor, train_labels: Tensor, num_classes: int) -> None:
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"train_features has {train_features.shape[0]} rows but train_labels {train_labels.shape[0]}"
        )
    if train_labels.numel() and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError(f"train labels must be in [0, {num_classes}), got "
                         f"[{int(train_labels.min())}, {int(train_labels.max())}]")


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

    Never builds the full ``N_test x N_train`` similarity matrix (see :func:`knn_neighbors`).

    Args:
        train_features: ``(N, d)`` feature bank (normalised here).
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(M, d)`` queries (normalised here).
        num_classes: Number of classes ``C``.
        k: Number of neighbours (clipped to ``N``).
        temperature: Softmax temperature of the similarity weights.
        chunk_size: Queries per chunk.
        train_chunk_size: Bank rows per chunk.

    Returns:
        Scores ``(M, C)``; ``argmax`` gives the prediction.
    """
    _check_labels(train_features, train_labels, num_classes)
    sim, idx = knn_neighbors(train_features, test_features, k, chunk_size, train_chunk_size)
    return _vote(sim, idx, train_labels.long().to(sim.device), num_classes, temperature)


def _topk_accuracy(scores: Tensor, target: Tensor, num_classes: int) -> dict[str, float]:
    """Top-1 (top-5 with >= 5 classes) in percent, from exact counts (:func:`~esvit.eval.validity.percent`)."""
    from esvit.eval.validity import percent

    target = target.to(scores.device).long()
    n = target.numel()
    res = {"top1": percent(int((scores.argmax(1) == target).sum()), n)}
    if num_classes >= 5:
        top5 = scores.topk(5, dim=1).indices
        res["top5"] = percent(int((top5 == target[:, None]).any(1).sum()), n)
    return res


def _check_meaningful(train_labels: Tensor, test_labels: Tensor, num_classes: int) -> None:
    """Refuse a bank of one class or a query class absent from the bank (see
    :mod:`esvit.eval.validity`)."""
    from esvit.eval.validity import evaluation_basis

    if train_labels.numel() and test_labels.numel():
        evaluation_basis("knn", train_labels, test_labels, num_classes, log_flags=False)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are >= 5 classes) kNN accuracy in percent.

    Raises:
        esvit.eval.validity.MeaninglessEvaluationError: The bank holds fewer than 2 classes,
            or a query class has no bank image.
    """
    c = num_classes or int(max(train_labels.max(), test_labels.max()).item()) + 1
    _check_labels(train_features, train_labels, c)
    _check_meaningful(train_labels, test_labels, c)
    scores = knn_predict(train_features, train_labels, test_features, c, k, temperature)
    return _topk_accuracy(scores, test_labels, c)


@torch.no_grad()
def knn_accuracies(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
) -> dict[int, dict[str, float]]:
    """kNN accuracy for several ``k`` with a single neighbour search (``max(ks)`` neighbours).

    Args:
        train_features: ``(N, d)`` bank.
        train_labels: ``(N,)`` labels.
        test_features: ``(M, d)`` queries.
        test_labels: ``(M,)`` labels.
        ks: Neighbour counts (each clipped to ``N``).
        temperature: Vote temperature.
        num_classes: Number of classes (inferred from the labels when None).
        chunk_size: Queries per chunk.
        train_chunk_size: Bank rows per chunk.

    Returns:
        ``{k: {"top1": %, "top5": %}}`` (``top5`` only with >= 5 classes).

    Raises:
        esvit.eval.validity.MeaninglessEvaluationError: The bank holds fewer than 2 classes,
            or a query class has no bank image.
    """
    if not ks:
        raise ValueError("ks must name at least one k")
    c = num_classes or int(max(train_labels.max(), test_labels.max()).item()) + 1
    _check_labels(train_features, train_labels, c)
    _check_meaningful(train_labels, test_labels, c)
    sim, idx = knn_neighbors(train_features, test_features, max(ks), chunk_size, train_chunk_size)
    labels = train_labels.long().to(sim.device)
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        kk = min(k, sim.shape[1])
        scores = _vote(sim[:, :kk], idx[:, :kk], labels, c, temperature)
        out[int(k)] = _topk_accuracy(scores, test_labels, c)
    return out


DINO_KS = (10, 20, 100, 200)  # DINO's eval_knn.py neighbour counts


def _default_ks(n_bank: int) -> tuple[int, ...]:
    """The DINO ``ks`` that fit a bank of ``n_bank`` images (dropped ones are logged)."""
    from esvit.eval.validity import MeaninglessEvaluationError

    ks = tuple(k for k in DINO_KS if k <= n_bank)
    if not ks:
        raise MeaninglessEvaluationError(
            f"the bank holds {n_bank} images, fewer than the smallest default k ({DINO_KS[0]}): "
            f"pass ks (--ks) no larger than {n_bank}")
    if len(ks) < len(DINO_KS):
        log.warning("kNN: default k=%s dropped: larger than the bank (%d images)",
                    ", ".join(str(k) for k in DINO_KS if k > n_bank), n_bank)
    return ks


def knn_eval(
    backbone: Any,
    train: str | Path,
    val: str | Path | None = None,
    *,
    val_split: int | None = None,
    ks: Sequence[int] | None = None,
    temperature: float = 0.07,
    checkpoint_key: str = "teacher",
    backbone_name: str | None = None,
    image_size: int | None = None,
    canvas_size: int | None = None,
    preprocess: str = "auto",
    feature: str = "pooled",
    n_last: int | None = None,
    avgpool: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    output_dir: str | Path | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """kNN evaluation of a frozen backbone on labeled image folders (DINO protocol).

    Also callable as ``esvit.eval.knn(...)`` (the module is callable). Evaluations that cannot
    mean anything are refused before any feature is computed, and every result records what it
    was computed on (see :mod:`esvit.eval.validity`).

    Args:
        backbone: Checkpoint path (training checkpoint, export, or bare state dict with
            ``backbone_name``), ``(net, spec)``, or a :class:`~esvit.eval.features.FeatureEncoder`.
        train: Image folder with one subfolder per class (the feature bank).
        val: Query folder with the same class names; or ``val_split``.
        val_split: Hold out the last ``val_split`` images of every class of ``train``.
        ks: Neighbour counts, each at most the bank size (default: DINO's 10, 20, 100, 200,
            those larger than the bank dropped with a warning).
        temperature: Vote temperature.
        checkpoint_key: ``"teacher"`` or ``"student"``.
        backbone_name: Registry name for bare state dicts.
        image_size: Evaluation resolution (default: recorded training size, else 224).
        canvas_size: ``preprocess='resize'``: decode size (default ``image_size``); giving it
            makes ``auto`` choose ``resize``.
        preprocess: ``"auto"`` (default: ``dino`` when the images are larger than
            ``image_size``, else ``resize``), ``"dino"`` (short side to ``image_size / 0.875``,
            centre crop ``image_size``: DINO's ``Resize(256) + CenterCrop(224)``) or ``"resize"``
            (short side to ``canvas_size``, centre square, resized to ``image_size``); see
            :class:`~esvit.eval.features.EvalPreprocess`.
        feature: ``"pooled"`` or ``"last_n"``.
        n_last: ``last_n`` blocks / stages.
        avgpool: ``last_n`` ViT: append the mean patch token.
        batch_size: Feature extraction batch size.
        num_workers: DataLoader workers.
        device: Device (default: CUDA when available).
        output_dir: Writes ``knn_results.json`` and (with ``cache`` and no ``cache_dir``) the
            feature cache in ``features/``; the folder must hold only files esvit wrote
            (:class:`~esvit.eval.outputs.OutputFolder`).
        cache: Cache features (checkpoint paths only).
        cache_dir: Feature cache folder, shared with :func:`~esvit.eval.linear.linear_probe`
            (:mod:`esvit.eval.cache`); default ``output_dir/features``.
        progress: Show tqdm bars.

    Returns:
        ``{"knn": {"10": {"top1", "top5"}, "20": ..., "100": ...}, "protocol": "knn",
        "n_bank", "n_train" (= n_bank), "n_val", "num_classes", "bank_classes", "val_classes",
        "chance": {"top1", ...}, "val_in_bank", "flags", "feature_dim", "temperature",
        "preprocess": {...}, ...}``: ``knn`` maps each k (a string, in increasing numeric order,
        in the dict and in ``knn_results.json``) to its accuracies; accuracies and chance levels
        in percent, rounded to 4 decimals (:func:`~esvit.eval.validity.percent`).

    Raises:
        esvit.eval.validity.MeaninglessEvaluationError: Fewer than 2 bank classes, a
            validation class absent from the bank, or a k larger than the bank.
        esvit.eval.outputs.ForeignFilesError: ``output_dir`` holds files esvit did not write.
    """
    from esvit.eval.cache import resolve_cache_dir
    from esvit.eval.outputs import OutputFolder

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if ks is not None and (not ks or min(ks) < 1):
        raise ValueError(f"ks must be positive neighbour counts, got {list(ks)}")
    folder = OutputFolder(output_dir, "esvit-knn").claim() if output_dir is not None else None
    try:
        cache_at = resolve_cache_dir(folder, cache, cache_dir, "esvit-knn")
        results = _knn_eval(backbone, train, val, val_split, ks, temperature, cache_at,
                            progress, checkpoint_key=checkpoint_key, backbone_name=backbone_name,
                            image_size=image_size, canvas_size=canvas_size,
                            preprocess=preprocess, feature=feature, n_last=n_last,
                            avgpool=avgpool, batch_size=batch_size, num_workers=num_workers,
                            device=device)
        if folder is not None:
            folder.write_json("knn_results.json", results)
            results["output_dir"] = str(folder.root)
    finally:
        if folder is not None:
            folder.release()
    return results


def _knn_eval(backbone: Any, train: str | Path, val: str | Path | None, val_split: int | None,
              ks: Sequence[int] | None, temperature: float, cache_dir: Path | None,
              progress: bool, *, checkpoint_key: str, backbone_name: str | None,
              image_size: int | None, canvas_size: int | None, preprocess: str, feature: str,
              n_last: int | None, avgpool: bool, batch_size: int, num_workers: int,
              device: str | torch.device | None) -> dict[str, Any]:
    """:func:`knn_eval` once its output folder is claimed."""
    from esvit.eval.cache import cached_features
    from esvit.eval.features import (
        labeled_splits,
        probe_paths,
        resolve_device,
        resolve_eval_model,
        resolve_preprocess,
    )
    from esvit.eval.validity import evaluation_basis

    dev = resolve_device(device)
    model = resolve_eval_model(backbone, checkpoint_key=checkpoint_key, backbone_name=backbone_name,
                               image_size=image_size, feature=feature, n_last=n_last,
                               avgpool=avgpool, device=dev)
    tr_ds, va_ds, classes = labeled_splits(train, val, val_split, canvas_size or model.image_size)
    pre = resolve_preprocess(preprocess, model.image_size, probe_paths(tr_ds, va_ds), canvas_size)
    ks = tuple(sorted(set(ks))) if ks is not None else _default_ks(len(tr_ds))
    # refuse before computing any feature (the same check runs again on the readable images)
    first = evaluation_basis("knn", tr_ds.labels, va_ds.labels, len(classes), classes, ks=ks,
                             bank_paths=tr_ds.paths, val_paths=va_ds.paths, log_flags=False)
    tr_ds, va_ds = tr_ds.with_preprocess(pre), va_ds.with_preprocess(pre)
    tr_x, tr_y, _ = cached_features(model, tr_ds, "train", dev, batch_size, num_workers,
                                    cache_dir=cache_dir, progress=progress, command="esvit-knn")
    va_x, va_y, _ = cached_features(model, va_ds, "val", dev, batch_size, num_workers,
                                    cache_dir=cache_dir, progress=progress, command="esvit-knn")
    basis = evaluation_basis("knn", tr_y, va_y, len(classes), classes, ks=ks,
                             val_in_bank=first.val_in_bank)
    if dev.type == "cuda":
        tr_x, tr_y = tr_x.to(dev), tr_y.to(dev)
    accs = knn_accuracies(tr_x, tr_y, va_x, va_y, ks=ks, temperature=temperature,
                          num_classes=len(classes))
    return {
        "knn": {str(k): accs[k] for k in sorted(accs)},
        **basis.record(),
        "ks": list(ks),
        "temperature": temperature,
        "n_train": basis.n_bank,
        "feature_dim": int(tr_x.shape[1]),
        "feature": model.encoder.feature,
        "n_last": model.encoder.n_last or None,
        "avgpool": model.encoder.avgpool,
        "image_size": model.image_size,
        "preprocess": pre.record(),
        "checkpoint": model.source,
        "written_by": "esvit-knn",
    }


def describe_knn(results: dict[str, Any]) -> list[str]:
    """Printed lines of a :func:`knn_eval` result: every number with what it was computed on."""
    from esvit.eval.validity import EvalBasis

    basis = EvalBasis(results["protocol"], results["n_bank"], results["n_val"],
                      results["num_classes"], results["bank_classes"], results["val_classes"],
                      results["chance"])
    lines = []
    for k, acc in sorted(results["knn"].items(), key=lambda kv: int(kv[0])):
        top5 = f"  top-5 {acc['top5']:6.2f}%" if "top5" in acc else ""
        lines.append(f"k={k:>4}  top-1 {acc['top1']:6.2f}%{top5}  (weighted kNN, T="
                     f"{results['temperature']:g}: {basis.describe()})")
    lines += [f"warning: {flag}" for flag in results.get("flags", ())]
    return lines


class _CallableModule(types.ModuleType):
    """Lets ``esvit.eval.knn(...)`` run :func:`knn_eval` while the module stays importable."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return knn_eval(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
