"""Representation quality on real data: esvit vs random weights vs vit_pytorch's EsViTTrainer.

Protocol (issue 4, ``cifar_protocol.py``): CIFAR-10 training images from
``../shared/data/cifar10/train``; the last ``--val-per-class`` (500) images of each class form the
validation split, the rest is the pretraining set. The same backbone is (a) left at random
initialisation, (b) pretrained with esvit and (c) pretrained with the seed reference
``vit_pytorch.es_vit.EsViTTrainer``, each of (b) and (c) for the same **CPU-time budget**. Then kNN
(k=20, T=0.07) and a linear probe (L-BFGS) on the frozen, pooled features (the backbone's
pooling and the token mean; the better kNN of the two counts for every method), top-1 on the
validation split.

esvit trains the shipped recipe ``configs/cifar10_vit_nano.yaml`` (``--config``, with dotted
``--set`` overrides), exactly what ``esvit-train`` runs, its schedules stretched over the budget.
vit_pytorch gets the same backbone, crop size, batch and number of outputs, and its own defaults
otherwise. Run the methods as two processes side by side, one core each:

    pip install -e ".[bench]"
    python benchmarks/quality_cifar10.py --budget-min 30 --methods random esvit &
    python benchmarks/quality_cifar10.py --budget-min 30 --methods vit_pytorch --out runs/q_ref.json
    python benchmarks/quality_cifar10.py --budget-min 30 --methods esvit --set optim.lr=4e-3
    python benchmarks/quality_cifar10.py --budget-min 2 --eval-train 2000   # quick smoke run

Results are printed and written to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from cifar_protocol import (
    DATA,
    DEFAULT_CONFIG,
    batches,
    evaluate,
    pretrain,
    split_indices,
    start,
)

from esvit.backbones import build_backbone
from esvit.config import Config, load_config
from esvit.data import build_dataset
from esvit.wrapper import NetWrapper

log = logging.getLogger("quality")


class TokenMap(torch.nn.Module):
    """Shows a ViT's patch tokens as a ``(b, d, h, w)`` map on a child ``to_map``: vit_pytorch's
    EsViTTrainer hooks a layer and only accepts CNN feature maps."""

    def __init__(self, net: torch.nn.Module, spec) -> None:
        super().__init__()
        self.net = net
        self.wrapper = NetWrapper.from_spec(net, spec)
        self.to_map = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, tokens = self.wrapper(x)
        side = math.isqrt(tokens.shape[1])
        return self.to_map(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side))


def pretrain_vit_pytorch(net, spec, cfg: Config, ds, idx, budget_s: float, workers: int) -> dict:
    """The seed reference, used as its README shows (Adam 3e-4, its own defaults)."""
    from vit_pytorch.es_vit import EsViTTrainer as RefTrainer

    size, batch = cfg.augment.global_size, cfg.optim.batch_size
    model, layer = net, spec.layer
    if spec.layout == "bnd":  # ViT: expose the patch tokens as a map; its views are their mean
        model, layer = TokenMap(net, spec), "to_map"
    tr = RefTrainer(model, image_size=size, hidden_layer=layer, num_classes_K=cfg.model.out_dim,
                    projection_hidden_size=256, projection_layers=4)
    opt = torch.optim.Adam(tr.parameters(), lr=3e-4)
    it = batches(ds, idx, batch, True, 0, workers)
    step, c0, losses = 0, time.process_time(), []
    while time.process_time() - c0 < budget_s:
        images, _ = next(it)
        x = F.interpolate(images.float() / 255, size=(size, size), mode="bilinear", antialias=True)
        loss = tr(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tr.update_moving_average()
        losses.append(loss.item())
        step += 1
        if step % 20 == 0:
            log.info("vit_pytorch step %d loss %.4f (%.0f / %.0f CPU-s)", step, losses[-1],
                     time.process_time() - c0, budget_s)
    return {"steps": step, "images": step * batch, "first_loss": losses[0], "last_loss": losses[-1],
            "backbone": net}


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options; the esvit recipe is a training config (``--config``/``--set``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config of the esvit arm")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides of --config")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--budget-min", type=float, default=30.0, help="CPU minutes of pretraining per method")
    p.add_argument("--steps", type=int, default=0, help="esvit: exactly this many steps instead of the budget")
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--eval-train", type=int, default=0, help="limit the kNN/linear train bank (0 = all)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["random", "esvit", "vit_pytorch"])
    p.add_argument("--out", default="runs/quality_cifar10.json")
    return p


def main() -> None:
    args = build_parser().parse_args()
    start(args.data, args.threads)
    cfg = load_config(args.config, args.set)
    size = cfg.augment.global_size
    ds = build_dataset("folder", args.data, cfg.data.canvas_size)
    train_idx, val_idx = split_indices(list(ds.labels), args.val_per_class)
    eval_train = train_idx
    if args.eval_train and args.eval_train < len(train_idx):
        g = torch.Generator().manual_seed(0)
        eval_train = sorted(torch.tensor(train_idx)[torch.randperm(len(train_idx), generator=g)[:args.eval_train]].tolist())
    log.info("pretrain %d images, eval bank %d, val %d", len(train_idx), len(eval_train), len(val_idx))
    results = {"settings": {**vars(args), "resolved": {"backbone": cfg.model.backbone, "region_loss": cfg.model.region_loss}}}
    for method in args.methods:
        torch.manual_seed(cfg.seed)
        net, spec = build_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs)
        t0 = time.perf_counter()
        info: dict = {}
        if method == "esvit":
            info = pretrain(cfg, ds, train_idx, args.budget_min * 60, args.workers, args.steps)
            net = info.pop("backbone")
            info["first_loss"], info["last_loss"] = info["trace"][0]["loss"], info.pop("trace")[-1]["loss"]
        elif method == "vit_pytorch":
            info = pretrain_vit_pytorch(net, spec, cfg, ds, train_idx, args.budget_min * 60, args.workers)
            net = info.pop("backbone")
        info["pretrain_wall_s"] = time.perf_counter() - t0
        # every method is scored with the backbone's pooling and with the mean of the tokens; the
        # better kNN of the two counts (a random ViT's CLS token is a weaker baseline than its mean)
        pools = sorted({spec.pool, "avg"})
        net.eval()
        scores = {pool: evaluate(net, spec, ds, eval_train, val_idx, size, args.workers, pool) for pool in pools}
        best = max(pools, key=lambda pool: scores[pool]["knn_top1"])
        info.update(pool=best, pool_scores=scores, **scores[best])
        results[method] = info
        log.info("%s: %s", method, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in info.items()})
    print("\nmethod        steps  images  pool   kNN top-1  linear top-1")
    for m in args.methods:
        r = results[m]
        print(f"{m:12s} {r.get('steps', 0):6d} {r.get('images', 0):7d}  {r['pool']:4s}  {r['knn_top1']:9.2f}   "
              f"{r['linear_top1']:10.2f}")
    if "random" in results and "esvit" in results:
        d = results["esvit"]["knn_top1"] - results["random"]["knn_top1"]
        print(f"\nesvit kNN gain over random weights: {d:+.2f} points")
    if "vit_pytorch" in results and "esvit" in results:
        d = results["esvit"]["knn_top1"] - results["vit_pytorch"]["knn_top1"]
        print(f"esvit kNN gain over vit_pytorch:    {d:+.2f} points")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    assert math.isfinite(results.get("esvit", {}).get("last_loss", 0.0))


if __name__ == "__main__":
    main()
