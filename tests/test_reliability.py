"""Reliability, faults and security (fast part): no run is lost, no checkpoint runs code.

Covered here, in-process on the debug config (the subprocess / torchrun / load variants are in
``tests/test_faults_slow.py``):

* a truncated latest checkpoint makes ``--resume auto`` fall back to the previous one, with a
  warning, and the resumed run matches an uninterrupted one; a writer that dies mid-checkpoint
  leaves the previous checkpoints intact;
* NaN injected into the augmented views at step k, or a huge learning rate, stops the run with
  :class:`NonFiniteLossError` naming the step; the last good checkpoint stays byte-identical and
  no checkpoint ever holds non-finite weights;
* a folder of broken / exotic image files trains (0 and 2 workers), names the skipped files and
  their count, and fails clearly when ``data.max_bad_fraction`` is exceeded, even on a data set
  far smaller than the counter's ``min_samples``;
* bad configs and CLI arguments are one ``error: ...`` line naming the key or file, exit code 2;
* checkpoints are data, not code: every ``torch.load`` in the package uses
  ``weights_only=True`` and a malicious pickle is refused by resume, export and every eval CLI.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from esvit.augment.multicrop import MultiCropAugmentation
from esvit.cli.train import main as train_main
from esvit.config import load_config
from esvit.data import BadImageCounter, ImageFolderDataset
from esvit.train import checkpoint as ckpt
from esvit.train.logger import read_metrics
from esvit.train.loop import NonFiniteLossError, train
from esvit.trainer import EsViTTrainer

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.yaml"
FAST = ["data.synthetic_images=64", "optim.batch_size=16", "model.out_dim=256", "logging.progress=false",
        "logging.log_every=1"]


def cfg(out: Path, *extra: str):
    """Debug config (vit_nano, 4 steps/epoch) writing to ``out``."""
    return load_config(DEBUG, [*FAST, f"logging.output_dir={out}", *extra])


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI calls ``logging.basicConfig(force=True)``: give every test the root logger back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _weights_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return all(torch.isfinite(v).all() for k in ("student", "teacher") for v in state[k].values()
               if v.is_floating_point())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = ckpt.safe_load(a), ckpt.safe_load(b)
    for key in ("student", "teacher"):
        assert sa[key].keys() == sb[key].keys()
        for k, v in sa[key].items():
            assert torch.allclose(v, sb[key][k], atol=1e-6, rtol=0), f"{key}.{k}"


# ----------------------------------------------------------------------------- 1. crash and resume


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted 8-step run with a checkpoint every step: the reference."""
    out = tmp_path_factory.mktemp("straight")
    res = train(cfg(out, "checkpoint.every_steps=1"))
    assert res.step == 8
    return res, read_metrics(out / "metrics.jsonl")


def test_truncated_latest_checkpoint_falls_back_to_previous(
    tmp_path: Path, straight_run, caplog: pytest.LogCaptureFixture
) -> None:
    ref, ref_metrics = straight_run
    first = train(cfg(tmp_path, "checkpoint.every_steps=1"), max_steps=5)
    latest = ckpt.checkpoint_path(tmp_path, 5)
    assert first.last_checkpoint == latest
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 3])  # torn write of the newest checkpoint
    caplog.set_level(logging.WARNING)
    res = train(cfg(tmp_path, "checkpoint.every_steps=1"), resume="auto")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("checkpoint_00000005.pt" in m and "previous" in m for m in warned), warned
    # resumed from step 4: steps 5..8 re-run and reproduce the uninterrupted run exactly
    assert res.step == 8 and len(res.losses) == 4
    assert np.allclose(res.losses, [r["loss"] for r in ref_metrics[4:]], atol=1e-6, rtol=0)
    _assert_same_weights(res.last_checkpoint, ref.last_checkpoint)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert [r["loss"] for r in recs] == pytest.approx([r["loss"] for r in ref_metrics], abs=1e-6)
    for p in ckpt.list_checkpoints(tmp_path):
        torch.load(p, weights_only=True)  # the rewritten step-5 checkpoint is whole again


def test_writer_dying_mid_checkpoint_leaves_previous_ones_intact(
    tmp_path: Path, straight_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, ref_metrics = straight_run
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the step-3 checkpoint: write half of it, then "die"
            import io

            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: buf.tell() // 2])
            f.flush()
            raise KeyboardInterrupt("simulated kill while writing a checkpoint")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path, "checkpoint.every_steps=1"))
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000001.pt", "checkpoint_00000002.pt"]
    for p in ckpt.list_checkpoints(tmp_path):
        torch.load(p, weights_only=True)
    res = train(cfg(tmp_path, "checkpoint.every_steps=1"), resume="auto")
    assert res.step == 8
    assert np.allclose(res.losses, [r["loss"] for r in ref_metrics[2:]], atol=1e-6, rtol=0)
    _assert_same_weights(res.last_checkpoint, ref.last_checkpoint)
    assert not list(tmp_path.glob(".checkpoint_*.tmp"))


def test_torn_metrics_line_does_not_block_resume(tmp_path: Path) -> None:
    train(cfg(tmp_path, "checkpoint.every_steps=2"), max_steps=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a line cut by a crash
    res = train(cfg(tmp_path, "checkpoint.every_steps=2"), resume="auto", max_steps=4)
    assert res.step == 4
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------- 2. non-finite loss


def _inject_nan_at(monkeypatch: pytest.MonkeyPatch, step: int, already_done: int = 0) -> None:
    """Make the augmentation of global step ``step`` (1-based, as in metrics.jsonl) return NaN."""
    calls = {"n": already_done}
    real_forward = MultiCropAugmentation.forward_with_params  # what the trainer calls

    def forward(self, images, *args, **kwargs):
        views, params = real_forward(self, images, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step:
            views[0] = torch.full_like(views[0], float("nan"))
        return views, params

    monkeypatch.setattr(MultiCropAugmentation, "forward_with_params", forward)


def test_nan_view_at_step_k_stops_run_and_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ("optim.epochs=4", "checkpoint.every_steps=2")
    train(cfg(tmp_path, *extra), max_steps=4)
    good = ckpt.checkpoint_path(tmp_path, 4)
    digests = {p.name: _sha(p) for p in ckpt.list_checkpoints(tmp_path)}
    assert list(digests) == ["checkpoint_00000002.pt", "checkpoint_00000004.pt"]
    _inject_nan_at(monkeypatch, step=7, already_done=4)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg(tmp_path, *extra), resume="auto")
    msg = str(err.value)
    assert "non-finite loss" in msg and "at step 7 " in msg, msg
    # the step-6 checkpoint was written by the resumed run before the NaN; nothing after it
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint_00000002.pt", "checkpoint_00000004.pt", "checkpoint_00000006.pt"]
    assert str(ckpt.checkpoint_path(tmp_path, 6)) in msg  # names the last good checkpoint
    assert {n: _sha(tmp_path / n) for n in digests} == digests  # older ones byte-identical
    assert _sha(good) == digests[good.name]
    assert all(_weights_finite(p) for p in ckpt.list_checkpoints(tmp_path))
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # the NaN step is never logged as a loss


@pytest.mark.parametrize("lr,clip", [("1e6", "3.0"), ("1e30", "0")])
def test_huge_lr_stops_without_writing_non_finite_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lr: str, clip: str
) -> None:
    """lr=1e6 with clipping used to write a checkpoint full of NaN before the loss turned NaN."""
    args = ["--config", str(DEBUG), *FAST, f"logging.output_dir={tmp_path}", "checkpoint.every_steps=1",
            f"optim.lr={lr}", "optim.warmup_epochs=0", f"optim.clip_grad={clip}"]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: non-finite") and " at step " in err, err
    ckpts = ckpt.list_checkpoints(tmp_path)
    assert ckpts and all(_weights_finite(p) for p in ckpts)


def test_checkpoint_with_non_finite_weights_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_update = EsViTTrainer.update_teacher
    calls = {"n": 0}

    def poisoned_update(self, momentum):
        real_update(self, momentum)
        calls["n"] += 1
        if calls["n"] == 3:  # e.g. an overflow in the EMA update at step 3
            with torch.no_grad():
                next(self.teacher.parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(EsViTTrainer, "update_teacher", poisoned_update)
    with pytest.raises(NonFiniteLossError, match="non-finite weights after step 3"):
        train(cfg(tmp_path, "checkpoint.every_steps=1"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000001.pt", "checkpoint_00000002.pt"]
    assert all(_weights_finite(p) for p in ckpt.list_checkpoints(tmp_path))


# ------------------------------------------------------------------------------------ 3. bad data

VALID = ["jpg_0.jpg", "jpg_1.jpg", "jpg_2.jpg", "jpg_3.jpg", "png_0.png", "png_1.png", "png_2.png",
         "png_3.png", "webp_0.webp", "webp_1.webp", "webp_2.webp", "webp_3.webp", "tiny_1x1.png",
         "huge_6000x4000.jpg", "gray.jpg", "rgba.png", "cmyk.jpg", "sixteen_bit.png"]
BAD = ["truncated.jpg", "truncated.png", "zero_bytes.jpg", "text_named.jpg", "self_loop.jpg",
       "unreadable.jpg"]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 files (18 decodable, some exotic; 6 broken) plus a directory symlink loop: 25% bad."""
    d = tmp_path_factory.mktemp("bad_data")
    rng = np.random.default_rng(0)

    def noise(h: int = 40, w: int = 48) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    for i in range(4):
        noise().save(d / f"jpg_{i}.jpg", quality=90)
        noise().save(d / f"png_{i}.png")
        noise().save(d / f"webp_{i}.webp")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "tiny_1x1.png")
    Image.new("RGB", (6000, 4000), (30, 120, 200)).save(d / "huge_6000x4000.jpg", quality=70)
    noise().convert("L").save(d / "gray.jpg")
    noise().convert("RGBA").save(d / "rgba.png")
    noise().convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16)).save(d / "sixteen_bit.png")
    full = (d / "jpg_0.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    full = (d / "png_0.png").read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "zero_bytes.jpg").write_bytes(b"")
    (d / "text_named.jpg").write_text("this is not an image\n")
    os.symlink("self_loop.jpg", d / "self_loop.jpg")  # ELOOP on open
    os.symlink(".", d / "loop_dir")  # directory symlink loop: must not hang the scan
    noise().save(d / "unreadable.jpg")
    os.chmod(d / "unreadable.jpg", 0)
    with Image.open(d / "sixteen_bit.png") as im:
        assert im.mode.startswith("I")
    with Image.open(d / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    return d


@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 0 does not stop root: refuse the file in PIL's open as the kernel would for a user."""
    if os.geteuid() != 0:
        return
    real_open = Image.open

    def guarded_open(fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)) and os.fspath(fp).endswith("unreadable.jpg"):
            raise PermissionError(13, "Permission denied", os.fspath(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", guarded_open)  # inherited by forked DataLoader workers


def test_bad_folder_items_are_flagged_and_exotic_ones_decode(bad_folder: Path, unreadable) -> None:
    ds = ImageFolderDataset(bad_folder, 32, max_bad_fraction=0.5)
    names = [Path(p).name for p in ds.paths]
    assert sorted(names) == sorted(VALID + BAD)  # the directory loop added nothing
    for i, name in enumerate(names):
        img, _, status = ds[i]
        assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
        assert status.ok == (name in VALID), (name, status.error)


def _bad_data_cfg(out: Path, folder: Path, workers: int, max_bad: float, *extra: str):
    return load_config(DEBUG, [
        "data.kind=folder", f"data.path={folder}", "data.canvas_size=32", f"data.num_workers={workers}",
        f"data.max_bad_fraction={max_bad}", "optim.batch_size=8", "model.out_dim=256",
        "logging.progress=false", f"logging.output_dir={out}", *extra])


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_bad_folder_completes_and_names_skipped_files(
    tmp_path: Path, bad_folder: Path, unreadable, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    caplog.set_level(logging.WARNING)
    res = train(_bad_data_cfg(tmp_path, bad_folder, workers, 0.5))
    assert res.step == 6 and np.isfinite(res.losses).all()  # 24 images / 8 = 3 steps x 2 epochs
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    named = {b for b in BAD if b in warned}
    assert len(named) >= 5, warned  # the first bad files are named one by one
    assert not [v for v in VALID if v in warned], warned  # exotic but valid files are not "bad"
    assert "12 of 48 samples (25.00%)" in warned, warned  # the run-end summary with the count
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["bad_images"] == 12


def test_bad_fraction_above_limit_fails_even_on_a_tiny_data_set(
    tmp_path: Path, bad_folder: Path, unreadable, capsys: pytest.CaptureFixture[str]
) -> None:
    """24 samples per epoch never reach the counter's min_samples=100: the epoch-end check must fire."""
    with pytest.raises(RuntimeError, match=r"6 of 24 samples \(25\.00%\).*max_bad_fraction=0\.1"):
        train(_bad_data_cfg(tmp_path / "api", bad_folder, 0, 0.1))
    assert not ckpt.list_checkpoints(tmp_path / "api")  # failed at the end of epoch 1, before saving
    rc = train_main(["--config", str(DEBUG), "data.kind=folder", f"data.path={bad_folder}", "data.canvas_size=32",
                     "data.num_workers=0", "data.max_bad_fraction=0.05", "optim.batch_size=8",
                     "logging.progress=false", f"logging.output_dir={tmp_path / 'cli'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "max_bad_fraction=0.05" in err[-1], err[-3:]


def test_bad_image_counter_min_samples_and_finalize() -> None:
    counter = BadImageCounter(0.1, paths=["a.jpg", "b.jpg", "c.jpg", "d.jpg"], min_samples=100)
    counter.update(torch.tensor([True, False, True, False]))
    assert counter.bad == 2 and counter.seen == 4  # below min_samples: no verdict yet
    with pytest.raises(RuntimeError, match=r"2 of 4 samples \(50\.00%\).*max_bad_fraction=0\.1"):
        counter.finalize()
    ok = BadImageCounter(0.5, min_samples=100)
    ok.update(torch.tensor([True, False, True, True]))
    ok.finalize()  # 25% <= 50%: fine


# ---------------------------------------------------------------------------- 4. bad config and CLI


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = train_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("override,key", [
    ("optim.lrr=1", "optim.lrr"),
    ("model.depth=3", "model.depth"),
    ("optim.batch_size=abc", "optim.batch_size"),
    ("optim.lr=fast", "optim.lr"),
    ("logging.progress=maybe", "logging.progress"),
    ("optim.batch_size=0", "optim.batch_size"),
    ("optim.batch_size=-16", "optim.batch_size"),
    ("augment.global_size=-32", "augment.global_size"),
    ("data.canvas_size=0", "data.canvas_size"),
    ("augment.n_local=-1", "augment.n_local"),
    ("augment.local_size=64", "augment.local_size"),
    ("augment.global_scale=[0.9,0.2]", "augment.global_scale"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction"),
    ("optim.accum_steps=3", "optim.batch_size"),
    ("data.kind=imagenet", "data.kind"),
    ("optim=3", "optim"),
])
def test_bad_override_is_one_error_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, key: str
) -> None:
    out = tmp_path / "run"
    err = _cli_error(capsys, ["--config", str(DEBUG), f"logging.output_dir={out}", override])
    assert key in err, err
    assert not out.exists()  # rejected before anything is written


def test_bad_yaml_file_names_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  batch_size: sixteen\n")
    err = _cli_error(capsys, ["--config", str(bad)])
    assert str(bad) in err and "optim.batch_size" in err and "int" in err
    bad.write_text("model:\n  backbone: vit_nano\n  widht: 3\n")
    err = _cli_error(capsys, ["--config", str(bad)])
    assert str(bad) in err and "model.widht" in err
    bad.write_text("optim: [1, 2\n")
    assert str(bad) in _cli_error(capsys, ["--config", str(bad)])


def test_missing_files_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert str(missing) in _cli_error(capsys, ["--config", str(missing)])
    out = tmp_path / "run"
    nockpt = tmp_path / "checkpoint_00000042.pt"
    err = _cli_error(capsys, ["--config", str(DEBUG), *FAST, f"logging.output_dir={out}", "--resume", str(nockpt)])
    assert str(nockpt) in err and "--resume" in err
    assert not out.exists()
    notckpt = tmp_path / "notes.pt"
    notckpt.write_text("not a checkpoint")
    assert str(notckpt) in _cli_error(capsys, ["--config", str(DEBUG), *FAST, f"logging.output_dir={out}",
                                               "--resume", str(notckpt)])
    nodata = tmp_path / "no_such_folder"
    assert str(nodata) in _cli_error(capsys, ["--config", str(DEBUG), "data.kind=folder", f"data.path={nodata}",
                                              f"logging.output_dir={out}"])
    assert "nope_net" in _cli_error(capsys, ["--config", str(DEBUG), "model.backbone=nope_net",
                                             f"logging.output_dir={out}"])


# ------------------------------------------------------------------ 5. checkpoints are data, not code


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    mod, _, attr = dotted.rpartition(".")
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == attr and ast.unparse(n.func.value).split(".")[-1] == mod.split(".")[-1]]


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    sources = sorted((ROOT / "esvit").rglob("*.py")) + sorted(ROOT.glob("*.py"))
    loads, offenders = 0, []
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree, "torch.load"):
            loads += 1
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)}")
        for name in ("pickle.load", "pickle.loads", "dill.load", "jit.load", "cloudpickle.load"):
            offenders += [f"{path.relative_to(ROOT)}:{c.lineno}: {ast.unparse(c)}" for c in _calls(tree, name)]
        for call in _calls(tree, "np.load") + _calls(tree, "numpy.load"):
            if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in call.keywords):
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)}")
    assert loads >= 1, "scanner found no torch.load at all: it is broken"
    assert not offenders, "unsafe deserialisation:\n" + "\n".join(offenders)


class _Payload:
    """Unpickling this runs code that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _malicious_checkpoint(path: Path, marker: Path, like: Path | None = None) -> Path:
    state = ckpt.safe_load(like) if like is not None else {"step": 99, "student": {}, "teacher": {}}
    state["step"] = 99
    state["payload"] = _Payload(marker)
    torch.save(state, path)  # a plain (non-atomic) write, as an attacker would
    return path


def test_payload_really_runs_code_without_weights_only(tmp_path: Path) -> None:
    """Guards the next test: the payload is live, so 'marker never created' means something."""
    marker = tmp_path / "proof"
    evil = _malicious_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_malicious_checkpoint_is_refused_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from esvit.cli import embed as embed_cli
    from esvit.cli import export as export_cli
    from esvit.cli import knn as knn_cli
    from esvit.cli import linear as linear_cli
    from esvit.export import load_backbone

    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    good = train(cfg(run, "checkpoint.every_steps=2"), max_steps=2).last_checkpoint
    evil = _malicious_checkpoint(ckpt.checkpoint_path(run, 99), marker, like=good)

    # resume --auto skips it (with a warning) and continues from the good checkpoint
    caplog.set_level(logging.WARNING)
    res = train(cfg(run, "checkpoint.every_steps=2"), resume="auto", max_steps=4)
    assert res.step == 4
    assert any(evil.name in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    # alone in a run directory, or named explicitly, it is an error
    alone = tmp_path / "alone"
    alone.mkdir()
    _malicious_checkpoint(ckpt.checkpoint_path(alone, 99), marker, like=good)
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint"):
        train(cfg(alone), resume="auto")
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint"):
        train(cfg(tmp_path / "explicit"), resume=str(evil))
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint"):
        load_backbone(evil)
    capsys.readouterr()

    images = tmp_path / "images"
    for c in ("a", "b"):
        (images / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(images / c / f"{i}.png")
    common = ["--checkpoint", str(evil), "--num-workers", "0", "--no-progress", "--device", "cpu"]
    for name, main, argv in [
        ("train", train_main, ["--config", str(DEBUG), *FAST, f"logging.output_dir={tmp_path / 'r2'}",
                               "--resume", str(evil)]),
        ("export", export_cli.main, ["--checkpoint", str(evil), "--out", str(tmp_path / "exp.pt")]),
        ("embed", embed_cli.main, [*common, "--input", str(images), "--out", str(tmp_path / "emb")]),
        ("knn", knn_cli.main, [*common, "--train", str(images), "--val", str(images),
                               "--output-dir", str(tmp_path / "knn")]),
        ("linear", linear_cli.main, [*common, "--train", str(images), "--val", str(images),
                                     "--output-dir", str(tmp_path / "lin")]),
    ]:
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err and err[-1].startswith("error: ") and str(evil) in err[-1], (name, err)
    assert not marker.exists()
    assert not (tmp_path / "exp.pt").exists()


def test_checkpoint_of_another_architecture_names_keys(tmp_path: Path) -> None:
    from esvit.export import load_backbone

    good = train(cfg(tmp_path / "run"), max_steps=1).last_checkpoint
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys \(first: encoder\.layers\.encoder_layer_2"):
        load_backbone(good, backbone_kwargs={"depth": 3})
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatches \(first: .*head.*checkpoint \(256,"):
        train(cfg(tmp_path / "run", "model.out_dim=512"), resume="auto")
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected keys \(first: .*encoder_layer_1"):
        train(cfg(tmp_path / "run", "model.backbone_kwargs={depth: 1, image_size: 32}"), resume="auto")
    assert ckpt.list_checkpoints(tmp_path / "run") == [good]  # nothing overwritten by the failures
