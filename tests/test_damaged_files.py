"""Damaged, forged and foreign files given to every command (issue 13, class 3).

Every file esvit reads back with ``torch.load`` goes through :func:`esvit.train.checkpoint.safe_load`.
The faults are injected for real: files truncated, emptied, overwritten with random bytes, zips
without a checkpoint, pickles that would run code, checkpoints with fields missing, of the wrong
type, of the wrong shape or NaN, and files of another kind. Where the choice is automatic
(``--resume auto``, the feature cache) the command falls back with a warning; where the user
named the file it stops with one line naming the file (and the field), and never advises loading
unsafely.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from esvit.cli import embed as embed_cli
from esvit.cli import export as export_cli
from esvit.cli import knn as knn_cli
from esvit.cli import linear as linear_cli
from esvit.cli.distill import main as distill_main
from esvit.cli.train import main as train_main
from esvit.config import load_config
from esvit.train import checkpoint as ckpt
from esvit.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.yaml"
DISTILL_DEBUG = ROOT / "configs" / "distill_debug_cpu.yaml"
FAST = ["data.synthetic_images=64", "optim.batch_size=16", "model.out_dim=256", "logging.progress=false",
        "checkpoint.every_steps=1", "checkpoint.keep_last=5"]
DISTILL_FAST = ["data.synthetic_images=48", "optim.epochs=1", "optim.batch_size=16", "logging.progress=false",
                "eval.teacher=false", "checkpoint.every_steps=1", "checkpoint.keep_last=5"]
EVAL = ["--num-workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLIs call ``logging.basicConfig(force=True)``: give every test the root logger back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# ------------------------------------------------------------------------------------ the faults


class _RunsCode:
    """Unpickling this would create ``marker`` (refused by ``weights_only``)."""

    marker = ""

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _zip(dst: Path, files: dict[str, str]) -> None:
    with zipfile.ZipFile(dst, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


# Unreadable files, whatever they claim to be: name -> write(real file, destination).
UNREADABLE: dict[str, Callable[[Path, Path], Any]] = {
    "empty": lambda src, dst: dst.write_bytes(b""),
    "truncated_half": lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]),
    "truncated_tail": lambda src, dst: dst.write_bytes(src.read_bytes()[:-100]),
    "empty_zip": lambda src, dst: _zip(dst, {}),
    "foreign_zip": lambda src, dst: _zip(dst, {"notes.txt": "hello"}),
    "random_bytes": lambda src, dst: dst.write_bytes(random.Random(0).randbytes(4096)),
    "text": lambda src, dst: dst.write_text("not a checkpoint\n"),
    "pickle_runs_code": lambda src, dst: torch.save({**ckpt.safe_load(src), "payload": _RunsCode()}, dst),
    "pickle_foreign_class": lambda src, dst: torch.save({"args": argparse.Namespace(lr=1.0)}, dst),
    "not_a_dict": lambda src, dst: torch.save([torch.zeros(3)], dst),
}


def _first_float(state: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)


def _nan(state: dict[str, Any], field: str) -> None:
    k = _first_float(state[field])
    state[field][k] = torch.full_like(state[field][k], float("nan"))


def _reshape(state: dict[str, Any], field: str) -> None:
    k = _first_float(state[field])
    state[field][k] = torch.zeros(1)


def _edit(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def apply(state: dict[str, Any]) -> dict[str, Any]:
        fn(state)
        return state

    return apply


# Forged training checkpoints: name -> (edit of a real checkpoint, text the error must contain).
TRAINING_FORGERIES: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "missing_view_center": (_edit(lambda s: s.pop("view_center")), "'view_center'"),
    "missing_optimizer": (_edit(lambda s: s.pop("optimizer")), "'optimizer'"),
    "step_is_text": (_edit(lambda s: s.update(step="ten")), "'step'"),
    "student_is_a_list": (_edit(lambda s: s.update(student=[1, 2])), "'student'"),
    "config_is_a_number": (_edit(lambda s: s.update(config=3)), "'config'"),
    "backbone_kwargs_is_a_list": (_edit(lambda s: s["config"]["model"].update(backbone_kwargs=[1])),
                                  "'config.model.backbone_kwargs'"),
    "tensor_is_text": (_edit(lambda s: s["teacher"].update({_first_float(s["teacher"]): "x"})), "'teacher'"),
    "nan_teacher": (_edit(lambda s: _nan(s, "teacher")), "teacher"),
    "teacher_wrong_shape": (_edit(lambda s: _reshape(s, "teacher")), "teacher"),
}


def _forge(src: Path, dst: Path, fault: str) -> Path:
    """Write ``dst``: the real file ``src`` damaged by ``fault`` (a key of the tables above)."""
    if fault in UNREADABLE:
        UNREADABLE[fault](src, dst)
    else:
        torch.save(TRAINING_FORGERIES[fault][0](ckpt.safe_load(src)), dst)
    return dst


def _one_line_error(rc: int, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The command failed with exit code 2 and one ``error:`` line holding every needle."""
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, err
    last = err[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), (needles, last)
    assert "weights_only" not in last and "Traceback" not in "\n".join(err)
    return last


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretraining run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("run")
    train(load_config(DEBUG, [*FAST, f"logging.output_dir={out}"]), max_steps=2)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint_00000001.pt", "checkpoint_00000002.pt"]
    return out


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny distillation run (DeiT student, random torchvision teacher), a checkpoint per step."""
    out = tmp_path_factory.mktemp("distill")
    assert _distill(out) == 0
    assert len(ckpt.list_checkpoints(out)) >= 2
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Labeled folders: train (2 classes x 4) and val (2 x 2)."""
    root = tmp_path_factory.mktemp("images")
    for split, n in (("train", 4), ("val", 2)):
        for c, color in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), tuple(v + 10 * i for v in color)).save(root / split / c / f"{i}.png")
    return {"train": root / "train", "val": root / "val"}


def _distill(out: Path, *overrides: str, resume: str | Path | None = None) -> int:
    """``esvit-distill`` on the debug config (overrides first: argparse wants them together)."""
    argv = ["--config", str(DISTILL_DEBUG), *DISTILL_FAST, *overrides, "--output-dir", str(out)]
    return distill_main(argv + (["--resume", str(resume)] if resume is not None else []))


def _copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def _commands(path: Path, images: dict[str, Path], out: Path) -> dict[str, Callable[[], int]]:
    """Every command given ``path`` as the checkpoint the user named."""
    common = ["--checkpoint", str(path), *EVAL]
    split = ["--train", str(images["train"]), "--val", str(images["val"])]
    return {
        "esvit-export": lambda: export_cli.main(["--checkpoint", str(path), "--out", str(out / "exp.pt")]),
        "esvit-knn": lambda: knn_cli.main([*common, *split, "--ks", "3", "--output-dir", str(out / "knn")]),
        "esvit-linear": lambda: linear_cli.main([*common, *split, "--output-dir", str(out / "lin")]),
        "esvit-embed": lambda: embed_cli.main([*common, "--input", str(images["val"]), "--out", str(out / "emb")]),
        "esvit-train --resume": lambda: train_main(["--config", str(DEBUG), *FAST, "--output-dir", str(out / "t"),
                                                    "--resume", str(path)]),
        "esvit-distill teacher": lambda: _distill(out / "d", "teacher.kind=linear", "loss.kind=kd",
                                                  "student.deit=false", f"teacher.checkpoint={path}"),
        "esvit-distill init": lambda: _distill(out / "i", f"student.init_checkpoint={path}"),
    }


# ---------------------------------------------------------------------- explicit path: an error


@pytest.mark.parametrize("fault", sorted(UNREADABLE))
def test_unreadable_file_is_a_one_line_error_in_every_command(
    fault: str, run: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _RunsCode.marker = str(tmp_path / "PWNED")
    bad = _forge(ckpt.list_checkpoints(run)[-1], tmp_path / "bad.pt", fault)
    for name, command in _commands(bad, images, tmp_path).items():
        line = _one_line_error(command(), capsys, str(bad))
        assert "cannot load checkpoint" in line, (name, line)
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "exp.pt").exists()


@pytest.mark.parametrize("fault", sorted(TRAINING_FORGERIES))
def test_forged_checkpoint_names_the_file_and_the_field(
    fault: str, run: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _forge(ckpt.list_checkpoints(run)[-1], tmp_path / "forged.pt", fault)
    field = TRAINING_FORGERIES[fault][1]
    commands = _commands(bad, images, tmp_path)
    _one_line_error(commands["esvit-train --resume"](), capsys, str(bad), field)
    if fault.startswith("missing_"):  # fields a weights-only reader does not need: it still works
        assert commands["esvit-export"]() == 0
        return
    for name in ("esvit-export", "esvit-knn", "esvit-embed"):
        _one_line_error(commands[name](), capsys, str(bad), field)


# ---------------------------------------------------------------- automatic choice: a fallback


@pytest.mark.parametrize("fault", sorted(UNREADABLE) + sorted(TRAINING_FORGERIES))
def test_load_latest_falls_back_past_a_damaged_newest_checkpoint(
    fault: str, run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = _copy_run(run, tmp_path / "run")
    older, newest = ckpt.list_checkpoints(out)
    _forge(newest, newest, fault)
    with caplog.at_level(logging.WARNING, logger="esvit.checkpoint"):
        path, state = ckpt.load_latest(out, kinds="training")
    assert path == older and state["step"] == 1
    assert any(newest.name in r.getMessage() for r in caplog.records)
    _forge(older, older, fault)  # none left: one error listing both
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint") as e:
        ckpt.load_latest(out, kinds="training")
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


@pytest.mark.parametrize("fault", ["empty", "truncated_tail", "missing_view_center", "nan_teacher"])
def test_train_resume_auto_continues_from_the_newest_readable_checkpoint(
    fault: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy_run(run, tmp_path / "run")
    newest = ckpt.list_checkpoints(out)[-1]
    _forge(newest, newest, fault)
    rc = train_main(["--config", str(DEBUG), *FAST, "--output-dir", str(out), "--resume", "auto", "--max-steps", "3"])
    captured = capsys.readouterr()
    assert rc == 0 and "done: 3 steps" in captured.out
    warning = [line for line in captured.err.splitlines() if "WARNING" in line and newest.name in line]
    assert warning and "skipping" in warning[0] and "weights_only" not in captured.err
    assert ckpt.load_checkpoint(newest, "training")["step"] == 2  # step 2 trained again, file replaced


def test_distill_resume_auto_falls_back_and_explicit_is_an_error(
    distill_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy_run(distill_run, tmp_path / "run")
    *_, older, newest = ckpt.list_checkpoints(out)
    _forge(newest, newest, "empty")
    path, state = ckpt.load_latest(out, kinds="distill")
    assert path == older and state["format"] == "esvit-distill"
    rc = _distill(out, resume="auto")
    err = capsys.readouterr().err
    assert rc == 0 and any("WARNING" in line and newest.name in line for line in err.splitlines())
    bad = _forge(older, tmp_path / "bad.pt", "truncated_half")
    rc = _distill(tmp_path / "d2", resume=bad)
    _one_line_error(rc, capsys, str(bad), "cannot load checkpoint")


# ---------------------------------------------------------------------- files of another kind


def test_file_of_another_kind_says_what_it_is(
    run: Path, distill_run: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    distill_ckpt = ckpt.list_checkpoints(distill_run)[-1]
    for path in (distill_ckpt, distill_run / "student.pt", distill_run / "student_vit.pt"):
        commands = _commands(path, images, tmp_path)
        _one_line_error(commands["esvit-knn"](), capsys, str(path), "esvit-distill", "student_backbone.pt")
        _one_line_error(commands["esvit-export"](), capsys, str(path), "not a backbone")
    # the student's backbone, exported by esvit-distill, is what knn wants
    assert _commands(distill_run / "student_backbone.pt", images, tmp_path)["esvit-export"]() == 0
    capsys.readouterr()
    _one_line_error(_commands(distill_ckpt, images, tmp_path)["esvit-train --resume"](), capsys, str(distill_ckpt))
    train_ckpt = ckpt.list_checkpoints(run)[-1]
    with pytest.raises(ckpt.CheckpointError, match="is an esvit-train checkpoint, expected an esvit-distill"):
        ckpt.load_checkpoint(train_ckpt, "distill")
    rc = _distill(tmp_path / "d", resume=train_ckpt)
    _one_line_error(rc, capsys, str(train_ckpt))
    rc = _distill(tmp_path / "c", "teacher.kind=classifier", f"teacher.checkpoint={train_ckpt}")
    _one_line_error(rc, capsys, str(train_ckpt))


def test_forged_distill_classifier_names_the_field(
    distill_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = ckpt.safe_load(distill_run / "student.pt")
    forged["num_classes"] = "ten"
    torch.save(forged, tmp_path / "student.pt")
    rc = _distill(tmp_path / "c", "teacher.kind=classifier", f"teacher.checkpoint={tmp_path / 'student.pt'}")
    _one_line_error(rc, capsys, "student.pt", "'num_classes'")
    del forged["backbone"]
    torch.save(forged, tmp_path / "student.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"student\.pt: field '(backbone|num_classes)'"):
        ckpt.safe_load(tmp_path / "student.pt")


# ----------------------------------------------------------------------------- feature cache


@pytest.mark.parametrize("fault", ["empty", "truncated_half", "random_bytes", "features_wrong_shape",
                                   "features_nan", "labels_float", "other_kind"])
def test_damaged_feature_cache_is_recomputed(
    fault: str, run: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = ckpt.list_checkpoints(run)[-1]
    argv = ["--checkpoint", str(checkpoint), *EVAL, "--train", str(images["train"]), "--val", str(images["val"]),
            "--ks", "3", "--output-dir", str(tmp_path / "knn")]
    assert knn_cli.main(argv) == 0
    first = json.loads((tmp_path / "knn" / "knn_results.json").read_text())["knn"]
    caches = sorted((tmp_path / "knn" / "features").glob("*.pt"))
    assert len(caches) == 2  # train and val
    for cache in caches:
        if fault in UNREADABLE:
            _forge(cache, cache, fault)
            continue
        obj = ckpt.safe_load(cache)
        if fault == "features_wrong_shape":
            obj["features"] = obj["features"][:, :1].T.contiguous()
        elif fault == "features_nan":
            obj["features"][0, 0] = float("nan")
        elif fault == "labels_float":
            obj["labels"] = obj["labels"].float()
        else:
            obj = {"key": obj["key"], "logits": obj["features"]}
        torch.save(obj, cache)
    capsys.readouterr()
    assert knn_cli.main(argv) == 0
    assert json.loads((tmp_path / "knn" / "knn_results.json").read_text())["knn"] == first
    warned = [line for line in capsys.readouterr().err.splitlines() if "unusable feature cache" in line]
    assert len(warned) == len(caches) and all("weights_only" not in w for w in warned)
    for cache in caches:  # rewritten intact
        assert ckpt.load_checkpoint(cache, "feature_cache")["features"].isfinite().all()


# ----------------------------------------------------------------------------------- the API


def test_every_file_esvit_writes_is_identified(run: Path, distill_run: Path, tmp_path: Path) -> None:
    from esvit.distill.train import CHECKPOINT_FORMAT, CLASSIFIER_FORMAT, PLAIN_VIT_FORMAT
    from esvit.export import EXPORT_FORMAT, export_backbone

    assert ckpt.FORMAT_KINDS == {EXPORT_FORMAT: "export", CHECKPOINT_FORMAT: "distill",
                                 CLASSIFIER_FORMAT: "classifier", PLAIN_VIT_FORMAT: "plain_vit"}
    export_backbone(ckpt.list_checkpoints(run)[-1], tmp_path / "bb.pt")  # a plain state dict + JSON card
    assert ckpt.identify(ckpt.safe_load(tmp_path / "bb.pt")) == "state_dict"
    found = {
        "training": ckpt.list_checkpoints(run)[-1], "distill": ckpt.list_checkpoints(distill_run)[-1],
        "classifier": distill_run / "student.pt", "plain_vit": distill_run / "student_vit.pt",
        "export": distill_run / "student_backbone.pt",  # the single-file export format
    }
    for kind, path in found.items():
        assert ckpt.identify(ckpt.load_checkpoint(path, kind)) == kind
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "bare.pt")
    assert ckpt.identify(ckpt.safe_load(tmp_path / "bare.pt")) == "state_dict"
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"foreign\.pt is not an esvit file"):
        ckpt.load_checkpoint(tmp_path / "foreign.pt", "training")


def test_load_resume_explicit_and_check(run: Path, tmp_path: Path) -> None:
    newest = ckpt.list_checkpoints(run)[-1]
    assert ckpt.load_resume(str(newest), tmp_path)[0] == newest
    assert ckpt.load_resume("auto", tmp_path / "empty") is None

    def refuse(state: dict[str, Any], path: Path) -> None:
        if state["step"] == 2:
            raise ckpt.CheckpointError(f"{path}: does not fit")

    assert ckpt.load_resume("auto", run, "training", refuse)[1]["step"] == 1  # fallback
    with pytest.raises(ckpt.CheckpointError, match="does not fit"):
        ckpt.load_resume(str(newest), run, "training", refuse)


def test_state_and_optimizer_checks_name_what_does_not_fit() -> None:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.zeros(1, 3)).sum().backward()
    opt.step()
    good = opt.state_dict()
    ckpt.check_optimizer_state(opt, good, "opt")
    bad = {**good, "state": {0: {**good["state"][0], "exp_avg": torch.zeros(5)}}}
    with pytest.raises(ckpt.CheckpointError, match="exp_avg.*shape"):
        ckpt.check_optimizer_state(opt, bad, "opt")
    with pytest.raises(ckpt.CheckpointError, match="parameter groups"):
        ckpt.check_optimizer_state(opt, {"state": {}, "param_groups": []}, "opt")
    with pytest.raises(ckpt.CheckpointError, match="non-tensor values"):
        ckpt.check_state_dict(net, {"weight": "x", "bias": torch.zeros(2)}, "sd")
    with pytest.raises(ckpt.CheckpointError, match=r"non-finite .*first: bias"):
        ckpt.check_state_dict(net, {"weight": torch.zeros(2, 3), "bias": torch.tensor([0.0, float("inf")])}, "sd")
    with pytest.raises(ckpt.CheckpointError, match="must be a state dict"):
        ckpt.check_state_dict(net, [1, 2], "sd")


def test_a_directory_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="is a directory"):
        ckpt.safe_load(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ckpt.safe_load(tmp_path / "nope.pt")
    os.mkfifo(tmp_path / "fifo.pt")  # never opened: reading a FIFO could block forever
    with pytest.raises(ckpt.CheckpointError, match="not a regular file"):
        ckpt.safe_load(tmp_path / "fifo.pt")
