"""EsViTTrainer: teacher/student wiring, EMA, crops, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from esvit.trainer import EsViTTrainer

SMALL = dict(global_size=32, local_size=16, out_dim=128, hidden_dim=32, bottleneck_dim=16, seed=0)


def make(n_local: int = 2, backbone: str = "vit_tiny", **kw) -> EsViTTrainer:
    bkw = {"depth": 2, "image_size": 32} if backbone == "vit_tiny" else {}
    return EsViTTrainer.from_backbone(backbone, bkw, n_local=n_local, **{**SMALL, **kw})


def images(b: int = 4, size: int = 36, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_teacher_starts_as_copy_and_gets_no_gradients() -> None:
    tr = make()
    for (n, s), t in zip(tr.student.state_dict().items(), tr.teacher.state_dict().values(), strict=True):
        assert torch.equal(s, t), n
    out = tr(images(), 0.04)
    out["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in tr.teacher.parameters())
    trainable = [p for p in tr.student.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_update_teacher_is_ema() -> None:
    tr = make()
    with torch.no_grad():
        for p in tr.student.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in tr.teacher.parameters()]
    s = [p.clone() for p in tr.student.parameters()]
    tr.update_teacher(0.75)
    for a, b, t in zip(t0, s, tr.teacher.parameters(), strict=True):
        assert torch.allclose(t, 0.75 * a + 0.25 * b, atol=1e-6)
    tr.update_teacher(0.0)
    assert all(torch.equal(a, b) for a, b in zip(tr.teacher.parameters(), tr.student.parameters(), strict=True))
    with pytest.raises(ValueError, match="momentum"):
        tr.update_teacher(1.5)


@pytest.mark.parametrize("n_local", [0, 1, 3])
def test_student_sees_all_crops_teacher_sees_globals(n_local: int, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = make(n_local)
    seen = {}
    orig = tr.view_loss.forward

    def spy(s, t, temp):
        seen["s"], seen["t"] = [x.shape for x in s], [x.shape for x in t]
        return orig(s, t, temp)

    monkeypatch.setattr(tr.view_loss, "forward", spy)
    out = tr(images(), 0.04)
    assert len(seen["s"]) == 2 + n_local and len(seen["t"]) == 2
    assert torch.isfinite(out["loss"])


def test_one_backbone_call_per_resolution() -> None:
    tr = make(n_local=3)
    calls: list[tuple[int, ...]] = []
    for m in (tr.student.backbone.net, tr.teacher.backbone.net):
        m.register_forward_pre_hook(lambda _m, inp: calls.append(tuple(inp[0].shape)))
    tr(images(b=4), 0.04)
    # teacher: one call with both globals; student: globals (2x4) and locals (3x4)
    assert sorted(calls) == sorted([(8, 3, 32, 32), (8, 3, 32, 32), (12, 3, 16, 16)])


def test_outputs_and_collapse_metrics() -> None:
    out = make()(images(), 0.04)
    for k in ("loss", "view_loss", "region_loss", "teacher_entropy", "teacher_kl_uniform", "student_entropy"):
        assert k in out and torch.isfinite(out[k]), k
    assert 0 <= out["teacher_entropy"] <= torch.log(torch.tensor(128.0)) + 1e-4
    assert torch.allclose(out["loss"], 0.5 * out["view_loss"] + 0.5 * out["region_loss"])


def test_centers_update_only_in_train_mode() -> None:
    tr = make()
    tr.eval()
    tr(images(), 0.04)
    assert torch.count_nonzero(tr.view_loss.center.center) == 0
    tr.train()
    tr(images(), 0.04)
    assert torch.count_nonzero(tr.view_loss.center.center) > 0
    assert torch.count_nonzero(tr.region_loss.center.center) > 0
    assert not torch.equal(tr.view_loss.center.center, tr.region_loss.center.center)


def test_same_seed_same_loss_and_rng_resume() -> None:
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    x = images()
    assert torch.equal(a(x, 0.04)["loss"], b(x, 0.04)["loss"])
    weights, rng = copy.deepcopy(a.state_dict()), a.extra_state()
    l1 = a(x, 0.04)["loss"]
    l_next = a(x, 0.04)["loss"]
    a.load_state_dict(weights)
    a.load_extra_state(rng)
    assert torch.equal(a(x, 0.04)["loss"], l1)  # same augmentation draws and centres
    assert not torch.equal(l1, l_next)


def test_plain_dino_without_region_head() -> None:
    tr = make(region_loss=False)
    assert tr.student.region_head is None and tr.region_loss is None
    out = tr(images(), 0.04)
    assert out["region_loss"] == 0 and torch.equal(out["loss"], out["view_loss"])


def test_cnn_and_swin_backbones() -> None:
    for name in ("cifar_resnet18", "swin_tiny_cifar"):
        out = make(1, name)(images(b=2), 0.05)
        assert torch.isfinite(out["loss"]), name


def test_param_groups_and_last_layer_freeze() -> None:
    tr = make()
    decay, no_decay = tr.param_groups()
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    tr(images(), 0.04)["loss"].backward()
    last = list(tr.last_layer_parameters())
    assert last and any(p.grad is not None for p in last)
    from esvit.train.optim import clip_gradients

    clip_gradients(tr.student.parameters(), 3.0, "per_param", frozen=tr.last_layer_parameters())
    assert all(p.grad is None for p in last)


@pytest.mark.parametrize(
    ("x", "err", "msg"),
    [
        (torch.rand(2, 3, 32, 32), TypeError, "uint8"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), ValueError, r"\(b, 3, H, W\)"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), ValueError, r"\(b, 3, H, W\)"),
        ([1, 2], TypeError, "uint8 tensor"),
    ],
)
def test_bad_input_errors(x, err, msg) -> None:
    with pytest.raises(err, match=msg):
        make()(x, 0.04)


def test_tiny_images_are_rejected_with_a_clear_error() -> None:
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)(small|at least|>=)"):
        make()(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), 0.04)


def test_local_larger_than_global_is_rejected() -> None:
    with pytest.raises(ValueError, match="local_size"):
        make(local_size=64)


def test_ddp_student_single_process(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        tr = make()
        ref = copy.deepcopy(tr)
        tr.set_student_forward(DDP(tr.student))
        assert set(tr.state_dict()) == set(ref.state_dict())  # DDP is not registered
        x = images()
        la, lb = tr(x, 0.04)["loss"], ref(x, 0.04)["loss"]
        assert torch.allclose(la, lb, atol=1e-6)
        la.backward()
        assert all(p.grad is not None for p in tr.student.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
