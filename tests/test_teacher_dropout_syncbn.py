"""The deterministic teacher, the student's drop-path (``model.drop_path_rate``) and SyncBatchNorm
(``model.sync_bn``): issue 12, items 1-3."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.ops import StochasticDepth

from esvit.backbones import BackboneSpec, list_backbones, register_backbone, supports_drop_path
from esvit.backbones import registry as registry_mod
from esvit.config import ConfigError, load_config
from esvit.train.distributed import (
    CPUSyncBatchNorm,
    DistInfo,
    convert_sync_batchnorm,
    is_sync_batchnorm,
    resolve_sync_bn,
    sync_batchnorm_if_needed,
)
from esvit.train.logger import read_metrics
from esvit.train.loop import build_trainer
from esvit.trainer import EsViTTrainer

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.yaml"
SMALL = dict(global_size=32, local_size=16, n_local=1, out_dim=64, hidden_dim=32, bottleneck_dim=16, seed=0)

# Every registered backbone with stochastic depth, at a cheap size; the big torchvision ones are slow-only.
DROP_PATH_CASES: dict[str, dict] = {
    "swin_nano": {},
    "swin_tiny_cifar": {},
    "swin_t": {},
    "swin_s": {},
    "swin_b": {},
    "vit_nano": {},
    "vit_tiny": {"depth": 2},
    "vit_small_cifar": {"depth": 2},
    "vit_b_16": {"image_size": 32},
    "vit_small": {"image_size": 32},
}
BIG = {"swin_t", "swin_s", "swin_b", "vit_b_16", "vit_small"}


def crops(b: int = 4, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g)]


def teacher_outputs(tr: EsViTTrainer, x: list[Tensor]) -> list[Tensor]:
    with torch.no_grad():
        out = tr.teacher(x)
    return [out["view_stack"], *out["region_feat"], *([out["region_flat"]] if out["region_flat"] is not None else [])]


def assert_teacher_deterministic(tr: EsViTTrainer, x: list[Tensor]) -> None:
    a, b = teacher_outputs(tr, x), teacher_outputs(tr, x)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)), "two teacher passes differ"


def student_differs(tr: EsViTTrainer, x: list[Tensor]) -> bool:
    with torch.no_grad():
        return not torch.allclose(tr.student(x)["view_stack"], tr.student(x)["view_stack"])


# ---------------------------------------------------------------------------- 1. deterministic teacher


def test_cases_cover_every_backbone_with_drop_path() -> None:
    builtin = {n for n in list_backbones() if not n.startswith("_")}
    assert set(DROP_PATH_CASES) == {n for n in builtin if supports_drop_path(n)}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in sorted(DROP_PATH_CASES)]
)
def test_teacher_is_deterministic_in_train_mode_and_after_resume(name: str) -> None:
    torch.manual_seed(0)
    tr = EsViTTrainer.from_backbone(name, DROP_PATH_CASES[name], drop_path_rate=0.5, **SMALL).train()
    x = crops()
    assert student_differs(tr, x)  # the student's drop-path is on: the check below can fail
    assert all(m.p == 0 for m in tr.teacher.modules() if isinstance(m, StochasticDepth))
    assert_teacher_deterministic(tr, x)
    tr.eval()
    tr.train()  # any later .train() (the loop calls it after resume, the kNN monitor around eval)
    assert tr.teacher.training and student_differs(tr, x)
    assert_teacher_deterministic(tr, x)
    # resume: a fresh trainer loading the state dict
    fresh = EsViTTrainer.from_backbone(name, DROP_PATH_CASES[name], drop_path_rate=0.5, **SMALL)
    fresh.load_state_dict(tr.state_dict())
    fresh.train()
    assert_teacher_deterministic(fresh, x)
    for u, v in zip(teacher_outputs(fresh, x), teacher_outputs(tr, x), strict=True):
        assert torch.equal(u, v)


class _Noise(nn.Module):
    """A user module that draws randomness while training (not a known dropout type)."""

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.randn_like(x) if self.training else x


def _noisy_cnn(width: int = 8) -> tuple[nn.Module, BackboneSpec]:
    net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.5),
                        _Noise(), nn.Conv2d(width, width, 3, stride=2, padding=1))
    return net, BackboneSpec("_test_noisy_cnn", "5", "bchw", 0, "avg", width, None)


def test_user_backbone_teacher_is_deterministic_and_keeps_batch_statistics() -> None:
    register_backbone("_test_noisy_cnn")(_noisy_cnn)
    try:
        assert not supports_drop_path("_test_noisy_cnn")
        with pytest.raises(ValueError, match=r"drop_path_rate=0.1 .*'_test_noisy_cnn' has no stochastic depth"):
            EsViTTrainer.from_backbone("_test_noisy_cnn", drop_path_rate=0.1, **SMALL)
        torch.manual_seed(0)
        tr = EsViTTrainer.from_backbone("_test_noisy_cnn", drop_path_rate=0.0, use_bn_in_head=True, **SMALL).train()
    finally:
        registry_mod._REGISTRY.pop("_test_noisy_cnn", None)
    x = crops()
    assert student_differs(tr, x)
    assert_teacher_deterministic(tr, x)
    bns = [m for m in tr.teacher.modules() if isinstance(m, _BatchNorm)]
    assert len(bns) == 3 and all(m.training for m in bns)  # backbone 1 + view head 2
    # train mode: batch statistics, and the running statistics move (as in the official teacher)
    before = bns[0].running_mean.clone()
    train_out = teacher_outputs(tr, x)[0]
    assert not torch.equal(bns[0].running_mean, before)
    tr.eval()
    assert not any(m.training for m in tr.teacher.modules())
    assert not torch.allclose(teacher_outputs(tr, x)[0], train_out, atol=1e-3)


# ---------------------------------------------------------------------------- 2. model.drop_path_rate


def test_drop_path_rate_config_key() -> None:
    assert load_config(DEBUG).model.drop_path_rate is None  # default: the backbone's own
    assert load_config(DEBUG, ["model.drop_path_rate=0.1"]).model.drop_path_rate == 0.1
    assert load_config(DEBUG, ["model.backbone=resnet18", "model.drop_path_rate=0"]).model.drop_path_rate == 0.0
    cases = [
        (["model.drop_path_rate=1.0"], r"^model\.drop_path_rate: must be in \[0, 1\)"),
        (["model.drop_path_rate=-0.1"], r"^model\.drop_path_rate: must be in \[0, 1\)"),
        (["model.drop_path_rate=abc"], r"^model\.drop_path_rate: expected"),
        (["model.backbone=resnet18", "model.drop_path_rate=0.1"],
         r"^model\.drop_path_rate: backbone 'resnet18' has no stochastic depth"),
        (["model.backbone=cifar_resnet18", "model.drop_path_rate=0.2"],
         r"^model\.drop_path_rate: backbone 'cifar_resnet18' has no stochastic depth"),
        (["model.drop_path_rate=0.1", "model.backbone_kwargs.drop_path_rate=0.1"],
         r"^model\.drop_path_rate: also set as model\.backbone_kwargs\.drop_path_rate"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            load_config(None, overrides)
        assert "\n" not in str(err.value)


def test_recipes_pass_the_rate_to_the_student(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}

    def fake(name: str, kwargs: dict, **kw: object) -> None:
        seen.update(name=name, kwargs=kwargs, **kw)

    monkeypatch.setattr(EsViTTrainer, "from_backbone", staticmethod(fake))
    swin = load_config(ROOT / "configs" / "esvit_swin_tiny_imagenet.yaml")
    assert swin.model.drop_path_rate == 0.1 and swin.model.sync_bn == "auto"  # the official values
    build_trainer(swin, seed=0)
    assert seen["name"] == "swin_t" and seen["drop_path_rate"] == 0.1
    build_trainer(load_config(DEBUG, ["model.drop_path_rate=0.05"]), seed=0)
    assert seen["name"] == "vit_nano" and seen["drop_path_rate"] == 0.05
    # a shipped recipe never asks a backbone for drop-path it lacks
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith("distill"):
            continue
        m = load_config(path).model
        assert m.drop_path_rate is None or m.drop_path_rate == 0 or supports_drop_path(m.backbone), path.name


def test_teacher_has_no_drop_path_whatever_the_student() -> None:
    torch.manual_seed(0)
    tr = EsViTTrainer.from_backbone("swin_nano", drop_path_rate=0.3, **SMALL)
    rates = [m.p for m in tr.student.modules() if isinstance(m, StochasticDepth)]
    assert max(rates) == pytest.approx(0.3)
    assert [m.p for m in tr.teacher.modules() if isinstance(m, StochasticDepth)] == [0.0] * len(rates)
    assert all(torch.equal(a, b) for a, b in zip(tr.student.state_dict().values(),
                                                  tr.teacher.state_dict().values(), strict=True))


# ---------------------------------------------------------------------------- 3. SyncBatchNorm


def test_sync_bn_config_key() -> None:
    assert load_config(DEBUG).model.sync_bn == "auto"
    assert load_config(DEBUG, ["model.sync_bn=true"]).model.sync_bn is True
    assert load_config(DEBUG, ["model.sync_bn=false"]).model.sync_bn is False
    with pytest.raises(ConfigError, match=r"debug_cpu.yaml: model\.sync_bn: must be auto, true or false, got 'always'$"):
        load_config(DEBUG, ["model.sync_bn=always"])


def test_resolve_sync_bn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="esvit.train"):
        assert resolve_sync_bn("auto", True, 2) and resolve_sync_bn(True, True, 4)
        assert not resolve_sync_bn("auto", True, 1) and not resolve_sync_bn("auto", False, 8)
        assert not resolve_sync_bn(False, True, 8)
        assert not caplog.records
        assert not resolve_sync_bn(True, True, 1)  # one process on CPU: a logged no-op, never silence
        assert not resolve_sync_bn(True, False, 2)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("\n" not in m for m in msgs)
    assert "model.sync_bn=true has no effect: a single process" in msgs[0]
    assert "no BatchNorm layer" in msgs[1]
    with pytest.raises(ValueError, match="model.sync_bn"):
        resolve_sync_bn("yes", True, 2)


def test_sync_bn_true_single_process_trainer_is_a_logged_no_op(caplog: pytest.LogCaptureFixture) -> None:
    tr = EsViTTrainer.from_backbone("vit_nano", use_bn_in_head=True, **SMALL)
    assert tr.has_batchnorm()
    with caplog.at_level(logging.WARNING, logger="esvit.train"):
        assert not sync_batchnorm_if_needed(tr, True, DistInfo())
    assert "single process" in caplog.text
    assert not any(is_sync_batchnorm(m) for m in tr.modules())


def test_cpu_sync_batchnorm_is_batchnorm_without_a_process_group() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    conv = convert_sync_batchnorm(copy.deepcopy(ref))
    assert isinstance(conv[1], CPUSyncBatchNorm) and set(conv.state_dict()) == set(ref.state_dict())
    x = torch.randn(7, 5)
    torch.testing.assert_close(conv(x), ref(x))
    torch.testing.assert_close(conv[1].running_var, ref[1].running_var)


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5),
                         nn.BatchNorm1d(5, momentum=None))


def _bn_buffers(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


class _TinyCNN(nn.Module):
    """BatchNorm, dropout and a user noise module: the teacher must still be deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Dropout(0.5), _Noise(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(8))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _sync_worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        out: dict = {}
        # (a) a converted module under DDP computes what one process computes on the whole batch
        torch.manual_seed(0)
        net = convert_sync_batchnorm(_bn_net())
        x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1)).chunk(world)[rank]
        ddp = DDP(net)
        for _ in range(2):  # two steps: running statistics, cumulative averaging (momentum None)
            y = ddp(x)
            net.zero_grad()
            y.pow(2).mean().backward()
        out["y"], out["grads"], out["buffers"] = y.detach(), [p.grad for p in net.parameters()], _bn_buffers(net)
        # (b) the trainer as the loop sets it up, each rank fed different images
        for mode in ("auto", False):
            torch.manual_seed(0)
            tr = EsViTTrainer(_TinyCNN(), "body", "bchw", use_bn_in_head=True, use_bn_in_region_head=True, **SMALL)
            out[f"converted_{mode}"] = sync_batchnorm_if_needed(tr, mode, DistInfo(rank, world))
            tr.set_student_forward(DDP(tr.student))
            tr.train()
            opt = torch.optim.SGD(tr.student.parameters(), lr=0.1)
            images = torch.randint(0, 256, (4, 3, 36, 36), generator=torch.Generator().manual_seed(10 + rank),
                                   dtype=torch.uint8)
            tr(images, 0.04)["loss"].backward()
            opt.step()
            tr.update_teacher(0.9)
            with torch.no_grad():
                out[f"student_random_{mode}"] = not torch.equal(tr.student(crops())["view_stack"],
                                                                 tr.student(crops())["view_stack"])
            out[f"deterministic_{mode}"] = all(
                torch.equal(a, b) for a, b in zip(teacher_outputs(tr, crops()), teacher_outputs(tr, crops()), strict=True)
            )
            out[f"stats_{mode}"] = {"student": _bn_buffers(tr.student), "teacher": _bn_buffers(tr.teacher)}
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_two_gloo_ranks(tmp_path: Path) -> None:
    """2 CPU ranks fed different data: BatchNorm uses the statistics of both ranks' samples, and
    the running statistics of student and teacher agree across ranks."""
    mp.spawn(_sync_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))

    # (a) against one process on the union batch: forward rows, DDP-averaged gradients, running stats
    torch.manual_seed(0)
    ref = _bn_net()
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        y = ref(x)
        ref.zero_grad()
        y.pow(2).mean().backward()
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), atol=1e-5, rtol=1e-5)
    for g0, g1, g in zip(r0["grads"], r1["grads"], [p.grad for p in ref.parameters()], strict=True):
        torch.testing.assert_close(g0, g, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g1, g, atol=1e-5, rtol=1e-4)
    for k, v in _bn_buffers(ref).items():
        torch.testing.assert_close(r0["buffers"][k], v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r1["buffers"][k], v, atol=1e-5, rtol=1e-5)

    # (b) trainer: synchronised (auto, 2 ranks, BatchNorm present) vs not (the control)
    assert r0["converted_auto"] and not r0["converted_False"]
    assert r0["deterministic_auto"] and r1["deterministic_auto"] and r0["deterministic_False"]
    assert r0["student_random_auto"]  # the student's dropout is on: the teacher check can fail
    for branch in ("student", "teacher"):
        s0, s1 = r0["stats_auto"][branch], r1["stats_auto"][branch]
        assert len(s0) == 3 * 6  # BatchNorms: 2 in the backbone, 2 in each head; 3 buffers each
        for k in s0:
            torch.testing.assert_close(s0[k], s1[k], atol=1e-6, rtol=1e-6, msg=f"{branch} {k} differs across ranks")
        u0, u1 = r0["stats_False"][branch], r1["stats_False"][branch]
        assert any(not torch.allclose(u0[k], u1[k]) for k in u0 if "running_mean" in k)


def _torchrun(nproc: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train_ssl.py"), "--config", str(DEBUG), "data.synthetic_images=64", "optim.batch_size=16",
           "model.out_dim=256", "logging.progress=false", f"logging.output_dir={out}", "model.use_bn_in_head=true",
           *extra, "--max-steps", "1"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_sync_bn_two_ranks_match_one_process(tmp_path: Path) -> None:
    """With BatchNorm in the view head, 2 gloo ranks x 8 images give the 1 x 16 first-step loss only
    when the BatchNorm statistics are synchronised (the loop's default, sync_bn auto)."""
    runs = {"one": _torchrun(1, tmp_path / "one"), "two": _torchrun(2, tmp_path / "two"),
            "off": _torchrun(2, tmp_path / "off", "model.sync_bn=false")}
    for name, run in runs.items():
        assert run.returncode == 0, (name, run.stderr[-3000:])
    loss = {name: read_metrics(tmp_path / name / "metrics.jsonl")[0]["loss"] for name in runs}
    assert "BatchNorm layers of the student (and the teacher's) synchronised over 2 ranks" in runs["two"].stderr
    assert abs(loss["one"] - loss["two"]) < 1e-4, loss
    assert abs(loss["one"] - loss["off"]) > 1e-3, loss  # the control: unsynchronised statistics differ
