"""Tests for evaluation: feature encoders, kNN and linear probes (library and CLI)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from esvit.backbones import build_backbone
from esvit.eval import knn as knn_mod
from esvit.eval.features import FeatureEncoder, last_n_taps
from esvit.eval.knn import knn_accuracies, knn_accuracy, knn_neighbors, knn_predict
from esvit.eval.linear import LinearClassifier, accuracy, train_linear_lbfgs, train_linear_sgd

# ----------------------------------------------------------------------------- kNN


def brute_force_knn(train_x, train_y, test_x, num_classes, k, temperature):
    sim = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T  # (M, N)
    top, idx = sim.topk(k, dim=1)
    scores = torch.zeros(test_x.shape[0], num_classes)
    for i in range(test_x.shape[0]):
        for s, j in zip(top[i], idx[i], strict=True):
            scores[i, train_y[j]] += torch.exp(s / temperature)
    return scores


@pytest.fixture
def knn_data():
    g = torch.Generator().manual_seed(0)
    train_x = torch.randn(57, 8, generator=g)
    train_y = torch.randint(0, 6, (57,), generator=g)
    test_x = torch.randn(23, 8, generator=g)
    test_y = torch.randint(0, 6, (23,), generator=g)
    return train_x, train_y, test_x, test_y


@pytest.mark.parametrize("chunks", [(1024, 65536), (5, 7), (1, 1), (23, 57)])
def test_knn_matches_brute_force(knn_data, chunks):
    train_x, train_y, test_x, _ = knn_data
    ref = brute_force_knn(train_x, train_y, test_x, 6, 10, 0.07)
    got = knn_predict(train_x, train_y, test_x, 6, k=10, temperature=0.07,
                      chunk_size=chunks[0], train_chunk_size=chunks[1])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_knn_never_builds_full_matrix(knn_data, monkeypatch):
    train_x, train_y, test_x, _ = knn_data
    shapes = []
    original = knn_mod._similarity

    def spy(q, bank):
        out = original(q, bank)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(knn_mod, "_similarity", spy)
    knn_predict(train_x, train_y, test_x, 6, k=5, chunk_size=4, train_chunk_size=10)
    assert shapes and max(r for r, _ in shapes) <= 4 and max(c for _, c in shapes) <= 10
    assert len(shapes) == 6 * 6  # ceil(23/4) query chunks x ceil(57/10) bank chunks


def test_knn_accuracies_multi_k_consistent(knn_data):
    train_x, train_y, test_x, test_y = knn_data
    multi = knn_accuracies(train_x, train_y, test_x, test_y, ks=(1, 5, 20, 100),
                           chunk_size=7, train_chunk_size=11)
    assert set(multi) == {1, 5, 20, 100}
    for k in (1, 5, 20):
        assert multi[k] == pytest.approx(knn_accuracy(train_x, train_y, test_x, test_y, k=k))
    # k larger than the bank is clipped: same as k = N
    assert multi[100] == pytest.approx(knn_accuracy(train_x, train_y, test_x, test_y, k=57))
    # k=1 on the training set itself is perfect
    self_acc = knn_accuracies(train_x, train_y, train_x, train_y, ks=(1,))
    assert self_acc[1]["top1"] == pytest.approx(100.0)
    sim, idx = knn_neighbors(train_x, train_x, 3)
    assert torch.equal(idx[:, 0], torch.arange(57)) and (sim[:, :-1] >= sim[:, 1:]).all()


def test_knn_rejects_bad_input(knn_data):
    train_x, train_y, test_x, _ = knn_data
    with pytest.raises(ValueError, match="empty"):
        knn_predict(train_x[:0], train_y[:0], test_x, 6)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        knn_predict(train_x, train_y, test_x, 3)
    with pytest.raises(ValueError, match="feature dims differ"):
        knn_predict(train_x, train_y, test_x[:, :4], 6)


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize(
    "name,kwargs,n_default,dim_default",
    [("vit_tiny", {"depth": 4}, 4, 4 * 192), ("cifar_resnet18", {}, 2, 256 + 512),
     ("swin_tiny_cifar", {}, 2, 192 + 384)],
)
def test_feature_encoder_last_n(name, kwargs, n_default, dim_default):
    torch.manual_seed(0)
    net, spec = build_backbone(name, **kwargs)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = FeatureEncoder(net, spec)(x)
        enc = FeatureEncoder(net, spec, "last_n")
        feats, regions = enc.forward_with_regions(x)
        last1 = FeatureEncoder(net, spec, "last_n", n_last=1)(x)
    assert enc.n_last == n_default and feats.shape == (2, dim_default)
    assert regions.shape[0] == 2 and regions.shape[-1] == spec.embed_dim
    # the last block / stage alone is the pooled feature
    torch.testing.assert_close(last1, pooled, atol=1e-5, rtol=1e-5)
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    with pytest.raises(ValueError, match="n_last must be in"):
        FeatureEncoder(net, spec, "last_n", n_last=len(last_n_taps(net).names) + 1)


def test_feature_encoder_vit_avgpool_and_errors():
    torch.manual_seed(0)
    net, spec = build_backbone("vit_tiny", depth=2)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = FeatureEncoder(net, spec, "last_n", n_last=1, avgpool=True)(x)
        _, regions = FeatureEncoder(net, spec).forward_with_regions(x)
    assert f.shape == (2, 2 * 192)
    torch.testing.assert_close(f[:, 192:], regions.mean(1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="avgpool applies to feature='last_n' only"):
        FeatureEncoder(net, spec, "pooled", avgpool=True)
    with pytest.raises(ValueError, match="feature must be one of"):
        FeatureEncoder(net, spec, "mean")
    cnn, cnn_spec = build_backbone("cifar_resnet18")
    with pytest.raises(ValueError, match="avgpool applies to ViT"):
        FeatureEncoder(cnn, cnn_spec, "last_n", avgpool=True)
    from torch import nn

    from esvit.backbones import BackboneSpec

    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    seq_spec = BackboneSpec("seq", "1", "bchw", 0, "avg", 4, None)
    with pytest.raises(ValueError, match="not supported for Sequential"):
        FeatureEncoder(seq, seq_spec, "last_n")


# ----------------------------------------------------------------------------- linear


def separable(n_per_class=60, classes=4, dim=16, seed=0):
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=g) + 5.0  # offset: tests standardisation
    return x, y


@pytest.mark.parametrize("norm", ["standardize", "none"])
def test_linear_lbfgs_separable(norm):
    x, y = separable()
    xv, yv = separable(seed=1)
    clf = train_linear_lbfgs(x, y, 4, l2=1e-4, max_iter=100, norm=norm)
    assert accuracy(clf(xv), yv)["top1"] >= 95.0


@pytest.mark.parametrize("norm", ["standardize", "bn"])
def test_linear_sgd_separable(norm):
    x, y = separable()
    xv, yv = separable(seed=1)
    clf = train_linear_sgd(x, y, 4, epochs=20, lr=0.5, batch_size=32, norm=norm,
                           flipped=x + 0.01 * torch.randn_like(x))
    with torch.no_grad():
        assert accuracy(clf(xv), yv)["top1"] >= 95.0


def test_linear_classifier_rejects_bad_input():
    with pytest.raises(ValueError, match="norm must be one of"):
        LinearClassifier(4, 2, norm="layer")
    x, y = separable()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        train_linear_lbfgs(x, y, 3)
    with pytest.raises(ValueError, match="needs solver='sgd'"):
        train_linear_lbfgs(x, y, 4, norm="bn")
    top = accuracy(torch.eye(6), torch.arange(6))
    assert top == {"top1": 100.0, "top5": 100.0}
    assert json.dumps(top)


# ----------------------------------------------------------------------------- end to end

COLORS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def write_color_folder(root, n_per_class=10, size=32, seed=0):
    """Three easily separable classes of noisy single-colour images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, col in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            a = np.clip(np.array(col) + rng.normal(0, 30, (size, size, 3)), 0, 255)
            Image.fromarray(a.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def save_training_checkpoint(path, name="cifar_resnet18", kwargs=None):
    from esvit.train.checkpoint import atomic_save
    from esvit.trainer import EsViTTrainer

    kwargs = kwargs or {}
    torch.manual_seed(0)
    trainer = EsViTTrainer.from_backbone(name, kwargs, out_dim=64, hidden_dim=32, bottleneck_dim=16,
                                         global_size=32, local_size=16, n_local=1)
    atomic_save({"step": 1, "backbone": name, "student": trainer.student.state_dict(),
                 "teacher": trainer.teacher.state_dict(),
                 "config": {"model": {"backbone": name, "backbone_kwargs": kwargs},
                            "augment": {"global_size": 32}}}, path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_color_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_training_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint_00000001.pt")


def test_labeled_splits_val_split_is_last_n_per_class(folder, tmp_path):
    from esvit.eval.features import labeled_splits

    tr, va, classes = labeled_splits(folder, None, 3, 32)
    assert classes == ["blue", "green", "red"]
    assert len(tr) == 21 and len(va) == 9
    assert [p.rsplit("/", 2)[-2:] for p in va.paths][:3] == [["blue", "007.png"], ["blue", "008.png"],
                                                             ["blue", "009.png"]]
    assert set(tr.paths).isdisjoint(va.paths)
    with pytest.raises(ValueError, match="needs more than 10 images in every class"):
        labeled_splits(folder, None, 10, 32)
    with pytest.raises(ValueError, match="exactly one of val"):
        labeled_splits(folder, folder, 3, 32)
    # validation folder with an unknown class
    other = write_color_folder(tmp_path / "val", n_per_class=1)
    (other / "red").rename(other / "purple")
    with pytest.raises(ValueError, match="not in the training folder: purple"):
        labeled_splits(folder, other, None, 32)
    import shutil

    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(folder / "red" / "001.png", flat / "b.png")
    with pytest.raises(ValueError, match="not labeled"):
        labeled_splits(flat, None, 1, 32)


def test_linear_probe_lbfgs_and_cache(folder, ckpt, tmp_path, monkeypatch):
    from esvit.eval import features as feat_mod
    from esvit.eval.linear import linear_probe
    from esvit.train.checkpoint import safe_load

    out = tmp_path / "lin"
    res = linear_probe(ckpt, folder, val_split=3, output_dir=out, num_workers=0, progress=False)
    assert res["val"]["top1"] >= 85.0 and res["n_train"] == 21 and res["n_val"] == 9
    assert res["solver"] == "lbfgs" and res["feature_dim"] == 512 and res["image_size"] == 32
    saved = json.loads((out / "linear_results.json").read_text())
    assert saved["val"] == res["val"]
    # 32 px images at evaluation size 32: decoded at their own size, no centre crop
    assert saved["preprocess"] == {"protocol": "resize", "requested": "auto", "image_size": 32,
                                   "decode_size": 32, "crop_size": None, "median_short_side": 32}
    blob = safe_load(out / "linear_classifier.pt")
    clf = LinearClassifier(blob["in_dim"], blob["num_classes"], blob["norm"])
    clf.load_state_dict(blob["state_dict"], strict=True)
    assert blob["classes"] == ["blue", "green", "red"]
    assert len(list((out / "features").glob("*.pt"))) == 2
    # second run: features come from the cache, the backbone is not called
    calls = []
    real = feat_mod.encode_views
    monkeypatch.setattr(feat_mod, "encode_views", lambda *a, **k: calls.append(1) or real(*a, **k))
    res2 = linear_probe(ckpt, folder, val_split=3, output_dir=out, progress=False)
    assert calls == [] and res2["val"] == res["val"]
    # other feature options -> new cache entries
    linear_probe(ckpt, folder, val_split=3, output_dir=out, feature="last_n", n_last=2,
                 progress=False)
    assert len(calls) == 2 and len(list((out / "features").glob("*.pt"))) == 4


def test_linear_probe_sgd_flip_and_augment(folder, ckpt):
    from esvit.eval.linear import linear_probe

    res = linear_probe(ckpt, folder, val_split=3, mode="flip", solver="sgd", epochs=15, lr=0.5,
                       batch_size=8, progress=False)
    assert res["val"]["top1"] >= 85.0 and res["solver"] == "sgd" and res["norm"] == "standardize"
    aug = linear_probe(ckpt, folder, val_split=3, mode="augment", epochs=2, batch_size=8,
                       canvas_size=40, progress=False)
    assert aug["solver"] == "sgd" and aug["norm"] == "bn" and 0.0 <= aug["val"]["top1"] <= 100.0
    with pytest.raises(ValueError, match="needs solver='sgd'"):
        linear_probe(ckpt, folder, val_split=3, mode="augment", solver="lbfgs", progress=False)


def test_knn_eval_api(folder, ckpt, tmp_path):
    import esvit.eval
    from esvit.eval.validity import MeaninglessEvaluationError

    res = esvit.eval.knn(ckpt, folder, val_split=3, ks=(1, 5, 21), output_dir=tmp_path,
                         progress=False)
    assert set(res["knn"]) == {"1", "5", "21"} and res["n_train"] == res["n_bank"] == 21
    assert res["knn"]["1"]["top1"] >= 85.0
    assert "top5" not in res["knn"]["1"]  # 3 classes only
    saved = json.loads((tmp_path / "knn_results.json").read_text())
    assert saved["knn"] == res["knn"] and saved["preprocess"]["protocol"] == "resize"
    # what the numbers were computed on
    assert saved["protocol"] == "knn" and saved["n_val"] == 9 and saved["num_classes"] == 3
    assert saved["chance"] == {"top1": 33.3333} and saved["ks"] == [1, 5, 21]
    assert saved["val_in_bank"] == 0 and saved["flags"][0].startswith("tiny validation set: 9")
    # k larger than the bank is refused, not clipped
    with pytest.raises(MeaninglessEvaluationError, match=r"k=200 is larger than the bank \(21"):
        esvit.eval.knn(ckpt, folder, val_split=3, ks=(1, 200), progress=False)
    # default ks: those that fit the bank
    assert list(esvit.eval.knn(ckpt, folder, val_split=3, progress=False)["knn"]) == ["10", "20"]


# ----------------------------------------------------------------------------- CLIs


def test_cli_linear_smoke(folder, ckpt, tmp_path, capsys):
    from esvit.cli.linear import main

    out = tmp_path / "lin"
    rc = main(["--checkpoint", str(ckpt), "--data", str(folder), "--val-split", "3",
               "--output-dir", str(out), "--num-workers", "0", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "val  top-1" in printed and "train  top-1" in printed
    assert ("(9 images, 3 classes, chance top-1 33.33%; linear lbfgs, none mode on 21 training "
            "images)") in printed
    assert "warning: tiny validation set: 9 images" in printed
    saved = json.loads((out / "linear_results.json").read_text())
    assert saved["n_val"] == 9 and saved["protocol"] == "linear"
    assert saved["chance"]["val"] == {"top1": 33.3333}
    assert (out / "linear_classifier.pt").is_file()


def test_cli_knn_smoke(folder, ckpt, capsys):
    from esvit.cli.knn import main

    rc = main(["--checkpoint", str(ckpt), "--train", str(folder), "--val", str(folder),
               "--ks", "1", "3", "--num-workers", "0", "--no-progress"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("k=   1  top-1 100.00%") and lines[1].startswith("k=   3")
    # every printed number says what it was computed on
    assert lines[0].endswith("(weighted kNN, T=0.07: 30 val images, bank 30 images, 3 classes; "
                             "chance top-1 33.33%)")
    # the same folder as bank and queries: flagged (each query finds itself)
    assert any(line.startswith("warning: 30 of 30 validation images are also bank images")
               for line in lines)
    saved = json.loads((ckpt.parent / "knn_eval" / "knn_results.json").read_text())
    assert saved["knn"]["1"]["top1"] == pytest.approx(100.0) and saved["n_val"] == 30
    assert saved["val_in_bank"] == 30 and saved["written_by"] == "esvit-knn"


def test_cli_errors_are_one_line(folder, ckpt, tmp_path, capsys):
    from esvit.cli.knn import main as knn_main
    from esvit.cli.linear import main as linear_main

    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    rc = knn_main(["--checkpoint", str(ckpt), "--train", str(empty), "--val-split", "1",
                   "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: no images found") and "\n" not in err
    rc = linear_main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(folder),
                      "--val-split", "3", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: checkpoint not found")
    rc = linear_main(["--checkpoint", str(ckpt), "--data", str(folder), "--output-dir",
                      str(tmp_path / "o")])
    assert rc == 2 and "exactly one of val" in capsys.readouterr().err


# ----------------------------------------------------------------------------- outputs without waste


def _count_encodes(monkeypatch):
    from esvit.eval import features as feat_mod

    calls: list[list[str]] = []
    real = feat_mod.encode_views

    def spy(model, dataset, device, views=("plain",), *args, **kwargs):
        calls.append(list(views))
        return real(model, dataset, device, views, *args, **kwargs)

    monkeypatch.setattr(feat_mod, "encode_views", spy)
    return calls


def test_knn_then_linear_compute_and_store_features_once(folder, ckpt, tmp_path, monkeypatch):
    import shutil

    from esvit.cli.knn import main as knn_main
    from esvit.cli.linear import main as linear_main

    run = tmp_path / "run"
    run.mkdir()
    ck = shutil.copy2(ckpt, run / ckpt.name)  # a checkpoint folder of its own
    calls = _count_encodes(monkeypatch)
    common = ["--checkpoint", str(ck), "--data", str(folder), "--val-split", "3",
              "--num-workers", "0", "--no-progress"]
    assert knn_main([*common, "--ks", "1", "5"]) == 0
    assert calls == [["plain"], ["plain"]]  # bank and queries
    cache = run / "eval_features"
    assert len(list(cache.glob("features_*.pt"))) == 2
    assert linear_main(common) == 0
    assert calls == [["plain"], ["plain"]]  # the linear probe read them: nothing computed
    # flip mode computes (and stores) only the flipped view of the training images
    assert linear_main([*common, "--mode", "flip"]) == 0
    assert calls[2:] == [["hflip"]] and len(list(cache.glob("features_*.pt"))) == 3
    # one copy of each feature matrix: nothing cached in the results folders
    assert not list((run / "knn_eval").rglob("*.pt"))
    assert [p.name for p in (run / "linear_eval").rglob("*.pt")] == ["linear_classifier.pt"]
    ledger = json.loads((cache / "esvit_outputs.json").read_text())["files"]
    assert sorted(ledger) == sorted(p.name for p in cache.glob("features_*.pt"))
    # the cache key names what the features are, not who asked for them
    from esvit.train.checkpoint import safe_load

    keys = [safe_load(p)["key"] for p in cache.glob("features_*.pt")]
    assert {k["view"] for k in keys} == {"plain", "hflip"}
    assert all("split" not in k and "command" not in k for k in keys)
    # API: an explicit shared cache_dir, results elsewhere
    from esvit.eval.knn import knn_eval
    from esvit.eval.linear import linear_probe

    knn_eval(ck, folder, val_split=3, ks=(1,), output_dir=tmp_path / "k", cache_dir=cache,
             progress=False)
    linear_probe(ck, folder, val_split=3, output_dir=tmp_path / "l", cache_dir=cache,
                 progress=False)
    assert len(calls) == 3 and not (tmp_path / "k" / "features").exists()


def test_results_files_round_accuracies_and_order_k_numerically(folder, ckpt, tmp_path):
    import re

    from esvit.eval.knn import describe_knn, knn_eval
    from esvit.eval.linear import linear_probe

    res = knn_eval(ckpt, folder, val_split=3, ks=(21, 2, 10, 1), output_dir=tmp_path / "k",
                   progress=False)
    assert list(res["knn"]) == ["1", "2", "10", "21"] and res["ks"] == [1, 2, 10, 21]
    text = (tmp_path / "k" / "knn_results.json").read_text()
    saved = json.loads(text)
    assert list(saved["knn"]) == ["1", "2", "10", "21"]  # numeric order in the file too
    assert [int(line[2:6]) for line in describe_knn(saved)[:4]] == [1, 2, 10, 21]
    lin = linear_probe(ckpt, folder, val_split=3, output_dir=tmp_path / "l", progress=False)
    lin_text = (tmp_path / "l" / "linear_results.json").read_text()
    for t in (text, lin_text):
        assert not re.search(r"\d\.\d{5,}", t), t  # no float32 noise: 4 decimals at most
    for acc in [*saved["knn"].values(), lin["train"], lin["val"]]:
        for v in acc.values():
            assert v == round(v, 4) and 0 <= v <= 100
    # exact from counts: 2 of 3 correct is 66.6667, not 66.66666388511658
    assert accuracy(torch.tensor([[1.0, 0], [1, 0], [0, 1]]), torch.tensor([0, 1, 1])) == {
        "top1": 66.6667}
    # an old results file (keys in text order) is still described in numeric order
    old = {**saved, "knn": {k: saved["knn"][k] for k in ("1", "10", "2", "21")}}
    assert [int(line[2:6]) for line in describe_knn(old)[:4]] == [1, 2, 10, 21]
