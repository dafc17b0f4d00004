"""Tests for pedenet.data: image/mask conversion rules and the MVTec AD layout."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pedenet import data
from pedenet.data import DataError, load_image, load_mask

MTD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mtd"
MVTEC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"


def check_rgb(arr: np.ndarray, shape_hw: tuple[int, int]) -> None:
    assert arr.dtype == np.float32
    assert arr.shape == (*shape_hw, 3)
    assert arr.flags["C_CONTIGUOUS"]
    assert float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0


# --------------------------------------------------------------------------- image modes


def test_grayscale_l_replicated(tmp_path):
    a = np.array([[0, 128, 255], [10, 20, 30]], dtype=np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    check_rgb(out, (2, 3))
    for ch in range(3):
        np.testing.assert_allclose(out[..., ch], a / 255.0, atol=1e-6)


def test_rgb_png_exact(tmp_path):
    a = np.zeros((4, 5, 3), np.uint8)
    a[0, 0] = (255, 0, 0)
    a[1, 2] = (0, 51, 102)
    Image.fromarray(a, "RGB").save(tmp_path / "c.png")
    out = load_image(tmp_path / "c.png")
    check_rgb(out, (4, 5))
    np.testing.assert_allclose(out[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(out[1, 2], [0.0, 0.2, 0.4], atol=1e-6)


def test_rgba_alpha_dropped_colours_kept(tmp_path):
    a = np.zeros((3, 3, 4), np.uint8)
    a[..., :3] = (200, 100, 50)
    a[..., 3] = 0  # fully transparent: colours still used as they are
    a[1, 1, 3] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    check_rgb(out, (3, 3))
    np.testing.assert_allclose(out[0, 0], np.array([200, 100, 50]) / 255.0, atol=1e-6)
    np.testing.assert_allclose(out[1, 1], out[0, 0])


def test_la_alpha_dropped(tmp_path):
    img = Image.new("LA", (4, 2), (77, 0))
    img.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    check_rgb(out, (2, 4))
    np.testing.assert_allclose(out, 77 / 255.0, atol=1e-6)


def test_palette(tmp_path):
    img = Image.new("P", (3, 2))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putpixel((0, 0), 1)
    img.putpixel((2, 1), 2)
    img.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    check_rgb(out, (2, 3))
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])
    np.testing.assert_allclose(out[1, 2], [0, 0, 1])
    np.testing.assert_allclose(out[0, 1], [0, 0, 0])


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (3, 2))
    img.putpalette([10, 20, 30, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "pt.png", transparency=0)
    with Image.open(tmp_path / "pt.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    out = load_image(tmp_path / "pt.png")
    check_rgb(out, (2, 3))
    # transparent entry keeps its colour; alpha is dropped
    np.testing.assert_allclose(out[0, 0], np.array([10, 20, 30]) / 255.0, atol=1e-6)
    np.testing.assert_allclose(out[0, 1], [0, 1, 0])


def test_bilevel_mode_1(tmp_path):
    img = Image.new("1", (4, 3), 0)
    img.putpixel((1, 2), 1)
    img.save(tmp_path / "b.png")
    out = load_image(tmp_path / "b.png")
    check_rgb(out, (3, 4))
    assert out[2, 1].tolist() == [1.0, 1.0, 1.0]
    assert out.sum() == 3.0


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit(tmp_path, ext):
    a = np.array([[65535, 32768], [0, 1000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / f"i16{ext}")
    with Image.open(tmp_path / f"i16{ext}") as check:
        assert check.mode.startswith("I;16")
    out = load_image(tmp_path / f"i16{ext}")
    check_rgb(out, (2, 2))
    assert out[0, 0, 0] == 1.0
    assert out[0, 1, 1] == pytest.approx(0.5, abs=1e-4)
    assert out[1, 0, 2] == 0.0
    assert out[1, 1, 0] == pytest.approx(1000 / 65535, rel=1e-5)


def test_32bit_integer_mode_i(tmp_path):
    a = np.array([[2**31 - 1, 2**30], [0, -5]], dtype=np.int32)
    tifffile.imwrite(tmp_path / "i32.tif", a)
    with Image.open(tmp_path / "i32.tif") as check:
        assert check.mode == "I"
    out = load_image(tmp_path / "i32.tif")
    check_rgb(out, (2, 2))
    assert out[0, 0, 0] == 1.0
    assert out[0, 1, 0] == pytest.approx(0.5, abs=1e-6)
    assert out[1, 0, 0] == 0.0 and out[1, 1, 0] == 0.0  # negative clipped


def test_float_mode_f_clipped(tmp_path):
    a = np.array([[-0.5, 0.25], [2.0, np.nan]], dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", a)
    with Image.open(tmp_path / "f.tif") as check:
        assert check.mode == "F"
    with pytest.warns(UserWarning, match="f.tif: float image with 25% of its values above 1 "
                      r"\(up to 2\)"):  # one of four
        out = load_image(tmp_path / "f.tif")
    check_rgb(out, (2, 2))
    np.testing.assert_allclose(out[..., 0], [[0.0, 0.25], [1.0, 0.0]])


def test_float_rgb_tiff_via_tifffile(tmp_path):
    a = np.zeros((3, 4, 3), np.float32)
    a[..., 1] = 0.75
    a[0, 0, 0] = 5.0
    tifffile.imwrite(tmp_path / "rgbf.tiff", a, photometric="rgb")
    with pytest.warns(UserWarning, match="rgbf.tiff: float image with 3% of its values above 1"):
        out = load_image(tmp_path / "rgbf.tiff")  # 1 of 36 values
    check_rgb(out, (3, 4))
    assert out[0, 0, 0] == 1.0
    np.testing.assert_allclose(out[..., 1], 0.75)


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # white
    for x in range(8):
        for y in range(8):
            img.putpixel((x, y), (255, 0, 0, 0))  # cyan
    img.save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as check:
        assert check.mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg")
    check_rgb(out, (8, 16))
    np.testing.assert_allclose(out[4, 3], [0, 1, 1], atol=0.06)
    np.testing.assert_allclose(out[4, 12], [1, 1, 1], atol=0.06)


def test_other_modes_converted_by_pillow():
    ycc = Image.new("YCbCr", (3, 2), (128, 128, 128))
    out = data._to_rgb_array(ycc)
    check_rgb(out, (2, 3))
    np.testing.assert_allclose(out, 128 / 255.0, atol=0.02)


def test_bmp(tmp_path):
    a = np.full((5, 7, 3), (30, 60, 90), np.uint8)
    Image.fromarray(a).save(tmp_path / "x.bmp")
    out = load_image(tmp_path / "x.bmp")
    check_rgb(out, (5, 7))
    np.testing.assert_allclose(out[2, 3], np.array([30, 60, 90]) / 255.0, atol=1e-6)


def test_tiff_rgb_8bit(tmp_path):
    a = np.full((5, 7, 3), (30, 60, 90), np.uint8)
    Image.fromarray(a).save(tmp_path / "x.tif")
    out = load_image(tmp_path / "x.tif")
    check_rgb(out, (5, 7))
    np.testing.assert_allclose(out[0, 0], np.array([30, 60, 90]) / 255.0, atol=1e-6)


def test_uppercase_extensions(tmp_path):
    Image.new("L", (6, 4), 255).save(tmp_path / "UP.PNG", format="PNG")
    Image.new("RGB", (6, 4), (255, 255, 255)).save(tmp_path / "UP.JPG", format="JPEG")
    for name in ("UP.PNG", "UP.JPG"):
        out = load_image(tmp_path / name)
        check_rgb(out, (4, 6))
        assert out.min() > 0.95
    assert [p.name for p in data.list_images(tmp_path)] == ["UP.JPG", "UP.PNG"]


def test_exif_orientation_image_and_mask(tmp_path):
    stored = np.zeros((20, 40), np.uint8)  # H=20, W=40 as stored
    stored[:6, :6] = 255  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    Image.fromarray(stored).save(tmp_path / "rot_mask.png", exif=exif)
    out = load_image(tmp_path / "rot.jpg")
    check_rgb(out, (40, 20))
    expected = np.rot90(stored, k=-1) / 255.0  # clockwise
    np.testing.assert_allclose(out[..., 0], expected, atol=0.1)
    mask = load_mask(tmp_path / "rot_mask.png", expected_shape=out.shape)
    assert mask.shape == (40, 20)
    np.testing.assert_array_equal(mask, np.rot90(stored, k=-1) > 0)
    assert mask[:6, -6:].all()  # top-left went to top-right


def test_large_image_any_size(tmp_path):
    Image.new("L", (3000, 7), 51).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png")
    check_rgb(out, (7, 3000))


# --------------------------------------------------------------------------- errors


def test_corrupt_file_names_it(tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match="corrupt.png") as info:
        load_image(bad)
    assert "cannot read image" in str(info.value)
    assert "replace or remove" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("fmt,ext", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_file(tmp_path, fmt, ext):
    rng = np.random.default_rng(0)
    full = tmp_path / f"full{ext}"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, format=fmt)
    raw = full.read_bytes()
    cut = tmp_path / f"truncated{ext}"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"truncated{ext}"):
        load_image(cut)
    with pytest.raises(DataError, match=f"truncated{ext}"):
        load_mask(cut)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_tiff_names_it(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage garbage")
    with pytest.raises(DataError, match="bad.tif"):
        load_image(bad)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="folder"):
        load_image(tmp_path)


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    Image.new("L", (30, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 900 > 2 * 100
    with pytest.raises(DataError, match="too large") as info:
        load_image(tmp_path / "big.png")
    assert "big.png" in str(info.value)


def test_decompression_bomb_limit_untouched():
    import PIL.Image

    assert PIL.Image.MAX_IMAGE_PIXELS is not None


# --------------------------------------------------------------------------- masks


def test_mask_zero_one(tmp_path):
    a = np.array([[0, 1], [1, 0]], np.uint8)
    Image.fromarray(a).save(tmp_path / "m01.png")
    m = load_mask(tmp_path / "m01.png")
    assert m.dtype == bool and m.shape == (2, 2)
    np.testing.assert_array_equal(m, a == 1)


def test_mask_zero_255(tmp_path):
    a = np.array([[0, 255, 0], [255, 255, 0]], np.uint8)
    Image.fromarray(a).save(tmp_path / "m255.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m255.png"), a == 255)


def test_mask_soft(tmp_path):
    a = np.array([[0, 127, 128, 200, 255, 5]], np.uint8)
    Image.fromarray(a).save(tmp_path / "soft.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "soft.png"), [[0, 0, 1, 1, 1, 0]])


def test_mask_whose_values_all_fall_below_the_threshold_warns(tmp_path):
    Image.fromarray(np.array([[0, 60], [60, 0]], np.uint8)).save(tmp_path / "faint.png")
    with pytest.warns(UserWarning, match=r"faint\.png: mask has non-zero pixels \(up to 60\) but "
                                         "none at the anomalous threshold"):
        assert not load_mask(tmp_path / "faint.png").any()
    tifffile.imwrite(tmp_path / "faint.tif", np.array([[0.0, 0.3]], np.float32))
    with pytest.warns(UserWarning, match=r"up to 0\.3"):
        assert not load_mask(tmp_path / "faint.tif").any()


def test_mask_empty(tmp_path):
    Image.new("L", (5, 4), 0).save(tmp_path / "empty.png")
    m = load_mask(tmp_path / "empty.png", expected_shape=(4, 5))
    assert m.shape == (4, 5) and not m.any()


def test_mask_16bit_scaled(tmp_path):
    a = np.array([[0, 65535, 40000, 20000]], np.uint16)
    Image.fromarray(a).save(tmp_path / "m16.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m16.png"), [[0, 1, 1, 0]])
    b = np.array([[0, 1]], np.uint16)
    Image.fromarray(b).save(tmp_path / "m16_01.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m16_01.png"), [[0, 1]])


def test_mask_rgb_and_bilevel(tmp_path):
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 0] = (255, 255, 255)
    a[1, 2] = (255, 0, 0)  # coloured annotation counts
    Image.fromarray(a).save(tmp_path / "mrgb.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "mrgb.png"), [[1, 0, 0], [0, 0, 1]])
    img = Image.new("1", (3, 1), 0)
    img.putpixel((2, 0), 1)
    img.save(tmp_path / "m1.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m1.png"), [[0, 0, 1]])


def test_mask_size_mismatch(tmp_path):
    Image.new("L", (30, 20), 0).save(tmp_path / "small_mask.png")
    with pytest.raises(DataError) as info:
        load_mask(tmp_path / "small_mask.png", expected_shape=(40, 30, 3))
    msg = str(info.value)
    assert "small_mask.png" in msg
    assert "(40, 30)" in msg and "(20, 30)" in msg


# --------------------------------------------------------------------------- layout


def write_png(path: Path, value: int = 0, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def test_list_images_ignores_non_images(tmp_path):
    write_png(tmp_path / "b.png")
    write_png(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "c.JPEG", format="JPEG")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "Thumbs.db").write_bytes(b"\0\0")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "._b.png").write_bytes(b"\0\5\26\7")  # macOS resource fork
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "sub" / "inner.png")
    (tmp_path / "dir.png").mkdir()  # a folder named like an image
    assert [p.name for p in data.list_images(tmp_path)] == ["a.png", "b.png", "c.JPEG"]


def test_list_images_counts_unread_image_formats(tmp_path):
    write_png(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.gif")
    Image.new("RGB", (4, 4)).save(tmp_path / "c.WEBP", format="WEBP")
    (tmp_path / "._d.webp").write_bytes(b"\0")  # hidden: ignored without a word
    (tmp_path / "notes.txt").write_text("not an image format: no warning")
    with pytest.warns(data.SkippedFileWarning) as record:
        assert [p.name for p in data.list_images(tmp_path)] == ["a.png"]
    assert len(record) == 1
    message = str(record[0].message)
    assert str(tmp_path) in message and "skipped 2 image file(s)" in message
    assert ".gif, .webp" in message and "b.gif, c.WEBP" in message and "PNG" in message


def test_find_images_warns_per_folder_with_unread_formats(tmp_path):
    write_png(tmp_path / "top" / "a.png")
    write_png(tmp_path / "top" / "sub" / "b.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "top" / "sub" / "c.gif")
    with pytest.warns(data.SkippedFileWarning, match="skipped 1 image file") as record:
        found = data.find_images(tmp_path / "top")
    assert [p.name for p in found] == ["a.png", "b.png"]
    assert len(record) == 1 and str(tmp_path / "top" / "sub") in str(record[0].message)
    (tmp_path / "top" / "gone.webp").symlink_to(tmp_path / "missing.webp")  # broken: not counted
    with pytest.warns(data.SkippedFileWarning) as record:
        data.find_images(tmp_path / "top")
    assert len(record) == 1 and "skipped 1 image file" in str(record[0].message)


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(DataError, match="missing"):
        data.list_images(tmp_path / "missing")


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    root = tmp_path / "dataset"
    cat = root / "widget"
    for i in range(3):
        write_png(cat / "train" / "good" / f"{i:03d}.png")
    (cat / "train" / "good" / "readme.txt").write_text("not an image")
    write_png(cat / "test" / "good" / "000.png")
    write_png(cat / "test" / "good" / "001.png")
    write_png(cat / "test" / "crack" / "000.png")
    write_png(cat / "test" / "crack" / "001.png")
    write_png(cat / "test" / "scratch" / "000.png")
    write_png(cat / "ground_truth" / "crack" / "000_mask.png", 255)
    write_png(cat / "ground_truth" / "crack" / "001.PNG", 255)  # <stem>.<ext>, upper-case
    # test/scratch/000.png has no mask
    (root / "other").mkdir()
    write_png(root / "gizmo" / "train" / "good" / "000.png")
    return root


def test_resolve_category_root_and_name(tiny_root):
    assert data.resolve_category(tiny_root, "widget") == tiny_root / "widget"
    assert data.resolve_category(tiny_root / "widget") == tiny_root / "widget"
    assert data.resolve_category(tiny_root / "widget", "widget") == tiny_root / "widget"
    assert data.resolve_category(str(tiny_root), "gizmo") == tiny_root / "gizmo"


def test_category_dir_and_categories_under(tiny_root, tmp_path):
    assert data.is_category_dir(tiny_root / "widget") and data.is_category_dir(str(tiny_root / "gizmo"))
    assert not data.is_category_dir(tiny_root) and not data.is_category_dir(tiny_root / "other")
    assert not data.is_category_dir(tmp_path / "absent")
    (tiny_root / ".hidden" / "train").mkdir(parents=True)  # hidden folders are not categories
    assert data.categories_under(tiny_root) == ["gizmo", "widget"]
    assert data.categories_under(tiny_root / "widget") == []  # train/ and test/ hold no train/
    assert data.categories_under(tmp_path / "absent") == []
    assert data.categories_under(tiny_root / "widget" / "train" / "good" / "000.png") == []


def test_resolve_category_errors_list_categories(tiny_root, tmp_path):
    with pytest.raises(DataError) as info:
        data.resolve_category(tiny_root, "nope")
    msg = str(info.value)
    assert "nope" in msg and "gizmo, widget" in msg and str(tiny_root) in msg
    with pytest.raises(DataError) as info:
        data.resolve_category(tiny_root)
    assert "gizmo, widget" in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        data.resolve_category(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        data.resolve_category(empty)


def test_train_samples(tiny_root):
    samples = data.train_samples(tiny_root / "widget")
    assert [s.path.name for s in samples] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in samples)
    with pytest.raises(AttributeError):
        samples[0].label = 1  # frozen


def test_train_samples_missing_or_empty(tiny_root, tmp_path):
    with pytest.raises(DataError, match="train"):
        data.train_samples(tmp_path)
    (tmp_path / "c" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        data.train_samples(tmp_path / "c")


def test_test_samples_masks_and_warning(tiny_root):
    cat = tiny_root / "widget"
    with pytest.warns(data.MissingMaskWarning, match=r"scratch[/\\]000\.png"):
        samples = data.test_samples(cat)
    by = {(s.defect, s.path.name): s for s in samples}
    assert len(samples) == 5
    assert [s.defect for s in samples] == ["crack", "crack", "good", "good", "scratch"]
    assert by[("good", "000.png")].label == 0 and by[("good", "000.png")].mask_path is None
    assert by[("crack", "000.png")].mask_path == cat / "ground_truth" / "crack" / "000_mask.png"
    assert by[("crack", "001.png")].mask_path == cat / "ground_truth" / "crack" / "001.PNG"
    assert by[("scratch", "000.png")].label == 1
    assert by[("scratch", "000.png")].mask_path is None


def test_test_samples_missing(tmp_path):
    with pytest.raises(DataError, match="test"):
        data.test_samples(tmp_path)
    (tmp_path / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        data.test_samples(tmp_path)


def test_find_images(tiny_root, tmp_path):
    cat = tiny_root / "widget"
    found = data.find_images([cat / "test"])
    rel = [p.relative_to(cat / "test").as_posix() for p in found]
    assert rel == ["crack/000.png", "crack/001.png", "good/000.png", "good/001.png",
                   "scratch/000.png"]
    one = cat / "test" / "good" / "000.png"
    assert data.find_images(one) == [one]
    with pytest.warns(UserWarning, match=r"2 input image\(s\) given more than once .*000.png"):
        assert data.find_images([str(one), one, cat / "test" / "good"]) == [
            one, cat / "test" / "good" / "001.png"]  # duplicates removed, in input order
    # a link to an image given after it: the warning names the path left out and the one kept
    link = tmp_path / "link.png"
    link.symlink_to(one)
    with pytest.warns(UserWarning, match=rf"first left out: {link}, the same file as {one}, which is scored\)"):
        assert data.find_images([one, link]) == [one]
    with pytest.warns(UserWarning, match=rf"first left out: {one}, the same file as {link}, which is scored\)"):
        assert data.find_images([link, one]) == [link]
    with pytest.raises(DataError, match="absent.png"):
        data.find_images([tmp_path / "absent.png"])
    txt = cat / "train" / "good" / "readme.txt"
    with pytest.raises(DataError, match="readme.txt"):
        data.find_images([txt])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="nothing"):
        data.find_images([tmp_path / "nothing"])


def test_test_samples_not_collected_by_pytest():
    assert data.test_samples.__test__ is False


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def mtd() -> Path:
    if not MTD.is_dir():
        pytest.skip(f"MTD data not found at {MTD} (shared/data/mtd next to the repository)")
    return MTD


def test_mtd_layout(mtd):
    cat = data.resolve_category(mtd)
    assert cat == mtd
    train = data.train_samples(cat)
    assert len(train) == 761
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every defective MTD image has a mask
        test = data.test_samples(cat)
    counts: dict[str, int] = {}
    for s in test:
        counts[s.defect] = counts.get(s.defect, 0) + 1
        assert s.label == (s.defect != "good")
        assert (s.mask_path is None) == (s.defect == "good")
    assert counts == {"good": 191, "blowhole": 115, "break": 85, "crack": 57, "fray": 32,
                      "uneven": 103}


def test_mtd_empty_masks_still_anomalous(mtd):
    test = data.test_samples(mtd)
    empty = {"exp3_num_45042", "exp4_num_45057", "exp4_num_124690", "exp4_num_352527"}
    chosen = [s for s in test if s.path.stem in empty]
    assert len(chosen) == 4
    for s in chosen:
        assert s.label == 1 and s.defect == "uneven" and s.mask_path is not None
        image = load_image(s.path)
        mask = load_mask(s.mask_path, expected_shape=image.shape)
        assert mask.shape == image.shape[:2] and not mask.any()
    # the other uneven masks are not empty
    others = [s for s in test if s.defect == "uneven" and s.path.stem not in empty][:10]
    assert all(load_mask(s.mask_path).any() for s in others)


def test_mtd_image_loads_with_jpeg_size(mtd):
    sample = data.train_samples(mtd)[0]
    with Image.open(sample.path) as raw:
        width, height = raw.size
        assert raw.mode == "L"
    image = load_image(sample.path)
    check_rgb(image, (height, width))
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_mvtec_bottle():
    if not (MVTEC / "bottle").is_dir():
        pytest.skip(f"MVTec AD bottle not found at {MVTEC / 'bottle'}")
    cat = data.resolve_category(MVTEC, "bottle")
    assert len(data.train_samples(cat)) == 209
    test = data.test_samples(cat)
    assert len(test) == 83
    s = next(s for s in test if s.label == 1)
    image = load_image(s.path)
    mask = load_mask(s.mask_path, expected_shape=image.shape)
    assert image.shape == (900, 900, 3) and mask.any()
    with pytest.raises(DataError, match="bottle"):
        data.resolve_category(MVTEC, "cable")


def _write_png_rgb16(path, arr):
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): filter 0, one IDAT."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_colour_tiff_keeps_16_bits(tmp_path):
    import tifffile

    arr = np.random.default_rng(0).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c16.tif", arr, photometric="rgb")
    out = load_image(tmp_path / "c16.tif")
    np.testing.assert_allclose(out, arr / 65535.0, rtol=0, atol=1e-7)
    # planar (one plane per channel): Pillow decodes it to scrambled 8-bit tiles; tifffile reads it
    tifffile.imwrite(tmp_path / "p16.tif", arr.transpose(2, 0, 1), photometric="rgb",
                     planarconfig="separate")
    np.testing.assert_allclose(load_image(tmp_path / "p16.tif"), arr / 65535.0, rtol=0, atol=1e-7)
    tifffile.imwrite(tmp_path / "p8.tif", (arr >> 8).astype(np.uint8).transpose(2, 0, 1),
                     photometric="rgb", planarconfig="separate")
    np.testing.assert_allclose(load_image(tmp_path / "p8.tif"), (arr >> 8) / 255.0, rtol=0, atol=1e-7)


def test_16_bit_colour_png_is_read_at_8_bits_with_a_warning(tmp_path):
    arr = np.random.default_rng(1).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    _write_png_rgb16(tmp_path / "c16.png", arr)
    with pytest.warns(UserWarning, match="c16.png: 16-bit colour image read at 8 bits"):
        out = load_image(tmp_path / "c16.png")
    np.testing.assert_allclose(out, (arr // 256) / 255.0, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["tiff8", "tiff16rgb", "apng"])
def test_multi_page_images_use_the_first_page_with_one_warning(tmp_path, kind):
    import tifffile

    rng = np.random.default_rng(0)
    if kind == "tiff8":
        pages = rng.integers(0, 256, (3, 20, 30), dtype=np.uint8)
        path = tmp_path / "pages.tif"
        tifffile.imwrite(path, pages, photometric="minisblack")  # 3 gray pages, not planar RGB
        first = np.repeat(pages[0][..., None] / 255.0, 3, axis=2)
    elif kind == "tiff16rgb":
        pages = rng.integers(0, 65536, (2, 20, 30, 3), dtype=np.uint16)
        path = tmp_path / "pages16.tiff"
        tifffile.imwrite(path, pages, photometric="rgb")
        first = pages[0] / 65535.0
    else:
        pages = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
        path = tmp_path / "anim.png"
        Image.fromarray(pages[0]).save(path, save_all=True, append_images=[Image.fromarray(pages[1])])
        first = pages[0] / 255.0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = load_image(path)
    texts = [str(w.message) for w in record]
    assert texts == [f"{path}: holds {len(pages)} pages (frames); only the first is used - save "
                     "each page as its own image to use the others"]
    np.testing.assert_allclose(out, first, rtol=0, atol=1e-6)


def test_float_image_on_the_0_255_scale_is_clipped_with_a_warning(tmp_path):
    import tifffile

    gray = np.random.default_rng(0).uniform(0, 255, (20, 30)).astype(np.float32)
    Image.fromarray(gray, mode="F").save(tmp_path / "f255.tif")
    tifffile.imwrite(tmp_path / "rgbf.tif", np.stack([gray] * 3, -1), photometric="rgb")
    for name in ("f255.tif", "rgbf.tif"):
        with pytest.warns(UserWarning, match=rf"{name}: float image with \d+% of its values above 1 "
                          r"\(up to 25\d\.\d+\).*divide it by 255"):
            out = load_image(tmp_path / name)
        np.testing.assert_array_equal(out, np.clip(np.stack([gray] * 3, -1), 0, 1))
    # values above 1 that are +inf: the figure says so
    inf = np.clip(gray / 255, 0, 1)
    inf[:2] = np.inf
    Image.fromarray(inf, mode="F").save(tmp_path / "inf.tif")
    with pytest.warns(UserWarning, match=r"inf.tif: float image with 10% of its values above 1 \(up to inf\)"):
        load_image(tmp_path / "inf.tif")
    # values in [0, 1] (and a few above: overshoot) are read without a warning
    ok = np.clip(gray / 255, 0, 1)
    ok[0, :5] = 1.2
    Image.fromarray(ok, mode="F").save(tmp_path / "ok.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(load_image(tmp_path / "ok.tif")[..., 0], np.clip(ok, 0, 1))


def test_find_images_follows_linked_folders_once(tmp_path):
    """A linked folder outside the one given is searched; a link inside it finds nothing
    twice (files keep their real path, whatever the listing order); a link up the tree is
    skipped with a warning instead of taking in the folders around."""
    from pedenet.data import SkippedFileWarning

    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "top" / "inner").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "sibling").mkdir()
    img.save(tmp_path / "top" / "a.png")
    img.save(tmp_path / "top" / "inner" / "b.png")
    img.save(tmp_path / "elsewhere" / "c.png")
    img.save(tmp_path / "sibling" / "s.png")
    (tmp_path / "top" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "top" / "again").symlink_to(tmp_path / "elsewhere")  # one real folder, twice
    (tmp_path / "top" / "0inner").symlink_to(tmp_path / "top" / "inner")  # listed before inner
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = data.find_images(tmp_path / "top")
    assert [p.relative_to(tmp_path / "top").as_posix() for p in found] == [
        "a.png", "again/c.png", "inner/b.png"]
    link = tmp_path / "top" / "inner" / "up"
    link.symlink_to(tmp_path / "top")  # a loop: inside, so its files are those found already
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.find_images(tmp_path / "top") == found
    link.unlink()
    link.symlink_to(tmp_path)  # the parent of the folder given: would take in sibling/
    with pytest.warns(SkippedFileWarning, match=rf"skipped: {link}: a link to {tmp_path.resolve()}, which holds"):
        assert data.find_images(tmp_path / "top") == found
