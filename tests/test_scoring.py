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


def _blas_threads():
    from threadpoolctl import threadpool_info

    return [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]


@pytest.mark.parametrize("with_threadpoolctl", [True, False])
def test_grid_to_map_is_the_float64_operator_products_on_one_blas_thread(monkeypatch, with_threadpoolctl):
    """The two products run with numpy's BLAS limited to one thread (no spinning BLAS workers
    left to slow the next encoder pass), give ``My @ grid @ Mx.T`` in float64 rounded to
    float32 as before, for any input layout, and leave the BLAS thread counts as they were;
    without threadpoolctl they run unlimited, with the same result."""
    from pedenet import scoring

    monkeypatch.setattr(scoring, "_blas_controller", None if with_threadpoolctl else False)
    seen = []
    real = scoring._one_blas_thread

    class Spy:
        def __init__(self):
            self.inner = real()

        def __enter__(self):
            self.inner.__enter__()
            seen.append([n for _, n in _blas_threads()])

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(scoring, "_one_blas_thread", Spy)
    grid = np.random.default_rng(3).random((20, 36)) * 500 + 40
    kw = dict(stride=8, offset=7.5, processed_size=(160, 288), original_size=(301, 517), sigma=4)
    my, mx = scoring.map_operators((20, 36), 8.0, 7.5, (160, 288), (301, 517), 4.0)
    before = _blas_threads()
    read_only = grid.copy()
    read_only.setflags(write=False)
    for g in (grid, read_only, np.asfortranarray(grid), grid.tolist()):
        amap = scoring.grid_to_map(g, **kw)
        assert amap.shape == (301, 517) and amap.dtype == np.float32
        np.testing.assert_allclose(amap, (my @ grid @ mx.T).astype(np.float32), rtol=1.2e-7, atol=0)  # 1 ulp
    assert _blas_threads() == before
    assert len(seen) == 4
    if with_threadpoolctl:
        assert all(n == [1] * len(before) for n in seen)
    else:
        assert all(n == [t for _, t in before] for n in seen)
