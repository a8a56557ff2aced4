"""Label-free distillation of an esvit backbone vs. pretraining the small backbone with esvit.

Protocol (shared CIFAR-10 folder, :mod:`cifar_protocol`): the last ``--val-per-class`` images of
every class are held out; the rest is the (unlabelled) training set and, subsampled to
``--eval-train`` images, the kNN / linear bank.

1. Teacher: ``vit_nano`` (``configs/cifar10_vit_nano.yaml``) pretrained with esvit for
   ``--teacher-min`` CPU-minutes, exported as a ``.pt`` backbone.
2. Student (a) ``distill``: ``vit_nano`` with ``depth=--student-depth``, distilled without labels
   from the frozen teacher for ``--student-min`` CPU-minutes with ``esvit-distill`` and
   ``configs/distill_feature_cifar10.yaml`` (``teacher.kind=backbone``, ``loss.kind=feature``) on a
   label-free list of the training images.
3. Student (b) ``esvit``: the same student backbone pretrained with the plain esvit recipe
   (``configs/cifar10_vit_nano.yaml``) for the same ``--student-min`` CPU-minutes.

Scores: kNN (k=20, T=0.07) and L-BFGS linear top-1 of the pooled features on the held-out split
(:func:`cifar_protocol.evaluate`). CPU time is ``time.process_time`` of this process (decode workers
not counted, for every arm alike). Results: ``--out`` (JSON) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from cifar_protocol import (
    DATA,
    DEFAULT_CONFIG,
    ROOT,
    evaluate,
    pretrain,
    split_indices,
    start,
)

from esvit.backbones import build_backbone
from esvit.config import load_config
from esvit.data import build_dataset
from esvit.distill.config import load_distill_config
from esvit.distill.train import distill
from esvit.export import load_backbone_info
from esvit.formats import backbone_card, write_backbone

log = logging.getLogger("cifar")
DISTILL_CONFIG = ROOT / "configs" / "distill_feature_cifar10.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--teacher-min", type=float, default=5.0, help="CPU minutes of the teacher's pretraining")
    p.add_argument("--student-min", type=float, default=4.0, help="CPU minutes of each student arm")
    p.add_argument("--student-depth", type=int, default=1)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--eval-train", type=int, default=5000, help="kNN / linear bank size (0 = all)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set-distill", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the distill config")
    p.add_argument("--work", default="runs/distill_label_free")
    p.add_argument("--out", default="runs/distill_label_free.json")
    return p


def export(net: torch.nn.Module, name: str, kwargs: dict, path: Path) -> Path:
    """The standard backbone export (``.safetensors`` + JSON card, :mod:`esvit.formats`), what
    ``teacher.kind=backbone`` and ``esvit-knn`` read."""
    _, spec = build_backbone(name, **kwargs)
    card = backbone_card(name, kwargs, spec.export_ctor, kwargs.get("image_size"), path.name, "safetensors")
    return write_backbone(net, path, "safetensors", card, kwargs.get("image_size"))


def main() -> None:
    args = build_parser().parse_args()
    start(args.data, args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(DEFAULT_CONFIG, [f"data.num_workers={args.workers}"])
    size = cfg.augment.global_size
    ds = build_dataset("folder", args.data, cfg.data.canvas_size)
    train_idx, val_idx = split_indices(list(ds.labels), args.val_per_class)
    bank = train_idx
    if args.eval_train and args.eval_train < len(train_idx):
        g = torch.Generator().manual_seed(0)
        bank = sorted(torch.tensor(train_idx)[torch.randperm(len(train_idx), generator=g)[:args.eval_train]].tolist())
    results: dict = {"settings": vars(args), "n_train": len(train_idx), "n_bank": len(bank), "n_val": len(val_idx)}

    def score(arm: str, net, spec, info: dict) -> None:
        net.eval()
        info.update(evaluate(net, spec, ds, bank, val_idx, size, args.workers))
        results[arm] = info
        log.info("%s: %s", arm, info)

    # 1. teacher
    t_kwargs = dict(cfg.model.backbone_kwargs)
    info = pretrain(cfg, ds, train_idx, args.teacher_min * 60, args.workers)
    teacher = info.pop("backbone")
    info = {k: info[k] for k in ("steps", "images", "cpu_s")}
    t_path = export(teacher, cfg.model.backbone, t_kwargs, work / "teacher_backbone.safetensors")
    score("teacher", teacher, build_backbone(cfg.model.backbone, **t_kwargs)[1], info)

    # 2a. label-free distillation (an unlabelled list of the training images)
    listing = work / "train_unlabelled.txt"
    listing.write_text("".join(f"{ds.paths[i]}\n" for i in train_idx))
    s_kwargs = {"image_size": size, "depth": args.student_depth}
    dcfg = load_distill_config(DISTILL_CONFIG, [
        f"teacher.checkpoint={t_path}", f"data.path={listing}", f"data.num_workers={args.workers}",
        f"student.backbone_kwargs={json.dumps(s_kwargs)}", f"optim.cpu_budget_s={args.student_min * 60}",
        "optim.epochs=100", "checkpoint.every_epochs=0", "logging.progress=false", "logging.wandb=disabled",
        f"logging.output_dir={work / 'distill'}", *args.set_distill])
    c0 = time.process_time()
    res = distill(dcfg, resume="auto")
    loaded = load_backbone_info(work / "distill" / "student_backbone.pt")
    score("distill", loaded.net, loaded.spec, {"steps": res.step, "images": res.step * dcfg.optim.batch_size,
                                               "cpu_s": round(time.process_time() - c0, 1),
                                               "first_loss": res.losses[0] if res.losses else None,
                                               "last_loss": res.losses[-1] if res.losses else None})

    # 2b. the same student pretrained with esvit for the same budget
    scfg = load_config(DEFAULT_CONFIG, [f"data.num_workers={args.workers}",
                                        f"model.backbone_kwargs={json.dumps(s_kwargs)}"])
    info = pretrain(scfg, ds, train_idx, args.student_min * 60, args.workers)
    net = info.pop("backbone")
    score("esvit", net, build_backbone(scfg.model.backbone, **s_kwargs)[1],
          {k: info[k] for k in ("steps", "images", "cpu_s")})

    print("\narm       steps  images   CPU-s  kNN top-1  linear top-1")
    for arm in ("teacher", "distill", "esvit"):
        r = results[arm]
        print(f"{arm:8s} {r['steps']:6d} {r['images']:7d} {r['cpu_s']:7.0f}  {r['knn_top1']:9.2f}  {r['linear_top1']:12.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
