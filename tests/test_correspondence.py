"""Flip correspondence (esvit.eval.correspondence, esvit-correspondence): hand-computed cases,
a flip-equivariant backbone, the official jittered view, the CLI and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from esvit.backbones import BackboneSpec, build_backbone
from esvit.cli.correspondence import main as corr_main
from esvit.eval.correspondence import flip_jitter, flip_match_scores, measure_correspondence


def grid_feats(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)


def test_scores_by_hand_on_a_2x2_grid() -> None:
    # tokens (0,0) (0,1) (1,0) (1,1); mirrors: 0<->1, 2<->3
    feat = grid_feats([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    # flipped copy: token 0 holds what token 1 held, ... except that token 2 is spoiled
    flipped = grid_feats([[0, 1, 0], [1, 0, 0], [1, 1, 0.1], [0, 0, 1]])
    s = flip_match_scores(feat, flipped, (2, 2), top_k=2)
    # matches: 0 -> 1 (ok), 1 -> 0 (ok), 2 -> 3 (ok), 3 -> 2 (cos 0.997, mirrored is 2: ok)
    assert s["accuracy_all"].item() == 1.0 and s["distance_all"].item() == 0.0
    flipped[0, 3] = torch.tensor([1.0, 0.0, 0.0])  # now token 2 ([0,0,1]) has no match: best is token 2 (cos .07)
    s = flip_match_scores(feat, flipped, (2, 2), top_k=2)
    # token 0 -> 1 ok; 1 -> 0 ok? cos(e1, [0,1,0])=1 at flipped 0 -> ok; token 2 -> flipped 2 (mirror is 3):
    # distance 1; token 3 ([1,1,0]) -> flipped 2 (cos .997), mirror of 3 is 2: ok
    assert s["accuracy_all"].item() == pytest.approx(0.75)
    assert s["distance_all"].item() == pytest.approx(0.25)
    # the two most similar pairs (cos 1 for tokens 0 and 1) are both correct
    assert s["accuracy_topk"].item() == 1.0 and s["similarity_topk"].item() == pytest.approx(1.0)


def test_scores_count_a_diagonal_miss_by_its_distance() -> None:
    feat = torch.eye(9).unsqueeze(0)  # 3x3 grid, every token unique
    mirror = torch.tensor([r * 3 + (2 - c) for r in range(3) for c in range(3)])
    flipped = feat[:, mirror.argsort()].clone()  # a perfect mirror: flipped[m(i)] = feat[i]
    assert flip_match_scores(feat, flipped, (3, 3))["accuracy_all"].item() == 1.0
    flipped[0, [2, 4]] = flipped[0, [4, 2]]  # token 0's counterpart moved from (0,2) to (1,1)
    s = flip_match_scores(feat, flipped, (3, 3), top_k=9)
    assert s["accuracy_all"].item() == pytest.approx(7 / 9)
    # token 0 is matched to (1,1) instead of (0,2): sqrt(2); token 4 to (0,2) instead of (1,1): sqrt(2)
    assert s["distance_all"].item() == pytest.approx(2 * 2 ** 0.5 / 9)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="grid"):
        flip_match_scores(torch.ones(1, 4, 3), torch.ones(1, 4, 3), (3, 3))
    with pytest.raises(ValueError, match="one shape"):
        flip_match_scores(torch.ones(1, 4, 3), torch.ones(1, 9, 3), (2, 2))


class PatchColour(nn.Module):
    """A flip-equivariant 'backbone': the mean colour of every 8x8 patch, as a (b, c, h, w) map."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


SPEC = BackboneSpec(name="patch_colour", layer="pool", layout="bchw", num_prefix_tokens=0, pool="avg",
                    embed_dim=3, export_ctor=None)


def write_images(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        # 4x4 patches of distinct random colours, blown up to 8x8 pixels each
        patches = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = np.kron(patches, np.ones((8, 8, 1), dtype=np.uint8))
        paths.append(folder / f"img_{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def test_flip_equivariant_features_match_their_mirror(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 5)
    res = measure_correspondence((PatchColour(), SPEC), tmp_path / "imgs", image_size=32, device="cpu",
                                 per_image=True)
    assert res["images"] == 5 and res["grid"] == [4, 4] and res["chance"] == 1 / 16
    assert res["accuracy_all"] == 1.0 and res["accuracy_topk"] == 1.0 and res["distance_all"] == 0.0
    assert [r["accuracy_all"] for r in res["per_image"]] == [1.0] * 5
    # pixel noise: the mean colour of a patch survives the flip, a random ViT's patch embedding does not
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    assert measure_correspondence((PatchColour(), SPEC), noise, image_size=32, device="cpu")["accuracy_all"] == 1.0
    vit = measure_correspondence(build_backbone("vit_nano", patch_size=8), noise, image_size=32, device="cpu")
    assert vit["accuracy_all"] < 1.0


def test_jittered_view_is_a_grey_mirror_and_does_not_depend_on_the_batch() -> None:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = flip_jitter(x, jitter=False)
    assert torch.equal(plain, x.flip(-1))
    grey = flip_jitter(x, jitter=True, seeds=[10, 11, 12, 13])
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    alone = flip_jitter(x[2:3], jitter=True, seeds=[12])
    assert torch.allclose(alone, grey[2:3])
    with pytest.raises(ValueError, match="one seed per image"):
        flip_jitter(x, jitter=True)


def test_cli_random_weights_and_checkpoint_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_images(tmp_path / "imgs", 3)
    out = tmp_path / "corr.json"
    assert corr_main(["--random", "--backbone", "vit_nano", "--backbone-kw", "patch_size=8", "--images",
                      str(tmp_path / "imgs"), "--image-size", "32", "--jitter", "--out", str(out),
                      "--num-workers", "0", "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 3 and res["settings"]["jitter"] is True and 0 <= res["accuracy_all"] <= 1
    assert "accuracy all" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--random"], "--random needs --backbone"),
    (["--random", "--backbone", "nope"], "unknown backbone 'nope'"),
    (["--checkpoint", "{missing}"], "No such file|not found"),
    (["--random", "--backbone", "vit_nano", "--image-size", "4"], "multiple of the patch size"),
])
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                   message: str) -> None:
    write_images(tmp_path / "imgs", 1)
    args = [a.replace("{missing}", str(tmp_path / "missing.pt")) for a in args]
    assert corr_main([*args, "--images", str(tmp_path / "imgs"), "--num-workers", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert __import__("re").search(message, err)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        measure_correspondence(build_backbone("vit_nano"), tmp_path / "empty", image_size=32, device="cpu")
