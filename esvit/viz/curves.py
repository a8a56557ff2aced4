"""Training curves: every metric series of a run's ``metrics.jsonl`` as a small plot.

:class:`esvit.train.logger.MetricLogger` writes one JSON object per logged step,
``{"step": s, "loss": ..., "lr": ..., ...}``; epoch-level records (``knn_top1``, ...) come at other
steps, and a non-finite value is written as the string ``"nan"`` / ``"inf"``. Every key with a
number (or such a string) is a series; its points are the records that have it. A partly written
last line (a run still training) is skipped.

Panels are ordered by topic: losses, schedules (LR, weight decay, teacher momentum and
temperature, region weight), teacher entropy and collapse signals, kNN, then the rest.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Curves", "compute_curves", "draw_curves", "metric_topic", "plot_curves", "read_metric_series"]

METRICS_FILE = "metrics.jsonl"
SCHEDULES = ("lr", "weight_decay", "teacher_momentum", "teacher_temp", "region_weight")
TOPICS = ("losses", "schedules", "entropy and collapse", "kNN", "other")


@dataclass
class Curves:
    """The metric series of a run.

    Attributes:
        series: ``key -> (steps (k,), values (k,))`` in panel order (non-finite values kept).
        source: The ``metrics.jsonl`` read.
        png: The picture, once written.
    """

    series: dict[str, tuple[np.ndarray, np.ndarray]]
    source: Path
    png: Path | None = None


def metric_topic(key: str) -> int:
    """Index into :data:`TOPICS` of a metric name (its panel group)."""
    if "loss" in key:
        return 0
    if key in SCHEDULES:
        return 1
    if any(s in key for s in ("entropy", "kl_uniform", "token_similarity", "match_", "collapse")):
        return 2
    return 3 if key.startswith("knn") else 4


def _value(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(v)
    return None


def _metrics_file(run: str | os.PathLike[str]) -> Path:
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {Path(run)}: not a training run folder, or the run "
                                "has not logged yet (training writes it to logging.output_dir)")
    return path


def read_metric_series(run: str | os.PathLike[str]) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Read every numeric series of a run folder's (or a file's) ``metrics.jsonl``.

    Returns:
        The file and ``key -> (steps, values)`` sorted by step, keys in panel order
        (:func:`metric_topic`, then first appearance).

    Raises:
        FileNotFoundError: No ``metrics.jsonl``.
        ValueError: The file holds no record with a step and a number.
    """
    path = _metrics_file(run)
    points: dict[str, list[tuple[float, float]]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written, or damaged: not a record
            continue
        step = _value(rec.get("step")) if isinstance(rec, dict) else None
        if step is None or not math.isfinite(step):
            continue
        for key, raw in rec.items():
            v = _value(raw)
            if key != "step" and v is not None:
                points.setdefault(key, []).append((step, v))
    if not points:
        raise ValueError(f"{path} holds no metrics (no record with a step and a number)")
    first = {k: i for i, k in enumerate(points)}
    keys = sorted(points, key=lambda k: (metric_topic(k), first[k]))
    series = {}
    for k in keys:
        arr = np.array(sorted(points[k], key=lambda p: p[0]))
        series[k] = (arr[:, 0], arr[:, 1])
    return path, series


def compute_curves(run: str | os.PathLike[str], metrics: Sequence[str] | None = None) -> Curves:
    """Series of a run, optionally only those matching the glob patterns ``metrics`` (``loss*``)."""
    path, series = read_metric_series(run)
    if metrics:
        chosen = {k: v for k, v in series.items() if any(fnmatch.fnmatchcase(k, p) for p in metrics)}
        if not chosen:
            raise ValueError(f"no metric of {path} matches {' '.join(metrics)}; it has: {', '.join(series)}")
        series = chosen
    return Curves(series, path)


def draw_curves(res: Curves, columns: int = 4) -> Any:
    """One small plot per series (x: step), grouped by topic.

    Returns:
        A matplotlib figure; each series is one line labelled with its key.
    """
    from esvit.viz.render import pyplot

    plt = pyplot()
    n = len(res.series)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, (steps, values)) in zip(axes.flat, res.series.items(), strict=False):
        topic = metric_topic(key)
        ax.plot(steps, values, "-" if len(steps) > 1 else "o", color=colors[topic % len(colors)], lw=1.2,
                ms=4, label=key)
        bad = int((~np.isfinite(values)).sum())
        ax.set_title(key + (f" ({bad} non-finite)" if bad else ""), fontsize=8,
                     color="red" if bad else "black")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    fig.suptitle(f"{res.source.parent.name or res.source}: {n} metrics", fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                metrics: Sequence[str] | None = None) -> Curves:
    """Read a run's metrics and write the PNG ``out`` (default: ``curves.png`` beside them)."""
    from esvit.viz.render import save_figure

    res = compute_curves(run, metrics)
    res.png = save_figure(draw_curves(res), out or res.source.parent / "curves.png")
    return res
