"""A resume must continue the same run: compare the checkpoint's record with the current one.

A checkpoint records the resolved config (``"config"``) and the run's derived facts (``"run"``:
world size, micro-batch, steps per epoch, total steps, data set size and identity). On resume
:func:`compare_runs` lists every difference, outside the keys a command declares free to change
(logging, checkpoint frequency, loader workers, device, data location ...). The run refuses
with the list (:class:`~esvit.run.errors.ResumeMismatchError`) unless ``--allow-config-change``
accepts it, in which case every difference is logged. Settings an older checkpoint does not
record are unknown: they are logged as a warning, never refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esvit.run.errors import ResumeMismatchError

__all__ = ["Comparison", "check_resume", "compare_runs", "dataset_identity", "flatten"]

log = logging.getLogger("esvit.run")
MAX_LISTED = 12


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"section.key": value}`` (tuples as lists)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
            if not v:
                out[key] = {}
        else:
            out[key] = _plain(v)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _is_free(key: str, free: Iterable[str]) -> bool:
    return any(key == f or key.startswith(f + ".") for f in free)


@dataclass
class Comparison:
    """Differences between a checkpoint's record and the current run.

    Attributes:
        changed: ``"key: old -> new"`` for every compared setting that differs.
        unknown: Settings the checkpoint does not record (written by an older version).
        dropped: Settings the checkpoint records that this version no longer has.
    """

    changed: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def compare_runs(saved_config: Mapping[str, Any] | None, saved_facts: Mapping[str, Any] | None,
                 config: Mapping[str, Any], facts: Mapping[str, Any], free: Iterable[str] = ()) -> Comparison:
    """Compare the checkpoint's config and facts with the current ones.

    Args:
        saved_config: The checkpoint's ``"config"`` (None: not recorded).
        saved_facts: The checkpoint's ``"run"`` facts (None: not recorded).
        config: Current resolved config as a nested dict.
        facts: Current facts.
        free: Dotted keys (or sections) that may change on resume.

    Returns:
        :class:`Comparison`.
    """
    free = tuple(free)
    old = {**flatten(saved_config or {}), **flatten(saved_facts or {}, "run.")}
    new = {**flatten(config), **flatten(facts, "run.")}
    cmp = Comparison()
    for key in sorted(set(old) | set(new)):
        if _is_free(key, free):
            continue
        if key not in old:
            if (saved_config is None and not key.startswith("run.")) or (saved_facts is None and key.startswith("run.")):
                cmp.unknown.append(key)
            elif key.startswith("run."):
                cmp.unknown.append(key)
            else:
                cmp.unknown.append(f"{key} (now {new[key]!r})")
        elif key not in new:
            cmp.dropped.append(f"{key} (was {old[key]!r})")
        elif old[key] != new[key]:
            cmp.changed.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return cmp


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:MAX_LISTED])
    return shown + (f"; and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def check_resume(cmp: Comparison, checkpoint: Path, allow_changes: bool, log_info: bool = True) -> None:
    """Refuse a resume that changes the run, or log what ``--allow-config-change`` accepted.

    Raises:
        ResumeMismatchError: ``cmp.changed`` is not empty and ``allow_changes`` is False.
    """
    if cmp.unknown and log_info:
        log.warning("%s does not record %d setting(s) (written by an older version?): %s; cannot check that they "
                    "are unchanged: if the run used other values, set them explicitly", checkpoint,
                    len(cmp.unknown), _listing(cmp.unknown))
    if cmp.dropped and log_info:
        log.warning("%s records setting(s) this version no longer has: %s", checkpoint, _listing(cmp.dropped))
    if not cmp.changed:
        return
    if not allow_changes:
        raise ResumeMismatchError(
            f"resuming from {checkpoint} would change the run ({len(cmp.changed)} difference(s): "
            f"{_listing(cmp.changed)}); resume with the checkpoint's settings, or pass --allow-config-change to "
            "accept the changes (the run then differs from an uninterrupted one)"
        )
    if log_info:
        log.warning("resuming with changed settings (accepted by --allow-config-change): %s", _listing(cmp.changed))


def dataset_identity(names: Sequence[str] | None, labels: Any = None, size: int | None = None) -> dict[str, Any]:
    """Size and a short hash of a data set's file names (relative to their common folder) and labels.

    Moving the data set to another folder keeps its identity; adding, removing, renaming or
    relabelling a file changes it.

    Args:
        names: File paths (None for generated or array data sets: only the labels count).
        labels: Labels (array-like) or None.
        size: Number of samples (default: ``len(names)``).
    """
    h = hashlib.sha256()
    n = len(names) if names is not None else int(size or 0)
    if names is not None and n:
        first, last = str(names[0]), str(names[n - 1])
        cut = os.path.commonprefix([first, last]).rfind(os.sep) + 1
        for i in range(n):
            h.update(os.fsencode(str(names[i])[cut:]))
            h.update(b"\0")
    if labels is not None:
        h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes())
    return {"dataset_size": int(size if size is not None else n), "dataset_sha256": h.hexdigest()[:16]}
