"""Tests for pedenet.evaluation: evaluate() and format_table()."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from pedenet import metrics
from pedenet.builtin import DEFECT_TYPES, make_builtin_dataset
from pedenet.data import MissingMaskWarning, load_image, load_mask
from pedenet.evaluation import METRIC_KEYS, evaluate, format_table
from pedenet.scoring import image_score


class BrightnessModel:
    """Stand-in model: the anomaly map is the image brightness (deterministic, instant)."""

    normal_quantiles: dict = {}

    def anomaly_map(self, path):
        return (load_image(path).mean(axis=2) * 100.0).astype(np.float32)


def _dataset(root, **kw):
    params = dict(categories=("grass",), n_train=6, n_test_good=2, n_test_defect=2, size=64)
    params.update(kw)
    return make_builtin_dataset(root, **params)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("eval") / "ds")


def test_evaluate_real_model(dataset):
    from pedenet.estimator import PEDENet

    model = PEDENet(steps=3).fit(dataset / "grass", progress=False)
    result, maps = evaluate(model, dataset, "grass", progress=False, return_maps=True)
    json.dumps(result, allow_nan=False)  # JSON-serializable, no NaN
    assert result["n_images"] == 2 + 2 * len(DEFECT_TYPES) == len(maps) == len(result["images"])
    assert set(result["per_defect"]) == set(DEFECT_TYPES)
    for entry in [result["overall"], *result["per_defect"].values()]:
        for k in METRIC_KEYS:
            assert 0.0 <= entry[k] <= 1.0, k
    assert result["per_defect"]["spot"]["n_images"] == 4
    assert result["seconds_per_image"] > 0
    for entry, amap in zip(result["images"], maps):
        assert amap.dtype == np.float32 and amap.shape == (64, 64)
        assert entry["score"] == pytest.approx(image_score(amap, model.config.image_score_fraction))
        assert entry["label"] == (entry["defect"] != "good")


def test_metrics_match_pedenet_metrics(dataset):
    result, maps = evaluate(BrightnessModel(), dataset / "grass", progress=False, return_maps=True)
    images = result["images"]
    scores = np.array([e["score"] for e in images])
    labels = np.array([e["label"] for e in images])
    masks = [load_mask(e["mask"]) if e["mask"] else np.zeros(m.shape, bool)
             for e, m in zip(images, maps)]
    assert result["overall"]["image_auroc"] == pytest.approx(metrics.image_auroc(scores, labels))
    assert result["overall"]["image_f1_max"] == pytest.approx(metrics.f1_max(scores, labels))
    assert result["overall"]["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(maps, masks))
    assert result["overall"]["au_pro_0.3"] == pytest.approx(metrics.au_pro(maps, masks, 0.3))
    sel = [i for i, e in enumerate(images) if e["defect"] in ("good", "patch")]
    assert result["per_defect"]["patch"]["image_auroc"] == pytest.approx(
        metrics.image_auroc(scores[sel], labels[sel]))
    assert result["per_defect"]["patch"]["pixel_f1_max"] == pytest.approx(
        metrics.pixel_f1_max([maps[i] for i in sel], [masks[i] for i in sel]))


def test_undefined_metrics_are_none(tmp_path):
    root = _dataset(tmp_path / "ds", n_test_good=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", metrics.UndefinedMetricWarning)  # must not leak
        result = evaluate(BrightnessModel(), root, "grass", progress=False)
    text = json.dumps(result, allow_nan=False)
    assert result["overall"]["image_auroc"] is None  # no good image
    assert result["per_defect"]["scratch"]["image_auroc"] is None
    assert result["overall"]["pixel_auroc"] is not None  # normal pixels exist around defects
    assert any("image_auroc" in u for u in result["undefined_metrics"])
    assert "null" in text
    table = format_table(result)
    assert "n/a" in table


def test_missing_mask_excluded_from_pixel_metrics(tmp_path):
    root = _dataset(tmp_path / "ds")
    cat = root / "grass"
    (cat / "ground_truth" / "spot" / "000_mask.png").unlink()
    with pytest.warns(MissingMaskWarning, match="no mask"):
        result = evaluate(BrightnessModel(), cat, progress=False)
    assert result["n_images"] == 8 and result["n_pixel_images"] == 7
    assert len(result["missing_masks"]) == 1 and result["missing_masks"][0].endswith("000.png")
    assert result["per_defect"]["spot"]["n_images"] == 4  # still counted for image metrics
    # all masks of a defect missing: its pixel metrics are computed on good images only -> None
    shutil.rmtree(cat / "ground_truth" / "spot")
    with pytest.warns(MissingMaskWarning):
        result = evaluate(BrightnessModel(), cat, progress=False)
    assert result["per_defect"]["spot"]["pixel_auroc"] is None
    assert result["per_defect"]["spot"]["image_auroc"] is not None
    assert [u for u in result["undefined_metrics"] if u.startswith("per_defect/spot/")] == [
        "per_defect/spot/pixel: no anomalous image has a ground-truth mask "
        "(add ground_truth/<defect>/<stem>_mask.png)"]
    assert result["overall"]["pixel_auroc"] is not None  # the other defects have masks


def test_no_ground_truth_folder_says_masks_are_missing(tmp_path):
    # a test split without ground_truth/: the good images' all-normal masks must not make
    # the pixel metrics read as "no anomalous pixel in the masks"
    cat = _dataset(tmp_path / "ds") / "grass"
    shutil.rmtree(cat / "ground_truth")
    with pytest.warns(MissingMaskWarning):
        result = evaluate(BrightnessModel(), cat, progress=False)
    assert result["overall"]["image_auroc"] is not None
    assert result["overall"]["pixel_auroc"] is None and result["overall"]["au_pro_0.3"] is None
    pixel = [u for u in result["undefined_metrics"] if "/pixel" in u]
    assert len(pixel) == 1 + len(DEFECT_TYPES)
    assert all("no anomalous image has a ground-truth mask" in u for u in pixel)
    assert not any("no anomalous pixel" in u for u in result["undefined_metrics"])


def test_unread_image_formats_under_test_are_reported_not_swallowed(tmp_path):
    # evaluate records the missing-mask warnings of test_samples itself; any other warning of
    # that step (here: a .gif it cannot read) must still reach the user, once
    from PIL import Image

    from pedenet.data import SkippedFileWarning

    cat = _dataset(tmp_path / "ds") / "grass"
    Image.new("RGB", (64, 64)).save(cat / "test" / "spot" / "extra.gif")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(BrightnessModel(), cat, progress=False)
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedFileWarning)]
    assert len(skipped) == 1 and "extra.gif" in skipped[0]
    assert not [w for w in caught if issubclass(w.category, MissingMaskWarning)]
    assert result["n_images"] == 8  # the .gif is not scored


def test_format_table(dataset):
    result = evaluate(BrightnessModel(), dataset, "grass", progress=False)
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].split()[0] == "defect" and "image AUROC" in lines[0] and "AU-PRO@0.3" in lines[0]
    assert lines[2].startswith("overall")
    for d in DEFECT_TYPES:
        assert any(line.startswith(d) for line in lines)
    # aligned: every row as wide as the rule under the header (right-aligned numbers)
    assert len({len(line) for line in lines}) == 1
    assert f"{result['overall']['image_auroc']:.3f}" in lines[2]


def test_format_metric_marks_undefined_values():
    from pedenet.evaluation import format_metric

    assert format_metric(0.98765) == "0.988"
    assert format_metric(0.98765, ".4f") == "0.9877" and format_metric(12.0, "d") == "12"
    assert [format_metric(v) for v in (None, float("nan"), float("inf"))] == ["n/a"] * 3


def test_markdown_table_has_one_row_per_category():
    from pedenet.evaluation import TABLE_COLUMNS, markdown_table

    rows = [("grass", {"image_auroc": 1.0, "pixel_auroc": 0.5, "n_images": 4}), ("sand", {})]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 4 and lines[1] == "|" + "---|" * (len(TABLE_COLUMNS) + 2)
    assert lines[0].startswith("| category | image AUROC | pixel AUROC |")
    assert lines[2] == "| grass | 1.000 | 0.500 | n/a | n/a | 4 |"
    assert lines[3] == "| sand | n/a | n/a | n/a | n/a |  |"
