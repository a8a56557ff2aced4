"""The shipped ImageNet recipes hold the official EsViT hyper-parameters.

The official values are written out here from microsoft/esvit: the README's training commands
(``main_esvit.py --arch swin_tiny --batch_size_per_gpu 32`` on 16 GPUs ``--epochs 300
--teacher_temp 0.07 --warmup_epochs 10 --warmup_teacher_temp_epochs 30 --norm_last_layer false
--use_dense_prediction True``; checkpoints ``swin_small/bl_lr0.0005_gpu16_bs32``,
``swin_base/bl_lr0.0005_gpu16_bs32``), ``main_esvit.py``'s argument defaults (out_dim 65536,
momentum_teacher 0.996, warmup_teacher_temp 0.04, use_bn_in_head False, weight_decay 0.04 ->
0.4, clip_grad 3.0 per tensor (``utils.clip_gradients``), freeze_last_layer 1, lr 5e-4, min_lr
1e-6, global crops 2x224 scale (0.4, 1), local crops 8x96 scale (0.05, 0.4), ViT students with
``drop_path_rate=0.1``) and ``experiments/imagenet/swin/swin_{tiny,small,base}_patch4_window7_224.yaml``
(window 7, DROP_PATH_RATE 0.1 / 0.2 / 0.2, embed 96 / 96 / 128, depths 2-2-6-2 / 2-2-18-2 / 2-2-18-2).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from esvit.backbones import build_backbone
from esvit.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Shared by every official command / main_esvit.py default.
OFFICIAL_COMMON = {
    "model.out_dim": 65536,
    "model.hidden_dim": 2048,
    "model.bottleneck_dim": 256,
    "model.use_bn_in_head": False,
    "model.use_bn_in_region_head": False,
    "model.norm_last_layer": False,
    "model.region_loss": True,
    "model.region_weight": 0.5,
    "model.region_warmup_epochs": 0.0,
    "augment.global_size": 224,
    "augment.local_size": 96,
    "augment.n_local": 8,
    "augment.global_scale": (0.4, 1.0),
    "augment.local_scale": (0.05, 0.4),
    "augment.blur_p": (1.0, 0.1, 0.5),
    "augment.blur_sigma": (0.1, 2.0),
    "augment.solarize_p": 0.2,
    "optim.epochs": 300,
    "optim.batch_size": 512,  # 16 GPUs x 32
    "optim.lr": 5e-4,  # per 256 images, scaled linearly with the batch as in main_esvit.py
    "optim.min_lr": 1e-6,
    "optim.warmup_epochs": 10,
    "optim.weight_decay": 0.04,
    "optim.weight_decay_end": 0.4,
    "optim.clip_grad": 3.0,
    "optim.clip_mode": "per_param",
    "optim.freeze_last_layer_epochs": 1,
    "teacher.momentum": 0.996,
    "teacher.momentum_end": 1.0,
    "teacher.warmup_temp": 0.04,
    "teacher.temp": 0.07,
    "teacher.warmup_temp_epochs": 30,
    "teacher.student_temp": 0.1,
    "teacher.center_momentum": 0.9,
}

# recipe -> (backbone, student drop-path, embed dim of the pooled feature, number of blocks)
OFFICIAL_MODELS = {
    "esvit_swin_tiny_imagenet.yaml": ("swin_t", 0.1, 768, 12),
    "esvit_swin_small_imagenet.yaml": ("swin_s", 0.2, 768, 24),
    "esvit_swin_base_imagenet.yaml": ("swin_b", 0.2, 1024, 24),
    "esvit_vit_small_imagenet.yaml": ("vit_small", 0.1, 384, 12),
}


def _get(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return tuple(cfg) if isinstance(cfg, list) else cfg


def test_every_imagenet_recipe_is_held_here() -> None:
    assert {p.name for p in CONFIGS.glob("esvit_*_imagenet.yaml")} == set(OFFICIAL_MODELS)


@pytest.mark.parametrize("recipe", sorted(OFFICIAL_MODELS))
def test_recipe_holds_the_official_hyper_parameters(recipe: str) -> None:
    cfg = load_config(CONFIGS / recipe)
    wrong = {k: (_get(cfg, k), v) for k, v in OFFICIAL_COMMON.items() if _get(cfg, k) != pytest.approx(v)}
    assert not wrong, f"{recipe}: (recipe, official) {wrong}"
    backbone, dpr, _, _ = OFFICIAL_MODELS[recipe]
    assert cfg.model.backbone == backbone
    assert cfg.model.drop_path_rate == pytest.approx(dpr)
    assert cfg.model.sync_bn == "auto"
    # not an official value: whole photos letterboxed at 512, so 500x375 photos are cropped at
    # their own resolution (the official pipeline crops the decoded original)
    assert cfg.data.resize_mode == "letterbox" and cfg.data.canvas_size >= 500


@pytest.mark.parametrize("recipe", sorted(OFFICIAL_MODELS))
def test_recipe_backbone_has_the_official_architecture(recipe: str) -> None:
    """Window 7 and the official depths / widths (Swin), patch 16 / dim 384 / depth 12 (ViT-S)."""
    cfg = load_config(CONFIGS / recipe)
    backbone, dpr, dim, blocks = OFFICIAL_MODELS[recipe]
    net, spec = build_backbone(backbone, **cfg.model.backbone_kwargs, drop_path_rate=cfg.model.drop_path_rate)
    assert spec.embed_dim == dim
    if backbone.startswith("swin"):
        swin_blocks = [m for m in net.modules() if type(m).__name__ == "SwinTransformerBlock"]
        assert len(swin_blocks) == blocks
        assert all(list(b.attn.window_size) == [7, 7] for b in swin_blocks)
        assert swin_blocks[-1].stochastic_depth.p == pytest.approx(dpr)
    else:
        assert net.patch_size == 16 and len(net.encoder.layers) == blocks
