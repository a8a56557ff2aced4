"""Fast tests of the batched multi-crop augmentation and its functional ops."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode

from esvit.augment import (
    MultiCropAugmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_boxes,
    solarize,
)

ATOL = 1e-5  # float32 rounding (different but equivalent op order than torchvision)


def _images(b: int = 5, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g)
    x[0, :, :3] = 0.5  # gray pixels (zero chroma)
    x[0, :, 3:5] = 1.0  # saturated white
    x[1, 0, :2] = x[1, 1, :2]  # ties between channels (hue branch priority)
    return x


def _uint8(b: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


# ----------------------------------------------------------------------------- module API


@pytest.mark.parametrize("n_local", [0, 1, 4])
def test_output_shapes_dtypes_count(n_local: int) -> None:
    aug = MultiCropAugmentation(32, 16, n_local, seed=0)
    out = aug(_uint8(3, 40, 36))
    assert len(out) == 2 + n_local
    for i, v in enumerate(out):
        size = 32 if i < 2 else 16
        assert v.shape == (3, 3, size, size)
        assert v.dtype == torch.float32
        assert torch.isfinite(v).all()
    # normalised values: (x - mean) / std with x in [0, 1]
    lo = (0 - 0.485) / 0.229
    hi = (1 - 0.406) / 0.225
    assert all(v.min() >= lo - 1e-5 and v.max() <= hi + 1e-5 for v in out)


def test_batch_size_one_and_min_size() -> None:
    aug = MultiCropAugmentation(224 // 7, 96 // 6, 2, seed=1)
    out = aug(_uint8(1, 8, 8))
    assert [tuple(v.shape) for v in out] == [(1, 3, 32, 32)] * 2 + [(1, 3, 16, 16)] * 2


def test_seed_reproducible_and_different_seeds_differ() -> None:
    x = _uint8(4)
    a = MultiCropAugmentation(32, 16, 2, seed=123)(x)
    b = MultiCropAugmentation(32, 16, 2, seed=123)(x)
    c = MultiCropAugmentation(32, 16, 2, seed=124)(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, c, strict=True))


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_works_under_inference_mode_and_no_grad(mode: str) -> None:
    x = _uint8(4)
    ref = MultiCropAugmentation(32, 16, 2, seed=3)(x)
    ctx = torch.inference_mode() if mode == "inference" else torch.no_grad()
    with ctx:
        out = MultiCropAugmentation(32, 16, 2, seed=3)(x)
    assert all(torch.equal(u, v) for u, v in zip(ref, out, strict=True))


def test_seed_none_is_random() -> None:
    assert MultiCropAugmentation(32, 16, 0).seed != MultiCropAugmentation(32, 16, 0).seed


def test_rng_state_resume() -> None:
    x = _uint8(4)
    aug = MultiCropAugmentation(32, 16, 2, seed=7)
    aug(x)
    state = aug.get_rng_state()
    first = aug(x)
    second = aug(x)
    assert not torch.equal(first[0], second[0])  # the generator advances
    aug.set_rng_state(state)
    again = aug(x)
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))
    # resuming into a fresh module with another seed gives the same stream
    other = MultiCropAugmentation(32, 16, 2, seed=99)
    other.set_rng_state(state)
    assert all(torch.equal(u, v) for u, v in zip(first, other(x), strict=True))
    with pytest.raises(TypeError, match="uint8"):
        aug.set_rng_state(torch.zeros(3))


def test_bad_inputs() -> None:
    aug = MultiCropAugmentation(32, 16, 1, seed=0)
    with pytest.raises(TypeError, match="torch.uint8"):
        aug(torch.rand(2, 3, 32, 32))
    with pytest.raises(TypeError, match="torch.uint8"):
        aug([[1, 2]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(b, 3, H, W\).*\(2, 1, 32, 32\)"):
        aug(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(b, 3, H, W\)"):
        aug(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=">= 8, got 7x32"):
        aug(torch.zeros(2, 3, 7, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="probability"):
        MultiCropAugmentation(32, 16, 1, flip_p=1.5)
    with pytest.raises(ValueError, match="blur_p"):
        MultiCropAugmentation(32, 16, 1, blur_p=(1.0, 0.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropAugmentation(32, 16, 1, global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hue"):
        MultiCropAugmentation(32, 16, 1, hue=0.7)


def test_identity_settings_equal_plain_resize_and_normalise() -> None:
    """With every random op disabled and full-image crops, output = resize + normalise."""
    x = _uint8(2, 16, 16)
    aug = MultiCropAugmentation(
        16, 8, 1, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0),
        flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0,
        seed=0,
    )
    out = aug(x)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    ref = (x.float() / 255 - mean) / std
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], ref, atol=1e-5, rtol=0)
    # local: exact 2x downscale = 2x2 box average with the adaptive roi_align sampling
    ref_local = (torch.nn.functional.avg_pool2d(x.float() / 255, 2) - mean) / std
    torch.testing.assert_close(out[2], ref_local, atol=1e-5, rtol=0)


def test_flip_always_mirrors() -> None:
    x = _uint8(2, 16, 16)
    kw = dict(global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0,
              grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0, seed=0)
    plain = MultiCropAugmentation(16, 16, 0, flip_p=0.0, **kw)(x)
    flipped = MultiCropAugmentation(16, 16, 0, flip_p=1.0, **kw)(x)
    torch.testing.assert_close(flipped[0], plain[0].flip(-1), atol=1e-6, rtol=0)


def test_second_global_only_is_solarized() -> None:
    """solarize_p=1: global 2 has no normalised value above the inverted 0.5 level."""
    x = _uint8(4)
    kw = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), seed=0)
    out = MultiCropAugmentation(32, 16, 2, solarize_p=1.0, **kw)(x)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    pixels = [v * std + mean for v in out]
    assert pixels[1].max() <= 0.5 + 1e-5
    assert pixels[0].max() > 0.9 and all(p.max() > 0.9 for p in pixels[2:])


def test_sample_params_apply_params_consistent() -> None:
    x = _uint8(3)
    aug = MultiCropAugmentation(32, 16, 2, seed=5)
    params = aug.sample_params(3, 32, 32)
    assert [p.kind for p in params] == ["global1", "global2", "local", "local"]
    out = aug.apply_params(x, params)
    out2 = MultiCropAugmentation(32, 16, 2, seed=5)(x)
    assert all(torch.equal(u, v) for u, v in zip(out, out2, strict=True))
    with pytest.raises(ValueError, match="batch of 3"):
        aug.apply_params(_uint8(2), params)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_op_count_independent_of_batch_size() -> None:
    counts = []
    for b in (2, 16):
        aug = MultiCropAugmentation(32, 16, 3, seed=0)
        x = _uint8(b)
        with _CountOps() as mode:
            out = aug(x)
        assert out[0].shape[0] == b
        counts.append(mode.counts)
    assert sum(counts[0].values()) > 100  # the mode really saw the ops
    assert counts[0] == counts[1]


# ----------------------------------------------------------------------------- colour ops


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 0.0, 2.0]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.0, 2.0]),
        (adjust_saturation, TF.adjust_saturation, [0.8, 1.0, 1.2, 0.0, 3.0]),
        (adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.27, 0.5]),
    ],
)
def test_color_ops_match_torchvision(ours, theirs, factors) -> None:  # type: ignore[no-untyped-def]
    x = _images()
    f = torch.tensor(factors)
    out = ours(x, f)
    ref = torch.stack([theirs(x[i], float(f[i])) for i in range(len(factors))])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert not torch.equal(out, x)  # the op did something


def test_grayscale_and_solarize_match_torchvision() -> None:
    x = _images()
    torch.testing.assert_close(rgb_to_grayscale(x), TF.rgb_to_grayscale(x, 3), atol=ATOL, rtol=0)
    torch.testing.assert_close(rgb_to_grayscale(x, 1), TF.rgb_to_grayscale(x, 1), atol=ATOL,
                               rtol=0)
    torch.testing.assert_close(solarize(x, 0.5), TF.solarize(x, 0.5), atol=0, rtol=0)
    thr = torch.tensor([0.5, 2.0, 0.3, 0.5, 0.9])
    ref = torch.stack([TF.solarize(x[i], float(min(thr[i], 1.0))) if thr[i] <= 1 else x[i]
                       for i in range(5)])
    torch.testing.assert_close(solarize(x, thr), ref, atol=0, rtol=0)


def test_color_jitter_random_order_matches_torchvision() -> None:
    x = _images(b=6)
    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(6)])
    bri, con, sat = 0.6 + 0.8 * torch.rand(3, 6, generator=g)
    hue = 0.2 * torch.rand(6, generator=g) - 0.1
    apply = torch.tensor([True, True, False, True, True, True])
    out = color_jitter(x, bri, con, sat, hue, order, apply)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    params = torch.stack([bri, con, sat, hue], dim=1)
    ref = []
    for i in range(6):
        img = x[i]
        if apply[i]:
            for k in order[i].tolist():
                img = fns[k](img, float(params[i, k]))
        ref.append(img)
    torch.testing.assert_close(out, torch.stack(ref), atol=ATOL, rtol=0)
    assert torch.equal(out[2], x[2])


def test_gaussian_blur_matches_torchvision() -> None:
    x = _images(h=20, w=17)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    out = gaussian_blur(x, sigma, 13)
    ref = torch.stack([TF.gaussian_blur(x[i], [13, 13], [float(sigma[i])] * 2) for i in range(5)])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)  # same reflect borders


def test_blur_kernel_size() -> None:
    assert blur_kernel_size(2.0) == 13
    assert blur_kernel_size(2.0, 16) == 13
    assert blur_kernel_size(2.0, 8) == 7
    assert blur_kernel_size(2.0, 9) == 9
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_blur(torch.rand(1, 3, 6, 6), 1.0, 13)


# ----------------------------------------------------------------------------- crops


def test_sample_crop_boxes_within_image() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(40, 60, 500, (0.05, 0.4), (3 / 4, 4 / 3), generator=g)
    top, left, h, w = boxes.unbind(1)
    assert boxes.dtype == torch.long and boxes.shape == (500, 4)
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 40).all() and (left + w <= 60).all()
    area = (h * w).float() / (40 * 60)
    assert area.min() > 0.03 and area.max() < 0.45


def test_sample_crop_boxes_fallback_is_center_crop() -> None:
    """Scale > 1 never fits: every box is torchvision's fallback (clamped-ratio centre crop)."""
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(10, 40, 4, (2.0, 3.0), (3 / 4, 4 / 3), generator=g)
    # in_ratio 4 > 4/3: h = 10, w = round(10 * 4/3) = 13, centred
    assert boxes.tolist() == [[0, (40 - 13) // 2, 10, 13]] * 4


def _smooth(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([
        0.5 + 0.4 * torch.sin(2.0 * xx + 1.0 * yy),
        0.5 + 0.4 * torch.cos(1.5 * yy - 0.5 * xx),
        xx * yy,
    ])
    return img


@pytest.mark.parametrize("size", [48, 24])  # upscale (bilinear) and downscale (area-averaged)
def test_resized_crop_matches_torchvision(size: int) -> None:
    imgs = torch.stack([_smooth(40, 50), _smooth(40, 50).flip(-2)])
    boxes = torch.tensor([[3, 5, 30, 36], [0, 10, 40, 33]])
    out = resized_crop(imgs, boxes, size)
    ref = torch.stack([
        TF.resized_crop(imgs[i], *boxes[i].tolist(), [size, size], antialias=True)
        for i in range(2)
    ])
    # Same sampling grid. Documented differences: (1) roi_align samples the full image, so the
    # outermost output pixels blend in the real neighbours just outside the box where
    # torchvision replicates the crop's edge; (2) a downscale averages roi_align samples (box
    # filter) where torchvision uses a triangle filter. Interior of an upscale: exact.
    tol = 1e-5 if size > 40 else 5e-3
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=tol, rtol=0)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
    flipped = resized_crop(imgs, boxes, size, flip=torch.tensor([True, False]))
    torch.testing.assert_close(flipped[0], out[0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[1], out[1], atol=0, rtol=0)


def test_resized_crop_batch_index() -> None:
    imgs = torch.stack([_smooth(16, 16), 1 - _smooth(16, 16)])
    boxes = torch.tensor([[0, 0, 16, 16]] * 3)
    out = resized_crop(imgs, boxes, 16, batch_index=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(out[0], imgs[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], imgs[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="batch_index"):
        resized_crop(imgs, boxes, 16)
    assert math.isclose(float(out[2].mean()), float(imgs[1].mean()), abs_tol=1e-6)


def test_threaded_roi_resize_matches_single_call() -> None:
    from torchvision.ops import roi_align

    from esvit.augment.crop import _resize_rois

    src = torch.rand(3, 3, 30, 40)
    rois = torch.tensor([[0, 0, 0, 40, 30], [1, 5, 3, 25, 20], [2, 10, 2, 12, 9],
                         [0, 1, 1, 39, 29], [1, 0, 0, 7, 8]], dtype=torch.float32)
    ref = roi_align(src, rois, (12, 12), 1.0, 0, True)
    for threads in (1, 2, 3, 7):  # 7 > number of rois: empty chunks
        torch.testing.assert_close(_resize_rois(src, rois, (12, 12), num_threads=threads), ref,
                                   atol=0, rtol=0)


def test_full_pipeline_matches_torchvision_composition() -> None:
    """Every view equals torchvision's functional ops applied per sample with the same params."""
    b = 8
    x = _uint8(b, 36, 30, seed=4)
    aug = MultiCropAugmentation(24, 12, 2, blur_p=(1.0, 0.5, 0.5), solarize_p=0.5, seed=11)
    params = aug.sample_params(b, 36, 30)
    out = aug.apply_params(x, params)
    src = x.float() / 255
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    n_ops = Counter()
    for p, view in zip(params, out, strict=True):
        crops = resized_crop(src, p.boxes, p.size)  # crop itself is tested against torchvision
        ksize = min(13, p.size - 1)
        for i in range(b):
            img = crops[i]
            if p.flip[i]:
                img = TF.horizontal_flip(img)
            if p.jitter[i]:
                factors = [p.brightness[i], p.contrast[i], p.saturation[i], p.hue[i]]
                for k in p.order[i].tolist():
                    img = fns[k](img, float(factors[k]))
            if p.grayscale[i]:
                img = TF.rgb_to_grayscale(img, 3)
            if p.blur[i]:
                img = TF.gaussian_blur(img, [ksize, ksize], [float(p.sigma[i])] * 2)
            if p.solarize[i]:
                img = TF.solarize(img, 0.5)
            img = TF.normalize(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
            torch.testing.assert_close(view[i], img, atol=1e-4, rtol=0)
            n_ops.update(k for k in ("flip", "jitter", "grayscale", "blur", "solarize")
                         if bool(getattr(p, k)[i]))
    assert all(n_ops[k] > 0 for k in ("flip", "jitter", "grayscale", "blur", "solarize"))


def test_shards_of_a_global_batch_match_the_unsplit_batch() -> None:
    """Rank r augmenting its block of a global batch gives the rows the 1-process run gives."""
    images = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole = MultiCropAugmentation(global_size=16, local_size=8, n_local=2, seed=3)(images)
    for world in (2, 3):
        b = 6 // world
        parts = [
            MultiCropAugmentation(global_size=16, local_size=8, n_local=2, seed=3)(
                images[r * b:(r + 1) * b], shard=(r, world))
            for r in range(world)
        ]
        for v, view in enumerate(whole):
            assert torch.allclose(torch.cat([p[v] for p in parts]), view, atol=1e-6)
