"""Tests for the backbone registry, torchvision equivalence and the flexible ViT."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchvision
from torch import nn

from esvit.backbones import (
    BackboneSpec,
    FlexibleVisionTransformer,
    build_backbone,
    list_backbones,
    register_backbone,
    torchvision_equivalent,
)
from esvit.backbones import registry as registry_mod
from esvit.backbones.vit import interpolate_pos_embedding

EXPECTED = {
    "resnet18",
    "resnet50",
    "swin_t",
    "vit_b_16",
    "cifar_resnet18",
    "vit_tiny",
    "vit_small_cifar",
    "swin_tiny_cifar",
    "swin_nano",
}

# name -> (build kwargs, native test image size); small sizes / depths keep the test fast.
EQUIV_CASES = {
    "resnet18": ({}, 64),
    "resnet50": ({}, 32),
    "swin_t": ({}, 32),
    "vit_b_16": ({"image_size": 32}, 32),
    "cifar_resnet18": ({}, 32),
    "vit_tiny": ({"depth": 2}, 32),
    "vit_small_cifar": ({"depth": 6, "image_size": 16}, 16),
    "swin_tiny_cifar": ({}, 32),
    "swin_nano": ({}, 32),
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
BIG = {"resnet50", "swin_t", "vit_b_16"}


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
