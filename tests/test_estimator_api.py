"""The estimator's scikit-learn conventions and its argument checks."""

import numpy as np
import pytest
import torch
from sklearn.base import clone

from pedenet import PEDENet
from pedenet.builtin import make_builtin_dataset
from pedenet.calibration import CalibrationWarning


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = make_builtin_dataset(tmp_path_factory.mktemp("api") / "ds", categories=("brick",),
                                n_train=6, n_test_good=1, n_test_defect=1, size=64)
    images = sorted((root / "brick" / "train" / "good").glob("*.png"))
    with pytest.warns(CalibrationWarning, match="cannot guarantee"):  # 2 held out: expected
        model = PEDENet(steps=2, image_size=64, n_components=2, embedding_dim=8,
                        calibration_fraction=0.34, de_init="random").fit(images, progress=False)
    return model, images


def test_clone_gives_an_unfitted_model_with_the_same_settings(fitted):
    model, _ = fitted
    copy = clone(model)
    assert copy is not model and copy.network is None and copy.calibration is None
    assert copy.config == model.config and copy.device == model.device
    assert copy.get_params() == model.get_params()
    # a value passed as a list or numpy scalar survives the clone's identity check too
    odd = PEDENet(feature_blocks=[4, 10], n_components=np.int64(3))
    assert clone(odd).config.feature_blocks == (4, 10) and clone(odd).config.n_components == 3


def test_set_params_checks_names_values_and_fitted_state(fitted):
    model, _ = fitted
    fresh = PEDENet()
    assert fresh.set_params(steps=7, n_components=5) is fresh
    assert (fresh.config.steps, fresh.config.n_components) == (7, 5)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['step'\]"):
        fresh.set_params(step=3)
    with pytest.raises(ValueError, match="n_components must be >= 1"):
        fresh.set_params(n_components=0)
    assert fresh.config.n_components == 5  # a refused change leaves the settings as they were
    with pytest.raises(ValueError, match="memory_bank_size"):
        fresh.set_params(memory_bank_size=10)  # the constructor's rule: needs scoring='distance'
    with pytest.raises(ValueError, match="on a fitted model"):
        model.set_params(n_components=5)
    assert model.set_params(n_components=2) is model  # unchanged values are accepted


def test_fit_puts_the_global_random_state_back(fitted):
    _, images = fitted
    torch.manual_seed(1234)
    np.random.seed(99)
    expected_torch, expected_np = torch.rand(3), np.random.rand(3)
    torch.manual_seed(1234)
    np.random.seed(99)
    PEDENet(steps=1, image_size=64, n_components=2, embedding_dim=8, seed=5,
            de_init="random", calibration_fraction=0).fit(images[:2], progress=False)
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(np.random.rand(3), expected_np)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ({"batch_size": 2.5}, TypeError, "batch_size must be a whole number"),
    ({"batch_size": True}, TypeError, "batch_size must be a whole number"),
    ({"max_tile": 0}, ValueError, r"max_tile must be >= 1, got 0 \(None disables tiling\)"),
    ({"max_tile": "512"}, TypeError, "max_tile must be a whole number"),
])
def test_bad_inference_options_are_refused_at_the_call(fitted, kwargs, error, match):
    model, images = fitted
    with pytest.raises(error, match=match):
        model.iter_predict(images, **kwargs)  # at the call, not at the generator's first next()
    with pytest.raises(error, match=match):
        model.predict(images, **kwargs)
    if "max_tile" in kwargs:
        with pytest.raises(error, match=match):
            model.anomaly_map(images[0], **kwargs)


def test_rates_must_be_numbers(fitted):
    model, images = fitted
    with pytest.raises(TypeError, match=r"fpr must be a number in \(0, 1\), got '0.1'"):
        model.predict(images[:1], fpr="0.1")
    with pytest.raises(TypeError, match="pixel_fpr must be a number"):
        model.predict(images[:1], pixel_fpr=True)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\); got nan"):
        model.predict(images[:1], fpr=float("nan"))
    assert model.predict(images[:1], fpr=np.float32(0.5)).anomalous.shape == (1,)


def test_a_bad_array_in_a_list_is_named_by_its_position(fitted):
    model, images = fitted
    good = np.full((64, 64, 3), 128, dtype=np.uint8)
    bad = np.full((64, 64), 2.0, dtype=np.float32)  # float values outside [0, 1]
    with pytest.raises(ValueError, match=r"^input image 2 \(array, shape \(64, 64\), float32\): "
                                          r"float image values must lie in \[0, 1\]"):
        model.predict([images[0], good, bad])
    with pytest.raises(ValueError, match=r"^input image 1 \(array, shape \(2, 2, 5\), uint8\): "
                                          "image array must be"):
        PEDENet(steps=1, calibration_fraction=0).fit([good, np.zeros((2, 2, 5), dtype=np.uint8)],
                                                     progress=False)
    with pytest.raises(ValueError, match=r"^input image 0 \(array"):
        model.predict(bad)  # one array: position 0
    dark = np.full((64, 64), 200, dtype=np.uint16)  # 8-bit values in a uint16 array
    with pytest.warns(UserWarning, match="^input image 2: uint16 image array with values only in 0-200"):
        model.predict([images[0], good, dark])
    missing = images[0].parent / "missing.png"
    with pytest.raises(ValueError, match=r"^(?!input image).*missing\.png"):  # a file names itself
        model.predict([good, missing])


def test_settings_changed_by_rescore_survive_set_params_and_clone(fitted):
    model, images = fitted
    with pytest.warns(CalibrationWarning, match="cannot guarantee"):  # 2 held out: expected
        rescored = clone(model).fit(images, progress=False)
        rescored.rescore(images, scoring="distance", memory_bank_size=500,
                         image_score_border=0.1, progress=False)
    scores = rescored.predict(images[:2], progress=False).scores
    assert rescored.set_params() is rescored and rescored.set_params(n_components=2) is rescored
    assert (rescored.config.scoring, rescored.config.memory_bank_size,
            rescored.config.image_score_border) == ("distance", 500, 0.1)
    assert rescored.network.config.scoring == "distance"
    np.testing.assert_array_equal(rescored.predict(images[:2], progress=False).scores, scores)
    params = rescored.get_params()
    assert (params["scoring"], params["memory_bank_size"], params["image_score_border"]) == (
        "distance", 500, 0.1)
    assert clone(rescored).config == rescored.config


def test_a_bank_size_without_effect_from_an_old_file_does_not_block_clone():
    import dataclasses
    old = PEDENet()
    # as pedenet.load leaves a file saved before the constructor refused this combination
    old.config = dataclasses.replace(old.config, memory_bank_size=50_000)
    assert old.get_params()["memory_bank_size"] == 200_000
    assert clone(old).config.memory_bank_size == 200_000
    assert old.set_params(steps=5).config.memory_bank_size == 200_000


def test_held_out_arrays_are_named_by_their_position_in_fit_and_rescore(fitted, monkeypatch):
    import warnings

    import pedenet.estimator
    from PIL import Image

    from pedenet.calibration import split_calibration

    model, images = fitted
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    held_out = int(split_calibration(len(arrays), 0.34, model.config.seed)[1][-1])
    dark = list(arrays)
    dark[held_out] = arrays[held_out].astype(np.uint16)  # 8-bit values in a uint16 array: warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted_on_arrays = clone(model).fit(dark, progress=False)
    named = [str(w.message) for w in caught if "uint16" in str(w.message)]
    assert named and all(m.startswith(f"input image {held_out}: uint16") for m in named), named
    bad = list(arrays)
    bad[held_out] = np.full((64, 64), 2.0, dtype=np.float32)  # float values outside [0, 1]

    def encoding_started(*args, **kwargs):
        raise AssertionError("the training images were encoded before the held-out ones were read")

    monkeypatch.setattr(pedenet.estimator, "cache_frozen_features", encoding_started)
    # the held-out pixel hashes would refuse the other array first (a file saved before them)
    del fitted_on_arrays.history["calibration_input_hashes"]
    with pytest.raises(ValueError, match=rf"^input image {held_out} \(array, shape \(64, 64\)"):
        fitted_on_arrays.rescore(bad, image_score_border=0.1, progress=False)
    assert fitted_on_arrays.config.image_score_border == model.config.image_score_border


def test_whole_numbers_and_rates_of_any_numeric_type_are_accepted(fitted):
    from decimal import Decimal

    model, images = fitted
    expected = model.predict(images[:2], batch_size=2, max_tile=64, fpr=0.5)
    for batch_size, max_tile in ((2.0, 64.0), (np.array(2), np.int32(64)), (torch.tensor(2), None)):
        got = model.predict(images[:2], batch_size=batch_size, max_tile=max_tile, fpr=0.5)
        np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5)
    for rate in (np.array(0.5), torch.tensor(0.5, dtype=torch.float64), Decimal("0.5"), np.float32(0.5)):
        assert model.predict(images[:2], fpr=rate).thresholds["target_fpr"] == 0.5
    # a 32-bit rate means the decimal it prints as
    assert model.thresholds(fpr=np.float32(0.01))["target_fpr"] == 0.01
    for bad in (np.array([0.5]), torch.tensor(True), 0.5j):
        with pytest.raises(TypeError, match="must be a number"):
            model.predict(images[:1], fpr=bad)
    with pytest.raises(TypeError, match="batch_size must be a whole number"):
        model.predict(images[:1], batch_size=np.array([2]))


def test_items_that_are_not_images_say_so(fitted):
    from PIL import Image

    model, images = fitted
    with pytest.raises(ValueError, match=r"^input image 1 \(NoneType\): not an image"):
        model.predict([images[0], None])
    with pytest.raises(ValueError, match=r"^input image 0 \(PIL image, mode RGB\): image is empty "
                                          r"\(0x0 px\)"):
        model.predict([Image.new("RGB", (0, 0))])
    negative = Image.fromarray(np.full((64, 64), -5, dtype=np.int32), mode="I")
    with pytest.warns(UserWarning, match=r"values only in -5 to -5 \(negative values read as 0\)"):
        model.predict([negative])


def test_torch_tensors_are_read_as_arrays_and_channels_first_is_explained(fitted):
    model, images = fitted
    hwc = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    expected = model.predict([hwc]).scores
    np.testing.assert_allclose(model.predict([torch.from_numpy(hwc)]).scores, expected, rtol=1e-6)
    np.testing.assert_allclose(model.predict(torch.from_numpy(hwc)).scores, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"^input image 1 \(tensor, shape \(3, 64, 64\), torch.float32\)"
                                          r".*channels-first .*permute\(1, 2, 0\)"):
        model.predict([images[0], torch.from_numpy(hwc).permute(2, 0, 1)])


def test_settings_take_any_numeric_type_and_float32_rates_mean_their_decimal():
    from decimal import Decimal

    model = PEDENet(target_fpr=np.float32(0.01), pixel_fpr=Decimal("0.05"), image_size=64.0,
                    seed=np.array(3), lr=torch.tensor(0.01, dtype=torch.float64))
    assert (model.config.target_fpr, model.config.pixel_fpr, model.config.lr) == (0.01, 0.05, 0.01)
    assert type(model.config.image_size) is int and model.config.image_size == 64
    assert type(model.config.seed) is int and model.config.seed == 3
    for bad, message in ((dict(image_size=64.5), "image_size must be an integer"),
                         (dict(seed="3"), "seed must be an integer"),
                         (dict(target_fpr="0.1"), "target_fpr must be a number")):
        with pytest.raises(ValueError, match=message):
            PEDENet(**bad)


def test_set_params_on_a_fitted_model_says_what_to_do_and_a_grid_over_scoring_works(fitted):
    model, _ = fitted
    with pytest.raises(ValueError, match=r"predict\(fpr=\.\.\., pixel_fpr=\.\.\.\)"):
        model.set_params(target_fpr=0.2)
    with pytest.raises(ValueError, match=r"use rescore\(images, \.\.\.\)"):
        model.set_params(scoring="distance")
    distance = PEDENet(scoring="distance", memory_bank_size=50)
    assert distance.set_params(scoring="mixture").config.memory_bank_size == 200_000
    assert clone(distance).set_params(scoring="distance").config.memory_bank_size == 200_000


def test_validate_names_a_small_image_and_checks_its_seed(fitted, tmp_path):
    from PIL import Image

    from pedenet.validation import validate

    model, images = fitted
    small = tmp_path / "small20.png"
    Image.new("RGB", (20, 20), (90, 90, 90)).save(small)
    with pytest.raises(ValueError, match=r"small20\.png: image is 20x20 px; synthetic defects need"):
        validate(model, [images[0], small])
    with pytest.raises(ValueError, match=r"^input image 1: image is 20x20 px"):
        validate(model, [images[0], np.full((20, 20), 90, np.uint8)])
    for seed in (-1, "3", 1.5):
        with pytest.raises(ValueError, match="seed must be a whole number >= 0"):
            validate(model, images[:1], seed=seed)


def test_rescore_notices_a_replaced_held_out_array(fitted, tmp_path):
    import pedenet
    from PIL import Image

    from pedenet.calibration import split_calibration
    from pedenet.training import ImagesMismatchError

    model, images = fitted
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    held_out = int(split_calibration(len(arrays), 0.34, model.config.seed)[1][0])
    with pytest.warns(CalibrationWarning):
        on_arrays = clone(model).fit(arrays, progress=False)
    on_arrays.save(tmp_path / "model.pt")
    replaced = list(arrays)
    replaced[held_out] = np.full_like(arrays[held_out], 128)
    for fitted_model in (on_arrays, pedenet.load(tmp_path / "model.pt")):
        with pytest.raises(ImagesMismatchError, match=rf"held-out input {held_out} has other pixels"):
            fitted_model.rescore(replaced, scoring="distance", progress=False)
    with pytest.warns(CalibrationWarning):
        on_arrays.rescore(arrays, scoring="distance", memory_bank_size=500, progress=False)


def test_a_stack_of_images_is_a_batch_and_unordered_collections_are_refused(fitted):
    model, images = fitted
    stack = np.random.default_rng(1).random((3, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(stack).scores, model.predict(list(stack)).scores,
                               rtol=1e-6)
    assert len(model.predict(torch.from_numpy(stack[:2])).scores) == 2
    for unordered in (set(images[:2]), dict.fromkeys(images[:2])):
        with pytest.raises(ValueError, match="no order to match the results to; pass a list"):
            model.predict(unordered)
    with pytest.raises(ValueError, match=r"^input image 0 \(array, shape \(0, 10\), float64\): "
                                          r"image array is empty \(shape \(0, 10\)\)"):
        model.predict([np.zeros((0, 10))])
