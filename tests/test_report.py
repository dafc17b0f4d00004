"""Tests for pedenet.report (self-contained HTML reports) and pedenet.metrics.pro_curve."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pedenet import metrics as M
from pedenet.report import PRED_COLOR, THUMB_SIDE, write_evaluation_report, write_prediction_report

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "metrics"

# name, defect, score; defective images have a 16×16 square defect (mask + map peak).
# Wrongness (see pedenet.report._worst_first): good_2 2/3, crack_1 2/3, scratch_0 1/3,
# good_1 1/3, crack_0 0, good_0 0 -> ties broken by score, highest first.
IMAGES = [("good_0", "good", 1.0), ("good_1", "good", 2.0), ("good_2", "good", 5.0),
          ("crack_0", "crack", 6.0), ("crack_1", "crack", 1.5), ("scratch_0", "scratch", 4.0)]
WORST_FIRST = ["good_2.png", "crack_1.png", "scratch_0.png", "good_1.png", "crack_0.png",
               "good_0.png"]
OVERALL = {"image_auroc": 0.8123, "image_f1_max": 0.7456, "pixel_auroc": 0.9345,
           "pixel_f1_max": 0.6789, "au_pro_0.3": 0.8642, "n_images": 6}
THRESHOLDS = {"target_fpr": 0.05, "image_threshold": 3.25, "pixel_threshold": 2.75,
              "n_calibration": 17, "achievable_fpr": 0.0588, "guaranteed_fpr": 0.0591}


def _write_png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _gray_image(rng, h=64, w=64) -> np.ndarray:
    """Gray RGB noise: never pure magenta or white, so contour colours are unambiguous."""
    return np.repeat(rng.integers(60, 180, (h, w, 1), dtype=np.uint8), 3, axis=2)


@pytest.fixture()
def category(tmp_path):
    """(result, maps) of a tiny fake evaluation on 64×64 images written to tmp_path."""
    rng = np.random.default_rng(0)
    images, maps = [], []
    for k, (name, defect, score) in enumerate(IMAGES):
        path = _write_png(tmp_path / "test" / defect / f"{name}.png", _gray_image(rng))
        amap = (rng.random((64, 64)) * 0.5).astype(np.float32)
        mask_path = None
        r0 = 8 + 6 * k
        if defect != "good":
            mask = np.zeros((64, 64), np.uint8)
            mask[r0:r0 + 16, 20:36] = 255
            mask_path = _write_png(tmp_path / "ground_truth" / defect / f"{name}_mask.png", mask)
            amap[r0 + 2:r0 + 14, 22:34] = score
        else:
            amap[r0:r0 + 3, 40:43] = score
        maps.append(amap)
        images.append({"path": path, "defect": defect, "label": int(defect != "good"),
                       "score": float(amap.max()), "mask": mask_path})
    result = {
        "category": str(tmp_path), "n_images": len(images), "n_pixel_images": len(images),
        "overall": OVERALL,
        "per_defect": {"crack": {**OVERALL, "pixel_f1_max": None, "image_auroc": 0.5432,
                                 "n_images": 5},
                       "scratch": {**OVERALL, "au_pro_0.3": None, "n_images": 4}},
        "images": images,
    }
    return result, maps


def _calibrated(result: dict) -> dict:
    out = json.loads(json.dumps(result))
    out["thresholds"] = THRESHOLDS
    out["realized"] = {"false_alarm_rate": 0.3333, "miss_rate": 0.1111, "n_normal": 3,
                       "n_anomalous": 3, "false_alarm_rate_ci": [0.0084, 0.9057],
                       "pixel_false_alarm_rate": 0.0123}
    for d in out["images"]:
        d["anomalous"] = d["score"] > THRESHOLDS["image_threshold"]  # strict, as in evaluate
        d["p_value"] = 0.5 / d["score"]
    return out


def _srcs(text: str) -> list[str]:
    return re.findall(r'src="([^"]*)"', text)


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
    img.load()
    assert img.format == "PNG"
    return img


def _cards(text: str) -> list[tuple[str, Image.Image]]:
    """(file name, thumbnail) of each gallery card, in page order."""
    found = re.findall(r'<div class="card[^"]*"><img alt="[^"]*" src="([^"]*)">'
                       r'<b class="name" title="[^"]*">([^<]*)</b>', text)
    return [(name, _decode(uri)) for uri, name in found]


def _assert_self_contained(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert text.count("<body>") == 1 and text.count("</body>") == 1
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "href=" not in text and "url(" not in text
    srcs = _srcs(text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(re.findall(r"\ssrc=", text)) == len(srcs)


def _has_color(img: Image.Image, rgb) -> bool:
    return bool(np.all(np.asarray(img.convert("RGB")) == np.array(rgb, np.uint8), axis=2).any())


# --------------------------------------------------------------------------------------
# evaluation report
# --------------------------------------------------------------------------------------


def test_evaluation_report_uncalibrated(category, tmp_path):
    import matplotlib.pyplot as plt

    result, maps = category
    figs_before = plt.get_fignums()
    out = write_evaluation_report(tmp_path / "rep" / "report.html", result, maps,
                                  color_range=(0.0, 6.0), title="my <title>")
    assert out == tmp_path / "rep" / "report.html" and out.is_file()
    assert plt.get_fignums() == figs_before
    assert not [p for p in out.parent.iterdir() if p.name != "report.html"]  # no temp file left
    text = out.read_text(encoding="utf-8")
    _assert_self_contained(text)
    assert "my &lt;title&gt;" in text and "<title>my &lt;title&gt;</title>" in text
    for value in ("0.8123", "0.7456", "0.9345", "0.6789", "0.8642", "0.5432"):
        assert value in text
    crack_row = re.search(r"<tr><td>crack</td>(.*?)</tr>", text).group(1)
    assert re.findall(r"<td>([^<]*)</td>", crack_row) == ["0.5432", "0.7456", "0.9345", "n/a",
                                                           "0.8642", "5"]
    assert ("<td>scratch</td><td>0.8123</td><td>0.7456</td><td>0.9345</td><td>0.6789</td>"
            "<td>n/a</td><td>4</td>") in text
    # no thresholds: no section, no predicted contour, no decision
    assert 'id="thresholds"' not in text and "Calibrated thresholds" not in text
    assert "magenta" not in text and "decision" not in text
    cards = _cards(text)
    assert [name for name, _ in cards] == WORST_FIRST
    for _, img in cards:
        assert img.size == (64, 64) and img.mode == "RGB"
        assert not _has_color(img, PRED_COLOR)
    assert _has_color(dict(cards)["crack_0.png"], (255, 255, 255))  # ground-truth contour
    assert not _has_color(dict(cards)["good_0.png"], (255, 255, 255))
    # 3 plots (image ROC, pixel ROC, PRO) + histogram + 6 cards, all decodable PNGs
    srcs = _srcs(text)
    assert len(srcs) == 4 + 6
    sizes = [_decode(s).size for s in srcs[:4]]
    assert all(w > 200 and h > 150 for w, h in sizes)
    assert "Curves" in text and "undefined" not in text


def test_evaluation_report_calibrated(category, tmp_path):
    result, maps = category
    cal = _calibrated(result)
    text = write_evaluation_report(tmp_path / "r.html", cal, maps, max_gallery=4).read_text()
    _assert_self_contained(text)
    section = text.split('id="thresholds"')[1].split("</table>")[0]
    for value in ("0.0500", "3.25", "2.75", "17", "0.0588", "0.0591", "0.3333", "0.1111",
                  "95% CI 0.0084 to 0.9057", "0.0123"):
        assert value in section
    cards = _cards(text)
    assert [n for n, _ in cards] == WORST_FIRST[:4]
    assert "Gallery: 4 of 6 images" in text
    # decisions, p-values; wrong decisions framed: good_2 (5 > 3.25) and crack_1 (1.5 < 3.25)
    wrong = re.findall(r'<div class="card wrong">.*?<b class="name"[^>]*>([^<]*)</b>', text)
    assert wrong == ["good_2.png", "crack_1.png"]
    assert "decision: anomalous" in text and "decision: normal" in text
    assert "p-value: 0.1" in text  # good_2: 0.5 / 5
    # predicted contour (map > 2.75) drawn in magenta where a peak passes the threshold
    imgs = dict(cards)
    assert _has_color(imgs["good_2.png"], PRED_COLOR)
    assert _has_color(imgs["scratch_0.png"], PRED_COLOR)
    assert not _has_color(imgs["crack_1.png"], PRED_COLOR)


def test_evaluation_report_undefined_plots_are_notes(category, tmp_path):
    result, maps = category
    normal_only = {**result, "images": result["images"][:3]}
    text = write_evaluation_report(tmp_path / "a.html", normal_only, maps[:3]).read_text()
    _assert_self_contained(text)
    assert "Image ROC: undefined" in text and "Pixel ROC and PRO curves: undefined" in text
    assert len(_cards(text)) == 3 and len(_srcs(text)) == 1 + 3  # histogram + cards
    no_masks = json.loads(json.dumps(result))
    for d in no_masks["images"]:
        d["mask"] = None
        d["label"] = 1  # defective without mask: image metrics only
    no_masks["images"][0]["label"] = 0
    text = write_evaluation_report(tmp_path / "b.html", no_masks, maps).read_text()
    assert "Pixel ROC and PRO curves: undefined" in text and "Image ROC: undefined" not in text
    with pytest.raises(ValueError, match="6 result images but 5 anomaly maps"):
        write_evaluation_report(tmp_path / "c.html", result, maps[:5])
    assert not (tmp_path / "c.html").exists()


# --------------------------------------------------------------------------------------
# prediction report
# --------------------------------------------------------------------------------------


def _prediction_rows(tmp_path, with_decisions: bool):
    rng = np.random.default_rng(1)
    # "edge" peaks exactly at the pixel threshold 2.75: not above it, so no predicted contour
    scores = {"a": 3.0, "b": 9.0, "c": 1.0, "d": 5.0, "wide": 7.0, "edge": 2.75}
    rows, maps = [], []
    for name, score in scores.items():
        h, w = (160, 320) if name == "wide" else (64, 64)
        path = _write_png(tmp_path / "in" / f"{name}.png", _gray_image(rng, h, w))
        amap = (rng.random((h, w)) * 0.5).astype(np.float32)
        amap[10:30, 10:30] = score
        maps.append(amap)
        rows.append({"path": path, "score": score,
                     "p_value": (1.0 / score if name != "c" else None) if with_decisions else None,
                     "anomalous": (score >= 4.0) if with_decisions else None})
    return rows, maps


def test_prediction_report_sorted_by_score(tmp_path):
    rows, maps = _prediction_rows(tmp_path, with_decisions=True)
    text = write_prediction_report(tmp_path / "p.html", rows, maps, color_range=(0.0, 9.0),
                                   thresholds=THRESHOLDS, max_gallery=5).read_text()
    _assert_self_contained(text)
    table = re.findall(r"<tr><td>(\d+)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>"
                       r"<td>([^<]*)</td></tr>", text)
    assert [r[1] for r in table] == ["b.png", "wide.png", "d.png", "a.png", "edge.png", "c.png"]
    assert [r[0] for r in table] == ["1", "2", "3", "4", "5", "6"]
    assert table[0][2:] == ("9", "0.111", "anomalous") and table[-1][2:] == ("1", "n/a", "normal")
    assert 'id="thresholds"' in text and "3.25" in text
    cards = _cards(text)
    assert [n for n, _ in cards] == ["b.png", "wide.png", "d.png", "a.png", "edge.png"]
    assert "Gallery: 5 of 6 images" in text
    imgs = dict(cards)
    assert imgs["wide.png"].size == (THUMB_SIDE, THUMB_SIDE // 2)  # downscaled, aspect kept
    assert _has_color(imgs["wide.png"], PRED_COLOR) and _has_color(imgs["d.png"], PRED_COLOR)
    # a.png lies above the pixel threshold but passes (3.0 < 4): no contour, like its empty mask
    assert not _has_color(imgs["a.png"], PRED_COLOR)
    assert not _has_color(imgs["b.png"], (255, 255, 255))  # no ground truth here
    # maps outside the gallery may be None (the CLI keeps only the gallery's maps)
    maps[2] = None  # c.png, the lowest score
    text2 = write_prediction_report(tmp_path / "p2.html", rows, maps, thresholds=THRESHOLDS,
                                    max_gallery=5).read_text()
    assert [n for n, _ in _cards(text2)] == ["b.png", "wide.png", "d.png", "a.png", "edge.png"]


def test_prediction_report_uncalibrated(tmp_path):
    rows, maps = _prediction_rows(tmp_path, with_decisions=False)
    text = write_prediction_report(tmp_path / "p.html", rows, maps).read_text()
    _assert_self_contained(text)
    assert 'id="thresholds"' not in text and "magenta" not in text and "decision:" not in text
    assert [n for n, _ in _cards(text)] == ["b.png", "wide.png", "d.png", "a.png", "edge.png",
                                            "c.png"]
    assert all(not _has_color(img, PRED_COLOR) for _, img in _cards(text))
    assert "<td>n/a</td><td>n/a</td>" in text


# --------------------------------------------------------------------------------------
# headless browser rendering
# --------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_headless_chromium(category, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium not installed: apt-get install chromium to run this check")
    result, maps = category
    page = write_evaluation_report(tmp_path / "report.html", _calibrated(result), maps)
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,2000", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert img.shape == (2000, 1200, 3)
    colors = np.unique((img[..., 0] << 16) | (img[..., 1] << 8) | img[..., 2])
    assert colors.size > 50  # not one flat colour: text, plots and overlays were drawn
    assert (img.min(axis=2) > 230).mean() > 0.3  # the page background (white) ...
    assert (img.max(axis=2) < 80).mean() > 0.001  # ... and dark text/lines


# --------------------------------------------------------------------------------------
# pedenet.metrics.pro_curve
# --------------------------------------------------------------------------------------


def _area(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    return float(np.sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]) / 2) / limit)


def _check_curve(maps, masks, limit):
    fpr, pro = M.pro_curve(maps, masks, limit)
    assert fpr.dtype == pro.dtype == np.float64 and fpr.shape == pro.shape
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == pytest.approx(limit, abs=0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12) and pro.max() <= 1
    assert _area(fpr, pro, limit) == pytest.approx(M.au_pro(maps, masks, limit), abs=1e-6)
    return fpr, pro


@pytest.mark.parametrize("seed", range(4))
def test_pro_curve_area_equals_au_pro_random(seed):
    rng = np.random.default_rng(seed)
    n = 5
    maps = [rng.random((int(rng.integers(8, 30)), 20)).astype(np.float32) for _ in range(n)]
    if seed % 2:  # many ties
        maps = [np.round(m * 4) / 4 for m in maps]
    masks = [rng.random(m.shape) > 0.85 for m in maps]
    for limit in (0.3, 0.1, 0.02, 1.0):
        _check_curve(maps, masks, limit)
    _check_curve([m.astype(np.float64) for m in maps], masks, 0.3)  # argsort path


@pytest.mark.parametrize("case", ["smooth", "ties", "diagonal_regions", "many_images",
                                  "variable_sizes"])
def test_pro_curve_area_equals_au_pro_fixtures(case):
    if not (FIXTURES / f"{case}.npz").is_file():
        pytest.skip(f"metric fixture {case}.npz not found in {FIXTURES}")
    with np.load(FIXTURES / f"{case}.npz") as d:
        if case == "variable_sizes":
            maps = [d[f"anomaly_map_{i:02d}"] for i in range(15)]
            masks = [d[f"mask_{i:02d}"] for i in range(15)]
        else:
            maps, masks = d["anomaly_maps"], d["masks"]
    for limit in (0.3, 0.1):
        _check_curve(maps, masks, limit)


def test_pro_curve_chunks_and_exact_points(monkeypatch):
    rng = np.random.default_rng(7)
    maps = [np.round(rng.random((12, 12)) * 8).astype(np.float32) for _ in range(3)]
    masks = [rng.random((12, 12)) > 0.8 for _ in range(3)]
    whole = M.pro_curve(maps, masks, 0.3)
    monkeypatch.setattr(M, "_CHUNK", 7)
    chunked = _check_curve(maps, masks, 0.3)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=0, atol=1e-12)
    # perfect map: PRO jumps to 1 at FPR 0, stays there (vertical then horizontal segment)
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    fpr, pro = M.pro_curve([mask.astype(np.float32)], [mask], 0.3)
    np.testing.assert_array_equal(fpr, [0, 0, 0.3])
    np.testing.assert_array_equal(pro, [0, 1, 1])


def test_pro_curve_undefined_and_invalid():
    maps = [np.random.default_rng(0).random((5, 5))]
    with pytest.warns(M.UndefinedMetricWarning, match="no anomalous region"):
        fpr, pro = M.pro_curve(maps, [np.zeros((5, 5))])
    assert fpr.size == pro.size == 0 and fpr.dtype == np.float64
    with pytest.warns(M.UndefinedMetricWarning, match="no normal pixel"):
        assert M.pro_curve(maps, [np.ones((5, 5))])[0].size == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="fpr_limit"):
            M.pro_curve(maps, [np.ones((5, 5))], 0.0)
        with pytest.raises(ValueError, match="differ in count"):
            M.pro_curve(maps, [np.ones((5, 5))] * 2)


def test_prediction_histogram_shows_held_out_normal_scores(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from pedenet import report

    drawn = {}

    def capture(draw, xlabel, ylabel, title):
        ax = Figure().add_subplot()
        draw(ax)
        drawn[title] = (ax, ylabel)
        return "<img>"

    monkeypatch.setattr(report, "_plot", capture)
    rows, maps = _prediction_rows(tmp_path, with_decisions=True)
    reference = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 3.2, 3.4, 3.6])
    write_prediction_report(tmp_path / "p.html", rows, maps, thresholds=THRESHOLDS,
                            reference_scores=reference)
    ax, ylabel = drawn["Image scores"]
    labels = ax.get_legend_handles_labels()[1]
    assert "held-out normal images (8, calibration)" in labels and ylabel == "fraction of images"
    # both histograms are fractions of their images: each sums to 1
    filled = [p.get_height() for p in ax.patches if type(p).__name__ == "Rectangle"]
    assert sum(filled) == pytest.approx(1.0)
    outline = [p for p in ax.patches if type(p).__name__ == "Polygon"][0].get_xy()
    assert outline[:, 1].max() > 0 and outline[:, 0].min() <= 1.0 and outline[:, 0].max() >= 9.0
    # without reference scores: counts, no outline
    write_prediction_report(tmp_path / "q.html", rows, maps)
    ax, ylabel = drawn["Image scores"]
    assert ylabel == "images" and sum(p.get_height() for p in ax.patches) == len(rows)
