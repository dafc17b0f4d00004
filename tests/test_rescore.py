"""Rescoring a fitted model (mixture <-> distance, image-score edge band) without training:
equals a fit with that scoring and band."""

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pedenet
from pedenet.builtin import make_builtin_dataset
from pedenet.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # few held-out images, on purpose

SMALL = dict(steps=3, embedding_dim=8, n_components=2, image_size=64, calibration_fraction=1 / 3)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return [rng.random((64, 64, 3), dtype=np.float32) for _ in range(6)]


@pytest.fixture(scope="module")
def fitted(images):
    """The same images and seed fitted both ways (3 training steps, so the trained head differs
    from its PCA initialization: a rescore that re-initialized it would show)."""
    return (pedenet.PEDENet(**SMALL).fit(images, progress=False),
            pedenet.PEDENet(**SMALL, scoring="distance", memory_bank_size=100).fit(images, progress=False))


def _same_scoring(a, b, images):
    assert a.config == b.config
    np.testing.assert_array_equal(a.anomaly_map(images[0]), b.anomaly_map(images[0]))
    np.testing.assert_array_equal(a.predict(images).scores, b.predict(images).scores)
    assert a.normal_quantiles == b.normal_quantiles
    assert a.thresholds() == b.thresholds()


def test_rescore_to_distance_equals_a_distance_fit_and_back(fitted, images):
    mixture, distance = fitted
    m = copy.deepcopy(mixture)
    head = {k: v.clone() for k, v in m.network.state_dict().items()}
    assert m.rescore(images, "distance", memory_bank_size=100, progress=False) is m
    assert len(m.network.memory_bank) == len(distance.network.memory_bank) == 100
    torch.testing.assert_close(m.network.memory_bank.bank, distance.network.memory_bank.bank,
                               rtol=0, atol=0)
    _same_scoring(m, distance, images)
    assert all(torch.equal(v, m.network.state_dict()[k]) for k, v in head.items())  # untouched
    assert m.history["memory_bank_rows"] == 100 and m.history["timings"]["memory_bank_seconds"] > 0
    m.rescore(images, "mixture", progress=False)
    assert m.network.memory_bank is None and "memory_bank_rows" not in m.history
    assert "memory_bank_seconds" not in m.history["timings"]
    _same_scoring(m, mixture, images)  # config included: the bank size is the default again


def test_rescore_to_an_edge_band_equals_a_fit_with_it(fitted, images):
    banded = pedenet.PEDENet(**SMALL, image_score_border=0.2).fit(images, progress=False)
    m = copy.deepcopy(fitted[0]).rescore(images, image_score_border=0.2, progress=False)
    assert m.config.scoring == "mixture" and m.config.image_score_border == 0.2
    _same_scoring(m, banded, images)  # the held-out thresholds are those of the band
    assert m.predict(images).scores.tolist() != fitted[0].predict(images).scores.tolist()
    with pytest.raises(ValueError, match="image_score_border"):
        copy.deepcopy(fitted[0]).rescore(images, image_score_border=0.5, progress=False)


def test_rescore_refuses_other_images_and_a_bank_size_for_the_mixture(fitted, images):
    m = copy.deepcopy(fitted[0])
    with pytest.raises(pedenet.training.ImagesMismatchError, match="fitted on 4 training and 2 "
                       "held-out images; these images split into 3 and 2; pass the images fit"):
        m.rescore(images[:5], "distance", progress=False)
    with pytest.raises(ValueError, match="memory_bank_size is used by scoring 'distance' only"):
        m.rescore(images, "mixture", memory_bank_size=10, progress=False)
    with pytest.raises(ValueError, match="scoring must be one of"):
        m.rescore(images, "knn", progress=False)
    assert m.config.scoring == "mixture" and m.network.memory_bank is None  # nothing changed
    with pytest.raises(RuntimeError, match="not fitted"):
        pedenet.PEDENet().rescore(images, "distance")


def test_estimator_refuses_a_bank_size_without_distance_scoring_but_loads_a_rescored_model(
        fitted, images, tmp_path):
    with pytest.raises(ValueError, match="memory_bank_size=50 has no effect with scoring='mixture'"):
        pedenet.PEDENet(memory_bank_size=50)
    assert pedenet.PEDENet(scoring="distance", memory_bank_size=50).config.memory_bank_size == 50
    m = copy.deepcopy(fitted[1]).rescore(images, "mixture", progress=False)
    assert m.config == pedenet.PEDENet(**SMALL).config  # memory_bank_size back to the default
    m.save(tmp_path / "m.pt")
    back = pedenet.load(tmp_path / "m.pt")
    assert back.config == m.config
    np.testing.assert_array_equal(back.anomaly_map(images[1]), m.anomaly_map(images[1]))
    # a file from before the constructor refused the combination still loads
    from pedenet.checkpoint import load_checkpoint, save_checkpoint

    data = load_checkpoint(tmp_path / "m.pt")
    data["config"]["memory_bank_size"] = 50
    save_checkpoint(tmp_path / "old.pt", data)
    assert pedenet.load(tmp_path / "old.pt").config.memory_bank_size == 50


def test_rescore_refuses_other_data_and_leaves_the_model_as_it_was(fitted, images):
    """Arrays carry no names: held out, their pixel hashes tell other images apart; trained
    on, the features' mean. A failure part way (an unreadable training image) restores every
    part of the model."""
    m = copy.deepcopy(fitted[0])
    state = (m.config, m.normal_quantiles, m.thresholds(), copy.deepcopy(m.history))
    with pytest.raises(pedenet.training.ImagesMismatchError, match="held-out input 1 has other pixels"):
        m.rescore([np.clip(im * 0.5 + 0.25, 0, 1) for im in images], "distance", progress=False)
    # split_calibration(6, 1/3, 0) holds out 1 and 4: other training images only
    other = [im if i in (1, 4) else np.clip(im * 0.5 + 0.25, 0, 1) for i, im in enumerate(images)]
    with pytest.raises(pedenet.training.ImagesMismatchError, match="not the images the network "
                       "was trained on: their features' mean differs") as info:
        m.rescore(other, "distance", progress=False)
    assert str(info.value) == info.value.problem + "; pass the images fit was given, in the same order"
    # the fit's own images in another order: said so, naming where the moved image was held out
    swapped = list(images)
    swapped[1], swapped[4] = images[4], images[1]
    with pytest.raises(pedenet.training.ImagesMismatchError,
                       match=r"^these images are in another order than fit's: held-out input 1 has "
                             r"the pixels fit held out as input 4 \(the held-out images are found "
                             r"by their position\); pass the images fit was given, in the same order$"):
        m.rescore(swapped, "distance", progress=False)
    with pytest.raises(pedenet.training.ImagesMismatchError, match=r"other pixels \(or another dtype\)"):
        m.rescore([im.astype(np.float64) if i == 4 else im for i, im in enumerate(images)],
                  "distance", progress=False)
    bad = list(images)
    bad[0] = "/nonexistent/never.png"  # index 0 trains (split_calibration(6, 1/3, 0) holds out 1, 4)
    assert "never.png" not in str(m.history["calibration_images"])
    with pytest.raises(pedenet.data.DataError, match="never.png"):
        m.rescore(bad, "distance", progress=False)
    assert (m.config, m.normal_quantiles, m.thresholds(), m.history) == state
    assert m.network.memory_bank is None and m.network.config is m.config
    np.testing.assert_array_equal(m.anomaly_map(images[0]), fitted[0].anomaly_map(images[0]))


@pytest.fixture(scope="module")
def grass(tmp_path_factory):
    root = tmp_path_factory.mktemp("rescore")
    data = make_builtin_dataset(root / "ds", categories=("grass",), n_train=6, n_test_good=1,
                                n_test_defect=1, size=64)
    return data / "grass", root


def _fit(run, data, out, *extra):
    r = run(main, ["fit", str(data), "--out", str(out), "--steps", "2", "--quiet", *extra])
    assert r.exit_code == 0, r.output


def test_cli_rescore_writes_a_run_equal_to_a_distance_fit(grass):
    data, root = grass
    run = CliRunner().invoke
    _fit(run, data, root / "mix")
    _fit(run, data, root / "dist", "--scoring", "distance", "--memory-bank-size", "100")
    r = run(main, ["rescore", str(root / "mix"), "--scoring", "distance", "--memory-bank-size", "100",
                   "--out", str(root / "re")])
    assert r.exit_code == 0, r.output
    assert "rescored in" in r.output
    got, want = pedenet.load(root / "re"), pedenet.load(root / "dist")
    image = str(next((data / "test").rglob("*.png")))
    np.testing.assert_array_equal(got.anomaly_map(image), want.anomaly_map(image))
    assert got.thresholds() == want.thresholds()
    record = json.loads((root / "re" / "config.json").read_text())
    assert record["config"] == json.loads((root / "dist" / "config.json").read_text())["config"]
    assert record["rescored"]["from"] == str((root / "mix").resolve())
    assert record["thresholds"] == want.thresholds()
    assert pedenet.load(root / "mix").config.scoring == "mixture"  # RUN_DIR left as it was
    # and back: the rescored run's mixture scores as the mixture fit does
    r = run(main, ["rescore", str(root / "re"), "--scoring", "mixture", "--out", str(root / "back"),
                   "--quiet"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(pedenet.load(root / "back").anomaly_map(image),
                                  pedenet.load(root / "mix").anomaly_map(image))
    # a distance run's bank size alone: --scoring defaults to the run's own
    r = run(main, ["rescore", str(root / "dist"), "--memory-bank-size", "50", "--out",
                   str(root / "d50"), "--verbose"])
    assert r.exit_code == 0, r.output
    # --verbose times the stages rescore ran, not the fit's training it did not
    assert "stage timings (s): rescore " in r.output and "memory_bank_seconds" in r.output
    assert "train_seconds" not in r.output
    assert pedenet.load(root / "d50").config.memory_bank_size == 50
    assert len(pedenet.load(root / "d50").network.memory_bank) == 50


def test_cli_rescore_to_an_edge_band_equals_a_fit_with_it(grass):
    data, root = grass
    run = CliRunner().invoke
    if not (root / "mix" / "model.pt").exists():
        _fit(run, data, root / "mix")
    _fit(run, data, root / "band", "--image-score-border", "0.1")
    r = run(main, ["rescore", str(root / "mix"), "--image-score-border", "0.1", "--out",
                   str(root / "reband")])
    assert r.exit_code == 0, r.output
    assert "by mixture, image-score border 0.1" in r.output
    got, want = pedenet.load(root / "reband"), pedenet.load(root / "band")
    assert got.config == want.config and got.thresholds() == want.thresholds()
    test = sorted(str(p) for p in (data / "test").rglob("*.png"))
    np.testing.assert_array_equal(got.predict(test).scores, want.predict(test).scores)


def test_cli_rescore_moved_data_and_refusals(grass, tmp_path):
    data, root = grass
    run = CliRunner().invoke
    if not (root / "mix" / "model.pt").exists():
        _fit(run, data, root / "mix")
    mix = str(root / "mix")
    r = run(main, ["rescore", mix, "--scoring", "mixture", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and ("already scores by mixture and an image-score border of 0; "
                                 "nothing to change") in r.output
    r = run(main, ["rescore", mix, "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "nothing to change: give --scoring, --image-score-border" in r.output
    r = run(main, ["rescore", mix, "--image-score-border", "nan", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "nan is not in [0, 0.5)" in r.output
    r = run(main, ["rescore", mix, "--scoring", "distance", "--out", mix])
    assert r.exit_code == 2 and "is RUN_DIR or inside it" in r.output
    r = run(main, ["rescore", mix, "--scoring", "mixture", "--memory-bank-size", "5", "--out",
                   str(tmp_path / "a")])
    assert r.exit_code == 2 and "--memory-bank-size applies to --scoring distance only" in r.output
    r = run(main, ["rescore", str(tmp_path / "nothing"), "--scoring", "distance", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "run folder does not exist" in r.output
    # the data moved: found with --data (the dataset root here), refused without it
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(data.parent, moved)
    record_path = root / "mix" / "config.json"
    record = json.loads(record_path.read_text())
    gone = dict(record, category_dir=str(tmp_path / "gone"), category="grass")
    copied = tmp_path / "mix_copy"
    shutil.copytree(root / "mix", copied)
    (copied / "config.json").write_text(json.dumps(gone))
    r = run(main, ["rescore", str(copied), "--scoring", "distance", "--out", str(tmp_path / "b")])
    assert r.exit_code == 1 and "the data folder fit read is gone" in r.output and "--data" in r.output
    r = run(main, ["rescore", str(copied), "--scoring", "distance", "--out", str(tmp_path / "b"),
                   "--data", str(moved), "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["category_dir"] == str(
        (moved / "grass").resolve())
    # a training folder that changed since fit is refused, naming the folder
    sorted((moved / "grass" / "train" / "good").iterdir())[0].unlink()
    r = run(main, ["rescore", str(copied), "--scoring", "distance", "--out", str(tmp_path / "c"),
                   "--data", str(moved / "grass")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "pass the folder fit read (--data), or refit" in r.output and str(moved / "grass") in r.output
    assert r.output.count("pass the") == 1  # the advice, once
    assert not (tmp_path / "c" / "model.pt").exists()
    # a corrupt run record: named, and the advice is not to delete it (rescore needs it)
    (copied / "config.json").write_text('{"category_dir": ')
    r = run(main, ["rescore", str(copied), "--scoring", "distance", "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "Traceback" not in r.output and str(copied / "config.json") in r.output
    assert "cannot read" in r.output and "restore it, or refit" in r.output and "delete" not in r.output


def test_cli_rescore_records_where_the_data_is_now_and_replaces_cleanly(grass, tmp_path):
    """After --data, the new run's held-out paths point at the moved data (validate needs no
    --data); warnings are the rescore's own (the fit's kept apart, not piled up); --overwrite
    removes what the replaced model left; --out inside RUN_DIR, a damaged config.json and
    train/good given as --data are refused in one line."""
    import shutil

    data, root = grass
    run = CliRunner().invoke
    ds = tmp_path / "ds"
    shutil.copytree(data.parent, ds)
    _fit(run, ds / "grass", tmp_path / "mix")
    moved = tmp_path / "moved"
    ds.rename(moved)
    r = run(main, ["rescore", str(tmp_path / "mix"), "--scoring", "distance", "--out",
                   str(tmp_path / "dist"), "--data", str(moved), "--quiet"])  # the dataset root
    assert r.exit_code == 0, r.output
    history = json.loads((tmp_path / "dist" / "history.json").read_text())
    assert history["calibration_images"] and all(
        p.startswith(str((moved / "grass").resolve())) for p in history["calibration_images"])
    r = run(main, ["validate", str(tmp_path / "dist"), "--quiet"])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "dist" / "config.json").read_text())
    assert record["data"] == str(moved.resolve())
    fit_warnings = json.loads((tmp_path / "mix" / "config.json").read_text())["warnings"]
    assert record["fit_warnings"] == fit_warnings
    (tmp_path / "dist" / "overlays").mkdir()
    (tmp_path / "dist" / "resume.pt").write_bytes(b"old")
    r = run(main, ["rescore", str(tmp_path / "dist"), "--scoring", "mixture", "--out",
                   str(tmp_path / "dist"), "--overwrite"])
    assert r.exit_code == 2 and "is RUN_DIR or inside it" in r.output
    r = run(main, ["rescore", str(tmp_path / "mix"), "--scoring", "distance", "--out",
                   str(tmp_path / "mix" / "sub"), "--data", str(moved)])
    assert r.exit_code == 2 and "is RUN_DIR or inside it" in r.output
    assert not (tmp_path / "mix" / "sub").exists()
    r = run(main, ["rescore", str(tmp_path / "mix"), "--scoring", "distance", "--memory-bank-size",
                   "50", "--out", str(tmp_path / "dist"), "--data", str(moved / "grass"), "--overwrite",
                   "--quiet"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "dist" / "overlays").exists() and not (tmp_path / "dist" / "resume.pt").exists()
    assert not (tmp_path / "dist" / "validation.json").exists()
    again = json.loads((tmp_path / "dist" / "config.json").read_text())
    assert again["fit_warnings"] == fit_warnings and again["warnings"] == record["warnings"]
    r = run(main, ["rescore", str(tmp_path / "mix"), "--scoring", "distance", "--out",
                   str(tmp_path / "x"), "--data", str(moved / "grass" / "train" / "good")])
    assert r.exit_code == 1 and "no train/good here" in r.output
    assert f"pass {moved / 'grass'}, the category folder" in r.output
    for damaged in ("[1, 2]", json.dumps({"category_dir": 5}), json.dumps(dict(record, warnings=None))):
        (tmp_path / "mix" / "config.json").write_text(damaged)
        r = run(main, ["rescore", str(tmp_path / "mix"), "--scoring", "distance", "--out",
                       str(tmp_path / "x"), "--data", str(moved)])
        assert r.exit_code == 1 and "not a pedenet run record" in r.output, (damaged, r.output)
        assert "Traceback" not in r.output
    r = run(main, ["rescore", str(tmp_path / "dist" / "config.json"), "--scoring", "mixture",
                   "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "config.json" in r.output and "Traceback" not in r.output


def test_rescore_of_files_in_another_order_says_so(images, tmp_path):
    from PIL import Image

    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((im * 255).astype(np.uint8)).save(paths[-1])
    m = pedenet.PEDENet(**SMALL).fit(paths, progress=False)
    assert [p.rsplit("/", 1)[-1] for p in m.history["calibration_images"]] == ["1.png", "4.png"]
    swapped = list(paths)
    swapped[1], swapped[4] = paths[4], paths[1]  # the held-out files, each in the other's place
    with pytest.raises(pedenet.training.ImagesMismatchError,
                       match=r"a held-out image differs \(1\.png against 4\.png, recorded first\) "
                             r"\(the same names in another order: the held-out images are found by "
                             r"their position\); pass the images fit was given, in the same order$"):
        m.rescore(swapped, "distance", progress=False)
    other = list(paths)
    other[1] = paths[0]  # a training image in a held-out place: no claim about the order
    with pytest.raises(pedenet.training.ImagesMismatchError,
                       match=r"differs \(1\.png against 0\.png, recorded first\); pass"):
        m.rescore(other, "distance", progress=False)
