"""Preemption, concurrent runs and stalls with real processes (slow).

* SIGTERM, SIGINT and SIGUSR1 sent to a real ``train_ssl.py`` process (2 decode workers): it
  finishes the step, writes a checkpoint, prints one ``stopped:`` line and exits with
  ``128 + signal``; ``--resume auto`` then reproduces the uninterrupted run's losses exactly.
* A second signal aborts at once; the same signal repeated within the debounce window (what
  ``srun`` / a terminal plus torchrun's forwarding deliver) does not.
* Under ``torchrun`` (2 gloo ranks): SIGUSR1 to rank 1 alone stops both ranks after the same
  step; SIGTERM to the ``torchrun`` agent (forwarded to the workers) too; the resumed run is
  identical to an uninterrupted 2-rank run.
* Two real processes racing for one output directory: one runs, the other exits at once (75)
  naming the holder; the holder SIGKILLed mid-run leaves no stale lock, and the resume matches.
* A decode that blocks in the main process (no workers) ends the process after the loader
  timeout with exit code 124 and one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esvit.train import checkpoint as ckpt
from esvit.train.logger import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.yaml"
FAST = ["data.synthetic_images=64", "optim.batch_size=16", "model.out_dim=256", "logging.progress=false",
        "logging.log_every=1"]
RUN = ["optim.epochs=8", "checkpoint.every_epochs=0"]  # 32 steps; checkpoints only at the end or when stopped
TOTAL = 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_ssl.py"), "--config", str(DEBUG), *FAST, *RUN,
            f"logging.output_dir={out}", *extra]


def _torchrun_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "train_ssl.py"), "--config", str(DEBUG), *FAST, *RUN, f"logging.output_dir={out}", *extra]


def _logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _logged_step(out) < step:
        assert proc.poll() is None, f"ended early (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached:\n{log.read_text()[-3000:]}"
        time.sleep(0.01)


def _losses(out: Path) -> list[float]:
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    return [r["loss"] for r in recs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    out = tmp_path_factory.mktemp("reference")
    done = subprocess.run(_train_cmd(out, "data.num_workers=2"), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses(out)


# ------------------------------------------------------------------------------------ 1 process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1],
                         ids=lambda s: signal.Signals(s).name)
def test_signal_to_a_real_run_checkpoints_and_resume_matches(tmp_path: Path, reference: list[float],
                                                            signum: int) -> None:
    out, log = tmp_path / "run", tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_train_cmd(out, "data.num_workers=2"), env=ENV, stdout=f, stderr=subprocess.STDOUT)
        try:
            _wait_for_step(proc, out, 5, log)
            os.kill(proc.pid, signum)
            t0 = time.monotonic()
            rc = proc.wait(timeout=120)
            exit_s = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    print(f"\n{name}: exit {rc} {exit_s:.1f} s after the signal; {last}")
    assert rc == 128 + signum and "Traceback" not in text, text[-3000:]
    assert last.startswith(f"stopped: {name} received: stopped after step ")
    step = int(last.split("stopped after step ")[1].split(",")[0])
    assert 5 <= step < TOTAL and [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint_{step:08d}.pt"]
    assert _logged_step(out) == step  # the step in progress was finished and logged, nothing after it
    done = subprocess.run(_train_cmd(out, "data.num_workers=2", "--resume", "auto"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(out) == reference  # bit-identical to the uninterrupted run


SLOW_STEP = r"""
import sys, time
from esvit.run.signals import StopSignals
with StopSignals() as stop:
    print("ready", flush=True)
    while True:          # one long step: the flag is only looked at when it ends
        time.sleep(0.05)
        print(stop.signum, flush=True)
"""


def test_second_signal_aborts_at_once_but_a_duplicate_does_not(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEP], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # the same signal again at once: a duplicate delivery
        time.sleep(0.5)
        assert proc.poll() is None  # still finishing its step
        while proc.stdout.readline().strip() != str(int(signal.SIGTERM)):
            pass
        time.sleep(1.2)  # past the debounce window
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rc = proc.wait(timeout=10)
        assert rc == -signal.SIGINT and time.monotonic() - t0 < 1.0  # killed by the second signal
    finally:
        if proc.poll() is None:
            proc.kill()


# --------------------------------------------------------------------------------- torchrun, 2 ranks


def _workers(pid: int) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's worker processes."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            try:
                env = Path(f"/proc/{k}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
            if ranks:
                found[ranks[0]] = k
    return found


def _interrupt_torchrun(out: Path, log: Path, at: int, target: str, signum: int) -> tuple[int, list[str]]:
    """Start a resumed 2-rank run, signal ``target`` ("rank1" or "agent") at logged step ``at``."""
    with open(log, "w") as f:
        proc = subprocess.Popen(_torchrun_cmd(out, "--resume", "auto"), env=ENV, stdout=f, stderr=subprocess.STDOUT)
        try:
            _wait_for_step(proc, out, at, log)
            workers = _workers(proc.pid)
            assert sorted(workers) == [0, 1], workers
            os.kill(workers[1] if target == "rank1" else proc.pid, signum)
            rc = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    stopped = [ln.split("stopped: ", 1)[1] for ln in log.read_text().splitlines() if "stopped: " in ln]
    return rc, stopped


def test_torchrun_stop_signal_reaches_every_rank_and_resume_matches(tmp_path: Path) -> None:
    ref = tmp_path / "reference"
    done = subprocess.run(_torchrun_cmd(ref), env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    steps = []
    for i, (at, target, signum) in enumerate([(4, "rank1", signal.SIGUSR1), (14, "agent", signal.SIGTERM)]):
        rc, stopped = _interrupt_torchrun(out, tmp_path / f"attempt{i}.log", at, target, signum)
        name = signal.Signals(signum).name
        print(f"\n{name} to {target} at logged step >= {at}: torchrun rc {rc}; ranks: {stopped}")
        assert rc != 0 and len(stopped) == 2, (tmp_path / f"attempt{i}.log").read_text()[-3000:]
        assert len(set(stopped)) == 1 and stopped[0].startswith(f"{name} received: stopped after step ")
        step = int(stopped[0].split("stopped after step ")[1].split(",")[0])
        assert ckpt.list_checkpoints(out)[-1] == ckpt.checkpoint_path(out, step) and _logged_step(out) == step
        steps.append(step)
    assert steps[0] < steps[1] < TOTAL
    done = subprocess.run(_torchrun_cmd(out, "--resume", "auto"), env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(out) == _losses(ref)


# ---------------------------------------------------------------------------------- racing runs


def test_two_real_runs_racing_for_one_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    files = [open(p, "w") for p in logs]  # noqa: SIM115 - closed below
    procs = [subprocess.Popen(_train_cmd(out, "data.num_workers=2", "optim.epochs=200"), env=ENV, stdout=f,
                              stderr=subprocess.STDOUT) for f in files]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs):  # the loser exits at once
            assert time.monotonic() < deadline, [p.read_text()[-2000:] for p in logs]
            time.sleep(0.05)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = procs[1 - loser]
        assert procs[loser].returncode == 75, logs[loser].read_text()[-3000:]
        line = logs[loser].read_text().strip().splitlines()[-1]
        assert line.startswith("error: ") and f"pid {winner.pid} on host " in line, line
        assert winner.poll() is None
        _wait_for_step(winner, out, 3, logs[1 - loser])
        winner.kill()  # SIGKILL mid-run: its decode workers are still alive for a moment
        winner.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    resumed = subprocess.run(_train_cmd(out, "data.num_workers=2", "optim.epochs=200", "--resume", "auto",
                                        "--max-steps", "6"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # no stale lock left by the killed holder
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 7))


def test_torchrun_job_in_a_locked_directory_stops_every_rank(tmp_path: Path) -> None:
    from esvit.run.lock import OutputLock

    out = tmp_path / "run"
    out.mkdir()
    with OutputLock(out, "holder"):  # rank 0 alone tries the lock; rank 1 learns the outcome
        t0 = time.monotonic()
        res = subprocess.run(_torchrun_cmd(out), env=ENV, capture_output=True, text=True, timeout=300)
    errors = [ln.split("error: ", 1)[1] for ln in (res.stdout + res.stderr).splitlines() if "error: " in ln]
    print(f"\nlocked directory under torchrun: rc {res.returncode} after {time.monotonic() - t0:.1f} s; {errors[:1]}")
    assert res.returncode != 0 and len(errors) == 2, res.stderr[-3000:]
    assert all(f"in use by another run (pid {os.getpid()} on host " in e for e in errors)
    assert not (out / "metrics.jsonl").exists() and not ckpt.list_checkpoints(out)


# --------------------------------------------------------------------------------------- stalls

STALL = r"""
import sys, time
from esvit.data.synthetic import SyntheticImageDataset
SyntheticImageDataset.__getitem__ = lambda self, i: time.sleep(3600)
from esvit.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_blocked_decode_without_workers_ends_the_process_with_a_message(tmp_path: Path) -> None:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", STALL, "--config", str(DEBUG), *FAST, "data.num_workers=0",
                          f"logging.output_dir={tmp_path}"], env={**ENV, "ESVIT_LOADER_TIMEOUT": "2"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 124 and time.monotonic() - t0 < 60, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data loader stalled: no batch from the main process (data.num_workers=0) "
                           "within 2 s"), last
