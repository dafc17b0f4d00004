"""Anomaly map geometry and preprocessing."""

import numpy as np
import pytest
import torch

from pedenet.scoring import border_widths, grid_to_map, image_score, to_tensor, top_count


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


def test_image_score_is_max_or_mean_of_the_top_fraction():
    amap = np.arange(200, dtype=np.float32).reshape(10, 20)[::-1]  # values 0..199, shuffled layout
    assert image_score(amap, 0.0) == 199.0
    assert top_count(200, 0.05) == 10 and image_score(amap, 0.05) == pytest.approx(np.mean(np.arange(190, 200)))
    # at least one pixel, whatever the fraction; rounding to the nearest count
    assert top_count(200, 0.001) == 1 and image_score(amap, 0.001) == 199.0
    assert top_count(1000, 0.0035) == 4 and top_count(1000, 0.0036) == 4 and top_count(1000, 0.0026) == 3
    # invariant to the layout of the pixels, monotone in the fraction
    rng = np.random.default_rng(0)
    m = rng.random((37, 53)).astype(np.float32)
    assert image_score(m, 0.01) == pytest.approx(image_score(rng.permutation(m.ravel()), 0.01))
    fr = [0.0, 0.003, 0.01, 0.1, 0.5]
    vals = [image_score(m, f) for f in fr]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and vals[-1] > float(m.mean())
    with pytest.raises(ValueError, match="empty"):
        image_score(np.zeros((0, 4)), 0.01)


def test_image_score_border_leaves_the_edge_band_out():
    amap = np.zeros((40, 60), np.float32)
    amap[10:30, 10:50] = np.arange(800, dtype=np.float32).reshape(20, 40)  # inner values 0..799
    assert border_widths((40, 60), 0.1) == (4, 6) and border_widths((40, 60), 0.02) == (0, 1)
    assert image_score(amap, 0.0, 0.1) == 799.0 == image_score(amap, 0.0)
    assert image_score(amap, 0.0, 0.25) == 19 * 40 + 34  # rows 10-29, columns 15-44 scored
    amap[3, 30] = amap[20, 5] = 1e6  # in the band at b = 0.1 (rows < 4, columns < 6)
    assert image_score(amap, 0.0) == 1e6
    assert image_score(amap, 0.0, 0.1) == 799.0
    # the fraction counts the scored pixels: (40 - 8) × (60 - 12) = 1536; 1 % → 15 pixels
    assert image_score(amap, 0.01, 0.1) == pytest.approx(np.mean(np.arange(785, 800)))
    assert image_score(amap, 0.0, 0.0) == image_score(amap, 0.0)
    # a band of almost half each side still leaves at least one row and column
    assert image_score(np.arange(9.0).reshape(3, 3), 0.0, 0.49) == 4.0  # floor(1.47) = 1 → centre
    assert image_score(np.arange(9.0).reshape(3, 3), 0.0, 0.3) == 8.0  # floor(0.9) = 0: no band
    for bad in (-0.1, 0.5):
        with pytest.raises(ValueError, match="border"):
            image_score(amap, 0.0, bad)
    with pytest.raises(ValueError, match="2-D"):
        image_score(amap.ravel(), 0.0, 0.1)


def test_predict_and_calibration_use_the_configured_image_score():
    import pedenet
    from pedenet.config import PEDENetConfig

    rng = np.random.default_rng(1)
    images = [rng.random((64, 64, 3), dtype=np.float32) for _ in range(6)]
    model = pedenet.PEDENet(steps=0, embedding_dim=8, n_components=2, image_size=64,
                            feature_blocks=(4, 10), image_score_fraction=0.05,
                            image_score_border=0.1, calibration_fraction=0.34).fit(images, progress=False)
    pred = model.predict(images)
    assert pred.scores.tolist() == pytest.approx([image_score(m, 0.05, 0.1) for m in pred.maps], rel=1e-12)
    assert pred.scores.tolist() != pytest.approx([image_score(m, 0.05) for m in pred.maps], rel=1e-6)
    assert (pred.scores < np.array([m.max() for m in pred.maps])).all()
    held = [images[int(p.split()[-1].rstrip(">"))] for p in model.history["calibration_images"]]
    assert sorted(model.calibration.scores.tolist()) == pytest.approx(
        sorted(model.predict(held).scores.tolist()), rel=1e-12)
    with pytest.raises(ValueError, match="image_score_fraction"):
        PEDENetConfig(image_score_fraction=1.0)
    for bad in (0.5, -0.01):
        with pytest.raises(ValueError, match="image_score_border"):
            PEDENetConfig(image_score_border=bad)


def test_keep_aspect_resizes_the_short_side_and_keeps_the_ratio():
    from pedenet.scoring import processed_size

    assert processed_size(244, 599, 256) == (256, 256)  # squashed (the default)
    assert processed_size(244, 599, 256, keep_aspect=True) == (256, 628)  # round(256·599/244)
    assert processed_size(599, 244, 256, keep_aspect=True) == (628, 256)
    assert processed_size(300, 300, 256, keep_aspect=True) == (256, 256)
    assert processed_size(244, 599, 0, keep_aspect=True) == (244, 599)  # native size wins
    img = np.random.default_rng(0).random((100, 250, 3)).astype(np.float32)
    x = to_tensor(img, 64, keep_aspect=True)
    assert tuple(x.shape) == (1, 3, 64, 160) and x.is_contiguous()
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_keep_aspect_model_maps_wide_images_at_their_resolution(tmp_path):
    import pedenet
    from pedenet.export import example_input, export_model

    rng = np.random.default_rng(2)
    train = [rng.random((60, 150, 3), dtype=np.float32) for _ in range(3)]
    model = pedenet.PEDENet(steps=2, embedding_dim=8, n_components=2, image_size=64, keep_aspect=True,
                            feature_blocks=(4, 10), calibration_fraction=0).fit(train, progress=False)
    wide, tall = rng.random((50, 200, 3), dtype=np.float32), rng.random((120, 40, 3), dtype=np.float32)
    pred = model.predict([wide, tall])
    assert [m.shape for m in pred.maps] == [(50, 200), (120, 40)]
    # the encoder saw 64×256 and 192×64: grids of stride 8 cells, not 8×8 for everything
    net = model.network
    assert net.embed(to_tensor(wide, 64, True)).shape[-2:] == (8, 32)
    assert net.embed(to_tensor(tall, 64, True)).shape[-2:] == (24, 8)
    np.testing.assert_array_equal(pred.maps[0], model.anomaly_map(wide))
    loaded = pedenet.PEDENet.load(_save(model, tmp_path))
    assert loaded.config.keep_aspect is True
    np.testing.assert_array_equal(loaded.anomaly_map(wide), pred.maps[0])
    # the exported model takes the aspect-kept size (H, W dynamic): an input already at its
    # processed size gives the model's own map
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = export_model(model, tmp_path / "m.onnx", "onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for arr in (wide, tall):
        x = to_tensor(arr, 64, True)
        amap, score = sess.run(["anomaly_map", "score"], {"image": x.numpy()})
        ref = model.anomaly_map(x[0].permute(1, 2, 0).numpy())
        assert amap.shape[1:] == ref.shape == tuple(x.shape[-2:])
        assert float(np.abs(amap[0] - ref).max()) <= 1e-4 * float(ref.max() - ref.min())
    assert tuple(example_input(model).shape) == (1, 3, 64, 64)


def _save(model, tmp_path):
    path = tmp_path / "m.pt"
    model.save(path)
    return path
