"""esvit.viz / esvit-viz: the pictures show the right thing (matches, attention, PCA layout, label
colours, every metric), are valid PNGs, work for ViT / Swin / CNN and tiny checkpoints, and bad
input gives one-line errors."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from esvit import viz
from esvit.backbones import BackboneSpec, build_backbone
from esvit.cli.viz import main as viz_main
from esvit.eval.features import normalize

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("vit_nano", "swin_nano", "cifar_resnet18")


def save(arr: np.ndarray, path: Path) -> Path:
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


@pytest.fixture
def noise(tmp_path: Path) -> Path:
    return save(np.random.default_rng(0).integers(0, 256, (32, 32, 3)), tmp_path / "noise.png")


def halves(tmp_path: Path, axis: int) -> Path:
    """Black first half, white second half, split along ``axis`` (0: top/bottom, 1: left/right)."""
    img = np.zeros((32, 32, 3))
    (img[16:] if axis == 0 else img[:, 16:])[...] = 255
    return save(img, tmp_path / f"halves_{axis}.png")


def assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        im.verify()


class MirrorConv(nn.Module):
    """Flip-equivariant by construction: a left-right symmetric 3x3 conv, ReLU, 8x8 average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)
        self.pool = nn.AvgPool2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x)))


MIRROR_SPEC = BackboneSpec(name="mirror_conv", layer="pool", layout="bchw", num_prefix_tokens=0, pool="avg",
                           embed_dim=16, export_ctor=None)


# ----------------------------------------------------------------------------- correspondence


def test_grid_helpers_by_hand() -> None:
    assert viz.mirror_index((2, 3)).tolist() == [2, 1, 0, 5, 4, 3]
    assert viz.token_centers((2, 3), 6).tolist() == [[1, 1.5], [3, 1.5], [5, 1.5], [1, 4.5], [3, 4.5], [5, 4.5]]


def test_match_views_ranks_matches_by_cosine() -> None:
    feat = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    match, sim, order = viz.match_views(feat, feat)
    assert match.tolist() == list(range(16)) and torch.allclose(sim, torch.ones(16))
    other = feat.clone()
    other[3] = -feat[3] + 0.1 * feat[5]  # region 3 lost its counterpart
    match, sim, order = viz.match_views(feat, other)
    assert match[0] == 0 and match[3] != 3 and order[-1] == 3  # the weakest match is ranked last
    assert torch.all(sim[order][:-1] >= sim[order][1:])


@pytest.mark.parametrize("name", BACKBONES)
def test_identical_views_match_every_region_to_itself(name: str, noise: Path) -> None:
    res = viz.compute_correspondence(build_backbone(name), noise, noise, image_size=32)
    assert res.grid == (4, 4) and not res.flipped and not res.scores
    assert res.match.tolist() == list(range(16))
    assert torch.allclose(res.similarity, torch.ones(16), atol=1e-5)


def test_flipped_copy_matches_mirror_for_a_flip_equivariant_backbone(noise: Path, tmp_path: Path) -> None:
    net = MirrorConv().eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():  # equivariant by construction: features of the flip = flipped features
        assert torch.allclose(net(x.flip(-1)), net(x).flip(-1), atol=1e-6)
    res = viz.plot_correspondence((net, MIRROR_SPEC), noise, tmp_path / "c.png", jitter=False, image_size=32)
    assert res.flipped and torch.equal(res.views[1], res.views[0].flip(-1))
    assert res.match.tolist() == viz.mirror_index(res.grid).tolist()
    assert res.scores["accuracy_all"] == 1.0 and res.scores["distance_all"] == 0.0
    assert res.scores["chance"] == 1 / 16
    assert_png(res.png)
    # the default second view is recoloured and grey, still mirrored
    grey = viz.compute_correspondence((net, MIRROR_SPEC), noise, image_size=32, seed=3)
    assert torch.allclose(grey.views[1][0], grey.views[1][1])


def test_correspondence_picture_draws_the_strongest_lines(noise: Path) -> None:
    res = viz.compute_correspondence(build_backbone("vit_nano"), noise, image_size=32)
    fig = viz.draw_correspondence(res, top_k=5)
    lines = [ln for ln in fig.axes[0].get_lines()]
    assert len(lines) == 5
    size = res.views.shape[-1]
    centers = viz.token_centers(res.grid, size)
    # drawn weakest first: the last line is the strongest match
    strongest = int(res.order[0])
    xs, ys = lines[-1].get_data()
    assert (xs[0], ys[0]) == tuple(centers[strongest])
    assert ys[1] == centers[int(res.match[strongest])][1] and xs[1] > size


# ----------------------------------------------------------------------------- attention


def test_vit_attention_rows_sum_to_one_and_match_the_block(noise: Path, tmp_path: Path) -> None:
    net, spec = build_backbone("vit_nano")
    res = viz.plot_attention((net, spec), noise, tmp_path / "a.png", image_size=32)
    assert res.method == "cls_attention" and res.maps.shape == (2, 4, 4)
    attn = res.attention
    assert attn.shape == (2, 17, 17) and torch.all(attn >= 0)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 17), atol=1e-5)
    assert torch.equal(res.maps, attn[:, 0, 1:].reshape(2, 4, 4))
    # the same weights by hand: softmax(q k^T / sqrt(d_head)) on the last block's normalised input
    block = viz.attention.attention_blocks(net)[-1]
    seen: list[torch.Tensor] = []
    handle = block.ln_1.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        net(normalize(res.image[None]))
    handle.remove()
    mha, h = block.self_attention, 2
    q, k, _ = torch.nn.functional.linear(seen[0], mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k = (t.reshape(1, 17, h, -1).transpose(1, 2) for t in (q, k))
    manual = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)[0]
    assert torch.allclose(attn, manual, atol=1e-5)
    assert_png(res.png)


@pytest.mark.parametrize("name", ["swin_nano", "cifar_resnet18"])
def test_other_backbones_show_pooled_similarity(name: str, noise: Path) -> None:
    bb = build_backbone(name)
    res = viz.compute_attention(bb, noise, image_size=32)
    assert res.method == "pooled_similarity" and res.maps.shape == (1, 4, 4) and res.attention is None
    model = viz.load_model(bb, image_size=32)
    pooled, regions = model.features(viz.load_views([noise], model))
    cos = torch.nn.functional.cosine_similarity(pooled[:, None], regions, dim=-1).reshape(4, 4)
    assert torch.allclose(res.maps[0], cos, atol=1e-5)
    with pytest.raises(ValueError, match="not a ViT"):
        viz.compute_attention(bb, noise, image_size=32, method="cls_attention")


# ----------------------------------------------------------------------------- PCA


def test_pca_colours_keep_the_layout_of_the_features() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    feats = torch.stack([(a if c < 2 else b) + 0.05 * torch.randn(8, generator=g) for r in range(4) for c in range(4)])
    colors, explained = viz.pca_colors(feats[None], (4, 4))
    assert colors.shape == (1, 4, 4, 3) and colors.min() >= 0 and colors.max() <= 1
    first = colors[0, ..., 0]
    assert first[:, :2].max() < first[:, 2:].min() or first[:, :2].min() > first[:, 2:].max()
    assert explained[0] > 0.9 and explained.sum() <= 1 + 1e-9
    # moving a token moves its colour with it
    perm = torch.randperm(16, generator=g)
    permuted, _ = viz.pca_colors(feats[perm][None], (4, 4))
    assert np.allclose(permuted.reshape(16, 3), colors.reshape(16, 3)[perm.numpy()], atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 region tokens"):
        viz.pca_colors(torch.ones(1, 1, 8), (1, 1))


@pytest.mark.parametrize("name", ["vit_nano", "swin_nano"])
def test_pca_picture_splits_where_the_image_does(name: str, tmp_path: Path) -> None:
    bb = build_backbone(name)
    res = viz.plot_pca(bb, [halves(tmp_path, 1), halves(tmp_path, 0)], tmp_path / "p.png", image_size=32)
    assert res.colors.shape == (2, 4, 4, 3)
    for img, axis in ((0, 1), (1, 0)):  # left/right halves, then top/bottom halves
        first = np.moveaxis(res.colors[img, ..., 0], axis, 0)  # rows of `first` run across the split
        assert first[:2].max() < first[2:].min() or first[:2].min() > first[2:].max()
    assert_png(res.png)


# ----------------------------------------------------------------------------- embeddings


def embed_folder(tmp_path: Path, labelled: bool, merge: bool = True) -> Path:
    from esvit.embed import embed_images

    rng = np.random.default_rng(0)
    src = tmp_path / ("labelled" if labelled else "plain")
    for i in range(12):
        folder = src / ("cat", "dog", "eel")[i % 3] if labelled else src
        folder.mkdir(parents=True, exist_ok=True)
        save(rng.integers(0, 256, (32, 32, 3)), folder / f"{i}.png")
    out = tmp_path / f"emb_{labelled}_{merge}"
    torch.manual_seed(0)  # the same random backbone every time
    embed_images(build_backbone("vit_nano"), src, out, image_size=32, progress=False, merge=merge, shard_size=5)
    return out


def test_label_colours() -> None:
    classes, colors = viz.label_colors(["b", "a", "b", ""])
    assert classes == ["a", "b"]
    assert np.array_equal(colors[0], colors[2]) and not np.array_equal(colors[0], colors[1])
    assert tuple(colors[3]) == viz.embeddings.UNLABELED
    classes, colors = viz.label_colors(["", ""])
    assert classes == [] and np.array_equal(colors[0], colors[1])
    classes, colors = viz.label_colors([str(i) for i in range(25)])
    assert len({tuple(c) for c in colors}) == 25


def test_embedding_map_colours_by_label(tmp_path: Path) -> None:
    out = embed_folder(tmp_path, labelled=True)
    res = viz.plot_embeddings(out, tmp_path / "m.png")
    assert res.points.shape == (12, 2) and res.classes == ["cat", "dog", "eel"]
    for lab in res.classes:
        same = res.colors[[i for i, x in enumerate(res.labels) if x == lab]]
        assert (same == same[0]).all()
    assert len({tuple(c) for c in res.colors}) == 3
    table = viz.read_embeddings(out)
    proj = viz.project_2d(table.x)  # PCA: centred, variance in decreasing order
    assert np.allclose(proj.mean(0), 0, atol=1e-4) and proj[:, 0].var() >= proj[:, 1].var()
    assert np.allclose(res.points, proj)
    assert_png(res.png)
    # shards only (--no-merge): the same table
    shards = viz.read_embeddings(embed_folder(tmp_path, labelled=True, merge=False))
    assert np.allclose(shards.x, table.x) and shards.labels == table.labels


def test_embedding_map_without_labels_has_one_colour(tmp_path: Path) -> None:
    res = viz.compute_embedding_map(embed_folder(tmp_path, labelled=False), max_points=7)
    assert res.classes == [] and len(res.points) == 7
    assert len({tuple(c) for c in res.colors}) == 1


def test_missing_projection_package_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(viz.MissingDependencyError, match="umap-learn"):
        viz.project_2d(np.random.rand(10, 4), "umap")


# ----------------------------------------------------------------------------- curves


def write_metrics(run: Path) -> None:
    from esvit.train.logger import MetricLogger

    log = MetricLogger(run, wandb_mode="disabled")
    for step in (1, 2, 3):
        log.log({"loss": 3.0 / step, "region_loss": 2.0 / step, "lr": 1e-4 * step,
                 "teacher_entropy": float("nan") if step == 2 else 1.0, "note": "text"}, step)
    log.log({"knn_top1": 42.0}, 3)
    log.close()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.')  # a run still writing its last line


def test_curves_plot_every_metric_series(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    res = viz.compute_curves(tmp_path)
    assert list(res.series) == ["loss", "region_loss", "lr", "teacher_entropy", "knn_top1"]
    steps, values = res.series["teacher_entropy"]
    assert steps.tolist() == [1, 2, 3] and math.isnan(values[1])
    assert res.series["knn_top1"][0].tolist() == [3]
    fig = viz.draw_curves(res)
    labels = [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]
    assert sorted(labels) == sorted(res.series)
    assert list(viz.compute_curves(tmp_path, ["*loss"]).series) == ["loss", "region_loss"]
    png = viz.plot_curves(tmp_path).png
    assert png == tmp_path / "curves.png"
    assert_png(png)


# ----------------------------------------------------------------------------- checkpoints and CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny runs of the debug config: with the region task, and plain DINO (no region head)."""
    from esvit.config import load_config
    from esvit.train.loop import train

    out = {}
    for name, extra in (("region", []), ("no_region", ["model.region_loss=false"])):
        run = tmp_path_factory.mktemp(name)
        cfg = load_config(ROOT / "configs" / "debug_cpu.yaml",
                          ["data.synthetic_images=32", "optim.batch_size=16", "model.out_dim=64",
                           "logging.progress=false", f"logging.output_dir={run}", *extra])
        out[name] = train(cfg, max_steps=2).last_checkpoint
    return out


@pytest.mark.parametrize("kind", ["region", "no_region"])
def test_cli_pictures_of_trained_checkpoints(kind: str, checkpoints: dict[str, Path], noise: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = str(checkpoints[kind])
    for cmd, extra in (("correspondence", []), ("attention", []), ("pca", [str(noise)])):
        out = tmp_path / f"{cmd}.png"
        assert viz_main([cmd, "--checkpoint", ck, "--image", str(noise), *extra, "--out", str(out)]) == 0
        assert_png(out)
    assert viz_main(["curves", "--run", str(Path(ck).parent), "--out", str(tmp_path / "curves.png")]) == 0
    assert_png(tmp_path / "curves.png")
    printed = capsys.readouterr().out
    assert "on the mirrored region" in printed and "cls_attention" in printed and "vit_nano" in printed


def test_cli_reads_exports_and_bare_state_dicts(checkpoints: dict[str, Path], noise: Path, tmp_path: Path) -> None:
    from esvit.export import export_backbone, load_backbone

    exported = export_backbone(checkpoints["region"], tmp_path / "backbone.pt")
    bare = tmp_path / "bare.pt"
    torch.save(load_backbone(checkpoints["region"])[0].state_dict(), bare)
    for src in (["--checkpoint", str(exported)], ["--checkpoint", str(bare), "--backbone", "vit_nano"]):
        out = tmp_path / "pca.png"
        assert viz_main(["pca", *src, "--image-size", "32", "--image", str(noise), "--out", str(out)]) == 0
        assert_png(out)
        out.unlink()


@pytest.mark.parametrize("name", ["swin_nano", "cifar_resnet18"])
def test_cli_random_backbones(name: str, noise: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for cmd in ("correspondence", "attention", "pca"):
        assert viz_main([cmd, "--random", "--backbone", name, "--image-size", "32", "--image", str(noise)]) == 0
        assert_png(tmp_path / f"noise_{cmd}.png")


def test_cli_embeddings(tmp_path: Path) -> None:
    out = embed_folder(tmp_path, labelled=True)
    assert viz_main(["embeddings", "--embeddings", str(out)]) == 0
    assert_png(out / "map_pca.png")


@pytest.mark.parametrize(("args", "message"), [
    (["attention", "--checkpoint", "{ck}", "--image", "{tiny}"], r"4x4 px, smaller than one 8-px patch"),
    (["pca", "--random", "--backbone", "vit_nano", "--image-size", "4", "--image", "{noise}"],
     r"image size 4 is smaller than one 8-px patch"),
    (["correspondence", "--checkpoint", "{ck}", "--image", "{tmp}/missing.png"], r"no image file .*missing\.png"),
    (["correspondence", "--checkpoint", "{tmp}/missing.pt", "--image", "{noise}"], r"No such file|not found"),
    (["correspondence", "--random", "--image", "{noise}"], r"--random needs --backbone"),
    (["correspondence", "--random", "--backbone", "vit_nano", "--image", "{noise}", "--top-k", "0"],
     r"top_k must be >= 1"),
    (["pca", "--checkpoint", "{heads_only}", "--image", "{noise}"], r"holds no backbone weights"),
    (["curves", "--run", "{tmp}"], r"no metrics\.jsonl in .*: not a training run folder"),
    (["curves", "--run", "{empty_run}"], r"holds no metrics"),
    (["curves", "--run", "{run}", "--metrics", "nope*"], r"no metric of .* matches nope\*; it has: loss"),
    (["embeddings", "--embeddings", "{tmp}"], r"has no manifest\.json: not an esvit-embed output folder"),
])
def test_bad_input_is_one_line(args: list[str], message: str, checkpoints: dict[str, Path], noise: Path,
                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save(np.zeros((4, 4, 3)), tmp_path / "tiny.png")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "metrics.jsonl").write_text("\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    torch.save({"teacher": {"head.last_layer.weight": torch.ones(2, 2)}}, tmp_path / "heads_only.pt")
    subs = {"{ck}": str(checkpoints["region"]), "{heads_only}": str(tmp_path / "heads_only.pt"), "{tiny}": str(tmp_path / "tiny.png"), "{noise}": str(noise),
            "{empty_run}": str(tmp_path / "empty_run"), "{run}": str(tmp_path / "run"), "{tmp}": str(tmp_path)}
    argv = [re.sub("|".join(map(re.escape, subs)), lambda m: subs[m.group(0)], a) for a in args]
    assert viz_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    write_metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert viz_main(["curves", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "esvit[viz]" in err and "matplotlib" in err
    assert not (tmp_path / "curves.png").exists()
    # the computations do not need it
    assert "loss" in viz.compute_curves(tmp_path).series
