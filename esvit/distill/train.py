"""Knowledge distillation from a frozen teacher into a student classifier: the training loop.

``distill(cfg, resume=...)`` is what ``esvit-distill`` / ``distill.py`` call. It reuses the
pretraining machinery: :func:`esvit.train.distributed.init_distributed` (torchrun, DDP on the
student), :class:`esvit.data.sampler.EpochBlockSampler` (data order a pure function of
``(seed, epoch)``), atomic checkpoints loaded with ``weights_only=True`` (keep the last K,
``--resume auto``), :class:`esvit.train.logger.MetricLogger` (``metrics.jsonl`` + wandb) and a
tqdm bar. Workers only decode images to a ``uint8`` canvas; the random resized crop, flip and
normalisation run batched on the training device (:class:`TrainAugment`).

Output directory: ``config.yaml``, ``metrics.jsonl``, ``checkpoint_XXXXXXXX.pt``,
``distill_results.json`` (validation top-1 / top-5 of the student and the teacher),
``student.pt`` (the classifier; a valid ``teacher.kind=classifier`` input),
``student_backbone.pt`` (an esvit backbone export: usable by ``esvit-linear`` / ``esvit-knn``)
and, for DeiT students, ``student_vit.pt`` (plain torchvision ``VisionTransformer`` state dict).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from esvit.augment.crop import resized_crop, sample_crop_boxes
from esvit.augment.multicrop import IMAGENET_MEAN, IMAGENET_STD
from esvit.config import ConfigError, config_to_dict, save_config
from esvit.data import BadImageCounter, build_dataset
from esvit.data.sampler import EpochBlockSampler
from esvit.distill.config import DistillConfig, DistillLossConfig, TeacherConfig
from esvit.distill.deit import (
    ClassifierModel,
    DeiTVisionTransformer,
    build_student,
    to_plain_vit_state_dict,
    vit_hyperparameters,
)
from esvit.distill.losses import DeiTDistillationLoss, DISTLoss, DKDLoss, KDLoss, LabelLoss
from esvit.eval.features import make_loader, preprocess, write_json
from esvit.eval.linear import accuracy
from esvit.schedules import warmup_cosine
from esvit.train import checkpoint as ckpt
from esvit.train.distributed import DistInfo, all_true, barrier, gather_rng_states, init_distributed
from esvit.train.logger import MetricLogger
from esvit.train.optim import clip_gradients

__all__ = [
    "CHECKPOINT_FORMAT",
    "CLASSIFIER_FORMAT",
    "DataSplits",
    "DistillResult",
    "FrozenTeacher",
    "NonFiniteLossError",
    "TrainAugment",
    "build_criterion",
    "build_splits",
    "build_teacher",
    "distill",
    "evaluate",
    "load_classifier",
]

log = logging.getLogger("esvit.distill")

CHECKPOINT_FORMAT = "esvit-distill"
CLASSIFIER_FORMAT = "esvit-classifier"
PLAIN_VIT_FORMAT = "esvit-plain-vit"
FORMAT_VERSION = 1
RESULTS_FILE = "distill_results.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped without writing a checkpoint."""


@dataclass
class DistillResult:
    """Summary of a finished run.

    Attributes:
        output_dir: Run directory.
        step: Final global optimiser step.
        last_checkpoint: Last checkpoint written (or resumed from).
        losses: Per-step training loss of this process (this invocation only).
        results: What ``distill_results.json`` holds (rank 0; empty elsewhere).
    """

    output_dir: Path
    step: int
    last_checkpoint: Path | None
    losses: list[float]
    results: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ data


class _Split(Dataset):
    """Items ``(image uint8 (3, S, S), label, ok, position)`` of ``base[indices]``.

    ``position`` indexes this split (cached teacher logits use it); ``ok`` is False when the
    file could not be decoded (``image`` / ``label`` then come from the base dataset's
    substitute). ``label_map`` remaps base labels (validation folders with other class order).
    """

    def __init__(self, base: Any, indices: np.ndarray, label_map: np.ndarray | None = None) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.label_map = label_map
        labels = np.asarray(base.labels, dtype=np.int64)[self.indices]
        self.labels = label_map[labels] if label_map is not None else labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int, bool, int]:
        image, label, status = self.base[int(self.indices[i])]
        if self.label_map is not None and label >= 0:
            label = int(self.label_map[label])
        return image, int(label), bool(status.ok), int(i)


@dataclass
class DataSplits:
    """Training / validation splits and the class names (labels index ``classes``)."""

    train: _Split
    val: _Split | None
    classes: list[str]
    val_source: str


def _labeled_base(kind: str, path: str | None, cfg: DistillConfig, train: bool, what: str) -> Any:
    d = cfg.data
    ds = build_dataset(kind, path, d.canvas_size, train=train, max_bad_fraction=d.max_bad_fraction,
                       synthetic_images=d.synthetic_images if train else max(d.synthetic_images // 4, d.synthetic_classes),
                       synthetic_classes=d.synthetic_classes, seed=cfg.seed)
    if getattr(ds, "labels", None) is None:
        raise ValueError(f"{what}: {path} is not labeled; put the images in one subfolder per class "
                         "(e.g. train/cat/*.jpg, train/dog/*.jpg)")
    return ds


def build_splits(cfg: DistillConfig) -> DataSplits:
    """Training and validation datasets described by ``cfg.data``.

    Validation is ``data.val_path`` if given, else the last ``data.val_split`` images of every
    class (sorted order, deterministic), else the test split of ``synthetic`` / ``cifar*`` kinds,
    else none. ``data.max_train_per_class`` then keeps the first images of every class.

    Raises:
        ValueError: Missing / unlabeled data, unknown validation classes, classes too small.
    """
    d = cfg.data
    base = _labeled_base(d.kind, d.path, cfg, True, "data.path")
    classes = list(base.classes)
    labels = np.asarray(base.labels, dtype=np.int64)
    all_idx = np.arange(len(labels))
    val: _Split | None = None
    train_idx = all_idx[labels >= 0]
    source = "none"
    if d.val_path:
        vbase = _labeled_base("folder", d.val_path, cfg, True, "data.val_path")
        index = {c: i for i, c in enumerate(classes)}
        unknown = [c for c in vbase.classes if c not in index]
        if unknown:
            raise ValueError(f"data.val_path: classes not in the training data: {', '.join(unknown[:5])}")
        lmap = np.asarray([index[c] for c in vbase.classes], dtype=np.int64)
        val = _Split(vbase, np.arange(len(vbase)), lmap)
        source = f"folder {d.val_path}"
    elif d.val_split > 0:
        held, small = [], []
        for c in range(len(classes)):
            idx = all_idx[labels == c]
            if len(idx) <= d.val_split:
                small.append(f"{classes[c]} ({len(idx)})")
            held.append(idx[-d.val_split:])
        if small:
            raise ValueError(f"data.val_split={d.val_split} needs more than {d.val_split} images in every "
                             f"class; too small: {', '.join(small[:5])}")
        held_idx = np.sort(np.concatenate(held))
        train_idx = np.setdiff1d(train_idx, held_idx)
        val = _Split(base, held_idx)
        source = f"last {d.val_split} images per class of the training data"
    elif d.kind != "folder":
        vbase = _labeled_base(d.kind, d.path, cfg, False, "data.path")
        val = _Split(vbase, np.arange(len(vbase)))
        source = f"{d.kind} test split"
    if d.max_train_per_class > 0:
        keep = [train_idx[labels[train_idx] == c][: d.max_train_per_class] for c in range(len(classes))]
        train_idx = np.sort(np.concatenate(keep))
    return DataSplits(_Split(base, train_idx), val, classes, source)


# ---------------------------------------------------------------------------------- augmentation


class TrainAugment:
    """Batched random resized crop + horizontal flip + ImageNet normalisation, on the device.

    Box parameters come from an internal CPU ``torch.Generator`` (``get_state`` /
    ``set_state`` for exact resume); the crop, resize and flip are one ``roi_align`` call on
    the images' device (:func:`esvit.augment.crop.resized_crop`). With ``world_size`` ranks,
    every rank draws the parameters of the whole global batch from the same stream and keeps
    its own block, so a global batch is augmented identically whatever the number of ranks.

    Args:
        size: Output side.
        scale: Crop area range (fraction of the canvas).
        ratio: Aspect-ratio range.
        flip: Random horizontal flip with probability 0.5.
        seed: Generator seed (the same on every rank).
        rank: This rank.
        world_size: Number of ranks.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float], flip: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.size, self.scale, self.ratio, self.flip = int(size), tuple(scale), tuple(ratio), flip
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: Tensor) -> Tensor:
        """Args: images: uint8 ``(b, 3, H, W)``. Returns: float ``(b, 3, size, size)`` normalised."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"expected uint8 images (b, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        b, _, h, w = images.shape
        n, lo = b * self.world_size, b * self.rank
        boxes = sample_crop_boxes(h, w, n, self.scale, self.ratio, generator=self.generator)[lo:lo + b]
        flip = (torch.rand(n, generator=self.generator) < 0.5)[lo:lo + b] if self.flip else None
        x = resized_crop(images.float().div_(255.0), boxes, self.size, flip=flip)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def get_state(self) -> Tensor:
        """Generator state (CPU ByteTensor)."""
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        """Restore :meth:`get_state`."""
        self.generator.set_state(state)


# -------------------------------------------------------------------------------------- teachers


class FrozenTeacher(nn.Module):
    """A frozen classifier: normalised images ``(b, 3, h, w)`` -> logits ``(b, C)`` float32.

    Always in eval mode, no parameter requires grad, ``forward`` runs under ``no_grad`` and
    resizes its input to ``image_size`` (bilinear, antialiased) when needed.

    Args:
        net: Maps normalised images to logits.
        image_size: Input resolution the teacher expects.
        num_classes: Number of classes ``C``.
        classes: Class names it was trained on, when known.
        description: What it is (for logs and results).
    """

    def __init__(self, net: nn.Module, image_size: int, num_classes: int, classes: list[str] | None = None,
                 description: str = "") -> None:
        super().__init__()
        self.net = net
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes else None
        self.description = description
        self.net.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:  # noqa: ARG002 - always eval
        """The teacher stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Args: x: normalised ``(b, 3, h, w)``. Returns: logits ``(b, C)`` float32."""
        s = self.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        out = self.net(x)
        if out.ndim != 2 or out.shape[1] != self.num_classes:
            raise RuntimeError(f"teacher ({self.description}) returned {tuple(out.shape)}, expected "
                               f"(b, {self.num_classes})")
        return out.float()


def _unwrap_state(obj: dict[str, Any], path: Path) -> dict[str, Tensor]:
    state: Any = obj
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            state = inner
            break
    if not (isinstance(state, dict) and state and all(isinstance(v, Tensor) for v in state.values())):
        raise ckpt.CheckpointError(f"{path} is not a state dict of tensors; top-level keys: {sorted(map(str, obj))[:10]}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _check_classes(teacher_classes: list[str] | None, n: int, classes: list[str], what: str) -> None:
    if n != len(classes):
        raise ValueError(f"{what} predicts {n} classes but the data has {len(classes)} "
                         f"({', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''})")
    if teacher_classes and list(teacher_classes) != list(classes):
        diff = [f"{a}!={b}" for a, b in zip(teacher_classes, classes, strict=False) if a != b]
        raise ValueError(f"{what} was trained on other classes (or another class order) than the data: "
                         f"{', '.join(diff[:5])}")


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a student classifier written by ``esvit-distill``.

    Args:
        path: A distillation checkpoint (``checkpoint_*.pt``) or ``student.pt``.
        map_location: Device of the weights.

    Returns:
        ``(model, meta)``: the classifier in eval mode (a DeiT student returns the averaged
        log-probabilities of its two heads) and ``{"backbone", "backbone_kwargs", "deit",
        "num_classes", "classes", "image_size"}``.
    """
    path = Path(path)
    obj = ckpt.safe_load(path, map_location)
    if obj.get("format") == CHECKPOINT_FORMAT:
        state, meta = obj.get("student"), obj.get("student_meta")
    elif obj.get("format") == CLASSIFIER_FORMAT:
        state, meta = obj.get("state_dict"), obj
    else:
        raise ckpt.CheckpointError(f"{path} is neither an esvit-distill checkpoint nor a student.pt "
                                   f"(format {obj.get('format')!r})")
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise ckpt.CheckpointError(f"{path} lacks the student weights or metadata")
    model = build_student(meta["backbone"], meta.get("backbone_kwargs") or {}, int(meta["num_classes"]),
                          bool(meta.get("deit", False)))
    ckpt.check_state_dict(model, state, f"{path} [student]")
    model.load_state_dict(state)
    keys = ("backbone", "backbone_kwargs", "deit", "num_classes", "classes", "image_size")
    return model.to(map_location).eval(), {k: meta.get(k) for k in keys}


def build_teacher(t: TeacherConfig, classes: list[str], default_size: int,
                  device: torch.device | str = "cpu") -> FrozenTeacher:
    """Load the frozen teacher described by ``t``.

    Args:
        t: Teacher section of the config (``kind`` linear, torchvision or classifier).
        classes: Class names of the data (checked against the teacher's).
        default_size: Input size when neither ``t.image_size`` nor the checkpoint gives one.
        device: Device of the teacher.

    Raises:
        ValueError / CheckpointError / FileNotFoundError: Missing files, wrong architecture or
            classes; the message names the config key.
    """
    n = len(classes)
    if t.kind == "linear":
        from esvit.eval.features import FeatureEncoder
        from esvit.eval.linear import LinearClassifier
        from esvit.export import load_backbone_info

        info = load_backbone_info(t.checkpoint, t.backbone, t.checkpoint_key, t.backbone_kwargs or None)
        head_path = Path(t.linear_head) if t.linear_head else Path(t.checkpoint).parent / "linear_eval" / "linear_classifier.pt"
        if not head_path.is_file():
            raise FileNotFoundError(f"teacher.linear_head: {head_path} not found; train one with "
                                    f"esvit-linear --checkpoint {t.checkpoint} --train <folder> ... or set "
                                    "teacher.linear_head")
        head = ckpt.safe_load(head_path)
        for key in ("state_dict", "in_dim", "num_classes"):
            if key not in head:
                raise ckpt.CheckpointError(f"teacher.linear_head: {head_path} is not a linear_classifier.pt "
                                           f"(missing {key!r})")
        clf = LinearClassifier(int(head["in_dim"]), int(head["num_classes"]), head.get("norm", "none"))
        ckpt.check_state_dict(clf, head["state_dict"], f"teacher.linear_head {head_path}")
        clf.load_state_dict(head["state_dict"])
        encoder = FeatureEncoder(info.net, info.spec, head.get("feature", "pooled"), head.get("n_last"),
                                 bool(head.get("avgpool", False)))
        size = t.image_size or head.get("image_size") or info.image_size or default_size
        _check_classes(head.get("classes"), int(head["num_classes"]), classes, f"teacher.linear_head {head_path}")
        net: nn.Module = nn.Sequential(encoder, clf)
        desc = f"{info.name} ({t.checkpoint}) + linear head ({head_path})"
        teacher_classes = head.get("classes")
    elif t.kind == "torchvision":
        import torchvision.models as tvm
        from torchvision.models import get_model, list_models

        names = list_models(module=tvm)
        if t.arch not in names:
            raise ValueError(f"teacher.arch: unknown torchvision classifier {t.arch!r}; e.g. "
                             f"{', '.join(n for n in names if n.startswith(('resnet', 'vit', 'convnext')))}")
        net = get_model(t.arch, weights=None, num_classes=n, **dict(t.arch_kwargs))
        if t.weights:
            wpath = Path(t.weights)
            state = _unwrap_state(ckpt.safe_load(wpath), wpath)
            ckpt.check_state_dict(net, state, f"teacher.weights {wpath} (torchvision {t.arch}, {n} classes)")
            net.load_state_dict(state)
        else:
            log.warning("teacher.random_init=true: the %s teacher has RANDOM weights (smoke test only)", t.arch)
        size = t.image_size or default_size
        desc = f"torchvision {t.arch} ({t.weights or 'random weights'})"
        teacher_classes = None
    elif t.kind == "classifier":
        net, meta = load_classifier(t.checkpoint)
        _check_classes(meta.get("classes"), int(meta["num_classes"]), classes, f"teacher.checkpoint {t.checkpoint}")
        size = t.image_size or meta.get("image_size") or default_size
        desc = f"esvit-distill {meta['backbone']}{' (DeiT)' if meta.get('deit') else ''} ({t.checkpoint})"
        teacher_classes = meta.get("classes")
    else:
        raise ValueError(f"teacher.kind: cannot build a teacher of kind {t.kind!r}")
    return FrozenTeacher(net, int(size), n, teacher_classes, desc).to(device)


# ----------------------------------------------------------------------------------------- losses


def build_criterion(loss: DistillLossConfig) -> nn.Module:
    """The loss module selected by ``loss.kind`` with its hyper-parameters."""
    ls = loss.label_smoothing
    if loss.kind == "ce":
        return LabelLoss(ls)
    if loss.kind == "kd":
        return KDLoss(loss.kd.alpha, loss.kd.temperature, ls)
    if loss.kind == "dkd":
        p = loss.dkd
        return DKDLoss(p.alpha, p.beta, p.temperature, p.ce_weight, ls)
    if loss.kind == "dist":
        p2 = loss.dist
        return DISTLoss(p2.beta, p2.gamma, p2.tau, p2.ce_weight, ls)
    if loss.kind in ("deit_soft", "deit_hard"):
        return DeiTDistillationLoss(loss.kind.split("_")[1], loss.deit.alpha, loss.deit.tau, ls)
    raise ValueError(f"loss.kind: unknown {loss.kind!r}")


# ------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, image_size: int, device: torch.device,
             batch_size: int = 256, num_workers: int = 0) -> dict[str, Any]:
    """Top-1 / top-5 (percent) of a classifier on a split; unreadable images are skipped.

    Args:
        model: Maps normalised images to logits (a DeiT student is scored on the average of its
            two heads' softmax outputs, and per head under ``"heads"``).
        dataset: Items ``(image uint8, label, ok, position)``.
        image_size: Images are resized (antialiased) to this side.
        device: Device.
        batch_size: Batch size.
        num_workers: Decoding workers.

    Returns:
        ``{"top1", "top5" (>= 5 classes), "n"}`` plus ``"heads": {"cls": ..., "dist": ...}``
        for DeiT students.
    """
    was_training = model.training
    model.eval()
    deit = isinstance(model, DeiTVisionTransformer)
    outs: list[Tensor] = []
    heads: list[tuple[Tensor, Tensor]] = []
    labels: list[Tensor] = []
    try:
        for images, y, ok, _ in make_loader(dataset, batch_size, num_workers):
            ok = torch.as_tensor(ok, dtype=torch.bool)
            if not ok.any():
                continue
            x = preprocess(images[ok].to(device, non_blocking=device.type == "cuda"), image_size)
            if deit:
                c, d = model.forward_heads(x)
                heads.append((c.float().cpu(), d.float().cpu()))
                outs.append(model.combine(c, d).cpu())
            else:
                outs.append(model(x).float().cpu())
            labels.append(torch.as_tensor(y)[ok])
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("no readable validation images")
    logits, target = torch.cat(outs), torch.cat(labels)
    res: dict[str, Any] = {**accuracy(logits, target), "n": int(target.numel())}
    if deit:
        res["heads"] = {"cls": accuracy(torch.cat([h[0] for h in heads]), target),
                        "dist": accuracy(torch.cat([h[1] for h in heads]), target)}
    return res


# ------------------------------------------------------------------------------------ checkpoints


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or mode == "none":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _student_meta(cfg: DistillConfig, classes: list[str]) -> dict[str, Any]:
    s = cfg.student
    return {"backbone": s.backbone, "backbone_kwargs": dict(s.backbone_kwargs), "deit": s.deit,
            "num_classes": len(classes), "classes": list(classes), "image_size": cfg.augment.image_size}


def _save_checkpoint(out_dir: Path, step: int, student: nn.Module, opt: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, augment: TrainAugment, cfg: DistillConfig,
                     meta: dict[str, Any], info: DistInfo, run_id: str | None, cpu_s: float) -> Path:
    """All ranks call this (RNG states are gathered); rank 0 writes atomically and prunes."""
    rng = gather_rng_states({"augment": augment.get_state()}, info)
    path = ckpt.checkpoint_path(out_dir, step)
    if info.is_main:
        state = {
            "format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "student": student.state_dict(), "student_meta": meta, "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng,
            "config": config_to_dict(cfg), "wandb_run_id": run_id, "cpu_s": cpu_s,
        }
        ckpt.atomic_save(state, path)
        ckpt.prune_checkpoints(out_dir, cfg.checkpoint.keep_last)
        log.info("saved %s", path)
    barrier()
    return path


def _load_checkpoint(state: dict[str, Any], path: Path, student: nn.Module, opt: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, augment: TrainAugment, info: DistInfo) -> int:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ckpt.CheckpointError(f"{path} is not an esvit-distill checkpoint (format {state.get('format')!r})")
    for key in ("step", "student", "optimizer"):
        if key not in state:
            raise ckpt.CheckpointError(f"{path} is not a complete esvit-distill checkpoint (missing {key!r})")
    ckpt.check_state_dict(student, state["student"], f"{path} [student]")
    student.load_state_dict(state["student"])
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = state.get("rng") or []
    if len(rng) == info.world_size:
        s = rng[info.rank]
        torch.set_rng_state(s["torch"])
        augment.set_state(s["augment"])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
    else:
        log.warning("checkpoint has RNG states for %d ranks, run has %d: augmentation streams restart",
                    len(rng), info.world_size)
    return int(state["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def _write_exports(out_dir: Path, student: nn.Module, meta: dict[str, Any]) -> dict[str, str]:
    """``student.pt``, ``student_backbone.pt`` and (DeiT) ``student_vit.pt``; returns their paths."""
    from esvit.backbones import build_backbone
    from esvit.export import EXPORT_FORMAT

    files = {}
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    files["student"] = str(ckpt.atomic_save({"format": CLASSIFIER_FORMAT, "format_version": FORMAT_VERSION,
                                             **meta, "state_dict": state}, out_dir / "student.pt"))
    _, spec = build_backbone(meta["backbone"], **meta["backbone_kwargs"])
    if isinstance(student, DeiTVisionTransformer):
        backbone_state = to_plain_vit_state_dict(student, keep_head=False)
        files["student_vit"] = str(ckpt.atomic_save(
            {"format": PLAIN_VIT_FORMAT, "format_version": FORMAT_VERSION,
             "vit_kwargs": vit_hyperparameters(student), "num_classes": meta["num_classes"],
             "classes": meta["classes"], "state_dict": to_plain_vit_state_dict(student, keep_head=True)},
            out_dir / "student_vit.pt"))
    else:
        assert isinstance(student, ClassifierModel)
        backbone_state = {k: v.detach().cpu().clone() for k, v in student.backbone.state_dict().items()}
    files["student_backbone"] = str(ckpt.atomic_save(
        {"format": EXPORT_FORMAT, "format_version": 1, "backbone": meta["backbone"],
         "backbone_kwargs": meta["backbone_kwargs"], "export_ctor": spec.export_ctor,
         "image_size": meta["image_size"], "checkpoint_key": None, "state_dict": backbone_state},
        out_dir / "student_backbone.pt"))
    return files


# ------------------------------------------------------------------------------------------ pieces


def _build_optimizer(model: nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    """AdamW / SGD; no weight decay on biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        last = name.rsplit(".", 1)[-1]
        (no_decay if p.ndim <= 1 or "token" in last or "pos_embedding" in last else decay).append(p)
    groups = [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, nesterov=o.momentum > 0,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=o.weight_decay)


def _init_student(student: nn.Module, cfg: DistillConfig) -> None:
    """Copy the backbone weights of ``student.init_checkpoint`` into the student."""
    from esvit.export import load_backbone_info

    s = cfg.student
    info = load_backbone_info(s.init_checkpoint, s.backbone, "teacher", s.backbone_kwargs)
    state = info.net.state_dict()
    if isinstance(student, DeiTVisionTransformer):
        missing, unexpected = student.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith(("heads.", "head_dist.", "dist_"))]
        if bad or unexpected:
            raise ckpt.CheckpointError(f"student.init_checkpoint: {s.init_checkpoint} does not fit the DeiT "
                                       f"student (missing {bad[:5]}, unexpected {unexpected[:5]})")
    else:
        student.backbone.load_state_dict(state)
    log.info("student backbone initialised from %s", s.init_checkpoint)


def _teacher_logits_cache(teacher: FrozenTeacher, train: _Split, cfg: DistillConfig, out_dir: Path,
                          device: torch.device, info: DistInfo) -> Tensor:
    """Teacher logits ``(N, C)`` of the un-augmented training images (computed once, cached on disk)."""
    from esvit.train.checkpoint import CheckpointError

    key = json.loads(json.dumps({"teacher": config_to_dict(cfg.teacher), "data": config_to_dict(cfg.data),
                                 "n": len(train), "indices_sum": int(train.indices.sum()),
                                 "size": teacher.image_size, "seed": cfg.seed}, default=str))
    path = out_dir / "teacher_logits.pt"
    if path.is_file():
        try:
            obj = ckpt.safe_load(path)
            if obj.get("key") == key:
                log.info("teacher logits loaded from %s", path)
                return obj["logits"]
        except CheckpointError as e:
            log.warning("ignoring unreadable %s (%s)", path, e)
    shard = np.arange(info.rank, len(train), info.world_size)
    out = torch.zeros(len(train), teacher.num_classes, device=device)
    loader = make_loader(torch.utils.data.Subset(train, shard.tolist()), cfg.eval.batch_size, cfg.data.num_workers)
    for images, _, _, pos in tqdm(loader, desc="teacher logits", disable=not (info.is_main and cfg.logging.progress),
                                  leave=False):
        x = preprocess(images.to(device, non_blocking=device.type == "cuda"), teacher.image_size)
        out[torch.as_tensor(pos, device=device)] = teacher(x)
    if info.distributed:
        torch.distributed.all_reduce(out)
    out = out.cpu()
    if info.is_main:
        ckpt.atomic_save({"key": key, "logits": out}, path)
    barrier()
    return out


def _mean_over_ranks(metrics: dict[str, float], device: torch.device, info: DistInfo) -> dict[str, float]:
    if not info.distributed:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def _log_eval(logger: MetricLogger, res: dict[str, Any], step: int, prefix: str = "val") -> None:
    rec = {f"{prefix}_{k}": v for k, v in res.items() if k in ("top1", "top5")}
    for head, acc in (res.get("heads") or {}).items():
        rec.update({f"{prefix}_{head}_{k}": v for k, v in acc.items()})
    logger.log(rec, step)


# ------------------------------------------------------------------------------------------- loop


def distill(cfg: DistillConfig, resume: str | None = None, max_steps: int | None = None) -> DistillResult:
    """Run (or resume) a distillation run described by ``cfg``.

    Args:
        cfg: Validated configuration (:func:`esvit.distill.config.load_distill_config`).
        resume: None (fresh run; refuses a directory holding checkpoints), ``"auto"`` (latest
            readable checkpoint in the output directory, fresh if none) or a checkpoint path.
        max_steps: Stop after this global step (smoke tests); schedules span the full run, and
            no final evaluation / export happens before the last step.

    Returns:
        :class:`DistillResult`.
    """
    info, device = init_distributed(cfg.device)
    out_dir = Path(cfg.logging.output_dir)
    o = cfg.optim
    if o.batch_size % info.world_size:
        raise ConfigError(f"optim.batch_size: {o.batch_size} is not divisible by world_size ({info.world_size})")
    micro = o.batch_size // info.world_size
    if resume is None and ckpt.list_checkpoints(out_dir):
        raise FileExistsError(f"{out_dir} already holds checkpoints: pass --resume auto to continue that run, "
                              "or choose another logging.output_dir")
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    cpu0, wall0 = time.process_time(), time.perf_counter()

    # ---- data (workers decode to a uint8 canvas; augmentation runs on `device`)
    splits = build_splits(cfg)
    classes = splits.classes
    sampler = EpochBlockSampler(len(splits.train), micro, info.rank, info.world_size, seed=cfg.seed)
    steps_per_epoch = sampler.batches_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(splits.train)} images: too few for one step of "
                         f"optim.batch_size={o.batch_size}; lower the batch size")
    nw = cfg.data.num_workers
    loader = DataLoader(splits.train, batch_size=micro, sampler=sampler, num_workers=nw, drop_last=True,
                        pin_memory=torch.cuda.is_available(), persistent_workers=nw > 0,
                        prefetch_factor=4 if nw > 0 else None)
    total = o.total_steps or o.epochs * steps_per_epoch
    stop = total if max_steps is None else min(max_steps, total)
    bad_counter = BadImageCounter(cfg.data.max_bad_fraction, getattr(splits.train.base, "paths", None))

    # ---- student, teacher, optimiser
    torch.manual_seed(cfg.seed)  # identical initial student on every rank
    student = build_student(cfg.student.backbone, cfg.student.backbone_kwargs, len(classes), cfg.student.deit)
    if cfg.student.init_checkpoint:
        _init_student(student, cfg)
    student.to(device)
    meta = _student_meta(cfg, classes)
    teacher = (build_teacher(cfg.teacher, classes, cfg.augment.image_size, device)
               if cfg.teacher.kind != "none" else None)
    torch.manual_seed(cfg.seed * 1000 + 1 + info.rank)  # per-rank stream for dropout
    augment = TrainAugment(cfg.augment.image_size, cfg.augment.scale, cfg.augment.ratio, cfg.augment.flip,
                           seed=cfg.seed * 1_000_003 + 1, rank=info.rank, world_size=info.world_size)
    criterion = build_criterion(cfg.loss)
    opt = _build_optimizer(student, cfg)
    dtype = _amp_dtype(o.amp, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    peak_lr = o.lr * o.batch_size / 256.0
    warmup = round(o.warmup_epochs * steps_per_epoch)

    # ---- resume
    step, run_id, last_ckpt, cpu_before = 0, None, None, 0.0
    if resume is not None:
        found = ckpt.load_latest(out_dir) if resume == "auto" else (Path(resume), ckpt.safe_load(resume))
        if found is not None:
            last_ckpt, state = found
            step = _load_checkpoint(state, last_ckpt, student, opt, scaler, augment, info)
            run_id, cpu_before = state.get("wandb_run_id"), float(state.get("cpu_s", 0.0))
            log.info("resumed from %s at step %d", last_ckpt, step)
            if info.is_main:
                _truncate_metrics(out_dir / "metrics.jsonl", step)
        elif info.is_main:
            log.info("no checkpoint in %s: starting a fresh run", out_dir)
    if step == 0 and info.is_main:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)  # records of an earlier attempt

    cached = None
    if teacher is not None and cfg.teacher.mode == "cached":
        cached = _teacher_logits_cache(teacher, splits.train, cfg, out_dir, device, info)
    model: nn.Module = DDP(student, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.distributed else student
    logger = MetricLogger(out_dir, cfg.logging.wandb, cfg.logging.wandb_project, run_id, config_to_dict(cfg),
                          active=info.is_main)
    if info.is_main:
        log.info("student %s%s (%d params), teacher: %s, loss %s; %d train / %s val images (%s), %d classes, "
                 "%d steps/epoch, %d steps, global batch %d on %d rank(s), device %s",
                 cfg.student.backbone, " + DeiT token" if cfg.student.deit else "",
                 sum(p.numel() for p in student.parameters()), teacher.description if teacher else "none",
                 cfg.loss.kind, len(splits.train), len(splits.val) if splits.val is not None else 0,
                 splits.val_source, len(classes), steps_per_epoch, total, o.batch_size, info.world_size, device)

    def cpu_s() -> float:
        return cpu_before + time.process_time() - cpu0

    budget = o.cpu_budget_s

    def budget_fraction() -> float:
        """Fraction of ``optim.cpu_budget_s`` used, maximum over ranks (identical on all ranks)."""
        t = torch.tensor([cpu_s() / budget], dtype=torch.float64, device=device)
        if info.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def run_eval(at_step: int) -> None:
        if info.is_main and splits.val is not None:
            res = evaluate(student, splits.val, cfg.augment.image_size, device, cfg.eval.batch_size, nw)
            _log_eval(logger, res, at_step)
            log.info("step %d: val top-1 %.2f%%", at_step, res["top1"])
        barrier()

    losses: list[float] = []
    student.train()
    bar = tqdm(total=stop, initial=step, disable=not (info.is_main and cfg.logging.progress), dynamic_ncols=True,
               desc="distill")
    t_last, imgs_since = time.perf_counter(), 0
    exhausted = False  # cpu budget spent
    try:
        while step < stop and not exhausted:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch)
            sampler.set_start(step - epoch * steps_per_epoch)
            it = iter(loader)
            for _ in range(steps_per_epoch - step % steps_per_epoch):
                if step >= stop:
                    break
                if budget > 0:
                    frac = budget_fraction()
                    if frac >= 1.0:
                        exhausted = True
                        break
                    n = 1_000_000  # schedule over the used fraction of the budget
                    lr = warmup_cosine(round(frac * n), n, round(min(o.warmup_epochs / o.epochs, 1.0) * n),
                                       peak_lr, o.min_lr)
                else:
                    lr = warmup_cosine(step, total, warmup, peak_lr, o.min_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                    if g["apply_wd"]:
                        g["weight_decay"] = o.weight_decay
                images, labels, ok, pos = next(it)
                bad_counter.update(torch.as_tensor(ok, dtype=torch.bool))
                nb = device.type == "cuda"
                images, labels = images.to(device, non_blocking=nb), labels.to(device, non_blocking=nb)
                x = augment(images)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    t_logits = None
                    if cached is not None:
                        t_logits = cached[pos].to(device, non_blocking=nb)
                    elif teacher is not None:
                        t_logits = teacher(x)
                    out = model(x)
                    if cfg.loss.kind == "dkd":
                        w = cfg.loss.dkd.warmup_epochs
                        ramp = min(step / (w * steps_per_epoch), 1.0) if w > 0 else 1.0
                        parts = criterion(out, t_logits, labels, kd_scale=ramp)
                    else:
                        parts = criterion(out, t_logits, labels)
                loss = parts["loss"]
                if not all_true(bool(torch.isfinite(loss).item()), device):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at step {step} (epoch {epoch}); stopping without saving. "
                        f"Last good checkpoint: {last_ckpt or 'none'}. Lower optim.lr or set optim.clip_grad, "
                        "then resume with --resume auto.")
                opt.zero_grad(set_to_none=True)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                if scaler is not None:
                    scaler.unscale_(opt)
                # one global norm, as DeiT clips (timm NativeScaler: clip_grad_norm_)
                grad_norm = clip_gradients(student.parameters(), o.clip_grad, "global")
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                step += 1
                with torch.no_grad():
                    logits = out[0] if isinstance(out, tuple) else out
                    metrics = {k: float(v.detach()) for k, v in parts.items()}
                    metrics["acc"] = float((logits.argmax(1) == labels).float().mean()) * 100
                    if t_logits is not None:
                        metrics["teacher_agree"] = float((logits.argmax(1) == t_logits.argmax(1)).float().mean()) * 100
                metrics = _mean_over_ranks(metrics, device, info)
                losses.append(metrics["loss"])
                imgs_since += o.batch_size
                if step % cfg.logging.log_every == 0 or step == stop or step == 1:
                    now = time.perf_counter()
                    ips = imgs_since / max(now - t_last, 1e-9)
                    t_last, imgs_since = now, 0
                    rec = {**metrics, "lr": lr, "epoch": step / steps_per_epoch, "images_per_s": ips,
                           "cpu_s": cpu_s(), "bad_images": bad_counter.bad}
                    if grad_norm is not None:
                        rec["grad_norm"] = float(grad_norm)
                    logger.log(rec, step)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['acc']:.1f}", lr=f"{lr:.2e}")
                bar.update(1)
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < stop:
                    last_ckpt = _save_checkpoint(out_dir, step, student, opt, scaler, augment, cfg, meta, info,
                                                 logger.run_id, cpu_s())
            if step % steps_per_epoch == 0 and step < stop and not exhausted:
                e = step // steps_per_epoch
                if cfg.checkpoint.every_epochs and e % cfg.checkpoint.every_epochs == 0:
                    last_ckpt = _save_checkpoint(out_dir, step, student, opt, scaler, augment, cfg, meta, info,
                                                 logger.run_id, cpu_s())
                if cfg.eval.every_epochs and e % cfg.eval.every_epochs == 0:
                    run_eval(step)
        bad_counter.finalize()
        if last_ckpt != ckpt.checkpoint_path(out_dir, step):
            last_ckpt = _save_checkpoint(out_dir, step, student, opt, scaler, augment, cfg, meta, info,
                                         logger.run_id, cpu_s())
        results: dict[str, Any] = {}
        if (step >= total or exhausted) and info.is_main:
            results = _final_report(cfg, splits, student, teacher, device, out_dir, meta, step, total,
                                    steps_per_epoch, cpu_s(), time.perf_counter() - wall0, losses, logger)
        barrier()
    finally:
        bar.close()
        logger.close()
    return DistillResult(out_dir, step, last_ckpt, losses, results)


def _final_report(cfg: DistillConfig, splits: DataSplits, student: nn.Module, teacher: FrozenTeacher | None,
                  device: torch.device, out_dir: Path, meta: dict[str, Any], step: int, total: int,
                  steps_per_epoch: int, cpu: float, wall: float, losses: list[float],
                  logger: MetricLogger) -> dict[str, Any]:
    """Rank 0: validation of student (and teacher), exports, ``distill_results.json``."""
    nw = cfg.data.num_workers
    results: dict[str, Any] = {
        "student": {**meta, "deit": cfg.student.deit}, "loss": cfg.loss.kind,
        "teacher": {"kind": cfg.teacher.kind, "mode": cfg.teacher.mode,
                    "description": teacher.description if teacher else None,
                    "image_size": teacher.image_size if teacher else None},
        "num_classes": len(splits.classes), "classes": splits.classes, "n_train": len(splits.train),
        "n_val": len(splits.val) if splits.val is not None else 0, "val_source": splits.val_source,
        "steps": step, "epochs": step / steps_per_epoch, "total_steps": total, "cpu_s": cpu,
        "cpu_budget_s": cfg.optim.cpu_budget_s or None,
        "wall_s": wall, "final_train_loss": losses[-1] if losses else None,
    }
    if splits.val is not None:
        results["val"] = evaluate(student, splits.val, cfg.augment.image_size, device, cfg.eval.batch_size, nw)
        _log_eval(logger, results["val"], step)
        if teacher is not None and cfg.eval.teacher:
            results["teacher_val"] = evaluate(teacher, splits.val, teacher.image_size, device,
                                              cfg.eval.batch_size, nw)
            _log_eval(logger, results["teacher_val"], step, "teacher_val")
    else:
        log.warning("no validation split (set data.val_path or data.val_split): accuracy not reported")
    results["files"] = _write_exports(out_dir, student, meta)
    write_json(results, out_dir / RESULTS_FILE)
    return results
