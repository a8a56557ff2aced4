"""Distillation methods behind the registry (issue 16): NKD, FitNet, CRD, OFA-KD and label-free
feature distillation, each against its paper's formula written out here on tiny tensors; stage
discovery by hooks on registry, torchvision and timm models; the registry itself."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn

from esvit.backbones import build_backbone
from esvit.config import ConfigError
from esvit.distill.config import load_distill_config
from esvit.distill.deit import build_student
from esvit.distill.losses import DISTLoss, DKDLoss, KDLoss
from esvit.distill.methods import (
    CRD,
    OFA,
    ContrastMemory,
    CRDLoss,
    DistillContext,
    Distiller,
    DistillInputs,
    FeatureDistiller,
    FeatureTap,
    FitNet,
    HintRegressor,
    MethodRunner,
    Needs,
    Stage,
    StageError,
    build_distiller,
    default_stages,
    feature_distance,
    fitnet_loss,
    forward_features,
    get_distiller,
    list_distillers,
    list_stages,
    nce_loss,
    nkd_loss,
    ofa_loss,
    register_distiller,
)
from esvit.distill.methods import registry as registry_module
from esvit.distill.teachers import FrozenTeacher

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "distill_debug_cpu.yaml"
D = torch.float64


def _logits(b: int = 5, c: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, c, generator=g, dtype=D) * 3).requires_grad_()
    t = (torch.randn(b, c, generator=g, dtype=D) * 3).requires_grad_()
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _ce_ref(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = _softmax(z)
    return -torch.stack([torch.log(p[i, y[i]]) for i in range(len(y))]).mean()


def _only_student_grad(s: torch.Tensor, t: torch.Tensor, loss: torch.Tensor) -> None:
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


# ------------------------------------------------------------------------------------------ NKD


@pytest.mark.parametrize(("gamma", "lam", "ce_weight"), [(1.5, 1.0, 1.0), (1.0, 2.0, 0.0), (0.5, 4.0, 0.3)])
def test_nkd_matches_yang_2023(gamma: float, lam: float, ce_weight: float) -> None:
    """L_NKD = -T_t log S_t - gamma * lambda^2 * sum_{i != t} N(T_i^lambda) log N(S_i^lambda),
    N(p_i) = p_i / (1 - p_t), T / S at temperature 1 in the target term, lambda in the other."""
    s, t, y = _logits()
    b, c = s.shape
    ref = 0.0
    for i in range(b):
        T, S = _softmax(t[i].detach()), _softmax(s[i])
        Tl, Sl = _softmax(t[i].detach() / lam), _softmax(s[i] / lam)
        target = -T[y[i]] * torch.log(S[y[i]])
        non = sum(Tl[k] / (1 - Tl[y[i]]) * torch.log(Sl[k] / (1 - Sl[y[i]])) for k in range(c) if k != y[i])
        ref = ref + target - gamma * lam ** 2 * non
    ref = ref / b + ce_weight * _ce_ref(s, y)
    out = nkd_loss(s, t, y, gamma, lam, ce_weight)
    assert torch.allclose(out["loss"], ref, atol=1e-10)
    assert set(out) == {"loss", "ce", "target", "non_target"}
    _only_student_grad(s, t, out["loss"])


def test_nkd_half_precision_is_upcast_and_needs_two_classes() -> None:
    s, t, y = _logits()
    ref = nkd_loss(s.detach().float(), t.detach().float(), y)["loss"]
    assert torch.allclose(nkd_loss(s.detach().half(), t.detach().half(), y)["loss"], ref, atol=1e-2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        nkd_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------------------------------ OFA


@pytest.mark.parametrize(("eps", "temp"), [(1.0, 1.0), (1.3, 1.0), (1.6, 2.0)])
def test_ofa_matches_hao_2023(eps: float, temp: float) -> None:
    """L_OFA = -(1 + p^t_c)^eps log p^s_c - sum_{k != c} p^t_k log p^s_k (batch mean)."""
    s, t, y = _logits()
    b, c = s.shape
    ref = 0.0
    for i in range(b):
        pt, ps = _softmax(t[i].detach() / temp), _softmax(s[i] / temp)
        ref = ref - (1 + pt[y[i]]) ** eps * torch.log(ps[y[i]])
        ref = ref - sum(pt[k] * torch.log(ps[k]) for k in range(c) if k != y[i])
    out = ofa_loss(s, t, y, eps, temp)
    assert torch.allclose(out, ref / b, atol=1e-10)
    _only_student_grad(s, t, out)


@pytest.mark.parametrize("eps", [1.0, 1.4])
def test_ofa_official_form_is_the_released_code(eps: float) -> None:
    """Hao840/OFAKD ``ofa_loss``: sum -((p_t + 1_c)^eps - 1_c) log p_s; at eps = 1 plus the label
    cross-entropy it is the paper's form."""
    s, t, y = _logits(seed=3)
    b, c = s.shape
    ref = 0.0
    for i in range(b):
        pt, ps = _softmax(t[i].detach()), _softmax(s[i])
        for k in range(c):
            one = 1.0 if k == y[i] else 0.0
            ref = ref - ((pt[k] + one) ** eps - one) * torch.log(ps[k])
    official = ofa_loss(s, t, y, eps, form="official")
    assert torch.allclose(official, ref / b, atol=1e-10)
    if eps == 1.0:
        assert torch.allclose(official + _ce_ref(s, y), ofa_loss(s, t, y, eps), atol=1e-10)
    with pytest.raises(ValueError, match="form must be one of"):
        ofa_loss(s, t, y, form="mine")


# --------------------------------------------------------------------------------------- FitNet


def _stage(name: str, shape: tuple[int, ...], layout: str, prefix: int = 0) -> Stage:
    return Stage(name, shape, layout, prefix)


def test_fitnet_matches_romero_hint_loss_with_pooling_alignment() -> None:
    """L_HT = mean((u_h - pool(W * v_g))^2): 1x1 conv regressor, 4x4 student grid pooled onto the
    2x2 teacher grid by 2x2 block means."""
    torch.manual_seed(0)
    s_stage, t_stage = _stage("s", (1, 3, 4, 4), "bchw"), _stage("t", (1, 5, 2, 2), "bchw")
    reg = HintRegressor(s_stage, t_stage).double()
    v = torch.randn(2, 3, 4, 4, dtype=D, requires_grad=True)
    u = torch.randn(2, 5, 2, 2, dtype=D, requires_grad=True)
    w = reg.proj.weight[:, :, 0, 0]  # (5, 3)
    r = torch.einsum("oc,bchw->bohw", w, v)
    pooled = torch.stack([torch.stack([r[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(2, 3)) for j in range(2)],
                                      dim=-1) for i in range(2)], dim=-2)
    ref = ((u.detach() - pooled) ** 2).sum() / u.numel()
    out = fitnet_loss([reg(v)], [u])
    assert torch.allclose(out, ref, atol=1e-12)
    _only_student_grad(v, u, out)
    assert reg.proj.weight.grad is not None


def test_fitnet_tokens_linear_regressor_and_interpolation() -> None:
    """Tokens (CLS + 2x2 grid) through a linear regressor, bilinearly interpolated onto a 4x4 map."""
    torch.manual_seed(1)
    s_stage, t_stage = _stage("s", (1, 5, 6), "bnd", 1), _stage("t", (1, 4, 4, 4), "bchw")
    reg = HintRegressor(s_stage, t_stage).double()
    assert isinstance(reg.proj, nn.Linear)
    x = torch.randn(3, 5, 6, dtype=D)
    grid = (x[:, 1:] @ reg.proj.weight.T).transpose(1, 2).reshape(3, 4, 2, 2)
    ref = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(reg(x), ref, atol=1e-12)


def test_fitnet_unalignable_grids_are_a_one_line_error() -> None:
    s_stage, t_stage = _stage("blocks.1", (1, 7, 8), "bnd", 0), _stage("layer3", (1, 5, 8), "bnd", 0)
    with pytest.raises(StageError) as e:
        HintRegressor(s_stage, t_stage)
    assert "cannot align" in str(e.value) and "\n" not in str(e.value)
    HintRegressor(_stage("a", (1, 7, 8), "bnd", 0), _stage("b", (1, 7, 4), "bnd", 0))  # equal counts: fine


# ------------------------------------------------------------------------------------------ CRD


def test_nce_loss_matches_tian_2020_critic() -> None:
    """h = P / (P + K/N); L = -(sum_i log h(i, pos) + sum_ik log(1 - h(i, neg_k))) / b."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 6, generator=g, dtype=D) * 2 + 0.01
    n = 50
    k = scores.shape[1] - 1
    h = scores / (scores + k / n)
    ref = -(torch.log(h[:, 0]).sum() + torch.log(1 - h[:, 1:]).sum()) / 4
    assert torch.allclose(nce_loss(scores, n, eps=0.0), ref, atol=1e-12)
    assert torch.allclose(nce_loss(scores, n), ref, atol=1e-5)  # RepDistiller's eps = 1e-7


def test_contrast_memory_scores_normaliser_and_momentum_update() -> None:
    """P(i, j) = exp(<M_t[j], f_s(i)> / tau) / Z_s with Z_s = N * mean at the first step; then
    M_s[i] <- normalise(m M_s[i] + (1 - m) f_s(i)) (and the same for the teacher side)."""
    n, k, d, tau, m = 20, 4, 8, 0.1, 0.5
    mem = ContrastMemory(d, n, k, tau, m, seed=0).double()
    g = torch.Generator().manual_seed(1)
    f_s = F.normalize(torch.randn(3, d, generator=g, dtype=D), dim=1)
    f_t = F.normalize(torch.randn(3, d, generator=g, dtype=D), dim=1)
    index = torch.tensor([2, 7, 11])
    cidx = torch.cat([index[:, None], torch.randint(0, n, (3, k), generator=g)], dim=1)
    ms0, mt0 = mem.memory_s.clone(), mem.memory_t.clone()
    p, q = mem(f_s, f_t, index, cidx)
    raw_p = torch.exp(torch.einsum("bkd,bd->bk", mt0[cidx], f_s) / tau)
    raw_q = torch.exp(torch.einsum("bkd,bd->bk", ms0[cidx], f_t) / tau)
    assert torch.allclose(p, raw_p / (raw_p.mean() * n), atol=1e-10)
    assert torch.allclose(q, raw_q / (raw_q.mean() * n), atol=1e-10)
    new_s = F.normalize(ms0[index] * m + f_s * (1 - m), dim=1)
    new_t = F.normalize(mt0[index] * m + f_t * (1 - m), dim=1)
    assert torch.allclose(mem.memory_s[index], new_s) and torch.allclose(mem.memory_t[index], new_t)
    others = torch.ones(n, dtype=torch.bool)
    others[index] = False
    assert torch.equal(mem.memory_s[others], ms0[others])
    z = mem.z.clone()
    mem(f_s, f_t, index, cidx)
    assert torch.equal(mem.z, z)  # Z is fixed after the first step


def test_crd_bank_larger_than_the_data_is_a_one_line_error() -> None:
    with pytest.raises(ValueError) as e:
        ContrastMemory(8, num_data=100, num_negatives=100)
    msg = str(e.value)
    assert "loss.crd.num_negatives" in msg and "100 images" in msg and "\n" not in msg


def _crd_step(crd: CRDLoss, f_s: torch.Tensor, f_t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return crd(f_s, f_t, index)["loss"]


def test_crd_state_dict_resumes_exactly() -> None:
    """Banks, Z and the negative sampler's generator are in the state dict: a module restored from
    step 2 continues bit for bit like the original."""
    torch.manual_seed(0)
    crd = CRDLoss(6, 10, num_data=40, feat_dim=4, num_negatives=8, seed=3)
    batches = [(torch.randn(5, 6), torch.randn(5, 10), torch.randperm(40)[:5]) for _ in range(4)]
    for fs, ft, idx in batches[:2]:
        _crd_step(crd, fs, ft, idx)
    state = copy.deepcopy(crd.state_dict())
    assert {"contrast.memory_s", "contrast.memory_t", "contrast.z", "contrast._extra_state"} <= set(state)
    resumed = CRDLoss(6, 10, num_data=40, feat_dim=4, num_negatives=8, seed=99)
    resumed.load_state_dict(state)
    for fs, ft, idx in batches[2:]:
        a, b = _crd_step(crd, fs, ft, idx), _crd_step(resumed, fs, ft, idx)
        assert torch.equal(a, b)
    for key, value in crd.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.state_dict()[key]), key


def test_crd_gradients_reach_the_student_and_the_heads_only() -> None:
    torch.manual_seed(0)
    crd = CRDLoss(6, 10, num_data=30, feat_dim=4, num_negatives=8)
    f_s = torch.randn(5, 6, requires_grad=True)
    f_t = torch.randn(5, 10, requires_grad=True)
    crd(f_s, f_t, torch.arange(5))["loss"].backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    assert crd.embed_s.linear.weight.grad is not None and crd.embed_t.linear.weight.grad is not None


# ------------------------------------------------------------------------------ feature (no labels)


@pytest.mark.parametrize("criterion", ["cosine", "mse", "smooth_l1"])
def test_feature_distance_formulas(criterion: str) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 5, generator=g, dtype=D, requires_grad=True)
    t = (torch.randn(3, 4, 5, generator=g, dtype=D) * 2).requires_grad_()
    diff = s - t.detach()
    if criterion == "cosine":
        cos = (s * t.detach()).sum(-1) / (s.norm(dim=-1) * t.detach().norm(dim=-1))
        ref = (1 - cos).mean()
    elif criterion == "mse":
        ref = (diff ** 2).mean()
    else:
        a = diff.abs()
        ref = torch.where(a < 1, 0.5 * a ** 2, a - 0.5).mean()
    out = feature_distance(s, t, criterion)
    assert torch.allclose(out, ref, atol=1e-12)
    _only_student_grad(s, t, out)


def test_feature_distiller_pooled_and_region_terms_without_labels() -> None:
    torch.manual_seed(0)
    s_stage, t_stage = _stage("s", (1, 6, 4, 4), "bchw"), _stage("t", (1, 5, 10), "bnd", 1)
    fd = FeatureDistiller(s_stage, t_stage, "mse", pooled_weight=0.5, region_weight=2.0).double()
    assert fd.needs == Needs(("s",), ("t",), teacher_logits=False, labels=False)
    xs = torch.randn(2, 6, 4, 4, dtype=D, requires_grad=True)
    xt = torch.randn(2, 5, 10, dtype=D)
    out = fd(DistillInputs(None, student_feats={"s": xs}, teacher_feats={"t": xt}))
    s_reg = xs.flatten(2).transpose(1, 2)
    proj = s_reg @ fd.region_proj.weight.T + fd.region_proj.bias  # (2, 16, 10)
    grid = proj.transpose(1, 2).reshape(2, 10, 4, 4)
    aligned = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # teacher grid 2x2
    pooled = fd.pooled_proj(s_reg.mean(1))
    ref = 0.5 * ((pooled - xt[:, 0]) ** 2).mean() + 2.0 * ((aligned - xt[:, 1:]) ** 2).mean()
    assert torch.allclose(out["loss"], ref, atol=1e-12)
    out["loss"].backward()
    assert xs.grad is not None


# ------------------------------------------------------------------------------- stages and taps


def _resnet_student() -> nn.Module:
    return build_student("resnet18", {}, 4)


def test_list_stages_of_registry_torchvision_and_vit_models() -> None:
    stages = list_stages(_resnet_student(), 32)
    assert [s.name for s in default_stages(stages)] == [f"backbone.layer{i}" for i in range(1, 5)]
    assert default_stages(stages)[0].shape == (1, 64, 8, 8)
    tv = list_stages(torchvision.models.resnet18(num_classes=3), 64)
    assert [s.name for s in default_stages(tv)] == ["layer1", "layer2", "layer3", "layer4"]
    assert all("avgpool" not in s.name and "fc" not in s.name for s in tv)  # global pool and head are no stages
    vit = list_stages(build_backbone("vit_nano", image_size=32, depth=4)[0], 32)
    picked = default_stages(vit)
    assert [s.name for s in picked] == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    assert picked[0].layout == "bnd" and picked[0].num_prefix_tokens == 1 and picked[0].grid == (4, 4)
    swin = default_stages(list_stages(build_backbone("swin_nano", image_size=32)[0], 32))
    assert [s.grid for s in swin] == [(16, 16), (8, 8), (4, 4)]


def test_list_stages_of_timm_models() -> None:
    timm = pytest.importorskip("timm")
    cnn = list_stages(timm.create_model("resnet18", num_classes=3), 32)
    assert [s.name for s in default_stages(cnn)] == ["layer1", "layer2", "layer3", "layer4"]
    vit = list_stages(timm.create_model("deit_tiny_distilled_patch16_224", num_classes=3, img_size=32, patch_size=8,
                                        depth=4), 32)
    picked = default_stages(vit)
    assert [s.name for s in picked] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert picked[0].num_prefix_tokens == 2 and picked[0].grid == (4, 4)
    assert next(s for s in vit if s.name == "patch_embed").num_prefix_tokens == 0  # before the tokens are added


def test_unknown_stage_is_a_one_line_error_listing_the_stages() -> None:
    student = _resnet_student()
    ctx = DistillContext(student, None, 4, 10, 32)
    with pytest.raises(StageError) as e:
        ctx.pick("student", ["backbone.layer9"], "loss.fitnet.student_stages")
    msg = str(e.value)
    assert "loss.fitnet.student_stages" in msg and "'backbone.layer9'" in msg and "\n" not in msg
    assert "backbone.layer3 (bchw 256x2x2)" in msg
    with pytest.raises(StageError, match="no stage 'nope'"):
        FeatureTap(student, ["nope"], list_stages(student, 32))


def test_feature_tap_reads_stages_and_leaves_no_hooks() -> None:
    net = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    tap = FeatureTap(net, ["layer2", "layer4"])
    out, feats = tap(x)
    assert torch.allclose(out, net(x))
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        l2 = net.layer2(net.layer1(h))
    assert torch.allclose(feats["layer2"], l2, atol=1e-6)
    assert feats["layer4"].shape == (2, 512, 1, 1)
    assert all(not m._forward_hooks for m in net.modules())
    out, feats = tap(x, stop_after=True)  # the forward stops after layer4: no logits
    assert out is None and set(feats) == {"layer2", "layer4"}
    assert all(not m._forward_hooks for m in net.modules())


# ------------------------------------------------------------------------------------- registry


def test_registry_lists_every_method_and_refuses_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"ce", "kd", "dkd", "dist", "deit_soft", "deit_hard", "nkd", "fitnet", "crd", "ofa", "feature"} <= set(
        list_distillers())
    with pytest.raises(ValueError, match="unknown distiller 'nope'; registered: ce, crd"):
        get_distiller("nope")
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_distiller("l2_logits")
    class L2(Distiller):
        def forward(self, inputs: DistillInputs) -> dict[str, torch.Tensor]:
            assert inputs.teacher_logits is not None
            loss = ((inputs.logits() - inputs.teacher_logits) ** 2).mean()
            return {"loss": loss}

    assert get_distiller("l2_logits") is L2 and L2.name == "l2_logits"
    with pytest.raises(ValueError, match="already registered"):
        register_distiller("kd")(L2)


def test_logit_distillers_give_the_existing_losses() -> None:
    s, t, y = _logits()
    cfg = load_distill_config(DEBUG, ["student.deit=false", "loss.kind=kd"]).loss
    ctx = DistillContext(nn.Linear(1, 1), None, 7, 10, 32, steps_per_epoch=10)
    inputs = DistillInputs(s, t, y, step=5)
    for kind, ref in [("kd", KDLoss()(s, t, y)), ("dist", DISTLoss()(s, t, y)),
                      ("dkd", DKDLoss()(s, t, y, kd_scale=0.25))]:
        cfg.kind = kind
        cfg.dkd.warmup_epochs = 2.0
        out = build_distiller(cfg, ctx)(inputs)
        assert torch.allclose(out["loss"], ref["loss"]), kind


# ------------------------------------------------------------------------- end to end per method


def _models(student_name: str = "resnet18") -> tuple[nn.Module, FrozenTeacher]:
    torch.manual_seed(0)
    kwargs = {"image_size": 32, "depth": 2} if student_name.startswith("vit") else {}
    kwargs = {"image_size": 32} if student_name.startswith("swin") else kwargs
    student = build_student(student_name, kwargs, 4)
    teacher = FrozenTeacher(torchvision.models.resnet18(num_classes=4), 32, 4, description="random resnet18")
    return student, teacher


@pytest.mark.parametrize(("kind", "student_name"), [("nkd", "resnet18"), ("fitnet", "resnet18"), ("fitnet", "vit_nano"),
                                                     ("crd", "vit_nano"), ("ofa", "resnet18"), ("ofa", "vit_nano"),
                                                     ("ofa", "swin_nano"), ("feature", "vit_nano"),
                                                     ("feature", "swin_nano")])
def test_every_method_trains_the_student_only(kind: str, student_name: str) -> None:
    student, teacher = _models(student_name)
    cfg = load_distill_config(DEBUG, ["student.deit=false", f"loss.kind={kind}", "loss.crd.num_negatives=16"])
    ctx = DistillContext(student, teacher, 4, 64, 32, steps_per_epoch=4, seed=cfg.seed)
    distiller = build_distiller(cfg.loss, ctx)
    assert isinstance(distiller, get_distiller(kind))
    needs = distiller.needs
    x = torch.randn(6, 3, 32, 32)
    y = torch.randint(0, 4, (6,))
    s_out, t_logits, s_feats, t_feats = forward_features(needs, student, teacher, x)
    assert (t_logits is not None) == needs.teacher_logits
    inputs = DistillInputs(s_out, t_logits, y if needs.labels else None, s_feats, t_feats,
                           torch.arange(6) if needs.index else None)
    out = distiller(inputs)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    if any(True for _ in distiller.parameters()):
        assert any(p.grad is not None for p in distiller.parameters())
    assert all(not m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_feature_distillation_needs_no_labels_and_stops_the_teacher_early() -> None:
    student, teacher = _models("vit_nano")
    cfg = load_distill_config(DEBUG, ["student.deit=false", "loss.kind=feature"])
    distiller = build_distiller(cfg.loss, DistillContext(student, teacher, 0, 64, 32))
    assert not distiller.needs.labels and not distiller.needs.teacher_logits
    assert distiller.needs.teacher_stages == ("net.layer4",)
    assert distiller.needs.student_stages == ("backbone.encoder",)
    _, t_logits, _, t_feats = forward_features(distiller.needs, student, teacher, torch.randn(2, 3, 32, 32))
    assert t_logits is None and t_feats["net.layer4"].shape == (2, 512, 1, 1)


def test_ofa_branch_exits_cover_cnn_and_vit_stages() -> None:
    for name, n_exits in (("resnet18", 4), ("vit_nano", 2)):
        student, teacher = _models(name)
        cfg = load_distill_config(DEBUG, ["student.deit=false", "loss.kind=ofa"])
        ofa = build_distiller(cfg.loss, DistillContext(student, teacher, 4, 64, 32))
        assert isinstance(ofa, OFA) and len(ofa.branches) == n_exits
        s_out, t_logits, feats, _ = forward_features(ofa.needs, student, teacher, torch.randn(2, 3, 32, 32))
        for branch, stage in zip(ofa.branches, ofa.stages, strict=True):
            assert branch(feats[stage.name]).shape == (2, 4)


def test_crd_through_the_registry_resumes_exactly() -> None:
    """Student + distiller + optimiser saved after 2 SGD steps and restored into fresh objects give
    the same next steps (the memory bank and its sampler included)."""
    def setup(seed: int) -> tuple[nn.Module, FrozenTeacher, CRD, torch.optim.Optimizer]:
        student, teacher = _models("vit_nano")
        cfg = load_distill_config(DEBUG, ["student.deit=false", "loss.kind=crd", "loss.crd.num_negatives=16"])
        crd = build_distiller(cfg.loss, DistillContext(student, teacher, 4, 48, 32, seed=seed))
        assert isinstance(crd, CRD)
        opt = torch.optim.SGD([*student.parameters(), *crd.parameters()], lr=0.1, momentum=0.9)
        return student, teacher, crd, opt

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g),
                torch.randperm(48, generator=g)[:4]) for _ in range(4)]

    def step(student: nn.Module, teacher: FrozenTeacher, crd: CRD, opt: torch.optim.Optimizer,
             batch: tuple[torch.Tensor, ...]) -> float:
        x, y, idx = batch
        s_out, _, s_feats, t_feats = forward_features(crd.needs, student, teacher, x)
        loss = crd(DistillInputs(s_out, None, y, s_feats, t_feats, idx))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    a = setup(0)
    for batch in batches[:2]:
        step(*a, batch)
    saved = copy.deepcopy({"student": a[0].state_dict(), "distiller": a[2].state_dict(), "opt": a[3].state_dict()})
    b = setup(1)  # another seed: everything must come from the checkpoint
    b[0].load_state_dict(saved["student"])
    b[2].load_state_dict(saved["distiller"])
    b[3].load_state_dict(saved["opt"])
    for batch in batches[2:]:
        assert step(*a, batch) == step(*b, batch)
    assert torch.equal(a[2].criterion.contrast.memory_t, b[2].criterion.contrast.memory_t)


def test_crd_refuses_a_bank_larger_than_the_training_set() -> None:
    student, teacher = _models("resnet18")
    cfg = load_distill_config(DEBUG, ["student.deit=false", "loss.kind=crd"])
    with pytest.raises(ValueError, match=r"draws 16384 negatives per image but the training set has 64 images"):
        build_distiller(cfg.loss, DistillContext(student, teacher, 4, 64, 32))


def test_fitnet_bad_hint_stage_from_the_config_lists_the_stages() -> None:
    student, teacher = _models("resnet18")
    cfg = load_distill_config(DEBUG, ["student.deit=false", "loss.kind=fitnet", "loss.fitnet.student_stages=[backbone.layer3]",
                                      "loss.fitnet.teacher_stages=[net.layer7]"])
    with pytest.raises(StageError) as e:
        build_distiller(cfg.loss, DistillContext(student, teacher, 4, 64, 32))
    msg = str(e.value)
    assert "'net.layer7'" in msg and "net.layer4 (bchw 512x1x1)" in msg and "\n" not in msg
    cfg.loss.fitnet.teacher_stages = ["net.layer3", "net.layer4"]
    with pytest.raises(StageError, match="1 student stages but 2 teacher stages"):
        build_distiller(cfg.loss, DistillContext(student, teacher, 4, 64, 32))
    cfg.loss.fitnet.teacher_stages = ["net.layer3"]
    fit = build_distiller(cfg.loss, DistillContext(student, teacher, 4, 64, 32))
    assert isinstance(fit, FitNet) and fit.needs.teacher_stages == ("net.layer3",)


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("overrides", "key"), [
    (["loss.kind=fitnet", "loss.fitnet.weight=0", "loss.fitnet.ce_weight=0"], "loss.fitnet.ce_weight"),
    (["loss.kind=crd", "loss.crd.weight=0", "loss.crd.ce_weight=0"], "loss.crd.ce_weight"),
    (["loss.kind=ofa", "loss.ofa.logit_weight=0", "loss.ofa.branch_weight=0"], "loss.ofa.ce_weight"),
    (["loss.kind=feature", "loss.feature.pooled_weight=0", "loss.feature.region_weight=0"],
     "loss.feature.region_weight"),
    (["loss.kind=fitnet", "loss.fitnet.student_stages=['']"], "loss.fitnet.student_stages"),
    (["loss.kind=crd", "loss.crd.momentum=1.0"], "loss.crd.momentum"),
    (["loss.kind=feature", "loss.feature.criterion=l1"], "loss.feature.criterion"),
    (["loss.kind=ofa", "loss.ofa.form=mine"], "loss.ofa.form"),
    (["loss.kind=crd", "teacher.mode=cached"], "teacher.mode"),
])
def test_new_config_keys_are_checked(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_distill_config(DEBUG, ["student.deit=false", *overrides])
    msg = str(e.value)
    assert f": {key}: must be" in msg and "\n" not in msg


def test_new_loss_kinds_load() -> None:
    for kind in ("nkd", "fitnet", "crd", "ofa", "feature"):
        cfg = load_distill_config(DEBUG, ["student.deit=false", f"loss.kind={kind}"])
        assert cfg.loss.kind == kind and get_distiller(kind).name == kind
    assert math.isclose(load_distill_config(DEBUG, ["student.deit=false", "loss.kind=crd"]).loss.crd.temperature, 0.07)


# ----------------------------------------------------------------------------------- the runner


def test_method_runner_steps_and_uses_cached_teacher_logits() -> None:
    student, teacher = _models("resnet18")
    ctx = DistillContext(student, teacher, 4, 64, 32)
    cfg = load_distill_config(DEBUG, ["student.deit=false", "loss.kind=fitnet"])
    runner = MethodRunner.build(cfg.loss, ctx)
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 4, (3,))
    s_out, t_logits, losses = runner.step(x, y, None, 0)
    assert s_out.shape == (3, 4) and t_logits is None and set(losses) == {"loss", "hint", "ce"}
    assert len(list(runner.parameters())) == 4  # one 1x1 regressor per stage pair
    with pytest.raises(ValueError, match="needs labels"):
        runner.step(x, None, None, 0)
    cfg.loss.kind = "kd"
    kd = MethodRunner.build(cfg.loss, ctx)
    cached = torch.randn(3, 4)
    calls: list[int] = []
    handle = teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        _, t_logits, losses = kd.step(x, y, None, 0, teacher_logits=cached)
        assert t_logits is cached and not calls  # the teacher does not run
        kd.step(x, y, None, 0)
        assert calls == [1]
    finally:
        handle.remove()
    assert torch.allclose(losses["loss"], KDLoss()(student(x), cached, y)["loss"])


# ------------------------------------------------------------------------------------------ DDP


def _crd_rank(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical modules on both ranks
        crd = CRDLoss(6, 10, num_data=40, feat_dim=4, num_negatives=8, seed=0)
        runner = MethodRunner.__new__(MethodRunner)
        runner.distiller = crd  # type: ignore[assignment]
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own images
        index = torch.arange(4) + 4 * rank
        crd(torch.randn(4, 6, generator=g), torch.randn(4, 10, generator=g), index)["loss"].backward()
        runner.sync_gradients()
        torch.save({"state": crd.state_dict(), "grad": crd.embed_s.linear.weight.grad}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_crd_banks_and_gradients_agree_across_two_gloo_ranks(tmp_path: Path) -> None:
    """Each rank updates the banks with the embeddings of both ranks; Z is the ranks' mean;
    MethodRunner.sync_gradients averages the distiller's gradients."""
    mp.spawn(_crd_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in ("contrast.memory_s", "contrast.memory_t", "contrast.z"):
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert torch.equal(r0["grad"], r1["grad"])
    init = CRDLoss(6, 10, num_data=40, feat_dim=4, num_negatives=8, seed=0).contrast.memory_s
    changed = (r0["state"]["contrast.memory_s"] != init).any(dim=1)
    assert changed[:8].all() and not changed[8:].any()  # both ranks' images moved, no other slot


# ------------------------------------------------------------------- the training loop (esvit-distill)


def _run_cfg(out: Path, kind: str, *extra: str):
    """``configs/distill_debug_cpu.yaml`` (3 steps/epoch, 6 steps) with a plain ViT student."""
    return load_distill_config(DEBUG, [
        "data.synthetic_images=48", "optim.batch_size=16", "eval.teacher=false", "logging.progress=false",
        "logging.log_every=1", "student.deit=false", f"loss.kind={kind}", f"logging.output_dir={out}", *extra])


@pytest.mark.parametrize(("kind", "extra"), [
    ("nkd", ()), ("fitnet", ()), ("crd", ("loss.crd.num_negatives=16",)), ("ofa", ()),
    ("dkd", ("loss.dkd.warmup_epochs=1",)), ("feature", ()),
])
def test_every_method_runs_end_to_end_and_resumes_exactly(tmp_path: Path, kind: str, extra: tuple[str, ...]) -> None:
    from esvit.distill.train import distill
    from esvit.train import checkpoint as ckpt

    straight = distill(_run_cfg(tmp_path / "a", kind, *extra))
    assert straight.step == 6 and all(math.isfinite(v) for v in straight.losses)
    score = "knn_top1" if kind == "feature" else "top1"  # label-free: kNN / linear on student_backbone.pt
    assert 0 <= straight.results["val"][score] <= 100 and (tmp_path / "a" / "student_backbone.pt").is_file()
    first = distill(_run_cfg(tmp_path / "b", kind, *extra), max_steps=3)
    assert first.step == 3 and first.last_checkpoint is not None
    assert isinstance(ckpt.load_checkpoint(first.last_checkpoint, "distill")["distiller"], dict)
    second = distill(_run_cfg(tmp_path / "b", kind, *extra), resume="auto")
    assert second.step == 6
    resumed = first.losses + second.losses
    assert max(abs(a - b) for a, b in zip(resumed, straight.losses, strict=True)) <= 1e-6
    a, b = ckpt.safe_load(straight.last_checkpoint), ckpt.safe_load(second.last_checkpoint)
    for part in ("student", "distiller"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            if isinstance(v, torch.Tensor):
                assert torch.allclose(v, b[part][k], atol=1e-6), (part, k)
    # the distiller's trainable parts are optimised too (logit methods have none)
    n_opt = sum(len(g["params"]) for g in a["optimizer"]["param_groups"])
    n_student = len(list(build_student("vit_nano", {"image_size": 32, "depth": 2}, 4).parameters()))
    assert (n_opt == n_student) == (kind in ("nkd", "dkd")), (n_opt, n_student)
    recs = [r for r in _metrics(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 7)) and all("acc" in r for r in recs)


def _metrics(out: Path) -> list[dict]:
    from esvit.train.logger import read_metrics

    return read_metrics(out / "metrics.jsonl")


def test_checkpoints_without_distiller_state_still_resume(tmp_path: Path) -> None:
    """Checkpoints of logit kinds written before the registry (no ``distiller`` field) resume; a
    distiller state of another method is a one-line CheckpointError."""
    from esvit.distill.train import distill
    from esvit.train import checkpoint as ckpt

    first = distill(_run_cfg(tmp_path, "kd"), max_steps=3)
    assert first.last_checkpoint is not None
    state = torch.load(first.last_checkpoint, weights_only=True)
    assert state.pop("distiller") == {}
    torch.save(state, first.last_checkpoint)
    assert distill(_run_cfg(tmp_path, "kd"), resume="auto", max_steps=4).step == 4
    fit = distill(_run_cfg(tmp_path / "fit", "fitnet"), max_steps=3)
    with pytest.raises(ckpt.CheckpointError, match=r"\[distiller\] does not match loss.kind=kd"):
        distill(_run_cfg(tmp_path / "fit", "kd"), resume=str(fit.last_checkpoint), allow_config_change=True)


# ------------------------------------------- label-free distillation of a pretrained esvit backbone


@pytest.fixture(scope="module")
def label_free_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A flat folder of images (no classes), a labelled validation folder and the backbone of a 2-step
    ``configs/debug_cpu.yaml`` pretraining run (``backbone.safetensors`` + card, ``checkpoint_last.pt``)."""
    import shutil

    from esvit.config import load_config
    from esvit.data import write_synthetic_image_folder
    from esvit.train.loop import train

    root = tmp_path_factory.mktemp("label_free")
    write_synthetic_image_folder(root / "classes", n_per_class=16, num_classes=2, size=32, seed=0)
    flat = root / "flat"
    flat.mkdir()
    for f in sorted((root / "classes").rglob("*.png")):
        shutil.copy(f, flat / f"{f.parent.name}_{f.name}")
    write_synthetic_image_folder(root / "val", n_per_class=6, num_classes=3, size=32, seed=1)
    cfg = load_config(ROOT / "configs" / "debug_cpu.yaml", [
        "data.synthetic_images=32", "optim.batch_size=16", "model.out_dim=256", "logging.progress=false",
        f"logging.output_dir={root / 'pretrain'}"])
    res = train(cfg, max_steps=2)
    assert res.step == 2
    out = {"flat": flat, "classes": root / "classes", "val": root / "val",
           "safetensors": root / "pretrain" / "backbone.safetensors", "checkpoint": root / "pretrain" / "checkpoint_last.pt"}
    assert out["safetensors"].is_file() and out["checkpoint"].is_file()
    return out


def _label_free_cfg(out: Path, data: Path, teacher: Path, *extra: str):
    """``configs/distill_debug_cpu.yaml`` with a backbone teacher and ``loss.kind=feature`` on a folder:
    32 images, batch 16 (2 steps/epoch, 4 steps)."""
    return load_distill_config(DEBUG, [
        "student.deit=false", "student.backbone_kwargs={image_size: 32, depth: 1}", "loss.kind=feature",
        "teacher.kind=backbone", f"teacher.checkpoint={teacher}", "data.kind=folder", f"data.path={data}",
        "optim.batch_size=16", "logging.progress=false", "logging.log_every=1", f"logging.output_dir={out}", *extra])


def test_label_free_distillation_from_a_backbone_on_a_flat_folder_resumes_exactly(
        tmp_path: Path, label_free_data: dict[str, Path]) -> None:
    from esvit.distill.train import distill
    from esvit.export import load_backbone_info
    from esvit.train import checkpoint as ckpt

    d = label_free_data
    args = (d["flat"], d["safetensors"], f"data.val_path={d['val']}")
    straight = distill(_label_free_cfg(tmp_path / "a", *args))
    assert straight.step == 4 and all(math.isfinite(v) for v in straight.losses)
    r = straight.results
    assert r["teacher"]["kind"] == "backbone" and r["n_train"] == 32 and r["val_source"] == f"folder {d['val']}"
    for part in ("val", "teacher_val"):  # kNN / linear on student_backbone.pt and on the teacher's features
        assert 0 <= r[part]["knn_top1"] <= 100 and 0 <= r[part]["linear_top1"] <= 100
        assert r[part]["n_bank"] == 9 and r[part]["n_query"] == 9
    assert r["val"]["scored"].startswith("student_backbone.pt")
    saved = json.loads((tmp_path / "a" / "distill_results.json").read_text())
    assert saved["val"]["knn_top1"] == r["val"]["knn_top1"]
    info = load_backbone_info(tmp_path / "a" / "student_backbone.pt")
    assert info.name == "vit_nano" and info.net(torch.zeros(1, 3, 32, 32)).shape == (1, 64)
    # exact resume: 2 steps, then 2 more
    first = distill(_label_free_cfg(tmp_path / "b", *args), max_steps=2)
    assert first.step == 2 and first.last_checkpoint is not None
    second = distill(_label_free_cfg(tmp_path / "b", *args), resume="auto")
    assert second.step == 4
    assert max(abs(a - b) for a, b in zip(first.losses + second.losses, straight.losses, strict=True)) <= 1e-6
    a, b = ckpt.safe_load(straight.last_checkpoint), ckpt.safe_load(second.last_checkpoint)
    for part in ("student", "distiller"):
        for k, v in a[part].items():
            assert torch.allclose(v, b[part][k], atol=1e-6), (part, k)
    recs = [rec for rec in _metrics(tmp_path / "b") if "loss" in rec]
    assert [rec["step"] for rec in recs] == [1, 2, 3, 4] and not any("acc" in rec for rec in recs)


def test_label_free_distillation_without_validation_says_so(tmp_path: Path, label_free_data: dict[str, Path]) -> None:
    """A training checkpoint as the teacher, class folders as unlabelled data, no validation set."""
    from esvit.distill.train import distill

    d = label_free_data
    res = distill(_label_free_cfg(tmp_path, d["flat"], d["checkpoint"], "optim.epochs=1"))
    assert res.step == 2 and res.results["val"] is None and "data.val_path" in res.results["val_note"]
    saved = json.loads((tmp_path / "distill_results.json").read_text())
    assert saved["val"] is None and saved["val_source"] == "none"
    assert (tmp_path / "student_backbone.pt").is_file()


def test_label_free_bad_input_is_one_line(tmp_path: Path, label_free_data: dict[str, Path]) -> None:
    from esvit.distill.data import build_splits

    d = label_free_data
    with pytest.raises(ConfigError, match="teacher.kind"):  # a backbone has no logits
        _label_free_cfg(tmp_path, d["flat"], d["safetensors"], "loss.kind=kd")
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        _label_free_cfg(tmp_path, d["flat"], d["safetensors"], "teacher.checkpoint=null")
    kd = load_distill_config(DEBUG, ["student.deit=false", "loss.kind=kd", "data.kind=folder", f"data.path={d['flat']}"])
    with pytest.raises(ValueError, match=r"not labeled.*only loss.kind=feature"):
        build_splits(kd)
    with pytest.raises(ValueError, match="data.val_split"):
        build_splits(_label_free_cfg(tmp_path, d["flat"], d["safetensors"], "data.val_split=2"))
    # labelled class folders are fine too (labels unused); validation classes need not match
    splits = build_splits(_label_free_cfg(tmp_path, d["classes"], d["safetensors"], f"data.val_path={d['val']}"))
    assert splits.labeled and len(splits.train) == 32 and len(splits.val) == 18
