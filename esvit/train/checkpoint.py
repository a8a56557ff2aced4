"""Atomic checkpoints that hold tensors and plain data only.

Checkpoints are written to a temporary file in the same directory, flushed and fsynced, then
renamed over the final name (:func:`esvit.run.fsio.atomic_write`), so a crash or a full disk
never leaves a truncated ``checkpoint_*.pt`` and a write error names the file and its cause.

Loading is in one place, :func:`safe_load` (``torch.load(weights_only=True)``: a pickle carrying
code is refused), used for every file esvit reads back: an empty, truncated, corrupt or forged
file, or a field of the wrong type, is a one-line :class:`CheckpointError` naming the file (and
the field), never advice to load unsafely. :func:`load_checkpoint` also requires a kind and all
its fields (:data:`SCHEMAS`); :func:`load_latest` / :func:`load_resume` fall back past unusable
checkpoints with a warning when the choice is automatic (``--resume auto``).
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esvit.run.fsio import atomic_write, describe_os_error

log = logging.getLogger("esvit.checkpoint")

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8,})\.pt$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not match the model."""


def atomic_save(obj: Any, path: str | Path, what: str = "checkpoint") -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename).

    Args:
        obj: Tensors and plain data.
        path: Final path (its folder is created).
        what: What the file is, for the error message.

    Returns:
        The final path.

    Raises:
        OutputDirError: A write error (disk full, quota, read-only ...), one line naming ``path``
            and the operating system's cause; the temp file is removed and an existing ``path``
            is left intact.
    """
    return atomic_write(path, lambda f: torch.save(obj, f), what)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Path of the checkpoint for global step ``step``."""
    return Path(output_dir) / f"checkpoint_{step:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints in ``output_dir`` sorted by step (oldest first); temp files are ignored."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; return the deleted paths."""
    ckpts = list_checkpoints(output_dir)
    doomed = ckpts[:-keep_last] if keep_last > 0 else []
    leftovers = list(Path(output_dir).glob(".checkpoint_*.tmp"))  # of a killed writer
    deleted = []
    for p in doomed + leftovers:
        try:
            p.unlink(missing_ok=True)
        except OSError as e:  # the run goes on; the disk just fills faster
            log.warning("cannot delete old checkpoint file %s: %s", p, describe_os_error(e))
        else:
            if p in doomed:
                deleted.append(p)
    return deleted


# ---------------------------------------------------------------------------------------- loading
# Every esvit file read with torch.load goes through safe_load: one place that turns any damaged,
# forged or foreign file into a one-line CheckpointError naming the file (and the field).

# ``format`` values of the files other modules write (esvit.export, esvit.distill.train).
FORMAT_KINDS = {"esvit-backbone": "export", "esvit-distill": "distill", "esvit-classifier": "classifier",
                "esvit-plain-vit": "plain_vit"}
KIND_NAMES = {
    "training": "an esvit-train checkpoint",
    "distill": "an esvit-distill checkpoint",
    "classifier": "an esvit-distill classifier (student.pt)",
    "plain_vit": "an esvit-distill plain ViT (student_vit.pt)",
    "export": "an exported backbone (esvit-export, student_backbone.pt)",
    "linear_head": "a linear classifier (esvit-linear's linear_classifier.pt)",
    "feature_cache": "a feature cache (esvit-knn, esvit-linear)",
    "teacher_logits": "a teacher-logits cache (esvit-distill)",
    "state_dict": "a bare state dict",
    "unknown": "not an esvit file (unknown layout)",
}
RUN_KINDS = ("training", "distill")  # what --resume reads
# A training checkpoint read for its weights only (esvit-knn, esvit-export ...) needs just 'teacher'
# or 'student': its resume fields are required by load_checkpoint, not by safe_load.
PARTIAL_KINDS = ("training",)


@dataclass(frozen=True)
class Field:
    """One field of a checkpoint kind: dotted name, type check, what it must be, required."""

    name: str
    check: Callable[[Any], bool]
    expected: str
    required: bool = True


def is_state_dict(v: Any) -> bool:
    """A mapping of parameter names to tensors."""
    return isinstance(v, Mapping) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _is_optimizer_state(v: Any) -> bool:
    return isinstance(v, Mapping) and isinstance(v.get("state"), Mapping) and isinstance(v.get("param_groups"), list)


def _is_count(v: Any, least: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _or_none(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _is(*types: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, types) and not (bool not in types and isinstance(v, bool))


_STATE = (is_state_dict, "a state dict (names -> tensors)")
_MAPPING = (_is(Mapping), "a mapping")
_TENSOR = (_is(torch.Tensor), "a tensor")
_STEP = (_is_count, "an integer >= 0")
_CLASSES = (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of class names")
_SIZE = (_or_none(lambda v: _is_count(v, 1)), "an integer >= 1 or null")
_N = (lambda v: _is_count(v, 1), "an integer >= 1")
_STR = (_is(str), "a string")


def _fields(*specs: tuple[str, tuple[Callable[[Any], bool], str], bool]) -> tuple[Field, ...]:
    return tuple(Field(name, check, expected, required) for name, (check, expected), required in specs)


SCHEMAS: dict[str, tuple[Field, ...]] = {
    "training": _fields(
        ("step", _STEP, True), ("student", _STATE, True), ("teacher", _STATE, True),
        ("view_center", _TENSOR, True), ("optimizer", (_is_optimizer_state, "an optimizer state dict"), True),
        ("config", _MAPPING, True), ("region_center", (_or_none(_is(torch.Tensor)), "a tensor or null"), False),
        ("scaler", _MAPPING, False), ("rng", (_is(list), "a list"), False), ("backbone", _STR, False),
        ("wandb_run_id", (_or_none(_is(str)), "a string or null"), False), ("config.model", _MAPPING, False),
        ("config.model.backbone", _STR, False), ("config.model.backbone_kwargs", _MAPPING, False),
        ("config.augment", _MAPPING, False), ("config.augment.global_size", _N, False)),
    "distill": _fields(
        ("step", _STEP, True), ("student", _STATE, True), ("student_meta", _MAPPING, True),
        ("student_meta.backbone", _STR, True), ("student_meta.backbone_kwargs", _MAPPING, True),
        ("student_meta.num_classes", _N, True), ("student_meta.classes", _CLASSES, False),
        ("student_meta.image_size", _SIZE, False), ("student_meta.deit", (_is(bool), "true or false"), False),
        ("optimizer", (_is_optimizer_state, "an optimizer state dict"), True), ("config", _MAPPING, True),
        ("scaler", _MAPPING, False), ("rng", (_is(list), "a list"), False),
        ("cpu_s", (lambda v: _is(int, float)(v) and math.isfinite(v) and v >= 0, "a number >= 0"), False)),
    "classifier": _fields(
        ("state_dict", _STATE, True), ("backbone", _STR, True), ("backbone_kwargs", _MAPPING, True),
        ("num_classes", _N, True), ("deit", (_is(bool), "true or false"), False), ("classes", _CLASSES, False),
        ("image_size", _SIZE, False)),
    "plain_vit": _fields(("state_dict", _STATE, True), ("vit_kwargs", _MAPPING, True), ("num_classes", _N, True),
                         ("classes", _CLASSES, False)),
    "export": _fields(("state_dict", _STATE, True), ("backbone", _STR, True), ("backbone_kwargs", _MAPPING, False),
                      ("image_size", _SIZE, False)),
    "linear_head": _fields(("state_dict", _STATE, True), ("in_dim", _N, True), ("num_classes", _N, True),
                           ("norm", _STR, False), ("classes", _CLASSES, False), ("image_size", _SIZE, False)),
    "feature_cache": _fields(("key", _MAPPING, True), ("features", _TENSOR, True), ("labels", _TENSOR, True),
                             ("flipped", (_or_none(_is(torch.Tensor)), "a tensor or null"), False)),
    "teacher_logits": _fields(("key", _MAPPING, True), ("logits", _TENSOR, True)),
}


def identify(obj: Mapping[str, Any]) -> str:
    """The kind of a loaded esvit file (a key of :data:`KIND_NAMES`), from its layout alone."""
    fmt = obj.get("format")
    if fmt is not None:
        return FORMAT_KINDS.get(fmt, "unknown") if isinstance(fmt, str) else "unknown"
    if "teacher" in obj or "view_center" in obj or ("student" in obj and "step" in obj):
        return "training"
    if "in_dim" in obj and "state_dict" in obj:
        return "linear_head"
    if "key" in obj and ("features" in obj or "logits" in obj):
        return "feature_cache" if "features" in obj else "teacher_logits"
    if obj and (is_state_dict(obj) or any(is_state_dict(obj.get(k)) and obj.get(k) for k in ("state_dict", "model"))):
        return "state_dict"
    return "unknown"


_MISSING = object()


def _lookup(obj: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):  # name the first entry that is not a tensor, if any
        odd = next(((k, v) for k, v in value.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))),
                   None)
        if odd is not None:
            return f"a mapping whose entry {odd[0]!r} is a {type(odd[1]).__name__}"
    text = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(obj: Mapping[str, Any], path: str | Path, kind: str, require: bool = True) -> None:
    """Check the fields of a ``kind`` file: types of those present, presence of required ones.

    Raises:
        CheckpointError: ``{path}: field 'x' ...`` for the first missing or mistyped field.
    """
    for f in SCHEMAS.get(kind, ()):
        value = _lookup(obj, f.name)
        if value is _MISSING:
            parent = f.name.rpartition(".")[0]
            if require and f.required and (not parent or _lookup(obj, parent) is not _MISSING):
                raise CheckpointError(f"{path}: field '{f.name}' is missing ({KIND_NAMES[kind]} is damaged "
                                      "or incomplete)")
        elif not f.check(value):
            raise CheckpointError(f"{path}: field '{f.name}' must be {f.expected}, got {_describe(value)}")


def _unreadable(path: Path, e: BaseException) -> str:
    """Why ``torch.load`` failed, in one line that never advises loading unsafely."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes): an interrupted copy or a full disk?"
    with path.open("rb") as f:
        magic = f.read(4)
    text = " ".join(str(e).split())
    if isinstance(e, EOFError) or "central directory" in text:
        return f"the file is truncated or corrupt ({size} bytes; an interrupted copy?)"
    if magic == b"PK\x05\x06":
        return "an empty zip archive, not a PyTorch checkpoint"
    if magic == b"PK\x03\x04" and not isinstance(e, pickle.UnpicklingError):
        return "a zip archive that is not a PyTorch checkpoint (or a corrupt one)"
    if isinstance(e, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return (f"it holds a pickled {found.group(1)}, which could run code: refused (only tensors and "
                    "plain data are loaded)")
        return "not a PyTorch checkpoint (its pickle data is invalid or holds objects other than tensors)"
    if "weights_only" in text or not text:
        return f"not a PyTorch checkpoint ({type(e).__name__})"
    return f"not a PyTorch checkpoint ({type(e).__name__}: {text[:160]})"


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an esvit file with ``weights_only=True`` (tensors and plain data only) and check the
    types of the fields its kind defines (:data:`SCHEMAS`).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: One line naming the file: empty, truncated or corrupt file, a pickle that
            carries code, not a dict, or a field of the wrong type.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():  # never opened: reading a FIFO or a device can block forever
        what = "a directory" if path.is_dir() else "not a regular file"
        raise CheckpointError(f"cannot load checkpoint {path}: it is {what}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt/unsafe files
        raise CheckpointError(f"cannot load checkpoint {path}: {_unreadable(path, e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"cannot load checkpoint {path}: it holds a {type(obj).__name__}, expected a dict")
    kind = identify(obj)
    check_fields(obj, path, kind, require=kind not in PARTIAL_KINDS)
    return obj


def load_checkpoint(path: str | Path, kinds: str | Sequence[str] = RUN_KINDS,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`safe_load` a file that must be of one of ``kinds``, with all its required fields.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: Unreadable, of another kind (the message says which), or a field missing
            or of the wrong type (the message names it).
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    obj = safe_load(path, map_location)
    kind = identify(obj)
    if kind not in kinds:
        wanted = " or ".join(KIND_NAMES[k] for k in kinds)
        raise CheckpointError(f"{path} is {KIND_NAMES[kind]}, expected {wanted}")
    check_fields(obj, path, kind)
    _check_networks(obj, path, kind)
    return obj


def _check_networks(obj: Mapping[str, Any], path: str | Path, kind: str) -> None:
    """A run checkpoint's weights are finite (esvit never saves NaN/inf weights) and, for training
    checkpoints, the student and the teacher have the same parameters (one is forged otherwise)."""
    for field in ("student", "teacher", "view_center", "region_center"):
        value = obj.get(field)
        tensors = value.items() if isinstance(value, Mapping) else [("", value)]
        bad = [k for k, t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()
               and not bool(torch.isfinite(t).all())]
        if bad:
            where = f" (first: {bad[0]})" if bad[0] else ""
            raise CheckpointError(f"{path}: field '{field}' holds NaN or inf{where}: a damaged file")
    if kind == "training":
        student, teacher = obj["student"], obj["teacher"]
        odd = [k for k in student.keys() | teacher.keys()
               if k not in student or k not in teacher or student[k].shape != teacher[k].shape]
        if odd:
            raise CheckpointError(f"{path}: fields 'student' and 'teacher' differ ({len(odd)} entries, first: "
                                  f"{sorted(odd)[0]}): a damaged or forged file")


def load_latest(
    output_dir: str | Path, map_location: str | torch.device = "cpu", kinds: str | Sequence[str] = RUN_KINDS,
    check: Callable[[dict[str, Any], Path], None] | None = None,
) -> tuple[Path, dict] | None:
    """Load the newest valid checkpoint, falling back to older ones with a warning.

    A checkpoint is valid when it loads, is of one of ``kinds``, has all its fields and passes
    ``check(state, path)`` (e.g. the shapes of the model being resumed; it raises
    :class:`CheckpointError`).

    Returns:
        ``(path, checkpoint)`` or None if the directory has no checkpoint.

    Raises:
        CheckpointError: Checkpoints exist but none is valid (each one's reason is listed).
    """
    ckpts = list_checkpoints(output_dir)
    errors = []
    for p in reversed(ckpts):
        try:
            state = load_checkpoint(p, kinds, map_location)
            if check is not None:
                check(state, p)
            return p, state
        except (CheckpointError, OSError) as e:
            log.warning("skipping unusable checkpoint %s (%s); trying the previous one", p, e)
            errors.append(str(e))
    if ckpts:
        raise CheckpointError(f"no readable checkpoint in {output_dir}: " + "; ".join(errors))
    return None


def load_resume(
    resume: str | Path, output_dir: str | Path, kinds: str | Sequence[str] = RUN_KINDS,
    check: Callable[[dict[str, Any], Path], None] | None = None, map_location: str | torch.device = "cpu",
) -> tuple[Path, dict] | None:
    """The checkpoint ``--resume`` names: ``auto`` is :func:`load_latest` (fallback with a warning),
    a path is :func:`load_checkpoint` plus ``check`` (an error naming the file and the field).

    Returns:
        ``(path, checkpoint)``, or None for ``auto`` in a directory without checkpoints.
    """
    if str(resume) == "auto":
        return load_latest(output_dir, map_location, kinds, check)
    path = Path(resume)
    state = load_checkpoint(path, kinds, map_location)
    if check is not None:
        check(state, path)
    return path, state


def _state_problems(own: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> dict[str, list[str]]:
    """Missing, unexpected, non-tensor, mis-shaped and non-finite entries of ``state``."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {
        "missing keys": [k for k in own if k not in state],
        "unexpected keys": [k for k in state if k not in own],
        "non-tensor values": [f"{k}: {type(v).__name__}" for k, v in state.items() if k in own and k not in tensors],
        "shape mismatches": [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                             for k, v in own.items() if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)],
        "non-finite tensors (NaN or inf)": [k for k, v in tensors.items()
                                            if v.is_floating_point() and not bool(torch.isfinite(v).all())],
    }


def check_state_dict(module: nn.Module, state: Any, what: str, max_listed: int = 5) -> None:
    """Validate that ``state`` matches ``module`` exactly (keys, types, shapes, finite values).

    Raises:
        CheckpointError: Naming the first missing, unexpected, mis-shaped or damaged keys.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} must be a state dict (names -> tensors), got {type(state).__name__}")
    problems = {name: items for name, items in _state_problems(module.state_dict(), state).items() if items}
    if not problems:
        return
    parts = [f"{len(items)} {name} (first: {('; ' if 'shape' in name else ', ').join(items[:max_listed])})"
             for name, items in problems.items()]
    damaged = all(name.startswith("non-") for name in problems)
    why = "is damaged" if damaged else "does not match the model (another architecture or config?)"
    raise CheckpointError(f"{what} {why}: " + "; ".join(parts))


def check_optimizer_state(opt: torch.optim.Optimizer, state: Any, what: str) -> None:
    """Validate a saved optimizer state against ``opt``: groups, parameter counts, state shapes.

    Raises:
        CheckpointError: Naming the first group or parameter that does not fit.
    """
    if not _is_optimizer_state(state):
        raise CheckpointError(f"{what} must be an optimizer state dict, got {type(state).__name__}")
    saved, own = state["param_groups"], opt.param_groups
    if len(saved) != len(own):
        raise CheckpointError(f"{what} has {len(saved)} parameter groups, the model's optimizer {len(own)}")
    params: dict[Any, torch.Tensor] = {}
    for i, (s, o) in enumerate(zip(saved, own, strict=True)):
        ids = s.get("params") if isinstance(s, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(o["params"]):
            raise CheckpointError(f"{what}: parameter group {i} does not match the model's "
                                  f"({len(o['params'])} parameters)")
        params.update(zip(ids, o["params"], strict=True))
    for idx, entry in state["state"].items():
        if idx not in params or not isinstance(entry, Mapping):
            raise CheckpointError(f"{what}: state of parameter {idx!r} does not fit the model")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[idx].shape:
                raise CheckpointError(f"{what}: state '{name}' of parameter {idx} has shape {tuple(value.shape)}, "
                                      f"the parameter {tuple(params[idx].shape)}")
