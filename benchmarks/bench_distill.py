#!/usr/bin/env python
"""Does distillation beat training on labels alone, for the same CPU budget?

On ``../shared/data/cifar10/train`` (skipped cleanly when absent):

1. the last ``--val-per-class`` images of every class (250: 2,500 images) are the validation set;
2. a teacher (torchvision ResNet-18, ``student.backbone=resnet18``) is trained on labels with
   ``esvit-distill``'s own loop (``teacher.kind=none``, ``loss.kind=ce``) on the first
   ``--teacher-per-class`` images of every class (500: 5,000 images), unless ``--teacher`` gives a
   ``student.pt`` / checkpoint to reuse;
3. every arm trains the same small ViT student (``vit_nano``, patch 4, depth 2, 75k parameters) on
   the first ``--student-per-class`` images of every class (100: 1,000 labeled images, a subset of
   the teacher's) for the same CPU budget: ``optim.cpu_budget_s`` (``time.process_time()`` of the
   run: data decoding, augmentation, teacher forwards or the teacher-logit cache, student forward /
   backward / update), with the cosine schedule laid over the budget (warmup 2% of it). This is the
   usual distillation setting: a stronger model trained on more labels teaches a small one.
   ``--student-per-class 500`` gives the same-data setting (student and teacher on the same 5,000
   images), where this tiny, under-fitting student gains little from the teacher.

Arms: ``labels`` (cross-entropy only), ``kd`` (Hinton KD, T=4), ``dkd``, ``dist``, ``deit`` (DeiT
distillation token, hard distillation), ``nkd``, and the feature methods ``fitnet``, ``crd`` and
``ofa`` (online teacher: they read its stages on every crop; docs/distillation_methods.md). ``--teacher-mode cached`` (default) computes the teacher
logits once on the un-augmented training images (its cost is inside the budget); ``online`` runs
the teacher on every augmented crop (about half the student steps here). One intra-op thread per
run (arms run ``--jobs`` at a time), so CPU time is not inflated by idle OpenMP spinning when other
processes share the cores.

    python benchmarks/bench_distill.py                      # ~20 min on a 2-core CPU
    python benchmarks/bench_distill.py --budget 60 --teacher-epochs 5 --seeds 1 --arms labels,kd  # quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esvit.distill import distill, load_distill_config  # noqa: E402
from esvit.train.logger import read_metrics  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train"
STUDENT = ["student.backbone=vit_nano", "student.backbone_kwargs={image_size: 32, patch_size: 4, depth: 2}"]
ARMS: dict[str, list[str]] = {
    "labels": ["teacher.kind=none", "loss.kind=ce"],
    "kd": ["loss.kind=kd", "loss.kd.alpha=0.5", "loss.kd.temperature=4.0"],
    "dkd": ["loss.kind=dkd", "loss.dkd.alpha=1.0", "loss.dkd.beta=8.0", "loss.dkd.temperature=4.0",
            "loss.dkd.warmup_epochs=5"],
    "dist": ["loss.kind=dist", "loss.dist.beta=1.0", "loss.dist.gamma=1.0", "loss.dist.tau=1.0"],
    "deit": ["student.deit=true", "loss.kind=deit_hard"],
    # feature / contrastive methods read the teacher's stages on every crop: online teacher
    "nkd": ["loss.kind=nkd"],
    "fitnet": ["loss.kind=fitnet", "teacher.mode=online"],
    "crd": ["loss.kind=crd", "teacher.mode=online", "loss.crd.num_negatives=512"],
    "ofa": ["loss.kind=ofa", "teacher.mode=online"],
}


def common(args: argparse.Namespace, out: Path, per_class: int) -> list[str]:
    """Overrides shared by every run: data split, augmentation, optimiser, logging."""
    return [
        f"data.path={args.data}", f"data.val_split={args.val_per_class}",
        f"data.max_train_per_class={per_class}", "data.num_workers=0", "data.canvas_size=32",
        "augment.image_size=32", "augment.scale=[0.35, 1.0]", "optim.batch_size=100",
        "logging.wandb=disabled", "logging.progress=false", "checkpoint.every_epochs=0", "checkpoint.keep_last=1",
        "eval.teacher=false", f"logging.output_dir={out}", f"seed={args.seed}",
    ]


def run(overrides: list[str], max_steps: int | None = None) -> dict[str, Any]:
    """One in-process ``distill`` run; returns its results plus CPU accounting from metrics.jsonl."""
    cfg = load_distill_config(None, overrides)
    shutil.rmtree(cfg.logging.output_dir, ignore_errors=True)  # fresh: no stale metrics / logit cache
    res = distill(cfg, max_steps=max_steps)
    recs = [r for r in read_metrics(Path(cfg.logging.output_dir) / "metrics.jsonl") if "cpu_s" in r]
    return {"results": res.results, "records": recs, "step": res.step}


def train_teacher(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    out = args.out / "teacher"
    t0 = time.process_time()
    r = run(common(args, out, args.teacher_per_class) + [
        "optim.batch_size=128", "student.backbone=resnet18", "student.backbone_kwargs={image_size: 32}", "teacher.kind=none",
        "loss.kind=ce", "optim.optimizer=sgd", "optim.lr=0.1", "optim.weight_decay=5e-4",
        f"optim.epochs={args.teacher_epochs}", "optim.warmup_epochs=1", "logging.log_every=50"])
    info = {"val": r["results"]["val"], "cpu_s": time.process_time() - t0, "epochs": args.teacher_epochs}
    return out / "student.pt", info


def arm_overrides(args: argparse.Namespace, name: str, teacher: Path) -> list[str]:
    ov = list(ARMS[name]) + [f"optim.lr={args.lr}", "optim.weight_decay=0.05"]
    if name != "labels":
        ov += ["teacher.kind=classifier", f"teacher.checkpoint={teacher}"]
        if not any(o.startswith("teacher.mode=") for o in ARMS[name]):  # the feature methods need online
            ov.append(f"teacher.mode={args.teacher_mode}")
    return ov


def run_arm(args: argparse.Namespace, name: str, seed: int, teacher: Path) -> dict[str, Any]:
    """Calibrate, then train arm ``name`` with ``seed`` for the CPU budget; return its result row."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    tag = f"{name}_s{seed}"
    r = run(common(args, args.out / tag, args.student_per_class) + STUDENT + arm_overrides(args, name, teacher) + [
        f"optim.cpu_budget_s={args.budget}", "optim.epochs=1000", "optim.warmup_epochs=20", "logging.log_every=25"])
    res = r["results"]
    row = {"arm": name, "seed": seed, "loss": res["loss"], "steps": res["steps"], "epochs": round(res["epochs"], 1),
           "cpu_s": round(res["cpu_s"], 1), "cpu_s_at_step1": round(r["records"][0]["cpu_s"], 1),
           "top1": res["val"]["top1"], "top5": res["val"].get("top5")}
    if "heads" in res["val"]:
        row["heads"] = {k: v["top1"] for k, v in res["val"]["heads"].items()}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_distill"))
    p.add_argument("--teacher", type=Path, help="reuse this student.pt / checkpoint as the teacher")
    p.add_argument("--teacher-epochs", type=int, default=25)
    p.add_argument("--teacher-mode", choices=("cached", "online"), default="cached")
    p.add_argument("--budget", type=float, default=150.0, help="CPU seconds per student arm")
    p.add_argument("--arms", default="labels,kd,deit", help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--teacher-per-class", type=int, default=500, help="labeled images per class of the teacher")
    p.add_argument("--student-per-class", type=int, default=100,
                   help="labeled images per class of the students (the first of the teacher's)")
    p.add_argument("--val-per-class", type=int, default=250)
    p.add_argument("--lr", type=float, default=2e-3, help="student AdamW lr per 256 images")
    p.add_argument("--seed", type=int, default=0, help="first student seed (the teacher uses it too)")
    p.add_argument("--seeds", type=int, default=2, help="student seeds per arm")
    p.add_argument("--jobs", type=int, default=2, help="arms run in parallel (1 thread each)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"SKIP: {args.data} not found (the shared CIFAR-10 image folder)")
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()

    if args.teacher is not None:
        teacher, tinfo = args.teacher, {"reused": str(args.teacher)}
    else:
        teacher, tinfo = train_teacher(args)
        print(f"teacher resnet18: val top-1 {tinfo['val']['top1']:.2f}% after {args.teacher_epochs} epochs "
              f"({tinfo['cpu_s']:.0f} CPU s)", flush=True)

    jobs = [(name, seed) for seed in range(args.seed, args.seed + args.seeds) for name in arms]
    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            rows = list(pool.map(run_arm, [args] * len(jobs), [j[0] for j in jobs], [j[1] for j in jobs],
                                 [teacher] * len(jobs)))
    else:
        rows = [run_arm(args, name, seed, teacher) for name, seed in jobs]
    for row in rows:
        print(f"{row['arm']:>7} seed {row['seed']}: val top-1 {row['top1']:6.2f}%  top-5 {row['top5']:6.2f}%  "
              f"{row['steps']} steps ({row['epochs']} epochs) in {row['cpu_s']:.1f} CPU s", flush=True)
    mean = {name: sum(r["top1"] for r in rows if r["arm"] == name) / args.seeds for name in arms}

    summary = {"data": str(args.data), "n_train_teacher": args.teacher_per_class * 10,
               "n_train_student": args.student_per_class * 10, "n_val": args.val_per_class * 10,
               "student": "vit_nano patch 4, depth 2, dim 64", "budget_cpu_s": args.budget,
               "teacher_mode": args.teacher_mode, "teacher": tinfo, "arms": rows, "mean_top1": mean,
               "wall_s": round(time.perf_counter() - wall0, 1), "threads": 1}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    base = mean.get("labels")
    for name in arms:
        delta = f" ({mean[name] - base:+.2f} points vs labels only)" if base is not None and name != "labels" else ""
        print(f"{name:>7}: mean val top-1 over {args.seeds} seed(s) {mean[name]:6.2f}%{delta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
