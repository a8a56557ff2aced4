"""Evaluation preprocessing protocols (``dino`` / ``resize`` / ``auto``) of kNN, linear probe,
embeddings and the online kNN monitor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from esvit.eval.features import (
    EvalPreprocess,
    LabeledImages,
    center_crop,
    dataset_identity,
    dino_resize_size,
    image_short_sides,
    resolve_preprocess,
)

# ----------------------------------------------------------------------------- helpers


def smooth_photo(width: int, height: int, seed: int = 0, period: float = 300.0) -> np.ndarray:
    """A smooth ``(h, w, 3)`` uint8 image: colour waves of ``period`` to ``1.5 * period`` px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(1 / (1.5 * period), 1 / period, 2).tolist() + [rng.uniform(0, 6.3)]
        chans.append(127 + 60 * np.sin(2 * np.pi * fx * xx + ph) + 60 * np.cos(2 * np.pi * fy * yy - ph))
    return np.clip(np.rint(np.stack(chans, -1)), 0, 255).astype(np.uint8)


def write_folder(root: Path, size: tuple[int, int], per_class: int = 6, seed: int = 0) -> Path:
    """Two separable classes (reddish / bluish smooth images) of ``size = (w, h)`` PNGs."""
    rng = np.random.default_rng(seed)
    for c, (name, shift) in enumerate((("blue", (-60, 0, 60)), ("red", (60, 0, -60)))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = smooth_photo(*size, seed=seed * 1000 + c * 100 + i).astype(np.int16)
            a = a // 2 + np.array(shift, dtype=np.int16) + 64 + rng.integers(-5, 6, a.shape)
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def save_checkpoint(path: Path) -> Path:
    """A tiny cifar_resnet18 training checkpoint (evaluation size 32)."""
    from esvit.train.checkpoint import atomic_save
    from esvit.trainer import EsViTTrainer

    torch.manual_seed(0)
    trainer = EsViTTrainer.from_backbone("cifar_resnet18", {}, out_dim=64, hidden_dim=32,
                                         bottleneck_dim=16, global_size=32, local_size=16, n_local=1)
    atomic_save({"step": 1, "backbone": "cifar_resnet18", "student": trainer.student.state_dict(),
                 "teacher": trainer.teacher.state_dict(),
                 "config": {"model": {"backbone": "cifar_resnet18", "backbone_kwargs": {}},
                            "augment": {"global_size": 32}}}, path)
    return path


def torchvision_dino(img: Image.Image, size: int = 224) -> torch.Tensor:
    """The official eval transform (eval_knn.py / eval_linear.py) up to ToTensor, as uint8."""
    t = T.Compose([T.Resize(dino_resize_size(size), interpolation=T.InterpolationMode.BICUBIC),
                   T.CenterCrop(size)])
    return torch.from_numpy(np.array(t(img))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint_00000001.pt")


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images larger than the evaluation size 32 (60x45, like a 4:3 photo)."""
    return write_folder(tmp_path_factory.mktemp("large") / "train", (60, 45))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-sized 32 px images."""
    return write_folder(tmp_path_factory.mktemp("small") / "train", (32, 32))


# ----------------------------------------------------------------------------- the dino protocol


@pytest.mark.parametrize("size", [(500, 375), (375, 500)])
def test_dino_protocol_matches_torchvision_resize256_centercrop224(tmp_path, size):
    path = tmp_path / "photo.png"
    Image.fromarray(smooth_photo(*size)).save(path)
    pre = resolve_preprocess("dino", 224)
    assert (pre.decode_size, pre.crop_size, pre.item_size) == (256, 224, 224)
    ours = pre.decode(path)
    pil = Image.open(path).convert("RGB")
    ref = torchvision_dino(pil)
    assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == torch.uint8
    diff = (ours.int() - ref.int()).abs()
    # torchvision rounds the resized long side (341.33 -> 341 px) and the crop offset (58.5 -> 58),
    # so its crop sits 0.4-0.6 output px off the exact centre along the long side (and is 0.1 %
    # narrower); the decode path resamples the exact centre. On smooth content that is a few
    # grey levels at most.
    assert diff.max() <= 3 and diff.float().mean() < 0.6, (diff.max(), diff.float().mean())
    # ... while the decode path is the ideal protocol: the central 0.875 of the short side, one
    # bicubic resample to 224 (a PIL box resize). Bit for bit on the landscape image; on the
    # portrait one Pillow's two uint8 passes round a grey level or two apart on ~1 % of pixels.
    w, h = size
    side = min(w, h) * 0.875
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    ideal = torch.from_numpy(np.array(pil.resize((224, 224), Image.Resampling.BICUBIC, box=box)))
    off = (ours.int() - ideal.permute(2, 0, 1).int()).abs()
    assert off.max() <= (0 if w > h else 2) and (off > 0).float().mean() < 0.02


@pytest.mark.parametrize("size", [(576, 384), (768, 512)])
def test_dino_protocol_is_torchvisions_bit_for_bit_where_its_rounding_is_exact(tmp_path, size):
    # 3:2 images: the long side resizes to exactly 384 px and the crop offset is an integer, so
    # the two pipelines sample the same points: equal even on white noise
    path = tmp_path / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    ours = resolve_preprocess("dino", 224).decode(path)
    assert torch.equal(ours, torchvision_dino(Image.open(path).convert("RGB")))


def test_dino_protocol_on_a_large_jpeg_decoded_in_draft_mode(tmp_path):
    # a 2000x1500 JPEG is decoded by libjpeg at 1/4 scale (500x375, still >= 256) and reduced with
    # reducing_gap=3 where torchvision resamples the full image: close, not equal
    path = tmp_path / "photo.jpg"
    Image.fromarray(smooth_photo(2000, 1500, seed=3, period=1200)).save(path, quality=92)
    ours = resolve_preprocess("dino", 224).decode(path)
    ref = torchvision_dino(Image.open(path).convert("RGB"))
    diff = (ours.int() - ref.int()).abs()
    assert diff.max() <= 4 and diff.float().mean() < 0.7, (diff.max(), diff.float().mean())


@pytest.mark.parametrize("hw,size", [((256, 256), 224), ((37, 37), 32), ((41, 39), 32), ((3, 10), 3)])
def test_center_crop_offsets_match_torchvision(hw, size):
    x = torch.arange(3 * hw[0] * hw[1]).view(3, *hw)
    assert torch.equal(center_crop(x, size), TF.center_crop(x, [size, size]))
    with pytest.raises(ValueError, match="cannot centre-crop"):
        center_crop(x, max(hw) + 1)


def test_dino_resize_sizes():
    assert [dino_resize_size(s) for s in (224, 96, 32, 384)] == [256, 110, 37, 439]


# ----------------------------------------------------------------------------- auto


def test_auto_picks_dino_for_large_images_and_resize_for_cifar(large, small):
    large_paths = sorted(str(p) for p in large.rglob("*.png"))
    small_paths = sorted(str(p) for p in small.rglob("*.png"))
    assert image_short_sides(large_paths) == [45] * 12
    auto = resolve_preprocess("auto", 32, large_paths)
    assert (auto.protocol, auto.decode_size, auto.crop_size) == ("dino", 37, 32)
    assert auto.record() == {"protocol": "dino", "requested": "auto", "image_size": 32,
                             "decode_size": 37, "crop_size": 32, "median_short_side": 45}
    # CIFAR: 32 px images at evaluation size 32 are decoded at their own size (today's path)
    cifar = resolve_preprocess("auto", 32, small_paths)
    assert (cifar.protocol, cifar.decode_size, cifar.crop_size) == ("resize", 32, None)
    # images smaller than the evaluation size are not centre-cropped either
    assert resolve_preprocess("auto", 224, large_paths).protocol == "resize"
    # an explicit decode size is the resize protocol's
    assert resolve_preprocess("auto", 32, large_paths, canvas_size=48).decode_size == 48
    assert resolve_preprocess("auto", 32, large_paths, canvas_size=48).protocol == "resize"
    assert resolve_preprocess("resize", 32, large_paths).decode_size == 32
    # unreadable / no images: nothing to judge -> resize
    assert resolve_preprocess("auto", 32, [str(large / "missing.png")]).protocol == "resize"
    with pytest.raises(ValueError, match="preprocess must be one of"):
        resolve_preprocess("bilinear", 32)
    with pytest.raises(ValueError, match="decodes at round"):
        resolve_preprocess("dino", 32, canvas_size=48)
    assert resolve_preprocess("dino", 32, canvas_size=48, allow_canvas=True).decode_size == 37


def test_labeled_images_dino_items_and_identity(large):
    paths = sorted(str(p) for p in large.rglob("*.png"))
    ds = LabeledImages(paths, [0] * len(paths), 32)
    dino = ds.with_preprocess(resolve_preprocess("dino", 32))
    image, label, ok, i = dino[3]
    assert ok and i == 3 and image.shape == (3, 32, 32)
    assert torch.equal(image, resolve_preprocess("dino", 32).decode(paths[3]))
    assert ds[3][0].shape == (3, 32, 32) and not torch.equal(ds[3][0], image)
    assert ds.paths is dino.paths and ds.crop_size is None  # shared, original unchanged
    a, b = dataset_identity(ds), dataset_identity(dino)
    assert a["preprocess"] == "resize" and b["preprocess"] == "dino" and b["crop_size"] == 32
    assert a["paths_labels"] == b["paths_labels"] and a != b
    bad = LabeledImages([str(large / "nope.png")], [0], 37, crop_size=32)
    assert bad[0][0].shape == (3, 32, 32) and bad[0][2] is False
    with pytest.raises(ValueError, match="crop_size"):
        LabeledImages(paths, [0] * len(paths), 32, crop_size=40)


# ----------------------------------------------------------------------------- results record it


def test_knn_and_linear_results_record_the_protocol_and_cache_by_it(large, small, ckpt, tmp_path,
                                                                   monkeypatch):
    from esvit.eval import features as feat_mod
    from esvit.eval.knn import knn_eval
    from esvit.eval.linear import linear_probe
    from esvit.train.checkpoint import safe_load

    out = tmp_path / "knn"
    res = knn_eval(ckpt, large, val_split=2, ks=(1, 3), output_dir=out, progress=False)
    saved = json.loads((out / "knn_results.json").read_text())
    assert res["preprocess"]["protocol"] == saved["preprocess"]["protocol"] == "dino"
    assert saved["preprocess"]["requested"] == "auto" and saved["preprocess"]["decode_size"] == 37
    calls: list[int] = []
    real = feat_mod.encode_views
    monkeypatch.setattr(feat_mod, "encode_views", lambda *a, **k: calls.append(1) or real(*a, **k))
    # explicit dino = what auto chose: served from the cache; resize: new cache entries
    again = knn_eval(ckpt, large, val_split=2, ks=(1, 3), output_dir=out, preprocess="dino",
                     progress=False)
    assert calls == [] and again["knn"] == res["knn"] and again["preprocess"]["requested"] == "dino"
    resized = knn_eval(ckpt, large, val_split=2, ks=(1, 3), output_dir=out, preprocess="resize",
                       progress=False)
    assert len(calls) == 2 and len(list((out / "features").glob("*.pt"))) == 4
    assert resized["preprocess"] == {"protocol": "resize", "requested": "resize", "image_size": 32,
                                     "decode_size": 32, "crop_size": None}
    # cached dino features are those of the decoded, centre-cropped images
    cache = [safe_load(p) for p in (out / "features").glob("features_*.pt")]
    dino_val = next(c for c in cache if c["key"]["data"]["preprocess"] == "dino")
    assert dino_val["key"]["data"]["crop_size"] == 32

    lin = tmp_path / "lin"
    res = linear_probe(ckpt, small, val_split=2, output_dir=lin, progress=False)
    saved = json.loads((lin / "linear_results.json").read_text())
    assert saved["preprocess"]["protocol"] == "resize" and saved["preprocess"]["decode_size"] == 32
    assert safe_load(lin / "linear_classifier.pt")["preprocess"]["protocol"] == "resize"
    aug = linear_probe(ckpt, large, val_split=2, mode="augment", epochs=1, batch_size=4,
                       preprocess="dino", canvas_size=48, progress=False)
    assert aug["preprocess"]["protocol"] == "dino" and aug["preprocess"]["decode_size"] == 37


def test_knn_dino_features_equal_direct_decode_and_crop(large, ckpt):
    from esvit.eval.features import encode_dataset, preprocess, resolve_eval_model

    model = resolve_eval_model(ckpt, device=torch.device("cpu"))
    paths = sorted(str(p) for p in large.rglob("*.png"))
    pre = resolve_preprocess("auto", model.image_size, paths)
    ds = LabeledImages(paths, [0] * 6 + [1] * 6, 32).with_preprocess(pre)
    feats, labels, _ = encode_dataset(model, ds, torch.device("cpu"), batch_size=5)
    x = torch.stack([center_crop(torch.from_numpy(np.array(
        Image.open(p).convert("RGB").resize((37, 37), Image.Resampling.BICUBIC,
                                            box=(7.5, 0, 52.5, 45)))).permute(2, 0, 1), 32)
        for p in paths[:2]])
    with torch.no_grad():
        ref = model.encoder(preprocess(x.contiguous()))
    torch.testing.assert_close(feats[:2], ref, atol=1e-4, rtol=1e-4)
    assert labels.tolist() == [0] * 6 + [1] * 6


def test_embed_records_the_protocol(large, ckpt, tmp_path, capsys):
    from esvit.cli.embed import main
    from esvit.embed import embed_images

    res = embed_images(ckpt, large, tmp_path / "emb", batch_size=4, progress=False)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert res.preprocess["protocol"] == "dino" and manifest["preprocess"] == res.preprocess
    assert manifest["settings"]["preprocess"] == "dino" and manifest["settings"]["crop_size"] == 32
    # another protocol in the same folder is another extraction
    with pytest.raises(ValueError, match="other settings .*preprocess"):
        embed_images(ckpt, large, tmp_path / "emb", preprocess="resize", progress=False)
    rc = main(["--checkpoint", str(ckpt), "--input", str(large), "--out", str(tmp_path / "r"),
               "--preprocess", "resize", "--num-workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "preprocessing: resize (short side 32, centre square)" in out


def test_embed_resumes_a_manifest_written_before_the_protocol_was_recorded(small, ckpt, tmp_path):
    from esvit.embed import embed_images

    out = tmp_path / "emb"
    first = embed_images(ckpt, small, out, shard_size=4, progress=False)
    assert first.preprocess["protocol"] == "resize"
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("preprocess", "crop_size"):
        manifest["settings"].pop(key)
    manifest.pop("preprocess")
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = embed_images(ckpt, small, out, shard_size=4, progress=False)
    assert again.skipped_shards == 3
    # ... but it was the resize protocol: asking for dino is another extraction
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"differs: canvas_size, crop_size, preprocess\)"):
        embed_images(ckpt, small, out, shard_size=4, preprocess="dino", progress=False)


def test_cli_knn_preprocess_option(large, ckpt, tmp_path, capsys):
    from esvit.cli.knn import main

    out = tmp_path / "k"
    rc = main(["--checkpoint", str(ckpt), "--data", str(large), "--val-split", "2", "--ks", "1",
               "--output-dir", str(out), "--num-workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "preprocessing: dino (short side 37 bicubic, centre crop 32), auto" in printed
    assert json.loads((out / "knn_results.json").read_text())["preprocess"]["protocol"] == "dino"
    rc = main(["--checkpoint", str(ckpt), "--data", str(large), "--val-split", "2",
               "--preprocess", "dino", "--canvas-size", "48", "--output-dir", str(out),
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: canvas_size is the decode size") and "\n" not in err


# ----------------------------------------------------------------------------- online monitor


def test_monitor_uses_the_same_protocol_choice(large, small):
    from esvit.eval.monitor import monitor_preprocess

    pre, tr, va = monitor_preprocess(str(large), str(large), 256, 32)
    assert pre.protocol == "dino" and (tr.canvas_size, tr.crop_size) == (37, 32)
    assert va.protocol == "dino" and tr[0][0].shape == (3, 32, 32)
    # small images: the old path, decoded at the training canvas and resized on the device
    pre, tr, _ = monitor_preprocess(str(small), str(small), 48, 32)
    assert (pre.protocol, pre.decode_size, tr.canvas_size, tr.crop_size) == ("resize", 48, 48, None)
    pre, _, _ = monitor_preprocess(str(large), str(large), 256, 32, preprocess="resize")
    assert (pre.protocol, pre.decode_size) == ("resize", 256)


def test_knn_monitor_runs_with_the_dino_protocol(large, ckpt, monkeypatch):
    from esvit.eval import monitor
    from esvit.eval.features import resolve_eval_model

    shapes: list[tuple[int, ...]] = []
    real = monitor.extract_features

    def spy(encode, batches, device, size):
        def seen():
            for images, labels in batches:
                shapes.append(tuple(images.shape[1:]))
                yield images, labels

        return real(encode, seen(), device, size)

    monkeypatch.setattr(monitor, "extract_features", spy)
    model = resolve_eval_model(ckpt, device=torch.device("cpu"))
    res = monitor.knn_monitor(model.encoder.wrapper, str(large), str(large), 256, 32,
                              torch.device("cpu"), k=1)
    assert res["top1"] == pytest.approx(100.0)  # each query finds itself in the bank
    # dino: decoded at 37 and centre-cropped to 32 (not the 256 px training canvas)
    assert shapes and set(shapes) == {(3, 32, 32)}
    shapes.clear()
    monitor.knn_monitor(model.encoder.wrapper, str(large), str(large), 48, 32,
                        torch.device("cpu"), k=1, preprocess="resize")
    assert set(shapes) == {(3, 48, 48)}


def test_eval_preprocess_validation():
    with pytest.raises(ValueError, match="protocol must be"):
        EvalPreprocess("bicubic", 32, 32)
    with pytest.raises(ValueError, match="decode_size 30 < image_size 32"):
        EvalPreprocess("dino", 32, 30)
    rec = resolve_preprocess("dino", 224).record()
    assert EvalPreprocess.from_record(rec).record() == rec
