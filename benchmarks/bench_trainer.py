"""Full training-step throughput: esvit vs vit_pytorch's EsViTTrainer vs lightly's DINO.

Setting (issue 2): torchvision ResNet-18, 64 px, batch 64, 2 global + 2 local crops of 64 px,
out_dim 65536. Each variant runs in its own subprocess (so peak RSS is per variant), one after the
other in this one invocation, on the same cores; the script prints images/s, peak RSS and ratios.

    pip install -e ".[bench]"     # vit-pytorch, lightly
    python benchmarks/bench_trainer.py [--iters 3] [--rounds 3] [--threads 2]

What each step includes:
- esvit: per-sample multi-crop augmentation of a uint8 batch, student on all 4 crops, teacher on
  the 2 global crops, view + region losses, backward, AdamW step, EMA update.
- vit_pytorch: its batch-level augmentation, student on the 2 local crops only, teacher on the 2
  global crops, view + region losses, backward, AdamW step, EMA update.
- lightly: student on all 4 crops, teacher on the 2 global ones, DINO view loss only, backward,
  AdamW step, EMA update; reported without and with lightly's per-image DINOTransform (PIL) for
  the batch, which is where its augmentation runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchvision

BATCH, SIZE, OUT_DIM = 64, 64, 65536


def _resnet18() -> torch.nn.Module:
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    return net


def _time(step, iters: int, warmup: int = 2) -> dict:
    """Mean wall-clock and process-CPU seconds per step (CPU time is robust to other load)."""
    for _ in range(warmup):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    return {"step_s": (time.perf_counter() - t0) / iters, "cpu_s": (time.process_time() - c0) / iters}


def run_esvit(iters: int) -> dict:
    from esvit.trainer import EsViTTrainer

    net = torchvision.models.resnet18()
    tr = EsViTTrainer(net, "layer4", "bchw", global_size=SIZE, local_size=SIZE, n_local=2,
                      global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), out_dim=OUT_DIM, seed=0)
    opt = torch.optim.AdamW(tr.param_groups(), lr=1e-4)
    images = torch.randint(0, 256, (BATCH, 3, 72, 72), dtype=torch.uint8)

    def step() -> None:
        out = tr(images, 0.04)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        tr.update_teacher(0.996)

    return _time(step, iters)


def run_vit_pytorch(iters: int) -> dict:
    from vit_pytorch.es_vit import EsViTTrainer

    tr = EsViTTrainer(_resnet18(), image_size=SIZE, hidden_layer="layer4", num_classes_K=OUT_DIM,
                      projection_hidden_size=256, projection_layers=4)
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-4)
    images = torch.rand(BATCH, 3, 72, 72)

    def step() -> None:
        loss = tr(images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tr.update_moving_average()

    return _time(step, iters)


def run_lightly(iters: int, with_transform: bool) -> dict:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.dino_transform import DINOTransform
    from PIL import Image

    class DINO(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _resnet18()
            self.head = DINOProjectionHead(512, 2048, 256, OUT_DIM, freeze_last_layer=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    student = DINO()
    teacher = DINO()  # lightly's head uses weight_norm, which cannot be deep-copied
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    crit = DINOLoss(output_dim=OUT_DIM, warmup_teacher_temp_epochs=0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    transform = DINOTransform(global_crop_size=SIZE, local_crop_size=SIZE, n_local_views=2)
    pil = [Image.fromarray(torch.randint(0, 256, (72, 72, 3), dtype=torch.uint8).numpy()) for _ in range(BATCH)]
    fixed = [torch.randn(BATCH, 3, SIZE, SIZE) for _ in range(4)]

    def step() -> None:
        if with_transform:
            per_image = [transform(im) for im in pil]
            views = [torch.stack([v[i] for v in per_image]) for i in range(4)]
        else:
            views = fixed
        t_out = [teacher(v) for v in views[:2]]
        s_out = [student(v) for v in views]
        loss = crit(t_out, s_out, epoch=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_momentum(student, teacher, m=0.996)

    return _time(step, iters)


VARIANTS = {
    "esvit": run_esvit,
    "vit_pytorch": run_vit_pytorch,
    "lightly": lambda n: run_lightly(n, False),
    "lightly+transform": lambda n: run_lightly(n, True),
}


def child(name: str, iters: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    res = VARIANTS[name](iters)
    res["images_per_s"] = BATCH / res["step_s"]
    res["images_per_cpu_s"] = BATCH / res["cpu_s"]
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def _run_child(name: str, iters: int, threads: int) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--only", name, "--iters", str(iters),
                           "--threads", str(threads)], capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        print(f"{name}: failed\n{proc.stderr[-2000:]}")
        return None
    return json.loads(line[0][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=3, help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs per variant, interleaved (A B C A B C ...); the median is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        child(args.only, args.iters, args.threads)
        return
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):  # interleaved, so slow phases of a shared machine hit every variant
        for name in VARIANTS:
            res = _run_child(name, args.iters, args.threads)
            if res:
                runs[name].append(res)
                print(f"round {r + 1} {name:18s} {res['images_per_s']:6.1f} img/s  "
                      f"{res['images_per_cpu_s']:6.1f} img/CPU-s", flush=True)
    results = {}
    print(f"\nmedian of {args.rounds} interleaved runs ({args.iters} steps each, {args.threads} threads):")
    for name, rs in runs.items():
        if not rs:
            continue
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        results[name] = med
        print(f"{name:18s} {med['images_per_s']:7.1f} img/s (wall)  {med['images_per_cpu_s']:7.1f} img/CPU-s  "
              f"step {med['step_s']:.2f}s  peak RSS {med['peak_rss_mb']:.0f} MB", flush=True)
    if "esvit" in results:
        print("\nesvit / other throughput ratio (>= 1 means esvit is at least as fast):")
        e = results["esvit"]
        for name, r in results.items():
            if name != "esvit":
                print(f"  vs {name:18s} wall {e['images_per_s'] / r['images_per_s']:.2f}x   "
                      f"CPU-time {e['images_per_cpu_s'] / r['images_per_cpu_s']:.2f}x   "
                      f"peak RSS {e['peak_rss_mb'] / r['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
