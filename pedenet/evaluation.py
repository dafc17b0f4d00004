"""Evaluating a fitted model on the test split of an MVTec-AD-layout category.

:func:`evaluate` runs the model on every test image, reads the ground-truth masks and computes
the image-level and pixel-level metrics of :mod:`pedenet.metrics`, overall and per defect type.
:func:`format_table` turns the result into a plain aligned text table.

Result dictionary (JSON-serializable; undefined metrics are ``None``)::

    {
      "category": "/abs/path/to/category",
      "n_images": 83,                      # test images scored
      "n_pixel_images": 83,                # of which used for the pixel metrics
      "overall": {"image_auroc": 0.98, "image_f1_max": ..., "pixel_auroc": ...,
                  "pixel_f1_max": ..., "au_pro_0.3": ..., "n_images": 83},
      "per_defect": {"broken_large": {... same keys, on good + broken_large images ...}, ...},
      "seconds_per_image": 0.21,           # mean wall time of model.anomaly_map (read included)
      "seconds_total": 30.5,               # the whole evaluation, metrics included
      "missing_masks": ["/abs/path/img.png", ...],   # defective images without a mask file
      "skipped_files": ["/abs/path/bad.png", ...],   # left out (skip_bad_files=True)
      "undefined_metrics": ["per_defect/crack/image_auroc: ...", ...],
      "images": [{"path": ..., "defect": "good", "label": 0, "score": 95.1,
                  "mask": null, "p_value": 0.43, "anomalous": false}, ...],
      # only for a calibrated model (pedenet.calibration):
      "thresholds": {"target_fpr": 0.01, "image_threshold": ..., "pixel_fpr": 0.01,
                     "pixel_threshold": ...,
                     "n_calibration": 152, "achievable_fpr": ..., "guaranteed_fpr": ...},
      "realized": {"false_alarm_rate": 0.016, "false_alarm_rate_ci": [lo, hi],
                   "miss_rate": 0.2, "n_normal": 191, "n_anomalous": 392,
                   "pixel_false_alarm_rate": 0.008},
    }

Scores and maps are in the model's energy units (−log density; higher = more anomalous).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .data import MissingMaskWarning, check_images, load_mask, resolve_category, test_samples
from .metrics import UndefinedMetricWarning, f1_max, image_auroc, pixel_metrics
from .progress import progress_bar
from .scoring import image_score

__all__ = ["AU_PRO_LIMIT", "METRIC_KEYS", "evaluate", "format_table", "realized_rates", "to_jsonable"]

AU_PRO_LIMIT = 0.3
"""False positive rate limit of the AU-PRO metric reported by :func:`evaluate`."""

METRIC_KEYS = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "au_pro_0.3")
"""Metric names of each ``overall`` / ``per_defect`` entry (plus ``n_images``)."""


def to_jsonable(value: Any) -> Any:
    """Recursively convert to plain JSON types: NaN/Inf → None, numpy scalars/arrays → Python,
    ``Path`` → str, tuples → lists. Dict keys become strings."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _metrics(scores: np.ndarray, labels: np.ndarray, maps: list, masks: list,
             where: str, undefined: list[str], no_pixel_reason: str | None = None) -> dict:
    """Image metrics on (scores, labels); pixel metrics on (maps, masks) (may be empty).

    ``no_pixel_reason``: when given, the pixel metrics are not computed but recorded as
    undefined for that reason (e.g. no anomalous image of the group has a mask).
    """
    out: dict[str, Any] = {}

    def run(name: str, fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UndefinedMetricWarning)
            value = fn()
        for w in caught:
            if issubclass(w.category, UndefinedMetricWarning):
                undefined.append(f"{where}/{name}: {w.message}")
            else:  # pragma: no cover - pass other warnings through
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return value

    out["image_auroc"] = run("image_auroc", lambda: image_auroc(scores, labels))
    out["image_f1_max"] = run("image_f1_max", lambda: f1_max(scores, labels))
    if no_pixel_reason is None and not maps:
        no_pixel_reason = "no image with a ground-truth mask"
    if no_pixel_reason is None:
        pm = run("pixel", lambda: pixel_metrics(maps, masks, (AU_PRO_LIMIT,)))
        out["pixel_auroc"] = pm["pixel_auroc"]
        out["pixel_f1_max"] = pm["pixel_f1_max"]
        out["au_pro_0.3"] = pm[f"aupro_{AU_PRO_LIMIT:g}"]
    else:
        undefined.append(f"{where}/pixel: {no_pixel_reason}")
        out["pixel_auroc"] = out["pixel_f1_max"] = out["au_pro_0.3"] = float("nan")
    out["n_images"] = int(len(scores))
    return out


def realized_rates(flagged: np.ndarray, labels: np.ndarray, maps: list, masks: list,
                   pixel_threshold: float) -> dict:
    """Realized error rates of calibrated decisions on a labelled test split.

    Args:
        flagged: bool (N,), images decided anomalous; labels: int (N,), 0 normal, 1 anomalous.
        maps, masks: float H×W maps and bool H×W ground truth (None: no mask) per image.
        pixel_threshold: energy above which a pixel is marked defective.

    Returns:
        ``false_alarm_rate`` (normal images flagged / normal images) with its 95 %
        Clopper-Pearson interval ``false_alarm_rate_ci``, ``miss_rate`` (anomalous images
        not flagged / anomalous images), ``n_normal``, ``n_anomalous``, and
        ``pixel_false_alarm_rate`` (pixels above ``pixel_threshold`` among the pixels of normal
        images; what the pixel threshold is calibrated for). Rates are None when undefined.
    """
    from scipy.stats import binomtest

    normal, anomalous = labels == 0, labels == 1
    out: dict[str, Any] = {"n_normal": int(normal.sum()), "n_anomalous": int(anomalous.sum())}
    k = int(flagged[normal].sum())
    out["false_alarm_rate"] = k / out["n_normal"] if out["n_normal"] else None
    out["false_alarm_rate_ci"] = (list(binomtest(k, out["n_normal"]).proportion_ci(0.95))
                                  if out["n_normal"] else None)
    out["miss_rate"] = float(np.mean(~flagged[anomalous])) if out["n_anomalous"] else None
    above = sum(int((maps[i] > pixel_threshold).sum()) for i in np.flatnonzero(normal))
    total = sum(maps[i].size for i in np.flatnonzero(normal))
    out["pixel_false_alarm_rate"] = above / total if total else None
    return out


def evaluate(model, data, category: str | None = None, progress: bool = True,
             return_maps: bool = False, skip_bad_files: bool = False, fpr: float | None = None,
             pixel_fpr: float | None = None):
    """Score every test image of a category and compute the metrics.

    Args:
        model: a fitted :class:`pedenet.estimator.PEDENet` (anything with
            ``iter_predict(paths)`` or ``anomaly_map(path) -> float32 H×W``).
        data: a category folder, or a dataset root together with ``category``
            (as :func:`pedenet.data.resolve_category` takes).
        category: category name under ``data``; ``None`` when ``data`` is the category folder.
        progress: show a tqdm progress bar.
        return_maps: also return the anomaly maps.
        skip_bad_files: leave out (with a :class:`pedenet.data.SkippedFileWarning` each) test
            images whose image or mask is unusable, instead of raising.
        fpr, pixel_fpr: target false-alarm rates of images and pixels for the decisions of a
            calibrated model (default: the model's ``config.target_fpr`` and ``pixel_fpr``).

    Every test image and mask is checked before scoring starts
    (:func:`pedenet.data.check_images`: fully decoded, mask size equal to image size,
    and at least ``model.min_image_side`` pixels on each side when the model has it).

    Returns:
        ``result`` (see the module docstring), or ``(result, maps)`` when ``return_maps``:
        ``maps[i]`` is the float32 H_i×W_i anomaly map (energy units, image resolution) of
        ``result["images"][i]``.

        Metrics: ``image_*`` use one score per image (the model's image score,
        :func:`pedenet.scoring.image_score`) over all images of the group; ``pixel_*`` and
        ``au_pro_0.3`` (normalized area under the PRO curve up to a false positive rate of
        0.3) pool the pixels of the group's images that have
        ground truth: good images count as all-normal; a defective image without a mask file
        is left out of the pixel metrics (with a :class:`pedenet.data.MissingMaskWarning`) but
        kept for the image metrics. ``per_defect[d]`` is computed on the good images plus the
        images of defect ``d``. Undefined metrics (e.g. no good test images) are ``None`` and
        listed in ``undefined_metrics``.

    Raises:
        pedenet.data.DataError: missing/unreadable category, image or mask, or a mask whose
            size differs from its image (:class:`pedenet.data.BadFilesError` naming the first
            bad file and counting the others).
        TypeError: ``data`` is not a folder path.
        ValueError: ``fpr`` or ``pixel_fpr`` outside (0, 1).
    """
    t_start = time.perf_counter()
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"evaluate needs a category folder in the MVTec AD layout (a path), got "
                        f"{type(data).__name__}; to score a list of images use model.predict")
    cat_dir = resolve_category(data, category)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingMaskWarning)
        samples = test_samples(cat_dir)
    for w in caught:
        if not issubclass(w.category, MissingMaskWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    keep = check_images([s.path for s in samples], masks=[s.mask_path for s in samples],
                        min_side=int(getattr(model, "min_image_side", 0)), skip_bad=skip_bad_files,
                        progress=progress, desc=f"checking {cat_dir.name}")
    skipped = [str(Path(samples[i].path).resolve()) for i in sorted(set(range(len(samples))) - set(keep))]
    samples = [samples[i] for i in keep]

    maps: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    missing: list[str] = []
    paths = [s.path for s in samples]
    scores_list: list[float] = []
    if hasattr(model, "iter_predict"):  # batched, streamed: (map, score) pairs
        results = ((amap, score) for _, amap, score in model.iter_predict(paths))
    else:
        fraction = getattr(getattr(model, "config", None), "image_score_fraction", 0.0)
        border = getattr(getattr(model, "config", None), "image_score_border", 0.0)
        results = ((amap, image_score(amap, fraction, border))
                   for amap in (np.asarray(model.anomaly_map(p), dtype=np.float32) for p in paths))
    infer_seconds = 0.0
    t0 = time.perf_counter()
    for s, (amap, score) in zip(progress_bar(samples, desc=f"evaluating {cat_dir.name}", unit="img",
                            disable=not progress), results):
        amap = np.asarray(amap, dtype=np.float32)
        scores_list.append(float(score))
        infer_seconds += time.perf_counter() - t0
        if s.label == 0:
            mask = np.zeros(amap.shape, dtype=bool)
        elif s.mask_path is None:
            mask = None
            missing.append(str(s.path))
        else:
            mask = load_mask(s.mask_path, expected_shape=amap.shape)
        maps.append(amap)
        masks.append(mask)
        t0 = time.perf_counter()
    if missing:
        warnings.warn(
            f"{len(missing)} defective test image(s) of {cat_dir} have no mask file (first: "
            f"{missing[0]}); they count for the image metrics only - add "
            "ground_truth/<defect>/<stem>_mask.png to use them for the pixel metrics",
            MissingMaskWarning, stacklevel=2)

    scores = np.array(scores_list, dtype=np.float64)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    defects = [s.defect for s in samples]
    undefined: list[str] = []

    def group(select: np.ndarray, where: str) -> dict:
        idx = np.flatnonzero(select)
        gm = [maps[i] for i in idx if masks[i] is not None]
        gk = [masks[i] for i in idx if masks[i] is not None]
        anomalous = [i for i in idx if labels[i] == 1]
        reason = None
        if anomalous and all(masks[i] is None for i in anomalous):
            # without this, the all-normal masks of the good images read as "no anomalous pixel"
            reason = ("no anomalous image has a ground-truth mask (add "
                      "ground_truth/<defect>/<stem>_mask.png)")
        return _metrics(scores[idx], labels[idx], gm, gk, where, undefined, reason)

    defect_names = sorted({d for d in defects if d != "good"})
    is_good = np.array([d == "good" for d in defects])
    overall = group(np.ones(len(samples), dtype=bool), "overall")
    per_defect = {d: group(is_good | np.array([x == d for x in defects]), f"per_defect/{d}")
                  for d in defect_names}

    result = {
        "category": str(cat_dir.resolve()),
        "n_images": len(samples),
        "n_pixel_images": sum(m is not None for m in masks),
        "overall": overall,
        "per_defect": per_defect,
        "seconds_per_image": infer_seconds / len(samples),
        "seconds_total": time.perf_counter() - t_start,
        "missing_masks": missing,
        "skipped_files": skipped,
        "undefined_metrics": undefined,
        "images": [
            {"path": str(Path(s.path).resolve()), "defect": s.defect, "label": int(s.label),
             "score": float(sc), "mask": str(Path(s.mask_path).resolve()) if s.mask_path else None}
            for s, sc in zip(samples, scores)
        ],
    }
    calibrated = getattr(model, "calibration", None) is not None
    if calibrated and fpr is not None:
        model.calibration.image_threshold(fpr, stacklevel=2)  # warns if out of reach
    if not calibrated and (fpr is not None or pixel_fpr is not None):
        warnings.warn("this model has no calibration (fitted with calibration_fraction 0): fpr / "
                      "pixel_fpr are ignored and no decisions are made", stacklevel=2)
    thresholds = model.thresholds(fpr, pixel_fpr) if calibrated else None
    if thresholds is not None:
        p_values = model.calibration.p_values(scores)
        flagged = scores > thresholds["image_threshold"]
        for entry, p, f in zip(result["images"], p_values, flagged):
            entry["p_value"], entry["anomalous"] = float(p), bool(f)
        result["thresholds"] = thresholds
        result["realized"] = realized_rates(flagged, labels, maps, masks, thresholds["pixel_threshold"])
    result = to_jsonable(result)
    if return_maps:
        return result, maps
    return result


def format_metric(value, spec: str = ".3f") -> str:
    """``value`` (a number or ``None``) formatted with the format ``spec``; ``spec="d"`` gives
    an integer. ``None``, NaN and ±Inf (an undefined metric) give ``"n/a"``."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return str(int(value)) if spec == "d" else format(float(value), spec)


TABLE_COLUMNS = (
    ("image AUROC", "image_auroc"),
    ("pixel AUROC", "pixel_auroc"),
    ("AU-PRO@0.3", "au_pro_0.3"),
    ("F1-max (image)", "image_f1_max"),
)


def table_lines(rows: list[tuple[str, dict]], first: str = "defect") -> list[str]:
    """Aligned text lines: a header and one row per ``(name, metrics dict)``."""
    header = [first] + [c for c, _ in TABLE_COLUMNS] + ["n images (with good)"]
    body = [[name] + [format_metric(m.get(k)) for _, k in TABLE_COLUMNS] + [str(m.get("n_images", ""))]
            for name, m in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    return out


def markdown_table(rows: list[tuple[str, dict]], first: str = "category") -> str:
    """The metrics of :func:`table_lines` as a Markdown table (one row per ``(name, metrics
    dict)``), ending in a newline."""
    head = [first] + [c for c, _ in TABLE_COLUMNS] + ["n images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows:
        cells = [name] + [format_metric(m.get(k)) for _, k in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells + [str(m.get("n_images", ""))]) + " |")
    return "\n".join(lines) + "\n"


def format_table(result: dict) -> str:
    """Plain aligned text table of an :func:`evaluate` result.

    Rows: ``overall`` then each defect (good + that defect's images); columns: image AUROC,
    pixel AUROC, AU-PRO@0.3, image F1-max, number of images. Undefined values show ``n/a``.
    """
    rows = [("overall", result["overall"])]
    rows += [(d, m) for d, m in result.get("per_defect", {}).items()]
    lines = table_lines(rows)
    th, real = result.get("thresholds"), result.get("realized")
    if th and real:
        fa, ci, miss = real.get("false_alarm_rate"), real.get("false_alarm_rate_ci"), real.get("miss_rate")
        lines.append("")
        note = ""
        if th.get("guaranteed_fpr", 0) > th["target_fpr"]:
            note = (f"; too few to guarantee it: guaranteed only {th['guaranteed_fpr']:.3g}, "
                    "flagging above every held-out score")
        lines.append(f"decisions at target false-alarm rate {th['target_fpr']:g} "
                     f"(image threshold {th['image_threshold']:.4g}, {th['n_calibration']} held-out "
                     f"normal images{note}):")
        lines.append(f"  false alarms {format_metric(fa)} of {real['n_normal']} normal images"
                     + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
                     + f"; misses {format_metric(miss)} of {real['n_anomalous']} anomalous images")
    return "\n".join(lines) + "\n"
