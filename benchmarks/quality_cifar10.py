"""Representation quality on real data: esvit vs random weights vs vit_pytorch's EsViTTrainer.

Protocol (issue 4): CIFAR-10 training images from ``../shared/data/cifar10/train``; the last
``--val-per-class`` (500) images of each class form the validation split, the rest is the
pretraining set. The same backbone is (a) left at random initialisation, (b) pretrained with
esvit and (c) pretrained with the seed reference ``vit_pytorch.es_vit.EsViTTrainer``, each of
(b) and (c) for the same **CPU-time budget** (``time.process_time``, so other load on the machine
does not favour either). Then kNN (k=20, T=0.07) and a linear probe (L-BFGS) on the frozen,
pooled features (the backbone's pooling and the token mean; the better kNN of the two counts for
every method), top-1 on the validation split.

Defaults: ``vit_nano`` at 32 px, 2 global 32 px + 4 local 16 px crops, batch 256, heads 256 wide
with 256 outputs and BatchNorm, AdamW 2e-3, teacher momentum 0.99 (constant), no blur, one thread.
Run the methods as two processes side by side, one core each:

    pip install -e ".[bench]"
    python benchmarks/quality_cifar10.py --budget-min 30 --methods random esvit &
    python benchmarks/quality_cifar10.py --budget-min 30 --methods vit_pytorch --out runs/q_ref.json
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
from torch.utils.data import DataLoader, Subset

from esvit.backbones import build_backbone
from esvit.data import build_dataset
from esvit.eval.features import preprocess
from esvit.eval.knn import knn_accuracy
from esvit.eval.linear import accuracy, train_linear_lbfgs
from esvit.schedules import Schedules
from esvit.trainer import EsViTTrainer
from esvit.wrapper import NetWrapper

log = logging.getLogger("quality")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train"
# esvit settings the command line does not change (configs/cifar10_vit_nano.yaml has the same)
GLOBAL_SCALE, LOCAL_SCALE, BOTTLENECK_DIM = (0.25, 1.0), (0.05, 0.25), 256
WEIGHT_DECAY, CLIP_GRAD = (0.04, 0.1), 3.0  # weight decay: cosine from, to
WARMUP_FRACTION, FREEZE_LAST_LAYER_FRACTION = 0.05, 0.02  # of the schedules' length


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


def pretrain_esvit(net, spec, ds, idx, args) -> dict:
    """esvit with its standard schedules, stretched over the CPU budget."""
    tr = EsViTTrainer(net, spec.layer, spec.layout, pool=spec.pool, num_prefix_tokens=spec.num_prefix_tokens,
                      global_size=args.size, local_size=args.local_size, n_local=args.n_local,
                      global_scale=GLOBAL_SCALE, local_scale=LOCAL_SCALE, out_dim=args.out_dim,
                      hidden_dim=args.hidden_dim, bottleneck_dim=BOTTLENECK_DIM, use_bn_in_head=args.bn_head,
                      norm_last_layer=not args.no_norm_last_layer, seed=0,
                      augment_options={"blur_p": tuple(args.blur_p), "solarize_p": args.solarize_p})
    opt = torch.optim.AdamW(tr.param_groups(), lr=0.0)
    it = batches(ds, idx, args.batch, True, 0, args.workers)
    budget = args.budget_min * 60
    step, c0, losses, sched, mark = 0, time.process_time(), [], None, 0.0
    while (spent := time.process_time() - c0) < budget:
        if step == 3:
            mark = spent
        # the schedules' length: fixed by --steps, else estimated at step 3 and re-estimated at
        # step 30 and every 250 steps
        if (args.steps and sched is None) or (not args.steps and (step in (3, 30) or step and step % 250 == 0)):
            total = args.steps or estimate_total_steps(step, spent, budget, mark)
            sched = Schedules(steps_per_epoch=total, epochs=1, lr=args.lr * args.batch / 256, warmup_epochs=WARMUP_FRACTION,
                              warmup_teacher_temp=args.teacher_temp, teacher_temp=args.teacher_temp,
                              warmup_teacher_temp_epochs=0, momentum_teacher=args.momentum,
                              momentum_teacher_end=args.momentum_end,
                              freeze_last_layer_epochs=FREEZE_LAST_LAYER_FRACTION,
                              weight_decay=WEIGHT_DECAY[0], weight_decay_end=WEIGHT_DECAY[1])
            log.info("esvit: step %d, %.0f CPU-s spent -> schedules over %d steps", step, spent, total)
        v = (sched or Schedules(steps_per_epoch=1000, epochs=1, lr=args.lr * args.batch / 256)).at(step)
        for i, g in enumerate(opt.param_groups):
            g["lr"] = v.lr if sched else args.lr * args.batch / 256 * 0.01
            if i == 0:
                g["weight_decay"] = v.weight_decay
        images, _ = next(it)
        out = tr(images, v.teacher_temp)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(tr.student.parameters(), CLIP_GRAD)
        if v.freeze_last_layer:
            tr.cancel_last_layer_gradients()
        opt.step()
        tr.update_teacher(v.teacher_momentum)
        losses.append(out["loss"].item())
        step += 1
        if step % 20 == 0:
            log.info("esvit step %d loss %.4f teacher entropy %.3f (%.0f / %.0f CPU-s)", step, losses[-1],
                     out["teacher_entropy"].item(), time.process_time() - c0, budget)
    return {"steps": step, "images": step * args.batch, "first_loss": losses[0], "last_loss": losses[-1],
            "backbone": tr.teacher.backbone.net}


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


def pretrain_vit_pytorch(net, spec, ds, idx, args) -> dict:
    """The seed reference, used as its README shows (Adam 3e-4, its own defaults)."""
    from vit_pytorch.es_vit import EsViTTrainer as RefTrainer

    model, layer = net, spec.layer
    if spec.layout == "bnd":  # ViT: expose the patch tokens as a map; its views are their mean
        model, layer = TokenMap(net, spec), "to_map"
    tr = RefTrainer(model, image_size=args.size, hidden_layer=layer, num_classes_K=args.out_dim,
                    projection_hidden_size=256, projection_layers=4)
    opt = torch.optim.Adam(tr.parameters(), lr=3e-4)
    it = batches(ds, idx, args.batch, True, 0, args.workers)
    budget, step, c0, losses = args.budget_min * 60, 0, time.process_time(), []
    while time.process_time() - c0 < budget:
        images, _ = next(it)
        x = F.interpolate(images.float() / 255, size=(args.size, args.size), mode="bilinear", antialias=True)
        loss = tr(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tr.update_moving_average()
        losses.append(loss.item())
        step += 1
        if step % 20 == 0:
            log.info("vit_pytorch step %d loss %.4f (%.0f / %.0f CPU-s)", step, losses[-1],
                     time.process_time() - c0, budget)
    return {"steps": step, "images": step * args.batch, "first_loss": losses[0], "last_loss": losses[-1],
            "backbone": net}


@torch.no_grad()
def evaluate(net, spec, ds, train_idx, val_idx, args, pool: str | None = None) -> dict:
    """kNN and linear top-1 of the pooled features (``pool``: the backbone's own by default)."""
    wrapper = NetWrapper(net, spec.layer, spec.layout, pool=pool or spec.pool,
                         num_prefix_tokens=spec.num_prefix_tokens).eval()

    def feats(idx):
        xs, ys = [], []
        for images, labels in batches(ds, idx, 256, False, 0, args.workers):
            xs.append(wrapper(preprocess(images, args.size))[0].float())
            ys.append(labels)
        return torch.cat(xs), torch.cat(ys)

    tx, ty = feats(train_idx)
    vx, vy = feats(val_idx)
    knn = knn_accuracy(tx, ty, vx, vy, k=20, temperature=0.07, num_classes=10)
    with torch.enable_grad():
        clf = train_linear_lbfgs(tx, ty, 10, l2=1e-4, max_iter=300)
    lin = accuracy(clf(vx), vy)
    return {"knn_top1": knn["top1"], "linear_top1": lin["top1"]}


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options; the esvit defaults are ``configs/cifar10_vit_nano.yaml`` (a test checks)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--backbone", default="vit_nano")
    p.add_argument("--backbone-kw", nargs="*", default=[], metavar="KEY=INT",
                   help="integer backbone arguments, e.g. depth=4 patch_size=4")
    p.add_argument("--size", type=int, default=32, help="global crop / eval input size (canvas is 32 px)")
    p.add_argument("--local-size", type=int, default=16)
    p.add_argument("--n-local", type=int, default=4)
    p.add_argument("--out-dim", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="esvit peak LR per 256 images")
    p.add_argument("--momentum", type=float, default=0.99, help="esvit initial teacher momentum (cosine to 1)")
    p.add_argument("--momentum-end", type=float, default=0.99, help="esvit final teacher momentum")
    p.add_argument("--teacher-temp", type=float, default=0.04)
    p.add_argument("--blur-p", type=float, nargs=3, default=[0.0, 0.0, 0.0],
                   help="esvit: Gaussian blur probability of global view 1, global view 2, local views")
    p.add_argument("--solarize-p", type=float, default=0.2, help="esvit: solarisation probability (2nd global)")
    p.add_argument("--bn-head", action=argparse.BooleanOptionalAction, default=True,
                   help="esvit: BatchNorm in the projection heads")
    p.add_argument("--no-norm-last-layer", action="store_true", help="esvit: learn the last layer's row norms")
    p.add_argument("--steps", type=int, default=0, help="esvit schedule length (0: estimated from the budget)")
    p.add_argument("--budget-min", type=float, default=30.0, help="CPU minutes of pretraining per method")
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--eval-train", type=int, default=0, help="limit the kNN/linear train bank (0 = all)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["random", "esvit", "vit_pytorch"])
    p.add_argument("--out", default="runs/quality_cifar10.json")
    return p


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data} not found: this benchmark needs the shared CIFAR-10 image folder")
    ds = build_dataset("folder", args.data, 32)
    train_idx, val_idx = split_indices(list(ds.labels), args.val_per_class)
    eval_train = train_idx
    if args.eval_train and args.eval_train < len(train_idx):
        g = torch.Generator().manual_seed(0)
        eval_train = sorted(torch.tensor(train_idx)[torch.randperm(len(train_idx), generator=g)[:args.eval_train]].tolist())
    log.info("pretrain %d images, eval bank %d, val %d", len(train_idx), len(eval_train), len(val_idx))
    backbone_kw = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.backbone_kw)}
    results = {"settings": {k: v for k, v in vars(args).items()}}
    for method in args.methods:
        torch.manual_seed(0)
        net, spec = build_backbone(args.backbone, **backbone_kw)
        t0 = time.perf_counter()
        info: dict = {}
        if method == "esvit":
            info = pretrain_esvit(net, spec, ds, train_idx, args)
            net = info.pop("backbone")
        elif method == "vit_pytorch":
            info = pretrain_vit_pytorch(net, spec, ds, train_idx, args)
            net = info.pop("backbone")
        info["pretrain_wall_s"] = time.perf_counter() - t0
        # every method is scored with the backbone's pooling and with the mean of the tokens; the
        # better kNN of the two counts (a random ViT's CLS token is a weaker baseline than its mean)
        pools = sorted({spec.pool, "avg"})
        scores = {pool: evaluate(net, spec, ds, eval_train, val_idx, args, pool) for pool in pools}
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
