"""Metrics to a JSON-lines file and to Weights & Biases (offline/disabled by default).

Every record is one whole line (:class:`esvit.run.fsio.LineAppender`): a full disk or a kill
never leaves half a record written by this process, and a failed write is one
:class:`~esvit.run.errors.OutputDirError` naming the file and the cause.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

from esvit.run.fsio import LineAppender, atomic_write_text, probe_writable

log = logging.getLogger("esvit")


class MetricLogger:
    """Writes one JSON object per line to ``metrics.jsonl`` and mirrors it to wandb.

    Only rank 0 should create an active logger; other ranks pass ``active=False``.

    Args:
        output_dir: Run directory.
        wandb_mode: ``disabled``, ``offline`` (no account needed) or ``online``.
        tensorboard: Also write TensorBoard scalars to ``<output_dir>/tensorboard``.
        project: wandb project name.
        run_id: wandb run id to resume (kept across restarts), or None for a new one.
        config: Resolved config dict logged to wandb.
        active: False makes every call a no-op.
    """

    def __init__(
        self,
        output_dir: str | Path,
        wandb_mode: str = "offline",
        project: str = "esvit",
        run_id: str | None = None,
        config: dict[str, Any] | None = None,
        active: bool = True,
        tensorboard: bool = False,
    ) -> None:
        self.active = active
        self.path = Path(output_dir) / "metrics.jsonl"
        self.run_id = run_id
        self._wandb = None
        self._tb = None
        if not active:
            return
        if tensorboard:  # optional third sink; the package is checked when the config loads
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if not self.path.parent.is_dir():
            probe_writable(self.path.parent)
        self._file = LineAppender(self.path, "metrics file")
        if wandb_mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self.run_id = run_id or uuid.uuid4().hex[:8]
                self._wandb = wandb.init(
                    project=project, dir=str(output_dir), mode=wandb_mode, id=self.run_id,
                    resume="allow", config=config or {},
                )
            except Exception as e:  # noqa: BLE001 - wandb must never kill a run
                log.warning("wandb (%s) unavailable, logging to %s only: %s", wandb_mode, self.path, e)
                self._wandb = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append a record ``{"step": step, **metrics}``."""
        if not self.active:
            return
        rec = {"step": step}
        for k, v in metrics.items():
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            rec[k] = v
        self._file.append(json.dumps(rec))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "step"}, step=step)
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def sync(self) -> None:
        """fsync the metrics file (called before every checkpoint)."""
        if self.active:
            self._file.sync()

    def close(self) -> None:
        """Flush and close the file and finish the wandb run."""
        if not self.active:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file back into a list of dicts."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop the records of ``path`` logged after ``step`` (a resumed run logs them again).

    Malformed lines (a record cut by a crash of an older version) are dropped with a warning. The
    file is rewritten atomically.
    """
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln) if ln.strip() else None
        except json.JSONDecodeError:
            rec = None
            log.warning("dropping a malformed line of %s (written by a killed run?)", path)
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep), "metrics file")
