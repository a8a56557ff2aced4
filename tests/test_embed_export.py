"""Tests for backbone loading / export (esvit.export) and embedding extraction (esvit.embed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from esvit.backbones import build_backbone, torchvision_equivalent
from esvit.export import export_backbone, load_backbone, load_backbone_info
from esvit.train.checkpoint import CheckpointError, atomic_save
from esvit.trainer import EsViTTrainer

BACKBONES = {"cifar_resnet18": {}, "vit_tiny": {"depth": 2}}


def make_training_checkpoint(path: Path, name: str, kwargs: dict, perturb_student: bool = True
                             ) -> EsViTTrainer:
    """Save a checkpoint in the format of esvit.train.loop.save_checkpoint."""
    torch.manual_seed(0)
    trainer = EsViTTrainer.from_backbone(
        name, kwargs, out_dim=64, hidden_dim=32, bottleneck_dim=16, global_size=32,
        local_size=16, n_local=1,
    )
    if perturb_student:
        with torch.no_grad():
            for p in trainer.student.parameters():
                p.add_(0.05 * torch.randn_like(p))
    state = {
        "format_version": 1,
        "step": 3,
        "backbone": name,
        "student": trainer.student.state_dict(),
        "teacher": trainer.teacher.state_dict(),
        "view_center": trainer.view_loss.center.center,
        "region_center": None,
        "optimizer": torch.optim.SGD(trainer.student.parameters(), lr=0.0).state_dict(),
        "scaler": {},
        "rng": [],
        "config": {"model": {"backbone": name, "backbone_kwargs": dict(kwargs)},
                   "augment": {"global_size": 32}},
        "wandb_run_id": None,
    }
    atomic_save(state, path)
    return trainer.eval()


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EsViTTrainer]:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_00000003.pt"
    return path, make_training_checkpoint(path, "cifar_resnet18", {})


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_backbone_teacher_and_student(resnet_ckpt):
    path, trainer = resnet_ckpt
    teacher, spec = load_backbone(path)
    student, _ = load_backbone(path, checkpoint_key="student")
    assert spec.name == "cifar_resnet18"
    assert _same(teacher, trainer.teacher.backbone.net)
    assert _same(student, trainer.student.backbone.net)
    assert not _same(teacher, student)
    assert not teacher.training
    info = load_backbone_info(path)
    assert info.image_size == 32 and info.source == "training" and info.checkpoint_key == "teacher"
    with pytest.raises(ValueError, match="checkpoint_key"):
        load_backbone(path, checkpoint_key="ema")


def test_load_backbone_wrong_architecture_names_keys(resnet_ckpt, tmp_path):
    path, trainer = resnet_ckpt
    # recorded name contradicts the requested one
    with pytest.raises(CheckpointError, match="'vit_tiny' was requested"):
        load_backbone(path, backbone="vit_tiny", backbone_kwargs={"depth": 2})
    # bare state dict of a ResNet loaded as a ViT: the error lists mismatched keys
    bare = tmp_path / "bare.pt"
    torch.save(trainer.teacher.backbone.net.state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"missing keys \(first: class_token") as e:
        load_backbone(bare, backbone="vit_tiny", backbone_kwargs={"depth": 2})
    assert "unexpected keys (first: conv1.weight" in str(e.value)
    # a bare state dict without a backbone name is refused with a hint
    with pytest.raises(CheckpointError, match="pass backbone="):
        load_backbone(bare)
    net, _ = load_backbone(bare, backbone="cifar_resnet18")
    assert _same(net, trainer.teacher.backbone.net)
    # a DDP-prefixed bare state dict also loads
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, bare)
    net2, _ = load_backbone(bare, backbone="cifar_resnet18")
    assert _same(net2, net)


def test_load_backbone_shape_mismatch(tmp_path):
    path = tmp_path / "vit.pt"
    make_training_checkpoint(path, "vit_tiny", {"depth": 2}, perturb_student=False)
    with pytest.raises(CheckpointError, match="shape mismatches .*pos_embedding"):
        load_backbone(path, backbone_kwargs={"image_size": 64})


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_export_matches_torchvision(name, tmp_path):
    kwargs = BACKBONES[name]
    ckpt = tmp_path / "checkpoint.pt"
    trainer = make_training_checkpoint(ckpt, name, kwargs)
    out = export_backbone(ckpt, tmp_path / "exported" / "backbone.pt")
    assert out.is_file() and not list(out.parent.glob("*.tmp"))
    state = torch.load(out, weights_only=True)  # a plain state dict
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["backbone"] == name and card["backbone_kwargs"] == kwargs and card["image_size"] == 32
    tv = torchvision_equivalent(name, **card["backbone_kwargs"])
    tv.load_state_dict(state, strict=True)
    tv.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = trainer.teacher.backbone(x)[0]
        got = tv(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # the export loads back through load_backbone, and student export differs from teacher
    net, spec = load_backbone(out)
    assert spec.name == name and _same(net, trainer.teacher.backbone.net)
    out_s = export_backbone(ckpt, tmp_path / "student.pt", checkpoint_key="student")
    s_net, _ = load_backbone(out_s)
    assert _same(s_net, trainer.student.backbone.net) and not _same(s_net, net)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"teacher": {"backbone.net.x": torch.zeros(1)}, "payload": _Exploit()}, evil)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_backbone(evil)
    with pytest.raises(CheckpointError):
        export_backbone(evil, tmp_path / "out.pt")
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_missing_file_and_wrong_key(tmp_path, resnet_ckpt):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone(tmp_path / "nope.pt")
    path, trainer = resnet_ckpt
    obj = torch.load(path, weights_only=True)
    del obj["teacher"]
    only_student = tmp_path / "student_only.pt"
    torch.save(obj, only_student)
    with pytest.raises(CheckpointError, match=r"no 'teacher' weights; available: \['student'\]"):
        load_backbone(only_student)


def test_build_backbone_unchanged_by_load(resnet_ckpt):
    # loading must not leave hooks or training mode behind
    path, _ = resnet_ckpt
    net, spec = load_backbone(path)
    fresh, _ = build_backbone(spec.name)
    assert set(net.state_dict()) == set(fresh.state_dict())
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


# ----------------------------------------------------------------------------- embeddings


def write_images(root: Path, per_class: int = 4, size: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("img") / "data", per_class=5)


def _read_csv(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_embed_npy_csv_matches_direct_features(images, resnet_ckpt, tmp_path, capsys):
    import numpy as np

    from esvit.cli.embed import main
    from esvit.data.decode import load_image
    from esvit.eval.features import FeatureEncoder, preprocess

    path, trainer = resnet_ckpt
    out = tmp_path / "emb"
    rc = main(["--checkpoint", str(path), "--input", str(images), "--out", str(out),
               "--batch-size", "3", "--shard-size", "4", "--num-workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "embedded 10 images (dim 512)" in printed
    # 32 px images at evaluation size 32: decoded at their own size (auto chose resize)
    assert "preprocessing: resize (short side 32, centre square), auto" in printed
    emb = np.load(out / "embeddings.npy")
    rows = _read_csv(out / "embeddings.csv")
    assert emb.shape == (10, 512) and emb.dtype == np.float32
    assert rows[0] == ["row", "path", "label"] and len(rows) == 11
    paths = [r[1] for r in rows[1:]]
    assert paths == sorted(paths) and [r[2] for r in rows[1:]] == ["cat"] * 5 + ["dog"] * 5
    # merged, then the shards (of 4, 4, 2) deleted: each embedding is stored once
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    assert set(files) == {"embeddings.npy", "embeddings.csv", "manifest.json", "esvit_outputs.json"}
    assert files["embeddings.npy"] < emb.nbytes + 1024
    ledger = json.loads((out / "esvit_outputs.json").read_text())["files"]
    assert sorted(ledger) == ["embeddings.csv", "embeddings.npy", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merged"] == {"rows": 10, "files": ["embeddings.npy"]}
    assert sorted(manifest["shards"]) == ["0", "1", "2"]
    enc = FeatureEncoder(trainer.teacher.backbone.net, load_backbone(path)[1]).eval()
    x = torch.stack([load_image(p, 32) for p in paths[:3]])
    with torch.no_grad():
        ref = enc(preprocess(x, 32)).numpy()
    np.testing.assert_allclose(emb[:3], ref, rtol=1e-4, atol=1e-4)


def test_embed_float16_regions_and_resume(images, resnet_ckpt, tmp_path):
    import numpy as np

    import esvit.embed

    path, _ = resnet_ckpt
    out = tmp_path / "emb16"
    kw = dict(dtype="float16", regions=True, shard_size=4, batch_size=4, progress=False)
    res = esvit.embed(path, images, out, **kw)
    emb, reg = np.load(res.embeddings), np.load(res.regions)
    assert emb.dtype == np.float16 and emb.shape == (10, 512)
    assert reg.dtype == np.float16 and reg.shape == (10, 16, 512)  # 32 px / 8 -> 4x4 tokens
    assert res.shards == [] and not list(out.glob("regions_*")) + list(out.glob("embeddings_*"))
    np.testing.assert_allclose(reg.astype(np.float32).mean(1), emb.astype(np.float32),
                               rtol=1e-2, atol=1e-2)
    # a finished run is not recomputed
    again = esvit.embed(path, images, out, **kw)
    assert again.skipped_shards == 3 and np.array_equal(np.load(again.embeddings), emb)
    # merged files lost (the shards are gone): everything is embedded again
    (out / "embeddings.npy").unlink()
    redone = esvit.embed(path, images, out, **kw)
    assert redone.skipped_shards == 0 and np.array_equal(np.load(redone.embeddings), emb)
    # other settings in the same folder are refused unless overwrite
    with pytest.raises(ValueError, match="other settings .*dtype"):
        esvit.embed(path, images, out, **{**kw, "dtype": "float32"})
    fresh = esvit.embed(path, images, out, **{**kw, "dtype": "float32"}, overwrite=True)
    assert fresh.skipped_shards == 0 and np.load(fresh.embeddings).dtype == np.float32


def _ledger_matches_folder(out: Path, finished: bool = True) -> None:
    """Every file is listed; once finished, nothing else is (a killed run may have listed a
    file it was about to write)."""
    listed = set(json.loads((out / "esvit_outputs.json").read_text())["files"])
    present = {p.name for p in out.iterdir() if p.is_file()} - {"esvit_outputs.json"}
    assert present == listed if finished else present <= listed


def test_embed_killed_mid_extraction_resumes_and_reads(images, resnet_ckpt, tmp_path,
                                                       monkeypatch):
    import numpy as np

    import esvit.embed as emb_mod
    from esvit.viz.embeddings import read_embeddings

    path, _ = resnet_ckpt
    kw = dict(shard_size=4, batch_size=2, regions=True, progress=False)
    ref = emb_mod.embed_images(path, images, tmp_path / "ref", **kw)
    out = tmp_path / "emb"
    real_add = emb_mod._ShardSink.add

    def add(self, shard, *args, **kwargs):  # killed in the third shard
        real_add(self, shard, *args, **kwargs)
        if shard == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(emb_mod._ShardSink, "add", add)
    with pytest.raises(KeyboardInterrupt):
        emb_mod.embed_images(path, images, out, **kw)
    monkeypatch.undo()
    # the unfinished folder: two shards, readable as they are
    assert sorted(p.name for p in out.glob("embeddings*")) == ["embeddings_00000.npy",
                                                                "embeddings_00001.npy"]
    part = read_embeddings(out)
    assert len(part.x) == 8 and part.paths == [r[1] for r in _read_csv(ref.csv)[1:9]]
    _ledger_matches_folder(out, finished=False)
    res = emb_mod.embed_images(path, images, out, **kw)
    assert res.skipped_shards == 2 and res.shards == []
    np.testing.assert_allclose(np.load(res.embeddings), np.load(ref.embeddings), atol=1e-6)
    np.testing.assert_allclose(np.load(res.regions), np.load(ref.regions), atol=1e-6)
    assert np.allclose(read_embeddings(out).x, np.load(ref.embeddings), atol=1e-6)
    _ledger_matches_folder(out)


def test_embed_killed_while_merging_loses_nothing(images, resnet_ckpt, tmp_path, monkeypatch):
    import numpy as np

    import esvit.embed as emb_mod
    from esvit.eval.outputs import OutputFolder
    from esvit.viz.embeddings import read_embeddings

    path, _ = resnet_ckpt
    kw = dict(shard_size=4, batch_size=4, progress=False)
    ref = np.load(emb_mod.embed_images(path, images, tmp_path / "ref", **kw).embeddings)
    out = tmp_path / "emb"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    # 1. killed after the merged file is written, before the manifest records it
    monkeypatch.setattr(emb_mod, "_check_merge", killed)
    with pytest.raises(KeyboardInterrupt):
        emb_mod.embed_images(path, images, out, **kw)
    monkeypatch.undo()
    assert "merged" not in json.loads((out / "manifest.json").read_text())
    assert len(list(out.glob("embeddings_*.npy"))) == 3
    assert np.allclose(read_embeddings(out).x, ref, atol=1e-6)
    # 2. killed after the manifest records the merge, while deleting the shards
    real_remove = OutputFolder.remove

    def remove(self, names):
        names = list(names)
        if any(n.startswith("embeddings_") for n in names):
            real_remove(self, names[:1])
            raise KeyboardInterrupt
        return real_remove(self, names)

    monkeypatch.setattr(OutputFolder, "remove", remove)
    with pytest.raises(KeyboardInterrupt):
        emb_mod.embed_images(path, images, out, **kw)
    monkeypatch.undo()
    assert json.loads((out / "manifest.json").read_text())["merged"]["rows"] == 10
    assert len(list(out.glob("embeddings_*.npy"))) == 2
    assert np.allclose(read_embeddings(out).x, ref, atol=1e-6)
    # the next run finds the merged file and deletes what is left of the shards
    res = emb_mod.embed_images(path, images, out, **kw)
    assert res.skipped_shards == 3 and not list(out.glob("*_0000*"))
    assert np.allclose(np.load(res.embeddings), ref, atol=1e-6)
    _ledger_matches_folder(out)


def test_embed_pt_format_list_file_and_bad_images(images, resnet_ckpt, tmp_path, caplog):
    import numpy as np

    from esvit.embed import embed_images

    path, _ = resnet_ckpt
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    good = sorted(str(p) for p in images.rglob("*.png"))[:3]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([good[0], str(bad), good[1], good[2]]) + "\n")
    res = embed_images(path, listing, tmp_path / "out", format="pt", shard_size=2, batch_size=2,
                       progress=False)
    assert res.num_images == 3 and res.num_bad == 1
    blob = torch.load(res.embeddings, weights_only=True)
    assert blob["embeddings"].shape == (3, 512)
    assert [r[1] for r in _read_csv(res.csv)[1:]] == good
    assert res.bad_files.read_text().startswith(f"{bad}\t")
    assert "skipped 1 unreadable image" in caplog.text
    npy = embed_images(path, [good[0], good[1], good[2]], tmp_path / "out2", progress=False)
    np.testing.assert_allclose(np.load(npy.embeddings), blob["embeddings"].numpy(), atol=1e-5)


def test_embed_errors(resnet_ckpt, tmp_path, capsys):
    from esvit.cli.embed import main

    path, _ = resnet_ckpt
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    rc = main(["--checkpoint", str(path), "--input", str(empty), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: no images found") and "\n" not in err
    try:
        import safetensors  # noqa: F401
    except ImportError:
        write_images(tmp_path / "imgs", per_class=1)
        rc = main(["--checkpoint", str(path), "--input", str(tmp_path / "imgs"), "--out",
                   str(tmp_path / "o"), "--format", "safetensors", "--no-progress"])
        assert rc == 2 and "pip install safetensors" in capsys.readouterr().err


def test_cli_export(resnet_ckpt, tmp_path, capsys):
    from esvit.cli.export import main

    path, trainer = resnet_ckpt
    out = tmp_path / "backbone.pt"
    assert main(["--checkpoint", str(path), "--key", "student", "--out", str(out)]) == 0
    assert "exported student backbone" in capsys.readouterr().out
    tv = torchvision_equivalent("cifar_resnet18")
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)  # a plain state dict
    assert _same(tv, trainer.student.backbone.net)
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")
