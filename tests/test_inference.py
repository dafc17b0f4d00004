"""Batched, streamed inference and tiling agree with the one-image path."""

import warnings

import numpy as np
import pytest
import torch

from pedenet import PEDENet
from pedenet.builtin import make_builtin_dataset
from pedenet.config import PEDENetConfig
from pedenet.gmm import GMMAccumulator
from pedenet.inference import prefetched
from pedenet.model import PEDENetNetwork
from pedenet.scoring import image_score


@pytest.fixture(scope="module")
def train_images(tmp_path_factory):
    root = make_builtin_dataset(tmp_path_factory.mktemp("inf") / "ds", categories=("gravel",),
                                n_train=4, n_test_good=1, n_test_defect=1, size=64)
    return sorted((root / "gravel" / "train" / "good").glob("*.png"))


def _assert_same_maps(a, b):
    """Batched convolutions may sum in another order: equal to float32 rounding (a few ulp of
    the energy's magnitude, and 1e-5 of the map's spread)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype == np.float32
        spread = float(y.max() - y.min())
        assert float(np.abs(x - y).max()) <= 1e-5 * spread + 1e-6 * float(np.abs(y).max())


@pytest.mark.parametrize("encoder,image_size", [("scratch", 48), ("scratch", 0), ("pretrained", 64)])
def test_batched_predict_equals_one_by_one(train_images, encoder, image_size):
    model = PEDENet(steps=0, de_init="random", encoder=encoder, image_size=image_size).fit(train_images, progress=False)
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (64, 64), (70, 50), (64, 64), (64, 64), (64, 64), (40, 90)]
    imgs = [rng.random((*s, 3)).astype(np.float32) for s in sizes] + list(train_images[:2])
    one = [model.anomaly_map(im) for im in imgs]
    pred = model.predict(imgs, batch_size=3)
    maps, scores = pred.maps, pred.scores
    _assert_same_maps(maps, one)
    f = model.config.image_score_fraction
    np.testing.assert_allclose(scores, [image_score(m, f) for m in maps], rtol=1e-12)
    # the generator yields indices in input order and consumes a generator input lazily
    seen = []

    def lazy():
        for im in imgs:
            seen.append(1)
            yield im

    it = model.iter_predict(lazy(), batch_size=2)
    i, amap, score = next(it)
    assert i == 0 and score == image_score(amap, f)
    _assert_same_maps([amap], one[:1])
    # bounded read-ahead: the prefetch queue (2 × batch), one item waiting to enter it, the
    # batch being encoded and the item that closed it
    assert len(seen) <= 2 * 2 + 1 + 2 + 1 < len(imgs)
    assert [j for j, _, _ in it] == list(range(1, len(imgs)))


def test_prefetch_propagates_errors_in_order():
    def fn(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x * 2

    out = []
    with pytest.raises(ValueError, match="bad item 3"):
        for v in prefetched(range(6), fn, depth=2):
            out.append(v)
    assert out == [0, 2, 4]
    gen = prefetched(range(1000), fn=lambda x: x, depth=2)
    assert next(gen) == 0
    gen.close()  # stops the worker thread


def _network(encoder: str, seed: int = 0, feature_blocks=(4, 10)) -> PEDENetNetwork:
    torch.manual_seed(seed)
    net = PEDENetNetwork(PEDENetConfig(encoder=encoder, embedding_dim=16, n_components=3, image_size=0,
                                       feature_blocks=feature_blocks)).eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        z = net.embed(x).permute(0, 2, 3, 1).reshape(-1, 16)
        acc = GMMAccumulator(3, 16)
        acc.add(z, net.membership(z))
    net.mixture = acc.finalize()
    return net


def _smooth_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w),
                                           mode="bilinear").contiguous()


@pytest.mark.parametrize("max_tile", [96, 130, 200])
def test_scratch_tiled_energy_equals_untiled(max_tile):
    """No padding: tiles overlapping by patch_size − stride and starting on the stride give
    exactly the untiled grid (to float rounding of convolutions of different sizes)."""
    net = _network("scratch")
    x = _smooth_image(203, 317)
    with torch.no_grad():
        full = net.patch_energy(x)
        tiled = net.patch_energy(x, max_tile=max_tile)
    assert len(net.tile_plan(317, max_tile)) > 1
    for a, b, _, _ in net.tile_plan(317, max_tile):
        assert b - a <= max_tile
    assert tiled.shape == full.shape
    spread = float(full.max() - full.min())
    assert float((tiled - full).abs().max()) <= 1e-5 * spread


def test_pretrained_tiled_energy_agrees_within_tolerance():
    """Zero padding at tile edges: agreement within 1e-3 of the energy spread (sides that are
    multiples of 16 px; see PEDENetNetwork.patch_energy)."""
    net = _network("pretrained")
    x = _smooth_image(400, 640)
    with torch.no_grad():
        full = net.patch_energy(x)
        tiled = net.patch_energy(x, max_tile=400)
    assert len(net.tile_plan(640, 400)) > 1
    assert tiled.shape == full.shape
    spread = float(full.max() - full.min())
    assert float((tiled - full).abs().max()) <= 1e-3 * spread


def test_tile_plan_covers_every_cell_once():
    net = _network("scratch")
    for n in (100, 257, 1000, 1031):
        plan = net.tile_plan(n, 100)
        owned = []
        for a, b, c0, c1 in plan:
            assert 0 <= a < b <= n and b - a <= 100 and a % net.stride == 0
            owned.append((c0, c1))
        assert owned[0][0] == 0 and owned[-1][1] is None
        for (c0, c1), (d0, _) in zip(owned, owned[1:]):
            assert c1 == d0 and c1 > c0
    net = _network("pretrained")
    before, after, align = net.tile_geometry()
    need = before + after + align + net.stride  # the context and one owned cell
    with pytest.raises(ValueError, match=rf"max_tile={need - 1} is too small .* at least {need} px.*"
                                         rf"pass max_tile >= {need}, or None"):
        net.tile_plan(2 * need, need - 1)
    assert len(net.tile_plan(2 * need, need)) > 1  # the smallest accepted tile works


def test_predict_tiles_large_native_images(train_images):
    model = PEDENet(steps=0, de_init="random", encoder="scratch", image_size=0).fit(train_images, progress=False)
    img = np.random.default_rng(1).random((150, 260, 3)).astype(np.float32)
    untiled = model.anomaly_map(img, max_tile=None)
    (tiled,) = model.predict([img], max_tile=100).maps
    spread = float(untiled.max() - untiled.min())
    assert float(np.abs(tiled - untiled).max()) <= 1e-5 * spread


@pytest.mark.parametrize("grid_shape,processed,original,stride,offset", [
    ((32, 32), (256, 256), (256, 256), 8, 7.5),
    ((32, 32), (256, 256), (512, 128), 8, 7.5),
    ((50, 79), (400, 632), (400, 632), 8, 7.5),
    ((3, 2), (40, 36), (21, 9), 4, 16),
])
def test_grid_to_map_matrices_equal_scipy_filter(grid_shape, processed, original, stride, offset):
    """grid_to_map (two matrix products) = interpolation then scipy.ndimage.gaussian_filter."""
    from scipy.ndimage import gaussian_filter

    from pedenet.scoring import _interp_matrix, grid_to_map

    grid = np.random.default_rng(0).random(grid_shape) * 100
    (hp, wp), (h, w) = processed, original
    ref = _interp_matrix(h, hp, grid_shape[0], stride, offset) @ grid @ \
        _interp_matrix(w, wp, grid_shape[1], stride, offset).T
    ref = gaussian_filter(ref, sigma=(4 * h / hp, 4 * w / wp), mode="nearest", truncate=4.0)
    amap = grid_to_map(grid, stride=stride, offset=offset, processed_size=processed,
                       original_size=original, sigma=4)
    np.testing.assert_allclose(amap, ref.astype(np.float32), rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_reprs_summarize_instead_of_printing_arrays():
    import warnings

    assert repr(PEDENet()) == "PEDENet(device='cpu') [not fitted]"
    rng = np.random.default_rng(0)
    images = [rng.random((64, 64, 3), dtype=np.float32) for _ in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2 held-out images cannot reach the default target
        model = PEDENet(steps=0, image_size=64, embedding_dim=8, n_components=2, calibration_fraction=0.25,
                        target_fpr=0.4).fit(images, progress=False)
        pred = model.predict(images[:3])
    assert repr(model) == ("PEDENet(embedding_dim=8, n_components=2, image_size=64, steps=0, "
                           "calibration_fraction=0.25, target_fpr=0.4, device='cpu') "
                           "[fitted on 6 images, 2 held out for thresholds]")
    text = repr(pred)
    assert text.startswith("Predictions(3 images, scores ") and "array" not in text
    assert f"{int(pred.anomalous.sum())} flagged anomalous at image threshold" in text


@pytest.mark.parametrize("array, match", [
    (np.zeros((0, 0)), "image array is empty"),
    (np.zeros((0, 5, 3), np.uint8), "image array is empty"),
    (np.zeros((4, 4, 2)), "H×W or H×W×C with C in 1, 3, 4"),
    (np.full((4, 4), np.nan, np.float32), "NaN or Inf"),
    (np.full((4, 4), 2.0, np.float32), r"must lie in \[0, 1\]"),
])
def test_bad_arrays_get_a_clear_error(array, match):
    from pedenet.estimator import as_rgb_array

    with pytest.raises(ValueError, match=match):
        as_rgb_array(array)


def test_float_pil_images_are_checked_like_float_arrays_and_8_bit_uint16_warns():
    from PIL import Image

    from pedenet.estimator import as_rgb_array

    values = np.linspace(0, 255, 12, dtype=np.float32).reshape(3, 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*divide 8-bit values by 255"):
        as_rgb_array(Image.fromarray(values, mode="F"))  # was clipped to [0, 1]: nearly white
    unit = as_rgb_array(Image.fromarray(values / 255, mode="F"))
    np.testing.assert_allclose(unit[..., 0], values / 255, rtol=1e-6)
    with pytest.warns(UserWarning, match="uint16 image array with values only in 0-255.*uint8"):
        dark = as_rgb_array(values.astype(np.uint16))
    assert dark.max() == pytest.approx(255 / 65535)  # still read as 16-bit, as documented
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_rgb_array((values * 257).astype(np.uint16))  # real 16-bit values: no warning
        as_rgb_array(values.astype(np.uint8))  # real 8-bit values: no warning
    with pytest.warns(UserWarning, match="uint8 image array with values only in 0-1.*float"):
        black = as_rgb_array((values / 255).astype(np.uint8))  # a [0, 1] float cast to uint8
    assert black.max() == pytest.approx(1 / 255)  # still read as 8-bit


def test_pil_images_in_mode_i_with_8_bit_values_warn():
    from PIL import Image

    from pedenet.estimator import as_rgb_array

    gray = Image.fromarray(np.linspace(0, 255, 12, dtype=np.uint8).reshape(3, 4), mode="L")
    with pytest.warns(UserWarning, match=r"mode 'I' with values only in 0-255: read as 32-bit "
                                         r"\(divided by 2147483647\).*convert\('L'\)"):
        dark = as_rgb_array(gray.convert("I"))
    assert dark.max() == pytest.approx(255 / (2**31 - 1))  # still read as 32-bit, as documented
    sixteen_in_i = Image.fromarray(np.asarray(gray).astype(np.int32) * 257, mode="I")
    with pytest.warns(UserWarning, match="mode 'I' with values only in 0-65535.*uint16 array"):
        as_rgb_array(sixteen_in_i)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sixteen = as_rgb_array(Image.fromarray((np.asarray(gray).astype(np.uint16) * 257)))
        assert sixteen.max() == pytest.approx(1.0)  # real 16-bit values: no warning
        np.testing.assert_allclose(as_rgb_array(gray)[..., 0], np.asarray(gray) / 255, rtol=1e-6)


def test_pil_images_with_several_frames_warn_as_files_do(tmp_path):
    from PIL import Image

    from pedenet.estimator import as_rgb_array

    frames = [Image.new("L", (8, 6), v) for v in (10, 200, 90)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "a.gif") as gif:
        gif.seek(1)
        with pytest.warns(UserWarning, match=r"^input image 2: PIL image holds 3 frames \(pages\); "
                                             r"only its current one \(frame 1\) is used"):
            second = as_rgb_array(gif, name="input image 2")
    assert second.shape == (6, 8, 3) and second.max() == pytest.approx(200 / 255, abs=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_rgb_array(frames[0])  # one frame: no warning
