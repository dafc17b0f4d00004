"""Tests for pedenet.visualization: overlays, colour range, atomic PNG writing."""

from __future__ import annotations

import os
import stat
import types

import numpy as np
import pytest
from PIL import Image
from skimage.segmentation import find_boundaries

from pedenet.visualization import (CONTOUR_COLOR, HEADROOM, MIN_HELD_OUT_FOR_SCALE, color_range, color_source,
                                   heatmap_overlay, save_png)


def _inputs(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((h, w, 3), dtype=np.float32)
    amap = rng.normal(100.0, 10.0, (h, w)).astype(np.float32)
    return image, amap


def test_overlay_dtype_and_shape():
    image, amap = _inputs()
    out = heatmap_overlay(image, amap, 90.0, 130.0)
    assert out.dtype == np.uint8 and out.shape == (40, 56, 3)
    # grayscale and per-image range are accepted too
    out2 = heatmap_overlay(image[..., 0], amap, None, None, alpha=0.3, cmap="inferno")
    assert out2.dtype == np.uint8 and out2.shape == (40, 56, 3)


def test_overlay_alpha_extremes_and_clipping():
    image, amap = _inputs()
    only_image = heatmap_overlay(image, amap, 0.0, 1.0, alpha=0.0)
    np.testing.assert_array_equal(only_image, np.rint(image * 255).astype(np.uint8))
    # everything above vmax saturates to the top colour of the colormap
    top = heatmap_overlay(image, np.full_like(amap, 1e6), 0.0, 1.0, alpha=1.0)
    assert (top == top[0, 0]).all()


def test_contour_colour_exactly_on_mask_boundaries():
    image, amap = _inputs()
    mask = np.zeros(amap.shape, dtype=bool)
    mask[10:20, 15:30] = True
    mask[30:33, 40:50] = True
    out = heatmap_overlay(image, amap, 80.0, 120.0, mask=mask)
    is_contour = (out == np.array(CONTOUR_COLOR, dtype=np.uint8)).all(axis=2)
    expected = find_boundaries(mask, mode="outer")
    assert expected.any()
    np.testing.assert_array_equal(is_contour, expected)
    # without a mask the contour colour never appears, for any map value
    plain = heatmap_overlay(np.ones_like(image), np.linspace(0, 1, amap.size).reshape(amap.shape),
                            0.0, 1.0)
    assert not (plain == np.array(CONTOUR_COLOR, dtype=np.uint8)).all(axis=2).any()


def test_overlay_rejects_shape_mismatch():
    image, amap = _inputs()
    with pytest.raises(ValueError, match="shape"):
        heatmap_overlay(image, amap[:-1], 0.0, 1.0)
    with pytest.raises(ValueError, match="mask shape"):
        heatmap_overlay(image, amap, 0.0, 1.0, mask=np.zeros((3, 3), bool))


def test_save_png_round_trip(tmp_path):
    image, amap = _inputs(h=23, w=31)
    out = heatmap_overlay(image, amap, 90.0, 130.0)
    path = tmp_path / "sub" / "o.png"
    save_png(path, out)
    with Image.open(path) as img:
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), out)
    assert [p.name for p in path.parent.iterdir()] == ["o.png"]  # no temp file left
    save_png(path, np.zeros((5, 6), np.uint8))  # replaces atomically
    with Image.open(path) as img:
        assert img.size == (6, 5)
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", out.astype(np.float32))


def test_save_png_gets_the_permissions_of_a_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        save_png(tmp_path / "o.png", np.zeros((4, 4), np.uint8))
        (tmp_path / "ref").write_bytes(b"")  # what open() gives under the same umask
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o.png").stat().st_mode) == 0o644  # not mkstemp's 0600
    assert (tmp_path / "o.png").stat().st_mode == (tmp_path / "ref").stat().st_mode


class _Model:
    def __init__(self, q):
        self.normal_quantiles = q


class _Calibrated(_Model):
    def __init__(self, q, n_held_out, pixels):
        super().__init__(q)
        self.calibration = types.SimpleNamespace(scores=np.zeros(n_held_out),
                                                 pixel_scores=np.asarray(pixels, np.float32))


def test_color_range_from_held_out_pixels():
    q = {"0.5": 10.0, "1.0": 20.0}
    pixels = [30.0, 31.0, 32.0, 40.0]  # median 31.5, max 40
    held_out = (31.5, 40.0 + HEADROOM * (40.0 - 31.5))
    assert color_range(_Calibrated(q, MIN_HELD_OUT_FOR_SCALE, pixels)) == pytest.approx(held_out)
    # too few held out, and the training scale (28 to 36 + 0.25 * 8 = 38) covers their
    # median pixel (31.5): the training scale
    few = _Calibrated({"0.5": 28.0, "1.0": 36.0}, MIN_HELD_OUT_FOR_SCALE - 1, pixels)
    assert color_source(few) == "training"
    assert color_range(few) == (28.0, 36.0 + HEADROOM * 8.0)
    assert color_range(few, source="held_out") == pytest.approx(held_out)
    # too few held out, but the training scale tops out (22.5) below their median pixel: a
    # memorizing model would paint every normal pixel red, so the few held-out maps decide
    memorized = _Calibrated(q, 1, pixels)
    assert color_source(memorized) == "held_out"
    assert color_range(memorized) == pytest.approx(held_out)
    assert color_range(memorized, source="training") == (10.0, 20.0 + HEADROOM * 10.0)
    assert color_range(_Calibrated(q, 50, pixels), source="training") == (10.0, 12.5 + 10.0)
    assert color_range(_Calibrated({}, 0, []), source="held_out") == (None, None)
    with pytest.raises(ValueError, match="source"):
        color_range(few, source="test")


def test_color_range():
    vmin, vmax = color_range(_Model({"0.5": 10.0, "0.99": 15.0, "0.999": 17.0, "1.0": 20.0}))
    assert vmin == 10.0 and vmax == pytest.approx(20.0 + HEADROOM * 10.0) and vmax > 20.0
    assert color_range(_Model({"0.5": 10.0, "1.0": 20.0}), headroom=2.0) == (10.0, 40.0)
    amap = np.array([[1.0, 5.0]], np.float32)
    assert color_range(_Model({}), amap) == (1.0, 5.0)
    assert color_range(_Model({}), None) == (None, None)
    assert color_range(object(), amap) == (1.0, 5.0)
