"""``timm/<name>`` and ``torchvision/<name>`` backbones: spec found by probing, variable input
size, prefix tokens never regions, stochastic depth, one-line errors with the closest names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esvit.backbones import build_backbone, supports_drop_path
from esvit.backbones.hub import probe_spec
from esvit.trainer import EsViTTrainer
from esvit.wrapper import NetWrapper

# name -> (layer, layout, prefix tokens, pool, embed dim)
TORCHVISION = {
    "torchvision/resnet18": ("layer4", "bchw", 0, "avg", 512),
    "torchvision/mobilenet_v3_small": ("features", "bchw", 0, "avg", 576),
    "torchvision/vit_b_16": ("encoder", "bnd", 1, "cls", 768),
}
TIMM = {
    "timm/resnet18": ("layer4", "bchw", 0, "avg", 512),
    "timm/vit_tiny_patch16_224": ("norm", "bnd", 1, "cls", 192),
    "timm/vit_small_patch14_reg4_dinov2": ("norm", "bnd", 5, "cls", 384),  # CLS + 4 register tokens
    "timm/convnext_atto": ("norm_pre", "bchw", 0, "avg", 320),
}


def _check(name: str, expected: tuple, sizes: tuple[int, ...] = (224, 112)) -> None:
    net, spec = build_backbone(name)
    assert (spec.layer, spec.layout, spec.num_prefix_tokens, spec.pool, spec.embed_dim) == expected
    wrapper = NetWrapper.from_spec(net, spec).eval()
    patch = 14 if "patch14" in name else 16 if "patch16" in name or "vit_b_16" in name else 32
    for size in sizes:
        size = size // patch * patch
        pooled, regions = wrapper(torch.randn(2, 3, size, size))
        assert pooled.shape == (2, spec.embed_dim)
        assert regions.shape == (2, (size // patch) ** 2, spec.embed_dim)  # prefix tokens excluded


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_backbones_by_name(name: str) -> None:
    _check(name, TORCHVISION[name])


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_backbones_by_name(name: str) -> None:
    pytest.importorskip("timm")
    _check(name, TIMM[name])


def test_timm_register_tokens_are_not_regions_and_cls_pools() -> None:
    pytest.importorskip("timm")
    net, spec = build_backbone("timm/vit_small_patch14_reg4_dinov2")
    tokens = {}
    net.get_submodule(spec.layer).register_forward_hook(lambda _m, _i, out: tokens.setdefault("t", out))
    pooled, regions = NetWrapper.from_spec(net, spec).eval()(torch.randn(1, 3, 56, 56))
    assert torch.equal(pooled, tokens["t"][:, 0]) and torch.equal(regions, tokens["t"][:, 5:])


def test_hub_names_in_the_python_api_and_drop_path() -> None:
    tr = EsViTTrainer.from_backbone("torchvision/resnet18", global_size=64, local_size=32, n_local=2,
                                    out_dim=32, hidden_dim=32, bottleneck_dim=16)
    assert tr(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), teacher_temp=0.04)["loss"].isfinite()
    assert supports_drop_path("torchvision/swin_t") and supports_drop_path("torchvision/vit_b_16")
    assert not supports_drop_path("torchvision/resnet18")
    with pytest.raises(ValueError, match="no stochastic depth"):
        EsViTTrainer.from_backbone("torchvision/resnet18", drop_path_rate=0.1)
    net, _ = build_backbone("torchvision/vit_b_16", image_size=32, drop_path_rate=0.2)
    assert [round(b.stochastic_depth.p, 3) for b in net.encoder.layers][-1] == 0.2


def test_torchvision_vit_state_dict_is_torchvisions() -> None:
    """The flexible class swap keeps the torchvision state dict (export / load_state_dict strict)."""
    from torchvision import models

    net, _ = build_backbone("torchvision/vit_b_16", image_size=32)
    ref = models.vit_b_16(weights=None, image_size=32)
    ref.heads = nn.Identity()
    ref.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(ref.eval()(x), net.eval()(x), atol=1e-5)


@pytest.mark.parametrize(("name", "expected"), [
    ("reznet18", "closest: resnet18"),
    ("torchvision/resnet181", "closest: torchvision/resnet18"),
    ("foo/bar", "unknown backbone prefix"),
    ("timm/", "give a model after the prefix"),
])
def test_unknown_names_are_one_line_errors_with_the_closest(name: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected) as e:
        build_backbone(name)
    assert "\n" not in str(e.value)


def test_timm_name_without_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ImportError, match=r"esvit\[timm\]"):
        build_backbone("timm/resnet18")


def test_probe_refuses_a_model_without_feature_maps() -> None:
    with pytest.raises(ValueError, match="layer=<module name>"):
        probe_spec(nn.Sequential(nn.Flatten(), nn.LazyLinear(4)), "mlp", 32)


def test_timm_student_drops_paths_and_teacher_does_not() -> None:
    pytest.importorskip("timm")
    tr = EsViTTrainer.from_backbone("timm/vit_tiny_patch16_224", drop_path_rate=0.5, global_size=32,
                                    local_size=16, n_local=2, out_dim=32, hidden_dim=32, bottleneck_dim=16).train()
    x = [torch.randn(2, 3, 32, 32)] * 2
    with torch.no_grad():
        assert not torch.equal(tr.student(x)["view_stack"], tr.student(x)["view_stack"])
        assert torch.equal(tr.teacher(x)["view_stack"], tr.teacher(x)["view_stack"])
