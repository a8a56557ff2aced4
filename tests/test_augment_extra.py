"""Users' kornia ops per view (``augment.extra_global`` / ``extra_local``): applied, seeded,
resumable, rank-count invariant, leaving the global RNG alone, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from esvit.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation
from esvit.trainer import EsViTTrainer

ERASE = [{"op": "RandomErasing", "p": 1.0, "scale": [0.1, 0.2], "value": 0.0}]


def _images(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _aug(**kw: object) -> MultiCropAugmentation:
    return MultiCropAugmentation(32, 16, 2, seed=0, **kw)


def test_erasing_reaches_the_global_views_only() -> None:
    views = _aug(extra_global=ERASE)(_images())
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]).view(1, 3, 1, 1)
    erased = [((v - black).abs() < 1e-5).all(1) for v in views]  # (b, s, s): pixels set to 0 before normalising
    assert all(bool(e.flatten(1).sum(1).ge(32 * 32 * 0.05).all()) for e in erased[:2])  # every global view
    assert all(float(e.float().mean()) < 0.01 for e in erased[2:])  # locals untouched


def test_seeded_resumable_and_global_rng_untouched() -> None:
    a, b = _aug(extra_local=ERASE), _aug(extra_local=ERASE)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = a(_images())
    assert torch.equal(torch.random.get_rng_state(), before)  # kornia ran under a forked RNG
    assert all(torch.equal(u, v) for u, v in zip(first, b(_images()), strict=True))
    state = a.get_rng_state()
    second = a(_images(seed=1))
    a.set_rng_state(state)
    assert all(torch.equal(u, v) for u, v in zip(second, a(_images(seed=1)), strict=True))
    assert not torch.equal(first[2], second[2])  # a new draw per call


def test_shards_match_the_unsplit_batch() -> None:
    images = _images(4)
    full = _aug(extra_global=ERASE, extra_local=[{"op": "RandomAffine", "degrees": 30.0, "p": 1.0}])(images)
    parts = []
    for rank in range(2):
        aug = _aug(extra_global=ERASE, extra_local=[{"op": "RandomAffine", "degrees": 30.0, "p": 1.0}])
        parts.append(aug(images[rank * 2:(rank + 1) * 2], shard=(rank, 2)))
    for v, view in enumerate(full):
        assert torch.allclose(view, torch.cat([parts[0][v], parts[1][v]]), atol=1e-5), v


def test_geometric_ops_turn_off_the_crop_geometry_metric() -> None:
    assert _aug(extra_global=ERASE).exact_geometry
    assert not _aug(extra_local=[{"op": "RandomAffine", "degrees": 10.0}]).exact_geometry
    tr = EsViTTrainer.from_backbone("vit_nano", {"patch_size": 4}, global_size=32, local_size=16, n_local=2,
                                    out_dim=32, hidden_dim=32, bottleneck_dim=16,
                                    augment_options={"extra_global": [{"op": "RandomAffine", "degrees": 10.0}]})
    out = tr(_images(), teacher_temp=0.04)
    assert "region_match_share" in out and "region_match_accuracy" not in out


@pytest.mark.parametrize(("spec", "match"), [
    ({"op": "RandomErase"}, "closest: RandomErasing"),
    ({"p": 0.5}, "needs an 'op'"),
    ({"op": "RandomErasing", "p": 3}, "p must be a probability"),
    ({"op": "RandomErasing", "scale": [0.5]}, r"RandomErasing\(scale="),
    ({"op": "ColorJiggle3D"}, "not a kornia.augmentation 2-D op"),
])
def test_bad_specs_are_one_line_errors(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        _aug(extra_global=[spec])
    assert "\n" not in str(e.value) and "augment.extra_global" in str(e.value)


def test_config_keys_reach_the_training_run(tmp_path) -> None:
    from esvit.config import ConfigError, load_config
    from esvit.train.loop import train

    cfg = load_config("debug_cpu", ["augment.extra_global=[{op: RandomErasing, p: 1.0}]",
                                    "augment.extra_local=[{op: RandomAffine, degrees: 15.0}]",
                                    f"logging.output_dir={tmp_path}", "logging.wandb=disabled"])
    assert train(cfg, max_steps=2).step == 2
    with pytest.raises(ConfigError, match="augment.extra_local: 'RandomAfine' .* closest: RandomAffine"):
        load_config("debug_cpu", ["augment.extra_local=[{op: RandomAfine}]"])
