"""Frozen teachers of a distillation run and the student classifiers it writes.

A teacher is a linear probe on a backbone pretrained here, a torchvision classifier with local
weights, a student an earlier ``esvit-distill`` run wrote (:func:`load_classifier`), or, for the
label-free kinds, a bare backbone pretrained here (``kind=backbone``: its pooled features, no
logits; the distiller reads its stages through hooks).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esvit.distill.config import TeacherConfig
from esvit.distill.deit import build_student
from esvit.distill.exports import CHECKPOINT_FORMAT, CLASSIFIER_FORMAT
from esvit.train import checkpoint as ckpt

__all__ = ["FrozenTeacher", "build_teacher", "load_classifier"]

log = logging.getLogger("esvit.distill")


class FrozenTeacher(nn.Module):
    """A frozen classifier: normalised images ``(b, 3, h, w)`` -> logits ``(b, C)`` float32.

    With ``output="features"`` (a bare backbone, ``teacher.kind=backbone``) the output is the
    pooled feature ``(b, C)`` instead, ``C`` its dimension: never scored as logits.

    Always in eval mode, no parameter requires grad, ``forward`` runs under ``no_grad`` and
    resizes its input to ``image_size`` (bilinear, antialiased) when needed.

    Args:
        net: Maps normalised images to logits.
        image_size: Input resolution the teacher expects.
        num_classes: Number of classes ``C``.
        classes: Class names it was trained on, when known.
        description: What it is (for logs and results).
        output: ``"logits"`` or ``"features"``.
    """

    def __init__(self, net: nn.Module, image_size: int, num_classes: int, classes: list[str] | None = None,
                 description: str = "", output: str = "logits") -> None:
        if output not in ("logits", "features"):
            raise ValueError(f"output must be 'logits' or 'features', got {output!r}")
        super().__init__()
        self.net = net
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes else None
        self.description = description
        self.output = output
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
        t: Teacher section of the config (``kind`` linear, torchvision, classifier or backbone).
        classes: Class names of the data (checked against a classifier teacher's; unused by
            ``backbone``).
        default_size: Input size when neither ``t.image_size`` nor the checkpoint gives one.
        device: Device of the teacher.

    Raises:
        ValueError / CheckpointError / FileNotFoundError: Missing files, wrong architecture or
            classes; the message names the config key.
    """
    if t.kind == "backbone":
        return _backbone_teacher(t, default_size).to(device)
    builders = {"linear": _linear_teacher, "torchvision": _torchvision_teacher, "classifier": _classifier_teacher}
    if t.kind not in builders:
        raise ValueError(f"teacher.kind: cannot build a teacher of kind {t.kind!r}")
    net, size, desc, teacher_classes = builders[t.kind](t, classes, default_size)
    return FrozenTeacher(net, int(size), len(classes), teacher_classes, desc).to(device)


_Built = tuple[nn.Module, int, str, "list[str] | None"]  # network, input size, description, its classes


def _linear_teacher(t: TeacherConfig, classes: list[str], default_size: int) -> _Built:
    """A backbone pretrained here plus the ``linear_classifier.pt`` esvit-linear wrote."""
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
    return (nn.Sequential(encoder, clf), size, f"{info.name} ({t.checkpoint}) + linear head ({head_path})",
            head.get("classes"))


def _torchvision_teacher(t: TeacherConfig, classes: list[str], default_size: int) -> _Built:
    """``torchvision.models.get_model(arch)`` with local weights (never downloaded)."""
    import torchvision.models as tvm
    from torchvision.models import get_model, list_models

    n = len(classes)
    names = list_models(module=tvm)
    if t.arch not in names:
        raise ValueError(f"teacher.arch: unknown torchvision classifier {t.arch!r}; e.g. "
                         f"{', '.join(m for m in names if m.startswith(('resnet', 'vit', 'convnext')))}")
    net = get_model(t.arch, weights=None, num_classes=n, **dict(t.arch_kwargs))
    if t.weights:
        wpath = Path(t.weights)
        state = _unwrap_state(ckpt.safe_load(wpath), wpath)
        ckpt.check_state_dict(net, state, f"teacher.weights {wpath} (torchvision {t.arch}, {n} classes)")
        net.load_state_dict(state)
    else:
        log.warning("teacher.random_init=true: the %s teacher has RANDOM weights (smoke test only)", t.arch)
    return net, t.image_size or default_size, f"torchvision {t.arch} ({t.weights or 'random weights'})", None


def _classifier_teacher(t: TeacherConfig, classes: list[str], default_size: int) -> _Built:
    """A student an earlier esvit-distill run wrote."""
    net, meta = load_classifier(t.checkpoint)
    _check_classes(meta.get("classes"), int(meta["num_classes"]), classes, f"teacher.checkpoint {t.checkpoint}")
    size = t.image_size or meta.get("image_size") or default_size
    desc = f"esvit-distill {meta['backbone']}{' (DeiT)' if meta.get('deit') else ''} ({t.checkpoint})"
    return net, size, desc, meta.get("classes")


def _backbone_teacher(t: TeacherConfig, default_size: int) -> FrozenTeacher:
    """A bare esvit backbone (any file :func:`esvit.export.load_backbone_info` reads): pooled features out."""
    from esvit.eval.features import FeatureEncoder
    from esvit.export import load_backbone_info

    if not t.checkpoint:
        raise ValueError("teacher.checkpoint: a backbone teacher needs a checkpoint or export")
    info = load_backbone_info(t.checkpoint, t.backbone, t.checkpoint_key, t.backbone_kwargs or None)
    size = t.image_size or info.image_size or default_size
    return FrozenTeacher(FeatureEncoder(info.net, info.spec), int(size), int(info.spec.embed_dim), None,
                         f"{info.name} backbone ({t.checkpoint})", output="features")
