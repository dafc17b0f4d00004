"""Bad input, interruptions and untrusted files: clear errors, nothing lost (docs/conventions.md).

Every case gets the right result or a one-line ``Error:`` naming the file - never a traceback,
never lost work, never code run from a model file. Small data, a few training steps, and a
shortened EM initialization keep the module fast.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import pickle
import shutil
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from PIL import Image

import pedenet
import pedenet.estimator as estimator
import pedenet.training as training
from pedenet.builtin import make_builtin_dataset
from pedenet.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from pedenet.cli import main
from pedenet.data import DataError, load_image
from pedenet.evaluation import evaluate
from pedenet.scoring import image_score

FIT = ("--image-size", "64", "--steps", "3", "--seed", "1", "--quiet")


@pytest.fixture(scope="module", autouse=True)
def _fast():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    # EM initialization on fewer samples: same code path, a fraction of the time
    mp.setattr(estimator, "init_membership",
               functools.partial(training.init_membership, n_samples=3000, steps=30))
    yield
    mp.undo()
    torch.set_num_threads(n)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True,
                              terminal_width=200)


def ok(result):
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def one_line_error(result, *fragments, code=None):
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for f in fragments:
        assert str(f) in errors[0], (f, errors[0])
    return errors[0]


def warnings_of(result):
    return [line for line in result.output.splitlines() if line.startswith("Warning:")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = make_builtin_dataset(tmp_path_factory.mktemp("rob") / "ds", categories=("grass",),
                                n_train=4, n_test_good=2, n_test_defect=1, size=64)
    return root / "grass"


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "grass"
    ok(run("fit", dataset, "--out", out, *FIT))
    return out


def copy_category(dataset: Path, dst: Path) -> Path:
    shutil.copytree(dataset, dst)
    return dst


def truncated_png(path: Path) -> Path:
    buf = path.parent / (path.name + ".full.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buf)
    path.write_bytes(buf.read_bytes()[:300])
    buf.unlink()
    return path


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


# --------------------------------------------------------------------------- 1. corrupt files


def test_corrupt_training_images_refused_up_front_or_skipped(dataset, tmp_path):
    cat = copy_category(dataset, tmp_path / "cat")
    bad1 = truncated_png(cat / "train" / "good" / "100_truncated.png")
    bad2 = cat / "train" / "good" / "101_corrupt.jpg"
    bad2.write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    out = tmp_path / "run"
    err = one_line_error(run("fit", cat, "--out", out, *FIT), bad1, "1 more", bad2.name,
                         "--skip-bad-files")
    assert "cannot read image" in err
    assert not out.exists()  # refused before any work: nothing written
    result = ok(run("fit", cat, "--out", out, "--skip-bad-files", *FIT[:-1]))  # not --quiet
    warned = warnings_of(result)
    assert any(str(bad1) in w and "skipped" in w for w in warned)
    assert any(str(bad2) in w for w in warned)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_normal_images"] == 4 == cfg["n_train_images"] + cfg["n_calibration_images"]
    assert cfg["n_calibration_images"] == 1 and sorted(cfg["skipped_files"]) == sorted([str(bad1), str(bad2)])
    assert [f"Warning: {w}" for w in cfg["warnings"]] == warned  # --quiet prints none, keeps these


def test_corrupt_test_image_and_mask_in_evaluate(run_dir, dataset, tmp_path):
    cat = copy_category(dataset, tmp_path / "cat")
    bad = truncated_png(cat / "test" / "good" / "100.png")
    mask = cat / "ground_truth" / "spot" / "000_mask.png"
    mask.write_bytes(b"not a png")
    rd = tmp_path / "rd"
    shutil.copytree(run_dir, rd)
    one_line_error(run("evaluate", rd, "--data", cat, "--quiet"), bad, "1 more", "--skip-bad-files")
    assert not (rd / "metrics.json").exists()
    result = ok(run("evaluate", rd, "--data", cat, "--skip-bad-files", "--quiet"))
    assert warnings_of(result) == []  # --quiet prints none: metrics.json records them
    m = json.loads((rd / "metrics.json").read_text())
    assert len(m["warnings"]) == 2 and all(w.startswith("skipped: ") for w in m["warnings"])
    assert sorted(m["skipped_files"]) == sorted(
        [str(bad.resolve()), str((cat / "test" / "spot" / "000.png").resolve())])
    assert m["n_images"] == 2 + 3 + 1 - 2


def test_corrupt_image_in_predict(run_dir, dataset, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(dataset / "test" / "good", inputs)
    bad = inputs / "zz.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    one_line_error(run("predict", run_dir, inputs, "--out", tmp_path / "o", "--quiet"), bad,
                   "--skip-bad-files")
    assert not (tmp_path / "o").exists()
    ok(run("predict", run_dir, inputs, "--out", tmp_path / "o", "--skip-bad-files", "--quiet"))
    with open(tmp_path / "o" / "scores.csv", newline="") as fh:
        assert [Path(r["path"]).name for r in csv.DictReader(fh)] == ["000.png", "001.png"]


# --------------------------------------------------------------------------- 2. non-image files


def test_non_image_files_are_ignored(run_dir, dataset, tmp_path):
    cat = copy_category(dataset, tmp_path / "cat")
    junk_dirs = [cat / "train" / "good", cat / "test" / "good", cat / "test" / "spot",
                 cat / "ground_truth" / "spot", cat / "test", cat]
    for d in junk_dirs:
        (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (d / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        (d / "notes.txt").write_text("scanned on monday")
        (d / "._000.png").write_bytes(b"\0\5\26\7")  # macOS resource fork
    (cat / "train" / "good" / "sub").mkdir()
    Image.new("L", (64, 64)).save(cat / "train" / "good" / "sub" / "nested.png")
    (cat / "test" / ".hidden").mkdir()
    out = tmp_path / "run"
    ok(run("fit", cat, "--out", out, *FIT))
    assert json.loads((out / "config.json").read_text())["n_normal_images"] == 4
    ok(run("evaluate", out, "--quiet", "--no-overlays"))
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 5
    ok(run("predict", out, cat / "test" / "spot", "--out", tmp_path / "o", "--quiet"))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [  # warnings.txt: 1 held-out
        "000_map.npy", "000_mask.png", "000_overlay.png", "predict.json", "scores.csv",
        "warnings.txt"]  # image


# --------------------------------------------------------------------------- 3. image modes


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _mode_files(folder: Path) -> dict[str, np.ndarray]:
    """Write one image per mode; return name -> the array the documented rule must give."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _texture(48, 64, 0)  # H 48, W 64
    gray = rgb.mean(2).astype(np.uint8)
    expect = {}
    Image.fromarray(gray, "L").save(folder / "gray.png")
    expect["gray.png"] = np.repeat(gray[:, :, None] / 255.0, 3, 2)
    Image.fromarray(rgb).save(folder / "rgb.png")
    expect["rgb.png"] = rgb / 255.0
    alpha = np.random.default_rng(1).integers(0, 256, (48, 64, 1)).astype(np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA").save(folder / "rgba.png")
    expect["rgba.png"] = rgb / 255.0  # alpha dropped, colours as they are
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(folder / "pal.png")
    expect["pal.png"] = np.asarray(pal.convert("RGB")) / 255.0
    g16 = (gray.astype(np.uint16) * 257 + 100).astype(np.uint16)
    Image.fromarray(g16).save(folder / "g16.png")
    expect["g16.png"] = np.repeat(g16[:, :, None] / 65535.0, 3, 2)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    with Image.open(folder / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        expect["cmyk.jpg"] = np.asarray(im.convert("RGB")) / 255.0
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 wide x 48 high, displayed rotated 90 degrees clockwise
    Image.fromarray(rgb).save(folder / "rot.jpg", exif=exif, quality=95)
    with Image.open(folder / "rot.jpg") as im:
        stored = np.asarray(im.convert("RGB"))
    expect["rot.jpg"] = np.rot90(stored, k=-1) / 255.0  # H 64, W 48
    return expect


def test_image_modes_one_conversion_at_fit_evaluate_predict(tmp_path):
    cat = tmp_path / "modes"
    expect = _mode_files(cat / "train" / "good")
    for name, arr in expect.items():
        np.testing.assert_allclose(load_image(cat / "train" / "good" / name), arr, atol=1e-6)
    # test split: a defective EXIF-rotated JPEG whose mask is drawn in the displayed orientation
    (cat / "test" / "good").mkdir(parents=True)
    (cat / "test" / "crack").mkdir()
    (cat / "ground_truth" / "crack").mkdir(parents=True)
    for name in ("rgba.png", "g16.png", "cmyk.jpg"):
        shutil.copy(cat / "train" / "good" / name, cat / "test" / "good" / name)
    shutil.copy(cat / "train" / "good" / "rot.jpg", cat / "test" / "crack" / "rot.jpg")
    mask = np.zeros((64, 48), np.uint8)
    mask[5:20, 30:45] = 255
    Image.fromarray(mask).save(cat / "ground_truth" / "crack" / "rot_mask.png")

    out = tmp_path / "run"
    ok(run("fit", cat, "--out", out, "--image-size", "64", "--steps", "2", "--quiet"))
    model = pedenet.load(out / "model.pt")
    pred = tmp_path / "pred"
    ok(run("predict", out, cat / "train" / "good", cat / "test", "--out", pred, "--quiet"))
    with open(pred / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_path = {r["path"]: r for r in rows}
    for name, arr in expect.items():
        row = by_path[str(cat / "train" / "good" / name)]
        got = np.load(pred / f"{row['name']}_map.npy")
        want = model.anomaly_map(arr.astype(np.float32))
        assert got.shape == arr.shape[:2], name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3, err_msg=name)
    # evaluate scores the same files the same way; the rotated mask follows its image
    ok(run("evaluate", out, "--quiet"))
    metrics = json.loads((out / "metrics.json").read_text())
    for entry in metrics["images"]:
        src = str(cat / "test" / entry["defect"] / Path(entry["path"]).name)
        assert entry["score"] == pytest.approx(float(by_path[src]["score"]), rel=1e-6, abs=1e-4)
    assert metrics["n_pixel_images"] == 4 and metrics["overall"]["pixel_auroc"] is not None
    with Image.open(out / "overlays" / "crack" / "rot.png") as im:
        assert im.size == (48, 64)
    # a mask stored in the image's stored (unrotated) orientation is refused, naming both files
    Image.fromarray(np.ascontiguousarray(np.rot90(mask))).save(cat / "ground_truth" / "crack" / "rot_mask.png")
    one_line_error(run("evaluate", out, "--overwrite", "--quiet"), "rot_mask.png",
                   cat / "test" / "crack" / "rot.jpg", "(64, 48)", "(48, 64)")


# --------------------------------------------------------------------------- 4. small images


def test_images_smaller_than_the_patch(run_dir, dataset, tmp_path):
    cat = copy_category(dataset, tmp_path / "cat")
    for p in (cat / "train" / "good").glob("*.png"):  # native size, 40 x 40
        with Image.open(p) as im:
            im.crop((0, 0, 40, 40)).save(p)
    tiny = cat / "train" / "good" / "tiny.png"
    Image.new("L", (20, 24), 90).save(tiny)
    native = ("--image-size", "0", "--steps", "2", "--quiet")
    out = tmp_path / "native"
    err = one_line_error(run("fit", cat, "--out", out, *native), tiny, "20x24", "32 px patch size")
    assert "--image-size" in err
    ok(run("fit", cat, "--out", out, "--skip-bad-files", *native))
    one_line_error(run("predict", out, tiny, "--out", tmp_path / "o1", "--quiet"), tiny, "patch size")
    model = pedenet.load(out / "model.pt")
    with pytest.raises(DataError, match="smaller than the 32 px patch size"):
        model.anomaly_map(np.zeros((20, 24, 3), np.float32))
    assert model.anomaly_map(np.zeros((33, 40, 3), np.float32)).shape == (33, 40)
    # with resizing (the default) any size works: the image is resized to --image-size
    ok(run("predict", run_dir, tiny, "--out", tmp_path / "o2", "--quiet"))
    amap = np.load(tmp_path / "o2" / "tiny_map.npy")
    assert amap.shape == (24, 20) and np.isfinite(amap).all()


# --------------------------------------------------------------------------- 5. masks


def test_missing_mask_gives_image_level_metrics_with_warning(run_dir, dataset, tmp_path):
    cat = copy_category(dataset, tmp_path / "cat")
    (cat / "ground_truth" / "spot" / "000_mask.png").unlink()
    rd = tmp_path / "rd"
    shutil.copytree(run_dir, rd)
    result = ok(run("evaluate", rd, "--data", cat, "--quiet", "--no-overlays"))
    assert warnings_of(result) == []  # --quiet prints none: metrics.json records them
    m = json.loads((rd / "metrics.json").read_text())
    assert any("000.png" in w and "no mask" in w for w in m["warnings"])
    assert m["n_images"] == 5 and m["n_pixel_images"] == 4
    assert m["per_defect"]["spot"]["pixel_auroc"] is None and m["per_defect"]["spot"]["image_auroc"] is not None
    assert "n/a" in result.stdout


def test_mask_encodings_binarize_the_same(run_dir, dataset, tmp_path):
    model = pedenet.load(run_dir / "model.pt")
    rng = np.random.default_rng(0)
    results = {}
    for kind in ("0-255", "0-1", "soft"):
        cat = copy_category(dataset, tmp_path / kind)
        for mp in (cat / "ground_truth").rglob("*_mask.png"):
            with Image.open(mp) as im:
                binary = np.asarray(im) >= 128
            if kind == "0-1":
                arr = binary.astype(np.uint8)
            elif kind == "soft":  # >= 128 inside, < 128 outside
                arr = np.where(binary, rng.integers(128, 256, binary.shape),
                               rng.integers(0, 128, binary.shape)).astype(np.uint8)
            else:
                arr = binary.astype(np.uint8) * 255
            Image.fromarray(arr).save(mp)
        results[kind] = evaluate(model, cat, progress=False)
    for kind in ("0-1", "soft"):
        assert results[kind]["overall"] == results["0-255"]["overall"], kind
        assert results[kind]["per_defect"] == results["0-255"]["per_defect"], kind


# --------------------------------------------------------------------------- 6. tiny splits


def test_empty_and_single_image_training_sets(dataset, tmp_path):
    cat = copy_category(dataset, tmp_path / "cat")
    for p in (cat / "train" / "good").glob("*.png"):
        p.unlink()
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    one_line_error(run("fit", cat, "--out", tmp_path / "r0", *FIT), cat / "train" / "good",
                   "no image files")
    # one image works: 64 px at stride 8 gives 64 patch embeddings for the default K = 40 components
    shutil.copy(dataset / "train" / "good" / "000.png", cat / "train" / "good" / "000.png")
    out = tmp_path / "r1"
    ok(run("fit", cat, "--out", out, *FIT))
    model = pedenet.load(out / "model.pt")
    pred = model.predict(sorted((cat / "test").rglob("*.png")))
    maps, scores = pred.maps, pred.scores
    assert all(np.isfinite(m).all() for m in maps) and np.isfinite(scores).all()
    # one 256 x 256 image: 1024 patch embeddings for the default K = 40 components
    one = pedenet.PEDENet(steps=2, seed=0).fit([dataset / "train" / "good" / "000.png"], progress=False)
    assert np.isfinite(one.anomaly_map(dataset / "test" / "spot" / "000.png")).all()
    # too few patches for the components: a clear message, not an EM failure
    one_line_error(run("fit", cat, "--out", tmp_path / "r2", "--image-size", "32", "--n-components",
                       "20", "--steps", "1", "--quiet"), "16 patch embeddings", "--n-components")


@pytest.mark.parametrize("keep", ["good", "defects"])
def test_test_split_with_one_class_reports_na(run_dir, dataset, tmp_path, keep):
    cat = copy_category(dataset, tmp_path / "cat")
    for d in (cat / "test").iterdir():
        if (d.name == "good") != (keep == "good"):
            shutil.rmtree(d)
    rd = tmp_path / "rd"
    shutil.copytree(run_dir, rd)
    result = ok(run("evaluate", rd, "--data", cat, "--quiet"))
    overall = next(line for line in result.stdout.splitlines() if line.startswith("overall"))
    assert "n/a" in overall
    m = json.loads((rd / "metrics.json").read_text())
    assert m["overall"]["image_auroc"] is None  # needs both classes
    if keep == "good":  # no anomalous image or pixel: F1 and the pixel metrics are undefined too
        assert m["overall"]["image_f1_max"] is None and m["overall"]["pixel_auroc"] is None
    assert m["undefined_metrics"]


def test_damaged_run_record_blocks_only_what_needs_it(run_dir, dataset, tmp_path):
    # evaluate --data CATEGORY needs nothing from config.json; without --data it does, and a
    # dataset root that holds several categories gets the data's own message
    rd = tmp_path / "rd"
    shutil.copytree(run_dir, rd)
    (rd / "config.json").write_text('{"category_dir": ')
    ok(run("evaluate", rd, "--data", dataset, "--quiet", "--no-overlays"))
    assert json.loads((rd / "metrics.json").read_text())["overall"]["image_auroc"] is not None
    one_line_error(run("evaluate", rd, "--quiet", "--overwrite"), rd / "config.json",
                   "cannot read", "restore it, or refit")
    root = tmp_path / "root"
    for name in ("a", "b"):
        shutil.copytree(dataset, root / name)
    one_line_error(run("evaluate", rd, "--data", root, "--quiet", "--overwrite"),
                   "is a dataset root", "a, b")
    ok(run("evaluate", rd, "--data", root, "--category", "b", "--quiet", "--overwrite",
           "--no-overlays"))


# --------------------------------------------------------------------------- 7. huge images


def test_huge_images_refused_with_pillow_guard(run_dir, dataset, tmp_path, monkeypatch):
    img = dataset / "test" / "good" / "000.png"  # 64 x 64 = 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # bomb limit 2000 < 4096
    one_line_error(run("predict", run_dir, img, "--out", tmp_path / "o", "--quiet"), img,
                   "too large")
    one_line_error(run("fit", dataset, "--out", tmp_path / "r", *FIT), "too large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 3000 < 4096 <= 6000: read, with a warning
    result = ok(run("predict", run_dir, img, "--out", tmp_path / "o2", "--quiet"))
    assert warnings_of(result) == []  # --quiet prints none: OUT/warnings.txt records them
    warned = (tmp_path / "o2" / "warnings.txt").read_text().splitlines()
    assert any(str(img) in w and "very large image" in w for w in warned)


def test_decompression_bomb_guard_is_on():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 2 ** 28


# --------------------------------------------------------------------------- 8. paths, read-only data


def test_unicode_paths_and_read_only_dataset(dataset, tmp_path):
    root = tmp_path / "my data é 数据"
    cat = copy_category(dataset, root / "cät égory 1")
    before = tree(root)
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        out = tmp_path / "runs ü" / "run 1"
        ok(run("fit", root, "--category", cat.name, "--out", out, *FIT))
        result = ok(run("evaluate", out))
        assert "overall" in result.stdout
        pred = tmp_path / "prédictions ø"
        ok(run("predict", out, cat / "test" / "spot", "--out", pred, "--quiet"))
        with open(pred / "scores.csv", newline="", encoding="utf-8") as fh:
            assert next(csv.DictReader(fh))["path"] == str(cat / "test" / "spot" / "000.png")
        assert (out / "overlays" / "spot" / "000.png").is_file()
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert tree(root) == before  # nothing written into the data folder


# --------------------------------------------------------------------------- 9. resume


class Interrupt:
    """Interrupt training at its k-th step: a real signal (handled after the step) or a raw
    KeyboardInterrupt in the middle of the step."""

    def __init__(self, k, how):
        self.k, self.how, self.calls = k, how, 0
        self.orig = training._embed_many

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            if self.how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), self.how)
        return self.orig(*args, **kwargs)


def _same_model(a: Path, b: Path):
    ma, mb = pedenet.load(a / "model.pt"), pedenet.load(b / "model.pt")
    sa, sb = ma.network.state_dict(), mb.network.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7, msg=k)
    assert ma.normal_quantiles == pytest.approx(mb.normal_quantiles, rel=1e-6)
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (a, b))
    assert ha["energy"] == pytest.approx(hb["energy"], rel=1e-6) and ha["step"] == hb["step"]
    assert ha["de_init"] == hb["de_init"]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "full"
    ok(run("fit", dataset, "--out", out, "--image-size", "64", "--steps", "6", "--checkpoint-every",
           "2", "--seed", "4", "--quiet"))
    return out


@pytest.mark.parametrize("k,how,code,saved_step", [
    (3, signal.SIGINT, 130, 3),     # Ctrl-C during step 3: step 3 is finished and saved
    (4, signal.SIGTERM, 143, 4),    # SIGTERM likewise
    (5, "raise", 130, 4),           # a raw KeyboardInterrupt mid-step: the periodic save of step 4
])
def test_interrupted_fit_resumes_to_the_same_result(dataset, uninterrupted, tmp_path, monkeypatch,
                                                    k, how, code, saved_step):
    from pedenet.resume import resume_step

    args = ("--image-size", "64", "--steps", "6", "--checkpoint-every", "2", "--seed", "4", "--quiet")
    out = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in the background (nohup, CI)
    monkeypatch.setattr(training, "_embed_many", Interrupt(k, how))
    one_line_error(run("fit", dataset, "--out", out, *args), "resume.pt", "--resume", code=code)
    monkeypatch.undo()
    assert not (out / "model.pt").exists() and resume_step(out / "resume.pt") == saved_step
    assert signal.getsignal(signal.SIGINT) == handler_before  # handlers restored
    # a plain rerun does not silently start over
    one_line_error(run("fit", dataset, "--out", out, *args), "resume.pt", "--resume", code=2)
    # commands that need the model say the fit was interrupted and how to finish it
    one_line_error(run("evaluate", out), "interrupted", f"at step {saved_step}", "--resume", code=1)
    # other settings: refused before a resumed fit is announced, the saved state is kept
    other = run("fit", dataset, "--out", out, "--image-size", "64", "--steps", "7",
                "--checkpoint-every", "2", "--seed", "4", "--resume")
    one_line_error(other, "steps", code=2)  # a --resume that does not match: a usage error
    assert "(resuming)" not in other.output and "fitting" not in other.output
    assert resume_step(out / "resume.pt") == saved_step
    calls = []
    monkeypatch.setattr(estimator, "init_membership", lambda *a, **kw: calls.append(1))
    ok(run("fit", dataset, "--out", out, *args, "--resume"))
    assert calls == []  # the EM initialization is not redone on resume
    assert not (out / "resume.pt").exists()
    assert json.loads((out / "history.json").read_text())["resumed_from_step"] == saved_step
    _same_model(uninterrupted, out)


def test_resume_file_problems(dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "resume.pt").write_bytes(b"half-written garbage")
    one_line_error(run("fit", dataset, "--out", out, *FIT, "--resume"), out / "resume.pt",
                   "not a pedenet checkpoint", "not a PyTorch file", "--overwrite", code=1)
    # --resume without a resume file starts from step 0
    out2 = tmp_path / "run2"
    result = ok(run("fit", dataset, "--out", out2, "--image-size", "64", "--steps", "3", "--resume"))
    assert "no " in result.output and "starting from step 0" in result.output
    # killed while writing the first checkpoint: only a temporary file; --resume starts over
    out3 = tmp_path / "run3"
    out3.mkdir()
    (out3 / ".resume.pt.x1y2.tmp").write_bytes(b"partial")
    one_line_error(run("fit", dataset, "--out", out3, *FIT), "incomplete run", "--overwrite", code=2)
    ok(run("fit", dataset, "--out", out3, *FIT, "--resume"))
    # the Python API deletes its checkpoint after a successful fit (unless keep_checkpoint)
    ck = tmp_path / "api" / "state.pt"
    pedenet.PEDENet(steps=2, image_size=64, de_init="random").fit(
        dataset, progress=False, checkpoint=ck, checkpoint_every=1)
    assert not ck.exists() and ck.parent.is_dir()
    # a finished run: nothing to resume, the model is kept
    before = (out2 / "model.pt").read_bytes()
    one_line_error(run("fit", dataset, "--out", out2, *FIT, "--resume"), "model.pt", "nothing to resume")
    assert (out2 / "model.pt").read_bytes() == before


# --------------------------------------------------------------------------- 10. outputs


def test_existing_outputs_are_not_overwritten(run_dir, dataset, tmp_path):
    # predict into a folder with files
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "keep.txt").write_text("mine")
    img = dataset / "test" / "good" / "000.png"
    one_line_error(run("predict", run_dir, img, "--out", pred, "--quiet"), pred, "--overwrite", code=2)
    assert sorted(os.listdir(pred)) == ["keep.txt"]
    ok(run("predict", run_dir, img, "--out", pred, "--overwrite", "--quiet"))
    assert (pred / "keep.txt").read_text() == "mine" and (pred / "000_map.npy").is_file()
    # predict never reads its own outputs when --out lies inside an input folder
    inputs = tmp_path / "inputs"
    shutil.copytree(dataset / "test" / "good", inputs)
    ok(run("predict", run_dir, inputs, "--out", inputs / "out", "--quiet"))
    ok(run("predict", run_dir, inputs, "--out", inputs / "out", "--overwrite", "--quiet"))
    with open(inputs / "out" / "scores.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    # fit into a folder that is not a pedenet run: refused even with --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"not": "pedenet"}')
    for extra in ((), ("--overwrite",)):
        one_line_error(run("fit", dataset, "--out", other, *FIT, *extra), other, "not empty", code=2)
    assert json.loads((other / "config.json").read_text()) == {"not": "pedenet"}
    # evaluate keeps earlier results unless --overwrite
    rd = tmp_path / "rd"
    shutil.copytree(run_dir, rd)
    ok(run("evaluate", rd, "--quiet"))
    before = (rd / "metrics.json").read_bytes()
    one_line_error(run("evaluate", rd, "--quiet"), "metrics.json", "--overwrite", code=2)
    assert (rd / "metrics.json").read_bytes() == before


def test_evaluate_and_validate_refuse_a_run_folder_they_cannot_write_before_scoring(
        run_dir, tmp_path, monkeypatch):
    import tempfile

    import pedenet.cli.common as common
    import pedenet.evaluation as evaluation
    import pedenet.validation as validation

    rd = tmp_path / "rd"
    shutil.copytree(run_dir, rd)
    before = tree(rd)

    def read_only(*args, **kwargs):  # what a read-only mount or an immutable folder gives
        if Path(kwargs.get("dir", "")) == rd:
            raise OSError(30, "Read-only file system")
        return tempfile.NamedTemporaryFile(*args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("scored although the results could not be written")

    monkeypatch.setattr(common.tempfile, "NamedTemporaryFile", read_only)
    monkeypatch.setattr(evaluation, "evaluate", never)
    monkeypatch.setattr(validation, "validate", never)
    for command in ("evaluate", "validate"):
        one_line_error(run(command, rd), rd, "cannot write results", "Read-only file system", code=1)
    assert tree(rd) == before


def test_predict_overwrite_removes_the_earlier_predictions_files_only(run_dir, dataset, tmp_path):
    pred = tmp_path / "pred"
    images = [dataset / "test" / d / "000.png" for d in ("good", "spot", "scratch")]
    ok(run("predict", run_dir, *images, "--out", pred, "--clusters", "--report", "--quiet"))
    names = ["good_000", "spot_000", "scratch_000"]  # three files named 000.png
    suffixes = ("_overlay.png", "_map.npy", "_mask.png", "_clusters.png")
    first = {f"{n}{s}" for n in names for s in suffixes}
    # warnings.txt: the run holds out too few images for the 1 % false-alarm rate
    assert set(os.listdir(pred)) == first | {"scores.csv", "predict.json", "report.html", "warnings.txt"}
    (pred / "notes.txt").write_text("mine")
    (pred / "000_9_overlay.png").write_bytes(b"mine too")  # output-like name, not in scores.csv
    ok(run("predict", run_dir, images[1], "--out", pred, "--format", "tiff", "--overwrite", "--quiet"))
    assert set(os.listdir(pred)) == {"000_overlay.png", "000_map.tiff", "000_mask.png", "scores.csv",
                                     "predict.json", "warnings.txt", "notes.txt", "000_9_overlay.png"}
    assert (pred / "notes.txt").read_text() == "mine"
    assert (pred / "000_9_overlay.png").read_bytes() == b"mine too"
    with open(pred / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["path"], r["name"]) for r in rows] == [(str(images[1]), "000")]
    amap = tifffile.imread(pred / "000_map.tiff")
    assert float(rows[0]["score"]) == image_score(amap, 0.003)
    # a scores.csv that pedenet did not write names nothing to remove
    other = tmp_path / "other"
    other.mkdir()
    (other / "scores.csv").write_text("name,value\n000_1,3\n")
    (other / "000_1_overlay.png").write_bytes(b"keep")
    ok(run("predict", run_dir, images[0], "--out", other, "--overwrite", "--quiet"))
    assert (other / "000_1_overlay.png").read_bytes() == b"keep"
    assert sorted(os.listdir(other)) == ["000_1_overlay.png", "000_map.npy", "000_mask.png",
                                         "000_overlay.png", "predict.json", "scores.csv",
                                         "warnings.txt"]


# --------------------------------------------------------------------------- 11. checkpoints


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_tampered_checkpoints_run_no_code(run_dir, dataset, tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is real: unpickling runs it
    assert marker.exists()
    marker.unlink()
    zipped = tmp_path / "zipped.pt"
    torch.save({"format": FORMAT, "format_version": 1, "config": Payload(marker),
                "state_dict": {}, "mixture": {}}, zipped)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"format": FORMAT, "x": Payload(marker)}, protocol=2))
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match=path.name):
            pedenet.load(path)
        bad_run = tmp_path / f"run_{path.stem}"
        bad_run.mkdir()
        shutil.copy(path, bad_run / "model.pt")
        one_line_error(run("predict", bad_run, dataset / "test" / "good", "--out", tmp_path / "o",
                           "--quiet"), "model.pt", "unsafe")
        one_line_error(run("evaluate", bad_run, "--data", dataset, "--quiet"), "model.pt")
    assert not marker.exists()


def test_foreign_and_incompatible_checkpoints(run_dir, tmp_path):
    newer = tmp_path / "newer.pt"
    data = load_checkpoint(run_dir / "model.pt")
    torch.save({**data, "format_version": 99}, newer)
    with pytest.raises(CheckpointError, match="format version 99"):
        pedenet.load(newer)
    resume = tmp_path / "resume.pt"
    save_checkpoint(resume, {"kind": "resume", "config": {}, "state_dict": {}, "optimizer": {},
                             "generator": torch.zeros(1), "step": 0})
    with pytest.raises(CheckpointError, match="--resume"):
        pedenet.load(resume)
    with pytest.raises(CheckpointError, match="not a resume checkpoint"):
        load_checkpoint(run_dir / "model.pt", kind="resume")
    text = tmp_path / "model.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="model.pt"):
        pedenet.load(text)
    one_line_error(run("predict", tmp_path, run_dir / "model.pt", "--out", tmp_path / "o", "--quiet"),
                   "model.pt")


def test_checkpoint_with_damaged_bytes_is_refused_not_used(run_dir, dataset, tmp_path):
    good = (run_dir / "model.pt").read_bytes()
    flipped = bytearray(good)
    middle = len(flipped) // 2  # inside the weights
    flipped[middle:middle + 4096] = bytes(b ^ 0xFF for b in flipped[middle:middle + 4096])
    bad_run = tmp_path / "bad_run"
    bad_run.mkdir()
    (bad_run / "model.pt").write_bytes(bytes(flipped))
    assert torch.load(bad_run / "model.pt", weights_only=True)["format"] == FORMAT  # torch alone: loads
    with pytest.raises(CheckpointError, match=r"model.pt: corrupt: the checksum of its part .* does "
                       r"not match its bytes .*copy it again"):
        pedenet.load(bad_run)
    one_line_error(run("predict", bad_run, dataset / "test" / "good", "--out", tmp_path / "o",
                       "--quiet"), "model.pt", "corrupt", "checksum")
    assert not (tmp_path / "o").exists()
    resume = tmp_path / "resume.pt"
    resume.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(resume, kind="resume")
    (bad_run / "model.pt").write_bytes(good)  # the intact bytes load
    assert pedenet.load(bad_run).config == pedenet.load(run_dir).config


def test_files_that_are_not_checkpoints_give_a_short_error(run_dir, dataset, tmp_path):
    png = tmp_path / "photo.png"
    shutil.copy(dataset / "test" / "good" / "000.png", png)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    arrays = tmp_path / "arrays.pt"
    torch.save({"weights": np.zeros(3)}, arrays)  # a torch file holding numpy objects
    cases = [(png, "not a pedenet checkpoint (it is a PNG image)"),
             (text, "not a pedenet checkpoint (not a PyTorch file)"),
             (arrays, "not a pedenet checkpoint (it holds objects other than tensors")]
    for path, what in cases:
        with pytest.raises(CheckpointError) as info:
            pedenet.load(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: {what}") and "pedenet fit" in msg and "model.pt" in msg
        assert "weights_only" not in msg and "PyTorch 2.6" not in msg and len(msg) - len(str(path)) < 200
    images = dataset / "test" / "good"
    for args in (("predict", png, images, "--out", tmp_path / "o"), ("evaluate", png),
                 ("validate", png), ("export", png, "--out", tmp_path / "m.onnx")):
        err = one_line_error(run(*args, "--quiet"),
                             f"{png}: not a pedenet checkpoint (it is a PNG image)", "`pedenet fit`")
        assert "weights_only" not in err and "Weights only" not in err
    assert not (tmp_path / "o").exists()
    # a folder without model.pt
    empty = tmp_path / "empty_run"  # a copy that failed, leaving model.pt of 0 bytes
    empty.mkdir()
    (empty / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.pt: empty \(0 bytes\), not a pedenet "
                                              r"checkpoint; copy it again .*`pedenet fit`"):
        pedenet.load(empty)
    (empty / "resume.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"resume\.pt: empty \(0 bytes\).*--overwrite"):
        load_checkpoint(empty / "resume.pt", kind="resume")
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a folder without model.pt, not a pedenet checkpoint"):
        pedenet.load(folder)
    from_folder, from_file = pedenet.load(run_dir), pedenet.load(run_dir / "model.pt")  # as the CLI
    assert from_folder.config == from_file.config
    assert all(torch.equal(a, b) for a, b in zip(from_folder.network.state_dict().values(),
                                                  from_file.network.state_dict().values()))
    for args in (("predict", folder, images, "--out", tmp_path / "o"), ("evaluate", folder),
                 ("validate", folder)):
        one_line_error(run(*args, "--quiet"), f"{folder}: not a pedenet run folder (no model.pt)",
                       "`pedenet fit")


# --------------------------------------------------------------------------- 12. numbers


@pytest.mark.parametrize("encoder", ["pretrained", "scratch"])
def test_constant_training_images_give_finite_maps(tmp_path, encoder):
    black = [np.zeros((64, 64, 3), np.float32)] * 3
    white = [np.ones((64, 64, 3), np.float32)] * 3
    probe = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    for train in (black, white):
        model = pedenet.PEDENet(steps=3, image_size=64, encoder=encoder, seed=0).fit(train, progress=False)
        for h in ("energy", "cov_penalty", "lp_loss", "effective_rank", "min_cov_eigenvalue"):
            assert np.isfinite(model.history[h]).all(), h
        assert all(np.isfinite(v) for v in model.normal_quantiles.values())
        for img in (black[0], white[0], probe):
            assert np.isfinite(model.anomaly_map(img)).all()


def test_seeds_finite_and_reproducible(dataset):
    results = {}
    for seed in (0, 1, 2, 1):
        model = pedenet.PEDENet(steps=3, image_size=64, seed=seed).fit(dataset, progress=False)
        for h in ("energy", "cov_penalty", "lp_loss", "effective_rank", "min_cov_eigenvalue"):
            assert np.isfinite(model.history[h]).all(), (seed, h)
        result, maps = evaluate(model, dataset, progress=False, return_maps=True)
        assert all(np.isfinite(m).all() for m in maps)
        for k in ("image_auroc", "pixel_auroc", "au_pro_0.3"):
            assert 0.0 <= result["overall"][k] <= 1.0
        if seed in results:  # same seed, same metrics (CPU)
            assert result["overall"] == results[seed]["overall"]
            assert [e["score"] for e in result["images"]] == [e["score"] for e in results[seed]["images"]]
        results[seed] = result


def test_atomic_writes_get_normal_file_permissions(tmp_path):
    """Outputs (reports, maps, models) are readable like any new file, not owner-only."""
    import os

    from pedenet.checkpoint import atomic_write_bytes

    mask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "r.html", lambda fh: fh.write(b"x"))
    finally:
        os.umask(mask)
    assert (tmp_path / "r.html").stat().st_mode & 0o777 == 0o644


def test_output_names_of_images_sharing_a_stem():
    from pedenet.cli.common import _unique_names

    P = Path
    assert _unique_names([P("a/x.png"), P("b/y.png")]) == ["x", "y"]
    # the folder tells them apart
    assert _unique_names([P("t/crack/000.png"), P("t/good/000.png"), P("t/good/001.png")]) == \
        ["crack_000", "good_000", "001"]
    # same folder name twice: as many folders as tell them apart
    assert _unique_names([P("1/good/000.png"), P("2/good/000.png")]) == ["1_good_000", "2_good_000"]
    assert _unique_names([P("d/brick/test/good/000.png"), P("d/grass/test/good/000.png"),
                          P("d/grass/test/good/001.png")]) == \
        ["brick_test_good_000", "grass_test_good_000", "001"]
    # no folders tell them apart (or a clash with another image's stem): numbered in input order
    assert _unique_names([P("good/000.png"), P("good/000.tif")]) == ["000_1", "000_2"]
    assert _unique_names([P("a/000.png"), P("b/000.png"), P("c/a_000.png")]) == \
        ["000_1", "000_2", "a_000"]
    assert _unique_names([P("a/x.png"), P("a/x.jpg"), P("x_1.png")]) == ["x_2", "x_3", "x_1"]
    # case does not tell names apart (case-insensitive file systems)
    assert _unique_names([P("d/A.png"), P("d/a.png"), P("d/b.png")]) == ["A_1", "a_2", "b"]
    assert _unique_names([P("x/A.png"), P("y/a.png")]) == ["x_A", "y_a"]
