"""Every config key of every command has a documented valid range, checked at load time
(issue 13, class 7): finite numbers, sizes that fit each other, values that make training
meaningful, no duplicate YAML keys, and ``docs/config.md`` generated from the same tables."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest

from esvit.config import (
    TRAIN_LINKS,
    TRAIN_RANGES,
    Config,
    ConfigError,
    Rule,
    iter_keys,
    load_config,
    reference_markdown,
)
from esvit.distill.config import DISTILL_LINKS, DISTILL_RANGES, DistillConfig, load_distill_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.yaml"
DISTILL_DEBUG = ROOT / "configs" / "distill_debug_cpu.yaml"
COMMANDS = {"train": (Config, TRAIN_RANGES, TRAIN_LINKS, load_config, DEBUG),
            "distill": (DistillConfig, DISTILL_RANGES, DISTILL_LINKS, load_distill_config, DISTILL_DEBUG)}


def _keys(command: str) -> list[tuple[str, str, Any, Any, Rule]]:
    cls, ranges = COMMANDS[command][:2]
    return [(command, *k) for k in iter_keys(cls(), ranges)]


ALL_KEYS = _keys("train") + _keys("distill")


def _numeric(tp: Any) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_args(tp) else [tp]
    return any(a in (int, float) or typing.get_origin(a) is tuple for a in args) and tp is not bool


def _load(command: str, *overrides: str) -> Any:
    _, _, _, load, base = COMMANDS[command]
    return load(base, list(overrides))


def _fails(command: str, key: str, *overrides: str) -> str:
    """Loading with ``overrides`` raises one line naming ``key``; the message is returned."""
    with pytest.raises(ConfigError) as e:
        _load(command, *overrides)
    msg = str(e.value)
    assert (f" {key}: " in msg or f" {key}[" in msg) and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------- the issue's examples


def test_issue_examples_are_errors(tmp_path: Path) -> None:
    assert "must be a finite number, got inf" in _fails("train", "teacher.student_temp", "teacher.student_temp=inf")
    assert "must be >= 16" in _fails("train", "model.out_dim", "model.out_dim=1")
    p = tmp_path / "dup.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\nmodel:\n  out_dim: 512\noptim:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: invalid YAML at line 5, column 1: duplicate key 'optim' "
                                          r"\(first at line 1\)$"):
        load_config(p)


# ------------------------------------------------------------------------------ the tables


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_key_has_a_rule_and_every_rule_a_key(command: str) -> None:
    cls, ranges = COMMANDS[command][:2]
    assert len(_keys(command)) > 40  # iter_keys (strict) raises KeyError for a key without a rule
    for klass, table in ranges.items():
        hints = typing.get_type_hints(klass)
        leaves = {f.name for f in dataclasses.fields(klass) if not dataclasses.is_dataclass(hints[f.name])}
        assert set(table) == leaves, klass.__name__


@pytest.mark.parametrize(("command", "key", "tp", "default", "rule"), ALL_KEYS, ids=[f"{c}:{k}" for c, k, *_ in ALL_KEYS])
def test_defaults_are_in_range(command: str, key: str, tp: Any, default: Any, rule: Rule) -> None:
    assert rule.accepts(default), (key, default, rule.describe())


def test_shipped_configs_are_in_range() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith("distill"):
            cfg = load_distill_config(path, ["teacher.checkpoint=t.pt"] if "cifar10" in path.name else [])
            assert cfg.optim.lr > 0
        else:
            assert load_config(path).optim.lr > 0


def test_docs_table_matches_the_validator() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    assert doc == reference_markdown(), "docs/config.md is stale: run python -m esvit.config > docs/config.md"
    for _, key, *_ in ALL_KEYS:
        assert f"| `{key}` |" in doc
    assert "[docs/config.md](docs/config.md)" in (ROOT / "README.md").read_text()


# -------------------------------------------------------------------- non-finite numbers


NUMERIC = [k for k in ALL_KEYS if _numeric(k[2])]


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan", ".inf", ".nan"])
@pytest.mark.parametrize(("command", "key", "tp", "default", "rule"), NUMERIC, ids=[f"{c}:{k}" for c, k, *_ in NUMERIC])
def test_non_finite_value_is_rejected_for_every_numeric_key(
    command: str, key: str, tp: Any, default: Any, rule: Rule, bad: str
) -> None:
    value = "[" + ", ".join([bad] * len(default)) + "]" if isinstance(default, tuple) else bad
    assert "finite" in _fails(command, key, f"{key}={value}") or not isinstance(default, (float, tuple))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_non_finite_inside_a_mapping_is_rejected(command: str) -> None:
    key = "model.backbone_kwargs" if command == "train" else "student.backbone_kwargs"
    _fails(command, f"{key}.drop_path_rate", f"{key}.drop_path_rate=.nan")


# ---------------------------------------------------------------------- bounds of every key


def _just_outside(rule: Rule, is_int: bool) -> list[str]:
    """YAML values just outside a number rule's bounds (its open ends included)."""
    if rule.bounds is None:
        return []
    lo, hi, lo_open, hi_open = rule.bounds
    step = 1 if is_int else 1e-3
    outside = [v for v in (lo - step if lo is not None else None, hi + step if hi is not None else None,
                           lo if lo is not None and lo_open else None, hi if hi is not None and hi_open else None)
               if v is not None]
    return [str(int(v)) if is_int else repr(float(v)) for v in outside]


def _is_int(tp: Any) -> bool:
    return tp is int or int in typing.get_args(tp)


BOUNDED = [(c, k, d, r, v) for c, k, tp, d, r in ALL_KEYS for v in _just_outside(r, _is_int(tp))]


@pytest.mark.parametrize(("command", "key", "default", "rule", "value"), BOUNDED,
                         ids=[f"{c}:{k}={v}" for c, k, _, _, v in BOUNDED])
def test_value_just_outside_the_documented_range_is_rejected(
    command: str, key: str, default: Any, rule: Rule, value: str
) -> None:
    msg = _fails(command, key, f"{key}={value}")
    assert rule.describe() in msg


def test_bounded_keys_cover_the_numbers() -> None:
    keys = {k for _, k, *_ in BOUNDED}
    assert {"teacher.student_temp", "teacher.momentum", "optim.batch_size", "augment.solarize_p",
            "loss.kd.temperature", "optim.momentum", "data.synthetic_classes"} <= keys
    assert len(keys) > 60


@pytest.mark.parametrize(("command", "override", "key"), [
    ("train", "augment.global_scale=[0.9, 0.2]", "augment.global_scale"),
    ("train", "augment.local_scale=[0.0, 0.4]", "augment.local_scale"),
    ("train", "augment.local_scale=[0.1, 1.5]", "augment.local_scale"),
    ("train", "augment.blur_sigma=[0.0, 2.0]", "augment.blur_sigma"),
    ("train", "augment.blur_p=[1.0, -0.1, 0.5]", "augment.blur_p"),
    ("train", "data.kind=imagenet", "data.kind"),
    ("train", "data.path=' '", "data.path"),
    ("train", "logging.output_dir=''", "logging.output_dir"),
    ("train", "device=gpu", "device"),
    ("train", "seed=-1", "seed"),
    ("distill", "augment.ratio=[2.0, 1.0]", "augment.ratio"),
    ("distill", "augment.scale=[0.0, 1.0]", "augment.scale"),
    ("distill", "loss.label_smoothing=1.0", "loss.label_smoothing"),
])
def test_pairs_choices_and_strings(command: str, override: str, key: str) -> None:
    _fails(command, key, override)


# ------------------------------------------------------------------- constraints between keys


@pytest.mark.parametrize(("command", "overrides", "key"), [
    ("train", ["augment.local_size=64"], "augment.local_size"),
    ("train", ["optim.warmup_epochs=3"], "optim.warmup_epochs"),
    ("train", ["optim.freeze_last_layer_epochs=5"], "optim.freeze_last_layer_epochs"),
    ("train", ["teacher.warmup_temp_epochs=3"], "teacher.warmup_temp_epochs"),
    ("train", ["model.region_warmup_epochs=3"], "model.region_warmup_epochs"),
    ("train", ["optim.min_lr=1e-3"], "optim.min_lr"),
    ("train", ["optim.batch_size=30", "optim.accum_steps=4"], "optim.batch_size"),
    ("train", ["optim.batch_size=4", "optim.accum_steps=4"], "optim.accum_steps"),
    ("train", ["teacher.momentum=0.999", "teacher.momentum_end=0.99"], "teacher.momentum"),
    ("train", ["teacher.temp=0.2"], "teacher.temp"),
    ("train", ["teacher.warmup_temp=0.1"], "teacher.warmup_temp"),
    ("train", ["knn.every_epochs=1"], "knn.train_path"),
    ("train", ["knn.every_epochs=1", "knn.train_path=/data"], "knn.val_path"),
    ("train", ["model.region_weight=0"], "model.region_weight"),
    ("train", ["knn.k=50", "knn.max_train_images=20"], "knn.k"),
    ("distill", ["optim.warmup_epochs=3"], "optim.warmup_epochs"),
    ("distill", ["optim.min_lr=1.0"], "optim.min_lr"),
    ("distill", ["loss.kind=dkd", "student.deit=false", "loss.dkd.alpha=0", "loss.dkd.beta=0",
                 "loss.dkd.ce_weight=0"], "loss.dkd.ce_weight"),
    ("distill", ["loss.kind=dkd", "student.deit=false", "loss.dkd.warmup_epochs=3"], "loss.dkd.warmup_epochs"),
    ("distill", ["loss.kind=dist", "student.deit=false", "loss.dist.beta=0", "loss.dist.gamma=0",
                 "loss.dist.ce_weight=0"], "loss.dist.ce_weight"),
    ("distill", ["student.deit=false"], "loss.kind"),
    ("distill", ["teacher.kind=none"], "teacher.kind"),
    ("distill", ["teacher.kind=linear"], "teacher.checkpoint"),
    ("distill", ["teacher.random_init=false"], "teacher.weights"),
])
def test_constraints_between_keys(command: str, overrides: list[str], key: str) -> None:
    msg = _fails(command, key, *overrides)
    assert "must be" in msg
    links = COMMANDS[command][2]
    assert any(link.key == key and link.doc in msg for link in links)


def test_constraints_at_their_limit_are_accepted() -> None:
    cfg = _load("train", "augment.local_size=32", "optim.warmup_epochs=2", "teacher.momentum=1.0",
                "teacher.temp=0.099", "optim.batch_size=8", "optim.accum_steps=4")
    assert cfg.augment.local_size == cfg.augment.global_size and cfg.optim.warmup_epochs == cfg.optim.epochs
    assert _load("distill", "optim.warmup_epochs=2").optim.warmup_epochs == 2


# ------------------------------------------------------------------------- duplicate YAML keys


@pytest.mark.parametrize(("text", "key", "line"), [
    ("seed: 1\nseed: 2\n", "seed", 2),
    ("optim:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 2.0e-3\n", "optim.lr", 4),
    ("model:\n  backbone_kwargs: {depth: 2, depth: 3}\n", "model.backbone_kwargs.depth", 2),
    ("augment:\n  global_size: 32\naugment:\n  local_size: 16\n", "augment", 3),
])
def test_duplicate_yaml_keys_name_the_key_the_file_and_the_line(tmp_path: Path, text: str, key: str, line: int
                                                                ) -> None:
    for command, load in (("train", load_config), ("distill", load_distill_config)):
        p = tmp_path / f"{command}.yaml"
        p.write_text(text.replace("model:", "student:") if command == "distill" else text)
        want = key.replace("model.", "student.") if command == "distill" else key
        with pytest.raises(ConfigError) as e:
            load(p)
        msg = str(e.value)
        assert msg.startswith(f"{p}: invalid YAML at line {line},") and f"duplicate key '{want}'" in msg, msg


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    p = tmp_path / "merge.yaml"
    p.write_text("model:\n  backbone_kwargs:\n    <<: {depth: 2, image_size: 32}\n    depth: 3\n")
    assert load_config(p).model.backbone_kwargs == {"depth": 3, "image_size": 32}


def test_duplicate_key_in_an_override_value() -> None:
    with pytest.raises(ConfigError, match="model.backbone_kwargs=.*: duplicate key 'depth'"):
        load_config(DEBUG, ["model.backbone_kwargs={depth: 1, depth: 2}"])
