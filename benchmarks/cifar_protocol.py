"""The CPU-budget CIFAR-10 protocol shared by ``quality_cifar10.py`` and ``region_cifar10.py``.

* Data: ``../shared/data/cifar10/train``; the last ``val_per_class`` images of every class (in
  scan order) are the validation split, the rest the pretraining set and the kNN / linear bank.
* Pretraining (:func:`pretrain`): a training config (YAML + dotted overrides, the same recipe
  ``esvit-train`` runs) for a **CPU-time** budget (``time.process_time``; other load on the
  machine does not favour any arm), its schedules stretched over the budget: their length is
  estimated at step 3 and re-estimated at step 30 and every 250 steps from the CPU time per step,
  keeping the config's fractions (warm-ups, last-layer freeze) of the run. Or exactly ``steps``.
* Scoring (:func:`evaluate`): kNN (k=20, T=0.07) and an L-BFGS linear probe on frozen pooled
  features, top-1 on the validation split.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from esvit.config import Config
from esvit.eval.features import preprocess
from esvit.eval.knn import knn_accuracy
from esvit.eval.linear import accuracy, train_linear_lbfgs
from esvit.train.collapse import CollapseMonitor
from esvit.train.loop import build_schedules, build_trainer
from esvit.train.optim import clip_gradients
from esvit.wrapper import NetWrapper

log = logging.getLogger("cifar")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train"
DEFAULT_CONFIG = ROOT / "configs" / "cifar10_vit_nano.yaml"
TRACE_EVERY = 25
TRACE_KEYS = ("loss", "view_loss", "region_loss", "token_similarity", "region_match_share", "region_match_accuracy",
              "region_teacher_entropy", "teacher_entropy")


def keep_freed_memory() -> None:
    """glibc: keep freed memory in the heap instead of unmapping it. Without this, every step's
    large temporaries are mmap'd, page-faulted and unmapped again: 20-35 % of a CPU step is
    system time (measured for vit_nano at patch 4). Applies to every arm alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    libc.mallopt(-2, 1 << 28)  # M_TOP_PAD


def start(data: str | Path, threads: int = 1) -> None:
    """Common start of the CIFAR benchmarks: INFO logging, ``threads`` intra-op threads, glibc told
    to keep freed memory, and the data folder checked (exit with a one-line message when absent)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(threads)
    keep_freed_memory()
    if not Path(data).is_dir():
        raise SystemExit(f"{data} not found: this benchmark needs the shared CIFAR-10 image folder")


def split_indices(labels: list[int], val_per_class: int) -> tuple[list[int], list[int]]:
    """Last ``val_per_class`` images of every class (in scan order) -> val; the rest -> train."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, val = [], []
    for idx in by_class.values():
        train += idx[:-val_per_class]
        val += idx[-val_per_class:]
    return sorted(train), sorted(val)


def batches(ds, indices: list[int], batch_size: int, shuffle: bool, seed: int, workers: int):
    """Endless (shuffle) or single-pass iterator of ``(uint8 images, labels)``."""
    loader = DataLoader(Subset(ds, indices), batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                        num_workers=workers, generator=torch.Generator().manual_seed(seed),
                        persistent_workers=shuffle and workers > 0)
    while True:
        for images, labels, _ in loader:
            yield images, labels
        if not shuffle:
            return


def estimate_total_steps(step: int, spent: float, budget: float, mark: float) -> int:
    """Steps that fit in ``budget`` CPU-s: those done plus the rest at the mean CPU time per step
    since step 3 (``mark`` CPU-s; the first steps are slower)."""
    per_step = (spent - mark) / (step - 3) if step > 3 else spent / max(step, 1)
    return max(step + int((budget - spent) / per_step), 4)


def pretrain(cfg: Config, ds, idx: list[int], budget_s: float, workers: int, steps: int = 0) -> dict[str, Any]:
    """Train ``cfg``'s trainer for ``budget_s`` CPU-seconds (or exactly ``steps`` steps, the
    schedules over them), as the training loop does (same trainer, schedules, clipping, frozen
    last layer, EMA). Returns the teacher backbone, the step count, a trace of the collapse
    metrics every :data:`TRACE_EVERY` steps and the collapse warnings with their first step."""
    torch.manual_seed(cfg.seed)
    tr = build_trainer(cfg, seed=cfg.seed)
    tr.train()
    opt = torch.optim.AdamW(tr.param_groups(), lr=0.0)
    monitor = CollapseMonitor(tr.out_dim, region_out_dim=tr.region_out_dim)
    o = cfg.optim
    it = batches(ds, idx, o.batch_size, True, cfg.seed, workers)
    step, c0, mark, sched = 0, time.process_time(), 0.0, None
    if steps:
        sched = build_schedules(cfg, steps_per_epoch=max(1, math.ceil(steps / o.epochs)))
    trace: list[dict[str, float]] = []
    warnings: dict[str, int] = {}
    while True:
        spent = time.process_time() - c0
        if (step >= steps) if steps else (spent >= budget_s):
            break
        if step == 3:
            mark = spent
        if not steps and (step in (3, 30) or (step and step % 250 == 0)):
            total = estimate_total_steps(step, spent, budget_s, mark)
            sched = build_schedules(cfg, steps_per_epoch=max(1, math.ceil(total / o.epochs)))
            log.info("step %d, %.0f CPU-s spent -> schedules over %d steps", step, spent, sched.total_steps)
        v = (sched or build_schedules(cfg, steps_per_epoch=1000)).at(step)
        for i, g in enumerate(opt.param_groups):
            g["lr"] = v.lr if sched else o.lr * o.batch_size / 256 * 0.01
            if g.get("apply_wd", i == 0):
                g["weight_decay"] = v.weight_decay
        images, _ = next(it)
        out = tr(images, v.teacher_temp, v.region_weight)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        clip_gradients(tr.student.parameters(), o.clip_grad, o.clip_mode,
                       frozen=tr.last_layer_parameters() if v.freeze_last_layer else ())
        opt.step()
        tr.update_teacher(v.teacher_momentum)
        metrics = {k: float(x.detach()) for k, x in out.items()}
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step}")
        for name in monitor.update(metrics, step):
            warnings.setdefault(name, step)
        if step % TRACE_EVERY == 0:
            trace.append({"step": step, "cpu_s": round(spent, 1),
                          **{k: round(metrics[k], 4) for k in TRACE_KEYS if k in metrics}})
            log.info("step %d %s (%.0f / %.0f CPU-s)", step, trace[-1], spent, budget_s)
        step += 1
    return {"steps": step, "images": step * o.batch_size, "cpu_s": round(time.process_time() - c0, 1),
            "trace": trace, "warnings": warnings, "backbone": tr.teacher.backbone.net}


@torch.no_grad()
def evaluate(net, spec, ds, train_idx: list[int], val_idx: list[int], size: int, workers: int,
             pool: str | None = None) -> dict[str, float]:
    """kNN and linear top-1 of the pooled features (``pool``: the backbone's own by default)."""
    wrapper = NetWrapper(net, spec.layer, spec.layout, pool=pool or spec.pool,
                         num_prefix_tokens=spec.num_prefix_tokens).eval()

    def feats(idx):
        xs, ys = [], []
        for images, labels in batches(ds, idx, 256, False, 0, workers):
            xs.append(wrapper(preprocess(images, size))[0].float())
            ys.append(labels)
        return torch.cat(xs), torch.cat(ys)

    tx, ty = feats(train_idx)
    vx, vy = feats(val_idx)
    knn = knn_accuracy(tx, ty, vx, vy, k=20, temperature=0.07, num_classes=10)
    with torch.enable_grad():
        clf = train_linear_lbfgs(tx, ty, 10, l2=1e-4, max_iter=300)
    lin = accuracy(clf(vx), vy)
    return {"knn_top1": knn["top1"], "linear_top1": lin["top1"]}
