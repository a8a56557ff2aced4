"""Throughput of the batched ``MultiCropAugmentation`` vs a per-image torchvision v2 pipeline.

Both produce the same DINO views (2 global + N local; RandomResizedCrop, flip,
RandomApply(ColorJitter, 0.8), RandomGrayscale(0.2), GaussianBlur with p 1.0 / 0.1 / 0.5,
RandomSolarize(0.2) on global 2, ToDtype, Normalize) from the same non-square photos, on the
same CPU threads (``torch.set_num_threads``). The torchvision pipeline crops each *original*
``uint8`` image (landscape and portrait alternate in the batch) in a Python loop, as a
DataLoader worker would; ours takes the batch of letterboxed canvases the training loader
delivers (:class:`esvit.data.Canvas`: the originals in a square canvas, plus their boxes) and
draws its boxes on the originals' sizes. Two settings are measured in one run:

* 32x24 / 24x32 originals (canvas 32) -> 2 x 32 + N x 16 views (target ratio >= 8x)
* 500x375 / 375x500 originals (canvas 512) -> 2 x 224 + N x 96 views (target ratio >= 1x)

Usage::

    python benchmarks/bench_multicrop.py [--iters 3] [--batch-small 256] [--batch-large 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import default_collate

from esvit.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation
from esvit.data import Canvas, to_canvas


def torchvision_pipeline(global_size: int, local_size: int, n_local: int,
                         global_scale: tuple[float, float], local_scale: tuple[float, float]
                         ) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """Per-image torchvision v2 DINO pipeline applied in a loop over the (original) images."""
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

    def run(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        per_image = [[g1(img), g2(img)] + [loc(img) for _ in range(n_local)] for img in batch]
        return [torch.stack(v) for v in zip(*per_image, strict=True)]  # collate, as a loader

    return run


def photos(n: int, long_side: int, short_side: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` random ``uint8`` images ``(3, h, w)``, landscape and portrait alternating."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(short_side, long_side), (long_side, short_side)]
    return [torch.randint(0, 256, (3, *sizes[i % 2]), dtype=torch.uint8, generator=gen) for i in range(n)]


def canvas_batch(images: list[torch.Tensor], canvas: int) -> Canvas:
    """The letterboxed batch a training DataLoader delivers for these originals."""
    return default_collate([to_canvas(x.permute(1, 2, 0).numpy(), canvas) for x in images])


def measure(fns: list[tuple[Callable[[object], object], object]], n: int, iters: int) -> list[float]:
    """Best-of-``iters`` images per second of each ``(function, input)`` (after one warm-up call).

    The functions are timed alternately in every iteration, so that a burst of load from
    other processes hits all of them rather than one.
    """
    for fn, x in fns:
        fn(x)
    best = [float("inf")] * len(fns)
    for _ in range(iters):
        for i, (fn, x) in enumerate(fns):
            t0 = time.perf_counter()
            fn(x)
            best[i] = min(best[i], time.perf_counter() - t0)
    return [n / t for t in best]


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
        ("32x24: 2x32 + {n}x16", (32, 24), 32, 32, 16, (0.25, 1.0), args.batch or args.batch_small, 8.0),
        ("500x375: 2x224 + {n}x96", (500, 375), 512, 224, 96, (0.4, 1.0), args.batch or args.batch_large, 1.0),
    ]
    rows = []
    for name, (long_side, short_side), canvas, gs, ls, gscale, batch_size, target in settings:
        originals = photos(batch_size, long_side, short_side)
        batch = canvas_batch(originals, canvas)
        ours = MultiCropAugmentation(gs, ls, args.n_local, global_scale=gscale, seed=0)
        theirs = torchvision_pipeline(gs, ls, args.n_local, gscale, (0.05, 0.4))
        with torch.inference_mode():
            ips_ours, ips_tv = measure([(ours, batch), (theirs, originals)], batch_size, args.iters)
        rows.append((name.format(n=args.n_local), batch_size, ips_ours, ips_tv, target))
        print(f"{rows[-1][0]}: ours {ips_ours:.0f} img/s, torchvision {ips_tv:.0f} img/s",
              flush=True)

    print(f"\nthreads={args.threads}, iters={args.iters} (best of)")
    print(f"{'setting':<26}{'batch':>6}{'ours img/s':>12}{'tv img/s':>10}{'ratio':>8}"
          f"{'target':>8}  ok")
    for name, batch_size, ips_ours, ips_tv, target in rows:
        ratio = ips_ours / ips_tv
        print(f"{name:<26}{batch_size:>6}{ips_ours:>12.0f}{ips_tv:>10.0f}{ratio:>7.1f}x"
              f"{target:>7.0f}x  {'yes' if ratio >= target else 'NO'}")


if __name__ == "__main__":
    main()
