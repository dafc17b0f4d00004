"""Thresholds from normal images only: conformal p-values, thresholds, and the realized
false-alarm rate on fresh normal images of the built-in dataset."""

import copy
import dataclasses
import math
import warnings

import numpy as np
import pytest

import pedenet
from pedenet.builtin import make_builtin_dataset, normal_crops
from pedenet.calibration import Calibration, CalibrationWarning, calibrate, split_calibration


def _cal(scores, fpr=0.1, pixels=None):
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    pixels = np.sort(np.asarray(scores if pixels is None else pixels, dtype=np.float32))
    return Calibration(scores=scores, pixel_scores=pixels, target_fpr=fpr)


def test_p_values_known_answers():
    cal = _cal([1.0, 2.0, 3.0, 4.0])  # n = 4: p = (1 + #{s_i >= s}) / 5
    p = cal.p_values([0.5, 1.0, 2.5, 4.0, 9.0])
    np.testing.assert_allclose(p, [5 / 5, 5 / 5, 3 / 5, 2 / 5, 1 / 5])
    assert cal.achievable_fpr == pytest.approx(0.2)


@pytest.mark.parametrize("n", [9, 10, 19, 50, 99, 250])
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.25])
def test_threshold_equals_p_value_rule(n, fpr):
    rng = np.random.default_rng(n)
    cal = _cal(rng.normal(size=n), fpr)
    new = np.concatenate([rng.normal(size=500) * 2, cal.scores])  # includes ties with s_i
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        t = cal.image_threshold()
    if n + 1 >= 1 / fpr:  # reachable: the two rules agree exactly
        np.testing.assert_array_equal(new > t, cal.p_values(new) <= fpr)
    else:  # out of reach: flag above every held-out score
        assert t == cal.scores.max()


def test_unreachable_target_warns_and_reports_the_guaranteed_rate():
    cal = _cal(np.arange(10.0), 0.01)  # 10 images: at best 1/11
    with pytest.warns(CalibrationWarning, match="1/\\(n\\+1\\)"):
        assert cal.image_threshold() == 9.0
    s = cal.summary()
    assert s["guaranteed_fpr"] == pytest.approx(1 / 11) and s["n_calibration"] == 10
    assert _cal(np.arange(200.0), 0.01).summary()["guaranteed_fpr"] == 0.01


def test_marginal_false_alarm_rate_matches_theory():
    """Over random draws of exchangeable normal scores, P(p <= a) = floor(a (n+1)) / (n+1)."""
    rng = np.random.default_rng(0)
    n, fpr, trials = 19, 0.1, 20000
    data = rng.gamma(2.0, size=(trials, n + 1))
    hits = 0
    for row in data:
        hits += _cal(row[:n], fpr).p_values(row[n]) <= fpr
    expected = math.floor(fpr * (n + 1)) / (n + 1)  # 0.1 exactly here
    tol = 4 * math.sqrt(expected * (1 - expected) / trials)
    assert abs(hits / trials - expected) < tol


def test_pixel_threshold_is_upper_quantile():
    pixels = np.arange(1000, dtype=np.float32)
    cal = _cal([1.0, 2.0], 0.3, pixels=pixels)  # the image target does not set the pixel one
    for beta in (0.05, 0.01):
        t = cal.pixel_threshold(beta)
        assert np.mean(pixels > t) <= beta and np.mean(pixels >= t) >= beta
    assert cal.pixel_threshold() == cal.pixel_threshold(0.01) == cal.summary()["pixel_threshold"]


def test_calibrate_pools_maps_and_subsamples():
    maps = [np.full((4, 5), float(i)) for i in range(6)]
    maps[2][0, 0] = 100.0
    cal = calibrate(maps, 0.2, max_pixels=50)
    np.testing.assert_array_equal(cal.scores, [0, 1, 3, 4, 5, 100])
    assert len(cal.pixel_scores) == 50 and np.all(np.diff(cal.pixel_scores) >= 0)
    with pytest.raises(ValueError, match="NaN"):
        calibrate([np.array([[np.nan]])])
    with pytest.raises(ValueError, match="at least one"):
        calibrate([])
    with pytest.raises(ValueError, match="false-alarm"):
        calibrate(maps, 1.5)


def test_pixel_sample_keeps_the_held_out_maximum():
    # one hot pixel among 10 000: a 100-pixel uniform sample misses it 99 % of the time
    rng = np.random.default_rng(3)
    maps = [rng.random((50, 50)).astype(np.float32) for _ in range(4)]
    maps[1][7, 9] = 42.0
    for seed in range(20):
        cal = calibrate(maps, 0.2, seed=seed, max_pixels=100)
        assert len(cal.pixel_scores) == 100
        assert cal.pixel_scores.max() == 42.0
        assert len(np.unique(cal.pixel_scores)) == 100  # still a sample without repeats
        assert np.median(cal.pixel_scores) == pytest.approx(0.5, abs=0.15)


def test_state_round_trip():
    cal = _cal([3.0, 1.0, 2.0], 0.2)
    back = Calibration.from_state_dict(cal.state_dict())
    np.testing.assert_array_equal(back.scores, cal.scores)
    assert back.target_fpr == 0.2
    with pytest.raises(ValueError):
        Calibration.from_state_dict({"scores": [], "pixel_scores": [1.0], "target_fpr": 0.1})


def test_rates_of_older_checkpoints_read_back_as_written():
    # older checkpoints stored the rates as float32 tensors: 0.01 came back as 0.009999999776,
    # and 99 held-out images (exactly enough for 0.01) then warned "hold out at least 100"
    cal = Calibration(scores=np.arange(99.0), pixel_scores=np.arange(10, dtype=np.float32))
    older = {k: np.asarray(v, dtype=np.float32) if isinstance(v, float) else v
             for k, v in cal.state_dict().items()}
    back = Calibration.from_state_dict(older)
    assert back.target_fpr == 0.01 and back.pixel_fpr == 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        assert back.image_threshold() == 98.0  # k = ceil(100 * 0.99) = 99: the largest score
    assert Calibration.from_state_dict({**older, "target_fpr": np.float64(0.0123)}).target_fpr == 0.0123


def test_split_is_a_seeded_partition():
    tr, ca = split_calibration(50, 0.2, seed=3)
    assert len(ca) == 10 and sorted(np.concatenate([tr, ca]).tolist()) == list(range(50))
    tr2, ca2 = split_calibration(50, 0.2, seed=3)
    np.testing.assert_array_equal(ca, ca2)
    assert not np.array_equal(ca, split_calibration(50, 0.2, seed=4)[1])
    assert len(split_calibration(50, 0.0, 0)[1]) == 0
    assert len(split_calibration(1, 0.5, 0)[0]) == 1  # one image: it trains
    with pytest.raises(ValueError):
        split_calibration(10, 1.0, 0)


# ----------------------------------------------------------------- the built-in dataset


@pytest.fixture(scope="module")
def grass(tmp_path_factory):
    root = make_builtin_dataset(tmp_path_factory.mktemp("builtin"), categories=("grass",), n_train=160,
                                n_test_good=4, n_test_defect=4, size=160, seed=0)
    return root / "grass"


@pytest.fixture(scope="module")
def calibrated(grass):
    # untrained (steps 0) for speed: calibration does not depend on training
    return pedenet.PEDENet(steps=0, image_size=128, calibration_fraction=0.5, target_fpr=0.1,
                           seed=0).fit(grass / "train" / "good", progress=False)


@pytest.mark.slow
def test_realized_false_alarm_rate_on_fresh_normal_images(calibrated):
    """The rate at which fresh normal images (drawn like train/good) are flagged is within
    the binomial tolerance of the target: sd^2 = a(1-a)(1/(n+2) + 1/N), the spread of the
    rate given one held-out set (a Beta law) plus the sampling of the N test images."""
    n = calibrated.calibration.n
    assert n == 80 and calibrated.history["n_train_images"] == 80
    fresh = normal_crops("grass", 300, size=160, seed=11)
    pred = calibrated.predict(fresh)
    fpr = 0.1
    realized = float(np.mean(pred.anomalous))
    sd = math.sqrt(fpr * (1 - fpr) * (1 / (n + 2) + 1 / len(fresh)))
    assert abs(realized - fpr) <= 3 * sd, (realized, sd)
    # decisions, p-values and masks agree with each other
    np.testing.assert_array_equal(pred.anomalous, pred.p_values <= fpr)
    for m, a, amap in zip(pred.masks, pred.anomalous, pred.maps):
        assert m.shape == amap.shape and m.dtype == bool
        assert m.any() == bool(a)  # an anomalous image has its maximum above the pixel threshold
    # a stricter target flags fewer images
    assert np.sum(calibrated.predict(fresh, fpr=0.02).anomalous) <= np.sum(pred.anomalous)


def test_calibrated_model_round_trip_and_uncalibrated(calibrated, grass, tmp_path):
    path = tmp_path / "m.pt"
    calibrated.save(path)
    back = pedenet.load(path)
    assert back.thresholds() == calibrated.thresholds()
    assert back.calibration.target_fpr == calibrated.calibration.target_fpr  # float64 in the file
    images = sorted((grass / "test").rglob("*.png"))[:6]
    a, b = calibrated.predict(images), back.predict(images)
    np.testing.assert_array_equal(a.p_values, b.p_values)
    np.testing.assert_array_equal(a.anomalous, b.anomalous)
    held = calibrated.history["calibration_images"]
    assert len(held) == 80 and not set(held) & {str(p) for p in images}
    plain = pedenet.PEDENet(steps=0, image_size=64, calibration_fraction=0.0).fit(images, progress=False)
    pred = plain.predict(images[:2])
    assert plain.thresholds() is None and pred.p_values is None and pred.masks is None
    assert pred.scores.shape == (2,)


@pytest.mark.slow
def test_overlay_colours_of_fresh_normal_images_come_from_the_held_out_images(calibrated):
    """With >= MIN_HELD_OUT_FOR_SCALE held-out images the colour scale is theirs, so fresh
    normal images (drawn like train/good) stay below the hottest colour, as the held-out ones
    do; the training images' scale, which this small fit exceeds, would paint them hot."""
    from pedenet.visualization import MIN_HELD_OUT_FOR_SCALE, color_range, color_source

    assert calibrated.calibration.n >= MIN_HELD_OUT_FOR_SCALE
    pixels = calibrated.calibration.pixel_scores
    assert color_range(calibrated) == color_range(calibrated, source="held_out")
    vmin, vmax = color_range(calibrated)
    assert vmin == pytest.approx(np.median(pixels)) and vmax > pixels.max()
    t_min, t_max = color_range(calibrated, source="training")
    assert (t_min, t_max) != (vmin, vmax)
    maps = np.stack(calibrated.predict(normal_crops("grass", 40, size=160, seed=12)).maps)
    hot_held_out, hot_training = (maps > vmax).mean(), (maps > t_max).mean()
    assert hot_held_out < 0.005
    assert hot_training > 10 * max(hot_held_out, 1e-4)
    # below MIN_HELD_OUT_FOR_SCALE the training scale serves only where it does not already
    # paint the held-out median pixel red; this small fit's does, so the held-out scale stays
    few = copy.copy(calibrated)
    few.calibration = dataclasses.replace(calibrated.calibration,
                                          scores=calibrated.calibration.scores[:MIN_HELD_OUT_FOR_SCALE - 1])
    assert np.median(pixels) > t_max
    assert color_source(few) == "held_out" and color_range(few) == (vmin, vmax)
    assert color_range(few, source="training") == (t_min, t_max)


def test_held_out_images_far_above_training_warn_of_overfitting(calibrated):
    from pedenet.visualization import color_range

    from pedenet.estimator import OVERFIT_SPANS

    vmin, vmax = color_range(calibrated, source="training")
    spans = (np.median(calibrated.calibration.scores) - vmax) / (vmax - vmin)
    assert 0 < spans < OVERFIT_SPANS / 2  # above the colour scale, as small fits are: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrated._warn_if_held_out_scores_far_above_training()
    over = copy.copy(calibrated)  # the held-out normal images now score past the hottest colour
    over.calibration = dataclasses.replace(calibrated.calibration,
                                           scores=np.sort(calibrated.calibration.scores)
                                           + (OVERFIT_SPANS + 1) * (vmax - vmin))
    with pytest.warns(UserWarning, match=r"held-out normal images score far above the training "
                                         r"images .* more training images \(or fewer --n-components\)"):
        over._warn_if_held_out_scores_far_above_training()


def test_few_held_out_images_of_a_memorizing_model_give_the_colour_scale(tmp_path):
    """A mixture fitted (untrained encoder, random initialization) on the 3 training images
    of 4 (1 held out) scores new normal images far above all its training patches: the
    training scale would paint them solid red. The one held-out map then gives the scale,
    and the warning says so."""
    from pedenet.visualization import color_range, color_source

    root = make_builtin_dataset(tmp_path / "ds", categories=("grass",), n_train=4, n_test_good=3,
                                n_test_defect=1, size=64)
    train = sorted((root / "grass" / "train" / "good").glob("*.png"))
    with pytest.warns(UserWarning) as record:
        model = pedenet.PEDENet(steps=0, de_init="random", image_size=64).fit(train, progress=False)
    assert model.calibration.n == 1
    overfit = [str(w.message) for w in record if "score far above" in str(w.message)]
    assert len(overfit) == 1 and "overlay colours come from the 1 held-out image(s)" in overfit[0]
    # the warning points at the caller's line (fit), not inside pedenet or the test runner
    assert [w.filename for w in record if "score far above" in str(w.message)] == [__file__]
    assert color_source(model) == "held_out"
    maps = np.stack(model.predict(sorted((root / "grass" / "test" / "good").glob("*.png"))).maps)
    _, t_max = color_range(model, source="training")
    vmin, vmax = color_range(model)
    assert (maps > t_max).mean() > 0.9  # the training scale: solid red
    assert (maps > vmax).mean() < 0.1 and np.median(maps) < vmax  # the held-out scale
