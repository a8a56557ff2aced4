"""Schedules are pure functions of the step; configs validate keys and types."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from esvit.config import ConfigError, config_to_dict, load_config, save_config
from esvit.schedules import Schedules, cosine, warmup_cosine

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_cosine_endpoints_and_midpoint() -> None:
    assert cosine(0, 100, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine(100, 100, 1.0, 0.0) == pytest.approx(0.0)
    assert cosine(50, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine(500, 100, 1.0, 0.0) == pytest.approx(0.0)


def test_warmup_then_cosine() -> None:
    assert warmup_cosine(0, 100, 10, 1.0, 0.0) == 0.0
    assert warmup_cosine(5, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)


def test_official_recipe_schedules() -> None:
    s = Schedules(steps_per_epoch=10, epochs=300, lr=1e-3, warmup_epochs=10, weight_decay=0.04,
                  weight_decay_end=0.4, momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07,
                  warmup_teacher_temp_epochs=30, freeze_last_layer_epochs=1)
    v0, v_end = s.at(0), s.at(s.total_steps)
    assert v0.lr == 0 and s.at(100).lr == pytest.approx(1e-3)
    assert v0.weight_decay == pytest.approx(0.04) and v_end.weight_decay == pytest.approx(0.4)
    assert v0.teacher_momentum == pytest.approx(0.996) and v_end.teacher_momentum == pytest.approx(1.0)
    assert v0.teacher_temp == pytest.approx(0.04) and s.at(300).teacher_temp == pytest.approx(0.07)
    assert s.at(150).teacher_temp == pytest.approx(0.055)
    assert v0.freeze_last_layer and s.at(9).freeze_last_layer and not s.at(10).freeze_last_layer
    assert s.at(1234) == s.at(1234)  # pure: same step, same values


def test_schedule_values_monotone() -> None:
    s = Schedules(steps_per_epoch=7, epochs=5, lr=1.0, warmup_epochs=1)
    wd = [s.at(i).weight_decay for i in range(s.total_steps + 1)]
    mom = [s.at(i).teacher_momentum for i in range(s.total_steps + 1)]
    assert all(b >= a for a, b in zip(wd, wd[1:], strict=False))
    assert all(b >= a for a, b in zip(mom, mom[1:], strict=False))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("distill")))
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.augment.local_size <= cfg.augment.global_size


def test_official_swin_recipe_values() -> None:
    c = load_config(CONFIGS / "esvit_swin_tiny_imagenet.yaml")
    assert (c.augment.global_size, c.augment.local_size, c.augment.n_local) == (224, 96, 8)
    assert c.model.out_dim == 65536 and c.optim.lr == 5e-4 and c.optim.warmup_epochs == 10
    assert (c.optim.weight_decay, c.optim.weight_decay_end) == (0.04, 0.4)
    assert (c.teacher.momentum, c.teacher.momentum_end) == (0.996, 1.0)
    assert (c.teacher.warmup_temp, c.teacher.temp, c.teacher.warmup_temp_epochs) == (0.04, 0.07, 30)
    assert c.optim.freeze_last_layer_epochs == 1 and c.optim.clip_grad == 3.0 and c.optim.epochs == 300


def test_overrides_and_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "debug_cpu.yaml", ["optim.lr=1e-3", "augment.global_scale=[0.25, 1]", "seed=3"])
    assert cfg.optim.lr == 1e-3 and cfg.augment.global_scale == (0.25, 1.0) and cfg.seed == 3
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("bogus.x=1", "bogus"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.epochs=2.5", "optim.epochs"),
        ("model.region_loss=3", "model.region_loss"),
        ("augment.global_size=0", "augment.global_size"),
        ("augment.n_local=-1", "augment.n_local"),
        ("augment.local_size=64", "augment.local_size"),
        ("augment.local_scale=[0.5, 0.1]", "augment.local_scale"),
        ("augment.blur_p=[1.0, 0.1, 1.5]", "augment.blur_p"),
        ("augment.blur_p=[1.0, 0.1]", "augment.blur_p"),
        ("augment.blur_sigma=[2.0, 0.1]", "augment.blur_sigma"),
        ("augment.solarize_p=1.5", "augment.solarize_p"),
        ("optim.amp=fp8", "optim.amp"),
        ("logging.wandb=yes", "logging.wandb"),
        ("optim.batch_size=30", "optim.batch_size"),
        ("noequals", "key=value"),
    ],
)
def test_bad_config_names_key(override: str, message: str) -> None:
    overrides = [override] if override != "optim.batch_size=30" else [override, "optim.accum_steps=4"]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as e:
        load_config(CONFIGS / "debug_cpu.yaml", overrides)
    assert "\n" not in str(e.value)


def test_bad_yaml_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_lr_scaling_rule() -> None:
    from esvit.train.loop import build_schedules

    cfg = load_config(CONFIGS / "debug_cpu.yaml", ["optim.batch_size=512", "optim.warmup_epochs=0"])
    s = build_schedules(cfg, steps_per_epoch=10)
    assert s.at(0).lr == pytest.approx(cfg.optim.lr * 2)
    assert math.isclose(s.at(s.total_steps).lr, cfg.optim.min_lr)


def test_augment_options_reach_the_trainer() -> None:
    from esvit.train.loop import build_trainer

    cfg = load_config(CONFIGS / "debug_cpu.yaml", ["augment.blur_p=[0, 0, 0.25]", "augment.solarize_p=0.5",
                                                   "augment.blur_sigma=[0.2, 1.0]"])
    aug = build_trainer(cfg, seed=0).augment
    assert aug.blur_p == (0.0, 0.0, 0.25) and aug.solarize_p == 0.5 and aug.blur_sigma == (0.2, 1.0)
    for name in ("cifar10_resnet18.yaml", "cifar10_vit_tiny.yaml", "cifar10_vit_nano.yaml"):  # 32 px: no blur
        assert load_config(CONFIGS / name).augment.blur_p == (0.0, 0.0, 0.0)


def test_cifar_benchmarks_train_the_shipped_recipe() -> None:
    """benchmarks/quality_cifar10.py and region_cifar10.py train configs/cifar10_vit_nano.yaml by
    default (no recipe of their own to drift from it), with dotted overrides."""
    import importlib.util
    import sys

    bench_dir = CONFIGS.parent / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        for name in ("quality_cifar10", "region_cifar10"):
            spec = importlib.util.spec_from_file_location(name, bench_dir / f"{name}.py")
            bench = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(bench)
            a = bench.build_parser().parse_args(["--set", "optim.lr=4e-3"])
            assert Path(a.config) == CONFIGS / "cifar10_vit_nano.yaml"
            assert load_config(a.config, a.set).optim.lr == 4e-3
            assert not {"lr", "momentum", "out_dim", "bn_head"} & set(vars(a))
    finally:
        sys.path.remove(str(bench_dir))
