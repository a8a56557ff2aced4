"""Tests for NetWrapper (hooked pooled + region features)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from esvit.backbones import build_backbone
from esvit.wrapper import NetWrapper

# name -> (build kwargs, [(input size, expected region tokens), ...])
CASES = {
    "resnet18": ({}, [(64, 4)]),
    "resnet50": ({}, [(32, 1)]),
    "swin_t": ({}, [(64, 4)]),
    "vit_b_16": ({"image_size": 32}, [(32, 4), (64, 16)]),
    "cifar_resnet18": ({}, [(32, 16)]),
    "vit_tiny": ({"depth": 6}, [(32, 64), (16, 16)]),
    "vit_small_cifar": ({"depth": 6}, [(32, 64), (24, 36)]),
    "swin_tiny_cifar": ({}, [(32, 16)]),
}


@functools.cache
def _built(name: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    kwargs, _ = CASES[name]
    return build_backbone(name, **kwargs)


class Recorder(nn.Module):
    """Identity that counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # "0"
        nn.ReLU(),  # "1"
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # "2"
        Recorder(),  # "3"
        nn.Flatten(),  # "4"
    )


def _no_hooks(module: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in module.modules())


@pytest.mark.parametrize("name", sorted(CASES))
def test_all_backbones_through_wrapper(name: str) -> None:
    net, spec = _built(name)
    wrapper = NetWrapper.from_spec(net, spec).eval()
    _, sizes = CASES[name]
    for size, n_tokens in sizes:
        with torch.no_grad():
            pooled, regions = wrapper(torch.randn(2, 3, size, size))
        assert pooled.shape == (2, spec.embed_dim)
        assert regions.shape == (2, n_tokens, spec.embed_dim)
        assert torch.isfinite(pooled).all() and torch.isfinite(regions).all()
        if spec.pool == "avg":
            torch.testing.assert_close(pooled, regions.mean(dim=1))
        assert wrapper.probe(size) == (spec.embed_dim, n_tokens)
    assert _no_hooks(net)


def test_vit_cls_pooling_matches_backbone_output() -> None:
    net, spec = _built("vit_tiny")
    wrapper = NetWrapper.from_spec(net, spec).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled, regions = wrapper(x)
        # heads = Identity, so the backbone's output is the final CLS token.
        torch.testing.assert_close(pooled, net(x))
    assert not torch.allclose(pooled, regions.mean(dim=1))


def test_gradients_flow_to_backbone() -> None:
    torch.manual_seed(0)
    net, spec = build_backbone("vit_tiny", depth=6)
    wrapper = NetWrapper.from_spec(net, spec)
    pooled, regions = wrapper(torch.randn(2, 3, 16, 16))
    (pooled.square().sum() + regions.square().sum()).backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    assert net.conv_proj.weight.grad.abs().sum() > 0
    assert net.encoder.pos_embedding.grad.abs().sum() > 0


def test_stop_after_layer_skips_rest() -> None:
    net = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    stop = NetWrapper(net, "2", "bchw", stop_after_layer=True)
    full = NetWrapper(net, "2", "bchw", stop_after_layer=False)
    p1, r1 = stop(x)
    assert net[3].calls == 0
    p2, r2 = full(x)
    assert net[3].calls == 1
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(r1, r2)
    assert r1.shape == (2, 16, 16)  # 16x16 -> 4x4 tokens, 16 channels
    expected = net[2](net[1](net[0](x))).flatten(2).transpose(1, 2)
    torch.testing.assert_close(r1, expected)
    assert _no_hooks(net)


def test_int_layer_index_and_names() -> None:
    net = tiny_cnn()
    names = [n for n, _ in net.named_modules()]
    assert NetWrapper(net, 3, "bchw").layer == names[3] == "2"
    assert NetWrapper(net, -2, "bchw").layer == "3"
    with pytest.raises(ValueError, match="out of range"):
        NetWrapper(net, 99, "bchw")


def test_unknown_layer_is_value_error() -> None:
    with pytest.raises(ValueError, match=r"layer 'layer9' not found.*'layer4'"):
        NetWrapper(build_backbone("resnet18")[0], "layer9", "bchw")


def test_bad_constructor_args() -> None:
    net = tiny_cnn()
    with pytest.raises(ValueError, match="layout"):
        NetWrapper(net, "2", "nchw")
    with pytest.raises(ValueError, match="pool"):
        NetWrapper(net, "2", "bchw", pool="max")
    with pytest.raises(ValueError, match="cls"):
        NetWrapper(net, "2", "bchw", pool="cls")


def test_wrong_layout_error_names_layer_layout_shape() -> None:
    net = tiny_cnn()
    wrapper = NetWrapper(net, "4", "bchw")  # Flatten output is 2-D
    with pytest.raises(ValueError, match=r"'4'.*\(2, 256\).*'bchw'"):
        wrapper(torch.randn(2, 3, 16, 16))
    assert _no_hooks(net)
    net_vit, spec = _built("vit_tiny")
    with pytest.raises(ValueError, match=r"'conv_proj'.*\(1, 192, 4, 4\).*'bnd'"):
        NetWrapper(net_vit, "conv_proj", "bnd")(torch.randn(1, 3, 16, 16))
    assert _no_hooks(net_vit)


def test_bhwc_layout() -> None:
    class ToBHWC(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 3, 1)

    net = nn.Sequential(nn.Conv2d(3, 6, 2, stride=2), ToBHWC())
    x = torch.randn(2, 3, 8, 6)
    pooled, regions = NetWrapper(net, "1", "bhwc")(x)
    fmap = net[0](x)  # (2, 6, 4, 3)
    torch.testing.assert_close(regions, fmap.flatten(2).transpose(1, 2))
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))


def test_bnd_avg_pool_with_prefix() -> None:
    class Tokens(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    net = nn.Sequential(Tokens())
    tokens = torch.randn(2, 5, 4)
    pooled, regions = NetWrapper(net, "0", "bnd", pool="avg", num_prefix_tokens=1)(tokens)
    torch.testing.assert_close(regions, tokens[:, 1:])
    torch.testing.assert_close(pooled, tokens[:, 1:].mean(1))
    pooled, _ = NetWrapper(net, "0", "bnd", pool="cls", num_prefix_tokens=1)(tokens)
    torch.testing.assert_close(pooled, tokens[:, 0])


def test_tuple_output_takes_first() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x * 0

    net = nn.Sequential(Pair())
    x = torch.randn(1, 3, 2, 2)
    pooled, regions = NetWrapper(net, "0", "bchw")(x)
    torch.testing.assert_close(regions, (x * 2).flatten(2).transpose(1, 2))


def test_hooks_removed_when_forward_raises() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    net = nn.Sequential(Boom(), nn.Conv2d(3, 4, 1))
    wrapper = NetWrapper(net, "1", "bchw")
    with pytest.raises(RuntimeError, match="boom"):
        wrapper(torch.randn(1, 3, 4, 4))
    assert _no_hooks(net)


def test_layer_not_called_is_error() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 4, 1)
            self.unused = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(RuntimeError, match="'unused' was not called"):
        NetWrapper(Skip(), "unused", "bchw")(torch.randn(1, 3, 2, 2))


def test_deepcopy_independent() -> None:
    torch.manual_seed(0)
    student = NetWrapper(tiny_cnn(), "2", "bchw")
    teacher = copy.deepcopy(student)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(student(x)[0], teacher(x)[0])
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    ps, _ = student(x)
    pt, _ = teacher(x)
    assert not torch.allclose(ps, pt)
    assert teacher.net is not student.net
    assert _no_hooks(student) and _no_hooks(teacher)


def test_two_wrappers_on_copies_do_not_interfere() -> None:
    torch.manual_seed(0)
    base = tiny_cnn()
    a = NetWrapper(copy.deepcopy(base), "2", "bchw")
    b = NetWrapper(copy.deepcopy(base), "0", "bchw")
    x = torch.randn(2, 3, 8, 8)
    pa, ra = a(x)
    pb, rb = b(x)
    assert ra.shape == (2, 4, 16) and rb.shape == (2, 16, 8)
    torch.testing.assert_close(rb, base[0](x).flatten(2).transpose(1, 2))


def test_probe_restores_modes_and_device() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Dropout())
    wrapper = NetWrapper(net, "1", "bchw")
    wrapper.train()
    net[1].eval()  # e.g. a frozen BN: mixed modes must survive probe()
    running = net[1].running_mean.clone()
    assert wrapper.probe(32) == (8, 256)
    assert wrapper.training and net[0].training and not net[1].training and net[2].training
    assert torch.equal(net[1].running_mean, running)
    assert torch.is_grad_enabled()


def test_ddp_single_process(tmp_path) -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:

        class Model(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.backbone = NetWrapper(tiny_cnn(), "2", "bchw")
                self.proj = nn.Linear(16, 4)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                pooled, regions = self.backbone(x)
                return self.proj(pooled) + self.proj(regions).mean(1)

        torch.manual_seed(0)
        model = Model()
        ddp = DistributedDataParallel(model)
        out = ddp(torch.randn(4, 3, 8, 8))
        assert out.shape == (4, 4)
        out.square().sum().backward()
        assert model.proj.weight.grad is not None and model.proj.weight.grad.abs().sum() > 0
        conv = model.backbone.net[0]
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        assert _no_hooks(model)
    finally:
        dist.destroy_process_group()
