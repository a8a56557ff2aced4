"""Output integrity, meaningless evaluations and hangs (issue 13, classes 8, 9 and 6).

Faults are injected for real: file names with newlines, quotes, commas, CR and non-UTF-8 bytes;
user files and another tool's ``embeddings.npy`` in output folders; two commands on one folder;
a killed run's temporary files; FIFOs in image folders and list files; a decode worker that
never returns; one-class banks, validation classes absent from the bank, ``k`` larger than the
bank, unreadable bank classes, tiny and imbalanced validation sets, a one-token grid.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from esvit.backbones import build_backbone
from esvit.embed import embed_images, read_embeddings_csv
from esvit.eval.loader import LoaderStalledError, loader_timeout, make_loader
from esvit.eval.outputs import (
    LEDGER,
    TMP_DIR,
    FolderBusyError,
    ForeignFilesError,
    OutputFolder,
)
from esvit.eval.validity import MeaninglessEvaluationError, evaluation_basis

# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the test run) when the block takes longer than ``seconds``."""

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def png(path: Path | bytes, value: int, size: int = 16) -> None:
    """A distinct noisy image (its features differ from every other test image's)."""
    rng = np.random.default_rng(value)
    a = np.clip(rng.normal(value, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    with open(path, "wb") as f:
        Image.fromarray(a).save(f, format="PNG")


def classes_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            png(root / name / f"{i:02d}.png", 40 + 80 * c + i + seed)
    return root


def nano() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    return build_backbone("vit_nano", patch_size=8, image_size=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cifar_resnet18 training checkpoint (evaluation size 32)."""
    from esvit.train.checkpoint import atomic_save
    from esvit.trainer import EsViTTrainer

    torch.manual_seed(0)
    trainer = EsViTTrainer.from_backbone("cifar_resnet18", {}, out_dim=64, hidden_dim=32,
                                         bottleneck_dim=16, global_size=32, local_size=16,
                                         n_local=1)
    path = tmp_path_factory.mktemp("run") / "checkpoint_00000001.pt"
    atomic_save({"step": 1, "backbone": "cifar_resnet18", "student": trainer.student.state_dict(),
                 "teacher": trainer.teacher.state_dict(),
                 "config": {"model": {"backbone": "cifar_resnet18", "backbone_kwargs": {}},
                            "augment": {"global_size": 32}}}, path)
    return path


ODD_NAMES = ["new\nline.png", 'quo"te.png', "com,ma.png", "cr\rreturn.png", "tab\tbed.png",
             "plain.png", " lead space.png"]


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders and file names that break naive CSV (and one non-UTF-8 name)."""
    root = tmp_path_factory.mktemp("odd") / "data"
    for c, cls in enumerate(("a,b", 'c"\nd')):
        (root / cls).mkdir(parents=True)
        for i, name in enumerate(ODD_NAMES):
            png(root / cls / name, 15 * i + 110 * c + 5)
    png(os.path.join(os.fsencode(root / "a,b"), b"bad\xffbyte.png"), 250)
    return root


# ----------------------------------------------------------------------------- 8: CSV


def test_embeddings_csv_is_rfc4180_and_rows_name_their_own_image(odd_folder, tmp_path):
    from esvit.data import scan_image_folder

    res = embed_images(nano(), odd_folder, tmp_path / "emb", image_size=16, shard_size=4,
                       batch_size=3, progress=False)
    files, labels, classes = scan_image_folder(odd_folder)
    assert res.num_images == len(files) == 15
    rows = read_embeddings_csv(res.csv)
    assert rows[0] == ["row", "path", "label"] and len(rows) == 16
    assert [r[1] for r in rows[1:]] == files  # '\n', '\r', quotes, commas, '\udcff' intact
    assert [r[2] for r in rows[1:]] == [classes[y] for y in labels]
    assert [int(r[0]) for r in rows[1:]] == list(range(15))
    # RFC 4180: CRLF record ends, and a line break only ever inside a quoted field
    raw = res.csv.read_bytes()
    assert raw.count(b"\r\n") >= 16 and b"\xff" in raw  # the name's own bytes
    assert b'"' + os.fsencode(odd_folder / "a,b" / 'quo"te.png').replace(b'"', b'""') + b'"' in raw
    # each row names its own image: embed the same files in reverse order, match by path
    rev = embed_images(nano(), files[::-1], tmp_path / "rev", image_size=16, progress=False)
    by_path = {r[1]: int(r[0]) for r in read_embeddings_csv(rev.csv)[1:]}
    x, y = np.load(res.embeddings), np.load(rev.embeddings)
    for r in rows[1:]:
        np.testing.assert_allclose(x[int(r[0])], y[by_path[r[1]]], rtol=1e-5, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in x}) == 15  # distinct images, so a shift would show
    # the per-shard lists too (kept without merging)
    kept = embed_images(nano(), odd_folder, tmp_path / "shards", image_size=16, shard_size=4,
                        batch_size=3, merge=False, progress=False)
    shard_rows = [row for i in range(4) for row in read_embeddings_csv(
        kept.out_dir / f"paths_{i:05d}.csv")[1:]]
    assert [r[0] for r in shard_rows] == files


def test_embeddings_csv_round_trips_through_csv_and_pandas(odd_folder, tmp_path):
    res = embed_images(nano(), odd_folder, tmp_path / "emb", image_size=16, progress=False)
    with open(res.csv, newline="", encoding="utf-8", errors="surrogateescape") as f:
        plain = list(csv.reader(f))
    assert plain == read_embeddings_csv(res.csv)
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(res.csv, dtype=str, keep_default_na=False,
                     encoding_errors="surrogateescape")
    assert list(df.columns) == ["row", "path", "label"] and len(df) == len(plain) - 1
    assert df["path"].tolist() == [r[1] for r in plain[1:]]
    assert df["label"].tolist() == [r[2] for r in plain[1:]]


def test_bad_files_list_keeps_odd_names_on_one_record(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    png(src / "good.png", 10)
    (src / "bro\nken.png").write_bytes(b"\x89PNG not really")
    (src / "bro\tken2.png").write_bytes(b"not an image")
    res = embed_images(nano(), src, tmp_path / "out", image_size=16, progress=False)
    assert res.num_images == 1 and res.num_bad == 2
    with open(res.bad_files, newline="", encoding="utf-8") as f:
        recs = list(csv.reader(f, delimiter="\t"))
    assert [r[0] for r in recs] == [str(src / "bro\tken2.png"), str(src / "bro\nken.png")]
    assert all(len(r) == 2 and r[1] for r in recs)


# ----------------------------------------------------------------------------- 8: ownership


def test_foreign_files_in_embed_out_are_refused_and_untouched(tmp_path, capsys, ckpt):
    from esvit.cli.embed import main

    src = classes_folder(tmp_path / "src", {"x": 2, "y": 2})
    out = tmp_path / "out"
    out.mkdir()
    theirs = {"embeddings.npy": b"another tool's embeddings", "embeddings_00000.npy": b"mine",
              "regions_notes.npy": b"user", "paths_00000.csv": b"keep me"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    for extra in ([], ["--overwrite"]):
        rc = main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(out),
                   "--num-workers", "0", "--no-progress", *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: output folder") and "\n" not in err
        assert "embeddings.npy" in err and "did not write" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == theirs  # nothing touched


def test_overwrite_deletes_only_what_the_ledger_lists(tmp_path):
    src = classes_folder(tmp_path / "src", {"x": 3, "y": 3})
    out = tmp_path / "out"
    first = embed_images(nano(), src, out, image_size=16, shard_size=2, merge=False,
                         progress=False)
    ledger = json.loads((out / LEDGER).read_text())
    assert ledger["files"]["embeddings_00000.npy"] == "esvit-embed" and "paths_00002.csv" in ledger["files"]
    assert sorted(p.name for p in first.shards) == [f"embeddings_0000{i}.npy" for i in range(3)]
    first_x = np.concatenate([np.load(p) for p in first.shards])
    # a user file dropped in later: every later run refuses the folder, --overwrite included
    (out / "embeddings_backup.npy").write_bytes(b"user data")
    with pytest.raises(ForeignFilesError, match="embeddings_backup.npy"):
        embed_images(nano(), src, out, image_size=16, shard_size=2, progress=False)
    with pytest.raises(ForeignFilesError, match="embeddings_backup.npy"):
        embed_images(nano(), src, out, image_size=16, shard_size=3, overwrite=True,
                     progress=False)
    assert (out / "embeddings_backup.npy").read_bytes() == b"user data"
    (out / "embeddings_backup.npy").unlink()
    # --overwrite with other settings: the old shards (listed) go, the ledger follows
    again = embed_images(nano(), src, out, image_size=16, shard_size=3, overwrite=True,
                         progress=False)
    assert again.skipped_shards == 0 and not (out / "embeddings_00002.npy").exists()
    assert np.allclose(np.load(again.embeddings), first_x, atol=1e-6)
    names = {p.name for p in out.iterdir()} - {LEDGER, TMP_DIR}
    assert names == set(json.loads((out / LEDGER).read_text())["files"])  # deleted: unlisted


def test_killed_run_leftovers_are_cleared_and_never_foreign(tmp_path):
    src = classes_folder(tmp_path / "src", {"x": 2, "y": 2})
    out = tmp_path / "out"
    embed_images(nano(), src, out, image_size=16, progress=False)
    leftover = out / TMP_DIR / "embeddings_00000.npy.abc123.tmp"  # a SIGKILLed writer's temp
    leftover.write_bytes(b"partial")
    res = embed_images(nano(), src, out, image_size=16, progress=False)
    assert res.skipped_shards == 1 and not leftover.exists()
    assert list((out / TMP_DIR).iterdir()) == []


def test_two_commands_on_one_folder(tmp_path):
    first = OutputFolder(tmp_path / "o", "esvit-embed").claim()
    try:
        with pytest.raises(FolderBusyError, match=rf"esvit-embed, pid {os.getpid()} on "):
            OutputFolder(tmp_path / "o", "esvit-knn").claim()
    finally:
        first.release()
    OutputFolder(tmp_path / "o", "esvit-knn").claim().release()  # free again
    assert not (tmp_path / "o").exists()  # a claim that wrote nothing leaves nothing behind


def test_a_shared_folder_claimed_with_a_wait_gets_it_once_free(tmp_path):
    import threading

    holder = OutputFolder(tmp_path / "cache", "esvit-knn").claim()
    with pytest.raises(FolderBusyError):
        OutputFolder(tmp_path / "cache", "esvit-linear").claim(wait=0.2)
    timer = threading.Timer(0.3, holder.release)
    timer.start()
    try:
        OutputFolder(tmp_path / "cache", "esvit-linear").claim(wait=10).release()
    finally:
        timer.join()


def test_a_failed_eval_leaves_no_output_folder(tmp_path, capsys):
    from esvit.cli.knn import main

    data = classes_folder(tmp_path / "data", {"a": 2, "b": 2})
    out = tmp_path / "knn"
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(data),
                 "--val-split", "1", "--output-dir", str(out), "--no-progress"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err and not out.exists()


def test_an_embed_folder_from_before_the_ledger_is_adopted_by_name_only(tmp_path):
    src = classes_folder(tmp_path / "src", {"x": 2, "y": 2})
    (src / "y" / "broken.png").write_bytes(b"nope")
    out = tmp_path / "out"
    embed_images(nano(), src, out, image_size=16, shard_size=2, progress=False)
    # what an earlier version left: no ledger, version-1 manifest, a stale temp file
    (out / LEDGER).unlink()
    (out / TMP_DIR).rmdir()
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"].values():
        shard["bad"] = [f"{src / 'y' / 'broken.png'}\t{reason}" for _, reason in shard["bad"]]
    manifest["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".embeddings.npy.x1y2.tmp").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ForeignFilesError, match="notes.txt"):
        embed_images(nano(), src, out, image_size=16, shard_size=2, progress=False)
    (out / "notes.txt").unlink()
    res = embed_images(nano(), src, out, image_size=16, shard_size=2, progress=False)
    assert res.skipped_shards == 3 and res.num_images == 4 and res.num_bad == 1
    assert not (out / ".embeddings.npy.x1y2.tmp").exists()


def test_knn_and_linear_output_dirs_refuse_foreign_files(ckpt, tmp_path, capsys):
    from esvit.cli.knn import main as knn_main
    from esvit.cli.linear import main as linear_main

    data = classes_folder(tmp_path / "data", {"a": 4, "b": 4})
    common = ["--checkpoint", str(ckpt), "--data", str(data), "--val-split", "1",
              "--num-workers", "0", "--no-progress"]
    out = tmp_path / "eval"
    assert knn_main([*common, "--ks", "1", "--output-dir", str(out)]) == 0
    assert linear_main([*common, "--output-dir", str(out)]) == 0  # one folder, two commands
    ledger = json.loads((out / LEDGER).read_text())["files"]
    assert ledger["knn_results.json"] == "esvit-knn" and ledger["linear_classifier.pt"] == "esvit-linear"
    assert sum(n.startswith("features/") for n in ledger) == 2  # shared feature cache
    capsys.readouterr()
    for where in (out / "summary.csv", out / "features" / "val_mine.pt"):
        where.write_text("user")
        for main, extra in ((knn_main, ["--ks", "1"]), (linear_main, [])):
            rc = main([*common, *extra, "--output-dir", str(out)])
            err = capsys.readouterr().err.strip()
            assert rc == 2 and "\n" not in err and where.relative_to(out).as_posix() in err
        assert where.read_text() == "user"
        where.unlink()
    assert knn_main([*common, "--ks", "1", "--output-dir", str(out)]) == 0


def test_correspondence_out_replaces_only_its_own_file(tmp_path, capsys):
    from esvit.cli.correspondence import main

    src = classes_folder(tmp_path / "img", {"a": 2})
    out = tmp_path / "result.json"
    out.write_text('{"accuracy": "someone else\'s"}')
    argv = ["--random", "--backbone", "vit_nano", "--backbone-kw", "patch_size=8",
            "--images", str(src), "--image-size", "16", "--out", str(out), "--num-workers", "0",
            "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out} exists and was not written by esvit-correspondence")
    assert json.loads(out.read_text()) == {"accuracy": "someone else's"}
    out.unlink()
    assert main(argv) == 0 and main(argv) == 0  # its own file is replaced
    res = json.loads(out.read_text())
    assert res["written_by"] == "esvit-correspondence" and res["images"] == 2


# ----------------------------------------------------------------------------- 6: hangs


def test_scan_skips_a_fifo_and_embed_does_not_hang(tmp_path, caplog):
    src = classes_folder(tmp_path / "src", {"a": 2, "b": 2})
    os.mkfifo(src / "a" / "zz_pipe.png")
    with deadline(60), caplog.at_level(logging.WARNING):
        res = embed_images(nano(), src, tmp_path / "out", image_size=16, num_workers=0,
                           progress=False)
    assert res.num_images == 4 and res.num_bad == 0
    assert "zz_pipe.png (FIFO)" in caplog.text and "never opened" in caplog.text


def test_a_listed_fifo_is_a_bad_file_not_a_hang(tmp_path):
    src = classes_folder(tmp_path / "src", {"a": 3})
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{src / 'a' / '00.png'}\n{pipe}\n{src / 'a' / '01.png'}\n")
    for workers in (0, 1):
        with deadline(60):
            res = embed_images(nano(), listing, tmp_path / f"out{workers}", image_size=16,
                               num_workers=workers, preprocess="resize", progress=False)
        assert res.num_images == 2 and res.num_bad == 1
        assert "not a regular file (FIFO)" in res.bad_files.read_text()
    with deadline(60):  # auto preprocessing reads image headers: not the FIFO's
        assert embed_images(nano(), listing, tmp_path / "auto", image_size=16,
                            progress=False).num_images == 2


def test_a_fifo_given_as_input_is_refused_unopened(tmp_path, capsys, ckpt):
    from esvit.cli.embed import main

    pipe = tmp_path / "input"
    os.mkfifo(pipe)
    with deadline(60):
        rc = main(["--checkpoint", str(ckpt), "--input", str(pipe), "--out", str(tmp_path / "o"),
                   "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "is a FIFO, not an image folder" in err and "\n" not in err


class _Stalls(torch.utils.data.Dataset):
    """Every item blocks for an hour, like a read from a hung network file system."""

    paths = ["/mnt/hung-nfs/img_000.jpg", "/mnt/hung-nfs/img_001.jpg", "/mnt/hung-nfs/img_002.jpg"]

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> int:
        time.sleep(3600)
        return i


def test_a_stalled_worker_gives_a_one_line_timeout_error():
    t0 = time.monotonic()
    with deadline(60), pytest.raises(LoaderStalledError) as info:
        for _ in make_loader(_Stalls(), 2, num_workers=1, timeout=1, what="train features"):
            pass
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, TimeoutError)
    assert msg.startswith("image decoding stalled: no batch of train features from 1 DataLoader "
                          "worker(s) in 1 s; waiting for batch 0 (2 images: "
                          "/mnt/hung-nfs/img_000.jpg, /mnt/hung-nfs/img_001.jpg)")
    assert "ESVIT_LOADER_TIMEOUT" in msg and time.monotonic() - t0 < 30


class _Slow(torch.utils.data.Dataset):
    paths = ["/slow/a.png", "/slow/b.png"]

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        time.sleep(1.0 if i == 0 else 0)
        return i


def test_a_slow_decode_in_the_main_process_is_reported_not_silent(caplog):
    with caplog.at_level(logging.ERROR, logger="esvit.eval"):
        got = [int(b) for b in make_loader(_Slow(), 1, num_workers=0, timeout=0.2)]
    assert got == [0, 1]
    assert "image decoding stalled" in caplog.text and "/slow/a.png" in caplog.text
    assert "still waiting" in caplog.text and "/slow/b.png" not in caplog.text


def test_loader_timeout_setting(monkeypatch):
    monkeypatch.delenv("ESVIT_LOADER_TIMEOUT", raising=False)
    assert loader_timeout() == 600.0 and loader_timeout(5) == 5.0
    monkeypatch.setenv("ESVIT_LOADER_TIMEOUT", "2.5")
    assert loader_timeout() == 2.5
    monkeypatch.setenv("ESVIT_LOADER_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="ESVIT_LOADER_TIMEOUT must be a number"):
        loader_timeout()
    with pytest.raises(ValueError, match=">= 0"):
        loader_timeout(-1)


def test_embed_cli_with_a_stalled_worker_stops_with_one_line(tmp_path, capsys, monkeypatch, ckpt):
    import esvit.embed
    from esvit.cli.embed import main

    src = classes_folder(tmp_path / "src", {"a": 2, "b": 2})
    out = tmp_path / "out"
    monkeypatch.setattr(esvit.embed._ImageList, "__getitem__", _Stalls.__getitem__)
    monkeypatch.setenv("ESVIT_LOADER_TIMEOUT", "1")
    with deadline(90):
        rc = main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(out),
                   "--num-workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 124 and err[-1].startswith("error: image decoding stalled: no batch of images to "
                                          "embed from 1 DataLoader worker(s) in 1 s")
    assert str(src / "a" / "00.png") in err[-1] and not (out / "embeddings.npy").exists()
    monkeypatch.undo()
    assert main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(out),
                 "--num-workers", "0", "--no-progress"]) == 0  # the folder is still ours


# ----------------------------------------------------------------------------- 9: meaning


def test_a_one_class_bank_is_refused_by_knn_and_linear(ckpt, tmp_path, capsys):
    from esvit.cli.knn import main as knn_main
    from esvit.eval.linear import linear_probe

    data = classes_folder(tmp_path / "data", {"only": 6})
    out = tmp_path / "knn"
    rc = knn_main(["--checkpoint", str(ckpt), "--data", str(data), "--val-split", "2", "--ks",
                   "1", "--output-dir", str(out), "--num-workers", "0", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the INFO log lines
    assert rc == 2
    assert err.startswith("error: the bank holds 4 images of a single class (only): every "
                          "prediction is that class, so top-1 would be 100%")
    assert not (out / "knn_results.json").exists()
    with pytest.raises(MeaninglessEvaluationError, match="training set holds 4 images of a single"):
        linear_probe(ckpt, data, val_split=2, progress=False)


def test_a_validation_class_absent_from_the_bank_is_refused(ckpt, tmp_path):
    from esvit.eval.knn import knn_eval
    from esvit.eval.linear import linear_probe

    train = classes_folder(tmp_path / "train", {"a": 3, "b": 3})
    (train / "c").mkdir()  # an empty class folder: kept as a class, no bank image
    val = classes_folder(tmp_path / "val", {"a": 1, "b": 1, "c": 2}, seed=7)
    with pytest.raises(MeaninglessEvaluationError,
                       match=r"validation class\(es\) with no bank image: c \(2 of 4"):
        knn_eval(ckpt, train, val, ks=(1,), progress=False)
    with pytest.raises(MeaninglessEvaluationError, match="no training set image: c"):
        linear_probe(ckpt, train, val, progress=False)


def test_a_bank_class_whose_images_are_all_unreadable_is_refused(ckpt, tmp_path):
    from esvit.eval.knn import knn_eval

    train = classes_folder(tmp_path / "train", {"a": 3})
    (train / "b").mkdir()
    for i in range(3):
        (train / "b" / f"{i}.png").write_bytes(b"truncated")
    val = classes_folder(tmp_path / "val", {"a": 2, "b": 2}, seed=3)
    with pytest.raises(MeaninglessEvaluationError, match="single class"):
        knn_eval(ckpt, train, val, ks=(1,), progress=False)


def test_results_state_what_they_were_computed_on(ckpt, tmp_path):
    from esvit.eval.knn import describe_knn, knn_eval

    train = classes_folder(tmp_path / "train", {"a": 4, "b": 4})
    val = classes_folder(tmp_path / "val", {"a": 3, "b": 1}, seed=11)  # imbalanced
    res = knn_eval(ckpt, train, val, ks=(1, 8), output_dir=tmp_path / "o", progress=False)
    saved = json.loads((tmp_path / "o" / "knn_results.json").read_text())
    for r in (res, saved):
        assert (r["n_bank"], r["n_val"], r["num_classes"], r["ks"]) == (8, 4, 2, [1, 8])
        assert r["chance"]["top1"] == pytest.approx(75.0)  # always answering "a"
        assert r["flags"] == ["tiny validation set: 4 images (one image is 25 points of top-1; "
                              "chance top-1 75.00%)"]
        assert r["preprocess"]["protocol"] == "resize" and r["protocol"] == "knn"
    lines = describe_knn(res)
    assert all("4 val images, bank 8 images, 2 classes; chance top-1 75.00%" in x
               for x in lines[:2])
    assert lines[2].startswith("warning: tiny validation set: 4 images")


def test_low_level_knn_and_the_monitor_refuse_one_class(tmp_path):
    from esvit.eval.knn import knn_accuracies, knn_accuracy
    from esvit.eval.monitor import monitor_preprocess

    x = torch.randn(10, 4)
    with pytest.raises(MeaninglessEvaluationError, match="single class"):
        knn_accuracy(x, torch.zeros(10, dtype=torch.long), x[:3], torch.zeros(3, dtype=torch.long))
    with pytest.raises(MeaninglessEvaluationError, match=r"no bank image: 2"):
        knn_accuracies(x, torch.arange(10) % 2, x[:3], torch.tensor([0, 1, 2]), ks=(1,))
    data = classes_folder(tmp_path / "data", {"only": 3})
    with pytest.raises(MeaninglessEvaluationError, match="single class"):
        monitor_preprocess(str(data), str(data), 16, 16)  # at start-up, before any training
    two = classes_folder(tmp_path / "two", {"a": 2, "b": 2})
    with pytest.raises(MeaninglessEvaluationError, match=r"k=20 is larger than the bank \(4"):
        monitor_preprocess(str(two), str(two), 16, 16, k=20)


def test_evaluation_basis_chance_levels_and_overlap():
    basis = evaluation_basis("knn", [0, 1, 2, 3, 4, 5] * 3, [0] * 5 + [1, 2, 3, 4, 5], 6,
                             bank_paths=["p0", "p1"], val_paths=["p1", "p9"], log_flags=False)
    assert basis.chance == {"top1": 50.0, "top5": 90.0} and basis.val_in_bank == 1
    assert basis.flags[1].startswith("1 of 10 validation images are also bank images")
    with pytest.raises(MeaninglessEvaluationError, match="validation set is empty"):
        evaluation_basis("knn", [0, 1], [], 2)


def test_correspondence_refuses_one_token_and_flags_few_images(tmp_path, capsys):
    from esvit.eval.correspondence import measure_correspondence

    src = classes_folder(tmp_path / "img", {"a": 3})
    net_spec = nano()
    with pytest.raises(ValueError, match=r"1 region token\(s\) at this image size"):
        measure_correspondence(net_spec, src, image_size=8, device="cpu")
    res = measure_correspondence(net_spec, src, image_size=16, device="cpu")
    assert (res["images"], res["n_tokens"], res["chance"]) == (3, 4, 0.25)
    assert res["flags"] == ["tiny image set: the scores are means over 3 image(s)"]
    assert res["protocol"] == "flip correspondence"


if sys.platform == "win32":  # pragma: no cover - FIFOs and fork are POSIX
    pytest.skip("POSIX only", allow_module_level=True)
