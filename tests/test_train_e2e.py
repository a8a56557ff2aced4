"""End-to-end training runs on the debug config: resume exactness, NaN handling, CLI, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esvit.cli.train import main as train_main
from esvit.config import load_config
from esvit.train import checkpoint as ckpt
from esvit.train.logger import read_metrics
from esvit.train.loop import NonFiniteLossError, train

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.yaml"
FAST = ["data.synthetic_images=64", "optim.batch_size=16", "model.out_dim=256", "logging.progress=false"]


def cfg(tmp_path: Path, *extra: str):
    return load_config(DEBUG, [*FAST, f"logging.output_dir={tmp_path}", *extra])


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    straight = train(cfg(tmp_path / "a"))
    first = train(cfg(tmp_path / "b", "optim.epochs=2"), max_steps=straight.step // 2)
    assert first.last_checkpoint is not None and first.step == straight.step // 2
    second = train(cfg(tmp_path / "b"), resume="auto")
    assert second.step == straight.step == 8
    resumed = first.losses + second.losses
    assert len(resumed) == len(straight.losses)
    assert max(abs(a - b) for a, b in zip(resumed, straight.losses, strict=True)) <= 1e-6
    a = ckpt.safe_load(straight.last_checkpoint)
    b = ckpt.safe_load(second.last_checkpoint)
    for k, v in a["teacher"].items():
        assert torch.allclose(v, b["teacher"][k], atol=1e-6), k
    # the metrics file of the resumed run has each step once
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps == sorted(set(steps))


def test_run_writes_config_metrics_and_checkpoints(tmp_path: Path) -> None:
    res = train(cfg(tmp_path, "checkpoint.keep_last=1"))
    assert (tmp_path / "config.yaml").is_file()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert {"loss", "lr", "teacher_entropy", "images_per_s"} <= set(recs[-1])
    assert ckpt.list_checkpoints(tmp_path) == [res.last_checkpoint]
    state = torch.load(res.last_checkpoint, weights_only=True)
    assert state["step"] == res.step and "optimizer" in state and "rng" in state
    # the standard files a run ends with: the teacher backbone + card, and a last-checkpoint alias
    import json

    from safetensors.torch import load_file

    card = json.loads((tmp_path / "backbone.json").read_text())
    assert card["backbone"] == "vit_nano" and card["weights"] == "backbone.safetensors"
    teacher = {k[len("backbone.net."):]: v for k, v in state["teacher"].items() if k.startswith("backbone.net.")}
    exported = load_file(str(tmp_path / "backbone.safetensors"))
    assert exported.keys() == teacher.keys() and all(torch.equal(exported[k], teacher[k]) for k in teacher)
    assert (tmp_path / "checkpoint_last.pt").read_bytes() == res.last_checkpoint.read_bytes()


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path: Path) -> None:
    train(cfg(tmp_path), max_steps=4)
    with pytest.raises(FileExistsError, match="--resume auto"):
        train(cfg(tmp_path))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    good = train(cfg(tmp_path, "optim.epochs=4"), max_steps=4)
    before = good.last_checkpoint.read_bytes()
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        train(cfg(tmp_path, "optim.epochs=4", "optim.lr=1e30", "optim.warmup_epochs=0", "optim.clip_grad=0"),
              resume="auto", allow_config_change=True)  # the changed LR is accepted explicitly
    assert ckpt.list_checkpoints(tmp_path) == [good.last_checkpoint]
    assert good.last_checkpoint.read_bytes() == before


def test_resume_from_other_architecture_names_keys(tmp_path: Path) -> None:
    train(cfg(tmp_path), max_steps=2)
    with pytest.raises(ckpt.CheckpointError, match="missing keys|unexpected keys|shape mismatches"):
        train(cfg(tmp_path, "model.backbone=cifar_resnet18", "model.backbone_kwargs={}"), resume="auto")


def test_cli_without_data_explains(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert train_main([f"logging.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "debug_cpu.yaml" in err


def test_cli_bad_override_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--config", str(DEBUG), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "optim.lrr" in err and "\n" not in err


def test_cli_debug_config_end_to_end(tmp_path: Path) -> None:
    rc = train_main(["--config", str(DEBUG), "--output-dir", str(tmp_path), *FAST])
    assert rc == 0 and ckpt.list_checkpoints(tmp_path)


def _torchrun(nproc: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train_ssl.py"), "--config", str(DEBUG), *FAST, f"logging.output_dir={out}", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_two_processes_matches_single_process_first_loss(tmp_path: Path) -> None:
    """2 gloo ranks x 8 images and 1 rank x 16 images see the same 16 images at step 1."""
    one = _torchrun(1, tmp_path / "one", "--max-steps", "1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    l1 = read_metrics(tmp_path / "one" / "metrics.jsonl")[0]
    l2 = read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    assert l1["step"] == l2["step"] == 1
    assert abs(l1["loss"] - l2["loss"]) < 1e-4 or pytest.fail(f"{l1['loss']} vs {l2['loss']}")
    assert ckpt.list_checkpoints(tmp_path / "two")


def test_gradient_accumulation_runs_same_number_of_steps(tmp_path: Path) -> None:
    res = train(cfg(tmp_path, "optim.accum_steps=2"))
    assert res.step == 8 and all(map(lambda x: x == x, res.losses))  # no NaN
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert recs[-1]["step"] == 8


def test_knn_monitor_on_labeled_folder(tmp_path: Path) -> None:
    from esvit.data import write_synthetic_image_folder

    write_synthetic_image_folder(tmp_path / "train", n_per_class=8, num_classes=3, size=32, seed=0)
    write_synthetic_image_folder(tmp_path / "val", n_per_class=4, num_classes=3, size=32, seed=1)
    train(cfg(tmp_path / "run", "knn.every_epochs=1", f"knn.train_path={tmp_path / 'train'}",
              f"knn.val_path={tmp_path / 'val'}", "knn.k=5"))
    knn = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "knn_top1" in r]
    assert knn and 0.0 <= knn[0]["knn_top1"] <= 100.0


def test_knn_monitor_bad_folder_fails_before_the_first_step(tmp_path: Path) -> None:
    """A typo in knn.val_path stops the run at start-up, not after the first epoch's compute."""
    from esvit.data import write_synthetic_image_folder

    write_synthetic_image_folder(tmp_path / "train", n_per_class=4, num_classes=2, size=32, seed=0)
    with pytest.raises((FileNotFoundError, ValueError), match="nope"):
        train(cfg(tmp_path / "run", "knn.every_epochs=1", f"knn.train_path={tmp_path / 'train'}",
                  f"knn.val_path={tmp_path / 'nope'}"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "run" / "metrics.jsonl")


def test_knn_preprocess_key_is_checked() -> None:
    from esvit.config import ConfigError, load_config

    assert load_config(None, ["knn.preprocess=dino"]).knn.preprocess == "dino"
    with pytest.raises(ConfigError, match="knn.preprocess"):
        load_config(None, ["knn.preprocess=crop"])


def test_collapse_warnings_reach_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from esvit.train import collapse, loop

    monkeypatch.setattr(collapse, "TOKEN_SIMILARITY", -1.0)  # every step looks collapsed
    monkeypatch.setattr(loop, "CollapseMonitor", functools.partial(collapse.CollapseMonitor, grace_steps=2))
    with caplog.at_level("WARNING", logger="esvit.train"):
        train(cfg(tmp_path / "run"))
    assert "backbone tokens have a mean cosine similarity" in caplog.text
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert {"token_similarity", "region_teacher_entropy", "region_weight"} <= set(rec)


def test_training_on_an_image_folder_with_small_and_odd_images(tmp_path: Path) -> None:
    from PIL import Image

    from esvit.data import write_synthetic_image_folder

    write_synthetic_image_folder(tmp_path / "data" / "a", n_per_class=8, num_classes=2, size=20, seed=0)
    Image.new("L", (5, 7), 128).save(tmp_path / "data" / "gray.png")
    Image.new("RGBA", (40, 30), (1, 2, 3, 100)).save(tmp_path / "data" / "rgba.png")
    res = train(cfg(tmp_path / "run", "data.kind=folder", f"data.path={tmp_path / 'data'}", "optim.batch_size=8",
                    "optim.epochs=1"))
    assert res.step == 18 // 8 and ckpt.list_checkpoints(tmp_path / "run")


def test_missing_or_empty_data_folder_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        rc = train_main(["--config", str(DEBUG), "data.kind=folder", f"data.path={path}",
                         f"logging.output_dir={tmp_path / 'run'}"])
        assert rc == 2
        err = capsys.readouterr().err
        assert str(path) in err and err.startswith("error:")


@pytest.mark.slow
def test_wandb_offline_run_id_survives_resume(tmp_path: Path) -> None:
    first = train(cfg(tmp_path, "logging.wandb=offline"), max_steps=4)
    run_id = ckpt.safe_load(first.last_checkpoint)["wandb_run_id"]
    assert run_id
    second = train(cfg(tmp_path, "logging.wandb=offline"), resume="auto")
    assert ckpt.safe_load(second.last_checkpoint)["wandb_run_id"] == run_id
    assert any(run_id in p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
