"""Linear probing of a frozen backbone (DINO / MAE style evaluation).

Three data modes:

* ``"none"``: features of the preprocessed images (``preprocess``: the DINO resize + centre crop
  for images larger than the evaluation size, else the whole resized centre square; see
  :class:`~esvit.eval.features.EvalPreprocess`) computed once and cached (in a cache shared
  with kNN, :mod:`esvit.eval.cache`);
* ``"flip"``: features of the original and the horizontally flipped images cached once; SGD
  samples one of the two per image and epoch, L-BFGS trains on both;
* ``"augment"``: the full DINO protocol, RandomResizedCrop + flip drawn every epoch and the
  features recomputed through the frozen backbone (SGD only).

Two solvers: ``"lbfgs"`` (default for cached features: full-batch cross-entropy with an L2
penalty, minimised by L-BFGS with a strong-Wolfe line search) and ``"sgd"`` (momentum 0.9,
cosine learning rate, no weight decay, batch 256). The classifier optionally normalises its
input first: ``"standardize"`` (fixed train-set mean / std, default for cached features) or
``"bn"`` (BatchNorm without affine parameters, as in MAE / DINO evaluation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esvit.eval.cache import cached_features, resolve_cache_dir
from esvit.eval.features import (
    EvalModel,
    EvalPreprocess,
    labeled_splits,
    make_loader,
    probe_paths,
    resolve_device,
    resolve_eval_model,
    resolve_preprocess,
)
from esvit.eval.features import preprocess as to_model_input

__all__ = [
    "LINEAR_MODES",
    "LINEAR_NORMS",
    "LINEAR_SOLVERS",
    "LinearClassifier",
    "accuracy",
    "describe_linear",
    "linear_probe",
    "train_linear_lbfgs",
    "train_linear_sgd",
]

log = logging.getLogger("esvit.linear")

LINEAR_MODES = ("none", "flip", "augment")
LINEAR_SOLVERS = ("lbfgs", "sgd")
LINEAR_NORMS = ("none", "standardize", "bn")


class LinearClassifier(nn.Module):
    """Optional input normalisation followed by one linear layer.

    Args:
        in_dim: Feature dimension ``D``.
        num_classes: Number of classes ``C``.
        norm: ``"none"``, ``"standardize"`` (fixed ``mean`` / ``std`` buffers, set with
            :meth:`set_standardization`) or ``"bn"`` (``BatchNorm1d`` without affine).
    """

    def __init__(self, in_dim: int, num_classes: int, norm: str = "none") -> None:
        super().__init__()
        if norm not in LINEAR_NORMS:
            raise ValueError(f"norm must be one of {LINEAR_NORMS}, got {norm!r}")
        self.norm_kind = norm
        self.bn = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6) if norm == "bn" else None
        if norm == "standardize":
            self.register_buffer("mean", torch.zeros(in_dim))
            self.register_buffer("std", torch.ones(in_dim))
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    @torch.no_grad()
    def set_standardization(self, features: Tensor) -> None:
        """Set ``mean`` / ``std`` from training features ``(N, D)`` (``"standardize"`` only)."""
        if self.norm_kind != "standardize":
            raise RuntimeError("set_standardization needs norm='standardize'")
        f = features.float()
        self.mean.copy_(f.mean(0))
        self.std.copy_(f.std(0, unbiased=False).clamp_min(1e-6))

    def normalize(self, x: Tensor) -> Tensor:
        """Apply the input normalisation: ``(N, D) -> (N, D)``."""
        x = x.float()
        if self.bn is not None:
            return self.bn(x)
        if self.norm_kind == "standardize":
            return (x - self.mean) / self.std
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: features ``(N, D)``. Returns: logits ``(N, C)``."""
        return self.linear(self.normalize(x))


@torch.no_grad()
def accuracy(logits: Tensor, target: Tensor) -> dict[str, float]:
    """Top-1 and (with >= 5 classes) top-5 accuracy in percent, from exact counts, rounded to
    4 decimals (:func:`~esvit.eval.validity.percent`)."""
    from esvit.eval.validity import percent

    target = target.to(logits.device).long()
    n = target.numel()
    res = {"top1": percent(int((logits.argmax(1) == target).sum()), n)}
    if logits.shape[1] >= 5:
        top5 = logits.topk(5, dim=1).indices
        res["top5"] = percent(int((top5 == target[:, None]).any(1).sum()), n)
    return res


@torch.no_grad()
def _predict(clf: LinearClassifier, features: Tensor, device: torch.device,
             batch_size: int = 4096) -> Tensor:
    clf.eval()
    out = [clf(f.to(device)).float().cpu() for f in features.split(batch_size)]
    return torch.cat(out) if out else features.new_zeros((0, clf.linear.out_features))


def train_linear_lbfgs(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    l2: float = 1e-4,
    max_iter: int = 500,
    norm: str = "standardize",
    device: torch.device | str = "cpu",
) -> LinearClassifier:
    """Full-batch multinomial logistic regression minimised by L-BFGS.

    Minimises ``mean cross-entropy + l2 / 2 * ||W||^2`` (bias not penalised) with a
    strong-Wolfe line search.

    Args:
        features: ``(N, D)`` training features.
        labels: ``(N,)`` labels in ``[0, num_classes)``.
        num_classes: ``C``.
        l2: L2 penalty on the weights.
        max_iter: Maximum L-BFGS iterations.
        norm: ``"standardize"`` (default) or ``"none"`` (``"bn"`` is for SGD only).
        device: Device to train on.

    Returns:
        The trained :class:`LinearClassifier` (eval mode, on ``device``).
    """
    if norm == "bn":
        raise ValueError("norm='bn' needs solver='sgd'; use norm='standardize' with L-BFGS")
    _check_xy(features, labels, num_classes)
    device = torch.device(device)
    clf = LinearClassifier(features.shape[1], num_classes, norm).to(device)
    x = features.to(device).float()
    y = labels.to(device).long()
    if norm == "standardize":
        clf.set_standardization(x)
    with torch.no_grad():
        xn = clf.normalize(x)
    opt = torch.optim.LBFGS(clf.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(clf.linear(xn), y) + 0.5 * l2 * clf.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    first = opt.step(closure)  # LBFGS.step returns the loss at the *start*
    with torch.no_grad():
        final = F.cross_entropy(clf.linear(xn), y) + 0.5 * l2 * clf.linear.weight.pow(2).sum()
    log.info("L-BFGS finished: loss %.4f -> %.4f", float(first.detach()), float(final))
    return clf.eval()


def _check_xy(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"expected features (N, D) and labels (N,), got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    if features.shape[0] == 0:
        raise ValueError("no training features")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def _cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * step / max(1, total)))


def train_linear_sgd(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    norm: str = "standardize",
    flipped: Tensor | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> LinearClassifier:
    """SGD (momentum 0.9, cosine LR per step, weight decay 0) on cached features.

    Args:
        features: ``(N, D)`` training features.
        labels: ``(N,)`` labels.
        num_classes: ``C``.
        epochs: Passes over the data.
        lr: Learning rate per 256 samples (scaled by ``batch_size / 256``).
        batch_size: Mini-batch size.
        norm: ``"standardize"``, ``"bn"`` or ``"none"``.
        flipped: Optional ``(N, D)`` features of the flipped images; each epoch every sample
            uses one of the two versions, drawn at random.
        device: Device to train on.
        seed: Seed of the shuffling / flip generator.

    Returns:
        The trained :class:`LinearClassifier` (eval mode, on ``device``).
    """
    _check_xy(features, labels, num_classes)
    if flipped is not None and flipped.shape != features.shape:
        raise ValueError(f"flipped features {tuple(flipped.shape)} must match {tuple(features.shape)}")
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    clf = LinearClassifier(features.shape[1], num_classes, norm).to(device)
    if norm == "standardize":
        both = features if flipped is None else torch.cat([features, flipped])
        clf.set_standardization(both.to(device))
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    base_lr = lr * batch_size / 256.0
    n = features.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    clf.train()
    for _ in range(epochs):
        x_epoch = features
        if flipped is not None:
            use_flip = torch.rand(n, generator=g) < 0.5
            x_epoch = torch.where(use_flip[:, None], flipped, features)
        perm = torch.randperm(n, generator=g)
        for idx in perm.split(batch_size):
            if norm == "bn" and idx.numel() < 2:
                continue  # BatchNorm needs 2+ samples
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(base_lr, step, total)
            x = x_epoch[idx].to(device, non_blocking=device.type == "cuda")
            y = labels[idx].to(device).long()
            loss = F.cross_entropy(clf(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return clf.eval()


def _train_linear_augment(
    model: EvalModel,
    dataset: torch.utils.data.Dataset,
    num_classes: int,
    image_size: int,
    epochs: int,
    lr: float,
    batch_size: int,
    norm: str,
    num_workers: int,
    device: torch.device,
    seed: int,
    progress: bool,
) -> LinearClassifier:
    """DINO protocol: RandomResizedCrop + flip each epoch, features recomputed by the backbone."""
    from tqdm import tqdm

    from esvit.augment.crop import resized_crop, sample_crop_boxes

    if norm == "standardize":
        raise ValueError("mode='augment' recomputes features every epoch: use norm='bn' or 'none'")
    g = torch.Generator().manual_seed(seed)
    clf: LinearClassifier | None = None
    opt: torch.optim.Optimizer | None = None
    loader = make_loader(dataset, batch_size, num_workers, shuffle=True, seed=seed, drop_last=False,
                         what="linear training images")
    steps_per_epoch = len(loader)
    total = epochs * steps_per_epoch
    base_lr = lr * batch_size / 256.0
    step = 0
    for epoch in range(epochs):
        if loader.generator is not None:  # the shuffling generator
            loader.generator.manual_seed(seed + epoch)
        bar = tqdm(loader, desc=f"linear epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for batch in bar:
            images, y = batch[0], torch.as_tensor(batch[1]).long()
            if len(batch) > 2 and isinstance(batch[2], Tensor) and batch[2].dtype == torch.bool:
                images, y = images[batch[2]], y[batch[2]]  # drop unreadable images
            if not len(y):
                continue
            images = images.to(device, non_blocking=device.type == "cuda")
            b, _, h, w = images.shape
            boxes = sample_crop_boxes(h, w, b, scale=(0.08, 1.0), generator=g)
            flip = torch.rand(b, generator=g) < 0.5
            crops = resized_crop(images.float(), boxes, image_size, flip=flip)
            crops = crops.round_().clamp_(0, 255).to(torch.uint8)
            with torch.no_grad():
                feats = model.encoder(to_model_input(crops)).float()
            if clf is None:
                clf = LinearClassifier(feats.shape[1], num_classes, norm).to(device).train()
                opt = torch.optim.SGD(clf.parameters(), lr=base_lr, momentum=0.9, weight_decay=0.0)
            if norm == "bn" and b < 2:
                continue
            assert opt is not None
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(base_lr, step, total)
            loss = F.cross_entropy(clf(feats), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    if clf is None:
        raise ValueError("no training images")
    return clf.eval()


@dataclass
class _Split:
    features: Tensor
    labels: Tensor
    flipped: Tensor | None


def linear_probe(
    backbone: Any,
    train: str | Path,
    val: str | Path | None = None,
    *,
    val_split: int | None = None,
    output_dir: str | Path | None = None,
    checkpoint_key: str = "teacher",
    backbone_name: str | None = None,
    image_size: int | None = None,
    canvas_size: int | None = None,
    preprocess: str = "auto",
    feature: str = "pooled",
    n_last: int | None = None,
    avgpool: bool = False,
    mode: str = "none",
    solver: str | None = None,
    norm: str | None = None,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    l2: float = 1e-4,
    max_iter: int = 500,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    seed: int = 0,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a linear classifier on frozen features and report top-1 / top-5.

    Args:
        backbone: Checkpoint path (training checkpoint, export or, with ``backbone_name``, a
            bare state dict), ``(net, spec)`` or a :class:`~esvit.eval.features.FeatureEncoder`.
        train: Image folder with one subfolder per class.
        val: Validation folder (same class names); or use ``val_split``.
        val_split: Hold out the last ``val_split`` images (sorted order) of every class of
            ``train`` as the validation set.
        output_dir: Where ``linear_results.json``, ``linear_classifier.pt`` and (without
            ``cache_dir``) the feature cache ``features/`` go (nothing is written when None); the
            folder must hold only files esvit wrote (:class:`~esvit.eval.outputs.OutputFolder`).
        checkpoint_key: ``"teacher"`` or ``"student"`` weights of a training checkpoint.
        backbone_name: Registry name, for bare state dicts.
        image_size: Evaluation resolution (default: the training global crop size recorded in
            the checkpoint, else the backbone's ``image_size``, else 224).
        canvas_size: ``preprocess='resize'``: decode size of the images (default
            ``image_size``; giving it makes ``auto`` choose ``resize``). ``mode='augment'``:
            decode size of the training crops' source (default: the evaluation decode size;
            larger gives the crops more pixels), also with ``preprocess='dino'``.
        preprocess: Evaluation preprocessing of the cached features: ``"auto"`` (default:
            ``dino`` when the images are larger than ``image_size``, else ``resize``),
            ``"dino"`` (short side to ``image_size / 0.875``, centre crop ``image_size``: DINO's
            ``Resize(256) + CenterCrop(224)``) or ``"resize"`` (short side to ``canvas_size``,
            centre square, resized to ``image_size``); see
            :class:`~esvit.eval.features.EvalPreprocess`.
        feature: ``"pooled"`` or ``"last_n"`` (see :class:`~esvit.eval.features.FeatureEncoder`).
        n_last: Blocks / stages concatenated by ``last_n``.
        avgpool: ``last_n`` ViT: append the mean patch token.
        mode: ``"none"``, ``"flip"`` or ``"augment"`` (see module docstring).
        solver: ``"lbfgs"`` or ``"sgd"`` (default: lbfgs for cached modes, sgd for augment).
        norm: ``"standardize"``, ``"bn"`` or ``"none"`` (default: standardize, bn for augment).
        epochs: SGD epochs.
        lr: SGD learning rate per 256 samples.
        batch_size: SGD batch size (and feature-extraction batch size).
        l2: L-BFGS L2 penalty.
        max_iter: L-BFGS iterations.
        num_workers: DataLoader workers.
        device: Device (default: CUDA when available).
        seed: Seed of the SGD / augmentation randomness.
        cache: Cache features (checkpoint paths only).
        cache_dir: Feature cache folder, shared with :func:`~esvit.eval.knn.knn_eval`
            (:mod:`esvit.eval.cache`; ``mode='flip'`` adds only the flipped view); default
            ``output_dir/features``.
        progress: Show tqdm bars.

    Returns:
        ``{"train": {"top1", "top5"}, "val": {...}, "protocol": "linear", "n_train", "n_val",
        "num_classes", "bank_classes" (training classes), "val_classes", "chance": {"train":
        {"top1", ...}, "val": {...}}, "val_in_bank", "flags", "feature_dim", "mode", "solver",
        "norm", "classes", "preprocess": {"protocol", ...}, ...}`` (accuracies and chance
        levels in percent, rounded to 4 decimals). Evaluations that cannot mean anything are
        refused before any feature is computed (see :mod:`esvit.eval.validity`).

    Raises:
        esvit.eval.validity.MeaninglessEvaluationError: Fewer than 2 training classes, or a
            validation class with no training image.
        esvit.eval.outputs.ForeignFilesError: ``output_dir`` holds files esvit did not write.
    """
    from esvit.eval.outputs import OutputFolder

    solver, norm = _check_options(mode, solver, norm, epochs, batch_size, max_iter)
    folder = OutputFolder(output_dir, "esvit-linear").claim() if output_dir is not None else None
    try:
        cache_at = resolve_cache_dir(folder, cache, cache_dir, "esvit-linear")
        results, clf = _linear_probe(
            backbone, train, val, val_split, cache_at, progress, checkpoint_key=checkpoint_key,
            backbone_name=backbone_name, image_size=image_size, canvas_size=canvas_size,
            preprocess=preprocess, feature=feature, n_last=n_last, avgpool=avgpool, mode=mode,
            solver=solver, norm=norm, epochs=epochs, lr=lr, batch_size=batch_size, l2=l2,
            max_iter=max_iter, num_workers=num_workers, device=device, seed=seed)
        if folder is not None:
            folder.torch_save("linear_classifier.pt", {
                "state_dict": {k: v.cpu() for k, v in clf.state_dict().items()},
                "in_dim": results["feature_dim"], "num_classes": results["num_classes"],
                "norm": norm, "classes": results["classes"], "feature": feature,
                "n_last": results["n_last"], "avgpool": avgpool,
                "image_size": results["image_size"], "preprocess": results["preprocess"],
                "checkpoint": results["checkpoint"]})
            folder.write_json("linear_results.json", results)
            results["output_dir"] = str(folder.root)
    finally:
        if folder is not None:
            folder.release()
    return results


def _check_options(mode: str, solver: str | None, norm: str | None, epochs: int, batch_size: int,
                   max_iter: int) -> tuple[str, str]:
    """Validate the probe options; returns the resolved ``(solver, norm)``."""
    if mode not in LINEAR_MODES:
        raise ValueError(f"mode must be one of {LINEAR_MODES}, got {mode!r}")
    solver = solver or ("sgd" if mode == "augment" else "lbfgs")
    if solver not in LINEAR_SOLVERS:
        raise ValueError(f"solver must be one of {LINEAR_SOLVERS}, got {solver!r}")
    if mode == "augment" and solver != "sgd":
        raise ValueError("mode='augment' recomputes features every epoch and needs solver='sgd'")
    norm = norm or ("bn" if mode == "augment" else "standardize")
    if norm not in LINEAR_NORMS:
        raise ValueError(f"norm must be one of {LINEAR_NORMS}, got {norm!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("max_iter", max_iter)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return solver, norm


def _linear_probe(backbone: Any, train: str | Path, val: str | Path | None,
                  val_split: int | None, cache_dir: Path | None, progress: bool, *,
                  checkpoint_key: str, backbone_name: str | None, image_size: int | None,
                  canvas_size: int | None, preprocess: str, feature: str, n_last: int | None,
                  avgpool: bool, mode: str, solver: str, norm: str, epochs: int, lr: float,
                  batch_size: int, l2: float, max_iter: int, num_workers: int,
                  device: str | torch.device | None, seed: int,
                  ) -> tuple[dict[str, Any], LinearClassifier]:
    """:func:`linear_probe` once its options are checked and its output folder claimed."""
    from esvit.eval.validity import chance_levels, evaluation_basis

    dev = resolve_device(device)
    model = resolve_eval_model(backbone, checkpoint_key=checkpoint_key, backbone_name=backbone_name,
                               image_size=image_size, feature=feature, n_last=n_last,
                               avgpool=avgpool, device=dev)
    tr_ds, va_ds, classes = labeled_splits(train, val, val_split, canvas_size or model.image_size)
    c = len(classes)
    pre = resolve_preprocess(preprocess, model.image_size, probe_paths(tr_ds, va_ds), canvas_size,
                             allow_canvas=mode == "augment")
    # refuse before computing any feature (the same check runs again on the readable images)
    first = evaluation_basis("linear", tr_ds.labels, va_ds.labels, c, classes,
                             bank_paths=tr_ds.paths, val_paths=va_ds.paths,
                             bank_word="training set", log_flags=False)
    # the augment mode's training crops are drawn from the whole decoded canvas (no centre crop)
    aug_ds = tr_ds.with_preprocess(EvalPreprocess("resize", model.image_size,
                                                  canvas_size or pre.decode_size))
    tr_ds, va_ds = tr_ds.with_preprocess(pre), va_ds.with_preprocess(pre)

    def features_of(ds: Any, split: str, flip: bool) -> _Split:
        f, y, fl = cached_features(model, ds, split, dev, batch_size=batch_size,
                                   num_workers=num_workers, flip=flip, cache_dir=cache_dir,
                                   progress=progress, command="esvit-linear")
        return _Split(f, y, fl)

    va = features_of(va_ds, "val", False)
    if mode == "augment":
        clf = _train_linear_augment(model, aug_ds, c, model.image_size, epochs, lr, batch_size,
                                    norm, num_workers, dev, seed, progress)
        tr = features_of(tr_ds, "train", False)
    else:
        tr = features_of(tr_ds, "train", mode == "flip")
        evaluation_basis("linear", tr.labels, va.labels, c, classes, bank_word="training set",
                         log_flags=False)  # before training on the readable images
        clf = _fit_cached(tr, c, solver, norm, l2, max_iter, epochs, lr, batch_size, dev, seed)
    basis = evaluation_basis("linear", tr.labels, va.labels, c, classes,
                             val_in_bank=first.val_in_bank, bank_word="training set")
    results: dict[str, Any] = {
        "train": accuracy(_predict(clf, tr.features, dev), tr.labels),
        "val": accuracy(_predict(clf, va.features, dev), va.labels),
        **basis.record(),
        "chance": {"train": chance_levels(np.bincount(tr.labels.numpy(), minlength=c)),
                   "val": basis.chance},
        "n_train": basis.n_bank, "classes": list(classes),
        "feature_dim": int(tr.features.shape[1]), "mode": mode, "solver": solver, "norm": norm,
        "feature": feature, "n_last": model.encoder.n_last or None, "avgpool": avgpool,
        "image_size": model.image_size, "preprocess": pre.record(), "checkpoint": model.source,
        "written_by": "esvit-linear",
        **({"epochs": epochs, "lr": lr, "batch_size": batch_size} if solver == "sgd"
           else {"l2": l2, "max_iter": max_iter}),
    }
    return results, clf


def _fit_cached(tr: _Split, c: int, solver: str, norm: str, l2: float, max_iter: int, epochs: int,
                lr: float, batch_size: int, dev: torch.device, seed: int) -> LinearClassifier:
    """Train on cached features (``mode`` none / flip)."""
    if solver == "lbfgs":
        x, y = tr.features, tr.labels
        if tr.flipped is not None:
            x, y = torch.cat([x, tr.flipped]), torch.cat([y, y])
        return train_linear_lbfgs(x, y, c, l2=l2, max_iter=max_iter, norm=norm, device=dev)
    return train_linear_sgd(tr.features, tr.labels, c, epochs=epochs, lr=lr,
                            batch_size=batch_size, norm=norm, flipped=tr.flipped, device=dev,
                            seed=seed)


def describe_linear(results: dict[str, Any]) -> list[str]:
    """Printed lines of a :func:`linear_probe` result: every number with what it was computed on."""
    lines = []
    method = f"linear {results['solver']}, {results['mode']} mode"
    for split in ("train", "val"):
        acc, chance = results[split], results["chance"][split]
        top5 = f"  top-5 {acc['top5']:6.2f}%" if "top5" in acc else ""
        lines.append(f"{split:>5}  top-1 {acc['top1']:6.2f}%{top5}  ({results['n_' + split]} "
                     f"images, {results['num_classes']} classes, chance top-1 "
                     f"{chance['top1']:.2f}%; {method} on {results['n_train']} training images)")
    lines += [f"warning: {flag}" for flag in results.get("flags", ())]
    return lines
