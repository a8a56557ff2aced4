"""View + region loss, forward and backward: esvit's blockwise losses vs the same formulas
written with plain tensor ops (``log_softmax``, gather of the matched teacher rows, product, sum).

Shapes of the trainer benchmark (``bench_trainer.py``): batch 64, 2 global + 2 local views,
4 region tokens per view (ResNet-18 at 64 px), out_dim 65536. Both variants run in this one
invocation, interleaved, each in its own subprocess (so peak RSS is per variant).

    python benchmarks/bench_losses.py [--rounds 3] [--threads 2]
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
import torch.nn.functional as F

B, VIEWS, TOKENS, K, D = 64, 4, 4, 65536, 512


def plain_losses(s_view, t_view, s_reg, s_feat, t_reg, t_feat, center, tau_t, tau_s=0.1):
    """The EsViT view + region losses with plain ops (as most implementations write them)."""
    q_view = [F.softmax((t - center) / tau_t, dim=-1) for t in t_view]
    q_reg = [F.softmax((t - center) / tau_t, dim=-1) for t in t_reg]
    view = region = 0.0
    for v in range(VIEWS):
        lp_view = F.log_softmax(s_view[v] / tau_s, dim=-1)
        lp_reg = F.log_softmax(s_reg[v] / tau_s, dim=-1)
        for i in range(2):
            if i == v:
                continue
            view = view + (-(q_view[i] * lp_view).sum(-1)).mean()
            s = F.normalize(s_feat[v], dim=-1)
            t = F.normalize(t_feat[i], dim=-1)
            idx = torch.bmm(s, t.transpose(1, 2)).argmax(-1)
            matched = torch.gather(q_reg[i], 1, idx.unsqueeze(-1).expand(-1, -1, K))
            region = region + (-(matched * lp_reg).sum(-1)).mean()
    n_pairs = 2 * (VIEWS - 1)
    return 0.5 * view / n_pairs + 0.5 * region / n_pairs


def run(variant: str, iters: int) -> dict:
    from esvit.losses import RegionLoss, ViewLoss

    g = torch.Generator().manual_seed(0)
    s_flat_view = torch.randn(VIEWS * B, K, generator=g).requires_grad_()
    s_flat_reg = torch.randn(VIEWS * B * TOKENS, K, generator=g).requires_grad_()
    t_view = torch.randn(2, B, K, generator=g)
    t_reg = torch.randn(2 * B * TOKENS, K, generator=g)
    s_feat = [torch.randn(B, TOKENS, D, generator=g) for _ in range(VIEWS)]
    t_feat = s_feat[:2]
    view_loss, region_loss = ViewLoss(K), RegionLoss(K)
    center = torch.zeros(1, K)

    def step() -> float:
        if variant == "esvit":
            loss = 0.5 * view_loss(s_flat_view.view(VIEWS, B, K), t_view, 0.04) + 0.5 * region_loss(
                s_flat_reg, s_feat, t_reg, t_feat, 0.04)
        else:
            s_view = list(s_flat_view.split(B))
            s_reg = [r.view(B, TOKENS, K) for r in s_flat_reg.split(B * TOKENS)]
            t_r = [r.view(B, TOKENS, K) for r in t_reg.split(B * TOKENS)]
            loss = plain_losses(s_view, list(t_view), s_reg, s_feat, t_r, t_feat, center, 0.04)
        s_flat_view.grad = s_flat_reg.grad = None
        loss.backward()
        return loss.item()

    value = step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    return {"step_s": (time.perf_counter() - t0) / iters, "cpu_s": (time.process_time() - c0) / iters,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss": value}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["esvit", "plain"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run(args.only, args.iters)))
        return
    runs: dict[str, list[dict]] = {"esvit": [], "plain": []}
    for _ in range(args.rounds):
        for name in runs:
            out = subprocess.run([sys.executable, __file__, "--only", name, "--iters", str(args.iters),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.split("RESULT ", 1)[1]))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    for n, m in med.items():
        print(f"{n:6s} loss fwd+bwd {m['step_s'] * 1000:7.0f} ms  CPU {m['cpu_s'] * 1000:7.0f} ms  "
              f"peak RSS {m['peak_rss_mb']:.0f} MB")
    e, r = med["esvit"], med["plain"]
    assert abs(e["loss"] - r["loss"]) < 1e-4 * abs(r["loss"]), f"losses differ: {e['loss']} vs {r['loss']}"
    print(f"\nesvit vs plain ops: {r['step_s'] / e['step_s']:.2f}x faster (wall), "
          f"{r['cpu_s'] / e['cpu_s']:.2f}x less CPU time, peak RSS {e['peak_rss_mb'] - r['peak_rss_mb']:+.0f} MB")


if __name__ == "__main__":
    main()
