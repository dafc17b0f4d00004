"""Tests for pedenet.metrics: reference fixtures, hand-computed cases, edge cases, validation."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from pedenet import metrics as M
from pedenet.metrics import (
    UndefinedMetricWarning,
    au_pro,
    f1_max,
    image_auroc,
    image_scores_from_maps,
    pixel_auroc,
    pixel_f1_max,
    pixel_metrics,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "metrics"
TOL = {"aupro_0.3": 1e-3, "aupro_0.1": 1e-3}
DEFAULT_TOL = 1e-4
EQUAL_SIZE_CASES = ["smooth", "ties", "diagonal_regions", "many_images"]
ALL_CASES = EQUAL_SIZE_CASES + ["variable_sizes"]
METRIC_NAMES = ["aupro_0.3", "aupro_0.1", "pixel_auroc", "image_auroc_max", "pixel_f1_max"]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _require_fixtures() -> None:
    if not (FIXTURES / "expected.json").is_file():
        pytest.skip(
            f"metric fixtures not found at {FIXTURES}: the ../shared folder next to the "
            "repository is absent"
        )


def _expected() -> dict:
    _require_fixtures()
    return json.loads((FIXTURES / "expected.json").read_text())


def _load_case(case: str):
    _require_fixtures()
    path = FIXTURES / f"{case}.npz"
    if not path.is_file():
        pytest.skip(f"fixture file {path.name} is not in {FIXTURES}")
    with np.load(path) as d:
        if case == "variable_sizes":
            maps = [d[f"anomaly_map_{i:02d}"] for i in range(15)]
            masks = [d[f"mask_{i:02d}"] for i in range(15)]
        else:
            maps, masks = d["anomaly_maps"], d["masks"]
    return maps, masks


def _compute(name: str, maps, masks) -> float:
    if name == "aupro_0.3":
        return au_pro(maps, masks, fpr_limit=0.3)
    if name == "aupro_0.1":
        return au_pro(maps, masks, fpr_limit=0.1)
    if name == "pixel_auroc":
        return pixel_auroc(maps, masks)
    if name == "pixel_f1_max":
        return pixel_f1_max(maps, masks)
    if name == "image_auroc_max":
        labels = [int(np.any(g != 0)) for g in masks]
        return image_auroc(image_scores_from_maps(maps), labels)
    raise KeyError(name)


def _brute_force_pro(maps, masks, fpr_limit: float) -> float:
    """Direct, slow AU-PRO: evaluate every distinct threshold separately."""
    scores = np.concatenate([np.ravel(m) for m in maps]).astype(np.float64)
    regions, normal = [], []
    for m, g in zip(maps, masks):
        m = np.asarray(m, dtype=np.float64)
        lab, n = ndimage.label(np.asarray(g) != 0, structure=np.ones((3, 3)))
        regions += [m[lab == r] for r in range(1, n + 1)]
        normal.append(m[np.asarray(g) == 0])
    normal = np.sort(np.concatenate(normal))
    thresholds = np.unique(scores)[::-1]

    def frac_at_or_above(values):  # fraction of values >= t, for every threshold t
        v = np.sort(values)
        return (v.size - np.searchsorted(v, thresholds, side="left")) / v.size

    fpr = np.concatenate(([0.0], frac_at_or_above(normal)))
    pro = np.concatenate(([0.0], np.mean([frac_at_or_above(r) for r in regions], axis=0)))
    k = np.searchsorted(fpr, fpr_limit, side="right")
    area = float(np.sum(0.5 * (pro[1:k] + pro[: k - 1]) * np.diff(fpr[:k])))
    if fpr[k - 1] < fpr_limit:
        y = np.interp(fpr_limit, fpr[k - 1 : k + 1], pro[k - 1 : k + 1])
        area += 0.5 * (pro[k - 1] + y) * (fpr_limit - fpr[k - 1])
    return area / fpr_limit


def _sk_f1_max(y, s) -> float:
    p, r, _ = precision_recall_curve(y, s)
    d = p + r
    return float(np.max(np.where(d > 0, 2 * p * r / np.where(d > 0, d, 1), 0.0)))


def _random_images(rng, n, max_side=30, quant=None, dtype=np.float32, p_anom=0.3):
    maps, masks = [], []
    for _ in range(n):
        h, w = rng.integers(1, max_side, size=2)
        m = rng.normal(size=(h, w))
        if quant:
            m = np.round(m * quant) / quant
        maps.append(m.astype(dtype))
        masks.append((rng.random((h, w)) < p_anom).astype(np.uint8))
    masks[0].flat[0] = 1  # at least one anomalous pixel
    masks[-1].flat[-1] = 0 if masks[-1].size > 1 or len(masks) > 1 else 1
    return maps, masks


# --------------------------------------------------------------------------------------
# reference fixtures (MVTec AD official evaluation)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRIC_NAMES)
@pytest.mark.parametrize("case", ALL_CASES)
def test_fixture_matches_reference(case, metric):
    expected = _expected()
    if case not in expected:
        pytest.skip(f"case {case!r} not listed in expected.json")
    maps, masks = _load_case(case)
    value = _compute(metric, maps, masks)
    want = expected[case][metric]
    assert value == pytest.approx(want, abs=TOL.get(metric, DEFAULT_TOL)), (case, metric)


@pytest.mark.parametrize("case", ALL_CASES)
def test_fixture_pixel_metrics_bundle_equals_single_calls(case):
    _expected()
    maps, masks = _load_case(case)
    bundle = pixel_metrics(maps, masks, fpr_limits=(0.3, 0.1))
    assert set(bundle) == {"pixel_auroc", "pixel_f1_max", "aupro_0.3", "aupro_0.1"}
    for name, value in bundle.items():
        assert value == _compute(name, maps, masks)


@pytest.mark.parametrize("case", ["ties", "diagonal_regions"])
def test_fixture_matches_sklearn_and_brute_force(case):
    maps, masks = _load_case(case)
    s = np.concatenate([np.ravel(m) for m in maps])
    y = np.concatenate([np.ravel(g) for g in masks]) != 0
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_f1_max(maps, masks) == pytest.approx(_sk_f1_max(y, s), abs=1e-12)
    assert au_pro(maps, masks, 0.3) == pytest.approx(_brute_force_pro(maps, masks, 0.3), abs=1e-12)


def test_fixture_accepts_list_and_3d_array_and_float64():
    maps, masks = _load_case("ties")
    as_array = pixel_metrics(maps, masks, (0.3,))
    as_list = pixel_metrics(list(maps), list(masks.astype(bool)), (0.3,))
    as_f64 = pixel_metrics(maps.astype(np.float64), masks * 255, (0.3,))
    for k in as_array:
        assert as_list[k] == as_array[k]
        assert as_f64[k] == pytest.approx(as_array[k], abs=1e-12)


# --------------------------------------------------------------------------------------
# hand-computed answers on tiny arrays
# --------------------------------------------------------------------------------------


def test_perfect_and_inverted_pixel_maps():
    mask = np.array([[0, 0, 1], [0, 1, 1]], dtype=np.uint8)
    perfect = mask.astype(np.float32) + np.array([[0.1, 0.2, 0.3], [0.0, 0.5, 0.4]])
    assert pixel_auroc([perfect], [mask]) == 1.0
    assert pixel_f1_max([perfect], [mask]) == 1.0
    assert au_pro([perfect], [mask]) == pytest.approx(1.0, abs=1e-12)
    inverted = -perfect
    assert pixel_auroc([inverted], [mask]) == 0.0
    # Inverted: FPR reaches 1 before any anomalous pixel -> PRO 0 on [0, 0.3].
    assert au_pro([inverted], [mask]) == 0.0
    # Constant map: a single threshold, ROC diagonal.
    assert pixel_auroc([np.zeros((2, 3))], [mask]) == 0.5


def test_image_auroc_known_values():
    assert image_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert image_auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert image_auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # 3 positive-negative pairs out of 4 ordered correctly.
    assert image_auroc([0.1, 0.3, 0.2, 0.4], [0, 0, 1, 1]) == 0.75
    assert image_auroc(np.array([1.0, 2.0]), np.array([False, True])) == 1.0


def test_pro_hand_computed_horizontal_and_vertical_segments():
    # Two 1-pixel regions (not 8-connected: a normal pixel between them).
    # Curve: (0,0) (0,.5) (.5,.5) (.5,1) (1,1).
    maps = [np.array([[4.0, 3.0, 2.0, 1.0]])]
    masks = [np.array([[1, 0, 1, 0]])]
    assert au_pro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75, abs=1e-12)
    assert au_pro(maps, masks, fpr_limit=0.5) == pytest.approx(0.5, abs=1e-12)
    assert au_pro(maps, masks, fpr_limit=0.3) == pytest.approx(0.5, abs=1e-12)


def test_pro_hand_computed_tie_gives_diagonal_and_interpolation():
    # One region of 2 pixels; the second anomalous pixel ties with a normal one, so they
    # enter together: curve (0,0) (0,.5) (.5,1) (1,1).
    maps = [np.array([[3.0, 2.0, 2.0, 1.0]])]
    masks = [np.array([[1, 1, 0, 0]])]
    # At FPR 0.3 the diagonal is at 0.5 + 0.5 * 0.3 / 0.5 = 0.8.
    assert au_pro(maps, masks, 0.3) == pytest.approx(0.5 * (0.5 + 0.8) * 0.3 / 0.3, abs=1e-12)
    assert au_pro(maps, masks, 1.0) == pytest.approx(0.875, abs=1e-12)


def test_pro_regions_are_8_connected():
    # Anomalous (0,0), (1,1), (1,2): one region of 3 under 8-connectivity (two regions,
    # sizes 1 and 2, under 4-connectivity). Only (0,0) scores above every normal pixel.
    mask = np.zeros((3, 3), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = 1
    m = np.zeros((3, 3))
    m[mask == 0] = np.arange(1, 7)
    m[0, 0], m[1, 1], m[1, 2] = 10.0, 0.5, 0.4
    # 8-connected: PRO is 1/3 on the whole FPR range [0, 1) -> normalized area 1/3.
    assert au_pro([m], [mask], 0.3) == pytest.approx(1 / 3, abs=1e-12)
    # (4-connectivity would give 0.5.)


def test_pro_averages_over_regions_of_all_images():
    # Image A: region of 4 pixels, fully detected first. Image B: region of 1 pixel,
    # detected last. Mean region overlap before any normal pixel: (1 + 0) / 2 = 0.5,
    # whereas the pixel-pooled fraction would be 4/5.
    a_map = np.array([[9.0, 9.0, 0.3], [9.0, 9.0, 0.2]])
    a_mask = np.array([[1, 1, 0], [1, 1, 0]])
    b_map = np.array([[0.1, -5.0]])
    b_mask = np.array([[0, 1]])
    assert au_pro([a_map, b_map], [a_mask, b_mask], 0.3) == pytest.approx(0.5, abs=1e-12)


def test_f1_max_known_values():
    # t=0.9: P=1, R=.5 -> 2/3; t=0.7: P=2/3, R=1 -> 0.8; lower thresholds worse.
    assert f1_max([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0]) == pytest.approx(0.8, abs=1e-12)
    # Tie at the top: best is P=1/2, R=1 -> 2/3.
    assert f1_max([1.0, 1.0, 0.0], [1, 0, 0]) == pytest.approx(2 / 3, abs=1e-12)
    assert f1_max([0.1, 0.9], [0, 1]) == 1.0
    # The pixel version agrees on the same numbers laid out as a map.
    maps = [np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.5]])]
    masks = [np.array([[1, 0, 1], [0, 0, 0]])]
    assert pixel_f1_max(maps, masks) == pytest.approx(0.8, abs=1e-12)


def test_f1_max_all_anomalous_is_defined():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f1_max([0.3, 0.1], [1, 1]) == 1.0
        assert pixel_f1_max([np.array([[0.3, 0.1]])], [np.ones((1, 2))]) == 1.0


def test_image_scores_from_maps():
    maps = [np.array([[1.0, 5.0], [2.0, 3.0]]), np.array([[-1.0, -2.0, -0.5]])]
    np.testing.assert_array_equal(image_scores_from_maps(maps), [5.0, -0.5])
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = image_scores_from_maps(arr)
    assert out.dtype == np.float64 and out.shape == (2,)
    np.testing.assert_array_equal(out, [11.0, 23.0])


# --------------------------------------------------------------------------------------
# undefined cases: NaN + UndefinedMetricWarning, never an exception
# --------------------------------------------------------------------------------------


def _nan_with_warning(fn, *args, **kwargs):
    with pytest.warns(UndefinedMetricWarning):
        value = fn(*args, **kwargs)
    assert isinstance(value, float) and math.isnan(value)


def test_undefined_image_metrics():
    _nan_with_warning(image_auroc, [0.1, 0.2, 0.3], [0, 0, 0])
    _nan_with_warning(image_auroc, [0.1, 0.2, 0.3], [1, 1, 1])
    _nan_with_warning(f1_max, [0.1, 0.2, 0.3], [0, 0, 0])


def test_undefined_pixel_metrics_no_anomalous_pixel():
    maps = [np.random.default_rng(0).random((4, 5)), np.zeros((2, 2))]
    masks = [np.zeros((4, 5)), np.zeros((2, 2), dtype=bool)]
    _nan_with_warning(pixel_auroc, maps, masks)
    _nan_with_warning(pixel_f1_max, maps, masks)
    _nan_with_warning(au_pro, maps, masks)
    with pytest.warns(UndefinedMetricWarning):
        bundle = pixel_metrics(maps, masks, (0.3, 0.1))
    assert all(math.isnan(v) for v in bundle.values())


def test_undefined_pixel_metrics_no_normal_pixel():
    maps = [np.array([[0.1, 0.9], [0.5, 0.2]])]
    masks = [np.ones((2, 2), dtype=np.uint8)]
    _nan_with_warning(pixel_auroc, maps, masks)
    _nan_with_warning(au_pro, maps, masks)


def test_undefined_warning_category_is_userwarning():
    assert issubclass(UndefinedMetricWarning, UserWarning)


# --------------------------------------------------------------------------------------
# pooling over images of different sizes, dtypes, chunking
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", [None, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_variable_sizes_pool_like_concatenation(quant, dtype):
    rng = np.random.default_rng(7)
    maps, masks = _random_images(rng, 6, quant=quant, dtype=dtype)
    # AUROC / F1: pooled list == one concatenated 1×N image == sklearn on flat pixels.
    flat_s = np.concatenate([m.ravel() for m in maps])
    flat_y = np.concatenate([g.ravel() for g in masks])
    one_row_map, one_row_mask = [flat_s[None, :]], [flat_y[None, :]]
    pooled_auroc, pooled_f1 = pixel_auroc(maps, masks), pixel_f1_max(maps, masks)
    assert pooled_auroc == pytest.approx(pixel_auroc(one_row_map, one_row_mask), abs=1e-12)
    assert pooled_f1 == pytest.approx(pixel_f1_max(one_row_map, one_row_mask), abs=1e-12)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(flat_y != 0, flat_s), abs=1e-9)
    assert pixel_f1_max(maps, masks) == pytest.approx(_sk_f1_max(flat_y != 0, flat_s), abs=1e-9)
    # AU-PRO: regions stay per image, FPR pooled; compare with the direct definition.
    for lim in (0.3, 0.05, 1.0):
        expected = _brute_force_pro(maps, masks, lim)
        assert au_pro(maps, masks, lim) == pytest.approx(expected, abs=1e-9)


def test_3d_array_equals_list_of_slices():
    rng = np.random.default_rng(3)
    maps = rng.random((3, 8, 9)).astype(np.float32)
    masks = (rng.random((3, 8, 9)) < 0.2).astype(np.uint8)
    a = pixel_metrics(maps, masks, (0.3,))
    b = pixel_metrics(list(maps), list(masks), (0.3,))
    assert a == b


def test_chunk_boundaries_do_not_change_results(monkeypatch):
    rng = np.random.default_rng(11)
    for dtype in (np.float32, np.float64):
        maps, masks = _random_images(rng, 4, quant=2, dtype=dtype)
        ref = pixel_metrics(maps, masks, (0.3, 0.1))
        for chunk in (1, 2, 3, 17):
            monkeypatch.setattr(M, "_CHUNK", chunk)
            got = pixel_metrics(maps, masks, (0.3, 0.1))
            for k in ref:
                assert got[k] == pytest.approx(ref[k], abs=1e-12), (dtype, chunk, k)
        monkeypatch.undo()


def test_mask_dtypes_nonzero_is_anomalous():
    rng = np.random.default_rng(5)
    m = rng.random((6, 7)).astype(np.float32)
    g = rng.random((6, 7)) < 0.3
    ref = pixel_metrics([m], [g.astype(np.uint8)], (0.3,))
    for mask in (g, g * 255, g.astype(np.float32) * 0.5, g.astype(np.int64) * -1):
        assert pixel_metrics([m], [mask], (0.3,)) == ref


def test_signed_zeros_tie_and_float64_precision_kept():
    # -0.0 and +0.0 are the same score: one threshold, AUROC 0.5.
    assert pixel_auroc([np.array([[-0.0, 0.0]])], [np.array([[1, 0]])]) == 0.5
    # Scores distinct only in float64 must not be merged into a tie.
    maps = [np.array([[1.0 + 1e-12, 1.0]])]
    masks = [np.array([[1, 0]])]
    assert pixel_auroc(maps, masks) == 1.0
    # Large integer scores (need float64) too.
    assert pixel_auroc([np.array([[2**40 + 1, 2**40]], dtype=np.int64)], masks) == 1.0
    # Small integer and boolean maps work (exact in float32).
    assert pixel_auroc([np.array([[3, 1]], dtype=np.uint8)], masks) == 1.0
    assert pixel_auroc([np.array([[True, False]])], masks) == 1.0


# --------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------


def test_validation_count_mismatch():
    with pytest.raises(ValueError, match="count"):
        pixel_auroc([np.zeros((2, 2))] * 2, [np.zeros((2, 2))])


def test_validation_shape_mismatch_names_index_and_shapes():
    maps = [np.zeros((2, 2)), np.zeros((3, 4))]
    masks = [np.zeros((2, 2)), np.zeros((4, 3))]
    with pytest.raises(ValueError, match=r"image 1.*\(3, 4\).*\(4, 3\)"):
        au_pro(maps, masks)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_validation_non_finite_map_names_index(bad):
    maps = [np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2))]
    maps[2] = maps[2].copy()
    maps[2][1, 1] = bad
    masks = [np.eye(2)] * 3
    for fn in (pixel_auroc, pixel_f1_max, au_pro):
        with pytest.raises(ValueError, match=r"maps\[2\].*non-finite"):
            fn(maps, masks)
    with pytest.raises(ValueError, match=r"maps\[2\]"):
        image_scores_from_maps(maps)


def test_validation_dimensions_and_empty():
    with pytest.raises(ValueError, match="2-D"):
        pixel_auroc([np.zeros(4)], [np.zeros(4)])
    with pytest.raises(ValueError, match="3-D"):
        pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="3-D"):
        pixel_auroc(np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="empty"):
        pixel_auroc([], [])
    with pytest.raises(ValueError, match="empty"):
        au_pro([np.zeros((0, 3))], [np.zeros((0, 3))])
    with pytest.raises(ValueError, match="numeric"):
        pixel_auroc([np.array([["a", "b"]])], [np.zeros((1, 2))])
    with pytest.raises(ValueError, match="real"):
        pixel_auroc([np.ones((1, 2), dtype=complex)], [np.zeros((1, 2))])
    with pytest.raises(ValueError, match="masks"):
        pixel_auroc([np.ones((1, 2))], [np.array([[np.nan, 0.0]])])


@pytest.mark.parametrize("limit", [0, -0.1, 1.5, float("nan"), "0.3", True])
def test_validation_fpr_limit(limit):
    with pytest.raises(ValueError, match="fpr_limit"):
        au_pro([np.ones((2, 2))], [np.eye(2)], fpr_limit=limit)


def test_validation_image_level():
    with pytest.raises(ValueError, match="length"):
        image_auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="1-D"):
        f1_max([[0.1, 0.2]], [[0, 1]])
    with pytest.raises(ValueError, match="empty"):
        image_auroc([], [])
    with pytest.raises(ValueError, match="index 1"):
        image_auroc([0.1, np.nan, 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match="non-finite"):
        f1_max([0.1, np.inf], [0, 1])


def test_swapped_scores_and_labels_are_refused():
    scores, labels = [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]
    assert M.image_auroc(scores, labels) == 1.0
    assert M.image_auroc(scores, np.array(labels, dtype=np.float64)) == 1.0  # whole floats: fine
    for fn in (M.image_auroc, M.f1_max):
        with pytest.raises(ValueError, match=r"labels must be 0 .* got 0.1 - were scores passed in "
                                             r"their place\? The order is \(scores, labels\)"):
            fn(labels, scores)  # scikit-learn's order (y_true, y_score)
