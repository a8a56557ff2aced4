"""One short GPU check of what CPU tests cannot run (issue 12); prints a summary, exits 1 on a failure.

Run on a CUDA machine from the repository root (under 8 minutes on one GPU)::

    python benchmarks/gpu_check.py [--out gpu_check.json] [--skip-torchrun]

Checks, in order:

1. **Augmentation parity**: the same sampled parameters applied by
   :class:`~esvit.augment.MultiCropAugmentation` on the CPU and on CUDA give the same views
   (max abs difference < 1e-4), on letterboxed non-square photos (2x224 + 8x96).
2. **Mixed precision**: one training step of the Swin-T and ViT-S/16 recipes
   (``configs/esvit_swin_tiny_imagenet.yaml``, ``configs/esvit_vit_small_imagenet.yaml``) at
   batch 32 under bf16 autocast and under fp16 autocast with a ``GradScaler``: finite losses
   and float32 head outputs (the teacher's targets) for both heads.
3. **torchrun + NCCL**: a 1-GPU ``torchrun`` of ``configs/debug_cpu.yaml`` on CUDA to 6 steps,
   then ``--resume auto`` to 12; both exit 0 and the second continues from step 6.
4. **Throughput**: images/s and peak memory of an EsViT step against a plain DINO step
   (``model.region_loss=false``) on the same backbone and crops, and against lightly's DINO
   step (``lightly.loss.DINOLoss`` + ``DINOProjectionHead``, same backbone, crops, out_dim)
   when ``lightly`` is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esvit.augment import MultiCropAugmentation  # noqa: E402
from esvit.config import load_config  # noqa: E402
from esvit.data.decode import Canvas  # noqa: E402
from esvit.train.loop import build_trainer  # noqa: E402
from esvit.train.optim import clip_gradients  # noqa: E402

RECIPES = {"swin_t": "configs/esvit_swin_tiny_imagenet.yaml", "vit_small": "configs/esvit_vit_small_imagenet.yaml"}


def photo_batch(b: int, canvas: int = 256, seed: int = 0) -> Canvas:
    """Letterboxed random photos: landscape, portrait and square, as the training loader sends them."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(b, 3, canvas, canvas, dtype=torch.uint8)
    box = torch.zeros(b, 4, dtype=torch.int64)
    shapes = [(canvas * 3 // 4, canvas), (canvas, canvas * 3 // 4), (canvas, canvas)]
    for i in range(b):
        h, w = shapes[i % 3]
        image[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        box[i] = torch.tensor((0, 0, h, w))
    return Canvas(image, box, box[:, 2:].clone() * 2)  # originals twice the canvas: a draft-decoded photo


def check_augmentation(device: torch.device) -> dict[str, Any]:
    aug = MultiCropAugmentation(224, 96, 8, seed=0)
    batch = photo_batch(16)
    params = aug.sample_params(16, 256, 256, batch.box, batch.source_size)
    cpu = aug.apply_params(batch, params)
    gpu = aug.apply_params(batch.to(device), params)
    diff = max(float((a - b.cpu()).abs().max()) for a, b in zip(cpu, gpu, strict=True))
    return {"max_abs_diff": diff, "ok": diff < 1e-4}


def _head_dtypes(trainer: torch.nn.Module) -> tuple[dict[str, torch.dtype], list[Any]]:
    seen: dict[str, torch.dtype] = {}
    hooks = []
    for side in ("student", "teacher"):
        model = getattr(trainer, side)
        for name in ("view_head", "region_head"):
            head = getattr(model, name, None)
            if head is not None:
                hooks.append(head.register_forward_hook(
                    lambda _m, _i, out, key=f"{side}.{name}": seen.__setitem__(key, out.dtype)))
    return seen, hooks


def check_step(backbone: str, amp: str, device: torch.device, batch_size: int = 32) -> dict[str, Any]:
    cfg = load_config(ROOT / RECIPES[backbone])
    torch.manual_seed(0)
    trainer = build_trainer(cfg, seed=0).to(device).train()
    opt = torch.optim.AdamW(trainer.student.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    seen, hooks = _head_dtypes(trainer)
    losses = []
    for step in range(2):
        with torch.autocast("cuda", dtype=dtype):
            out = trainer(photo_batch(batch_size, seed=step).to(device), teacher_temp=0.04)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(opt)
        clip_gradients(trainer.student.parameters(), 3.0, "per_param")
        scaler.step(opt)
        scaler.update()
        trainer.update_teacher(0.996)
        losses.append(float(out["loss"]))
    for h in hooks:
        h.remove()
    ok = all(map(lambda x: x == x and abs(x) < float("inf"), losses)) and \
        all(d == torch.float32 for d in seen.values()) and len(seen) == 4
    return {"losses": losses, "head_dtypes": {k: str(v) for k, v in seen.items()}, "ok": ok}


def check_torchrun(tmp: Path) -> dict[str, Any]:
    out = tmp / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(ROOT / "train_ssl.py"), "--config", str(ROOT / "configs/debug_cpu.yaml"),
            "device=cuda", f"logging.output_dir={out}", "logging.wandb=disabled", "checkpoint.every_steps=6"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.run([*base, "--max-steps", "6"], capture_output=True, text=True, env=env, timeout=240)
    second = subprocess.run([*base, "--max-steps", "12", "--resume", "auto"], capture_output=True, text=True,
                            env=env, timeout=240)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if line.strip()] if (out / "metrics.jsonl").exists() else []
    nccl = "nccl" in (first.stdout + first.stderr).lower()
    resumed = bool(re.search(r"resum", second.stdout + second.stderr, re.I))
    return {"rc": [first.returncode, second.returncode], "last_step": max(steps, default=0), "nccl_logged": nccl,
            "resume_logged": resumed, "stderr_tail": (first.stderr + second.stderr)[-1500:],
            "ok": first.returncode == 0 and second.returncode == 0 and max(steps, default=0) == 12}


def _timed(step_fn: Any, n: int = 10) -> tuple[float, float]:
    step_fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(n):
        step_fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n, torch.cuda.max_memory_allocated() / 2**30


def throughput(backbone: str, device: torch.device, batch_size: int = 64) -> dict[str, Any]:
    res: dict[str, Any] = {}
    batch = photo_batch(batch_size).to(device)
    for arm, region in (("esvit", True), ("dino", False)):
        cfg = load_config(ROOT / RECIPES[backbone], [f"model.region_loss={str(region).lower()}"])
        trainer = build_trainer(cfg, seed=0).to(device).train()
        opt = torch.optim.AdamW(trainer.student.parameters(), lr=1e-4)

        def step(trainer: Any = trainer, opt: Any = opt) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = trainer(batch, teacher_temp=0.04)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            trainer.update_teacher(0.996)

        sec, mem = _timed(step)
        res[arm] = {"images_per_s": batch_size / sec, "peak_gib": mem}
        del trainer, opt
        torch.cuda.empty_cache()
    res["lightly_dino"] = lightly_step(backbone, device, batch, batch_size)
    res["esvit_over_dino_speed"] = res["esvit"]["images_per_s"] / res["dino"]["images_per_s"]
    return res


def lightly_step(backbone: str, device: torch.device, batch: Canvas, batch_size: int) -> dict[str, Any]:
    """lightly's DINO (loss + projection head) on our backbone and our views, or why not."""
    try:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
    except ImportError as e:
        return {"skipped": f"lightly not importable ({e})"}
    import copy

    cfg = load_config(ROOT / RECIPES[backbone], ["model.region_loss=false"])
    trainer = build_trainer(cfg, seed=0).to(device)
    wrapper = trainer.student.backbone  # the same NetWrapper'd backbone: (pooled, region tokens)
    with torch.no_grad():
        dim = wrapper(torch.zeros(1, 3, 224, 224, device=device))[0].shape[-1]
    head = DINOProjectionHead(dim, 2048, 256, cfg.model.out_dim, freeze_last_layer=1).to(device)
    t_wrapper, t_head = copy.deepcopy(wrapper), copy.deepcopy(head)
    loss_fn = DINOLoss(output_dim=cfg.model.out_dim).to(device)
    opt = torch.optim.AdamW([*wrapper.parameters(), *head.parameters()], lr=1e-4)

    def step() -> None:
        with torch.no_grad():
            views = trainer.augment(batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                t_out = [t_head(t_wrapper(v)[0]) for v in views[:2]]
            s_out = [head(wrapper(v)[0]) for v in views]
            loss = loss_fn(t_out, s_out, epoch=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec, mem = _timed(step)
    return {"images_per_s": batch_size / sec, "peak_gib": mem}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--skip-torchrun", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 2
    device = torch.device("cuda")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    t0 = time.perf_counter()
    report["augmentation"] = check_augmentation(device)
    report["steps"] = {f"{b}/{amp}": check_step(b, amp, device) for b in RECIPES for amp in ("bf16", "fp16")}
    if not args.skip_torchrun:
        with tempfile.TemporaryDirectory() as tmp:
            report["torchrun"] = check_torchrun(Path(tmp))
    report["throughput"] = {b: throughput(b, device) for b in RECIPES}
    report["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(report, indent=2))
    checks = [("augmentation CPU == CUDA", report["augmentation"]["ok"])]
    checks += [(f"step {k}: finite, float32 targets", v["ok"]) for k, v in report["steps"].items()]
    if "torchrun" in report:
        checks.append(("torchrun NCCL + resume", report["torchrun"]["ok"]))
    print(f"GPU check on {report['device']} ({report['seconds']:.0f} s)")
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print(f"  augmentation max |CPU - CUDA| = {report['augmentation']['max_abs_diff']:.2e}")
    for b, r in report["throughput"].items():
        light = r["lightly_dino"]
        light_s = (f"{light['images_per_s']:.0f} img/s, {light['peak_gib']:.1f} GiB" if "images_per_s" in light
                   else light["skipped"])
        print(f"  {b} batch 64 bf16: esvit {r['esvit']['images_per_s']:.0f} img/s, {r['esvit']['peak_gib']:.1f} GiB; "
              f"dino {r['dino']['images_per_s']:.0f} img/s, {r['dino']['peak_gib']:.1f} GiB; lightly dino {light_s}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
