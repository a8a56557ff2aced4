"""Parity tests of the view and region losses against the published formulas (EsViT, DINO)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from esvit.losses import Center, RegionLoss, ViewLoss, match_regions

K, B, D = 17, 3, 5


def reference_view_loss(s_views, t_views, center, tau_t, tau_s):
    """DINO's loss written directly from the formula with explicit loops."""
    total, n = 0.0, 0
    for i, t in enumerate(t_views):
        q = F.softmax((t - center) / tau_t, dim=-1)
        for v, s in enumerate(s_views):
            if v == i:
                continue
            log_p = torch.log(F.softmax(s.double() / tau_s, dim=-1))  # the formula, in float64
            q = q.double()
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            n += 1
    return total / n


def reference_region_loss(s_out, s_feat, t_out, t_feat, center, tau_t, tau_s):
    """EsViT region loss with explicit per-sample, per-token loops."""
    total, n = 0.0, 0
    for i in range(len(t_out)):
        for v in range(len(s_out)):
            if v == i:
                continue
            per_sample = []
            for b in range(s_out[v].shape[0]):
                per_token = []
                for j in range(s_out[v].shape[1]):
                    sims = torch.stack([
                        F.cosine_similarity(s_feat[v][b, j], t_feat[i][b, m], dim=0)
                        for m in range(t_feat[i].shape[1])
                    ])
                    m = int(sims.argmax())
                    q = F.softmax((t_out[i][b, m] - center[0]) / tau_t, dim=-1)
                    log_p = F.log_softmax(s_out[v][b, j] / tau_s, dim=-1)
                    per_token.append(-(q * log_p).sum())
                per_sample.append(torch.stack(per_token).mean())
            total = total + torch.stack(per_sample).mean()
            n += 1
    return total / n


def make_views(n_local: int, n_global_tokens: int = 4, n_local_tokens: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_views = 2 + n_local
    tokens = [n_global_tokens] * 2 + [n_local_tokens] * n_local
    s_view = [torch.randn(B, K, generator=g) * 3 for _ in range(n_views)]
    t_view = [torch.randn(B, K, generator=g) * 3 for _ in range(2)]
    s_out = [torch.randn(B, n, K, generator=g) * 3 for n in tokens]
    s_feat = [torch.randn(B, n, D, generator=g) for n in tokens]
    t_out = [torch.randn(B, n_global_tokens, K, generator=g) * 3 for _ in range(2)]
    t_feat = [torch.randn(B, n_global_tokens, D, generator=g) for _ in range(2)]
    return s_view, t_view, s_out, s_feat, t_out, t_feat


@pytest.mark.parametrize("n_local", [0, 1, 2, 3])
@pytest.mark.parametrize("tau_t", [0.04, 0.07])
def test_view_loss_matches_reference(n_local: int, tau_t: float) -> None:
    s_view, t_view, *_ = make_views(n_local)
    loss = ViewLoss(K, student_temp=0.1)
    loss.center.center.copy_(torch.randn(1, K))
    got = loss(s_view, t_view, tau_t)
    want = reference_view_loss(s_view, t_view, loss.center.center, tau_t, 0.1)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_local", [0, 1, 2, 3])
@pytest.mark.parametrize("tokens", [(4, 2), (9, 4), (4, 4)])
def test_region_loss_matches_reference(n_local: int, tokens: tuple[int, int]) -> None:
    _, _, s_out, s_feat, t_out, t_feat = make_views(n_local, *tokens, seed=n_local)
    loss = RegionLoss(K, student_temp=0.1)
    loss.center.center.copy_(torch.randn(1, K))
    got = loss(s_out, s_feat, t_out, t_feat, 0.05)
    want = reference_region_loss(s_out, s_feat, t_out, t_feat, loss.center.center, 0.05, 0.1)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_region_loss_grad_flows_to_outputs_not_through_matching() -> None:
    _, _, s_out, s_feat, t_out, t_feat = make_views(2)
    s_out = [s.requires_grad_() for s in s_out]
    s_feat = [f.requires_grad_() for f in s_feat]
    RegionLoss(K)(s_out, s_feat, t_out, t_feat, 0.04).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in s_out)
    assert all(f.grad is None for f in s_feat)


def test_match_regions_picks_most_similar_token() -> None:
    t = torch.eye(4).unsqueeze(0)  # 4 orthogonal teacher tokens
    s = torch.tensor([[[0.1, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]])
    assert match_regions(s, t).tolist() == [[1, 3]]


def test_view_loss_grad_only_to_student() -> None:
    s_view, t_view, *_ = make_views(2)
    s_view = [s.requires_grad_() for s in s_view]
    t_view = [t.requires_grad_() for t in t_view]
    ViewLoss(K)(s_view, t_view, 0.04).backward()
    assert all(s.grad is not None for s in s_view)
    assert all(t.grad is None for t in t_view)


def test_identical_sharp_views_give_low_loss_and_uniform_gives_log_k() -> None:
    x = torch.zeros(B, K)
    x[:, 3] = 100.0
    loss = ViewLoss(K, student_temp=0.1)
    assert loss([x, x, x], [x, x], 0.04).item() < 1e-4
    u = torch.zeros(B, K)
    assert loss([u, u], [u, u], 0.04).item() == pytest.approx(math.log(K), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_are_finite_in_low_precision(dtype: torch.dtype) -> None:
    s_view, t_view, s_out, s_feat, t_out, t_feat = make_views(2)
    big = [(x * 2000).to(dtype) for x in s_view]  # logits that overflow a naive fp16 softmax
    tbig = [(x * 2000).to(dtype) for x in t_view]
    v = ViewLoss(K)(big, tbig, 0.04)
    r = RegionLoss(K)([x.to(dtype) * 2000 for x in s_out], [f.to(dtype) for f in s_feat],
                      [x.to(dtype) * 2000 for x in t_out], [f.to(dtype) for f in t_feat], 0.04)
    assert v.dtype == torch.float32 and torch.isfinite(v)
    assert torch.isfinite(r)


def test_center_ema_update() -> None:
    c = Center(K, momentum=0.9)
    x = torch.randn(6, K)
    c.update(x)
    assert torch.allclose(c.center, 0.1 * x.mean(0, keepdim=True), atol=1e-6)
    c.update(x)
    assert torch.allclose(c.center, (0.9 * 0.1 + 0.1) * x.mean(0, keepdim=True), atol=1e-6)


def test_region_center_counts_every_token_and_is_separate() -> None:
    v, r = ViewLoss(K), RegionLoss(K)
    t_out = [torch.randn(B, 4, K), torch.randn(B, 4, K)]
    r.update_center(t_out)
    want = 0.1 * torch.cat([t.reshape(-1, K) for t in t_out]).mean(0, keepdim=True)
    assert torch.allclose(r.center.center, want, atol=1e-6)
    assert torch.count_nonzero(v.center.center) == 0


def test_loss_validates_view_counts() -> None:
    with pytest.raises(ValueError, match="student views"):
        ViewLoss(K)([torch.randn(B, K)], [torch.randn(B, K)], 0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        ViewLoss(K)([torch.randn(B, K)] * 2, [torch.randn(B, K)], 0.0)


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force several row blocks (K=17 -> 2 rows per block) to exercise the block loops."""
    import esvit.losses.cross_entropy as ce

    monkeypatch.setattr(ce, "_CPU_BLOCK_ELEMENTS", 2 * K)


@pytest.mark.parametrize("blocks", ["one", "many"])
def test_view_and_region_gradients_match_reference(blocks: str, request: pytest.FixtureRequest) -> None:
    if blocks == "many":
        request.getfixturevalue("tiny_blocks")
    s_view, t_view, s_out, s_feat, t_out, t_feat = make_views(2, 4, 2, seed=3)
    center = torch.randn(1, K)
    view, region = ViewLoss(K), RegionLoss(K)
    view.center.center.copy_(center)
    region.center.center.copy_(center)
    sv = [s.clone().requires_grad_() for s in s_view]
    so = [s.clone().requires_grad_() for s in s_out]
    (view(sv, t_view, 0.05) + 2 * region(so, s_feat, t_out, t_feat, 0.05)).backward()
    rv = [s.double().requires_grad_() for s in s_view]
    ro = [s.double().requires_grad_() for s in s_out]
    want = reference_view_loss(rv, t_view, center, 0.05, 0.1) + 2 * reference_region_loss(
        ro, s_feat, [t.double() for t in t_out], t_feat, center.double(), 0.05, 0.1)
    want.backward()
    for got, ref in zip(sv + so, rv + ro, strict=True):
        assert torch.allclose(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)


def test_flat_and_stacked_inputs_equal_per_view_lists() -> None:
    s_view, t_view, s_out, s_feat, t_out, t_feat = make_views(3, 4, 2, seed=4)
    view, region = ViewLoss(K), RegionLoss(K)
    assert torch.equal(view(s_view, t_view, 0.04), view(torch.stack(s_view), torch.stack(t_view), 0.04))
    flat_s = torch.cat([o.reshape(-1, K) for o in s_out])
    flat_t = torch.cat([o.reshape(-1, K) for o in t_out])
    assert torch.allclose(region(s_out, s_feat, t_out, t_feat, 0.04), region(flat_s, s_feat, flat_t, t_feat, 0.04))
    with pytest.raises(ValueError, match="flat region outputs"):
        region(flat_s[1:], s_feat, flat_t, t_feat, 0.04)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradient_matches_float32(dtype: torch.dtype) -> None:
    s_view, t_view, *_ = make_views(2, seed=5)
    low = [s.to(dtype).requires_grad_() for s in s_view]
    full = [s.to(dtype).float().requires_grad_() for s in s_view]
    ViewLoss(K)(low, t_view, 0.04).backward()
    ViewLoss(K)(full, t_view, 0.04).backward()
    for a, b in zip(low, full, strict=True):
        assert a.grad.dtype == dtype
        assert torch.allclose(a.grad.float(), b.grad, rtol=2e-2, atol=1e-3)


@pytest.mark.usefixtures("tiny_blocks")
def test_softmax_entropy_matches_formula() -> None:
    from esvit.losses.cross_entropy import softmax_entropy

    x, c = torch.randn(7, K) * 4, torch.randn(1, K)
    ent, mean = softmax_entropy(x.to(torch.bfloat16), 0.05, c)
    p = F.softmax((x.to(torch.bfloat16).float() - c) / 0.05, dim=-1)
    assert torch.allclose(ent, -torch.special.xlogy(p, p).sum(-1), atol=1e-4)
    assert torch.allclose(mean, p.mean(0), atol=1e-6)
    assert ent.shape == (7,) and mean.shape == (K,)


def test_losses_under_autocast_equal_float32_of_same_inputs() -> None:
    s_view, t_view, s_out, s_feat, t_out, t_feat = make_views(1, seed=6)
    view, region = ViewLoss(K), RegionLoss(K)
    want = view(s_view, t_view, 0.04) + region(s_out, s_feat, t_out, t_feat, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = view(s_view, t_view, 0.04) + region(s_out, s_feat, t_out, t_feat, 0.04)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6)


def test_bf16_inputs_under_autocast_are_computed_in_float32() -> None:
    """bf16 head outputs: targets, centre and losses equal float32 math on the same values."""
    from esvit.losses import teacher_probs

    s_view, t_view, s_out, s_feat, t_out, t_feat = make_views(1, seed=7)
    low = [[x.to(torch.bfloat16) for x in xs] for xs in (s_view, t_view, s_out, s_feat, t_out, t_feat)]
    full = [[x.float() for x in xs] for xs in low]
    center = torch.randn(1, K)
    want_q = F.softmax((full[1][0] - center) / 0.04, dim=-1)
    view, region, c_low, c_full = ViewLoss(K), RegionLoss(K), Center(K), Center(K)
    want = view(full[0], full[1], 0.04) + region(*full[2:], 0.04)
    c_full.update(torch.stack(full[1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = teacher_probs(low[1][0], center, 0.04)
        got = view(low[0], low[1], 0.04) + region(*low[2:], 0.04)
        c_low.update(torch.stack(low[1]))
    assert q.dtype == torch.float32 and torch.allclose(q, want_q, rtol=1e-5, atol=1e-7)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6)
    assert c_low.center.dtype == torch.float32 and torch.allclose(c_low.center, c_full.center, rtol=1e-6)
