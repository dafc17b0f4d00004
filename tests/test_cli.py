"""Tests for the command line interface (pedenet.cli) with click's CliRunner."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sklearn
import tifffile
import torch
from click.testing import CliRunner
from PIL import Image

from pedenet import __version__, metrics
from pedenet.builtin import DEFECT_TYPES, make_builtin_dataset
from pedenet.cli import main
from pedenet.scoring import image_score

STEPS = "3"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True,
                              terminal_width=200)


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for f in fragments:
        assert f in errors[0], (f, errors[0])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_builtin_dataset(tmp_path_factory.mktemp("cli") / "ds", categories=("grass",),
                                n_train=6, n_test_good=2, n_test_defect=2, size=64)


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "grass"
    # an edge band: predict, its --resume check and evaluate score images with the run's band
    result = run("fit", dataset, "--category", "grass", "--out", out, "--steps", STEPS,
                 "--seed", "7", "--image-score-border", "0.05", "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_fit_writes_run_folder(run_dir, dataset):
    assert (run_dir / "model.pt").is_file()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["seed"] == 7 and cfg["config"]["seed"] == 7
    assert cfg["config"]["image_score_border"] == 0.05
    assert cfg["packages"]["torch"] == torch.__version__ and cfg["packages"]["numpy"] == np.__version__
    assert cfg["config"]["steps"] == int(STEPS)
    assert cfg["pedenet_version"] == __version__
    assert Path(cfg["data"]) == dataset.resolve() and cfg["category"] == "grass"
    assert cfg["timings"]["train_seconds"] > 0
    history = json.loads((run_dir / "history.json").read_text())
    assert isinstance(history, dict) and history


def test_fit_refuses_existing_run_without_overwrite(run_dir, dataset, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run_dir, target)
    (target / "metrics.json").write_text("{}")
    before = (target / "model.pt").read_bytes()
    result = run("fit", dataset / "grass", "--out", target, "--steps", "1", "--quiet")
    assert result.exit_code == 2
    assert_one_line_error(result, "model.pt", "already exists", "--overwrite")
    assert (target / "model.pt").read_bytes() == before
    result = run("fit", dataset / "grass", "--out", target, "--steps", "1", "--quiet", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((target / "config.json").read_text())["config"]["steps"] == 1
    assert not (target / "metrics.json").exists()  # stale results of the old model removed


def test_evaluate_writes_metrics_and_overlays(run_dir):
    result = run("evaluate", run_dir, "--quiet")
    assert result.exit_code == 0, result.output
    for name in ("overall", *DEFECT_TYPES):
        assert name in result.stdout
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["packages"]["scikit-learn"] == sklearn.__version__
    for entry in [m["overall"], *m["per_defect"].values()]:
        for key in ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "au_pro_0.3"):
            assert 0.0 <= entry[key] <= 1.0
    scores = np.array([e["score"] for e in m["images"]])
    labels = np.array([e["label"] for e in m["images"]])
    assert m["overall"]["image_auroc"] == pytest.approx(metrics.image_auroc(scores, labels), abs=1e-12)
    assert m["overall"]["image_f1_max"] == pytest.approx(metrics.f1_max(scores, labels), abs=1e-12)
    spot = [i for i, e in enumerate(m["images"]) if e["defect"] in ("good", "spot")]
    assert m["per_defect"]["spot"]["image_auroc"] == pytest.approx(
        metrics.image_auroc(scores[spot], labels[spot]), abs=1e-12)
    for e in m["images"]:
        overlay = run_dir / "overlays" / e["defect"] / (Path(e["path"]).stem + ".png")
        with Image.open(overlay) as img:
            assert img.mode == "RGB" and img.size == (64, 64)
    # --no-overlays, explicit --data
    shutil.rmtree(run_dir / "overlays")
    result = run("evaluate", run_dir, "--data", m["category"], "--no-overlays", "--quiet")
    assert_one_line_error(result, "metrics.json", "--overwrite")  # earlier results are kept
    result = run("evaluate", run_dir, "--data", m["category"], "--no-overlays", "--overwrite",
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert not (run_dir / "overlays").exists()


def test_predict_maps_overlays_scores(run_dir, dataset, tmp_path):
    src = dataset / "grass" / "test" / "spot" / "000.png"
    with Image.open(src) as img:
        gray = np.asarray(img)
    inputs = tmp_path / "in"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    Image.fromarray(gray[:50, :61]).save(inputs / "a" / "x.png")  # non-square, 61 wide, 50 high
    Image.fromarray(gray[5:45, :]).save(inputs / "b" / "x.png")  # same stem, 64 x 40
    out = tmp_path / "out"
    result = run("predict", run_dir, inputs / "a" / "x.png", inputs / "b", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [str(inputs / "a" / "x.png"), str(inputs / "b" / "x.png")]
    assert [r["name"] for r in rows] == ["a_x", "b_x"]
    for row, shape in zip(rows, [(50, 61), (40, 64)]):
        amap = np.load(out / f"{row['name']}_map.npy")
        assert amap.dtype == np.float32 and amap.shape == shape
        # the default fraction, the run's band: (50, 61) → rows 2-47, columns 3-57 scored
        assert float(row["score"]) == image_score(amap, 0.003, 0.05)
        with Image.open(out / f"{row['name']}_overlay.png") as img:
            assert img.mode == "RGB" and img.size == (shape[1], shape[0])
    # tiff output
    out2 = tmp_path / "out2"
    result = run("predict", run_dir, inputs / "a" / "x.png", "--out", out2, "--format", "tiff", "--quiet")
    assert result.exit_code == 0, result.output
    amap = tifffile.imread(out2 / "x_map.tiff")
    assert amap.dtype == np.float32 and amap.shape == (50, 61)
    np.testing.assert_array_equal(amap, np.load(out / "a_x_map.npy"))


def test_bad_inputs_give_one_line_errors(run_dir, dataset, tmp_path):
    missing = tmp_path / "nope"
    assert_one_line_error(run("fit", missing, "--out", tmp_path / "r", "--quiet"), str(missing),
                          "does not exist", "a folder of normal images")
    image = dataset / "grass" / "test" / "good" / "000.png"
    assert_one_line_error(run("fit", image, "--out", tmp_path / "r", "--quiet"), str(image),
                          "is a file, not a folder", "a folder of normal images")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("fit", empty, "--out", tmp_path / "r", "--quiet"), str(empty),
                          "holds no images", "a folder of normal images")
    assert_one_line_error(run("fit", dataset, "--out", tmp_path / "r", "--quiet"), "grass")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert_one_line_error(run("predict", run_dir, notes, "--out", tmp_path / "o", "--quiet"),
                          str(notes), "not an image")
    broken_png = tmp_path / "broken.png"
    broken_png.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert_one_line_error(run("predict", run_dir, broken_png, "--out", tmp_path / "o", "--quiet"),
                          str(broken_png))
    bad_run = tmp_path / "badrun"
    bad_run.mkdir()
    (bad_run / "model.pt").write_bytes(b"garbage, not a checkpoint")
    assert_one_line_error(run("predict", bad_run, dataset / "grass" / "test" / "good", "--out",
                              tmp_path / "o", "--quiet"), "model.pt")
    assert_one_line_error(run("evaluate", bad_run, "--data", dataset / "grass", "--quiet"), "model.pt")
    assert_one_line_error(run("evaluate", tmp_path / "norun", "--quiet"), "norun")
    assert_one_line_error(run("demo", "--categories", "marble", "--out", tmp_path / "d"), "marble")


def test_out_under_a_file_fails_before_any_work(run_dir, dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    images = dataset / "grass" / "test" / "good"
    for args in (("fit", dataset, "--category", "grass", "--out", blocker / "run"),
                 ("predict", run_dir, images, "--out", blocker / "pred"),
                 ("demo", "--out", blocker / "demo"),
                 ("export", run_dir, "--out", blocker / "sub" / "m.onnx"),
                 ("benchmark", "--quick", "--json", blocker / "b.json")):
        result = run(*args, *(("--quiet",) if args[0] in ("fit", "predict", "demo") else ()))
        assert_one_line_error(result, f"because {blocker} is a file, not a folder")
        assert result.exit_code == 2
        assert "checking" not in result.output and "fitting" not in result.output
    assert_one_line_error(run("predict", run_dir, images, "--out", blocker, "--quiet"),
                          f"'{blocker}' is a file")
    assert_one_line_error(run("export", run_dir, "--out", tmp_path), "is a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]  # nothing was created


def test_predict_skips_the_outputs_of_an_earlier_prediction_in_its_input_folder(run_dir, dataset,
                                                                                 tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(dataset / "grass" / "test" / "good", inputs)
    originals = sorted(p.name for p in inputs.iterdir())
    first = run("predict", run_dir, inputs, "--out", inputs / "preds", "--quiet", "--clusters")
    assert first.exit_code == 0, first.output
    n_written = len([p for p in (inputs / "preds").iterdir() if p.suffix == ".png"])
    assert n_written == 3 * len(originals)  # overlay, mask, clusters: images an unwary walk finds
    (inputs / "preds" / "mine.png").write_bytes((inputs / originals[0]).read_bytes())  # not pedenet's
    again = run("predict", run_dir, inputs, "--out", tmp_path / "second", "--quiet")
    assert again.exit_code == 0, again.output
    with open(tmp_path / "second" / "scores.csv", newline="") as fh:
        scored = sorted(Path(r["path"]).name for r in csv.DictReader(fh))
    assert scored == sorted(originals + ["mine.png"])
    warned = (tmp_path / "second" / "warnings.txt").read_text()
    assert f"skipped: {n_written} file(s) in {inputs / 'preds'}: written by an earlier pedenet predict" in warned
    # a file named on the command line is scored even so
    overlay = next((inputs / "preds").glob("*_overlay.png"))
    named = run("predict", run_dir, overlay, "--out", tmp_path / "third", "--quiet")
    assert named.exit_code == 0, named.output
    assert "written by an earlier" not in (tmp_path / "third" / "warnings.txt").read_text()


def test_help_shows_defaults():
    for verb, expected in [
        ("fit", ["default: 1000", "--n-components", "default: pretrained", "--overwrite"]),
        ("evaluate", ["default: overlays", "--data"]),
        ("predict", ["default: npy", "--format"]),
        ("demo", ["default: runs/demo", "default: brick,grass,gravel", "--steps"]),
    ]:
        result = run(verb, "--help")
        assert result.exit_code == 0
        for e in expected:
            assert e in result.output, (verb, e)
        assert result.output.count("[default:") >= 2
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_demo_small(tmp_path, monkeypatch):
    import functools

    from pedenet import builtin

    monkeypatch.setenv("PEDENET_CACHE", str(tmp_path / "cache"))
    # the demo's dataset, shrunk to keep the test fast
    monkeypatch.setattr(builtin, "make_builtin_dataset", functools.partial(
        builtin.make_builtin_dataset, n_train=6, n_test_good=2, n_test_defect=2, size=64))
    out = tmp_path / "demo"
    result = run("demo", "--out", out, "--steps", "1", "--categories", "grass", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["categories"]) == {"grass"}
    assert "grass" in (out / "summary.md").read_text() and "grass" in result.stdout
    assert (out / "grass" / "metrics.json").is_file() and (out / "grass" / "overlays").is_dir()
    assert Path(summary["dataset"]).parent == (tmp_path / "cache").resolve()
    # the decisions' realized rates, as evaluate computed them
    metrics_json = json.loads((out / "grass" / "metrics.json").read_text())
    real = summary["categories"]["grass"]["realized"]
    assert real == metrics_json["realized"] and real["n_normal"] == 2
    fa = metrics_json["realized"]["false_alarm_rate"]
    assert f"grass: false alarms {fa:.3f} of 2 normal images" in result.stdout
    assert "decisions at target false-alarm rate 0.1" in (out / "summary.md").read_text()


def test_fit_rejects_feature_blocks_without_a_stride_8_block(tmp_path):
    result = run("fit", tmp_path, "--out", tmp_path / "r", "--feature-blocks", "10,14")
    assert result.exit_code == 2
    assert "--feature-blocks" in result.output and "stride-8 block (3 or 4), got 10" in result.output


def test_validate_scores_held_out_images(run_dir, tmp_path):
    import pedenet
    from pedenet.validation import validate

    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    result = run("validate", target, "--quiet")
    assert result.exit_code == 0, result.output
    v = json.loads((target / "validation.json").read_text())
    model = pedenet.load(target / "model.pt")
    held = model.history["calibration_images"]
    assert held and v["n_images"] == 2 * len(held) and v["seed"] == 0
    direct = validate(model, held, seed=0)  # the command is the library function on the held-out files
    for key in ("image_auroc", "pixel_auroc", "au_pro_0.3"):
        assert v[key] == pytest.approx(direct[key], abs=1e-9)
        assert f"{direct[key]:.3f}" in result.stdout
    result = run("validate", target, "--quiet")
    assert_one_line_error(result, "validation.json", "--overwrite")
    # --verbose: the thresholds, then each held-out image's score and its copy's
    result = run("validate", target, "--overwrite", "--verbose")
    assert result.exit_code == 0, result.output
    v = json.loads((target / "validation.json").read_text())
    assert v["images"] == held and v["normal_scores"] == pytest.approx(direct["normal_scores"], abs=1e-9)
    assert v["defect_scores"] == pytest.approx(direct["defect_scores"], abs=1e-9)
    assert f"image threshold {model.thresholds()['image_threshold']:.4g}" in result.output
    for path, normal, bad, kind in zip(held, direct["normal_scores"], direct["defect_scores"],
                                       direct["copy_kinds"]):
        assert f"{path}: score {normal:.4g}; its copy with a synthetic {kind} defect: {bad:.4g}" \
            in result.output
    # --kinds: the library function with those kinds; a bad list is refused before any work
    result = run("validate", target, "--quiet", "--overwrite", "--kinds", "edge,spot")
    assert result.exit_code == 0, result.output
    v = json.loads((target / "validation.json").read_text())
    direct = validate(model, held, seed=0, kinds=("edge", "spot"))
    assert v["image_auroc"] == pytest.approx(direct["image_auroc"], abs=1e-9)
    assert v["defect_kinds"] == direct["defect_kinds"] and set(v["defect_kinds"]) == {"edge", "spot"}
    assert v["defect_kinds"]["edge"] >= 1  # the first held-out image gets the first kind
    n = len(held)  # the summary names the kinds drawn: with one image, edge only
    summary = (f"(1 held-out normal image + 1 synthetic-defect copy: edge; seed 0)" if n == 1 else
               f"({n} held-out normal images + {n} synthetic-defect copies: edge, spot; seed 0)")
    assert summary in result.stdout
    for bad in ("spot,dent", "spot,spot", ","):
        result = run("validate", target, "--quiet", "--overwrite", "--kinds", bad)
        assert result.exit_code == 2 and "--kinds" in result.output and "Traceback" not in result.output
    Path(held[0]).rename(tmp_path / "moved.png")
    try:
        result = run("validate", target, "--quiet", "--overwrite")
        assert_one_line_error(result, Path(held[0]).name, "not found")
    finally:
        (tmp_path / "moved.png").rename(held[0])
    result = run("fit", Path(held[0]).parent, "--out", target, "--steps", "1", "--quiet", "--overwrite",
                 "--calibration-fraction", "0")
    assert result.exit_code == 0, result.output
    assert not (target / "validation.json").exists()  # stale: it belonged to the replaced model
    result = run("validate", target, "--quiet")
    assert_one_line_error(result, "--calibration-fraction")


def test_validate_from_another_folder_and_its_input_checks(dataset, tmp_path, monkeypatch):
    from PIL import Image

    # fit with a relative data path; validate from elsewhere still finds the held-out images
    monkeypatch.chdir(dataset.parent)
    out = tmp_path / "rel"
    result = run("fit", Path(dataset.name) / "grass", "--out", out, "--steps", "1", "--quiet",
                 "--n-components", "2")
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    assert all(Path(p).is_absolute() for p in json.loads((out / "history.json").read_text())["calibration_images"])
    result = run("validate", out, "--quiet")
    assert result.exit_code == 0, result.output
    # held-out images too small for a synthetic defect: one line naming the file and the limit
    small = tmp_path / "small"
    (small / "train" / "good").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(small / "train" / "good" / f"{i}.png")
    result = run("fit", small, "--out", tmp_path / "small_run", "--steps", "1", "--quiet", "--n-components", "2",
                 "--image-size", "64")
    assert result.exit_code == 0, result.output
    result = run("validate", tmp_path / "small_run", "--quiet")
    assert_one_line_error(result, "40x40 px", ">= 48 px")
    # a negative seed names the option
    result = run("validate", out, "--seed", "-1", "--quiet")
    assert result.exit_code == 2 and "--seed" in result.output


def test_keep_aspect_needs_an_image_size(tmp_path):
    result = run("fit", tmp_path, "--out", tmp_path / "r", "--keep-aspect", "--image-size", "0")
    assert_one_line_error(result, "keep_aspect", "image_size")


def test_fit_quiet_prints_nothing_but_records_its_warnings(dataset, tmp_path):
    # 6 training images, 20 % held out: 1 held-out image cannot guarantee the default 0.01
    args = ("fit", dataset / "grass", "--steps", "1", "--n-components", "2")
    quiet = run(*args, "--out", tmp_path / "quiet", "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output == ""  # no Warning: line, no message, no progress bar
    warned = json.loads((tmp_path / "quiet" / "config.json").read_text())["warnings"]
    assert len(warned) == 1
    assert warned[0].startswith("1 held-out normal image(s) cannot guarantee a false-alarm rate of 0.01")
    loud = run(*args, "--out", tmp_path / "loud")
    assert loud.exit_code == 0, loud.output
    assert [w for w in loud.output.splitlines() if w.startswith("Warning:")] == [f"Warning: {warned[0]}"]
    assert json.loads((tmp_path / "loud" / "config.json").read_text())["warnings"] == warned


def test_evaluate_and_predict_quiet_print_nothing_but_record_their_warnings(run_dir, dataset, tmp_path):
    # a truncated test image (left out with --skip-bad-files) and a defective image without a mask
    cat = tmp_path / "grass"
    shutil.copytree(dataset / "grass", cat)
    bad = cat / "test" / "good" / "000.png"
    bad.write_bytes(bad.read_bytes()[:200])
    (cat / "ground_truth" / "spot" / "000_mask.png").unlink()
    rd = tmp_path / "rd"
    shutil.copytree(run_dir, rd)
    args = ("evaluate", rd, "--data", cat, "--skip-bad-files", "--no-overlays", "--overwrite")
    quiet = run(*args, "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""  # no Warning: line, no message, no progress bar
    assert "overall" in quiet.stdout  # the table is still printed
    warned = json.loads((rd / "metrics.json").read_text())["warnings"]
    assert len(warned) == 2
    assert warned[0].startswith("skipped: ") and "000.png" in warned[0] and "cannot read image" in warned[0]
    assert "no mask" in warned[1] and str(Path("spot") / "000.png") in warned[1]
    loud = run(*args)  # without --quiet: printed as before, and recorded the same
    assert loud.exit_code == 0, loud.output
    assert [w for w in loud.stderr.splitlines() if w.startswith("Warning:")] == [f"Warning: {w}" for w in warned]
    assert json.loads((rd / "metrics.json").read_text())["warnings"] == warned

    inputs = tmp_path / "in"
    shutil.copytree(cat / "test" / "good", inputs)  # 000.png truncated, 001.png fine
    out = tmp_path / "pred"
    quiet = run("predict", run_dir, inputs, "--out", out, "--skip-bad-files", "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output == ""
    warned = (out / "warnings.txt").read_text().splitlines()
    assert len(warned) == 2 and warned[0].startswith(f"skipped: {inputs / '000.png'}")
    # run_dir held out 1 image: the default 1 % false-alarm rate is out of reach
    assert warned[1].startswith("1 held-out normal image(s) cannot guarantee a false-alarm rate of 0.01")
    loud = run("predict", run_dir, inputs, "--out", tmp_path / "pred2", "--skip-bad-files")
    assert loud.exit_code == 0, loud.output
    assert [w for w in loud.stderr.splitlines() if w.startswith("Warning:")] == [f"Warning: {w}" for w in warned]
    assert (tmp_path / "pred2" / "warnings.txt").read_text().splitlines() == warned
    # a prediction without warnings (a rate 1 held-out image can guarantee: 1/(1+1)) writes no
    # warnings.txt, and removes an earlier one
    (inputs / "000.png").unlink()
    again = run("predict", run_dir, inputs, "--out", out, "--overwrite", "--quiet", "--fpr", "0.5")
    assert again.exit_code == 0, again.output
    assert not (out / "warnings.txt").exists() and (out / "001_overlay.png").is_file()


def test_an_image_warning_is_shown_and_recorded_once(run_dir, tmp_path):
    """A 16-bit colour PNG warns when the images are checked and again when predict reads
    it: the user sees the line once, and warnings.txt holds it once."""
    from test_data import _write_png_rgb16

    inputs = tmp_path / "in"
    inputs.mkdir()
    arr = np.random.default_rng(0).integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    _write_png_rgb16(inputs / "c16.png", arr)
    result = run("predict", run_dir, inputs, "--out", tmp_path / "pred", "--fpr", "0.5")
    assert result.exit_code == 0, result.output
    shown = [w for w in result.stderr.splitlines() if "16-bit colour image" in w]
    assert len(shown) == 1 and shown[0].startswith(f"Warning: {inputs / 'c16.png'}: 16-bit colour")
    recorded = (tmp_path / "pred" / "warnings.txt").read_text().splitlines()
    assert recorded == [shown[0][len("Warning: "):]]


def test_resume_refusal_names_the_option_that_changed_a_threshold(tmp_path):
    from pedenet.cli.common import UserError
    from pedenet.cli.predict import RESUME_KEYS, _resumable

    saved = {"model_sha256": "ab", "image_threshold": 106.21741612752278, "pixel_threshold": 3.5,
             "format": "npy", "clusters": False}
    assert set(saved) == set(RESUME_KEYS)
    (tmp_path / "predict.json").write_text(json.dumps(saved))
    now = {**saved, "image_threshold": 86.88789876302083}
    with pytest.raises(UserError, match=r"image_threshold \(set by --fpr\) 106\.217 there, "
                       r"86\.8879 now"):
        _resumable(tmp_path, now, [], [], False, 0.003)


def test_interrupted_predict_lists_what_it_wrote_and_resumes(run_dir, dataset, tmp_path,
                                                             monkeypatch):
    """Ctrl-C in the middle of the second image: the first image's outputs stay, listed in
    scores.csv; none of the second's are left; exit code 130 with what to do. --resume then
    predicts the rest, to the same outputs as an uninterrupted run."""
    import pedenet.visualization as vis

    inputs = dataset / "grass" / "test"
    n_images = len(list(inputs.rglob("*.png")))
    assert n_images >= 4
    calls = {"n": 0}
    save_png = vis.save_png

    def interrupted_save_png(path, array):
        calls["n"] += 1
        if calls["n"] == 4:  # image 1: its mask written, then Ctrl-C before its overlay
            raise KeyboardInterrupt
        return save_png(path, array)

    whole = tmp_path / "whole"  # the uninterrupted reference
    assert run("predict", run_dir, inputs, "--out", whole, "--fpr", "0.5", "--quiet").exit_code == 0
    monkeypatch.setattr(vis, "save_png", interrupted_save_png)
    out = tmp_path / "pred"
    result = run("predict", run_dir, inputs, "--out", out, "--fpr", "0.5", "--report", "--quiet")
    assert result.exit_code == 130
    assert f"interrupted after 1 of {n_images} images" in result.output
    assert "rerun the same command with --resume to predict the rest" in result.output
    assert "Traceback" not in result.output
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    first = rows[0]["name"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["scores.csv", "predict.json", f"{first}_map.npy", f"{first}_mask.png",
         f"{first}_overlay.png"])
    monkeypatch.setattr(vis, "save_png", save_png)
    kept = (out / f"{first}_overlay.png").stat().st_mtime_ns
    # other options are refused; the same ones resume
    other = run("predict", run_dir, inputs, "--out", out, "--format", "tiff", "--resume", "--quiet")
    assert other.exit_code == 2 and "format 'npy' there, 'tiff' now" in other.output
    again = run("predict", run_dir, inputs, "--out", out, "--fpr", "0.5", "--report", "--resume")
    assert again.exit_code == 0, again.output
    assert f"resuming: 1 of {n_images} images kept" in again.output
    assert (out / f"{first}_overlay.png").stat().st_mtime_ns == kept  # not predicted again
    assert (out / "scores.csv").read_text() == (whole / "scores.csv").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in whole.iterdir()] + ["report.html"])
    for row in rows:
        np.testing.assert_array_equal(np.load(out / f"{row['name']}_map.npy"),
                                      np.load(whole / f"{row['name']}_map.npy"))
    # interrupted over a full prediction with --overwrite: the earlier files not yet replaced
    # go, as --overwrite asks, and the message says so
    calls["n"] = 0
    monkeypatch.setattr(vis, "save_png", interrupted_save_png)
    result = run("predict", run_dir, inputs, "--out", out, "--fpr", "0.5", "--overwrite", "--quiet")
    assert result.exit_code == 130
    assert f"the {3 * (n_images - 1) + 1} other file(s) of the earlier prediction there were " \
        "removed" in result.output  # their maps, masks and overlays, and report.html
    assert "rerun the same command with --resume in place of --overwrite to predict the rest" in result.output
    assert len(list(out.iterdir())) == 5
    # Ctrl-C while the images are checked: exit code 130 and one line, nothing written
    import pedenet.cli.predict as predict_module

    def interrupted_check(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_module, "_checked", interrupted_check)
    result = run("predict", run_dir, inputs, "--out", tmp_path / "pred2", "--quiet")
    assert result.exit_code == 130 and "interrupted (Ctrl-C)" in result.output
    assert "Aborted" not in result.output and not (tmp_path / "pred2").exists()


def _interrupt_at_image(monkeypatch, n_image: int, exc: BaseException):
    """Make predict's save_png raise ``exc`` at the first PNG of image ``n_image`` (0-based;
    three PNGs per image with thresholds: mask, overlay; and one map file)."""
    import pedenet.visualization as vis

    calls = {"n": 0}
    save_png = vis.save_png

    def failing(path, array):
        calls["n"] += 1
        if calls["n"] == 2 * n_image + 1:
            raise exc
        return save_png(path, array)

    monkeypatch.setattr(vis, "save_png", failing)
    return lambda: monkeypatch.setattr(vis, "save_png", save_png)


def test_resume_checks_what_it_keeps(run_dir, dataset, tmp_path, monkeypatch):
    """--resume keeps only images whose files read back and give the listed score; a line of
    scores.csv that does not parse, a corrupt map or an edited score make that image be
    predicted again (with a warning), and the result still equals an uninterrupted run's."""
    import signal

    from pedenet.cli.common import Terminated

    inputs = dataset / "grass" / "test"
    n_images = len(list(inputs.rglob("*.png")))
    whole = tmp_path / "whole"
    assert run("predict", run_dir, inputs, "--out", whole, "--fpr", "0.5", "--quiet").exit_code == 0
    out = tmp_path / "pred"
    restore = _interrupt_at_image(monkeypatch, 4, Terminated(signal.SIGTERM))
    result = run("predict", run_dir, inputs, "--out", out, "--fpr", "0.5", "--quiet")
    restore()
    assert result.exit_code == 143, result.output  # 128 + SIGTERM, as the shell reports it
    assert f"interrupted by SIGTERM after 4 of {n_images} images" in result.output
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    assert len(rows) == 4
    # without --resume or --overwrite: the refusal points at --resume first
    assert_one_line_error(run("predict", run_dir, inputs, "--out", out, "--quiet"),
                          "holds an earlier prediction", "--resume")
    np.save(out / f"{rows[0]['name']}_map.npy", np.zeros((3,), np.float32))  # not a map
    text = (out / "scores.csv").read_text().splitlines()
    text[2] = text[2].replace(rows[1]["score"], "1.0")  # an edited score
    text[4] = text[4][:10]  # a cut line
    (out / "scores.csv").write_text("\n".join(text) + "\n")
    again = run("predict", run_dir, inputs, "--out", out, "--fpr", "0.5", "--resume")
    assert again.exit_code == 0, again.output
    assert f"resuming: 1 of {n_images} images kept" in again.output
    assert "scores.csv: line(s) 5 do not parse" in again.output
    assert "2 image(s) listed in scores.csv are predicted again" in again.output
    assert (out / "scores.csv").read_text() == (whole / "scores.csv").read_text()
    # all kept: nothing to predict, and it says so; a report written once stays
    done = run("predict", run_dir, inputs, "--out", out, "--fpr", "0.5", "--resume", "--report")
    assert done.exit_code == 0 and f"all {n_images} images were already predicted" in done.output
    assert (out / "scores.csv").read_text() == (whole / "scores.csv").read_text()
    assert run("predict", run_dir, inputs, "--out", out, "--fpr", "0.5", "--resume").exit_code == 0
    assert (out / "report.html").is_file()
    # a scores.csv that is not pedenet's: nothing kept, and a warning says why
    (out / "scores.csv").write_text("a,b,c\n" + "\n".join(text[1:]) + "\n")
    broken = run("predict", run_dir, inputs, "--out", out, "--fpr", "0.5", "--resume")
    assert broken.exit_code == 0, broken.output
    assert "is not a pedenet scores.csv (header)" in broken.output and "all are predicted again" in broken.output
    assert f"resuming: 0 of {n_images} images kept" in broken.output
    assert (out / "scores.csv").read_text() == (whole / "scores.csv").read_text()
    # no predict.json in a folder that is not empty: the advice names --overwrite
    (out / "predict.json").unlink()
    assert_one_line_error(run("predict", run_dir, inputs, "--out", out, "--resume", "--quiet"),
                          "no interrupted prediction to resume", "--overwrite")


def test_resume_matches_paths_not_spellings_and_refuses_renamed_images(run_dir, dataset, tmp_path,
                                                                      monkeypatch):
    """The same images given by another path spelling (relative, from another folder) are
    resumed; images whose output names depend on the input order are refused in another order."""
    folder = tmp_path / "in" / "a"
    folder.mkdir(parents=True)
    src = sorted((dataset / "grass" / "test" / "good").glob("*.png"))[0]
    shutil.copy(src, folder / "x.png")
    Image.open(src).save(folder / "x.tif")  # the same stem in the same folder: x_1, x_2 by order
    shutil.copy(src, folder / "y.png")
    monkeypatch.chdir(tmp_path / "in")
    out = tmp_path / "pred"
    restore = _interrupt_at_image(monkeypatch, 2, KeyboardInterrupt())
    result = run("predict", run_dir, "a/x.png", "a/x.tif", "a/y.png", "--out", out, "--fpr", "0.5",
                 "--quiet")
    restore()
    assert result.exit_code == 130, result.output
    monkeypatch.chdir(tmp_path)
    swapped = run("predict", run_dir, folder / "x.tif", folder / "x.png", folder / "y.png", "--out",
                  out, "--fpr", "0.5", "--resume")
    assert_one_line_error(swapped, "other output names", "'x_1' there, 'x_2' now", "same order")
    again = run("predict", run_dir, folder / "x.png", folder / "x.tif", folder / "y.png", "--out",
                out, "--fpr", "0.5", "--resume")
    assert again.exit_code == 0, again.output
    assert "resuming: 2 of 3 images kept" in again.output
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    assert [r["path"] for r in rows] == [str(folder / n) for n in ("x.png", "x.tif", "y.png")]
    assert [r["name"] for r in rows] == ["x_1", "x_2", "y"]


def test_predict_saves_scores_while_it_runs(run_dir, dataset, tmp_path, monkeypatch):
    """scores.csv is rewritten during the run (every SAVE_EVERY_S), so a crash or kill -9
    that gives predict no chance to save still leaves the finished images to --resume."""
    import pedenet.cli.predict as predict_module

    monkeypatch.setattr(predict_module, "SAVE_EVERY_S", 0.0)
    inputs = dataset / "grass" / "test"
    out = tmp_path / "pred"
    restore = _interrupt_at_image(monkeypatch, 3, RuntimeError("crash"))
    result = run("predict", run_dir, inputs, "--out", out, "--fpr", "0.5", "--quiet")
    restore()
    assert isinstance(result.exception, RuntimeError)  # not handled: as if killed
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    assert len(rows) == 3
    again = run("predict", run_dir, inputs, "--out", out, "--fpr", "0.5", "--resume")
    assert again.exit_code == 0 and "resuming: 3 of" in again.output, again.output


def test_termination_signals_interrupt_like_ctrl_c():
    import os
    import signal

    from pedenet.cli.common import Terminated, _interrupt_exit_code, _termination_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info:
        with _termination_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            import time
            time.sleep(5)  # the handler raises before this ends
    assert info.value.signum == signal.SIGTERM and _interrupt_exit_code(info.value) == 143
    assert isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before  # put back
    assert _interrupt_exit_code(KeyboardInterrupt()) == 130
    if hasattr(signal, "SIGHUP"):  # under nohup, a closed terminal must not stop the command
        old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            with _termination_as_interrupt():
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
                os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing raised
        finally:
            signal.signal(signal.SIGHUP, old)


def test_validate_skip_bad_files_and_defect_kinds(dataset, tmp_path):
    import pedenet
    from pedenet.validation import validate

    cat = tmp_path / "grass"
    shutil.copytree(dataset / "grass", cat)
    out = tmp_path / "run"
    result = run("fit", cat, "--out", out, "--steps", "1", "--n-components", "2", "--quiet",
                 "--calibration-fraction", "0.5")
    assert result.exit_code == 0, result.output
    held = json.loads((out / "history.json").read_text())["calibration_images"]
    assert len(held) == 3
    corrupt, deleted, good = (Path(h) for h in held)
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated PNG
    result = run("validate", out, "--quiet")
    assert_one_line_error(result, str(corrupt), "cannot read image", "--skip-bad-files")
    deleted.unlink()  # removing a bad file does not help: the held-out set is fixed at fit time
    result = run("validate", out, "--quiet")
    assert_one_line_error(result, str(deleted), "not found", "1 of 3 missing", "moved or deleted",
                          "--skip-bad-files")
    assert not (out / "validation.json").exists()
    result = run("validate", out, "--skip-bad-files")
    assert result.exit_code == 0, result.output
    warned = [w for w in result.output.splitlines() if w.startswith("Warning: skipped: ")]
    assert len(warned) == 2
    assert any(str(deleted) in w and "not found" in w for w in warned)
    assert any(str(corrupt) in w and "cannot read image" in w for w in warned)
    v = json.loads((out / "validation.json").read_text())
    assert sorted(v["skipped_files"]) == sorted([str(corrupt), str(deleted)])
    printed = [w for w in result.output.splitlines() if w.startswith("Warning: ")]
    assert printed[:2] == warned and len(printed) == 3  # and: 1 image is too few to validate on
    assert printed[2].startswith("Warning: validation on only 1 held-out normal image(s)")
    assert ["Warning: " + w for w in v["warnings"]] == printed  # recorded as printed
    # --quiet: the same result and warnings in validation.json, nothing printed but the result
    result = run("validate", out, "--quiet", "--skip-bad-files", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output and result.stderr == ""
    quiet = json.loads((out / "validation.json").read_text())
    assert quiet["warnings"] == v["warnings"] and quiet["image_auroc"] == v["image_auroc"]
    assert v["n_images"] == 2 and v["defect_kinds"] == {"scratch": 1, "spot": 0, "patch": 0}
    direct = validate(pedenet.load(out / "model.pt"), [good], seed=0)  # the one usable image
    for key in ("image_auroc", "pixel_auroc", "au_pro_0.3", "n_images", "defect_kinds"):
        assert v[key] == direct[key]
    # the summary names the one kind drawn, in the singular
    assert "(1 held-out normal image + 1 synthetic-defect copy: scratch; seed 0)" in result.stdout


def test_validate_finds_moved_data_with_data_option(dataset, tmp_path, monkeypatch):
    root = tmp_path / "old"
    shutil.copytree(dataset / "grass", root / "grass")
    out = tmp_path / "run"
    result = run("fit", root, "--category", "grass", "--out", out, "--steps", "1",
                 "--n-components", "2", "--quiet", "--calibration-fraction", "0.5")
    assert result.exit_code == 0, result.output
    assert run("validate", out, "--quiet").exit_code == 0
    before = json.loads((out / "validation.json").read_text())
    moved = tmp_path / "new place"
    root.rename(moved)
    assert_one_line_error(run("validate", out, "--quiet", "--overwrite"), "not found",
                          "moved or deleted", "--data")
    for data in (moved / "grass", moved):  # the category folder, or the dataset root
        result = run("validate", out, "--quiet", "--overwrite", "--data", data)
        assert result.exit_code == 0, result.output
        after = json.loads((out / "validation.json").read_text())
        for key in ("image_auroc", "pixel_auroc", "au_pro_0.3", "n_images", "defect_kinds"):
            assert after[key] == before[key]
    assert_one_line_error(run("validate", out, "--overwrite", "--data", tmp_path / "nowhere"),
                          "nowhere", "does not exist")
    a_file = next((moved / "grass" / "train" / "good").iterdir())
    assert_one_line_error(run("validate", out, "--overwrite", "--data", a_file), a_file.name,
                          "not a folder")
    # a folder inside the category (its train/good): says which folder to pass instead
    result = run("validate", out, "--overwrite", "--data", moved / "grass" / "train" / "good")
    assert_one_line_error(result, "none of the held-out images is under it",
                          f"pass --data {(moved / 'grass').resolve()} (")
    assert result.exit_code == 2
    monkeypatch.chdir(moved / "grass" / "train")  # the same, given as a relative path
    result = run("validate", out, "--overwrite", "--data", "good")
    assert_one_line_error(result, f"pass --data {(moved / 'grass').resolve()} (")
    # fitted on the category folder itself (no --category), then moved into a dataset root
    monkeypatch.chdir(tmp_path)
    result = run("fit", moved / "grass", "--out", tmp_path / "run2", "--steps", "1",
                 "--n-components", "2", "--quiet", "--calibration-fraction", "0.5")
    assert result.exit_code == 0, result.output
    (moved / "grass").rename(tmp_path / "grass")
    root2 = tmp_path / "root2"
    root2.mkdir()
    (tmp_path / "grass").rename(root2 / "grass")
    for data in (root2, "root2"):  # the dataset root, absolute or relative
        result = run("validate", tmp_path / "run2", "--quiet", "--overwrite", "--data", data)
        assert result.exit_code == 0, result.output
    # a --data that holds none of them: says so, not "run validate from the folder fit ran in"
    (tmp_path / "empty").mkdir()
    result = run("validate", tmp_path / "run2", "--overwrite", "--data", "empty")
    assert_one_line_error(result, "held-out image not found", "not under --data empty",
                          "pass the category folder `fit` read")


def test_console_script_start_is_light_and_an_interrupted_start_is_one_line(monkeypatch, capsys):
    import subprocess
    import sys
    import types

    from pedenet import console

    code = ("import sys, pedenet; assert 'torch' not in sys.modules, 'import pedenet loaded torch'; "
            "pedenet.PEDENet; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    done = subprocess.run([sys.executable, "-m", "pedenet.console", "--version"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"pedenet, version {__version__}"

    class Interrupted(types.ModuleType):  # a Ctrl-C that lands while the CLI (torch) loads
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "pedenet.cli", Interrupted("pedenet.cli"))
    assert console.main() == 130
    err = capsys.readouterr().err
    assert err == "Interrupted while starting; nothing was done.\n"


def test_python_dash_m_pedenet_is_the_command_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pedenet", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Usage: python -m pedenet" in r.stdout and "fit" in r.stdout and "predict" in r.stdout


def test_package_versions_name_the_installed_ones(monkeypatch):
    import platform

    import scipy

    from pedenet import environment

    v = environment.package_versions()
    assert v["python"] == platform.python_version() and v["scipy"] == scipy.__version__
    assert set(v) == {"python", *environment.PACKAGES}
    monkeypatch.setattr(environment, "PACKAGES", ("numpy", "no-such-distribution-xyz"))
    assert environment.package_versions()["no-such-distribution-xyz"] is None


def test_an_empty_path_is_refused_not_read_as_the_current_folder(run_dir, tmp_path, monkeypatch):
    """An unset shell variable ("$DIR") passes an empty string: every path argument and
    option refuses it (exit code 2) instead of reading or writing the current folder."""
    monkeypatch.chdir(tmp_path)
    commands = [("fit", "", "--out", "r"), ("fit", run_dir, "--out", ""),
                ("predict", run_dir, "", "--out", "p"), ("predict", run_dir, ".", "--out", " "),
                ("predict", "", ".", "--out", "p"), ("evaluate", run_dir, "--data", ""),
                ("validate", run_dir, "--data", ""), ("export", run_dir, "--out", ""),
                ("rescore", run_dir, "--scoring", "distance", "--out", "")]
    for args in commands:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "is empty (an unset shell variable?)" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written here


def test_evaluate_interrupted_while_drawing_overlays_says_the_metrics_are_kept(run_dir, tmp_path,
                                                                               monkeypatch):
    import pedenet.visualization as vis

    target = tmp_path / "run"
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("metrics.json", "overlays", "report.html"))
    save_png, calls = vis.save_png, {"n": 0}

    def interrupted_save_png(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return save_png(*args, **kwargs)

    monkeypatch.setattr(vis, "save_png", interrupted_save_png)
    result = run("evaluate", target, "--report", "--quiet")
    assert result.exit_code == 130
    m = json.loads((target / "metrics.json").read_text())  # complete: every test image
    o = m["overall"]
    assert_one_line_error(result, "interrupted while writing the overlays; the metrics are complete in "
                          f"{target / 'metrics.json'} (image AUROC {o['image_auroc']:.3f}, pixel AUROC "
                          f"{o['pixel_auroc']:.3f}", "the overlays not: rerun with --overwrite")
    assert len(list((target / "overlays").rglob("*.png"))) == 1 and not (target / "report.html").exists()
    monkeypatch.setattr(vis, "save_png", save_png)
    result = run("evaluate", target, "--report", "--quiet", "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(list((target / "overlays").rglob("*.png"))) == m["n_images"]
    # without overlays, interrupted in the report: that stage is named
    import pedenet.report

    def interrupted_report(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pedenet.report, "write_evaluation_report", interrupted_report)
    result = run("evaluate", target, "--report", "--no-overlays", "--quiet", "--overwrite")
    assert result.exit_code == 130
    assert_one_line_error(result, "interrupted while writing the report; the metrics are complete",
                          "the report not: rerun with --overwrite")
    assert not (target / "report.html").exists() and (target / "metrics.json").is_file()


def test_a_run_record_of_the_wrong_shape_and_impossible_settings_are_one_line_errors(run_dir, dataset,
                                                                                   tmp_path):
    """Also: predict --out RUN_DIR is refused (it would replace the evaluation's report)."""
    from pedenet import PEDENet

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    for record in ("[1, 2]", json.dumps({"data": 5}), json.dumps({"category_dir": ["x"]})):
        (damaged / "config.json").write_text(record)
        for verb in (["evaluate", damaged, "--overwrite"], ["validate", damaged, "--data", dataset]):
            assert_one_line_error(run(*verb), "not a pedenet run record as `fit` writes it")
    r = run("predict", damaged, dataset / "grass" / "test" / "good", "--out", damaged, "--overwrite")
    assert r.exit_code == 2 and "is RUN_DIR; its report.html and overlays/ are the evaluation's" in r.output
    r = run("fit", dataset, "--category", "grass", "--out", tmp_path / "d", "--embedding-dim", "700")
    assert_one_line_error(r, "embedding_dim 700 is more than the 664 feature channels",
                          "use embedding_dim <= 664")
    assert not (tmp_path / "d").exists()
    r = run("fit", dataset, "--category", "grass", "--out", tmp_path / "s", "--seed", 2**32)
    assert r.exit_code == 2 and "0<=x<=4294967295" in r.output
    with pytest.raises(ValueError, match="seed must be in 0-4294967295"):
        PEDENet(seed=2**32)
