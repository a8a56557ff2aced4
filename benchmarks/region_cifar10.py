"""Where does the region task pay? EsViT vs plain DINO vs random weights at equal CPU time.

Protocol (issue 11): CIFAR-10 training images from ``../shared/data/cifar10/train``; the last 500
images of every class are held out (5,000 validation images), the other 45,000 are the
pretraining set and the kNN / linear-probe bank. Every arm pretrains for the same **CPU-time**
budget (``time.process_time``, one thread), its schedules stretched over the budget (their
length is re-estimated from the CPU time per step at steps 3 and 30 and every 250 steps). The
teacher backbone is then scored on the validation split:

* kNN (k=20, T=0.07) and an L-BFGS linear probe, top-1, on the backbone's pooled feature (CLS
  for ViTs) and on the mean of its region tokens;
* flip correspondence of the region features (``esvit.eval.correspondence``, the official
  ``analyze_models.py`` measure) on ``--corr-images`` validation images: share of all tokens
  and of the 10 most similar pairs matched to the mirrored position, plain flip and flip with
  the official colour jitter + grey.

The recipe is a training config (``--config``, default ``configs/cifar10_vit_nano.yaml``) with
dotted overrides (``--set``); each arm adds its own overrides:

    random                 the initial weights, not trained
    dino                   model.region_loss=false (plain DINO)
    esvit                  the config as it is
    --arm NAME KEY=V ...   any other arm

The collapse metrics of every arm (losses, token similarity, region match share, region
entropy) are kept every 25 steps, with the collapse warnings and the step they fired at.

    python benchmarks/region_cifar10.py --budget-min 15 --arms random dino esvit --out runs/region/p8.json
    python benchmarks/region_cifar10.py --budget-min 15 --arms dino esvit \\
        --set model.backbone_kwargs.patch_size=4 --out runs/region/p4.json
    python benchmarks/region_cifar10.py --report runs/region/*.json      # one markdown table

Arms of one file run one after the other; run files side by side, one core each.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from quality_cifar10 import DATA, batches, estimate_total_steps, evaluate, split_indices

from esvit.config import Config, config_to_dict, load_config
from esvit.data import build_dataset
from esvit.data.folder import scan_image_folder
from esvit.eval.correspondence import measure_correspondence
from esvit.train.collapse import CollapseMonitor
from esvit.train.loop import build_schedules, build_trainer

log = logging.getLogger("region")
ROOT = Path(__file__).resolve().parents[1]
BUILTIN_ARMS = {"random": [], "dino": ["model.region_loss=false"], "esvit": []}
TRACE_EVERY = 25
TRACE_KEYS = ("loss", "view_loss", "region_loss", "token_similarity", "region_match_share",
              "region_teacher_entropy", "teacher_entropy")


def keep_freed_memory() -> None:
    """glibc: keep freed memory in the heap instead of unmapping it. Without this, every
    step's large temporaries are mmap'd, page-faulted and unmapped again: 20-35 % of a CPU
    step is system time (measured for vit_nano at patch 4). Applies to every arm alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    libc.mallopt(-2, 1 << 28)  # M_TOP_PAD


def pretrain(cfg: Config, ds, idx: list[int], budget_s: float, workers: int) -> dict[str, Any]:
    """Train ``cfg``'s trainer for ``budget_s`` CPU-seconds; return its teacher and a trace."""
    torch.manual_seed(cfg.seed)
    tr = build_trainer(cfg, seed=cfg.seed)
    tr.train()
    opt = torch.optim.AdamW(tr.param_groups(), lr=0.0)
    monitor = CollapseMonitor(tr.out_dim, region_out_dim=tr.region_out_dim)
    o = cfg.optim
    it = batches(ds, idx, o.batch_size, True, cfg.seed, workers)
    step, c0, mark, sched = 0, time.process_time(), 0.0, None
    trace: list[dict[str, float]] = []
    warnings: dict[str, int] = {}
    while (spent := time.process_time() - c0) < budget_s:
        if step == 3:
            mark = spent
        if step in (3, 30) or (step and step % 250 == 0):
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
        if o.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(tr.student.parameters(), o.clip_grad)
        if v.freeze_last_layer:
            tr.cancel_last_layer_gradients()
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
    return {"steps": step, "images": step * o.batch_size, "trace": trace, "warnings": warnings,
            "backbone": tr.teacher.backbone.net}


def score(net, spec, cfg: Config, ds, bank: list[int], val: list[int], val_paths: list[str],
          args: argparse.Namespace) -> dict[str, Any]:
    """kNN / linear top-1 (pooled and token mean) and flip correspondence of a backbone."""
    net.eval()
    size = cfg.augment.global_size
    ns = SimpleNamespace(size=size, workers=args.workers)
    res: dict[str, Any] = {}
    for pool in sorted({spec.pool, "avg"}):
        res[pool] = evaluate(net, spec, ds, bank, val, ns, pool)
    res["pooled"] = res[spec.pool]
    for name, jitter in (("corr", False), ("corr_jitter", True)):
        c = measure_correspondence((net, spec), val_paths[: args.corr_images], image_size=size, jitter=jitter,
                                   device="cpu")
        res[name] = {k: c[k] for k in ("accuracy_all", "accuracy_topk", "distance_all", "chance", "grid")}
    return res


def run_arm(name: str, overrides: list[str], args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    cfg = load_config(args.config, [*args.set, *overrides])
    ds = data.setdefault(cfg.data.canvas_size, build_dataset("folder", args.data, cfg.data.canvas_size))
    t0 = time.perf_counter()
    info: dict[str, Any] = {"overrides": overrides}
    if name == "random":
        torch.manual_seed(cfg.seed)
        net = build_trainer(cfg, seed=cfg.seed).teacher.backbone.net
    else:
        info.update(pretrain(cfg, ds, data["train"], args.budget_min * 60, args.workers))
        net = info.pop("backbone")
    info["pretrain_wall_s"] = round(time.perf_counter() - t0, 1)
    from esvit.backbones import build_backbone

    _, spec = build_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs)
    info.update(score(net, spec, cfg, ds, data["bank"], data["val"], data["val_paths"], args))
    log.info("%s: %s", name, {k: v for k, v in info.items() if k != "trace"})
    return info


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of every arm of every result file."""
    head = ("| setting | arm | steps | kNN | linear | kNN (token mean) | corr. all / top-10 | "
            "corr. jitter all / top-10 | warnings (first step) |")
    rows = [head, "|" + "---|" * 9]
    for res in results:
        setting = res["settings"]["label"]
        for arm, r in res["arms"].items():
            warn = ", ".join(f"{k} ({v})" for k, v in sorted(r.get("warnings", {}).items(), key=lambda x: x[1]))
            rows.append(
                f"| {setting} | {arm} | {r.get('steps', 0)} | {r['pooled']['knn_top1']:.2f} | "
                f"{r['pooled']['linear_top1']:.2f} | {r['avg']['knn_top1']:.2f} | "
                f"{100 * r['corr']['accuracy_all']:.1f} / {100 * r['corr']['accuracy_topk']:.1f} | "
                f"{100 * r['corr_jitter']['accuracy_all']:.1f} / {100 * r['corr_jitter']['accuracy_topk']:.1f} | "
                f"{warn or '-'} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "cifar10_vit_nano.yaml"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    p.add_argument("--arms", nargs="*", default=["random", "dino", "esvit"], choices=sorted(BUILTIN_ARMS))
    p.add_argument("--arm", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="an extra arm: its name, then its overrides")
    p.add_argument("--label", help="name of the setting in the report (default: the --set overrides)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--budget-min", type=float, default=15.0, help="CPU minutes of pretraining per arm")
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--eval-bank", type=int, default=0, help="limit the kNN / linear bank (0: all 45,000)")
    p.add_argument("--corr-images", type=int, default=1000, help="validation images of the correspondence measure")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default="runs/region/region.json")
    p.add_argument("--report", nargs="+", metavar="JSON", help="print the table of these result files and exit")
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.report:
        print(table([json.loads(Path(f).read_text()) for f in args.report]))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    keep_freed_memory()
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data} not found: this benchmark needs the shared CIFAR-10 image folder")
    paths, labels, _ = scan_image_folder(args.data)
    train_idx, val_idx = split_indices(labels, args.val_per_class)
    bank = train_idx
    if args.eval_bank and args.eval_bank < len(train_idx):
        bank = sorted(torch.tensor(train_idx)[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(0))
                                              [: args.eval_bank]].tolist())
    data: dict[str, Any] = {"train": train_idx, "bank": bank, "val": val_idx,
                            "val_paths": [paths[i] for i in val_idx][:: max(1, len(val_idx) // args.corr_images)]}
    arms = [(a, BUILTIN_ARMS[a]) for a in args.arms] + [(a[0], a[1:]) for a in args.arm]
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k != "report"}
    settings.update(label=args.label or " ".join(args.set) or "config",
                    config=config_to_dict(load_config(args.config, args.set)))
    results: dict[str, Any] = {"settings": settings, "arms": {}}
    for name, overrides in arms:
        results["arms"][name] = run_arm(name, overrides, args, data)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))  # after every arm: a killed run keeps its arms
    print(table([results]))


if __name__ == "__main__":
    main()
