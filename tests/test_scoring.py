"""Anomaly map geometry and preprocessing."""

import numpy as np
import pytest
import torch

from pedenet.scoring import grid_to_map, to_tensor


def test_constant_grid_gives_constant_map_at_original_size():
    amap = grid_to_map(np.full((4, 6), 3.5), stride=8, offset=4, processed_size=(32, 48),
                       original_size=(101, 37), sigma=4)
    assert amap.shape == (101, 37) and amap.dtype == np.float32
    np.testing.assert_allclose(amap, 3.5, rtol=1e-6)


def test_map_interpolates_between_patch_centres():
    grid = np.array([[0.0, 8.0]])  # two cells, centres at x = 4 and x = 12 (stride 8, offset 4)
    amap = grid_to_map(grid, stride=8, offset=4, processed_size=(8, 16), original_size=(8, 16), sigma=0)
    # pixel x covers [x, x+1): its centre x + 0.5; value = clip((x + 0.5 - 4) / 8, 0, 1) * 8
    expected = np.clip((np.arange(16) + 0.5 - 4) / 8, 0, 1) * 8
    np.testing.assert_allclose(amap[0], expected, rtol=1e-6)


def test_peak_stays_at_the_patch_location_after_resizing_back():
    grid = np.zeros((32, 32))
    grid[10, 20] = 1.0  # processed centre (10*8+7.5, 20*8+7.5) = (87.5, 167.5) of 256x256
    amap = grid_to_map(grid, stride=8, offset=7.5, processed_size=(256, 256), original_size=(512, 128), sigma=4)
    y, x = np.unravel_index(np.argmax(amap), amap.shape)
    assert abs((y + 0.5) * 256 / 512 - 87.5) <= 1.0
    assert abs((x + 0.5) * 256 / 128 - 167.5) <= 2.0


def test_smoothing_preserves_the_mean_of_a_smooth_map():
    rng = np.random.default_rng(0)
    grid = rng.random((16, 16))
    raw = grid_to_map(grid, stride=8, offset=4, processed_size=(128, 128), original_size=(128, 128), sigma=0)
    smooth = grid_to_map(grid, stride=8, offset=4, processed_size=(128, 128), original_size=(128, 128), sigma=4)
    assert smooth.std() < raw.std()
    assert smooth.mean() == pytest.approx(raw.mean(), rel=0.02)


def test_to_tensor_resizes_and_keeps_range():
    img = np.random.default_rng(0).random((50, 70, 3)).astype(np.float32)
    x = to_tensor(img, 64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    native = to_tensor(img, 0)
    assert native.shape == (1, 3, 50, 70)
    np.testing.assert_array_equal(native[0].permute(1, 2, 0).numpy(), img)
