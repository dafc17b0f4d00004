"""Calibrated decisions through the command line: fit, evaluate (realized rates, report),
predict (p-values, decisions, masks), --verbose."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pedenet.builtin import make_builtin_dataset
from pedenet.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True, terminal_width=200)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_builtin_dataset(tmp_path_factory.mktemp("thr") / "ds", categories=("brick",),
                                n_train=40, n_test_good=6, n_test_defect=3, size=96) / "brick"


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "brick"
    r = run("fit", dataset, "--out", out, "--steps", "0", "--image-size", "96",
            "--calibration-fraction", "0.5", "--target-fpr", "0.1", "--verbose")
    assert r.exit_code == 0, r.output
    assert "config:" in r.output and "stage timings" in r.output  # --verbose details
    assert "thresholds from 20 held-out normal images" in r.output
    return out


def test_fit_records_thresholds(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    th = cfg["thresholds"]
    assert cfg["n_calibration_images"] == 20 and th["n_calibration"] == 20
    assert th["target_fpr"] == 0.1 and th["pixel_threshold"] < th["image_threshold"]
    hist = json.loads((run_dir / "history.json").read_text())
    assert len(hist["calibration_images"]) == 20 and hist["n_train_images"] == 20


def test_evaluate_reports_realized_rates_and_writes_report(run_dir):
    r = run("evaluate", run_dir, "--no-overlays", "--report", "--verbose")
    assert r.exit_code == 0, r.output
    m = json.loads((run_dir / "metrics.json").read_text())
    images = m["images"]
    th, real = m["thresholds"], m["realized"]
    flagged = np.array([e["anomalous"] for e in images])
    labels = np.array([e["label"] for e in images])
    scores = np.array([e["score"] for e in images])
    np.testing.assert_array_equal(flagged, scores > th["image_threshold"])
    assert real["n_normal"] == 6 and real["n_anomalous"] == 9
    assert real["false_alarm_rate"] == pytest.approx(flagged[labels == 0].mean())
    assert real["miss_rate"] == pytest.approx(1 - flagged[labels == 1].mean())
    lo, hi = real["false_alarm_rate_ci"]
    assert lo <= real["false_alarm_rate"] <= hi
    assert f"misses {real['miss_rate']:.3f} of 9 anomalous images" in r.output
    assert sum("p-value" in line for line in r.output.splitlines()) == 15  # one per image
    html = (run_dir / "report.html").read_text()
    assert "<html" in html.lower() and "http://" not in html and "https://" not in html
    # a stricter target can only flag fewer images
    r2 = run("evaluate", run_dir, "--no-overlays", "--fpr", "0.05", "--overwrite", "--quiet")
    assert r2.exit_code == 0, r2.output
    m2 = json.loads((run_dir / "metrics.json").read_text())
    assert m2["thresholds"]["target_fpr"] == 0.05
    assert m2["thresholds"]["image_threshold"] >= th["image_threshold"]


def test_predict_writes_p_values_decisions_and_masks(run_dir, dataset, tmp_path):
    out = tmp_path / "pred"
    inputs = [dataset / "test" / "good", dataset / "test" / "spot"]
    r = run("predict", run_dir, *inputs, "--out", out, "--report", "--quiet")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 9
    th = json.loads((run_dir / "config.json").read_text())["thresholds"]
    for row in rows:
        score, p, flag = float(row["score"]), float(row["p_value"]), row["anomalous"] == "1"
        assert flag == (score > th["image_threshold"])
        assert 1 / 21 <= p <= 1
        mask = np.asarray(Image.open(out / f"{row['name']}_mask.png"))
        amap = np.load(out / f"{row['name']}_map.npy")
        assert mask.shape == amap.shape and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, (amap > th["pixel_threshold"]) & flag)
    assert (out / "report.html").is_file()


def test_verbose_and_quiet_conflict(run_dir, tmp_path):
    r = run("evaluate", run_dir, "--quiet", "--verbose", "--overwrite")
    assert r.exit_code == 2 and "contradict" in r.output


def test_unreachable_target_is_flagged_in_the_table(run_dir):
    r = run("evaluate", run_dir, "--no-overlays", "--fpr", "0.001", "--overwrite")
    assert r.exit_code == 0, r.output
    assert "guaranteed only 0.0476" in r.output  # 20 held-out images: 1/21
    assert "Warning:" in r.output and "cannot guarantee" in r.output


def test_fit_counts_unread_image_formats_once_and_refuses_a_folder_of_only_those(dataset,
                                                                                 tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(dataset / "train" / "good", plain)
    Image.new("RGB", (64, 64)).save(plain / "extra.gif")
    r = run("fit", plain, "--out", tmp_path / "r", "--steps", "0", "--image-size", "64", "--quiet")
    assert r.exit_code == 0, r.output
    warned = json.loads((tmp_path / "r" / "config.json").read_text())["warnings"]
    assert sum("skipped 1 image file" in w and "extra.gif" in w for w in warned) == 1
    webp = tmp_path / "webp"
    webp.mkdir()
    Image.new("RGB", (64, 64)).save(webp / "a.webp", format="WEBP")
    r = run("fit", webp, "--out", tmp_path / "r2", "--quiet")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "holds images only in formats pedenet does not read" in r.output
    assert not (tmp_path / "r2").exists()


def test_fit_accepts_a_plain_folder_of_normal_images(dataset, tmp_path):
    r = run("fit", dataset / "train" / "good", "--out", tmp_path / "r", "--steps", "0",
            "--image-size", "64", "--quiet")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["n_normal_images"], cfg["n_train_images"], cfg["n_calibration_images"]) == (40, 32, 8)
    # nothing to evaluate in a folder of normal images: evaluate says so and what to pass
    r = run("evaluate", tmp_path / "r", "--quiet")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "fitted on a plain folder of normal images" in r.output
    assert "pass --data" in r.output and "pedenet validate" in r.output
    r = run("evaluate", tmp_path / "r", "--data", dataset, "--no-overlays", "--quiet")
    assert r.exit_code == 0, r.output  # with test data it evaluates
    assert cfg["plain_folder"] is True
    assert json.loads((tmp_path / "r" / "config.json").read_text())["plain_folder"] is True
    # the plain folder since deleted: still told it had no test images, not that it moved
    cfg["data"] = cfg["category_dir"] = str(tmp_path / "gone")
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    r = run("evaluate", tmp_path / "r", "--overwrite", "--quiet")
    assert r.exit_code == 1 and "fitted on a plain folder of normal images" in r.output


def test_fit_does_not_train_on_subfolders_and_says_so(dataset, tmp_path):
    import shutil

    # images only in subfolders: a one-line error naming them, nothing trained
    nested = tmp_path / "nested"
    shutil.copytree(dataset / "train" / "good", nested / "day1")
    (nested / "day2").mkdir()
    for p in sorted((dataset / "train" / "good").glob("*.png"))[:3]:
        shutil.copy(p, nested / "day2" / p.name)
    r = run("fit", nested, "--out", tmp_path / "r", "--quiet")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "day1/ (40), day2/ (3)" in r.output and str(nested / "day1") in r.output
    assert not (tmp_path / "r").exists()
    # images directly inside and in a subfolder: the subfolder's are left out, with a warning
    shutil.copytree(dataset / "train" / "good", tmp_path / "mixed")
    shutil.copytree(dataset / "test" / "spot", tmp_path / "mixed" / "spot")
    r = run("fit", tmp_path / "mixed", "--out", tmp_path / "r2", "--steps", "0", "--image-size",
            "64", "--quiet")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert cfg["n_normal_images"] == 40
    n_spot = len(list((dataset / "test" / "spot").glob("*.png")))
    assert sum(f"{n_spot} images in its subfolders (spot) are not used" in w
               for w in cfg["warnings"]) == 1


def test_api_warnings_and_input_rules(dataset):
    import pedenet

    images = sorted((dataset / "train" / "good").glob("*.png"))[:3]
    plain = pedenet.PEDENet(steps=0, image_size=64, calibration_fraction=0.0).fit(images, progress=False)
    with pytest.warns(UserWarning, match="no calibration .fitted with calibration_fraction 0"):
        plain.predict(images[:1], fpr=0.1)
    with pytest.raises(TypeError, match="model.predict"):
        pedenet.evaluate(plain, images)
    img = np.full((64, 64), 0.5, np.float32)
    img[0, 0] = 1.0000001  # rounding overshoot is clipped, not refused
    assert plain.predict([img]).scores.shape == (1,)
    with pytest.raises(ValueError, match="divide 8-bit values by 255"):
        plain.predict([img * 255])
    with pytest.raises(ValueError, match="steps must be an integer"):
        pedenet.PEDENet(steps=2.5)


def test_too_few_images_to_hold_out_says_so(dataset, tmp_path):
    """One training image at the default fraction 0.2: no thresholds, and every message says
    why (too few images, how many are needed), not "fitted with --calibration-fraction 0"."""
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes(sorted((dataset / "train" / "good").glob("*.png"))[0].read_bytes())
    r = run("fit", one, "--out", tmp_path / "r", "--steps", "0", "--image-size", "64",
            "--n-components", "2")
    assert r.exit_code == 0, r.output
    assert "Warning: 1 training image(s): too few to hold any out" in r.output
    why = "fitted on 1 normal image(s), too few to hold any out at calibration_fraction 0.2; " \
          "fit on at least 3 normal images"
    assert f"no thresholds ({why}): scores only" in r.output
    r = run("predict", tmp_path / "r", one / "a.png", "--out", tmp_path / "p")
    assert r.exit_code == 0 and why in r.output, r.output
    r = run("validate", tmp_path / "r")
    assert r.exit_code != 0 and f"holds out no normal images to validate on ({why})" in r.output
    from pedenet.calibration import split_calibration

    assert len(split_calibration(3, 0.2, 0)[1]) == 1 and len(split_calibration(2, 0.2, 0)[1]) == 0


def test_evaluate_names_the_recorded_data_when_it_has_moved(tmp_path):
    from pedenet.cli.common import UserError
    from pedenet.cli.evaluate import _resolve_eval_data

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    moved = tmp_path / "moved_away" / "brick"
    (run_dir / "config.json").write_text(json.dumps({"category_dir": str(moved), "data": str(moved)}))
    with pytest.raises(UserError, match=r"moved_away.*recorded in .*config.json at fit time.*--data"):
        _resolve_eval_data(run_dir, None, None)


def test_verbose_lines_are_not_printed_onto_a_progress_bar(run_dir, dataset, tmp_path):
    r = run("predict", run_dir, dataset / "test", "--out", tmp_path / "p", "--verbose")
    assert r.exit_code == 0, r.output
    assert "(energy; from the held-out normal images)" in r.output  # 20 held out: their scale
    stamped = [line for line in r.output.split("\n") if ": score " in line]
    assert len(stamped) == 15  # one per image (6 good, 9 defective)
    for line in stamped:  # what a terminal shows: the text after the last carriage return
        visible = line.split("\r")[-1]
        assert visible.startswith("[") and "%|" not in visible, repr(line)
