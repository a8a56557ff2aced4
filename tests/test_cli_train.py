"""``esvit-train`` as a command line: overrides anywhere, defaults in --help, listings."""

from __future__ import annotations

from pathlib import Path

import yaml

from esvit.cli.train import build_parser, main


def test_overrides_anywhere_among_the_options(tmp_path: Path, capsys) -> None:
    assert main(["--config", "debug_cpu", "optim.lr=1e-3", "--max-steps", "2", f"logging.output_dir={tmp_path}",
                 "logging.wandb=disabled", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 1e-3 and cfg["logging"]["output_dir"] == str(tmp_path)
    assert main(["--config", "debug_cpu", "optim.lr=1e-3", "--max-steps", "2", f"logging.output_dir={tmp_path}",
                 "logging.wandb=disabled"]) == 0  # today's rejection of this order is gone
    assert "done: 2 steps" in capsys.readouterr().out


def test_help_shows_defaults_and_explains_every_option() -> None:
    parser = build_parser()
    text = parser.format_help()
    assert "(default: None)" in text or "(default:" in text
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_listings(capsys) -> None:
    assert main(["--list-configs"]) == 0
    assert "esvit_swin_tiny_imagenet" in capsys.readouterr().out
    assert main(["--list-backbones"]) == 0
    out = capsys.readouterr().out
    assert "vit_small" in out and "timm/<name>" in out and "_module" not in out


def test_amp_asked_for_on_cpu_is_a_warning(caplog) -> None:
    import torch

    from esvit.run.amp import amp_dtype

    with caplog.at_level("WARNING", logger="esvit.train"):
        assert amp_dtype("bf16", torch.device("cpu")) is None
    assert "optim.amp=bf16 asked for, but the device is cpu" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="esvit.train"):
        assert amp_dtype("auto", torch.device("cpu")) is None
    assert not caplog.text  # auto on CPU is the documented float32, not a surprise


def test_not_a_terminal_gives_plain_periodic_lines(tmp_path: Path, caplog, monkeypatch) -> None:
    """Batch jobs (stderr not a terminal) log step, loss, LR and images/s instead of bar frames."""
    from esvit.config import load_config
    from esvit.run import engine
    from esvit.train.loop import train

    monkeypatch.setattr(engine.PlainProgress.__init__, "__defaults__", (0.0,))  # every log_every step
    cfg = load_config("debug_cpu", [f"logging.output_dir={tmp_path}", "logging.wandb=disabled", "logging.log_every=2"])
    with caplog.at_level("INFO", logger="esvit.run"):
        train(cfg, max_steps=4)
    lines = [r.getMessage() for r in caplog.records if "esvit: step" in r.getMessage()]
    assert lines and all("loss" in m and "lr" in m and "img_s" in m for m in lines)
    assert lines[-1].startswith("esvit: step 4/4 (100%)")


def test_tensorboard_logger_is_optional(tmp_path: Path, monkeypatch) -> None:
    import importlib.util
    import sys
    import types

    import pytest

    from esvit.config import ConfigError, load_config
    from esvit.train.logger import MetricLogger

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match=r"logging.tensorboard: needs the tensorboard package.*esvit\[tensorboard\]"):
            load_config("debug_cpu", ["logging.tensorboard=true"])
    scalars: list[tuple[str, float, int]] = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir: str) -> None:
            self.log_dir = log_dir

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def close(self) -> None:
            scalars.append(("closed", 0.0, 0))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    logger = MetricLogger(tmp_path, "disabled", tensorboard=True)
    logger.log({"loss": 1.5, "lr": 1e-3, "note": "x"}, step=3)
    logger.close()
    assert scalars == [("loss", 1.5, 3), ("lr", 1e-3, 3), ("closed", 0.0, 0)]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_loader_workers_sized_from_the_machine(monkeypatch) -> None:
    import os

    from esvit.config import load_config
    from esvit.run.loader import auto_num_workers

    assert load_config(None).data.num_workers is None  # auto by default
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert auto_num_workers(None) == 8  # capped
    assert auto_num_workers(None, local_world_size=4) == 3  # 16 CPUs / 4 ranks - 1 for the rank itself
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert auto_num_workers(None) == 0 and auto_num_workers(5) == 5  # an explicit value wins


def test_init_weights_from_a_local_file(tmp_path: Path) -> None:
    """model.init_weights: a torchvision-style state dict of the same architecture starts the run."""
    import torch

    from esvit.backbones import build_backbone
    from esvit.config import ConfigError, load_config
    from esvit.train.loop import build_trainer, init_backbone

    ref, _ = build_backbone("vit_nano", depth=2, image_size=32)
    torch.save(ref.state_dict(), tmp_path / "weights.pt")
    cfg = load_config("debug_cpu", [f"model.init_weights={tmp_path / 'weights.pt'}"])
    trainer = build_trainer(cfg, seed=123)
    init_backbone(trainer, cfg)
    for side in (trainer.student, trainer.teacher):
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in side.backbone.net.state_dict().items())
    other, _ = build_backbone("vit_nano", depth=1, image_size=32)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    bad = load_config("debug_cpu", [f"model.init_weights={tmp_path / 'other.pt'}"])
    import pytest

    with pytest.raises(Exception, match="other.pt"):
        init_backbone(build_trainer(bad, seed=0), bad)
    with pytest.raises(ConfigError, match="model.init_weights"):
        load_config("debug_cpu", ["model.init_weights=''"])
