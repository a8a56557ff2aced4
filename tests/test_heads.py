"""Tests for DINOHead."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esvit.heads import DINOHead


def small_head(**kwargs: object) -> DINOHead:
    defaults = dict(in_dim=16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    return DINOHead(**{**defaults, **kwargs})


@pytest.mark.parametrize("nlayers", [1, 2, 3])
@pytest.mark.parametrize("use_bn", [False, True])
def test_output_shapes(nlayers: int, use_bn: bool) -> None:
    torch.manual_seed(0)
    head = small_head(nlayers=nlayers, use_bn=use_bn)
    assert head(torch.randn(4, 16)).shape == (4, 32)
    assert head(torch.randn(4, 5, 16)).shape == (4, 5, 32)
    n_linear = sum(isinstance(m, nn.Linear) for m in head.mlp.modules())
    assert n_linear == nlayers
    assert any(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == (use_bn and nlayers > 1)


def test_3d_matches_flattened_2d() -> None:
    torch.manual_seed(0)
    head = small_head(use_bn=True).eval()
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(head(x), head(x.reshape(21, 16)).reshape(3, 7, 32))


def test_default_dims_and_init() -> None:
    head = DINOHead(in_dim=8)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    dims = [(m.in_features, m.out_features) for m in linears]
    assert dims == [(8, 2048), (2048, 2048), (2048, 256)]
    assert head.last_layer.weight_v.shape == (65536, 256)
    assert head.last_layer.weight_g.shape == (65536, 1)
    for m in linears:
        assert torch.count_nonzero(m.bias) == 0
        # trunc_normal_(std=.02) with DINO's default bounds [-2, 2] (absolute, not in stds).
        assert m.weight.abs().max() <= 2.0
        assert 0.015 < m.weight.std() < 0.025


def test_wrong_input_dim() -> None:
    with pytest.raises(ValueError, match="in_dim=16"):
        small_head()(torch.randn(2, 15))


def test_norm_last_layer_frozen_unit_rows() -> None:
    torch.manual_seed(0)
    head = small_head(norm_last_layer=True)
    ll = head.last_layer
    assert not ll.weight_g.requires_grad
    assert ll.weight_v.requires_grad
    torch.testing.assert_close(ll.weight.norm(dim=1), torch.ones(32))
    # Scaling v does not change the effective weight.
    before = ll.weight.detach().clone()
    with torch.no_grad():
        ll.weight_v.mul_(3.0)
    torch.testing.assert_close(ll.weight, before)
    names = [n for n, p in head.named_parameters() if "last_layer" in n]
    assert sorted(names) == ["last_layer.weight_g", "last_layer.weight_v"]
    head(torch.randn(4, 16)).sum().backward()
    assert ll.weight_v.grad is not None and ll.weight_v.grad.abs().sum() > 0
    assert ll.weight_g.grad is None
    assert head.mlp[0].weight.grad.abs().sum() > 0


def test_unnormalised_last_layer_trains_g() -> None:
    head = small_head(norm_last_layer=False)
    assert head.last_layer.weight_g.requires_grad
    head(torch.randn(4, 16)).square().sum().backward()
    assert head.last_layer.weight_g.grad.abs().sum() > 0


def test_output_is_bounded_by_unit_norm_rows() -> None:
    # |<w_k, z>| <= ||w_k|| ||z|| = 1 for unit rows and L2-normalised bottleneck z.
    torch.manual_seed(0)
    out = small_head()(torch.randn(64, 16) * 100)
    assert out.abs().max() <= 1 + 1e-5


def test_bf16_autocast_finite() -> None:
    torch.manual_seed(0)
    head = small_head()
    x = torch.randn(4, 3, 16)
    x[0] = 0.0  # zero input must not produce NaN
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.shape == (4, 3, 32)
    assert torch.isfinite(out).all()
    assert out.dtype == torch.float32  # the head runs in float32 under autocast


def test_head_cast_to_bf16_runs_in_its_own_dtype() -> None:
    """A head whose parameters were cast (e.g. for export) computes in their dtype, fp32 input or not."""
    head = small_head().to(torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = head(torch.randn(4, 16))
    assert out.dtype == torch.bfloat16
    assert small_head().to(torch.bfloat16)(torch.randn(4, 16)).dtype == torch.bfloat16


def test_deepcopy_and_state_dict() -> None:
    torch.manual_seed(0)
    head = small_head()
    clone = copy.deepcopy(head)
    x = torch.randn(5, 16)
    torch.testing.assert_close(head(x), clone(x))
    assert not clone.last_layer.weight_g.requires_grad
    sd = head.state_dict()
    assert "last_layer.weight_g" in sd and "last_layer.weight_v" in sd
    fresh = small_head()
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), head(x))


def test_bad_args() -> None:
    with pytest.raises(ValueError, match="nlayers"):
        small_head(nlayers=0)
