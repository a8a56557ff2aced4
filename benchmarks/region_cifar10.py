"""Where does the region task pay? EsViT vs plain DINO vs random weights at equal CPU time.

Protocol (issue 11; ``cifar_protocol.py``): CIFAR-10 training images from
``../shared/data/cifar10/train``; the last 500 images of every class are held out (5,000
validation images), the other 45,000 are the pretraining set and the kNN / linear-probe bank.
Every arm pretrains for the same **CPU-time** budget (``time.process_time``, one thread), its
schedules stretched over the budget, or for the same number of steps (``--steps``). The teacher
backbone is then scored on the validation split:

* kNN (k=20, T=0.07) and an L-BFGS linear probe, top-1, on the backbone's pooled feature (CLS
  for ViTs) and on the mean of its region tokens;
* flip correspondence of the region features (``esvit.eval.correspondence``, the official
  ``analyze_models.py`` measure) on ``--corr-images`` validation images: share of all tokens
  and of the 10 most similar pairs matched to the mirrored position, plain flip and flip with
  the official colour jitter + grey;
* matching quality: on 512 validation images, each global view's region tokens matched into the
  other global view as the region loss matches them: share of matches landing on the token under
  the same image point (``match accuracy``) and share of a view's tokens on one token.

The recipe is a training config (``--config``, default ``configs/cifar10_vit_nano.yaml``) with
dotted overrides (``--set``); each arm adds its own overrides:

    random                 the initial weights, not trained
    dino                   model.region_loss=false (plain DINO)
    esvit                  model.region_loss=true (the official 0.5 / 0.5 weighting)
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
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from cifar_protocol import (
    DATA,
    DEFAULT_CONFIG,
    batches,
    evaluate,
    pretrain,
    split_indices,
    start,
)

from esvit.augment import MultiCropAugmentation
from esvit.config import Config, config_to_dict, load_config
from esvit.data import build_dataset
from esvit.data.folder import scan_image_folder
from esvit.eval.correspondence import measure_correspondence
from esvit.metrics import global_view_matching
from esvit.train.loop import build_trainer
from esvit.wrapper import NetWrapper

log = logging.getLogger("region")
BUILTIN_ARMS = {"random": [], "dino": ["model.region_loss=false"], "esvit": ["model.region_loss=true"]}


@torch.no_grad()
def matching_quality(net, spec, cfg: Config, ds, val: list[int], n_images: int = 512) -> dict[str, float]:
    """How well the backbone's features match region tokens between the two global views of the
    recipe's augmentation, as the region loss matches them (:func:`esvit.metrics.global_view_matching`)."""
    a = cfg.augment
    aug = MultiCropAugmentation(a.global_size, a.local_size, 0, a.global_scale, a.local_scale,
                                blur_p=a.blur_p, blur_sigma=a.blur_sigma, solarize_p=a.solarize_p, seed=0)
    pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:n_images].tolist()
    images, _ = next(batches(ds, [val[i] for i in pick], n_images, False, 0, 0))
    views, params = aug.forward_with_params(images)
    wrapper = NetWrapper.from_spec(net, spec).eval()
    feats = [wrapper(v)[1] for v in views]
    res = global_view_matching(feats, feats, params)
    return {"match_share": float(res["region_match_share"]), "match_accuracy": float(res["region_match_accuracy"]),
            "chance": 1.0 / feats[0].shape[1]}


def score(net, spec, cfg: Config, ds, bank: list[int], val: list[int], val_paths: list[str],
          args: argparse.Namespace) -> dict[str, Any]:
    """kNN / linear top-1 (pooled and token mean), flip correspondence and matching quality."""
    net.eval()
    res_match = matching_quality(net, spec, cfg, ds, val)
    size = cfg.augment.global_size
    res: dict[str, Any] = {}
    for pool in sorted({spec.pool, "avg"}):
        res[pool] = evaluate(net, spec, ds, bank, val, size, args.workers, pool)
    res["pooled"] = res[spec.pool]
    for name, jitter in (("corr", False), ("corr_jitter", True)):
        c = measure_correspondence((net, spec), val_paths[: args.corr_images], image_size=size, jitter=jitter,
                                   device="cpu")
        res[name] = {k: c[k] for k in ("accuracy_all", "accuracy_topk", "distance_all", "chance", "grid")}
    res["matching"] = res_match
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
        info.update(pretrain(cfg, ds, data["train"], args.budget_min * 60, args.workers, args.steps))
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
            "corr. jitter all / top-10 | match accuracy | warnings (first step) |")
    rows = [head, "|" + "---|" * 10]
    for res in results:
        setting = res["settings"]["label"]
        for arm, r in res["arms"].items():
            m = r.get("matching")
            match = f"{100 * m['match_accuracy']:.1f} %" if m else "-"
            warn = ", ".join(f"{k} ({v})" for k, v in sorted(r.get("warnings", {}).items(), key=lambda x: x[1]))
            rows.append(
                f"| {setting} | {arm} | {r.get('steps', 0)} | {r['pooled']['knn_top1']:.2f} | "
                f"{r['pooled']['linear_top1']:.2f} | {r['avg']['knn_top1']:.2f} | "
                f"{100 * r['corr']['accuracy_all']:.1f} / {100 * r['corr']['accuracy_topk']:.1f} | "
                f"{100 * r['corr_jitter']['accuracy_all']:.1f} / {100 * r['corr_jitter']['accuracy_topk']:.1f} | "
                f"{match} | {warn or '-'} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    p.add_argument("--arms", nargs="*", default=["random", "dino", "esvit"], choices=sorted(BUILTIN_ARMS))
    p.add_argument("--arm", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="an extra arm: its name, then its overrides")
    p.add_argument("--label", help="name of the setting in the report (default: the --set overrides)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--budget-min", type=float, default=15.0, help="CPU minutes of pretraining per arm")
    p.add_argument("--steps", type=int, default=0,
                   help="train exactly this many steps instead of a CPU budget (equal-steps comparisons)")
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
    start(args.data)
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
