"""Tests for the backbone registry, torchvision equivalence and the flexible ViT."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

from esvit.backbones import (
    BackboneSpec,
    FlexibleVisionTransformer,
    build_backbone,
    drop_path_kwargs,
    list_backbones,
    register_backbone,
    supports_drop_path,
    torchvision_equivalent,
)
from esvit.backbones import registry as registry_mod
from esvit.backbones.torchvision_models import swin_t
from esvit.backbones.vit import DropPathEncoderBlock, interpolate_pos_embedding

EXPECTED = {
    "resnet18",
    "resnet50",
    "swin_t",
    "swin_s",
    "swin_b",
    "vit_b_16",
    "vit_small",
    "cifar_resnet18",
    "vit_tiny",
    "vit_small_cifar",
    "swin_tiny_cifar",
    "swin_nano",
    "vit_nano",
}

# name -> (build kwargs, native test image size); small sizes / depths keep the test fast.
EQUIV_CASES = {
    "resnet18": ({}, 64),
    "resnet50": ({}, 32),
    "swin_t": ({}, 32),
    "swin_s": ({}, 32),
    "swin_b": ({}, 32),
    "vit_b_16": ({"image_size": 32}, 32),
    "vit_small": ({"image_size": 32}, 32),
    "cifar_resnet18": ({}, 32),
    "vit_tiny": ({"depth": 2}, 32),
    "vit_small_cifar": ({"depth": 6, "image_size": 16}, 16),
    "swin_tiny_cifar": ({}, 32),
    "swin_nano": ({}, 32),
    "vit_nano": ({}, 32),
}


def test_list_backbones_has_all_entries() -> None:
    names = list_backbones()
    assert EXPECTED <= set(names)
    assert names == sorted(names)
    assert set(EQUIV_CASES) == EXPECTED


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'nope'.*resnet18.*vit_tiny"):
        build_backbone("nope")


def test_unknown_kwarg_is_type_error() -> None:
    with pytest.raises(TypeError, match=r"'vit_tiny'.*\['bogus'\].*image_size"):
        build_backbone("vit_tiny", bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        torchvision_equivalent("resnet18", bogus=1)


def test_image_size_accepted_everywhere() -> None:
    # CNNs accept (and ignore) image_size so configs can pass it uniformly.
    net, spec = build_backbone("cifar_resnet18", image_size=64)
    assert spec.embed_dim == 512
    assert isinstance(net.fc, nn.Identity)


def test_register_backbone_and_duplicates() -> None:
    name = "_test_tiny_cnn"

    @register_backbone(name)
    def factory(width: int = 4) -> tuple[nn.Module, BackboneSpec]:
        net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1))
        spec = BackboneSpec(name, "0", "bchw", 0, "avg", width, None)
        return net, spec

    try:
        assert name in list_backbones()
        net, spec = build_backbone(name, width=5)
        assert spec.embed_dim == 5 and net[0].out_channels == 5
        with pytest.raises(ValueError, match="already registered"):
            register_backbone(name)(factory)
        with pytest.raises(ValueError, match="no registered torchvision equivalent"):
            torchvision_equivalent(name)
    finally:
        registry_mod._REGISTRY.pop(name, None)
    assert name not in list_backbones()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layout="nchw"), "layout"),
        (dict(pool="max"), "pool"),
        (dict(pool="cls"), "cls"),
        (dict(num_prefix_tokens=1), "num_prefix_tokens"),
        (dict(embed_dim=0), "embed_dim"),
    ],
)
def test_spec_validation(kwargs: dict, match: str) -> None:
    base = dict(
        name="x",
        layer="a",
        layout="bchw",
        num_prefix_tokens=0,
        pool="avg",
        embed_dim=8,
        export_ctor=None,
    )
    with pytest.raises(ValueError, match=match):
        BackboneSpec(**{**base, **kwargs})


def test_classifier_removed_and_no_pretrained() -> None:
    net, spec = build_backbone("resnet18")
    assert isinstance(net.fc, nn.Identity)
    assert spec.layer == "layer4" and spec.layout == "bchw" and spec.embed_dim == 512
    assert spec.export_ctor == "torchvision.models.resnet18"


# The big torchvision entries are plain torchvision models (structure covered by the small
# ones); their equivalence check is slow-only. Each is still built once in test_wrapper.py.
BIG = {"resnet50", "swin_t", "swin_s", "swin_b", "vit_b_16", "vit_small"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in sorted(EQUIV_CASES)],
)
def test_state_dict_loads_into_torchvision_equivalent(name: str) -> None:
    kwargs, size = EQUIV_CASES[name]
    torch.manual_seed(0)
    net, spec = build_backbone(name, **kwargs)
    ref = torchvision_equivalent(name, **kwargs)
    net.eval()
    ref.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out, before = net(x), ref(x)
    assert not torch.allclose(out, before)  # different random init before loading
    result = ref.load_state_dict(net.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        expected = ref(x)
    assert out.shape == (2, spec.embed_dim)
    torch.testing.assert_close(out, expected)
    # The export constructor name resolves to a torchvision callable.
    assert spec.export_ctor is not None and spec.export_ctor.startswith("torchvision.models.")
    module_name, attr = spec.export_ctor.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module_name), attr))


def test_export_ctor_builds_loadable_model() -> None:
    net, spec = build_backbone("vit_tiny", depth=6)
    ctor = getattr(torchvision.models, spec.export_ctor.rsplit(".", 1)[1])
    ref = ctor(image_size=32, patch_size=4, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768)
    ref.heads = nn.Identity()
    ref.load_state_dict(net.state_dict(), strict=True)
    assert type(ref) is torchvision.models.VisionTransformer


def test_cifar_resnet18_stem() -> None:
    net, _ = build_backbone("cifar_resnet18")
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.padding == (1, 1) and net.conv1.bias is None
    assert isinstance(net.maxpool, nn.Identity)
    trunk = nn.Sequential(*list(net.children())[:-2])  # conv1 ... layer4
    with torch.no_grad():
        feat = trunk(torch.zeros(1, 3, 32, 32))
    assert feat.shape == (1, 512, 4, 4)


def test_flexible_vit_sizes() -> None:
    torch.manual_seed(0)
    net, spec = build_backbone("vit_tiny", depth=6)
    assert isinstance(net, FlexibleVisionTransformer)
    assert spec.layout == "bnd" and spec.pool == "cls" and spec.num_prefix_tokens == 1
    net.eval()
    seen = []
    handle = net.encoder.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            for h, w in [(32, 32), (16, 16), (48, 48), (32, 16)]:
                out = net(torch.randn(2, 3, h, w))
                assert out.shape == (2, 192)
                assert torch.isfinite(out).all()
    finally:
        handle.remove()
    assert seen == [(2, 65, 192), (2, 17, 192), (2, 145, 192), (2, 33, 192)]
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        net(torch.randn(1, 3, 30, 32))


def test_vit_state_dict_keys_match_torchvision() -> None:
    net, _ = build_backbone("vit_tiny", depth=6)
    ref = torchvision_equivalent("vit_tiny", depth=6)
    assert list(net.state_dict()) == list(ref.state_dict())
    assert net.encoder.pos_embedding.shape == (1, 65, 192)


def test_vit_bad_args() -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        build_backbone("vit_tiny", image_size=30)
    with pytest.raises(ValueError, match=r"depth must be in \[1, 24\]"):
        build_backbone("vit_tiny", depth=0)


def test_interpolate_pos_embedding() -> None:
    pos = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embedding(pos, (4, 4)) is pos
    out = interpolate_pos_embedding(pos, (8, 2))
    assert out.shape == (1, 1 + 16, 8)
    assert torch.equal(out[:, :1], pos[:, :1])  # class token kept
    # Upsampling a constant grid stays constant.
    const = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 16, 8), 0.5)], dim=1)
    torch.testing.assert_close(
        interpolate_pos_embedding(const, (6, 6))[:, 1:], torch.full((1, 36, 8), 0.5)
    )
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embedding(torch.randn(1, 1 + 15, 8), (4, 4))


# ---------------------------------------------------------------------------- stochastic depth

NO_DROP_PATH = {"resnet18", "resnet50", "cifar_resnet18"}


def test_drop_path_support_is_read_from_the_factory_signature() -> None:
    builtin = [n for n in list_backbones() if not n.startswith("_")]
    assert {n for n in builtin if not supports_drop_path(n)} == NO_DROP_PATH

    @register_backbone("_test_dp_yes")
    def yes(width: int = 4, drop_path_rate: float = 0.0) -> tuple[nn.Module, BackboneSpec]:
        return nn.Conv2d(3, width, 1), BackboneSpec("_test_dp_yes", "", "bchw", 0, "avg", width, None)

    @register_backbone("_test_dp_kwargs")
    def anything(**kwargs: object) -> tuple[nn.Module, BackboneSpec]:
        return nn.Conv2d(3, 4, 1), BackboneSpec("_test_dp_kwargs", "", "bchw", 0, "avg", 4, None)

    try:
        assert supports_drop_path("_test_dp_yes")
        assert not supports_drop_path("_test_dp_kwargs")  # **kwargs declares nothing
        assert drop_path_kwargs("_test_dp_yes", {"width": 2}, 0.2) == {"width": 2, "drop_path_rate": 0.2}
        with pytest.raises(ValueError, match="'_test_dp_kwargs' has no stochastic depth"):
            drop_path_kwargs("_test_dp_kwargs", {}, 0.2)
    finally:
        registry_mod._REGISTRY.pop("_test_dp_yes", None)
        registry_mod._REGISTRY.pop("_test_dp_kwargs", None)


def test_drop_path_errors_name_the_key_and_backbone() -> None:
    for name in sorted(NO_DROP_PATH):
        with pytest.raises(ValueError, match=rf"drop_path_rate=0.1 .* backbone '{name}' has no stochastic depth"):
            drop_path_kwargs(name, {}, 0.1)
        assert drop_path_kwargs(name, {"image_size": 32}, 0.0) == {"image_size": 32}  # asked for none
        assert drop_path_kwargs(name, {}, None) == {}
    with pytest.raises(ValueError, match="given twice"):
        drop_path_kwargs("vit_nano", {"drop_path_rate": 0.1}, 0.1)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"drop_path_rate must be a number in \[0, 1\)"):
            build_backbone("vit_nano", drop_path_rate=bad)
        with pytest.raises(ValueError, match=r"drop_path_rate must be a number in \[0, 1\)"):
            drop_path_kwargs("swin_nano", {}, bad)
    with pytest.raises(TypeError, match=r"'resnet18'.*\['drop_path_rate'\]"):
        build_backbone("resnet18", drop_path_rate=0.1)


def _block_rates(net: nn.Module) -> list[float]:
    return [m.p for m in net.modules() if isinstance(m, StochasticDepth)]


DROP_PATH_BUILD = {name: EQUIV_CASES[name][0] for name in EQUIV_CASES if name not in NO_DROP_PATH}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in sorted(DROP_PATH_BUILD)]
)
def test_every_drop_path_backbone_honours_the_rate(name: str) -> None:
    """Rates rise linearly from 0 at the first block to drop_path_rate at the last (official rule)."""
    net, _ = build_backbone(name, **DROP_PATH_BUILD[name], drop_path_rate=0.3)
    rates = _block_rates(net)
    # torchvision Swin: one StochasticDepth per block; our ViT blocks: one, used on both branches
    assert len(rates) >= 2 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    steps = [b - a for a, b in zip(rates, rates[1:], strict=False)]
    assert all(s == pytest.approx(steps[0]) for s in steps)
    assert _block_rates(build_backbone(name, **DROP_PATH_BUILD[name], drop_path_rate=0.0)[0]) == [0.0] * len(rates)


def test_drop_path_defaults() -> None:
    """The official EsViT student values for the ImageNet backbones (swin_t 0.1, swin_s/b 0.2 from
    ``experiments/imagenet/swin/*_window7_224.yaml``, ViT-S 0.1 from ``main_esvit.py``; torchvision's
    swin_t hardcodes 0.2); the small CIFAR ViTs: 0."""
    assert inspect.signature(swin_t).parameters["drop_path_rate"].default == 0.1
    for name, rate in (("swin_s", 0.2), ("swin_b", 0.2), ("vit_small", 0.1)):
        assert inspect.signature(registry_mod._REGISTRY[name]).parameters["drop_path_rate"].default == rate
    for name in ("vit_nano", "vit_tiny", "vit_small_cifar", "vit_b_16", "swin_nano"):
        factory = registry_mod._REGISTRY[name]
        assert inspect.signature(factory).parameters["drop_path_rate"].default == 0.0, name
    assert max(_block_rates(build_backbone("swin_tiny_cifar")[0])) == pytest.approx(0.1)


def test_vit_drop_path_is_per_sample_on_both_residual_branches() -> None:
    torch.manual_seed(0)
    net, _ = build_backbone("vit_nano", drop_path_rate=0.5)
    block = net.encoder.layers[-1]
    assert isinstance(block, DropPathEncoderBlock)
    x = torch.randn(6, 5, 64)
    block.stochastic_depth.p = 1.0  # both branches always dropped: the block is the identity
    block.train()
    assert torch.equal(block(x), x)
    block.eval()  # no stochastic depth in eval mode
    assert not torch.allclose(block(x), x)
    block.stochastic_depth.p = 0.5
    block.train()
    torch.manual_seed(1)
    y = block(x)
    # per sample, each branch is dropped or kept and scaled by 1 / (1 - p) = 2 (DINO's DropPath)
    with torch.no_grad():
        h = block.ln_1(x)
        attn = block.self_attention(h, h, h, need_weights=False)[0]
        seen = set()
        for i in range(x.shape[0]):
            combos = {}
            for ka in (0.0, 2.0):
                x1 = x[i] + ka * attn[i]
                for km in (0.0, 2.0):
                    combos[(ka, km)] = x1 + km * block.mlp(block.ln_2(x1))
            match = [k for k, v in combos.items() if torch.allclose(y[i], v, atol=1e-5)]
            assert len(match) == 1, f"sample {i} is none of the four drop/keep combinations"
            seen.add(match[0])
    assert len(seen) > 1  # not one mask for the whole batch


def test_vit_with_drop_path_is_torchvision_in_eval() -> None:
    torch.manual_seed(0)
    net, _ = build_backbone("vit_nano", drop_path_rate=0.2)
    ref = torchvision_equivalent("vit_nano", drop_path_rate=0.2)
    assert list(net.state_dict()) == list(ref.state_dict())  # stochastic depth adds no state
    ref.load_state_dict(net.state_dict(), strict=True)
    net.eval()
    ref.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))
    net.train()
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x))  # the student's drop-path acts in training
