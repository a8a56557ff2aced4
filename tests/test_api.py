"""``esvit.pretrain``: a folder in, an exported backbone out, by name or with any nn.Module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import esvit


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from esvit.data import write_synthetic_image_folder

    root = tmp_path_factory.mktemp("imgs")
    write_synthetic_image_folder(root, n_per_class=16, num_classes=2, size=32, seed=0)
    return root


SMALL = dict(optim__epochs=1, optim__batch_size=16, data__num_workers=0, logging__wandb="disabled",
             logging__progress=False)


def test_pretrain_by_name_returns_the_exported_backbone(images: Path, tmp_path: Path) -> None:
    out = esvit.pretrain(images, model="vit_nano", out=tmp_path / "run", config="debug_cpu", **SMALL)
    assert out == tmp_path / "run" / "backbone.safetensors" and out.is_file()
    assert json.loads(out.with_suffix(".json").read_text())["backbone"] == "vit_nano"
    assert (tmp_path / "run" / "checkpoint_last.pt").is_file()
    net, spec = esvit.load_backbone(out)
    assert spec.name == "vit_nano" and net(torch.zeros(1, 3, 32, 32)).shape == (1, 64)


def test_pretrain_any_module(images: Path, tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    before = net[2].weight.detach().clone()
    out = esvit.pretrain(images, model=net, out=tmp_path / "run", config="debug_cpu", **SMALL)
    assert out.is_file()
    assert not torch.equal(net[2].weight.detach(), before)  # the module itself was trained
