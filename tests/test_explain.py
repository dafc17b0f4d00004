"""Explanation map: the most likely mixture component per region (PEDENet.cluster_map)."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data as skdata

import pedenet
from pedenet.cli import main
from pedenet.visualization import (LEGEND_BACKGROUND, LEGEND_MAX_LINES, cluster_overlay, cluster_palette,
                                  legend_components)


def _two_textures(rng, n, size=96):
    """Left half brick, right half a flat mid-grey with faint noise: two obviously different patterns."""
    brick = skdata.brick()
    out = []
    for _ in range(n):
        r, c = rng.integers(0, 512 - size, size=2)
        img = np.full((size, size), 128, dtype=np.uint8)
        img[:, : size // 2] = brick[r:r + size, c:c + size // 2]
        img[:, size // 2:] = np.clip(128 + rng.normal(0, 2, (size, size - size // 2)), 0, 255).astype(np.uint8)
        out.append(img)
    return out


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    # processed at 128 px: at 96 px the stride-32 blocks give a 3×3 grid whose whole-image
    # context dominates the embeddings, and the two halves fall into one component
    return pedenet.PEDENet(steps=0, n_components=2, image_size=128, calibration_fraction=0.0,
                           seed=0).fit(_two_textures(rng, 12), progress=False)


def test_cluster_map_separates_two_patterns(model):
    img = _two_textures(np.random.default_rng(5), 1, size=128)[0]
    labels, conf = model.cluster_map(img)
    assert labels.shape == conf.shape == (128, 128) and labels.dtype == np.int64
    assert set(np.unique(labels)) <= {0, 1}
    assert np.all((conf >= 0.5 - 1e-6) & (conf <= 1 + 1e-6))  # the argmax of K = 2 posteriors
    # away from the seam, each half is dominated by one component, and they differ
    left = np.bincount(labels[:, 8:48].ravel(), minlength=2) / labels[:, 8:48].size
    right = np.bincount(labels[:, 80:120].ravel(), minlength=2) / labels[:, 80:120].size
    assert left.argmax() != right.argmax()
    assert left.max() > 0.8 and right.max() > 0.8


def test_cluster_map_agrees_with_mixture_on_the_grid(model):
    import torch

    from pedenet.scoring import to_tensor

    img = _two_textures(np.random.default_rng(6), 1, size=128)[0]  # original = processed size
    labels, _ = model.cluster_map(img)
    with torch.inference_mode():
        emb = model.network.embed(to_tensor(np.repeat(img[..., None] / 255.0, 3, 2).astype(np.float32), 128))[0]
        d, gh, gw = emb.shape
        grid = model.network.mixture.responsibilities(emb.permute(1, 2, 0).reshape(-1, d)).argmax(1)
    grid = grid.reshape(gh, gw).numpy()
    assert set(np.unique(labels)) == set(np.unique(grid))
    # every pixel takes the label of some cell; the cell at a patch centre is exact
    s, o = model.network.stride, model.network.offset
    for i in range(gh):
        for j in range(gw):
            assert labels[int(o + s * i), int(o + s * j)] == grid[i, j]


def test_cluster_overlay_and_cli(model, tmp_path):
    img = np.zeros((40, 60, 3), np.float32)
    labels = np.zeros((40, 60), np.int64)
    labels[:, 30:] = 1
    out = cluster_overlay(img, labels, 2)
    assert out.shape == (40 + 12, 60, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[10, 5], out[10, 50])
    with pytest.raises(ValueError, match="labels must lie"):
        cluster_overlay(img, labels + 1, 2)
    model.save(tmp_path / "m.pt")
    Image.fromarray(_two_textures(np.random.default_rng(1), 1)[0]).save(tmp_path / "x.png")
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "m.pt"), str(tmp_path / "x.png"),
                                  "--out", str(tmp_path / "o"), "--clusters", "--quiet"])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "o" / "x_clusters.png").size == (96, 96 + 12)


@pytest.mark.parametrize("k", [10, 20, 40, 60])
def test_cluster_overlay_gives_each_component_its_own_colour(k):
    img = np.zeros((20, 6 * k, 3), np.float32)
    labels = np.repeat(np.arange(k), 6)[None, :].repeat(20, 0)
    out = cluster_overlay(img, labels, k, alpha=1.0)
    colours = out[0, 3::6]  # the middle of each component's stripe
    assert len({tuple(c) for c in colours}) == k
    np.testing.assert_array_equal(colours, np.rint(cluster_palette(k) * 255).astype(np.uint8))


def test_cluster_palette_colours_stay_apart():
    """No two of the K colours are close in CIELAB (the old tab20/tab20b/tab20c palette had
    pairs 7 apart at K = 40); none is grey; the first 9 are tab10 without its grey; a smaller
    palette is a prefix."""
    from matplotlib import colormaps
    from skimage.color import rgb2lab

    for k, least in ((40, 25.0), (60, 20.0)):
        lab = rgb2lab(cluster_palette(k)[None].astype(np.float64))[0]
        d = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        assert d.min() > least, (k, d.min())
        assert (lab[:, 0] > 30).all()  # none too dark to show over a dark image
    tab10 = [c[:3] for i, c in enumerate(colormaps["tab10"].colors) if i != 7]  # no grey
    np.testing.assert_allclose(cluster_palette(9), tab10, atol=1e-6)
    lab = rgb2lab(cluster_palette(60)[None].astype(np.float64))[0]
    assert (np.hypot(lab[:, 1], lab[:, 2]) > 25).all()  # no grey: it vanishes over gray images
    np.testing.assert_array_equal(cluster_palette(40), cluster_palette(60)[:40])
    assert cluster_palette(40).dtype == np.float32 and cluster_palette(40).shape == (40, 3)


def _legend_colours(out, image_height):
    strip = out[image_height:].reshape(-1, 3)
    return {tuple(int(v) for v in c) for c in strip}


def test_cluster_legend_lists_the_components_present_largest_first():
    """The legend names the components that occur (numbered swatches, largest area first);
    absent components are not listed; what does not fit the width is counted as +n."""
    k = 40
    labels = np.full((64, 128), 12)
    labels[:20, :40] = 27  # 800 px
    labels[50:, :10] = 3  # 140 px
    assert legend_components(labels) == [12, 27, 3]
    out = cluster_overlay(np.zeros((64, 128, 3), np.float32), labels, k)
    assert out.shape == (64 + 12, 128, 3)
    palette = [tuple(int(v) for v in c) for c in np.rint(cluster_palette(k) * 255)]
    shown = _legend_colours(out, 64)
    assert {palette[12], palette[27], palette[3]} <= shown
    assert not {palette[j] for j in (0, 1, 2, 4, 5, 6, 8, 10, 20, 30)} & shown  # absent ones
    strip = out[64:]
    assert (strip[0, -1] == LEGEND_BACKGROUND).all()  # room to spare on the right
    # the swatches come in legend order, left to right
    xs = [np.flatnonzero((strip[6] == palette[j]).all(axis=1)).min() for j in (12, 27, 3)]
    assert xs == sorted(xs)
    # 40 components in 160 px: the first ones by area, then +n for the rest
    many = np.repeat(np.arange(k), 4)[None, :].repeat(30, 0)
    many[:, :8] = 39  # component 39 covers the most
    out = cluster_overlay(np.zeros((30, 160, 3), np.float32), many, k)
    order = legend_components(many)
    assert order[0] == 39 and order[1:3] == [2, 3]
    shown = _legend_colours(out, 30)
    assert palette[39] in shown and palette[order[-1]] not in shown


def test_cluster_legend_wraps_on_small_images():
    """A 64 px wide overlay with 12 components: the legend takes more lines (each 12 px) instead
    of showing two entries and "+10"; every component shown keeps its colour swatch."""
    k = 40
    labels = np.zeros((64, 64), int)
    for j, comp in enumerate([5, 17, 27, 31, 12, 38, 7, 35, 1, 19, 3, 9]):
        labels.ravel()[j * 300:] = comp  # later components cover less
    order = legend_components(labels)
    out = cluster_overlay(np.zeros((64, 64, 3), np.float32), labels, k)
    lines = (out.shape[0] - 64) // 12
    assert out.shape[0] == 64 + 12 * lines and 2 <= lines <= LEGEND_MAX_LINES
    palette = [tuple(int(v) for v in c) for c in np.rint(cluster_palette(k) * 255)]
    shown = [c for c in order if palette[c] in _legend_colours(out, 64)]
    assert shown == order[:len(shown)] and len(shown) >= 6  # a prefix of the legend order
    # one component: one line
    assert cluster_overlay(np.zeros((64, 64, 3), np.float32), np.zeros((64, 64), int), k).shape[0] == 76
