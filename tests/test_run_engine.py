"""The run engine (``esvit.run``) under injected faults, in-process and fast.

Each test injects one fault for real and checks what the run does about it:

* preemption: a real SIGTERM / SIGINT / SIGUSR1 sent to this process in the middle of a run
  (``esvit-train`` and ``esvit-distill``): the step finishes, a checkpoint is written, the run
  stops with ``Preempted`` (CLI: one ``stopped:`` line, exit code ``128 + signal``) and
  ``--resume auto`` reproduces the uninterrupted run's losses;
* concurrent runs: the output directory's lock, held by this or a forked-then-SIGKILLed process;
* resume that would change the run: refused with the list of differences, accepted (and logged)
  with ``allow_config_change``, ``config.yaml`` never overwritten; older checkpoints warn;
* disk and paths: ENOSPC in the middle of a checkpoint, a metrics line and the config file,
  an over-long, read-only or impossible output path, all before any data is scanned;
* hangs: a decode worker stuck forever becomes a one-line error within the loader timeout.

The multi-process variants (other processes, torchrun) are in ``tests/test_preemption.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from esvit.cli.distill import main as distill_main
from esvit.cli.train import main as train_main
from esvit.config import load_config
from esvit.distill import load_distill_config
from esvit.distill.train import distill
from esvit.run.errors import (
    LoaderStalledError,
    OutputDirError,
    Preempted,
    ResumeMismatchError,
    RunLockedError,
)
from esvit.run.fsio import LineAppender, atomic_write_text
from esvit.run.lock import LOCK_NAME, OutputLock
from esvit.run.resume import compare_runs
from esvit.train import checkpoint as ckpt
from esvit.train import loop
from esvit.train.logger import read_metrics
from esvit.train.loop import train
from esvit.trainer import EsViTTrainer

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.yaml"
DISTILL_DEBUG = ROOT / "configs" / "distill_debug_cpu.yaml"
FAST = ["data.synthetic_images=64", "optim.batch_size=16", "model.out_dim=256", "logging.progress=false",
        "logging.log_every=1"]
STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]


def cfg(out: Path, *extra: str):
    """Debug pretraining config (vit_nano, 4 steps/epoch, 8 steps) writing to ``out``."""
    return load_config(DEBUG, [*FAST, f"logging.output_dir={out}", *extra])


def dcfg(out: Path, *extra: str):
    """Debug distillation config (3 steps/epoch, 6 steps) writing to ``out``."""
    return load_distill_config(DISTILL_DEBUG, ["data.synthetic_images=48", "optim.batch_size=16", "eval.teacher=false",
                                               "logging.progress=false", "logging.log_every=1",
                                               f"logging.output_dir={out}", *extra])


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI calls ``logging.basicConfig(force=True)``: give every test the root logger back.

    Handlers an earlier test's CLI call left on a closed (captured) stream are dropped first.
    """
    root = logging.getLogger()
    for h in root.handlers[:]:
        if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
            root.removeHandler(h)
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Per-step losses of an uninterrupted 8-step pretraining run (the reference)."""
    return train(cfg(tmp_path_factory.mktemp("straight"))).losses


@pytest.fixture(scope="module")
def straight_distill(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Per-step losses of an uninterrupted 6-step distillation run."""
    return distill(dcfg(tmp_path_factory.mktemp("straight_distill"))).losses


def _logged_losses(out: Path) -> list[float]:
    recs = read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)), steps  # each step logged once, in order
    return [r["loss"] for r in recs if "loss" in r]


def _signal_at_update(monkeypatch: pytest.MonkeyPatch, signum: int, at: int) -> None:
    """Send ``signum`` to this process during the ``at``-th teacher update (inside step ``at``)."""
    real = EsViTTrainer.update_teacher
    calls = {"n": 0}

    def update(self, momentum):
        real(self, momentum)
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(EsViTTrainer, "update_teacher", update)


def _never_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the run gets as far as building the data set."""
    def boom(*args, **kwargs):
        raise AssertionError("the data set was built before the output directory was checked")

    monkeypatch.setattr(loop, "build_dataset", boom)


# ------------------------------------------------------------------------------- 1. preemption


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_stop_signal_finishes_the_step_checkpoints_and_resume_is_exact(
    tmp_path: Path, straight: list[float], monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    before = signal.getsignal(signum)
    _signal_at_update(monkeypatch, signum, at=3)
    with pytest.raises(Preempted) as err:
        train(cfg(tmp_path))
    assert err.value.step == 3 and err.value.exit_code == 128 + signum
    assert err.value.checkpoint == ckpt.checkpoint_path(tmp_path, 3)
    assert f"{signal.Signals(signum).name} received: stopped after step 3" in str(err.value)
    assert signal.getsignal(signum) is before  # the run's handlers are gone
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000003.pt"]
    monkeypatch.undo()
    res = train(cfg(tmp_path), resume="auto")
    assert res.step == 8 and len(res.losses) == 5
    assert np.array_equal(_logged_losses(tmp_path), straight)  # bit-identical to the uninterrupted run


def test_cli_stop_signal_is_one_line_and_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _signal_at_update(monkeypatch, signal.SIGTERM, at=2)
    rc = train_main(["--config", str(DEBUG), *FAST, f"logging.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 143
    assert err[-1].startswith("stopped: SIGTERM received: stopped after step 2") and "--resume auto" in err[-1]
    assert not any("Traceback" in ln for ln in err)


def test_distill_stop_signal_then_resume_is_exact(tmp_path: Path, straight_distill: list[float],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from esvit.distill.augment import TrainAugment

    real, calls = TrainAugment.__call__, {"n": 0}

    def augment(self, images):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, images)

    monkeypatch.setattr(TrainAugment, "__call__", augment)
    argv = ["--config", str(DISTILL_DEBUG), "data.synthetic_images=48", "optim.batch_size=16", "eval.teacher=false",
            "logging.progress=false", "logging.log_every=1", f"logging.output_dir={tmp_path}"]
    assert distill_main(argv) == 138
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("stopped: SIGUSR1 received: stopped after step 4")
    assert not (tmp_path / "distill_results.json").exists()  # the final report waits for the resume
    monkeypatch.undo()
    assert distill_main([*argv, "--resume", "auto"]) == 0
    assert np.array_equal(_logged_losses(tmp_path), straight_distill)
    assert (tmp_path / "distill_results.json").is_file()


# ------------------------------------------------------------------------------ 2. concurrent runs


def test_lock_names_the_holder_and_is_released(tmp_path: Path) -> None:
    first = OutputLock(tmp_path, "esvit-train")
    assert first.acquire()
    text = (tmp_path / LOCK_NAME).read_text()
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in text
    with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {os.getpid()} on host "):
        OutputLock(tmp_path).acquire()  # a second open file: refused even within one process
    first.release()
    with OutputLock(tmp_path):  # free again
        pass


def test_run_in_a_locked_directory_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    train(cfg(tmp_path), max_steps=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    _never_scan(monkeypatch)
    with OutputLock(tmp_path, "esvit-train"):
        for extra in ([], ["--resume", "auto"]):  # fresh or resuming: both refused
            rc = train_main(["--config", str(DEBUG), *FAST, f"logging.output_dir={tmp_path}", *extra])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 75 and len(err) == 1, err
            assert err[0].startswith("error: ") and f"pid {os.getpid()} on host {socket.gethostname()}" in err[0]
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != LOCK_NAME}
    assert after == {k: v for k, v in before.items() if k != LOCK_NAME}  # nothing touched


HOLDER = r"""
import os, signal, sys, time
from esvit.run.lock import OutputLock
lock = OutputLock(sys.argv[1], "holder")
assert lock.acquire()
child = os.fork()
if child == 0:          # a forked child (as a DataLoader worker) outlives its parent
    os.close(1)
    os.close(2)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkilled_holder_leaves_no_stale_lock_even_with_live_children(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr
    child = int(res.stdout.split()[0])
    try:
        assert Path(f"/proc/{child}").exists()  # the forked child still runs ...
        lock = OutputLock(tmp_path)
        assert lock.acquire()  # ... yet the dead holder's lock is free
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------------ 4. resume changes the run


def test_resume_with_another_batch_size_is_refused_with_the_differences(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    train(cfg(tmp_path), max_steps=4)
    config = (tmp_path / "config.yaml").read_bytes()
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ResumeMismatchError) as err:
        train(cfg(tmp_path, "optim.batch_size=32"), resume="auto")
    msg = str(err.value)
    for diff in ("optim.batch_size: 16 -> 32", "run.global_batch: 16 -> 32", "run.steps_per_epoch: 4 -> 2",
                 "run.total_steps: 8 -> 4", "run.micro_batch: 16 -> 32", "--allow-config-change"):
        assert diff in msg, msg
    assert (tmp_path / "config.yaml").read_bytes() == config and (tmp_path / "metrics.jsonl").read_bytes() == metrics
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000004.pt"]
    rc = train_main(["--config", str(DEBUG), *FAST, "optim.lr=1e-3", f"logging.output_dir={tmp_path}",
                     "--resume", "auto"])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err_lines[-1].startswith("error: resuming from") and "optim.lr: 0.0005 -> 0.001" in err_lines[-1]


def test_accepted_config_change_is_logged_and_keeps_the_config_history(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train(cfg(tmp_path), max_steps=4)
    first = (tmp_path / "config.yaml").read_bytes()
    caplog.set_level(logging.WARNING)
    res = train(cfg(tmp_path, "optim.lr=1e-3"), resume="auto", allow_config_change=True)
    assert res.step == 8
    assert any("accepted by --allow-config-change" in r.getMessage() and "optim.lr: 0.0005 -> 0.001" in r.getMessage()
               for r in caplog.records)
    assert (tmp_path / "config.yaml").read_bytes() == first  # never overwritten
    assert "lr: 0.001" in (tmp_path / "config.resume-1.yaml").read_text()
    train(cfg(tmp_path, "optim.lr=1e-3"), resume="auto", allow_config_change=True)  # the same again
    assert not (tmp_path / "config.resume-2.yaml").exists()
    train(cfg(tmp_path, "optim.lr=1e-3", "optim.epochs=3"), resume="auto", allow_config_change=True)
    assert (tmp_path / "config.resume-2.yaml").is_file() and (tmp_path / "config.yaml").read_bytes() == first


def test_fresh_start_after_a_failed_attempt_keeps_its_config(tmp_path: Path) -> None:
    from esvit.run.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):  # dies at step 1, before any checkpoint
        train(cfg(tmp_path, "optim.lr=1e30", "optim.warmup_epochs=0", "optim.clip_grad=0"))
    assert not ckpt.list_checkpoints(tmp_path)
    train(cfg(tmp_path), max_steps=1)  # a fresh run may start there: no checkpoint to continue
    assert "lr: 1.0e+30" in (tmp_path / "config.previous-1.yaml").read_text()
    assert "lr: 0.0005" in (tmp_path / "config.yaml").read_text()


def test_changed_data_set_is_refused_and_a_moved_one_accepted(tmp_path: Path) -> None:
    from esvit.data import write_synthetic_image_folder

    data = write_synthetic_image_folder(tmp_path / "data", n_per_class=10, num_classes=2, size=32, seed=0)
    extra = ("data.kind=folder", "data.canvas_size=32", "optim.batch_size=8")
    train(cfg(tmp_path / "run", *extra, f"data.path={data}"), max_steps=2)
    moved = tmp_path / "moved"
    data.rename(moved)
    res = train(cfg(tmp_path / "run", *extra, f"data.path={moved}"), resume="auto", max_steps=3)
    assert res.step == 3  # same files in another folder: the same data set
    (moved / "class_0" / "extra.png").write_bytes((moved / "class_1" / next(iter(sorted(
        os.listdir(moved / "class_1"))))).read_bytes())
    with pytest.raises(ResumeMismatchError, match=r"run\.dataset_sha256: .*run\.dataset_size: 20 -> 21"):
        train(cfg(tmp_path / "run", *extra, f"data.path={moved}"), resume="auto")


def test_older_checkpoint_without_the_record_warns_instead_of_refusing(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    last = train(cfg(tmp_path), max_steps=4).last_checkpoint
    state = ckpt.safe_load(last)
    del state["run"]  # written before run facts were recorded ...
    for key in ("resize_mode", "canvas_size"):  # ... and before these data keys existed
        del state["config"]["data"][key]
    torch.save(state, last)
    caplog.set_level(logging.WARNING)
    res = train(cfg(tmp_path), resume="auto")
    assert res.step == 8
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "does not record" in warned and "data.resize_mode (now 'letterbox')" in warned
    assert "run.steps_per_epoch" in warned


def test_distill_resume_with_another_loss_is_refused(tmp_path: Path) -> None:
    distill(dcfg(tmp_path), max_steps=2)
    with pytest.raises(ResumeMismatchError, match=r"loss\.deit\.alpha: 0\.5 -> 0\.9"):
        distill(dcfg(tmp_path, "loss.deit.alpha=0.9"), resume="auto")


def test_compare_runs_ignores_free_keys_and_names_unknown_ones() -> None:
    saved = {"optim": {"lr": 1.0, "batch_size": 8}, "logging": {"log_every": 1}, "data": {"path": "/a"}}
    now = {"optim": {"lr": 1.0, "batch_size": 8}, "logging": {"log_every": 5}, "data": {"path": "/b", "new": 3}}
    cmp = compare_runs(saved, {"world_size": 2}, now, {"world_size": 1}, free=("logging", "data.path"))
    assert cmp.changed == ["run.world_size: 2 -> 1"]
    assert cmp.unknown == ["data.new (now 3)"] and cmp.dropped == []


# -------------------------------------------------------------------------------- 5. disk and paths


class FullDisk:
    """``os.write`` fails with ENOSPC for files whose name contains ``match`` once ``free`` bytes are used.

    The failing write first writes what still fits (a short write), as a full file system does.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.match: str | None = None
        self.free = 0
        self.hits = 0
        self._real = os.write
        monkeypatch.setattr(os, "write", self._write)

    def arm(self, match: str, free: int = 0) -> None:
        self.match, self.free = match, free

    def _write(self, fd: int, data) -> int:
        if self.match is not None:
            try:
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                name = ""
            if self.match in name:
                self.hits += 1
                if self.free <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                n = self._real(fd, bytes(memoryview(data).cast("B")[: self.free]))
                self.free -= n
                return n
        return self._real(fd, data)


def test_disk_full_during_a_checkpoint_keeps_the_previous_ones(tmp_path: Path, straight: list[float],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    disk = FullDisk(monkeypatch)
    real = EsViTTrainer.update_teacher
    calls = {"n": 0}

    def update(self, momentum):
        real(self, momentum)
        calls["n"] += 1
        if calls["n"] == 3:
            disk.arm("checkpoint_00000003", free=100_000)  # the step-3 checkpoint fills the disk

    monkeypatch.setattr(EsViTTrainer, "update_teacher", update)
    with pytest.raises(OutputDirError) as err:
        train(cfg(tmp_path, "checkpoint.every_steps=1"))
    path = ckpt.checkpoint_path(tmp_path, 3)
    assert str(err.value) == f"cannot write checkpoint {path}: OSError: [Errno 28] No space left on device"
    assert disk.hits >= 2  # a short write, then ENOSPC
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000001.pt", "checkpoint_00000002.pt"]
    for p in ckpt.list_checkpoints(tmp_path):
        torch.load(p, weights_only=True)
    assert not list(tmp_path.glob(".checkpoint_*.tmp"))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    monkeypatch.undo()  # space freed
    train(cfg(tmp_path, "checkpoint.every_steps=1"), resume="auto")
    assert np.array_equal(_logged_losses(tmp_path), straight)


def test_disk_full_while_appending_metrics_leaves_whole_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    disk = FullDisk(monkeypatch)
    real = EsViTTrainer.update_teacher
    calls = {"n": 0}

    def update(self, momentum):
        real(self, momentum)
        calls["n"] += 1
        if calls["n"] == 3:
            disk.arm("metrics.jsonl", free=25)  # the step-3 record is cut after 25 bytes

    monkeypatch.setattr(EsViTTrainer, "update_teacher", update)
    rc = train_main(["--config", str(DEBUG), *FAST, "checkpoint.every_steps=1", f"logging.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 74 and not any("Traceback" in ln for ln in err)
    assert err[-1] == (f"error: cannot append to metrics file {tmp_path / 'metrics.jsonl'}: "
                       "OSError: [Errno 28] No space left on device")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2]  # no torn third line
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000001.pt", "checkpoint_00000002.pt"]


def test_disk_full_while_writing_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FullDisk(monkeypatch).arm("config.yaml", free=10)
    with pytest.raises(OutputDirError, match=r"cannot write config .*config\.yaml: OSError: \[Errno 28\] No space"):
        train(cfg(tmp_path))
    assert not (tmp_path / "config.yaml").exists() and not list(tmp_path.glob(".config.yaml*"))


def test_line_appender_cuts_a_short_write_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = LineAppender(tmp_path / "m.jsonl")
    f.append('{"step": 1}')
    FullDisk(monkeypatch).arm("m.jsonl", free=4)
    with pytest.raises(OutputDirError, match="No space left on device"):
        f.append('{"step": 2, "loss": 1.0}')
    f.close()
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1}\n'


def test_atomic_text_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    atomic_write_text(tmp_path / "a.yaml", "old\n")
    FullDisk(monkeypatch).arm("a.yaml", free=1)
    with pytest.raises(OutputDirError, match=r"cannot write file .*a\.yaml: OSError: \[Errno 28\]"):
        atomic_write_text(tmp_path / "a.yaml", "new content\n")
    assert (tmp_path / "a.yaml").read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["a.yaml"]


def _deep_dir(base: Path, length: int) -> Path:
    """A directory path of ``length`` characters (components of 200), created."""
    d = base
    while len(str(d)) + 201 < length:
        d = d / ("d" * 200)
    d = d / ("e" * (length - len(str(d)) - 1))
    d.mkdir(parents=True)
    assert len(str(d)) == length
    return d


@pytest.mark.parametrize("case", ["name_too_long", "path_too_long", "under_a_file", "read_only", "chmod"])
def test_unusable_output_directory_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], case: str) -> None:
    cause = {"name_too_long": "[Errno 36] File name too long", "path_too_long": "[Errno 36] File name too long",
             "under_a_file": "[Errno 20] Not a directory", "read_only": "[Errno 30] Read-only file system",
             "chmod": "[Errno 13] Permission denied"}[case]
    if case == "name_too_long":
        out = tmp_path / ("x" * 300)
    elif case == "path_too_long":  # the folder can be created, a checkpoint in it could not
        out = _deep_dir(tmp_path, 4080)
    elif case == "under_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"
    elif case == "read_only":  # simulated: creating files under tmp_path fails as on a read-only mount
        out = tmp_path / "run"
        out.mkdir()
        real_open = os.open

        def ro_open(path, flags, *args, **kwargs):
            if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", ro_open)
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions")
        out = tmp_path / "run"
        out.mkdir(mode=0o500)
    _never_scan(monkeypatch)
    rc = train_main(["--config", str(DEBUG), *FAST, f"logging.output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 74 and len(err) == 1, err
    assert err[0].startswith("error: ") and cause in err[0] and str(out)[:50] in err[0], err[0]


# ------------------------------------------------------------------------------------- 6. hangs


def _sleep_forever(self, index):  # noqa: ARG001
    time.sleep(3600)


def test_stalled_decode_worker_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from esvit.data.synthetic import SyntheticImageDataset

    monkeypatch.setenv("ESVIT_LOADER_TIMEOUT", "2")
    monkeypatch.setattr(SyntheticImageDataset, "__getitem__", _sleep_forever)  # inherited by forked workers
    t0 = time.monotonic()
    rc = train_main(["--config", str(DEBUG), *FAST, "data.num_workers=2", f"logging.output_dir={tmp_path}"])
    waited = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 124 and waited < 60, (rc, waited)
    assert err[-1].startswith("error: data loader stalled: no batch from the 2 decode worker(s) within 2 s")
    assert "ESVIT_LOADER_TIMEOUT" in err[-1] and not any("Traceback" in ln for ln in err)
    assert not multiprocessing.active_children()  # the stuck workers were killed


def test_stalled_distill_worker_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esvit.distill.data import _Split

    monkeypatch.setenv("ESVIT_LOADER_TIMEOUT", "2")
    monkeypatch.setattr(_Split, "__getitem__", _sleep_forever)
    with pytest.raises(LoaderStalledError, match=r"no batch from the 2 decode worker\(s\) within 2 s"):
        distill(dcfg(tmp_path, "data.num_workers=2"))
    assert not multiprocessing.active_children()
