"""Gradient clipping (official per-parameter rule, frozen last layer) and float32 teacher targets."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from esvit.config import _CHOICES, ConfigError, load_config
from esvit.heads import DINOHead
from esvit.losses import RegionLoss, ViewLoss, teacher_probs
from esvit.train import loop
from esvit.train.optim import CLIP_MODES, clip_gradients

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def official_clip_gradients(params: Iterable[nn.Parameter], clip: float) -> list[float]:
    """``utils.clip_gradients`` of microsoft/esvit, verbatim apart from the parameter iteration."""
    norms = []
    for p in params:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def params_with_grads(*scales: float, seed: int = 0) -> list[nn.Parameter]:
    """Small parameters of different shapes whose gradients have norm ``scale`` each."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 2, 2), (1,), (7, 3)]
    out = []
    for i, s in enumerate(scales):
        p = nn.Parameter(torch.randn(shapes[i % len(shapes)], generator=g))
        grad = torch.randn(p.shape, generator=g)
        p.grad = grad * (s / grad.norm())
        out.append(p)
    return out


def clone_grads(params: list[nn.Parameter]) -> list[nn.Parameter]:
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


# ------------------------------------------------------------------ clipping


@pytest.mark.parametrize("clip", [3.0, 0.5, 1e-3])
def test_per_param_clip_matches_official_formula(clip: float) -> None:
    params = params_with_grads(10.0, 0.1, 3.0, 2.5, 1e-8)
    params.append(nn.Parameter(torch.ones(2)))  # no gradient: skipped
    ref = clone_grads(params)
    norms = official_clip_gradients(ref, clip)
    total = clip_gradients(params, clip, "per_param")
    for p, r in zip(params, ref, strict=True):
        if r.grad is None:
            assert p.grad is None
        else:
            assert torch.allclose(p.grad, r.grad, rtol=1e-6, atol=0)
    assert total is not None
    assert float(total) == pytest.approx(math.sqrt(sum(n * n for n in norms)), rel=1e-6)


def test_per_param_differs_from_global_and_global_matches_torch() -> None:
    params = params_with_grads(10.0, 0.1, 3.0)
    glob, ref = clone_grads(params), clone_grads(params)
    clip_gradients(params, 3.0, "per_param")
    norm = clip_gradients(glob, 3.0, "global")
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 3.0)
    assert float(norm) == pytest.approx(float(ref_norm))
    for g, r in zip(glob, ref, strict=True):
        assert torch.equal(g.grad, r.grad)
    # per_param leaves the small gradient alone and cuts the large one to exactly the threshold
    assert torch.equal(params[1].grad.norm(), clone_grads(params_with_grads(10.0, 0.1, 3.0))[1].grad.norm())
    assert params[0].grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert not torch.allclose(params[1].grad, glob[1].grad)


@pytest.mark.parametrize("mode", CLIP_MODES)
def test_frozen_gradients_are_dropped_before_the_norm(mode: str) -> None:
    body = params_with_grads(1.0, 2.0, seed=1)
    last = params_with_grads(1e4, seed=2)  # an exploding frozen last layer
    before = [p.grad.clone() for p in body]
    norm = clip_gradients([*body, *last], 3.0, mode, frozen=last)
    assert last[0].grad is None
    assert float(norm) == pytest.approx(math.sqrt(1.0 + 4.0), rel=1e-6)
    for p, b in zip(body, before, strict=True):  # ||body|| = 2.24 < 3: nothing to clip
        assert torch.equal(p.grad, b)


def test_zero_clip_disables_clipping_but_still_drops_frozen() -> None:
    body, last = params_with_grads(50.0), params_with_grads(5.0, seed=3)
    before = body[0].grad.clone()
    assert clip_gradients([*body, *last], 0.0, "per_param", frozen=last) is None
    assert torch.equal(body[0].grad, before) and last[0].grad is None


def test_clip_rejects_bad_mode_and_threshold() -> None:
    p = params_with_grads(1.0)
    with pytest.raises(ValueError, match="per_param, global"):
        clip_gradients(p, 1.0, "norm")
    with pytest.raises(ValueError, match="max_norm"):
        clip_gradients(p, -1.0)


def test_training_loop_clips_after_dropping_frozen_last_layer(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop passes the config's mode and the frozen last layer; the logged norm excludes it."""
    calls = []

    def spy(params: Iterable[Tensor], max_norm: float, mode: str = "per_param",
            frozen: Iterable[Tensor] = ()) -> Tensor | None:
        params, frozen = list(params), list(frozen)
        ids = {id(p) for p in frozen}
        kept = [p.grad.norm() for p in params if p.grad is not None and id(p) not in ids]
        frozen_norm = sum(float(p.grad.norm()) for p in frozen if p.grad is not None)
        out = clip_gradients(params, max_norm, mode, frozen)
        calls.append((mode, len(frozen), frozen_norm, float(torch.stack(kept).norm()), float(out)))
        return out

    monkeypatch.setattr(loop, "clip_gradients", spy)
    cfg = load_config(CONFIGS / "debug_cpu.yaml", [
        "data.synthetic_images=32", "optim.batch_size=16", "model.out_dim=64", "logging.progress=false",
        "augment.n_local=0", "optim.epochs=2", "optim.freeze_last_layer_epochs=1", "optim.clip_mode=global",
        f"logging.output_dir={tmp_path}", "checkpoint.every_epochs=0"])
    loop.train(cfg, max_steps=3)
    assert [c[0] for c in calls] == ["global"] * 3
    frozen_steps = [c for c in calls if c[1] > 0]
    assert len(frozen_steps) == 2  # 2 steps per epoch, the first epoch frozen
    for _, n_frozen, frozen_norm, kept_norm, logged in frozen_steps:
        assert n_frozen == 4 and frozen_norm > 0  # weight_v/_g of both heads; weight_v had gradients
        assert logged == pytest.approx(kept_norm, rel=1e-5)
    assert calls[2][1] == 0


def test_clip_mode_config_key() -> None:
    assert load_config(None).optim.clip_mode == "per_param"  # the official rule by default
    assert tuple(_CHOICES["optim.clip_mode"]) == CLIP_MODES
    with pytest.raises(ConfigError, match=r"^optim\.clip_mode: must be one of per_param, global, got 'norm'$"):
        load_config(None, ["optim.clip_mode=norm"])
    assert load_config(CONFIGS / "esvit_swin_tiny_imagenet.yaml").optim.clip_mode == "per_param"
    for name in ("cifar10_resnet18", "cifar10_vit_nano", "cifar10_vit_tiny"):  # tuned with the global norm
        raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert raw["optim"]["clip_mode"] == "global", name


# ------------------------------------------------------------------ precision of the targets


def tiny_head(**kwargs: object) -> DINOHead:
    torch.manual_seed(0)
    return DINOHead(in_dim=32, out_dim=256, hidden_dim=64, bottleneck_dim=32, **kwargs)


@pytest.mark.parametrize("use_bn", [False, True])
def test_teacher_targets_under_bf16_autocast_match_float32(use_bn: bool) -> None:
    head = tiny_head(use_bn=use_bn).eval() if use_bn else tiny_head()
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = head(x)
        center = ref.mean((0, 1), keepdim=True).reshape(1, -1) * 0.5
        want = teacher_probs(ref, center, 0.04)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(x)
            got = teacher_probs(out, center, 0.04)
    assert out.dtype == torch.float32
    rel = ((got - want).abs() / want).max()
    assert rel < 1e-3, f"teacher targets off by {float(rel):.2%} under bf16 autocast"


def test_head_outputs_float32_under_autocast_and_gradient_reaches_bf16_input() -> None:
    head = tiny_head()
    x = torch.randn(6, 32).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.dtype == torch.float32
    out.square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert head.last_layer.weight_v.grad.dtype == torch.float32


def test_head_fp32_false_follows_autocast() -> None:
    """The opt-out keeps the ambient precision, and is what today's percent-level error looks like."""
    head = tiny_head(fp32=False)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = head(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(x)
    assert out.dtype == torch.bfloat16
    want, got = teacher_probs(ref, torch.zeros(1, 256), 0.04), teacher_probs(out, torch.zeros(1, 256), 0.04)
    assert ((got - want).abs() / want).max() > 1e-2


def test_losses_of_autocast_heads_match_float32_run() -> None:
    """View and region losses over heads run under bf16 autocast equal the float32 run."""
    head = tiny_head()
    g = torch.Generator().manual_seed(3)
    s_feat, t_feat = [torch.randn(2, 3, 32, generator=g) for _ in range(3)], None
    t_feat = s_feat[:2]
    view, region = ViewLoss(256), RegionLoss(256)

    def losses() -> Tensor:
        s = [head(f) for f in s_feat]
        t = [head(f) for f in t_feat]
        return view([o.mean(1) for o in s], [o.mean(1) for o in t], 0.04) + region(s, s_feat, t, t_feat, 0.04)

    with torch.no_grad():
        want = losses()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = losses()
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5)
