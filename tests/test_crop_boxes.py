"""Crops over the whole photo: letterboxed canvases, box distributions, reachability, geometry.

Workers letterbox every image into a square canvas (``esvit.data.decode.Canvas``) and the
augmentation draws ``RandomResizedCrop.get_params`` boxes on the original size, then maps them
into the canvas. These tests hold the device-side boxes against torchvision's sampler (two-sample
Kolmogorov-Smirnov tests; fixed seeds, p > 1e-3 thresholds), check that every part of a 500x375
photo can appear in a crop (it cannot with the old centre-crop canvas), that the resampled crops
equal torchvision cropping the original, and that sharding and resuming still give the same views.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from scipy import stats
from torch.utils.data import default_collate
from torchvision.transforms import RandomResizedCrop

from esvit.augment import (
    MultiCropAugmentation,
    boxes_to_canvas,
    crop_boxes_from_draws,
    draw_crop_boxes,
)
from esvit.data import Canvas, ImageFolderDataset, load_canvas, load_image, to_canvas

N = 4000
RATIO = (3 / 4, 4 / 3)
QUIET = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)  # geometry only


def _torchvision_boxes(h: int, w: int, n: int, scale: tuple[float, float], seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    img = torch.empty(3, h, w)
    return torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(RATIO)) for _ in range(n)])


def _features(b: torch.Tensor, h: int, w: int) -> dict[str, np.ndarray]:
    top, left, bh, bw = b.double().unbind(1)
    return {"area": (bh * bw / (h * w)).numpy(), "aspect": (bw / bh).numpy(),
            "y": ((top + bh / 2) / h).numpy(), "x": ((left + bw / 2) / w).numpy()}


def _frames(sizes: list[tuple[int, int]], canvas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Letterbox boxes and source sizes of images of ``(h, w)`` ``sizes`` in a ``canvas`` square."""
    box, src = [], []
    for h, w in sizes:
        s = min(1.0, canvas / max(h, w))
        box.append((0, 0, max(1, round(h * s)), max(1, round(w * s))))
        src.append((h, w))
    return torch.tensor(box), torch.tensor(src)


# ------------------------------------------------------------------------ the box distribution


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_device_boxes_match_torchvision_on_the_original_size(scale: tuple[float, float]) -> None:
    """One batch mixing four photo shapes (and two square sizes): every sample's boxes follow
    ``RandomResizedCrop.get_params`` on *its* original size (KS on area fraction, aspect ratio
    and centre position; same centre-crop fallback rate)."""
    shapes = [(375, 500), (500, 375), (200, 1000), (300, 300), (256, 256)]
    k = len(shapes)
    box, src = _frames(shapes * N, 512)
    aug = MultiCropAugmentation(224, 96, 1, global_scale=scale, local_scale=scale, seed=1)
    params = aug.sample_params(k * N, 512, 512, box, src)
    assert all(p.boxes.shape == (k * N, 4) and p.source_boxes.dtype == torch.long for p in params)
    for i, (h, w) in enumerate(shapes):
        ref = _torchvision_boxes(h, w, N, scale, seed=i)
        fr = _features(ref, h, w)
        for view in (0, 2):  # a global and a local view (same scale here): both are RandomResizedCrop
            ours = params[view].source_boxes[i::k]
            top, left, bh, bw = ours.unbind(1)
            assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
            fo = _features(ours, h, w)
            for name in fo:
                p = stats.ks_2samp(fo[name], fr[name]).pvalue
                assert p > 1e-3, f"{name}: KS p={p:.2g} on {w}x{h}, scale {scale}"
            full_o = float(np.mean(fo["area"] == fr["area"].max()))
            full_r = float(np.mean(fr["area"] == fr["area"].max()))
            assert abs(full_o - full_r) < 5 * math.sqrt(0.25 / N) * math.sqrt(2), (w, h, full_o, full_r)


def test_canvas_boxes_are_the_source_boxes_scaled_into_the_letterbox() -> None:
    box, src = _frames([(375, 500), (750, 1000), (1000, 200), (8, 8)], 512)
    aug = MultiCropAugmentation(224, 96, 2, seed=0)
    for p in aug.sample_params(4, 512, 512, box, src):
        scale = (box[:, 2:] / src).double()  # (sy, sx): 1 for photos that fit, 0.512 for 1000x750
        expect = p.source_boxes.double() * scale.repeat(1, 2)
        torch.testing.assert_close(p.boxes.double(), expect, atol=1e-4, rtol=0)
        top, left, h, w = p.boxes.unbind(1)
        assert (top + h <= box[:, 2] + 1e-4).all() and (left + w <= box[:, 3] + 1e-4).all()
    # a 500x375 photo that fits is cropped on its own pixel grid: integer canvas boxes
    assert torch.equal(p.boxes[0], p.source_boxes[0].float())


def test_square_images_that_fill_the_canvas_keep_the_old_boxes() -> None:
    """A plain tensor batch, or a Canvas whose image fills it, gives the boxes of the previous
    sampler (``sample_crop_boxes`` on the canvas size), drawn from the same random numbers."""
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain, p_plain = MultiCropAugmentation(24, 12, 2, seed=4).forward_with_params(x)
    canvas, p_canvas = MultiCropAugmentation(24, 12, 2, seed=4).forward_with_params(Canvas.full(x))
    assert all(torch.equal(u, v) for u, v in zip(plain, canvas, strict=True))
    g = torch.Generator().manual_seed(4)
    first = crop_boxes_from_draws(draw_crop_boxes(6, (0.4, 1.0), RATIO, g), 32, 32, RATIO)
    assert torch.equal(p_plain[0].source_boxes, first) and torch.equal(p_plain[0].boxes, first.float())
    assert torch.equal(p_canvas[3].boxes, p_plain[3].boxes)


def test_boxes_to_canvas_by_hand() -> None:
    boxes = torch.tensor([[0, 0, 375, 500], [100, 200, 50, 40]])
    out = boxes_to_canvas(boxes, torch.tensor([[0, 0, 384, 512], [10, 20, 50, 40]]),
                          torch.tensor([[375, 500], [500, 400]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 384.0, 512.0], [20.0, 40.0, 5.0, 4.0]]))


# ------------------------------------------------------------------------ the whole photo


def _corner_photo(path: Path) -> Path:
    """A 500x375 JPEG, gray, with a 40x40 saturated patch of its own colour in each corner."""
    a = np.full((375, 500, 3), 128, dtype=np.uint8)
    a[:40, :40] = (255, 0, 0)
    a[:40, -40:] = (0, 255, 0)
    a[-40:, :40] = (0, 0, 255)
    a[-40:, -40:] = (255, 255, 0)
    Image.fromarray(a).save(path, quality=95)
    return path


CORNERS = {"top-left red": (1.0, 0.0, 0.0), "top-right green": (0.0, 1.0, 0.0),
           "bottom-left blue": (0.0, 0.0, 1.0), "bottom-right yellow": (1.0, 1.0, 0.0)}


def _corners_seen(views: list[torch.Tensor]) -> dict[str, int]:
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    seen = {}
    for name, rgb in CORNERS.items():
        ref = torch.tensor(rgb).view(1, 3, 1, 1)
        seen[name] = sum(int(((v * std + mean - ref).abs().amax(1) < 0.1).sum()) for v in views)
    return seen


def test_every_corner_of_a_500x375_photo_appears_in_crops(tmp_path: Path) -> None:
    path = _corner_photo(tmp_path / "corners.jpg")
    b = 64
    aug = MultiCropAugmentation(32, 16, 6, **QUIET, seed=0)
    canvas = load_canvas(path, 512)
    assert canvas.box.tolist() == [0, 0, 375, 500] and canvas.source_size.tolist() == [375, 500]
    batch = default_collate([canvas] * b)
    seen = _corners_seen(aug(batch))
    assert all(n > 0 for n in seen.values()), seen
    # the previous data path (square centre crop of the canvas) can never show the left and right
    # 62 px: neither corner colour survives the decode
    old = torch.stack([load_image(path, 256)] * b)
    seen_old = _corners_seen(MultiCropAugmentation(32, 16, 6, **QUIET, seed=0)(old))
    assert all(n == 0 for n in seen_old.values()), seen_old


def test_corners_are_cropped_as_often_as_by_torchvision() -> None:
    """How often a global crop reaches into each 25x25 corner of a 500x375 photo: the same rate as
    torchvision's (5-sigma binomial bound), and far from 0 (the old canvas: never, left and right)."""
    n = 4000
    box, src = _frames([(375, 500)] * n, 512)
    g1, g2 = MultiCropAugmentation(224, 96, 0, seed=3).sample_params(n, 512, 512, box, src)
    ours = torch.cat([g1.source_boxes, g2.source_boxes])
    ref = _torchvision_boxes(375, 500, 2 * n, (0.4, 1.0), seed=3)
    for y, x in [(0, 0), (0, 475), (350, 0), (350, 475)]:
        rates = []
        for boxes in (ours, ref):
            top, left, h, w = boxes.unbind(1)
            hit = (top < y + 25) & (y < top + h) & (left < x + 25) & (x < left + w)
            rates.append(float(hit.double().mean()))
        p = rates[1]
        assert rates[0] > 0.05 and abs(rates[0] - p) < 5 * math.sqrt(2 * p * (1 - p) / (2 * n)), (y, x, rates)


def test_global_crops_of_a_500x375_photo_downsample() -> None:
    """With the 512 canvas the 224 px global crops of scale (0.4, 1) never upsample a 500x375
    photo (min side >= 224 canvas px); the old 256 px centre-crop canvas upsampled ~88 %."""
    n = 2000
    box, src = _frames([(375, 500)] * n, 512)
    new = MultiCropAugmentation(224, 96, 0, seed=0).sample_params(n, 512, 512, box, src)
    old = MultiCropAugmentation(224, 96, 0, seed=0).sample_params(n, 256, 256)
    for p, q in zip(new, old, strict=True):
        assert float((p.boxes[:, 2:].amin(1) < 224).float().mean()) == 0.0
        assert float((q.boxes[:, 2:].amin(1) < 224).float().mean()) > 0.8


# ------------------------------------------------------------------------ resampling


def _smooth(h: int, w: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([0.5 + 0.4 * np.sin(3.0 * xx + 1.0 * yy), 0.5 + 0.4 * np.cos(2.5 * yy - 0.5 * xx), xx * yy], -1)
    return np.rint(img * 255).astype(np.uint8)


@pytest.mark.parametrize(("h", "w", "tol"), [(375, 500, 3e-2), (750, 1000, 4e-2), (40, 300, 3e-2)])
def test_views_equal_torchvision_cropping_the_original(h: int, w: int, tol: float) -> None:
    """The view of a canvas crop equals ``TF.resized_crop`` of the original image with the same
    (source) box and flip: the letterbox mapping is right (a shrunk canvas loses a little detail)."""
    orig = _smooth(h, w)
    canvas = default_collate([to_canvas(orig, 512)] * 6)
    aug = MultiCropAugmentation(64, 32, 2, **QUIET, seed=5)
    views, params = aug.forward_with_params(canvas)
    src = torch.from_numpy(orig).permute(2, 0, 1).float() / 255
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    flips = 0
    for view, p in zip(views, params, strict=True):
        for i in range(6):
            ref = TF.resized_crop(src, *p.source_boxes[i].tolist(), [p.size, p.size], antialias=True)
            if p.flip[i]:
                ref, flips = ref.flip(-1), flips + 1
            got = view[i] * std + mean
            assert float((got - ref).abs().mean()) < tol / 3, (p.kind, i)
            torch.testing.assert_close(got[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=tol * 4, rtol=0)
    assert flips > 0


def test_padding_never_bleeds_into_a_crop() -> None:
    """A full-image crop of a flat 500x375 photo in a 512 canvas is flat: the replicated edge row
    and column keep the black padding out of the bilinear samples at the box's edge (flipped too)."""
    flat = np.full((375, 500, 3), 200, dtype=np.uint8)
    c = to_canvas(flat, 512)
    assert (c.image[:, 375, :501] == 200).all() and (c.image[:, :376, 500] == 200).all()
    assert (c.image[:, 376:] == 0).all() and (c.image[:, :, 501:] == 0).all()
    batch = default_collate([c] * 8)
    for flip_p in (0.0, 1.0):
        aug = MultiCropAugmentation(224, 96, 2, global_scale=(1.0, 1.0), local_scale=(0.05, 0.1),
                                    ratio=(4 / 3, 4 / 3), flip_p=flip_p, **QUIET, seed=0)
        views, params = aug.forward_with_params(batch)
        assert params[0].source_boxes[0].tolist() == [0, 0, 375, 500]
        value = (200 / 255 - 0.485) / 0.229
        assert all(float((v[:, 0] - value).abs().max()) < 1e-5 for v in views)


def test_canvas_padding_never_reaches_a_view() -> None:
    """Whatever lies beyond each image's box and its replicated edge, the views are bit-identical
    (the source is cut to the boxes' reach, and roi_align reads at most one pixel past a box)."""
    batch = _mixed_canvas_batch(6)
    noisy = batch.image.clone()
    for i, (_, _, h, w) in enumerate(batch.box.tolist()):
        noisy[i, :, h + 1:] = 255
        noisy[i, :, :, w + 1:] = 255
    assert not torch.equal(noisy, batch.image)
    ref = MultiCropAugmentation(32, 16, 4, seed=2)(batch)
    out = MultiCropAugmentation(32, 16, 4, seed=2)(batch._replace(image=noisy))
    assert all(torch.equal(u, v) for u, v in zip(ref, out, strict=True))


# ------------------------------------------------------------------------ shards and resume


def _mixed_canvas_batch(b: int) -> Canvas:
    sizes = [(375, 500), (500, 375), (200, 1000), (64, 64), (8, 8), (1, 900)]
    rng = np.random.default_rng(0)
    items = [to_canvas(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8), 96) for i in range(b)]
    return default_collate(items)


def test_shards_of_a_canvas_batch_match_the_unsplit_batch() -> None:
    batch = _mixed_canvas_batch(12)
    whole, p_whole = MultiCropAugmentation(32, 16, 2, seed=3).forward_with_params(batch)
    for world in (2, 3, 4):
        b = 12 // world
        parts = []
        for r in range(world):
            part = Canvas(*(t[r * b:(r + 1) * b] for t in batch))
            views, params = MultiCropAugmentation(32, 16, 2, seed=3).forward_with_params(part, shard=(r, world))
            parts.append(views)
            assert torch.equal(params[1].boxes, p_whole[1].boxes[r * b:(r + 1) * b])
        for v, view in enumerate(whole):
            assert torch.allclose(torch.cat([p[v] for p in parts]), view, atol=1e-6)


def test_rng_state_resume_with_canvas_batches() -> None:
    batch = _mixed_canvas_batch(6)
    aug = MultiCropAugmentation(32, 16, 2, seed=7)
    aug(batch)
    state = aug.get_rng_state()
    first = aug(batch)
    other = MultiCropAugmentation(32, 16, 2, seed=99)
    other.set_rng_state(state)
    assert all(torch.equal(u, v) for u, v in zip(first, other(batch), strict=True))
    assert not torch.equal(first[0], aug(batch)[0])


def test_bad_frames_are_refused_with_the_reason() -> None:
    x = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    aug = MultiCropAugmentation(16, 8, 1, seed=0)
    with pytest.raises(ValueError, match="must lie in the 16x16 canvas"):
        aug(Canvas(x, torch.tensor([[0, 0, 16, 16], [0, 0, 17, 16]]), torch.tensor([[16, 16]] * 2)))
    with pytest.raises(ValueError, match="box must have shape"):
        aug(Canvas(x, torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="source_size"):
        aug(Canvas(x, torch.tensor([[0, 0, 16, 16]] * 2), torch.tensor([[16, 0]] * 2)))


# ------------------------------------------------------------------------ data sets and trainer


def test_folder_letterbox_items_batch_into_a_canvas(tmp_path: Path) -> None:
    for i, (w, h) in enumerate([(500, 375), (375, 500), (1000, 200), (30, 30)]):
        Image.fromarray(_smooth(h, w)).save(tmp_path / f"{i}.png")
    ds = ImageFolderDataset(tmp_path, 128, resize_mode="letterbox")
    items = [ds[i] for i in range(4)]
    assert all(isinstance(x, Canvas) and x.image.shape == (3, 128, 128) for x, _, _ in items)
    assert [x.box.tolist() for x, _, _ in items] == [[0, 0, 96, 128], [0, 0, 128, 96], [0, 0, 26, 128],
                                                     [0, 0, 30, 30]]
    assert [x.source_size.tolist() for x, _, _ in items] == [[375, 500], [500, 375], [200, 1000], [30, 30]]
    batch, labels, status = default_collate(items)
    assert isinstance(batch, Canvas) and batch.image.shape == (4, 3, 128, 128) and batch.box.shape == (4, 4)
    views = MultiCropAugmentation(32, 16, 1, seed=0)(batch)
    assert all(torch.isfinite(v).all() for v in views) and status.ok.all()


def test_trainer_takes_canvas_batches() -> None:
    from esvit.trainer import EsViTTrainer

    torch.manual_seed(0)
    trainer = EsViTTrainer.from_backbone(
        "vit_nano", {"depth": 1, "image_size": 32}, global_size=32, local_size=16, n_local=1,
        out_dim=64, hidden_dim=32, bottleneck_dim=16, seed=0)
    out = trainer(_mixed_canvas_batch(4), teacher_temp=0.04)
    assert torch.isfinite(out["loss"]) and "region_match_accuracy" in out


def test_training_loop_feeds_whole_photos_to_the_augmentation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train`` on a folder of 60x45 / 45x60 photos: the augmentation gets letterboxed Canvas
    batches whose boxes are the photos' own sizes (``data.resize_mode`` letterbox by default)."""
    from esvit.config import ConfigError, load_config
    from esvit.train.loop import train

    for i in range(8):
        h, w = (45, 60) if i % 2 else (60, 45)
        Image.fromarray(_smooth(h, w)).save(tmp_path / f"{i}.jpg", quality=90)
    seen: list[Canvas] = []
    real = MultiCropAugmentation.forward_with_params

    def spy(self, images, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(images)
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(MultiCropAugmentation, "forward_with_params", spy)
    config = Path(__file__).resolve().parents[1] / "configs" / "debug_cpu.yaml"
    overrides = ["data.kind=folder", f"data.path={tmp_path}", "data.canvas_size=64", "optim.batch_size=4",
                 "model.out_dim=64", "logging.progress=false", f"logging.output_dir={tmp_path / 'run'}"]
    cfg = load_config(config, overrides)
    assert cfg.data.resize_mode == "letterbox"
    train(cfg, max_steps=1)
    assert seen and all(isinstance(c, Canvas) and c.image.shape[-2:] == (64, 64) for c in seen)
    assert sorted({tuple(b) for c in seen for b in c.box[:, 2:].tolist()}) == [(45, 60), (60, 45)]
    with pytest.raises(ConfigError, match="data.resize_mode"):
        load_config(config, ["data.resize_mode=squash"])
