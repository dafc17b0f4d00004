"""Synthetic-defect validation for model selection without the test split."""

import warnings

import numpy as np
import pytest

import pedenet
from pedenet.builtin import normal_crops
from pedenet.validation import FewImagesWarning, add_synthetic_defect, synthetic_validation_set, validate


@pytest.mark.parametrize("kind", ["scratch", "spot", "patch"])
@pytest.mark.parametrize("shape", [(100, 300, 3), (400, 120, 3), (64, 64, 3)])
def test_defect_changes_exactly_the_mask(kind, shape):
    rng = np.random.default_rng(0)
    img = rng.uniform(0.2, 0.8, size=shape).astype(np.float32)
    img[..., 1] = img[..., 0]  # any colour image
    bad, mask = add_synthetic_defect(img, np.random.default_rng(1), kind)
    assert bad.shape == img.shape and bad.dtype == np.float32 and mask.shape == shape[:2]
    assert mask.any()
    changed = np.abs(bad - img).max(axis=2) > 1e-6
    assert not changed[~mask].any()  # nothing outside the mask moved
    assert changed[mask].mean() > 0.95  # (a pixel can be clipped at 0 or 1 in every channel)
    assert bad.min() >= 0 and bad.max() <= 1


def test_defect_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown defect"):
        add_synthetic_defect(np.zeros((64, 64, 3), np.float32), np.random.default_rng(0), "dent")
    with pytest.raises(ValueError, match="48 px"):
        add_synthetic_defect(np.zeros((40, 64, 3), np.float32), np.random.default_rng(0))


def test_validation_set_is_paired_and_seeded():
    crops = normal_crops("gravel", 4, size=96, seed=3)
    a, m, y = synthetic_validation_set(crops, seed=1)
    assert len(a) == 8 and list(y) == [0, 1] * 4
    assert all(not mk.any() for mk in m[0::2]) and all(mk.any() for mk in m[1::2])
    a2, m2, _ = synthetic_validation_set(crops, seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(m, m2))


def test_validate_ranks_a_model_above_chance():
    crops = normal_crops("brick", 30, size=96, seed=4)
    model = pedenet.PEDENet(steps=0, image_size=96, calibration_fraction=0.0).fit(crops[:20], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewImagesWarning)  # 10 held-out images: enough
        v = validate(model, crops[20:], seed=0)
    assert v["n_images"] == 20
    # the same numbers computed by hand from the paired set
    from pedenet.metrics import au_pro, image_auroc, pixel_auroc

    arrays, masks, labels = synthetic_validation_set(crops[20:], seed=0)
    pred = model.predict(arrays)
    assert v["image_auroc"] == pytest.approx(image_auroc(pred.scores, labels))
    assert v["pixel_auroc"] == pytest.approx(pixel_auroc(pred.maps, masks))
    assert v["au_pro_0.3"] == pytest.approx(au_pro(pred.maps, masks, 0.3))
    # brick is regular: even the untrained pipeline finds the synthetic defects (measured 0.78 / 0.9+)
    assert v["image_auroc"] > 0.6 and v["pixel_auroc"] > 0.8


def test_validate_counts_the_defect_kinds():
    from pedenet.validation import defect_kinds

    crops = normal_crops("grass", 9, size=64, seed=5)
    model = pedenet.PEDENet(steps=0, image_size=64, n_components=2,
                            calibration_fraction=0.0).fit(crops[:4], progress=False)
    with pytest.warns(FewImagesWarning, match=r"only 5 held-out normal image\(s\).* 1/5² = 0.04"):
        v = validate(model, crops[4:], seed=2)  # 5 images: kinds scratch, spot, patch, scratch, spot
    assert defect_kinds(5) == ["scratch", "spot", "patch", "scratch", "spot"]
    assert v["defect_kinds"] == {"scratch": 2, "spot": 2, "patch": 1}
    assert sum(v["defect_kinds"].values()) == v["n_images"] // 2 == 5
    # the metrics are those of the paired set, unchanged by the new key
    from pedenet.metrics import au_pro, image_auroc, pixel_auroc

    arrays, masks, labels = synthetic_validation_set(crops[4:], seed=2)
    pred = model.predict(arrays)
    assert v["image_auroc"] == image_auroc(pred.scores, labels)
    assert v["pixel_auroc"] == pytest.approx(pixel_auroc(pred.maps, masks), abs=1e-12)
    assert v["au_pro_0.3"] == pytest.approx(au_pro(pred.maps, masks, 0.3), abs=1e-12)
    assert set(v) == {"image_auroc", "pixel_auroc", "au_pro_0.3", "n_images", "defect_kinds",
                      "normal_scores", "defect_scores", "copy_kinds"}
    # per image: the scores of each held-out image and of its copy, in the order given
    assert v["normal_scores"] == pred.scores[labels == 0].tolist()
    assert v["defect_scores"] == pred.scores[labels == 1].tolist()
    assert v["copy_kinds"] == defect_kinds(5)
    assert v["normal_scores"] == model.predict(crops[4:]).scores.tolist()


def test_validate_takes_a_folder_or_one_file_as_predict_does(tmp_path):
    from PIL import Image

    crops = normal_crops("grass", 7, size=64, seed=5)
    model = pedenet.PEDENet(steps=0, image_size=64, n_components=2,
                            calibration_fraction=0.0).fit(crops[:4], progress=False)
    for i, c in enumerate(crops[4:]):
        Image.fromarray((np.asarray(c) * 255).round().astype(np.uint8)).save(tmp_path / f"{i}.png")
    files = sorted(str(p) for p in tmp_path.glob("*.png"))
    with pytest.warns(FewImagesWarning):
        by_list = validate(model, files, seed=1)
        by_folder = validate(model, tmp_path, seed=1)
        by_file = validate(model, files[0], seed=1)
    assert by_folder == by_list
    assert by_file["n_images"] == 2 and by_file["normal_scores"] == by_list["normal_scores"][:1]
    stack = np.stack([np.asarray(c) for c in crops[4:]])[..., None]  # N×H×W×1: N images, as before
    with pytest.warns(FewImagesWarning):
        assert validate(model, stack, seed=1)["n_images"] == 2 * len(stack)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="is a category folder"):
        validate(model, tmp_path, seed=1)


@pytest.mark.parametrize("shape", [(100, 300, 3), (400, 120, 3), (64, 64, 3)])
def test_region_defect_is_a_large_band_of_the_image_own_texture_magnified(shape):
    from pedenet.validation import REGION_FRACTION

    rng = np.random.default_rng(0)
    # a vertical sine grating: magnifying it changes its period, not its brightness
    x = np.arange(shape[1], dtype=np.float32)
    img = np.repeat((0.5 + 0.3 * np.sin(x / 2.0))[None, :, None], shape[0], 0).repeat(3, 2)
    img = (img + rng.normal(0, 0.01, shape)).astype(np.float32)
    for seed in range(5):
        bad, mask = add_synthetic_defect(img, np.random.default_rng(seed), "region")
        assert bad.shape == img.shape and bad.dtype == np.float32 and mask.dtype == bool
        share = mask.mean()
        assert REGION_FRACTION[0] - 0.02 <= share <= REGION_FRACTION[1] + 0.02
        assert np.array_equal(bad[~mask], img[~mask])  # nothing outside the band moved
        assert np.abs(bad - img).max(axis=2)[mask].mean() > 0.05  # the band did
        # brightness and contrast of the band kept (per channel), up to clipping
        for c in range(3):
            assert bad[..., c][mask].mean() == pytest.approx(img[..., c][mask].mean(), abs=0.02)
            assert bad[..., c][mask].std() == pytest.approx(img[..., c][mask].std(), rel=0.1)
        assert 0 <= bad.min() and bad.max() <= 1


@pytest.mark.parametrize("shape", [(100, 300, 3), (400, 120, 3), (64, 64, 3)])
def test_edge_defect_is_a_piece_cut_off_at_the_border(shape):
    from pedenet.validation import EDGE_FRACTION

    rng = np.random.default_rng(0)
    img = rng.uniform(0.2, 0.8, shape).astype(np.float32)
    sides = set()
    for seed in range(12):
        bad, mask = add_synthetic_defect(img, np.random.default_rng(seed), "edge")
        assert bad.shape == img.shape and mask.shape == shape[:2] and mask.dtype == bool
        assert EDGE_FRACTION[0] - 0.01 <= mask.mean() <= EDGE_FRACTION[1] + 0.01
        assert np.array_equal(bad[~mask], img[~mask]) and np.abs(bad - img)[mask].mean() > 0.01
        touched = {n for n, line in (("top", mask[0]), ("bottom", mask[-1]), ("left", mask[:, 0]),
                                     ("right", mask[:, -1])) if line.any()}
        # cut off by one line from one end of the projection: it always holds a corner
        assert mask[0, 0] or mask[0, -1] or mask[-1, 0] or mask[-1, -1]
        assert touched  # and one piece: no row of it is split
        ys, xs = np.nonzero(mask)
        assert all(np.all(np.diff(xs[ys == y]) == 1) for y in np.unique(ys))
        sides |= touched
    assert sides == {"top", "bottom", "left", "right"}  # every side is drawn


def test_region_defect_on_a_flat_image_is_still_visible():
    from pedenet.validation import REGION_MIN_CHANGE

    for value in (0.0, 0.7):
        img = np.full((120, 90, 3), value, np.float32)
        bad, mask = add_synthetic_defect(img, np.random.default_rng(3), "region")
        assert mask.any() and np.array_equal(bad[~mask], img[~mask])
        assert np.abs(bad - img)[mask].mean() == pytest.approx(0.1, abs=1e-6)
        assert 0.1 > REGION_MIN_CHANGE


def test_validation_kinds_are_chosen_and_checked():
    from pedenet.validation import defect_kinds

    crops = normal_crops("brick", 4, size=96, seed=3)
    default, m_default, _ = synthetic_validation_set(crops, seed=1)
    explicit, m_explicit, _ = synthetic_validation_set(crops, seed=1, kinds=("scratch", "spot", "patch"))
    assert all(np.array_equal(p, q) for p, q in zip(default, explicit))  # the default is unchanged
    assert defect_kinds(5, ("spot", "region")) == ["spot", "region", "spot", "region", "spot"]
    arrays, masks, labels = synthetic_validation_set(crops, seed=1, kinds=("region",))
    assert [mk.mean() > 0.1 for mk in masks[1::2]] == [True] * 4
    # a string names kinds, comma-separated (not its letters)
    _, from_str, _ = synthetic_validation_set(crops, seed=1, kinds="region")
    assert all(np.array_equal(p, q) for p, q in zip(masks, from_str))
    _, from_str, _ = synthetic_validation_set(crops, seed=1, kinds="scratch, spot,patch")
    assert all(np.array_equal(p, q) for p, q in zip(m_explicit, from_str))
    for bad in (("dent",), (), ("spot", "spot")):
        with pytest.raises(ValueError, match="defect kinds must be distinct names from scratch, spot"):
            synthetic_validation_set(crops, kinds=bad)
    model = pedenet.PEDENet(steps=0, image_size=64, n_components=2,
                            calibration_fraction=0.0).fit(crops[:2], progress=False)
    with pytest.warns(FewImagesWarning):
        v = validate(model, crops, seed=1, kinds=("patch", "region"))
    assert v["defect_kinds"] == {"patch": 2, "region": 2}
