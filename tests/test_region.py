"""The region branch: its collapse metrics and warnings, and its options (weight, warm-up,
out_dim, BatchNorm)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from esvit.config import ConfigError, load_config
from esvit.heads import DINOHead
from esvit.losses import match_regions, match_share
from esvit.metrics import token_similarity
from esvit.schedules import Schedules
from esvit.train.collapse import CollapseMonitor
from esvit.trainer import EsViTTrainer

SMALL = dict(global_size=32, local_size=16, n_local=2, out_dim=64, hidden_dim=32, bottleneck_dim=16, seed=0)


def make(**kw) -> EsViTTrainer:
    return EsViTTrainer.from_backbone("vit_nano", {"patch_size": 8}, **{**SMALL, **kw})


def images(b: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


# ------------------------------------------------------------------ metrics


def test_match_share_by_hand() -> None:
    matches = torch.tensor([[0, 1, 2, 3], [2, 2, 2, 1], [3, 3, 3, 3]])
    assert match_share(matches, 4).tolist() == [0.25, 0.75, 1.0]


def test_match_share_of_identical_and_hub_features() -> None:
    f = torch.nn.functional.one_hot(torch.arange(9), 9).float().unsqueeze(0)  # 9 distinct tokens
    assert match_share(match_regions(f, f), 9).item() == pytest.approx(1 / 9)
    s = torch.cat([f, torch.zeros_like(f)], dim=-1)
    hub = torch.cat([torch.zeros_like(f), f], dim=-1)  # teacher tokens orthogonal to every student token ...
    hub[0, 4, :9] = 1.0  # ... but token 4, the most similar one for all of them
    assert match_share(match_regions(s, hub), 9).item() == pytest.approx(1.0)


def test_token_similarity_extremes() -> None:
    same = torch.randn(1, 1, 16).expand(4, 9, 16)
    assert token_similarity(same).item() == pytest.approx(1.0, abs=1e-5)
    orth = torch.eye(36).reshape(4, 9, 36)
    assert token_similarity(orth).item() == pytest.approx(1 / 36, abs=1e-6)


def test_trainer_logs_region_collapse_metrics() -> None:
    out = make()(images(), 0.04)
    log_k = math.log(64)
    assert 0 <= out["region_teacher_entropy"] <= log_k + 1e-4
    assert 0 <= out["region_teacher_kl_uniform"] <= log_k + 1e-4
    assert 1 / 16 <= out["region_match_share"] <= 1  # 4x4 grid
    assert 0 <= out["token_similarity"] <= 1 + 1e-5
    dino = EsViTTrainer.from_backbone("vit_nano", {"patch_size": 8}, region_loss=False, **SMALL)(images(), 0.04)
    assert "region_match_share" not in dino and "token_similarity" in dino


def test_no_match_share_on_tiny_grids() -> None:
    out = EsViTTrainer.from_backbone("vit_nano", {"patch_size": 16}, **SMALL)(images(), 0.04)  # 2x2 grid
    assert "region_match_share" not in out and "region_teacher_entropy" in out


# ------------------------------------------------------------------ warnings


def healthy(**kw: float) -> dict[str, float]:
    return {"teacher_entropy": 3.0, "teacher_kl_uniform": 1.0, "region_teacher_entropy": 3.0,
            "region_teacher_kl_uniform": 1.0, "region_match_share": 0.2, "token_similarity": 0.3,
            "view_loss": 5.0, "region_loss": 4.0, **kw}


@pytest.mark.parametrize(("metrics", "signal"), [
    (healthy(teacher_entropy=0.01), "view_one_dim"),
    (healthy(teacher_entropy=math.log(256) - 1e-3, teacher_kl_uniform=1e-4), "view_uniform"),
    (healthy(region_teacher_entropy=0.01), "region_one_dim"),
    (healthy(region_teacher_entropy=math.log(256) - 1e-3, region_teacher_kl_uniform=1e-4), "region_uniform"),
    (healthy(region_match_share=0.7), "region_match"),
    (healthy(token_similarity=0.95), "token_collapse"),
    (healthy(region_loss=0.6), "region_trivial"),
])
def test_each_signal_fires_alone(metrics: dict[str, float], signal: str, caplog: pytest.LogCaptureFixture) -> None:
    assert CollapseMonitor(256).signals(healthy()) == {}
    mon = CollapseMonitor(256, grace_steps=0)
    with caplog.at_level(logging.WARNING, logger="esvit.train"):
        assert mon.update(metrics, 0) == [signal]
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith("step 0: ")


def test_monitor_smooths_waits_and_repeats_rarely() -> None:
    mon = CollapseMonitor(256, grace_steps=10, repeat_every=100, smoothing=0.2)
    assert mon.update(healthy(region_match_share=0.9), 0) == []  # in the grace period
    for step in range(1, 10):
        mon.update(healthy(), step)
    assert mon.update(healthy(region_match_share=0.9), 10) == []  # one spike is smoothed away
    fired = [step for step in range(11, 400) if mon.update(healthy(region_match_share=0.95), step)]
    assert fired[0] < 20 and [b - a for a, b in zip(fired, fired[1:], strict=False)] == [100] * (len(fired) - 1)


def test_region_loss_ratio_is_relative_to_each_heads_size() -> None:
    # a 4-way region head's loss of 1.0 (log 4 = 1.39) is nearer uniform than 4.3 of a 256-way view head
    # (log 256 = 5.55), although it is a quarter of it
    assert "region_trivial" not in CollapseMonitor(256, region_out_dim=4).signals(healthy(view_loss=4.3,
                                                                                         region_loss=1.0))
    assert "region_trivial" in CollapseMonitor(256).signals(healthy(view_loss=4.3, region_loss=2.0))


def test_region_entropy_is_judged_against_the_region_head_size() -> None:
    mon = CollapseMonitor(65536, region_out_dim=16)
    # log(16) = 2.77: 2.76 is uniform for the region head, healthy for a 65536-way view head
    assert mon.signals(healthy(region_teacher_entropy=2.76, region_teacher_kl_uniform=1e-3)) == {
        "region_uniform": 2.76}


def test_collapsing_run_warns_early(caplog: pytest.LogCaptureFixture) -> None:
    """Metrics of a real collapsing run (patch 4, BatchNorm in the region head, issue 11) fire
    within its first few hundred steps."""
    mon = CollapseMonitor(256)
    trace = [(0, 0.11), (120, 0.2), (190, 0.33), (260, 0.44), (300, 0.7), (360, 0.87), (420, 0.97), (440, 0.98)]
    fired = []
    with caplog.at_level(logging.WARNING, logger="esvit.train"):
        for step in range(500):
            sim = next(v for s, v in reversed(trace) if s <= step)
            if mon.update(healthy(token_similarity=sim), step):
                fired.append(step)
    assert fired and fired[0] < 500


# ------------------------------------------------------------------ options


def test_region_head_options() -> None:
    tr = make(use_bn_in_head=True, use_bn_in_region_head=False, region_out_dim=32)
    view, region = tr.student.view_head, tr.student.region_head
    assert isinstance(view, DINOHead) and isinstance(region, DINOHead)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in view.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in region.modules())
    assert view.out_dim == 64 and region.out_dim == 32 and tr.region_loss.center.center.shape == (1, 32)
    out = tr(images(), 0.04)
    assert torch.isfinite(out["loss"]) and out["region_teacher_entropy"] <= math.log(32) + 1e-4
    # default: no BatchNorm in the region head, whatever the view head has
    tr = make(use_bn_in_head=True)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in tr.student.region_head.modules())
    tr = make(use_bn_in_region_head=True)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in tr.student.region_head.modules())


@pytest.mark.parametrize("w", [0.0, 0.25, 0.5, 1.0])
def test_region_weight_mixes_the_losses(w: float) -> None:
    tr = make()
    out = tr(images(), 0.04, region_weight=w)
    assert out["loss"].item() == pytest.approx((1 - w) * out["view_loss"].item() + w * out["region_loss"].item(),
                                               rel=1e-5)
    with pytest.raises(ValueError, match="region_weight"):
        make(region_weight=1.5)


def test_region_weight_schedule() -> None:
    s = Schedules(steps_per_epoch=10, epochs=5, lr=1e-3, region_weight=0.4, region_warmup_epochs=2)
    assert [round(s.at(k).region_weight, 6) for k in (0, 5, 10, 20, 49)] == [0.0, 0.1, 0.2, 0.4, 0.4]
    assert Schedules(steps_per_epoch=10, epochs=5, lr=1e-3).at(0).region_weight == 0.5


@pytest.mark.parametrize(("override", "key"), [
    ("model.region_weight=1.5", "model.region_weight"),
    ("model.region_weight=0", "model.region_weight"),
    ("model.region_warmup_epochs=-1", "model.region_warmup_epochs"),
    ("model.region_out_dim=0", "model.region_out_dim"),
    ("model.use_bn_in_region_head=maybe", "model.use_bn_in_region_head"),
])
def test_region_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/debug_cpu.yaml", [override])
    assert load_config("configs/debug_cpu.yaml", ["model.region_weight=0", "model.region_loss=false"])


# ------------------------------------------------------------------ geometry of matching


def test_token_correspondence_by_hand() -> None:
    from esvit.augment.geometry import token_correspondence

    box = torch.tensor([[0, 0, 32, 32]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    idx, inside = token_correspondence(box, no, 2, box, no, 2)
    assert idx.tolist() == [[0, 1, 2, 3]] and inside.all()
    idx, _ = token_correspondence(box, no, 2, box, yes, 2)  # the other view is the mirror image
    assert idx.tolist() == [[1, 0, 3, 2]]
    # view t is the right half of the image, at a 2x2 grid: tokens of s in the left half fall outside
    idx, inside = token_correspondence(box, no, 4, torch.tensor([[0, 16, 32, 16]]), no, 2)
    assert inside.view(4, 4)[:, :2].logical_not().all() and inside.view(4, 4)[:, 2:].all()
    # s-token (0, 2) (x = 20 px, y = 4 px) lies at x = 4 / 16 of t's width: t-token (0, 0)
    assert idx.view(4, 4)[0, 2].item() == 0 and idx.view(4, 4)[3, 3].item() == 3


def test_match_accuracy_with_the_builtin_augmentation_only() -> None:
    out = make()(images(), 0.04)
    assert 0.0 <= out["region_match_accuracy"] <= 1.0
    tr = make()
    aug = tr.augment
    tr.augment = torch.nn.Module()
    tr.augment.forward = lambda x: aug(x)  # a custom augmentation: no crop geometry known
    assert "region_match_accuracy" not in tr(images(), 0.04) and "region_match_share" in tr(images(), 0.04)


def test_augmentation_returns_the_parameters_it_applied() -> None:
    from esvit.augment import MultiCropAugmentation

    x = images(6)
    a, b = MultiCropAugmentation(32, 16, 2, seed=3), MultiCropAugmentation(32, 16, 2, seed=3)
    views, params = a.forward_with_params(x, shard=(1, 2))
    assert all(torch.equal(u, v) for u, v in zip(views, b(x, shard=(1, 2)), strict=True))
    assert all(torch.equal(u, v) for u, v in zip(views, a.apply_params(x, params), strict=True))
    assert len(params) == 4 and params[0].boxes.shape == (6, 4)


def test_shipped_recipes_follow_the_measurements() -> None:
    """CIFAR recipes are plain DINO (docs/region.md); the official recipe keeps the official
    region task (0.5 weight, no BatchNorm, no warm-up)."""
    for name in ("cifar10_vit_nano", "cifar10_vit_tiny", "cifar10_resnet18"):
        cfg = load_config(f"configs/{name}.yaml")
        assert not cfg.model.region_loss and not cfg.model.use_bn_in_region_head, name
    official = load_config("configs/esvit_swin_tiny_imagenet.yaml").model
    assert official.region_loss and official.region_weight == 0.5 and official.region_warmup_epochs == 0
    assert not official.use_bn_in_head and not official.use_bn_in_region_head and official.region_out_dim is None
