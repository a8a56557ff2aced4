"""Knowledge distillation: loss parity with the published formulas, DeiT token model, teachers,
end-to-end runs, resume exactness and config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from esvit.backbones import build_backbone
from esvit.config import ConfigError
from esvit.data import write_synthetic_image_folder
from esvit.distill import (
    ClassifierModel,
    DeiTDistillationLoss,
    DeiTVisionTransformer,
    DISTLoss,
    DKDLoss,
    KDLoss,
    build_student,
    deit_from_vit,
    deit_loss,
    dist_loss,
    dkd_loss,
    kd_loss,
    load_classifier,
    load_distill_config,
    plain_vit_from_deit,
    to_plain_vit_state_dict,
)
from esvit.distill.train import FrozenTeacher, TrainAugment, build_teacher, distill
from esvit.train import checkpoint as ckpt
from esvit.train.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "distill_debug_cpu.yaml"
D = torch.float64


def _logits(b: int = 5, c: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, c, generator=g, dtype=D) * 3).requires_grad_()
    t = torch.randn(b, c, generator=g, dtype=D) * 3
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _ce_ref(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = _softmax(z)
    return -torch.stack([torch.log(p[i, y[i]]) for i in range(len(y))]).mean()


def _kl_ref(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_j p_j log(p_j / q_j) per row, averaged over rows."""
    return (p * torch.log(p / q)).sum(dim=1).mean()


# ------------------------------------------------------------------------------------ loss parity


@pytest.mark.parametrize("alpha,T", [(0.5, 4.0), (0.1, 1.0), (0.9, 2.5)])
def test_kd_matches_hinton_formula(alpha: float, T: float) -> None:
    s, t, y = _logits()
    out = KDLoss(alpha, T)(s, t, y)
    ref = alpha * _ce_ref(s, y) + (1 - alpha) * T ** 2 * _kl_ref(_softmax(t / T), _softmax(s / T))
    assert torch.allclose(out["loss"], ref, atol=1e-10)
    assert torch.allclose(kd_loss(s, t, y, alpha, T)["loss"], ref, atol=1e-10)


@pytest.mark.parametrize("alpha,beta,T,ce_w", [(1.0, 8.0, 4.0, 1.0), (0.5, 2.0, 1.0, 0.0)])
def test_dkd_matches_decoupled_formula(alpha: float, beta: float, T: float, ce_w: float) -> None:
    s, t, y = _logits(b=6, c=5, seed=1)
    ps, pt = _softmax(s / T), _softmax(t / T)
    tckd, nckd = [], []
    for i in range(len(y)):
        bs = torch.stack([ps[i, y[i]], 1 - ps[i, y[i]]])
        bt = torch.stack([pt[i, y[i]], 1 - pt[i, y[i]]])
        tckd.append((bt * torch.log(bt / bs)).sum())
        keep = [j for j in range(s.shape[1]) if j != y[i]]
        qs, qt = _softmax(s[i:i + 1, keep] / T)[0], _softmax(t[i:i + 1, keep] / T)[0]
        nckd.append((qt * torch.log(qt / qs)).sum())
    ref_t = torch.stack(tckd).mean() * T ** 2
    ref_n = torch.stack(nckd).mean() * T ** 2
    ref = ce_w * _ce_ref(s, y) + alpha * ref_t + beta * ref_n
    out = DKDLoss(alpha, beta, T, ce_w)(s, t, y)
    assert torch.allclose(out["tckd"], ref_t, atol=1e-10) and torch.allclose(out["nckd"], ref_n, atol=1e-10)
    assert torch.allclose(out["loss"], ref, atol=1e-10)
    # warm-up factor scales only the distillation part
    half = dkd_loss(s, t, y, alpha, beta, T, ce_w, kd_scale=0.5)["loss"]
    assert torch.allclose(half, ce_w * _ce_ref(s, y) + 0.5 * (alpha * ref_t + beta * ref_n), atol=1e-10)


def test_dkd_is_finite_for_extreme_logits() -> None:
    s = torch.tensor([[80.0, -80.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[90.0, -90.0, 5.0], [1.0, 2.0, 3.0]])
    out = dkd_loss(s, t, torch.tensor([0, 2]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_pearson_formula(beta: float, gamma: float, tau: float) -> None:
    s, t, y = _logits(b=6, c=5, seed=2)
    ps, pt = _softmax(s / tau).detach().numpy(), _softmax(t / tau).numpy()
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(ps.shape[0])])
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(ps.shape[1])])
    ce = _ce_ref(s, y).item()
    out = DISTLoss(beta, gamma, tau, ce_weight=1.0)(s, t, y)
    # the official code adds eps=1e-8 to the product of norms: agreement to ~1e-7 relative
    assert out["inter"].item() == pytest.approx(inter, rel=1e-6)
    assert out["intra"].item() == pytest.approx(intra, rel=1e-6)
    assert out["loss"].item() == pytest.approx(ce + tau ** 2 * (beta * inter + gamma * intra), rel=1e-6)
    assert dist_loss(s, t, y, beta, gamma, tau)["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-12)


@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 3.0)])
def test_deit_soft_and_hard_match_formulas(alpha: float, tau: float) -> None:
    cls, t, y = _logits(seed=3)
    dist = (torch.randn(5, 7, dtype=D, generator=torch.Generator().manual_seed(9)) * 2).requires_grad_()
    soft = DeiTDistillationLoss("soft", alpha, tau)((cls, dist), t, y)
    ref_soft = (1 - alpha) * _ce_ref(cls, y) + alpha * tau ** 2 * _kl_ref(_softmax(t / tau), _softmax(dist / tau))
    assert torch.allclose(soft["loss"], ref_soft, atol=1e-10)
    hard = deit_loss(cls, dist, t, y, "hard")  # the paper's 0.5 / 0.5
    ref_hard = 0.5 * _ce_ref(cls, y) + 0.5 * _ce_ref(dist, t.argmax(1))
    assert torch.allclose(hard["loss"], ref_hard, atol=1e-10)


def test_losses_reject_bad_input() -> None:
    s, t, y = _logits()
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, t[:, :3], y)
    with pytest.raises(ValueError, match="kind must be one of"):
        DeiTDistillationLoss("medium")
    with pytest.raises(TypeError, match="student.deit=true"):
        DeiTDistillationLoss("hard")(s, t, y)


@pytest.mark.parametrize("name", ["kd", "dkd", "dist", "deit_soft", "deit_hard"])
def test_gradients_reach_only_the_student(name: str) -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 4), nn.Linear(6, 4)  # teacher deliberately NOT frozen
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    t_logits = teacher(x)
    s_logits = student(x)
    if name.startswith("deit"):
        loss = deit_loss(s_logits, s_logits * 0.5, t_logits, y, name[5:])["loss"]
    else:
        loss = {"kd": kd_loss, "dkd": dkd_loss, "dist": dist_loss}[name](s_logits, t_logits, y)["loss"]
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_frozen_teacher_stays_frozen() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3), nn.Dropout(0.5))
    teacher = FrozenTeacher(net, image_size=8, num_classes=3)
    teacher.train()
    assert not teacher.training and not net.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = teacher(x)  # resized to 8x8, dropout off -> deterministic
    assert out.shape == (2, 3) and not out.requires_grad and torch.equal(out, teacher(x))


# ------------------------------------------------------------------------------------ DeiT model


def _deit(num_classes: int = 5) -> DeiTVisionTransformer:
    torch.manual_seed(0)
    model = build_student("vit_nano", {"image_size": 32, "depth": 1}, num_classes, deit=True)
    assert isinstance(model, DeiTVisionTransformer)
    with torch.no_grad():  # torchvision zero-initialises the class head; make it non-trivial
        model.heads.head.weight.normal_(std=0.5)
    return model


def test_deit_shapes_variable_size_and_inference_average() -> None:
    model = _deit()
    x = torch.randn(3, 3, 32, 32)
    model.train()
    cls, dist = model(x)
    assert cls.shape == dist.shape == (3, 5)
    assert model(torch.randn(2, 3, 48, 40))[0].shape == (2, 5)  # any multiple of the patch (8)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))
    model.eval()
    with torch.no_grad():
        c, d = model.forward_heads(x)
        avg = (torch.softmax(c, 1) + torch.softmax(d, 1)) / 2
        out = model(x)
    assert not torch.allclose(torch.softmax(c, 1), torch.softmax(d, 1), atol=1e-3)
    assert torch.allclose(out.exp(), avg, atol=1e-6)
    assert torch.allclose(model.predict_proba(x), avg, atol=1e-6)
    assert torch.allclose(torch.softmax(out, 1), avg, atol=1e-6)  # usable as logits


def test_deit_from_vit_copies_the_backbone() -> None:
    torch.manual_seed(1)
    vit, _ = build_backbone("vit_nano", image_size=32, depth=1)
    model = deit_from_vit(vit, 4)
    for k, v in vit.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="needs a ViT backbone"):
        build_student("cifar_resnet18", {}, 4, deit=True)


def test_deit_student_keeps_the_vits_stochastic_depth() -> None:
    vit, _ = build_backbone("vit_nano", image_size=32, depth=2, drop_path_rate=0.2)
    model = deit_from_vit(vit, 4)
    assert model.drop_path_rate == 0.2
    assert [b.stochastic_depth.p for b in model.encoder.layers] == pytest.approx([0.0, 0.2])


def test_deit_converts_back_to_plain_vit() -> None:
    model = _deit(num_classes=5)
    state = to_plain_vit_state_dict(model, keep_head=True)
    assert not any("dist" in k for k in state)
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                              hidden_dim=64, mlp_dim=128, num_classes=5)
    tv.load_state_dict(state, strict=True)
    backbone, _ = build_backbone("vit_nano", image_size=32, depth=1)
    backbone.load_state_dict(to_plain_vit_state_dict(model, keep_head=False), strict=True)
    plain = plain_vit_from_deit(model).eval()
    tv.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), tv(x), atol=1e-5)
        # headless plain ViT = our backbone: same CLS feature
        assert torch.allclose(plain_vit_from_deit(model, keep_head=False).eval()(x), backbone.eval()(x), atol=1e-5)
    with pytest.raises(TypeError, match="DeiTVisionTransformer"):
        to_plain_vit_state_dict(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_train_augment_is_seeded_and_normalised() -> None:
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    a, b = TrainAugment(32, (0.3, 1.0), (0.75, 4 / 3), seed=3), TrainAugment(32, (0.3, 1.0), (0.75, 4 / 3), seed=3)
    state = a.get_state()
    x = a(images)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, b(images))
    a.set_state(state)
    assert torch.equal(a(images), x)
    assert not torch.equal(a(images), x)  # the stream moves on


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """3-class synthetic folder, a torchvision resnet18 teacher state dict (random weights)."""
    root = tmp_path_factory.mktemp("distill")
    data = write_synthetic_image_folder(root / "train", n_per_class=12, num_classes=3, size=32)
    torch.manual_seed(0)
    weights = root / "resnet18_teacher.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    return {"root": root, "data": data, "weights": weights}


def _cfg(out: Path, tiny: dict[str, Path], *extra: str):
    return load_distill_config(DEBUG, [
        "data.kind=folder", f"data.path={tiny['data']}", "data.val_split=2", "optim.batch_size=10",
        "student.deit=false", "student.backbone_kwargs.depth=1", "loss.kind=kd", "teacher.random_init=false",
        f"teacher.weights={tiny['weights']}", "logging.progress=false", f"logging.output_dir={out}", *extra])


def test_end_to_end_writes_results_exports_and_metrics(tmp_path: Path, tiny_data: dict[str, Path]) -> None:
    res = distill(_cfg(tmp_path / "run", tiny_data, "eval.every_epochs=1"))
    out = tmp_path / "run"
    assert res.step == 6 and len(res.losses) == 6 and all(math.isfinite(v) for v in res.losses)
    saved = json.loads((out / "distill_results.json").read_text())
    assert saved["n_train"] == 30 and saved["n_val"] == 6 and saved["num_classes"] == 3
    assert 0 <= saved["val"]["top1"] <= 100 and "teacher_val" in saved
    assert (out / "config.yaml").is_file()
    recs = read_metrics(out / "metrics.jsonl")
    assert {"loss", "ce", "kd", "lr", "teacher_agree", "cpu_s"} <= set(recs[0])
    assert any("val_top1" in r for r in recs)
    # the student is reloadable, and usable as a teacher (kind=classifier)
    model, meta = load_classifier(out / "student.pt")
    assert isinstance(model, ClassifierModel) and meta["classes"] == ["class_0", "class_1", "class_2"]
    teacher = build_teacher(load_distill_config(None, ["teacher.kind=classifier",
                                                       f"teacher.checkpoint={out / 'student.pt'}"]).teacher,
                            meta["classes"], 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model(x), atol=1e-6)
    from esvit.export import load_backbone

    net, spec = load_backbone(out / "student_backbone.pt")
    assert spec.name == "vit_nano" and net(x).shape == (2, 64)
    with pytest.raises(FileExistsError, match="--resume auto"):
        distill(_cfg(tmp_path / "run", tiny_data))
    # student.init_checkpoint: a DeiT student starts from the exported backbone
    init = distill(_cfg(tmp_path / "init", tiny_data, f"student.init_checkpoint={out / 'student_backbone.pt'}",
                        "student.deit=true", "loss.kind=deit_hard"), max_steps=0)
    started = ckpt.safe_load(init.last_checkpoint)["student"]
    for k, v in ckpt.safe_load(out / "student_backbone.pt")["state_dict"].items():
        assert torch.equal(started[k], v), k


def test_resume_reproduces_uninterrupted_run(tmp_path: Path, tiny_data: dict[str, Path]) -> None:
    extra = ("student.deit=true", "loss.kind=deit_soft", "loss.deit.tau=2.0", "eval.teacher=false")
    straight = distill(_cfg(tmp_path / "a", tiny_data, *extra))
    first = distill(_cfg(tmp_path / "b", tiny_data, *extra), max_steps=3)
    assert first.step == 3 and first.last_checkpoint is not None and not first.results
    second = distill(_cfg(tmp_path / "b", tiny_data, *extra), resume="auto")
    assert second.step == straight.step == 6
    resumed = first.losses + second.losses
    assert max(abs(a - b) for a, b in zip(resumed, straight.losses, strict=True)) <= 1e-6
    a, b = ckpt.safe_load(straight.last_checkpoint), ckpt.safe_load(second.last_checkpoint)
    for k, v in a["student"].items():
        assert torch.allclose(v, b["student"][k], atol=1e-6), k
    assert second.results["val"]["top1"] == straight.results["val"]["top1"]
    assert "heads" in second.results["val"]  # DeiT: per-head accuracies reported
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps))
    vit = ckpt.safe_load(tmp_path / "b" / "student_vit.pt")
    assert not any("dist" in k for k in vit["state_dict"])


def test_cached_teacher_logits_and_linear_teacher(tmp_path: Path, tiny_data: dict[str, Path]) -> None:
    from esvit.eval.linear import linear_probe

    # a backbone "pretrained here" (bare state dict) + the linear head esvit-linear writes
    torch.manual_seed(0)
    net, _ = build_backbone("vit_nano", image_size=32)
    bb = tmp_path / "bb" / "backbone.pt"
    bb.parent.mkdir()
    torch.save(net.state_dict(), bb)
    linear_probe(bb, tiny_data["data"], val_split=2, output_dir=bb.parent / "linear_eval", backbone_name="vit_nano",
                 image_size=32, max_iter=5, progress=False, cache=False)
    cfg = _cfg(tmp_path / "run", tiny_data, "teacher.kind=linear", f"teacher.checkpoint={bb}",
               "teacher.backbone=vit_nano", "teacher.mode=cached", "loss.kind=dkd", "optim.epochs=1")
    res = distill(cfg)
    cache = ckpt.safe_load(tmp_path / "run" / "teacher_logits.pt")["logits"]
    assert cache.shape == (30, 3) and res.results["teacher"]["mode"] == "cached"
    # the linear teacher = classifier(pooled feature) of the backbone, as esvit-linear trained it
    teacher = build_teacher(cfg.teacher, ["class_0", "class_1", "class_2"], 32)
    head = ckpt.safe_load(bb.parent / "linear_eval" / "linear_classifier.pt")
    x = torch.randn(2, 3, 32, 32)
    w, bias = head["state_dict"]["linear.weight"], head["state_dict"]["linear.bias"]
    mean, std = head["state_dict"]["mean"], head["state_dict"]["std"]
    with torch.no_grad():
        ref = ((net.eval()(x) - mean) / std) @ w.t() + bias
    assert torch.allclose(teacher(x), ref, atol=1e-4)
    with pytest.raises(ValueError, match="predicts 3 classes but the data has 2"):
        build_teacher(cfg.teacher, ["a", "b"], 32)


def test_cpu_budget_ends_the_run(tmp_path: Path, tiny_data: dict[str, Path]) -> None:
    res = distill(_cfg(tmp_path, tiny_data, "optim.cpu_budget_s=1.5", "optim.epochs=10000", "eval.teacher=false"))
    assert 0 < res.step < 10000 * 3 and res.results["cpu_budget_s"] == 1.5
    assert 1.5 <= res.results["cpu_s"] < 1.5 + 1.0  # stops within about one step of the budget
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]
    assert lrs[-1] < max(lrs)  # the cosine schedule follows the budget


# --------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("override,key", [
    ("optim.lrr=1e-3", "optim.lrr"),
    ("loss.kind=fancy", "loss.kind"),
    ("loss.kd.alpha=1.5", "loss.kd.alpha"),
    ("student.deit=false", "loss.kind"),          # deit_hard loss without a DeiT student
    ("teacher.random_init=false", "teacher.weights"),
    ("optim.batch_size=many", "optim.batch_size"),
])
def test_bad_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_distill_config(DEBUG, [override])


def test_cli_reports_errors_and_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from esvit.cli.distill import main

    assert main(["--config", str(DEBUG), "loss.kind=fancy"]) == 2
    assert "loss.kind" in capsys.readouterr().err
    assert main(["--config", str(DEBUG), "data.kind=folder"]) == 2
    assert "no training data" in capsys.readouterr().err
    rc = main(["--config", str(DEBUG), "--output-dir", str(tmp_path), "data.synthetic_images=48",
               "optim.epochs=1", "optim.batch_size=16", "logging.progress=false"])
    assert rc == 0 and "student val" in capsys.readouterr().out
    assert (tmp_path / "student_vit.pt").is_file()


def _torchrun(nproc: int, out: Path, tiny: dict[str, Path]):
    import os
    import subprocess
    import sys

    overrides = ["data.kind=folder", f"data.path={tiny['data']}", "data.val_split=2", "optim.batch_size=10",
                 "student.deit=false", "student.backbone_kwargs.depth=1", "loss.kind=kd", "teacher.random_init=false",
                 f"teacher.weights={tiny['weights']}", "logging.progress=false", f"logging.output_dir={out}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "distill.py"), "--config", str(DEBUG), *overrides]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_torchrun_two_ranks_match_one(tmp_path: Path, tiny_data: dict[str, Path]) -> None:
    """DDP on the student: 2 gloo ranks x 5 images follow the 1-rank x 10 images run."""
    one = _torchrun(1, tmp_path / "one", tiny_data)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, tmp_path / "two", tiny_data)
    assert two.returncode == 0, two.stderr[-3000:]
    l1 = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    l2 = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    assert len(l1) == len(l2) > 0
    assert max(abs(a - b) for a, b in zip(l1, l2, strict=True)) < 1e-4, (l1, l2)
    assert (tmp_path / "two" / "distill_results.json").is_file()
