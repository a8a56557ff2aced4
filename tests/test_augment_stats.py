"""Statistical tests of the batched multi-crop parameter sampling.

All tests use fixed seeds (deterministic); thresholds are loose enough (KS p > 0.001, 5-sigma
binomial bounds) that a correct sampler passes with any seed with overwhelming probability.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from esvit.augment import MultiCropAugmentation, sample_crop_boxes

N = 4000


def _torchvision_boxes(h: int, w: int, n: int, scale: tuple[float, float],
                       ratio: tuple[float, float]) -> torch.Tensor:
    torch.manual_seed(0)
    img = torch.empty(3, h, w)
    return torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(ratio))
                         for _ in range(n)])


@pytest.mark.parametrize(
    ("h", "w", "scale"),
    [
        (32, 32, (0.25, 1.0)),
        (256, 256, (0.4, 1.0)),
        (256, 256, (0.05, 0.4)),
        (30, 80, (0.4, 1.0)),  # non-square: many rejections and centre-crop fallbacks
        (96, 40, (0.05, 0.4)),
    ],
)
def test_crop_distribution_matches_torchvision(h: int, w: int, scale: tuple[float, float]) -> None:
    ratio = (3 / 4, 4 / 3)
    ours = sample_crop_boxes(h, w, N, scale, ratio, generator=torch.Generator().manual_seed(1))
    ref = _torchvision_boxes(h, w, N, scale, ratio)

    def features(b: torch.Tensor) -> dict[str, torch.Tensor]:
        top, left, bh, bw = b.double().unbind(1)
        return {
            "area": bh * bw / (h * w),
            "aspect": bw / bh,
            "center_y": (top + bh / 2) / h,
            "center_x": (left + bw / 2) / w,
        }

    fo, fr = features(ours), features(ref)
    for name in fo:
        p = stats.ks_2samp(fo[name].numpy(), fr[name].numpy()).pvalue
        assert p > 1e-3, f"{name}: KS p={p:.2g} for {h}x{w} scale={scale}"
    # same fallback rate (fallback boxes are the centred, clamped-ratio crop)
    fb_o = float((fo["area"] == fo["area"].max()).double().mean())
    fb_r = float((fr["area"] == fr["area"].max()).double().mean())
    assert abs(fb_o - fb_r) < 5 * math.sqrt(0.25 / N) * math.sqrt(2)


def _rate_ok(x: torch.Tensor, p: float) -> bool:
    n = x.numel()
    rate = float(x.double().mean())
    if p in (0.0, 1.0):
        return rate == p
    return abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_apply_rates_within_binomial_bounds() -> None:
    aug = MultiCropAugmentation(32, 16, 3, seed=0)
    params = aug.sample_params(N, 40, 40)
    blur = {"global1": 1.0, "global2": 0.1, "local": 0.5}
    solar = {"global1": 0.0, "global2": 0.2, "local": 0.0}
    for p in params:
        assert _rate_ok(p.flip, 0.5), p.kind
        assert _rate_ok(p.jitter, 0.8), p.kind
        assert _rate_ok(p.grayscale, 0.2), p.kind
        assert _rate_ok(p.blur, blur[p.kind]), p.kind
        assert _rate_ok(p.solarize, solar[p.kind]), p.kind
    assert not any(p.solarize.any() for p in params if p.kind != "global2")


def test_custom_probabilities_are_used() -> None:
    aug = MultiCropAugmentation(32, 16, 1, flip_p=0.1, jitter_p=0.3, grayscale_p=0.6,
                                blur_p=(0.2, 0.7, 0.9), solarize_p=0.4, seed=0)
    g1, g2, loc = aug.sample_params(N, 32, 32)
    assert _rate_ok(g1.flip, 0.1) and _rate_ok(loc.jitter, 0.3) and _rate_ok(g2.grayscale, 0.6)
    assert _rate_ok(g1.blur, 0.2) and _rate_ok(g2.blur, 0.7) and _rate_ok(loc.blur, 0.9)
    assert _rate_ok(g2.solarize, 0.4) and not g1.solarize.any() and not loc.solarize.any()


def test_factor_distributions() -> None:
    aug = MultiCropAugmentation(32, 16, 0, seed=0)
    p = aug.sample_params(N, 32, 32)[0]
    for x, lo, hi in [(p.brightness, 0.6, 1.4), (p.contrast, 0.6, 1.4),
                      (p.saturation, 0.8, 1.2), (p.hue, -0.1, 0.1), (p.sigma, 0.1, 2.0)]:
        assert x.min() >= lo and x.max() <= hi
        pval = stats.kstest(x.double().numpy(), "uniform", args=(lo, hi - lo)).pvalue
        assert pval > 1e-3
    # the op order is a uniform random permutation (24 equally likely orders)
    perms = {perm: i for i, perm in enumerate(itertools.permutations(range(4)))}
    assert all(sorted(o) == [0, 1, 2, 3] for o in p.order.tolist())
    counts = torch.bincount(torch.tensor([perms[tuple(o)] for o in p.order.tolist()]),
                            minlength=24)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_independence_across_views_and_samples() -> None:
    aug = MultiCropAugmentation(32, 16, 2, global_scale=(0.25, 1.0), seed=0)
    params = aug.sample_params(N, 64, 64)
    area = [(p.boxes[:, 2] * p.boxes[:, 3]).double() for p in params]
    bound = 5 / math.sqrt(N)
    # across views: global 1 vs global 2, local 1 vs local 2, global vs local
    for a, b in [(0, 1), (2, 3), (0, 2)]:
        r = stats.pearsonr(area[a].numpy(), area[b].numpy()).statistic
        assert abs(r) < bound, (a, b, r)
    # across samples within a view
    r = stats.pearsonr(area[0][:-1].numpy(), area[0][1:].numpy()).statistic
    assert abs(r) < bound
    # flips / jitter / blur decisions are not shared between views
    agree = float((params[0].flip == params[1].flip).double().mean())
    assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / N)
    assert not torch.equal(params[2].flip, params[3].flip)
    assert not torch.equal(params[2].blur, params[3].blur)
    assert not torch.equal(params[0].sigma, params[1].sigma)
    # and the jitter factors of different samples are uncorrelated
    r = stats.pearsonr(params[0].brightness[:-1].numpy(), params[0].brightness[1:].numpy())
    assert abs(r.statistic) < bound


def test_image_level_flip_rate() -> None:
    """The applied flips follow the sampled decisions (checked on the output images)."""
    b = 400
    x = torch.arange(16, dtype=torch.uint8).mul(16).view(1, 1, 1, 16).expand(b, 3, 16, 16)
    aug = MultiCropAugmentation(16, 8, 0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                                solarize_p=0.0, seed=0)
    params = aug.sample_params(b, 16, 16)
    out = aug.apply_params(x.contiguous(), params)
    decreasing = out[0][:, 0, 0, 0] > out[0][:, 0, 0, -1]
    assert torch.equal(decreasing, params[0].flip)
    assert _rate_ok(decreasing, 0.5)
