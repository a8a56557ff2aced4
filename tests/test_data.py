"""Data layer: folder scanning, decoding to a uint8 canvas (square or letterboxed), EXIF orientation,
bad files and bad input, synthetic data, sampling."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from esvit.augment import MultiCropAugmentation
from esvit.data import (
    BadImageCounter,
    BadImageError,
    Canvas,
    EpochSampler,
    ImageFolderDataset,
    PathTable,
    SampleStatus,
    SyntheticImageDataset,
    build_dataset,
    build_loader,
    load_canvas,
    load_image,
    scan_image_folder,
    write_synthetic_image_folder,
)
from esvit.data import folder as folder_mod

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train"
SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


def _save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _rgb(size=(8, 6), color=(200, 100, 50)) -> Image.Image:
    return Image.new("RGB", size, color)


# ------------------------------------------------------------------------------------------ scanning


def test_scan_nested_classes_sorted(tmp_path: Path) -> None:
    _save(tmp_path / "dog" / "b.png", _rgb())
    _save(tmp_path / "dog" / "deep" / "er" / "a.JPG", _rgb(), format="JPEG")
    _save(tmp_path / "cat" / "z.jpeg", _rgb(), format="JPEG")
    _save(tmp_path / "cat" / "notes.txt", _rgb(), format="PNG")  # wrong extension: ignored
    _save(tmp_path / "cat" / "._junk.jpg", _rgb(), format="JPEG")  # hidden: ignored
    (tmp_path / "empty").mkdir()
    paths, labels, classes = scan_image_folder(tmp_path)
    assert classes == ["cat", "dog", "empty"]
    rel = [os.path.relpath(p, tmp_path) for p in paths]
    assert rel == sorted(rel) == [os.path.join("cat", "z.jpeg"), os.path.join("dog", "b.png"),
                                  os.path.join("dog", "deep", "er", "a.JPG")]
    assert labels == [0, 1, 1]
    assert all(os.path.isabs(p) for p in paths)


def test_scan_unlabeled_root_and_extension_case(tmp_path: Path) -> None:
    _save(tmp_path / "A.PNG", _rgb(), format="PNG")
    _save(tmp_path / "b.TiFf", _rgb(), format="TIFF")
    _save(tmp_path / "sub" / "c.WebP", _rgb(), format="WEBP")
    paths, labels, classes = scan_image_folder(tmp_path)
    assert labels is None and classes == []
    assert [Path(p).name for p in paths] == ["A.PNG", "b.TiFf", "c.WebP"]
    only_png, _, _ = scan_image_folder(tmp_path, extensions=("PNG",))
    assert [Path(p).name for p in only_png] == ["A.PNG"]


def test_scan_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        scan_image_folder(missing)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.md").write_text("hi")
    with pytest.raises(ValueError, match=r"no images found in .*\.jpg"):
        scan_image_folder(tmp_path)
    with pytest.raises(NotADirectoryError, match="readme.md"):
        scan_image_folder(tmp_path / "cls" / "readme.md")


def test_scan_symlink_loop_terminates(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "x.png", _rgb())
    _save(tmp_path / "b" / "y.png", _rgb())
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # back to the root
    os.symlink(tmp_path / "a", tmp_path / "b" / "to_a")  # second route to a visited folder
    os.symlink(tmp_path / "missing", tmp_path / "b" / "dangling")  # broken link: not an image
    result: list = []
    worker = threading.Thread(target=lambda: result.append(scan_image_folder(tmp_path)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "scan did not finish: symlink loop not detected"
    paths, labels, classes = result[0]
    assert [os.path.relpath(p, tmp_path) for p in paths] == [os.path.join("a", "x.png"),
                                                             os.path.join("b", "y.png")]
    assert classes == ["a", "b"] and labels == [0, 1]


def test_scan_skips_fifos_sockets_and_devices_without_opening_them(tmp_path: Path, monkeypatch,
                                                                    caplog) -> None:
    import builtins
    import signal
    import socket

    _save(tmp_path / "cls" / "a.png", _rgb())
    special = {"pipe.png": "FIFO", "sock.jpg": "socket", "null.jpg": "character device"}
    os.mkfifo(tmp_path / "cls" / "pipe.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "cls" / "sock.jpg"))
    os.symlink("/dev/null", tmp_path / "cls" / "null.jpg")
    os.symlink(tmp_path / "missing.png", tmp_path / "cls" / "gone.png")  # fails fast: kept
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    monkeypatch.setattr(folder_mod.os, "open", lambda f, *a, **k: opened.append(str(f)) or real_os_open(f, *a, **k))

    def hung(signum, frame):
        raise TimeoutError("scan blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with caplog.at_level(logging.WARNING, logger="esvit.data"):
            paths, labels, classes = scan_image_folder(tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        server.close()
    assert [Path(p).name for p in paths] == ["a.png", "gone.png"] and labels == [0, 0]
    for name, kind in special.items():
        assert f"{tmp_path / 'cls' / name} ({kind})" in caplog.text
        assert not any(o.endswith(name) for o in opened)
    assert "skipped 3 image-named entries that are not regular files" in caplog.text


def test_check_regular_file_names_the_type(tmp_path: Path) -> None:
    from esvit.data.folder import check_regular_file

    os.mkfifo(tmp_path / "p.png")
    with pytest.raises(BadImageError, match=r"not a regular file \(FIFO\): not opened"):
        check_regular_file(tmp_path / "p.png")
    _save(tmp_path / "ok.png", _rgb())
    check_regular_file(tmp_path / "ok.png")  # regular: fine
    check_regular_file(tmp_path / "missing.png")  # missing: left to the decoder


def test_scan_follows_directory_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _save(outside / "o.png", _rgb())
    root = tmp_path / "root"
    _save(root / "c1" / "i.png", _rgb())
    os.symlink(outside, root / "c2")
    _, labels, classes = scan_image_folder(root)
    assert classes == ["c1", "c2"] and labels == [0, 1]


def test_scan_permission_denied_subfolder_is_skipped(tmp_path: Path, monkeypatch, caplog) -> None:
    _save(tmp_path / "ok" / "a.png", _rgb())
    _save(tmp_path / "locked" / "b.png", _rgb())
    real_scandir = os.scandir
    locked = str(tmp_path / "locked")

    def fake_scandir(path):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(folder_mod.os, "scandir", fake_scandir)
    with caplog.at_level(logging.WARNING, logger="esvit.data"):
        paths, labels, classes = scan_image_folder(tmp_path)
    assert [Path(p).name for p in paths] == ["a.png"]
    assert classes == ["locked", "ok"] and labels == [1]  # class kept, so indices stay stable
    assert "locked" in caplog.text and "unreadable" in caplog.text


def test_scan_list_file(tmp_path: Path) -> None:
    _save(tmp_path / "imgs" / "a.png", _rgb())
    (tmp_path / "named.csv").write_text("path,label\nimgs/a.png,dog\n# comment\n\n/abs/b.jpg,cat\n")
    paths, labels, classes = scan_image_folder(tmp_path / "named.csv")
    assert paths == [str(tmp_path / "imgs" / "a.png"), "/abs/b.jpg"]
    assert classes == ["cat", "dog"] and labels == [1, 0]
    (tmp_path / "ints.txt").write_text("imgs/a.png,2\nimgs/a.png,0\n")
    _, labels, classes = scan_image_folder(tmp_path / "ints.txt")
    assert labels == [2, 0] and classes == ["0", "1", "2"]
    (tmp_path / "plain.txt").write_text("imgs/a.png\n\"imgs/with,comma.png\"\n")
    paths, labels, classes = scan_image_folder(tmp_path / "plain.txt")
    assert labels is None and classes == [] and paths[1].endswith("with,comma.png")
    (tmp_path / "mixed.txt").write_text("a.png,1\nb.png\n")
    with pytest.raises(ValueError, match="line 1 has one, line 2 does not"):
        scan_image_folder(tmp_path / "mixed.txt")


def test_scan_5k_files_fast(tmp_path: Path) -> None:
    _scan_many(tmp_path, 5_000, limit_s=2.0)


@pytest.mark.slow
def test_scan_100k_files_fast(tmp_path: Path) -> None:
    _scan_many(tmp_path, 100_000, limit_s=5.0)


def _scan_many(root: Path, n: int, limit_s: float) -> None:
    per_dir = n // 50  # 50 folders spread over 10 classes
    for d in range(50):
        sub = root / f"c{d % 10}" / f"d{d:04d}"
        sub.mkdir(parents=True)
        for i in range(per_dir):
            (sub / f"{i:05d}.jpg").touch()
    t = time.perf_counter()
    paths, labels, classes = scan_image_folder(root)
    dt = time.perf_counter() - t
    assert len(paths) == n and len(classes) == 10 and labels is not None
    assert dt < limit_s, f"scanning {n} files took {dt:.2f}s"


def test_path_table_roundtrip(tmp_path: Path) -> None:
    paths = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "ü ñ.jpg"), str(tmp_path / "c.png")]
    t = PathTable(paths)
    assert list(t) == paths and len(t) == 3 and t[-1] == paths[-1] and t[0:2] == paths[:2]
    with pytest.raises(IndexError):
        t[3]
    import pickle

    assert list(pickle.loads(pickle.dumps(t))) == paths


# ------------------------------------------------------------------------------------------ decoding


def test_decode_modes_to_rgb(tmp_path: Path) -> None:
    gray = load_image(_save(tmp_path / "g.png", Image.new("L", (10, 10), 77)), 4)
    assert gray.dtype == torch.uint8 and gray.shape == (3, 4, 4) and gray.is_contiguous()
    assert (gray == 77).all()

    rgba = Image.new("RGBA", (10, 10), (200, 100, 50, 255))
    rgba.paste((10, 20, 30, 0), (0, 0, 10, 5))  # top half fully transparent
    out = load_image(_save(tmp_path / "a.png", rgba), 10)
    assert (out[:, :5] == 0).all(), "transparent pixels are composited on black"
    assert out[:, 5:].flatten(1).float().mean(1).tolist() == [200.0, 100.0, 50.0]

    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    out = load_image(_save(tmp_path / "c.jpg", cmyk, format="JPEG", quality=95), 8).float()
    r, g, b = out.flatten(1).mean(1).tolist()
    assert r > 200 and g < 50 and b < 50

    pal = Image.new("P", (6, 6), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    assert load_image(_save(tmp_path / "p.gif", pal), 3)[2].eq(255).all()


def test_decode_16bit_and_float(tmp_path: Path) -> None:
    a = np.full((6, 6), 65535, dtype=np.uint16)
    a[:3] = 257 * 100
    path = _save(tmp_path / "16.png", Image.fromarray(a))
    assert Image.open(path).mode.startswith("I;16")
    out = load_image(path, 6)
    assert (out[:, 3:] == 255).all() and (out[:, :3] == 100).all()
    f = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F")
    assert (load_image(_save(tmp_path / "f.tif", f), 4) == 128).all()
    i32 = Image.fromarray(np.full((4, 4), 65535, dtype=np.int32), mode="I")
    assert (load_image(_save(tmp_path / "i.tif", i32), 4) == 255).all()


def test_decode_resize_modes(tmp_path: Path) -> None:
    one = load_image(_save(tmp_path / "1x1.png", Image.new("RGB", (1, 1), (9, 8, 7))), 16)
    assert one.shape == (3, 16, 16) and one[:, 0, 0].tolist() == [9, 8, 7] and (one == one[:, :1, :1]).all()
    wide = Image.new("RGB", (30, 10), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 10))  # left third blue: cropped away by center crop
    crop = load_image(_save(tmp_path / "wide.png", wide), 10)
    assert (crop[0] == 255).all() and (crop[2] == 0).all()
    stretch = load_image(tmp_path / "wide.png", 10, resize_mode="stretch")
    assert stretch[2, :, :2].float().mean() > 200 and stretch[0, :, -2:].float().mean() > 200
    with pytest.raises(ValueError, match="resize_mode"):
        load_image(tmp_path / "wide.png", 10, resize_mode="squash")
    with pytest.raises(ValueError, match="canvas_size"):
        load_image(tmp_path / "wide.png", 0)


def test_decode_huge_jpeg_uses_draft(tmp_path: Path, monkeypatch) -> None:
    from PIL import JpegImagePlugin

    arr = np.full((3000, 4000, 3), 128, dtype=np.uint8)
    arr[..., 0] = (np.arange(4000) // 16 % 256).astype(np.uint8)[None, :]
    arr[..., 1] = (np.arange(3000) // 12 % 256).astype(np.uint8)[:, None]
    path = _save(tmp_path / "big.jpg", Image.fromarray(arr), format="JPEG", quality=85)
    drafted: list[tuple[int, int]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = real_draft(self, mode, size)
        drafted.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    t = time.perf_counter()
    out = load_image(path, 64)
    dt = time.perf_counter() - t
    assert drafted == [(500, 375)], "libjpeg should decode at 1/8 scale (short side 375 >= 64)"
    assert out.shape == (3, 64, 64) and dt < 0.5, f"decoding a 4000x3000 JPEG to 64px took {dt:.2f}s"
    # the reduced decode still matches a full-resolution resize closely
    full = torch.from_numpy(np.array(Image.fromarray(arr[:, 500:3500]).resize((64, 64), Image.BICUBIC)))
    assert (out.permute(1, 2, 0).float() - full.float()).abs().mean() < 6
    drafted.clear()
    load_image(path, 2000)  # needs more than 1/2 scale: no reduction possible
    assert drafted == [(4000, 3000)]


def test_decode_bad_files_raise_bad_image_error(tmp_path: Path) -> None:
    good = io.BytesIO()
    _rgb((64, 64)).save(good, format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    for name in ("trunc.jpg", "zero.jpg", "text.jpg", "missing.jpg"):
        with pytest.raises(BadImageError, match=name) as info:
            load_image(tmp_path / name, 8)
        assert info.value.reason


def test_decode_bomb_is_a_bad_image(tmp_path: Path, monkeypatch) -> None:
    path = _save(tmp_path / "b.png", _rgb((40, 40)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 x 100: bomb error
    with pytest.raises(BadImageError, match="DecompressionBomb"):
        load_image(path, 8)


# --------------------------------------------------------------------------- letterbox and EXIF


def test_letterbox_keeps_the_whole_image_at_its_own_size(tmp_path: Path) -> None:
    wide = Image.new("RGB", (30, 10), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 10))  # the left third, which the centre crop drops
    c = load_canvas(_save(tmp_path / "wide.png", wide), 32)
    assert isinstance(c, Canvas) and c.image.shape == (3, 32, 32) and c.image.dtype == torch.uint8
    assert c.box.tolist() == [0, 0, 10, 30] and c.source_size.tolist() == [10, 30]
    assert (c.image[2, :10, :10] == 255).all() and (c.image[0, :10, 10:30] == 255).all()  # pixel for pixel
    assert (c.image[:, 11:] == 0).all() and (c.image[:, :, 31:] == 0).all()  # padding beyond one replicated px
    small = load_canvas(tmp_path / "wide.png", 15)  # long side 30 > 15: shrunk, aspect kept
    assert small.box.tolist() == [0, 0, 5, 15] and small.source_size.tolist() == [10, 30]
    with pytest.raises(ValueError, match="load_canvas"):
        load_image(tmp_path / "wide.png", 16, resize_mode="letterbox")
    with pytest.raises(BadImageError, match="missing"):
        load_canvas(tmp_path / "missing.jpg", 16)


def test_letterbox_huge_jpeg_uses_draft_and_reports_the_original_size(tmp_path: Path, monkeypatch) -> None:
    from PIL import JpegImagePlugin

    arr = np.full((3000, 4000, 3), 90, dtype=np.uint8)
    path = _save(tmp_path / "big.jpg", Image.fromarray(arr), format="JPEG", quality=80)
    drafted: list[tuple[int, int]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = real_draft(self, mode, size)
        drafted.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    c = load_canvas(path, 512)
    assert drafted == [(500, 375)], "1/8 scale keeps the long side within 7/8 of the canvas"
    assert c.box.tolist() == [0, 0, 375, 500] and c.source_size.tolist() == [3000, 4000]
    assert abs(float(c.image[:, :375, :500].float().mean()) - 90) < 2
    drafted.clear()
    c = load_canvas(path, 1024)  # 1/8 would be too small (500 < 896): 1/4, then shrunk to fit
    assert drafted == [(1000, 750)] and c.box.tolist() == [0, 0, 750, 1000]
    drafted.clear()
    c = load_canvas(path, 600)  # 1/4 = 1000x750 is the smallest that covers 525: shrunk to 600x450
    assert drafted == [(1000, 750)] and c.box.tolist() == [0, 0, 450, 600]


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "esvit test camera"  # Make: a second tag, as cameras write
    return exif


def _upright_pattern() -> np.ndarray:
    """A 24x16 (h x w) image whose quadrants are red, green, blue and white: any rotation or
    mirror of it is recognisable."""
    a = np.zeros((24, 16, 3), dtype=np.uint8)
    a[:12, :8] = (255, 0, 0)
    a[:12, 8:] = (0, 255, 0)
    a[12:, :8] = (0, 0, 255)
    a[12:, 8:] = (255, 255, 255)
    return a


# The stored pixels for EXIF orientation k: the inverse of the transform a viewer applies.
_STORE = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_by_every_decode(tmp_path: Path, orientation: int) -> None:
    upright = _upright_pattern()
    stored = np.ascontiguousarray(_STORE[orientation](upright))
    path = _save(tmp_path / f"o{orientation}.jpg", Image.fromarray(stored), format="JPEG", quality=95,
                 exif=_exif(orientation))
    assert Image.open(path).getexif()[0x0112] == orientation
    want = torch.from_numpy(upright).permute(2, 0, 1).float()
    c = load_canvas(path, 32)
    assert c.box.tolist() == [0, 0, 24, 16] and c.source_size.tolist() == [24, 16]
    assert (c.image[:, :24, :16].float() - want).abs().mean() < 8
    square = load_image(path, 16, resize_mode="stretch").float()  # the evaluation / embedding decode
    ref = torch.nn.functional.interpolate(want[None], size=(16, 16), mode="area")[0]
    assert (square - ref).abs().mean() < 25, "upright, not rotated or mirrored"


def test_real_photo_with_exif_rotation_decodes_upright() -> None:
    rotated, plain = SHARED_PHOTOS / "coffee_exif_rotated.jpg", SHARED_PHOTOS / "coffee.jpg"
    if not rotated.is_file() or not plain.is_file():
        pytest.skip(f"{SHARED_PHOTOS} not present")
    assert Image.open(rotated).size == (400, 600)  # stored sideways
    a, b = load_canvas(rotated, 640), load_canvas(plain, 640)
    assert a.box.tolist() == b.box.tolist() == [0, 0, 400, 600] and a.source_size.tolist() == [400, 600]
    assert (a.image.float() - b.image.float()).abs().mean() < 3
    assert (load_image(rotated, 224).float() - load_image(plain, 224).float()).abs().mean() < 3
    sideways = torch.from_numpy(np.array(Image.open(rotated).convert("RGB"))).permute(2, 0, 1)
    assert (sideways[:, :224, :224].float() - load_image(plain, 224)[:, :224, :224].float()).abs().mean() > 10


def test_real_photos_letterbox_with_their_own_aspect_ratio() -> None:
    if not SHARED_PHOTOS.is_dir():
        pytest.skip(f"{SHARED_PHOTOS} not present")
    for name, (w, h) in {"chelsea.jpg": (451, 300), "rocket.jpg": (640, 427), "astronaut.jpg": (512, 512)}.items():
        c = load_canvas(SHARED_PHOTOS / name, 512)
        assert c.source_size.tolist() == [h, w]
        bh, bw = c.box.tolist()[2:]
        assert max(bh, bw) == min(512, max(h, w)) and abs(bw / bh - w / h) < 0.01, name


def _odd_images(root: Path) -> dict[str, tuple[int, int]]:
    """Extreme aspect ratios, tiny images and CMYK / 16-bit / palette / LA files with EXIF tags;
    returns name -> upright (height, width)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1000, 1, 3), dtype=np.uint8)).save(root / "tall_1x1000.png")
    Image.fromarray(rng.integers(0, 256, (1, 1000, 3), dtype=np.uint8)).save(root / "wide_1000x1.jpg")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "tiny_8x8.png")
    Image.new("RGB", (1, 1), (9, 8, 7)).save(root / "one_pixel.png")
    Image.new("CMYK", (40, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95, exif=_exif(6))
    Image.fromarray(np.full((20, 40), 40000, dtype=np.uint16)).save(root / "gray16.png", exif=_exif(8))
    pal = Image.new("P", (40, 20), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(root / "palette.png", exif=_exif(3))
    Image.new("LA", (20, 40), (100, 128)).save(root / "gray_alpha.png", exif=_exif(5))
    return {"tall_1x1000.png": (1000, 1), "wide_1000x1.jpg": (1, 1000), "tiny_8x8.png": (8, 8),
            "one_pixel.png": (1, 1), "cmyk.jpg": (40, 20), "gray16.png": (40, 20), "palette.png": (20, 40),
            "gray_alpha.png": (20, 40)}


def test_bad_input_gives_valid_canvases_and_crops(tmp_path: Path) -> None:
    sizes = _odd_images(tmp_path / "odd")
    ds = ImageFolderDataset(tmp_path / "odd", 64, resize_mode="letterbox")
    items = [ds[i] for i in range(len(ds))]
    assert all(st.ok for _, _, st in items), [st.error for _, _, st in items if not st.ok]
    for (c, _, _), path in zip(items, ds.paths, strict=True):
        h, w = sizes[Path(path).name]
        assert c.source_size.tolist() == [h, w], path
        top, left, bh, bw = c.box.tolist()
        assert top == left == 0 and 1 <= bh <= 64 and 1 <= bw <= 64 and max(bh, bw) == min(64, max(h, w)), path
    by_name = {Path(p).name: c for (c, _, _), p in zip(items, ds.paths, strict=True)}
    assert (by_name["cmyk.jpg"].image[0, :40, :20].float().mean() > 200)  # red, upright (20 wide)
    assert (by_name["gray16.png"].image[:, :40, :20].float().mean() - 40000 / 257).abs() < 1
    assert (by_name["palette.png"].image[2, :20, :40] == 255).all()
    batch, _, _ = default_collate(items)
    aug = MultiCropAugmentation(32, 16, 4, seed=0)
    views, params = aug.forward_with_params(batch)
    assert all(torch.isfinite(v).all() for v in views)
    for p in params:
        top, left, bh, bw = p.source_boxes.unbind(1)
        src = batch.source_size
        assert (bh >= 1).all() and (bw >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + bh <= src[:, 0]).all() and (left + bw <= src[:, 1]).all()
        ctop, cleft, ch, cw = p.boxes.unbind(1)
        assert (ctop + ch <= batch.box[:, 2] + 1e-4).all() and (cleft + cw <= batch.box[:, 3] + 1e-4).all()
    # the square decode (evaluation) takes the same files
    assert all(load_image(p, 16).shape == (3, 16, 16) for p in ds.paths)


def test_every_dataset_kind_yields_letterboxed_canvases(tmp_path: Path, monkeypatch) -> None:
    import pickle

    syn = build_dataset("synthetic", None, 16, synthetic_images=4, resize_mode="letterbox")
    c, _, _ = syn[0]
    assert isinstance(c, Canvas) and c.box.tolist() == [0, 0, 16, 16] and c.source_size.tolist() == [16, 16]
    assert torch.equal(c.image, build_dataset("synthetic", None, 16, synthetic_images=4)[0][0])

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), "labels": [1, 2]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    big = build_dataset("cifar10", str(tmp_path), 48, train=False, resize_mode="letterbox")[0][0]
    native = build_dataset("cifar10", str(tmp_path), 32, train=False)[0][0]
    assert big.box.tolist() == [0, 0, 32, 32], "never enlarged: the crops upsample from the original"
    assert torch.equal(big.image[:, :32, :32], native)
    same = build_dataset("cifar10", str(tmp_path), 32, train=False, resize_mode="letterbox")[0][0]
    assert torch.equal(same.image, native) and same.box.tolist() == [0, 0, 32, 32]

    from esvit.data import ArrayImageDataset

    stl = ArrayImageDataset(rng.integers(0, 255, (2, 3, 96, 64), dtype=np.uint8), [0, 1], ["a", "b"], 48,
                            layout="nchw", resize_mode="letterbox")
    c = stl[1][0]
    assert c.box.tolist() == [0, 0, 48, 32] and c.source_size.tolist() == [96, 64]

    write_synthetic_image_folder(tmp_path / "f", 2, 2, size=10)
    folder = build_dataset("folder", tmp_path / "f", 12, resize_mode="letterbox")
    assert folder[0][0].box.tolist() == [0, 0, 10, 10]


def test_letterbox_loader_with_workers_and_substitutes(tmp_path: Path) -> None:
    _folder_with_bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path, 16, resize_mode="letterbox", max_bad_fraction=0.5)
    loader = build_loader(ds, batch_size=5, num_workers=2, shuffle=False, seed=0)
    batches = list(loader)
    assert len(batches) == 3
    for canvas, _, _ in batches:
        assert isinstance(canvas, Canvas) and canvas.image.shape == (5, 3, 16, 16) and canvas.box.shape == (5, 4)
        assert (canvas.box[:, 2:] == 12).all() and (canvas.source_size == 12).all()
    assert int(sum((~s.ok).sum() for _, _, s in batches)) == 3
    (tmp_path / "all_bad").mkdir()
    (tmp_path / "all_bad" / "x.jpg").write_bytes(b"")
    blank, label, st = ImageFolderDataset(tmp_path / "all_bad", 8, resize_mode="letterbox")[0]
    assert not st.ok and label == -1 and (blank.image == 0).all() and blank.box.tolist() == [0, 0, 8, 8]


# -------------------------------------------------------------------------------- dataset and counting


def _folder_with_bad_files(root: Path, n_good: int = 12) -> list[str]:
    write_synthetic_image_folder(root, n_per_class=n_good // 2, num_classes=2, size=12, image_format="mixed")
    good = io.BytesIO()
    _rgb((32, 32)).save(good, format="JPEG")
    (root / "class_0" / "00000_trunc.jpg").write_bytes(good.getvalue()[:200])
    (root / "class_1" / "00001_zero.jpg").write_bytes(b"")
    (root / "class_1" / "00002_text.jpg").write_text("not an image")
    return ["00000_trunc.jpg", "00001_zero.jpg", "00002_text.jpg"]


def test_dataset_flags_bad_files_and_substitutes(tmp_path: Path) -> None:
    bad_names = _folder_with_bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path, 16)
    assert len(ds) == 15 and ds.classes == ["class_0", "class_1"]
    items = [ds[i] for i in range(len(ds))]
    bad = [i for i, (_, _, st) in enumerate(items) if not st.ok]
    assert sorted(Path(ds.paths[i]).name for i in bad) == bad_names
    assert ds.bad_indices == set(bad)
    for i, (img, label, st) in enumerate(items):
        assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and st.index == i
        if not st.ok:
            assert st.error and img.float().std() > 0  # a real substitute image, not a blank
            j = next(k % len(ds) for k in range(i + 1, i + len(ds)) if items[k % len(ds)][2].ok)
            assert torch.equal(img, items[j][0]) and label == items[j][1]
    assert 1 - len(bad) / len(ds) == pytest.approx(0.8)
    images, labels, status = default_collate(items)
    assert images.shape == (15, 3, 16, 16) and labels.dtype == torch.int64
    assert isinstance(status, SampleStatus) and status.ok.dtype == torch.bool and int((~status.ok).sum()) == 3


def test_dataset_all_bad_gives_black_canvas(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_text("x")
    ds = ImageFolderDataset(tmp_path, 8)
    img, label, st = ds[0]
    assert not st.ok and label == -1 and img.shape == (3, 8, 8) and (img == 0).all()


def test_bad_image_counter_limits(caplog) -> None:
    paths = [f"/data/img_{i}.jpg" for i in range(300)]
    c = BadImageCounter(0.05, paths, min_samples=100)
    ok = torch.ones(50, dtype=torch.bool)
    ok[[3, 7]] = False
    st = SampleStatus(ok, torch.arange(50), ["truncated"] * 50)
    with caplog.at_level(logging.WARNING, logger="esvit.data"):
        assert c.update(st) == 2
    assert c.bad == 2 and c.seen == 50 and "/data/img_3.jpg" in caplog.text
    c.update(torch.zeros(10, dtype=torch.bool))  # 12/60 = 20% but below min_samples
    with pytest.raises(RuntimeError) as info:
        c.update(SampleStatus(torch.ones(40, dtype=torch.bool), torch.arange(40), [""] * 40))
    msg = str(info.value)
    assert "12 of 100 samples" in msg and "12.00%" in msg and "0.05" in msg
    assert "/data/img_3.jpg (truncated)" in msg and "/data/img_7.jpg" in msg

    small = BadImageCounter(0.01, min_samples=100)
    small.update(SampleStatus(False, 4, "zero bytes"))
    with pytest.raises(RuntimeError, match="index 4"):
        small.finalize()
    fine = BadImageCounter(0.5)
    fine.update(torch.tensor([True, False, True, True]))
    fine.finalize()
    assert fine.fraction == 0.25


def test_loader_with_workers_counts_bad_files(tmp_path: Path) -> None:
    bad_names = _folder_with_bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path, 16, max_bad_fraction=0.5)
    loader = build_loader(ds, batch_size=4, num_workers=2, shuffle=True, seed=3)
    counter = ds.bad_counter(min_samples=1)
    seen_idx = []
    for _ in range(2):
        for images, _, status in loader:
            assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.uint8
            counter.update(status)
            seen_idx += status.index.tolist()
    counter.finalize()
    assert sorted(seen_idx) == sorted(list(range(15)) * 2)
    assert counter.seen == 30 and counter.bad == 6
    assert sorted({Path(s.split(" (")[0]).name for s in counter.first_bad}) == bad_names
    assert ds.bad_indices == set(), "workers decode in other processes"
    strict = BadImageCounter(0.1, ds.paths, min_samples=10)
    with pytest.raises(RuntimeError, match=r"of 1\d samples.*_(trunc|zero|text)\.jpg"):
        for _, _, status in loader:
            strict.update(status)


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_dataset_deterministic_and_separable(tmp_path: Path) -> None:
    a = SyntheticImageDataset(40, 24, num_classes=4, seed=1)
    b = SyntheticImageDataset(40, 24, num_classes=4, seed=1)
    c = SyntheticImageDataset(40, 24, num_classes=4, seed=2)
    img, label, st = a[5]
    assert img.shape == (3, 24, 24) and img.dtype == torch.uint8 and label == 1 and st.ok and st.index == 5
    assert torch.equal(a[5][0], b[5][0]) and not torch.equal(a[5][0], c[5][0])
    # 1-NN on raw pixels, train seed 1 -> test seed 2: far above the 25% chance level
    x_tr = torch.stack([a[i][0] for i in range(40)]).flatten(1).float()
    x_te = torch.stack([c[i][0] for i in range(40)]).flatten(1).float()
    y = torch.arange(40) % 4
    pred = y[torch.cdist(x_te, x_tr).argmin(1)]
    assert (pred == y).float().mean() > 0.6

    root = write_synthetic_image_folder(tmp_path / "syn", n_per_class=3, num_classes=4, size=20, seed=1)
    ds = ImageFolderDataset(root, 20)
    assert len(ds) == 12 and ds.classes == [f"class_{k}" for k in range(4)]
    first = SyntheticImageDataset(12, 20, num_classes=4, seed=1)[0][0]
    assert torch.equal(ds[0][0], first) and ds[0][1] == 0  # PNG is lossless


# ----------------------------------------------------------------------------------------- sampling


def test_epoch_sampler_pure_function_of_seed_and_epoch() -> None:
    s1, s2 = EpochSampler(37, seed=5), EpochSampler(37, seed=5)
    s1.set_epoch(3)
    s2.set_epoch(0)
    list(s2)
    s2.set_epoch(3)
    assert list(s1) == list(s2) and sorted(s1) == list(range(37))
    s1.set_epoch(4)
    assert list(s1) != list(s2)
    for rank in range(3):  # same order as DistributedSampler
        ours = EpochSampler(37, num_replicas=3, rank=rank, seed=5)
        ref = DistributedSampler(list(range(37)), num_replicas=3, rank=rank, seed=5)
        ours.set_epoch(2)
        ref.set_epoch(2)
        assert list(ours) == list(ref) and len(ours) == len(ref)
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_skip_resume_matches_uninterrupted(num_workers: int) -> None:
    ds = SyntheticImageDataset(30, 8, num_classes=3)
    full = build_loader(ds, batch_size=4, num_workers=num_workers, seed=7, drop_last=True)
    full.sampler.set_epoch(2)
    ref = [(x.clone(), s.index.clone()) for x, _, s in full]
    assert len(ref) == len(full) == 7

    resumed = build_loader(ds, batch_size=4, num_workers=num_workers, seed=7, drop_last=True)
    resumed.sampler.set_epoch(2)
    resumed.sampler.set_start(3 * 4)  # 3 batches already done
    it = iter(resumed)
    resumed.sampler.set_start(0)  # does not affect the pass already started
    rest = [(x, s.index) for x, _, s in it]
    assert len(rest) == 4
    for (x, i), (rx, ri) in zip(rest, ref[3:], strict=True):
        assert torch.equal(i, ri) and torch.equal(x, rx)
    # next epoch starts from the beginning again
    resumed.sampler.set_epoch(3)
    assert len(list(resumed)) == 7


def test_build_loader_options() -> None:
    ds = SyntheticImageDataset(10, 8)
    loader = build_loader(ds, batch_size=3, num_workers=0, shuffle=False, seed=0, drop_last=False)
    assert isinstance(loader, DataLoader) and loader.pin_memory == torch.cuda.is_available()
    assert [s.index.tolist() for _, _, s in loader] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    with pytest.raises(RuntimeError, match="initialised"):
        build_loader(ds, 2, distributed=True)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(ds, 0)


# ------------------------------------------------------------------------------------------ factory


def test_build_dataset_kinds(tmp_path: Path) -> None:
    syn = build_dataset("synthetic", None, 16, synthetic_images=20, synthetic_classes=5, seed=3)
    val = build_dataset("synthetic", None, 16, train=False, synthetic_images=20, synthetic_classes=5, seed=3)
    assert len(syn) == 20 and syn[0][0].shape == (3, 16, 16) and not torch.equal(syn[0][0], val[0][0])
    write_synthetic_image_folder(tmp_path / "f", 2, 2, size=10)
    folder = build_dataset("folder", tmp_path / "f", 12, synthetic_images=5, seed=1)  # extras ignored
    assert isinstance(folder, ImageFolderDataset) and folder[0][0].shape == (3, 12, 12)
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("folder", None, 12)
    with pytest.raises(ValueError, match="cifar10"):
        build_dataset("imagenet", str(tmp_path), 12)
    for kind, layout in [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                         ("stl10", "stl10_binary")]:
        with pytest.raises(FileNotFoundError, match=f"{layout}.*kind: folder"):
            build_dataset(kind, str(tmp_path), 32)


def test_build_dataset_cifar_from_fake_batches(tmp_path: Path, monkeypatch) -> None:
    """A tiny CIFAR-10 pickle layout (checksums skipped) goes through the torchvision path."""
    import pickle

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), "labels": [1, 2]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    ds = build_dataset("cifar10", str(tmp_path), 48)
    img, label, st = ds[1]
    assert len(ds) == 10 and img.shape == (3, 48, 48) and img.dtype == torch.uint8 and label == 2 and st.ok
    assert ds.classes[0] == "c0"
    native = build_dataset("cifar10", str(tmp_path), 32, train=False)
    with open(base / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"][0].reshape(3, 32, 32)
    assert torch.equal(native[0][0], torch.from_numpy(raw))  # native size: an exact copy


# --------------------------------------------------------------------------------------- real data


def test_real_cifar10_folder() -> None:
    if not SHARED_CIFAR.is_dir():
        pytest.skip(f"{SHARED_CIFAR} not present")
    paths, labels, classes = scan_image_folder(SHARED_CIFAR)
    assert len(paths) == 50_000 and len(classes) == 10 and labels is not None
    assert np.bincount(labels).tolist() == [5000] * 10
    ds = ImageFolderDataset(SHARED_CIFAR, 32)
    for i in (0, 12_345, 49_999):
        img, label, st = ds[i]
        assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and st.ok and label == labels[i]


def test_decode_never_opens_a_fifo_named_directly(tmp_path: Path) -> None:
    """A list file naming a FIFO reaches the decoder: it is refused by stat, not opened (no hang)."""
    from esvit.data.decode import BadImageError, load_canvas, load_image

    fifo = tmp_path / "named.jpg"
    os.mkfifo(fifo)
    for decode in (lambda: load_image(fifo, 32), lambda: load_canvas(fifo, 32)):
        with pytest.raises(BadImageError, match="not a regular file"):
            decode()
