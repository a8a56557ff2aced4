"""Throughput of the batched ``MultiCropAugmentation`` vs a per-image torchvision v2 pipeline.

Both produce the same DINO views (2 global + N local; RandomResizedCrop, flip,
RandomApply(ColorJitter, 0.8), RandomGrayscale(0.2), GaussianBlur with p 1.0 / 0.1 / 0.5,
RandomSolarize(0.2) on global 2, ToDtype, Normalize) from the same uint8 batch, on the same
CPU threads (``torch.set_num_threads``); the torchvision pipeline runs per image in a Python
loop over the batch, as a DataLoader worker would. Two settings are measured in one run:

* 32 px input -> 2 x 32 + N x 16 views (target ratio >= 8x)
* 256 px input -> 2 x 224 + N x 96 views (target ratio >= 1x)

Usage::

    python benchmarks/bench_multicrop.py [--iters 3] [--batch-small 256] [--batch-large 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torchvision.transforms.v2 as T

from esvit.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation


def torchvision_pipeline(global_size: int, local_size: int, n_local: int,
                         global_scale: tuple[float, float], local_scale: tuple[float, float]
                         ) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """Per-image torchvision v2 DINO pipeline applied in a loop over the batch."""
    blur = T.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))
    common = [
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    norm = [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    g1 = T.Compose([T.RandomResizedCrop(global_size, scale=global_scale), *common, blur, *norm])
    g2 = T.Compose([T.RandomResizedCrop(global_size, scale=global_scale), *common,
                    T.RandomApply([blur], p=0.1), T.RandomSolarize(128, p=0.2), *norm])
    loc = T.Compose([T.RandomResizedCrop(local_size, scale=local_scale), *common,
                     T.RandomApply([blur], p=0.5), *norm])

    def run(batch: torch.Tensor) -> list[torch.Tensor]:
        per_image = [[g1(img), g2(img)] + [loc(img) for _ in range(n_local)] for img in batch]
        return [torch.stack(v) for v in zip(*per_image, strict=True)]  # collate, as a loader

    return run


def measure(fns: list[Callable[[torch.Tensor], object]], batch: torch.Tensor, iters: int
            ) -> list[float]:
    """Best-of-``iters`` images per second of each function (after one warm-up call).

    The functions are timed alternately in every iteration, so that a burst of load from
    other processes hits all of them rather than one.
    """
    for fn in fns:
        fn(batch)
    best = [float("inf")] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn(batch)
            best[i] = min(best[i], time.perf_counter() - t0)
    return [batch.shape[0] / t for t in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for both settings (default 256 for 32px, 64 for 256px)")
    parser.add_argument("--batch-small", type=int, default=256)
    parser.add_argument("--batch-large", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--n-local", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    settings = [
        ("32px: 2x32 + {n}x16", 32, 32, 16, (0.25, 1.0), args.batch or args.batch_small, 8.0),
        ("256px: 2x224 + {n}x96", 256, 224, 96, (0.4, 1.0), args.batch or args.batch_large, 1.0),
    ]
    rows = []
    for name, in_size, gs, ls, gscale, batch_size, target in settings:
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch_size, 3, in_size, in_size), dtype=torch.uint8,
                               generator=gen)
        ours = MultiCropAugmentation(gs, ls, args.n_local, global_scale=gscale, seed=0)
        theirs = torchvision_pipeline(gs, ls, args.n_local, gscale, (0.05, 0.4))
        with torch.inference_mode():
            ips_ours, ips_tv = measure([ours, theirs], images, args.iters)
        rows.append((name.format(n=args.n_local), batch_size, ips_ours, ips_tv, target))
        print(f"{rows[-1][0]}: ours {ips_ours:.0f} img/s, torchvision {ips_tv:.0f} img/s",
              flush=True)

    print(f"\nthreads={args.threads}, iters={args.iters} (best of)")
    print(f"{'setting':<24}{'batch':>6}{'ours img/s':>12}{'tv img/s':>10}{'ratio':>8}"
          f"{'target':>8}  ok")
    for name, batch_size, ips_ours, ips_tv, target in rows:
        ratio = ips_ours / ips_tv
        print(f"{name:<24}{batch_size:>6}{ips_ours:>12.0f}{ips_tv:>10.0f}{ratio:>7.1f}x"
              f"{target:>7.0f}x  {'yes' if ratio >= target else 'NO'}")


if __name__ == "__main__":
    main()
