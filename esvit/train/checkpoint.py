"""Atomic checkpoints that hold tensors and plain data only.

Checkpoints are written to a temporary file in the same directory, flushed and fsynced, then
renamed over the final name, so a crash never leaves a truncated ``checkpoint_*.pt``. They load
with ``torch.load(weights_only=True)``: a pickle carrying code is refused.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("esvit.checkpoint")

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8,})\.pt$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not match the model."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename).

    Returns:
        The final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual file mode
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain data only).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: Truncated/corrupt file, or a pickle that carries code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt/unsafe files
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


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
    for p in doomed:
        p.unlink(missing_ok=True)
    for tmp in Path(output_dir).glob(".checkpoint_*.tmp"):  # leftovers of a killed writer
        tmp.unlink(missing_ok=True)
    return doomed


def load_latest(output_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """Load the newest readable checkpoint, falling back to older ones with a warning.

    Returns:
        ``(path, checkpoint)`` or None if the directory has no checkpoint.

    Raises:
        CheckpointError: Checkpoints exist but none is readable.
    """
    ckpts = list_checkpoints(output_dir)
    errors = []
    for p in reversed(ckpts):
        try:
            return p, safe_load(p, map_location)
        except CheckpointError as e:
            log.warning("skipping unreadable checkpoint %s (%s); trying the previous one", p, e)
            errors.append(str(e))
    if ckpts:
        raise CheckpointError(f"no readable checkpoint in {output_dir}: " + "; ".join(errors))
    return None


def check_state_dict(module: nn.Module, state: Mapping[str, Any], what: str, max_listed: int = 5) -> None:
    """Validate that ``state`` matches ``module`` exactly (keys and shapes) before loading.

    Raises:
        CheckpointError: Naming the first missing, unexpected and mis-shaped keys.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:max_listed])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:max_listed])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (first: {'; '.join(shapes[:max_listed])})")
        raise CheckpointError(
            f"{what} does not match the model (another architecture or config?): " + "; ".join(parts)
        )
