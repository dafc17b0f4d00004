"""Self-contained HTML reports of an evaluation or a prediction run.

* :func:`write_evaluation_report` -- metrics table, calibrated thresholds (if any), image ROC,
  pixel ROC and PRO curves, score histogram and a gallery of overlays sorted worst first.
* :func:`write_prediction_report` -- score table, histogram and gallery, most anomalous first.

The page needs no network: plots (matplotlib, Agg, no pyplot state) and thumbnails are inline
base64 PNG ``data:`` URIs, the CSS is inline and there is no JavaScript. Scores, thresholds and
maps are in the model's energy units (higher = more anomalous). In the gallery the ground-truth
contour is white (:data:`pedenet.visualization.CONTOUR_COLOR`) and the predicted contour (the
boundary of ``map > pixel_threshold``, only with calibrated thresholds; strict, as in
:func:`pedenet.evaluation.realized_rates`) is :data:`PRED_COLOR`.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["PRED_COLOR", "THUMB_SIDE", "write_evaluation_report", "write_prediction_report"]

PRED_COLOR = (255, 0, 255)
"""RGB colour (magenta) of the predicted contour in the gallery: not in the jet colormap."""

THUMB_SIDE = 256
"""Longest side, in pixels, of the gallery thumbnails."""

MAX_PLOT_PIXELS = 1_000_000
"""The pixel ROC is drawn from a deterministic random sample of at most about this many pixels."""

_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}td:first-child,th:first-child{text-align:left}th{background:#eee}
.plots{display:flex;flex-wrap:wrap;gap:1em}.note{color:#666;font-style:italic}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:10px}
.card{border:3px solid #ccc;padding:4px;font-size:13px;word-break:break-all}
.card.wrong{border-color:#d22}.card img{display:block;max-width:100%}"""


def _fmt(value, spec: str = ".4f") -> str:
    """:func:`pedenet.evaluation.format_metric` with four decimals by default."""
    from .evaluation import format_metric

    return format_metric(value, spec)


def _png_uri(data) -> str:
    """``data:`` URI of a PNG: ``data`` is a matplotlib Figure or a uint8 H×W×3 array."""
    buf = io.BytesIO()
    if isinstance(data, np.ndarray):
        Image.fromarray(data).save(buf, format="PNG")
    else:
        data.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot(draw, xlabel: str, ylabel: str, title: str) -> str:
    """``<img>`` of a 5×3.6 inch figure; ``draw(ax)`` fills the axes. No pyplot, nothing leaks."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6))
    ax = fig.add_subplot()
    draw(ax)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, framealpha=0.6)
    return f'<img alt="{html.escape(title)}" src="{_png_uri(fig)}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _resize(a: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size, resample))


def _thumbnail(path, amap: np.ndarray, mask: np.ndarray | None, color_range,
               pixel_threshold: float | None) -> np.ndarray:
    """uint8 h×w×3 overlay, long side <= THUMB_SIDE: heatmap, ground truth (white) and predicted
    (magenta) contours. Contours are drawn at thumbnail size so that they stay one pixel wide;
    masks are shrunk with "any pixel covered" so thin defects do not vanish."""
    from scipy import ndimage

    from .data import load_image
    from .visualization import heatmap_overlay

    image = load_image(path)
    h, w = amap.shape
    scale = min(1.0, THUMB_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pred = None if pixel_threshold is None else amap > pixel_threshold
    if scale < 1.0:
        image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
        image = _resize(image, size, Image.LANCZOS)
        amap = _resize(np.asarray(amap, np.float32), size, Image.BILINEAR)
        shrink = lambda m: _resize(m.astype(np.float32), size, Image.BOX) > 0  # noqa: E731
        mask = None if mask is None else shrink(mask)
        pred = None if pred is None else shrink(pred)
    out = heatmap_overlay(image, amap, *color_range, mask=mask)
    if pred is not None and pred.any():
        out[pred & ~ndimage.binary_erosion(pred, border_value=0)] = PRED_COLOR
    return out


def _gallery(cards: list[tuple], color_range, pixel_threshold, legend: str) -> str:
    """Cards from ``(path, map, mask, lines, wrong, flagged)`` tuples; ``lines``: (label, text)
    pairs. The predicted contour is drawn on flagged images only, like the masks ``predict``
    writes (an image that passes has an empty mask)."""
    out = []
    for path, amap, mask, lines, wrong, flagged in cards:
        uri = _png_uri(_thumbnail(path, amap, mask, color_range,
                                  pixel_threshold if flagged else None))
        name = html.escape(Path(path).name)
        info = "".join(f"<br>{html.escape(k)}: {html.escape(v)}" for k, v in lines)
        out.append(f'<div class="card{" wrong" if wrong else ""}"><img alt="{name}" src="{uri}">'
                   f'<b class="name" title="{html.escape(str(path))}">{name}</b>{info}</div>')
    lo, hi = color_range
    scale = "min to max of each image" if lo is None or hi is None else f"{lo:.4g} to {hi:.4g}"
    legend = f"heatmap: blue to red = anomaly map value {scale}{legend}"
    if pixel_threshold is not None:
        legend += "; magenta contour: predicted defect (map > pixel threshold, flagged images)"
    return f'{_note(legend)}<div class="gallery">{"".join(out)}</div>'


def _histogram(scores: np.ndarray, labels: np.ndarray | None, threshold: float | None,
               reference: np.ndarray | None = None) -> str:
    """Score histogram (normal vs anomalous when ``labels`` is given), threshold line if any.

    ``reference``: the held-out normal scores of the calibration, drawn as an outline; both
    histograms are then normalized to the fraction of their images per bin.
    """
    ref = None if reference is None or len(reference) == 0 else np.asarray(reference, dtype=np.float64)

    def draw(ax):
        both = scores if ref is None else np.concatenate([scores, ref])
        edges = np.histogram_bin_edges(both, bins=min(40, max(5, scores.size // 2)))
        if labels is None:
            ax.hist(scores, bins=edges, color="tab:blue", label="images",
                    weights=None if ref is None else np.full(scores.size, 1 / scores.size))
        else:
            for lab, name, c in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
                if (labels == lab).any():
                    ax.hist(scores[labels == lab], bins=edges, alpha=0.6, color=c, label=name)
        if ref is not None:
            ax.hist(ref, bins=edges, histtype="step", color="k", lw=1.2,
                    weights=np.full(ref.size, 1 / ref.size),
                    label=f"held-out normal images ({ref.size}, calibration)")
        if threshold is not None:
            ax.axvline(threshold, color="k", ls="--", label=f"image threshold {threshold:.4g}")
    return _plot(draw, "image score", "images" if ref is None else "fraction of images",
                 "Image scores")


def _roc_plot(y: np.ndarray, s: np.ndarray, what: str, point=None, value: float | None = None) -> str:
    """ROC curve of labels ``y`` (bool) and scores ``s``; ``point``: (fpr, tpr) operating point;
    ``value``: the exact AUROC for the legend when the curve is drawn from a sample."""
    from sklearn.metrics import auc, roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    value = auc(fpr, tpr) if value is None else value

    def draw(ax):
        ax.plot(fpr, tpr, label=f"{what} AUROC = {value:.4f}")
        ax.plot([0, 1], [0, 1], color="0.7", ls=":")
        if point is not None:
            ax.plot(*point, "ko", label="calibrated threshold")
    return _plot(draw, "false positive rate", "true positive rate", f"{what.capitalize()} ROC")


def _pixel_plots(maps: list[np.ndarray], masks: list, exact_auroc: float | None = None) -> str:
    """Pixel ROC (subsampled) and PRO curve over the images with ground truth."""
    from .metrics import pro_curve

    idx = [i for i, m in enumerate(masks) if m is not None]
    n_anom = sum(int(masks[i].sum()) for i in idx)
    total = sum(masks[i].size for i in idx)
    if not idx or n_anom == 0 or n_anom == total:
        return _note("Pixel ROC and PRO curves: undefined (no ground-truth mask with both "
                     "anomalous and normal pixels).")
    rng = np.random.default_rng(0)
    frac = min(1.0, MAX_PLOT_PIXELS / total)
    ys, ss = [], []
    for i in idx:
        m, k = maps[i].ravel(), masks[i].ravel()
        sel = rng.integers(0, m.size, math.ceil(m.size * frac)) if frac < 1 else slice(None)
        ss.append(m[sel])
        ys.append(k[sel])
    roc = _roc_plot(np.concatenate(ys), np.concatenate(ss), "pixel",
                    value=exact_auroc if frac < 1 else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fpr, pro = pro_curve([maps[i] for i in idx], [masks[i] for i in idx], 0.3)
    area = float(np.sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]) / 2) / 0.3)
    keep = np.unique(np.linspace(0, fpr.size - 1, min(fpr.size, 5000)).astype(int))

    def draw(ax):
        ax.plot(fpr[keep], pro[keep], color="tab:green", label=f"AU-PRO@0.3 = {area:.4f}")
        ax.set(xlim=(0, 0.3), ylim=(0, 1.02))
    pro_img = _plot(draw, "false positive rate (pixels)", "per-region overlap", "PRO curve")
    n = sum(map(len, ys))
    return roc + pro_img + ("" if frac == 1 else _note(f"Pixel ROC drawn from {n} sampled pixels."))


def _worst_first(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices sorted by wrongness (descending), then score (descending), then index.

    Wrongness of a defective image: the fraction of normal images scoring >= its score; of a
    normal image: the fraction of defective images scoring <= its score (0 if the other class
    is absent)."""
    normal, anom = np.sort(scores[labels == 0]), np.sort(scores[labels != 0])
    wrong = np.zeros(scores.size)
    if normal.size and anom.size:
        d = labels != 0
        wrong[d] = (normal.size - np.searchsorted(normal, scores[d], "left")) / normal.size
        wrong[~d] = np.searchsorted(anom, scores[~d], "right") / anom.size
    return np.lexsort((np.arange(scores.size), -scores, -wrong))


def _table(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _page(path, title: str, sections: list[str]) -> Path:
    """Assemble the page and write it atomically (UTF-8)."""
    from .checkpoint import atomic_write_bytes

    text = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>'
            f"{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))
    return Path(path)


def _check(items: list, maps: list, what: str) -> None:
    if len(items) != len(maps):
        raise ValueError(f"{len(items)} {what} but {len(maps)} anomaly maps")


def _word(anomalous) -> str:
    return "n/a" if anomalous is None else ("anomalous" if anomalous else "normal")


def _decision(d: dict) -> list[tuple[str, str]]:
    """Card lines of an image dict: score, and p-value / decision when present."""
    out = [("score", _fmt(d.get("score"), ".4g"))]
    if d.get("p_value") is not None:
        out.append(("p-value", _fmt(d["p_value"], ".3g")))
    if d.get("anomalous") is not None:
        out.append(("decision", _word(d["anomalous"])))
    return out


_THRESHOLD_ROWS = (("target false-alarm rate", "target_fpr", ".4f"),
                   ("smallest guaranteed rate, 1/(n+1)", "achievable_fpr", ".4f"),
                   ("guaranteed false-alarm rate", "guaranteed_fpr", ".4f"),
                   ("image threshold", "image_threshold", ".6g"),
                   ("target pixel false-alarm rate (masks)", "pixel_fpr", ".4f"),
                   ("pixel threshold", "pixel_threshold", ".6g"),
                   ("calibration images", "n_calibration", "d"))


def _threshold_section(th: dict, real: dict | None = None) -> str:
    """Table of the calibrated thresholds, and of the realized rates when ``real`` is given."""
    rows = [[name, _fmt(th[key], spec)] for name, key, spec in _THRESHOLD_ROWS if key in th]
    if real is not None:
        lo, hi = real.get("false_alarm_rate_ci") or (None, None)
        ci = f" (95% CI {_fmt(lo)} to {_fmt(hi)})" if lo is not None else ""
        rows += [[f"realized false-alarm rate ({_fmt(real.get('n_normal'), 'd')} normal)",
                  _fmt(real.get("false_alarm_rate")) + ci],
                 [f"realized miss rate ({_fmt(real.get('n_anomalous'), 'd')} anomalous)",
                  _fmt(real.get("miss_rate"))]]
        if "pixel_false_alarm_rate" in real:
            rows.append(["realized pixel false-alarm rate (normal images)",
                         _fmt(real["pixel_false_alarm_rate"])])
    return '<h2 id="thresholds">Calibrated thresholds</h2>' + _table(["", "value"], rows)


METRIC_COLUMNS = (("image AUROC", "image_auroc"), ("image F1-max", "image_f1_max"),
                  ("pixel AUROC", "pixel_auroc"), ("pixel F1-max", "pixel_f1_max"),
                  ("AU-PRO@0.3", "au_pro_0.3"))


def write_evaluation_report(path, result: dict, maps: list[np.ndarray], *,
                            color_range: tuple[float | None, float | None] = (None, None),
                            title: str = "pedenet evaluation", max_gallery: int = 60) -> Path:
    """Write the HTML report of a :func:`pedenet.evaluation.evaluate` result to ``path``.

    Args:
        path: the ``.html`` file to write (atomically; folders are created).
        result: the result dict (optionally with ``thresholds``, ``realized`` and per-image
            ``p_value``/``anomalous`` from a calibrated model).
        maps: ``maps[i]`` = float32 H×W anomaly map (energy units, image size) of
            ``result["images"][i]``.
        color_range: ``(vmin, vmax)`` of the heatmap colours (energy units); ``None`` = per image.
        max_gallery: at most this many gallery cards (worst first, see :func:`_worst_first`).

    Returns:
        ``Path(path)``. Raises ``ValueError`` if ``maps`` and ``result["images"]`` differ in count.
    """
    from .data import load_mask

    images = result["images"]
    _check(images, maps, "result images")
    scores = np.array([float(d["score"]) for d in images])
    labels = np.array([int(d["label"]) for d in images])
    masks = [load_mask(d["mask"], expected_shape=m.shape) if d.get("mask")
             else (np.zeros(m.shape, bool) if d["label"] == 0 else None)
             for d, m in zip(images, maps)]
    th = result.get("thresholds") or None
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    s = [f"<h1>{html.escape(title)}</h1>",
         f"<p>category: <code>{html.escape(str(result.get('category', '')))}</code><br>"
         f"images: {len(images)} ({int((labels == 0).sum())} normal, "
         f"{int((labels != 0).sum())} anomalous)<br>date: {date}</p>", "<h2>Metrics</h2>"]
    groups = [("overall", result.get("overall", {}))] + list(result.get("per_defect", {}).items())
    s.append(_table(["group"] + [c for c, _ in METRIC_COLUMNS] + ["images"],
                    [[g] + [_fmt(m.get(k)) for _, k in METRIC_COLUMNS]
                     + [_fmt(m.get("n_images"), "d")] for g, m in groups]))
    point = None
    if th:
        s.append(_threshold_section(th, result.get("realized") or {}))
        if labels.any() and not labels.all():  # the decisions' (FPR, TPR) on the ROC
            flags = [d.get("anomalous") for d in images]
            hit = (np.array(flags, bool) if None not in flags
                   else scores > th["image_threshold"])
            point = (hit[labels == 0].mean(), hit[labels != 0].mean())
    s.append('<h2>Curves</h2><div class="plots">')
    if labels.any() and not labels.all():
        s.append(_roc_plot(labels != 0, scores, "image", point))
    else:
        s.append(_note("Image ROC: undefined (the test set needs normal and anomalous images)."))
    s.append(_pixel_plots(maps, masks, (result.get("overall") or {}).get("pixel_auroc")))
    s.append(_histogram(scores, labels, th["image_threshold"] if th else None) + "</div>")
    order = _worst_first(scores, labels)[:max(0, max_gallery)]
    decided = [d.get("anomalous") for d in images]
    cards = [(images[i]["path"], maps[i], masks[i],
              [("defect", str(images[i].get("defect")))] + _decision(images[i]),
              decided[i] is not None and bool(decided[i]) != bool(labels[i]),
              bool(decided[i])) for i in order]
    s.append(f"<h2>Gallery: {len(order)} of {len(images)} images, worst first</h2>")
    legend = "; white contour: ground truth" + ("; red frame: wrong decision" if th else "")
    s.append(_gallery(cards, color_range, th["pixel_threshold"] if th else None, legend))
    return _page(path, title, s)


def write_prediction_report(path, rows: list[dict], maps: list[np.ndarray], *,
                            color_range: tuple[float | None, float | None] = (None, None),
                            thresholds: dict | None = None, title: str = "pedenet predictions",
                            max_gallery: int = 60, reference_scores: np.ndarray | None = None) -> Path:
    """Write the HTML report of a prediction run to ``path``.

    Args:
        rows: one dict per image: ``path``, ``score`` (energy), ``p_value`` (float or None),
            ``anomalous`` (bool or None).
        maps: ``maps[i]`` = float32 H×W anomaly map of ``rows[i]``; None is allowed for
            images that do not reach the gallery (the ``max_gallery`` highest scores), so a
            caller need not keep every map in memory.
        thresholds: calibrated thresholds (see :func:`write_evaluation_report`) or ``None``
            (no threshold line, no predicted contour).
        color_range, title, max_gallery: as for :func:`write_evaluation_report`.
        reference_scores: float (n,) image scores of the model's held-out normal images
            (``Calibration.scores``), drawn over the histogram so that a user sees where the
            new scores fall against known normal ones; None draws none.

    Returns:
        ``Path(path)``. The table and the gallery are sorted by score, highest first.
    """
    _check(rows, maps, "rows")
    scores = np.array([float(r["score"]) for r in rows])
    order = np.lexsort((np.arange(scores.size), -scores))
    th = thresholds or None
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    n_anom = sum(bool(r.get("anomalous")) for r in rows)
    s = [f"<h1>{html.escape(title)}</h1>", f"<p>images: {len(rows)}"
         + (f" ({n_anom} anomalous)" if th else "") + f"<br>date: {date}</p>"]
    if th:
        s.append(_threshold_section(th))
    s += ["<h2>Scores</h2>", _histogram(scores, None, th["image_threshold"] if th else None, reference_scores),
          _table(["#", "file", "score", "p-value", "decision"],
                 [[str(k + 1), Path(rows[i]["path"]).name, _fmt(scores[i], ".6g"),
                   _fmt(rows[i].get("p_value"), ".3g"), _word(rows[i].get("anomalous"))]
                  for k, i in enumerate(order)])]
    cards = [(rows[i]["path"], maps[i], None, _decision(rows[i]), False, bool(rows[i].get("anomalous")))
             for i in order[:max(0, max_gallery)]]
    s.append(f"<h2>Gallery: {len(cards)} of {len(rows)} images, most anomalous first</h2>")
    s.append(_gallery(cards, color_range, th["pixel_threshold"] if th else None, ""))
    return _page(path, title, s)
