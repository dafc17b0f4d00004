"""Evaluation metrics for image anomaly detection and localization.

Image-level metrics work on one score and one label per image:

* :func:`image_auroc` -- ROC AUC of image scores.
* :func:`f1_max` -- best F1 over all thresholds.
* :func:`image_scores_from_maps` -- image score = maximum of its anomaly map.

Pixel-level metrics pool all pixels of all images (images may differ in size):

* :func:`pixel_auroc` -- ROC AUC over all pixels.
* :func:`pixel_f1_max` -- best F1 over all thresholds, over all pixels.
* :func:`au_pro` -- normalized area under the per-region-overlap (PRO) curve up to a false
  positive rate limit (MVTec AD official evaluation; Bergmann et al., "The MVTec Anomaly
  Detection Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection",
  IJCV 2021).
* :func:`pixel_metrics` -- all of the above pixel metrics from a single sort (cheaper than
  calling them one by one on large inputs).

Conventions
-----------
Higher scores mean "more anomalous". In masks and labels any nonzero value (``1``, ``255``,
``True``) marks an anomalous pixel or image; zero marks a normal one. Image labels must be
whole numbers (a fractional label raises ValueError: it usually means the scores and labels
were swapped; the order here is scores first, the reverse of scikit-learn's).

When a metric is undefined for the given data (e.g. no anomalous or no normal pixels for a
ROC AUC, no anomalous region for AU-PRO) the function returns ``float('nan')`` and emits an
:class:`UndefinedMetricWarning`; it never raises for that reason. Malformed inputs (count or
shape mismatch, non-finite scores, wrong dimensionality, empty input) raise ``ValueError``.

Implementation notes
--------------------
The pixel metrics sort all pooled pixel scores once (descending) and read every curve off
cumulative counts at the last index of each group of tied scores, i.e. one curve point per
distinct threshold, thresholds inclusive (``score >= t`` is predicted anomalous). Counts of
true/false positives are exact integers, so the ROC and F1 values agree with scikit-learn's
``roc_auc_score`` / ``precision_recall_curve`` to rounding error (~1e-12) while using a
fraction of the time and memory. For float32 (or smaller) scores the sort is a single
in-place ``np.sort`` of packed uint64 keys (score bits | payload), about 12 bytes per pooled
pixel of working memory (~0.6 GB and a few seconds at 50 million pixels); float64 scores
fall back to ``np.argsort`` (~24 bytes per pixel, roughly 4x slower).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "UndefinedMetricWarning",
    "image_auroc",
    "pixel_auroc",
    "au_pro",
    "pro_curve",
    "f1_max",
    "pixel_f1_max",
    "image_scores_from_maps",
    "pixel_metrics",
]

# 8-connectivity for the regions of AU-PRO (MVTec AD official evaluation).
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)

# Elements processed per step in the chunked reductions (bounds temporary memory).
_CHUNK = 1 << 22


class UndefinedMetricWarning(UserWarning):
    """Warning emitted when a metric is undefined for the given data and NaN is returned."""


def _undefined(metric: str, reason: str, stacklevel: int = 3) -> float:
    warnings.warn(
        f"{metric} is undefined: {reason}; returning NaN.",
        UndefinedMetricWarning,
        stacklevel=stacklevel,
    )
    return float("nan")


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def _as_image_list(arrays, name: str) -> list[np.ndarray]:
    """Turn a sequence of 2-D arrays or an N×H×W array into a list of 2-D arrays."""
    if isinstance(arrays, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of 2-D arrays or an N×H×W array")
    if hasattr(arrays, "ndim") and hasattr(arrays, "shape") and not isinstance(arrays, list):
        arr = np.asarray(arrays)
        if arr.ndim != 3:
            raise ValueError(
                f"{name} given as one array must be 3-D (N×H×W), got shape {arr.shape}"
            )
        out = list(arr)
    else:
        try:
            out = [np.asarray(a) for a in arrays]
        except TypeError:
            raise ValueError(
                f"{name} must be a sequence of 2-D arrays or an N×H×W array, "
                f"got {type(arrays).__name__}"
            ) from None
    if len(out) == 0:
        raise ValueError(f"{name} is empty: at least one image is required")
    for i, a in enumerate(out):
        if a.ndim != 2:
            raise ValueError(f"{name}[{i}] must be 2-D (H×W), got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"{name}[{i}] is empty (shape {a.shape})")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ValueError(f"{name}[{i}] must be numeric, got dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.complexfloating):
            raise ValueError(f"{name}[{i}] must be real-valued, got dtype {a.dtype}")
    return out


def _check_finite(a: np.ndarray, name: str, index: int | None = None) -> None:
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        n_nan = int(np.isnan(a).sum())
        n_inf = int(np.isinf(a).sum())
        where = f"{name}[{index}]" if index is not None else name
        raise ValueError(
            f"{where} contains non-finite values ({n_nan} NaN, {n_inf} Inf); "
            "scores must be finite"
        )


def _score_dtype(arrays: Sequence[np.ndarray]) -> np.dtype:
    """float32 unless some input needs float64 to be represented exactly."""
    dt = np.result_type(*[a.dtype for a in arrays], np.float32)
    return np.dtype(np.float32) if dt == np.float32 else np.dtype(np.float64)


def _validate_maps_masks(maps, masks) -> tuple[list[np.ndarray], list[np.ndarray]]:
    map_list = _as_image_list(maps, "maps")
    mask_list = _as_image_list(masks, "masks")
    if len(map_list) != len(mask_list):
        raise ValueError(
            f"maps and masks differ in count: {len(map_list)} maps, {len(mask_list)} masks"
        )
    for i, (m, g) in enumerate(zip(map_list, mask_list)):
        if m.shape != g.shape:
            raise ValueError(
                f"image {i}: map shape {m.shape} differs from mask shape {g.shape}"
            )
        _check_finite(m, "maps", i)
        if np.issubdtype(g.dtype, np.floating) and not np.isfinite(g).all():
            raise ValueError(f"masks[{i}] contains NaN or Inf values")
    return map_list, mask_list


def _validate_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (one score per image), got shape {s.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (one label per image), got shape {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(
            f"scores and labels differ in length: {s.shape[0]} scores, {y.shape[0]} labels"
        )
    if s.shape[0] == 0:
        raise ValueError("scores and labels are empty")
    if not (np.issubdtype(s.dtype, np.number) or s.dtype == np.bool_) or np.issubdtype(
        s.dtype, np.complexfloating
    ):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_) or np.issubdtype(
        y.dtype, np.complexfloating
    ):
        raise ValueError(f"labels must be numeric or boolean, got dtype {y.dtype}")
    if np.issubdtype(s.dtype, np.floating) and not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s))
        raise ValueError(
            f"scores contain non-finite values at index {int(bad[0])}"
            + (f" (and {bad.size - 1} more)" if bad.size > 1 else "")
        )
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        raise ValueError("labels contain NaN or Inf values")
    _check_whole_labels(y)
    return s, y != 0


def _check_whole_labels(y: np.ndarray) -> None:
    """Image labels are 0 (normal) or nonzero whole numbers / booleans (anomalous): a
    fractional value means scores were passed in their place (arguments swapped). (Masks
    may be soft: any nonzero pixel is anomalous, so they are not checked.)"""
    fractional = np.issubdtype(y.dtype, np.floating) and y != np.round(y)
    if np.any(fractional):
        raise ValueError(f"labels must be 0 (normal) or whole numbers / booleans (anomalous); got "
                         f"{float(y[fractional][0]):g} - were scores passed in their place? The "
                         "order is (scores, labels): the reverse of scikit-learn's (y_true, y_score)")


def _validate_fpr_limit(fpr_limit) -> float:
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, numbers.Real):
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
    lim = float(fpr_limit)
    if not (0.0 < lim <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return lim


# --------------------------------------------------------------------------------------
# Pixel engine: one global sort, one chunked pass in descending score order
# --------------------------------------------------------------------------------------


def _ordered_bits(m: np.ndarray) -> np.ndarray:
    """Map float32 values to uint32 keys with the same order (ties stay ties)."""
    f = m.astype(np.float32, copy=True).ravel()
    f += np.float32(0.0)  # -0.0 -> +0.0, so that the two zeros tie
    b = f.view(np.uint32)
    negative = b >= np.uint32(0x80000000)
    return np.where(negative, ~b, b | np.uint32(0x80000000))


def _payloads(map_list, mask_list, with_regions: bool):
    """Per-image payload (uint32, flat): global region id (1..R) or 1 for anomalous; 0 normal.

    Returns (payload list, inverse region sizes (float64, index 0 unused) or None, R).
    """
    payloads = []
    sizes = [np.zeros(1)]
    n_regions = 0
    for g in mask_list:
        anomalous = g != 0
        if not with_regions:
            payloads.append(anomalous.ravel().astype(np.uint32))
            continue
        labels, n = ndimage.label(anomalous, structure=_STRUCTURE_8)
        lab = labels.ravel().astype(np.uint32, copy=False)
        if n:
            if n_regions + n > 0xFFFFFFFF:
                raise ValueError("more than 2**32 - 1 anomalous regions are not supported")
            sizes.append(np.bincount(lab, minlength=n + 1)[1:].astype(np.float64))
            lab = np.where(lab > 0, lab + np.uint32(n_regions), np.uint32(0)).astype(np.uint32)
            n_regions += n
        payloads.append(lab)
    if not with_regions:
        return payloads, None, 0
    inv_sizes = np.concatenate(sizes)
    inv_sizes[1:] = 1.0 / inv_sizes[1:]
    return payloads, inv_sizes, n_regions


class _SortedPixels:
    """Pooled pixels sorted by score; chunks read in descending order.

    float32 scores: a single in-place ``np.sort`` of uint64 keys (order-preserving score
    bits in the high 32 bits, payload in the low 32 bits) -- no argsort, no gathers.
    float64 scores: ``np.argsort`` of the scores, payload gathered chunk by chunk.
    """

    def __init__(self, map_list, payloads, dtype: np.dtype):
        self.n = n = sum(m.size for m in map_list)
        self.packed = dtype == np.float32
        if self.packed:
            key = np.empty(n, dtype=np.uint64)
            pos = 0
            for m, p in zip(map_list, payloads):
                k = key[pos : pos + m.size]
                np.left_shift(_ordered_bits(m), np.uint64(32), out=k, dtype=np.uint64)
                k |= p
                pos += m.size
            key.sort()
            self.key_desc = key[::-1]
        else:
            scores = np.empty(n, dtype=np.float64)
            payload = np.empty(n, dtype=np.uint32)
            pos = 0
            for m, p in zip(map_list, payloads):
                scores[pos : pos + m.size] = m.ravel()
                scores[pos : pos + m.size] += 0.0  # -0.0 -> +0.0
                payload[pos : pos + m.size] = p
                pos += m.size
            self.order_desc = np.argsort(scores)[::-1]
            self.scores = scores
            self.payload = payload

    def chunk(self, i0: int, i1: int, j1: int):
        """Group values for positions [i0, j1) and payloads for [i0, i1), descending."""
        if self.packed:
            k = self.key_desc[i0:j1]
            return k >> np.uint64(32), k[: i1 - i0] & np.uint64(0xFFFFFFFF)
        idx = self.order_desc[i0:j1]
        return self.scores[idx], self.payload[idx[: i1 - i0]]


def _sweep(sp: "_SortedPixels", inv_sizes: np.ndarray, need_weights):
    """The descending sweep over the sorted pixels, one chunk at a time.

    Yields, per chunk, the curve points at the last index of each group of tied scores:
    ``(tp, fp, w)``: int64 anomalous / normal pixel counts so far (exact), and float64 running
    sums of 1/region_size over anomalous pixels, or None when ``need_weights()`` (asked once
    per chunk) is False. Memory beyond the sorted keys is O(chunk).
    """
    n = sp.n
    cum_tp = 0  # anomalous pixels before the chunk
    cum_w = 0.0  # summed region weights before the chunk
    for i0 in range(0, n, _CHUNK):
        i1 = min(i0 + _CHUNK, n)
        g, p = sp.chunk(i0, i1, min(i1 + 1, n))
        is_end = np.empty(i1 - i0, dtype=bool)
        np.not_equal(g[: i1 - i0 - 1], g[1 : i1 - i0], out=is_end[:-1])
        is_end[-1] = True if i1 == n else bool(g[i1 - i0 - 1] != g[i1 - i0])
        del g
        idx = np.flatnonzero(is_end)
        del is_end
        cum = np.cumsum(p != 0, dtype=np.int64)
        w = None
        if need_weights():
            w = np.cumsum(inv_sizes[p])
            w += cum_w
            cum_w = float(w[-1])
        if idx.size:
            tp = cum[idx] + cum_tp
            yield tp, (idx + (i0 + 1)) - tp, (None if w is None else w[idx])
        cum_tp += int(cum[-1])
        del p, cum, idx


def _pixel_pass(map_list, mask_list, limits: list[float]) -> dict:
    """Sweep all distinct thresholds once (descending) and reduce every pixel metric.

    At the last index of each group of tied scores (one curve point per distinct score):
    TP = anomalous pixels so far (exact integer), FP = pixels so far - TP, and for AU-PRO the
    running sum of 1/region_size over anomalous pixels (divided by the number of regions).
    ROC AUC is accumulated by the trapezoidal rule on integer counts, F1-max as
    max 2TP / (TP + FP + P), and each AU-PRO area on the fly up to its FPR limit, so no
    curve is stored (memory beyond the sorted keys is O(chunk)).
    """
    with_regions = bool(limits)
    payloads, inv_sizes, n_regions = _payloads(map_list, mask_list, with_regions)
    n_pos = sum(int(np.count_nonzero(p)) for p in payloads)
    sp = _SortedPixels(map_list, payloads, _score_dtype(map_list))
    del payloads
    n = sp.n
    n_neg = n - n_pos

    want_pro = with_regions and n_regions > 0 and n_neg > 0
    pro_areas = [_TrapezoidTo(lim) for lim in limits] if want_pro else []

    auc_sum = 0.0
    f1_best = 0.0
    prev_tp = prev_fp = 0  # last curve point
    for tp, fp, w in _sweep(sp, inv_sizes, lambda: any(not a.done for a in pro_areas)):
        tp_f = tp.astype(np.float64)
        fp_f = fp.astype(np.float64)
        # ROC trapezoids: dFP * (TP + TP_prev) / 2 -- integer-valued products.
        d_fp = np.diff(fp_f, prepend=float(prev_fp))
        s_tp = tp_f + np.concatenate(([float(prev_tp)], tp_f[:-1]))
        auc_sum += float(np.dot(d_fp, s_tp))
        if n_pos:
            f1_best = max(f1_best, float(np.max(2.0 * tp_f / (tp_f + fp_f + n_pos))))
        if w is not None:
            fpr = fp_f / n_neg
            pro = np.clip(w / n_regions, 0.0, 1.0)
            for a in pro_areas:
                a.add(fpr, pro)
        prev_tp, prev_fp = int(tp[-1]), int(fp[-1])

    return {
        "n_pos": n_pos,
        "n_neg": n_neg,
        "n_regions": n_regions,
        "auroc": auc_sum / (2.0 * n_pos * n_neg) if n_pos and n_neg else float("nan"),
        "f1_max": f1_best,
        "aupro": {a.x_max: a.area / a.x_max for a in pro_areas},
    }


class _TrapezoidTo:
    """Streaming trapezoidal area under a curve with non-decreasing x over [0, x_max].

    The curve starts at (0, 0); points are fed in order, in chunks. If ``x_max`` falls
    between two points, the curve is linearly interpolated there. Equivalent to the
    MVTec AD ``trapezoid(x, y, x_max)`` on the whole curve.
    """

    def __init__(self, x_max: float):
        self.x_max = x_max
        self.area = 0.0
        self.done = False
        self.x_prev = 0.0
        self.y_prev = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.done:
            return
        xs = np.concatenate(([self.x_prev], x))
        ys = np.concatenate(([self.y_prev], y))
        k = int(np.searchsorted(xs, self.x_max, side="right"))  # xs[:k] <= x_max
        self.area += float(np.sum(0.5 * (ys[1:k] + ys[: k - 1]) * (xs[1:k] - xs[: k - 1])))
        if k < xs.size:  # xs[k] > x_max >= xs[k - 1]: the limit is crossed here
            x0, x1, y0, y1 = float(xs[k - 1]), float(xs[k]), float(ys[k - 1]), float(ys[k])
            if x0 < self.x_max:
                y_at = y0 + (y1 - y0) * (self.x_max - x0) / (x1 - x0)
                self.area += 0.5 * (y0 + y_at) * (self.x_max - x0)
            self.done = True
        else:
            self.x_prev, self.y_prev = float(xs[-1]), float(ys[-1])


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def image_scores_from_maps(maps) -> np.ndarray:
    """Image-level anomaly scores: the maximum of each anomaly map.

    Parameters
    ----------
    maps : sequence of 2-D arrays (H_i×W_i, sizes may differ) or an N×H×W array
        Anomaly maps, real-valued (any float/int dtype), higher = more anomalous.

    Returns
    -------
    np.ndarray
        Shape (N,), float64: ``max(maps[i])`` for each image.

    Raises
    ------
    ValueError
        Empty input, an entry that is not 2-D or has no pixels, a non-numeric dtype, or a
        map containing NaN/Inf (the message names the image index).

    Notes
    -----
    NaN is never returned: non-finite maps are rejected. This is the image score used by the
    MVTec AD evaluation protocol for image-level AUROC ("image_auroc_max").
    """
    map_list = _as_image_list(maps, "maps")
    for i, m in enumerate(map_list):
        _check_finite(m, "maps", i)
    return np.array([float(m.max()) for m in map_list], dtype=np.float64)


def image_auroc(scores, labels) -> float:
    """Image-level ROC AUC.

    Parameters
    ----------
    scores : array-like, shape (N,)
        One finite real score per image, higher = more anomalous (e.g. from
        :func:`image_scores_from_maps`).
    labels : array-like, shape (N,)
        Any numeric or boolean dtype with whole values; nonzero (e.g. 1) = anomalous image,
        0 = normal. (The order is scores first, the reverse of scikit-learn's.)

    Returns
    -------
    float
        Area under the ROC curve in [0, 1] (ties in scores count one half), computed with
        ``sklearn.metrics.roc_auc_score``. ``nan`` with an :class:`UndefinedMetricWarning`
        when all labels are equal (no anomalous or no normal image).

    Raises
    ------
    ValueError
        Length mismatch, empty input, inputs that are not 1-D, non-numeric dtypes,
        fractional labels (scores passed as labels), or NaN/Inf scores (the message names
        the first bad index).
    """
    from sklearn.metrics import roc_auc_score

    s, y = _validate_scores_labels(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return _undefined("image AUROC", "no anomalous image (all labels are 0)")
    if n_pos == y.size:
        return _undefined("image AUROC", "no normal image (all labels are anomalous)")
    return float(roc_auc_score(y, s))


def f1_max(scores, labels) -> float:
    """Image-level F1-max: the best F1 score over all decision thresholds.

    An image is predicted anomalous when ``score >= threshold``; every distinct score is
    tried. F1 = 2PR / (P + R), taken as 0 where P + R = 0. Computed from
    ``sklearn.metrics.precision_recall_curve``.

    Parameters
    ----------
    scores : array-like, shape (N,)
        One finite real score per image, higher = more anomalous.
    labels : array-like, shape (N,)
        Any numeric or boolean dtype; nonzero (e.g. 1) = anomalous image, 0 = normal.

    Returns
    -------
    float
        Best F1 in [0, 1]. ``nan`` with an :class:`UndefinedMetricWarning` when there is no
        anomalous image (recall undefined). With no normal image the value is defined
        (1.0: predicting everything anomalous is perfect).

    Raises
    ------
    ValueError
        Length mismatch, empty input, inputs that are not 1-D, non-numeric dtypes, or
        NaN/Inf scores (the message names the first bad index).
    """
    from sklearn.metrics import precision_recall_curve

    s, y = _validate_scores_labels(scores, labels)
    if not y.any():
        return _undefined("F1-max", "no anomalous image (all labels are 0)")
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(
        2.0 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64),
        where=denom > 0,
    )
    return float(f1.max())


def pixel_auroc(maps, masks) -> float:
    """Pixel-level ROC AUC over all pixels of all images pooled.

    Parameters
    ----------
    maps : sequence of 2-D arrays (H_i×W_i, sizes may differ) or an N×H×W array
        Anomaly maps, finite real values (any float/int dtype), higher = more anomalous.
        Pooled as float32 (float64 if an input needs it, e.g. float64 maps).
    masks : sequence of 2-D arrays or an N×H×W array, same count and per-image shapes
        Ground truth of any numeric/bool dtype; nonzero = anomalous pixel.

    Returns
    -------
    float
        Area under the ROC curve (trapezoidal over one point per distinct score, ties
        merged), identical to ``sklearn.metrics.roc_auc_score`` on the flattened pixels
        up to rounding (~1e-12), but computed from one sort with exact integer counts so
        that 50 million float32 pixels take a few seconds and < 1 GB of working memory.
        ``nan`` with an :class:`UndefinedMetricWarning` when there is no anomalous pixel or
        no normal pixel.

    Raises
    ------
    ValueError
        Different numbers of maps and masks, a map/mask pair of different shapes (the
        message names the index and both shapes), entries that are not 2-D or are empty,
        non-numeric dtypes, or NaN/Inf in a map or mask (the message names the index).
    """
    return _pixel_results(maps, masks, [], ("pixel_auroc",))["pixel_auroc"]


def pixel_f1_max(maps, masks) -> float:
    """Pixel-level F1-max: best F1 over all thresholds, all pixels of all images pooled.

    A pixel is predicted anomalous when ``score >= threshold``; every distinct score is a
    threshold. F1 = 2PR / (P + R) = 2TP / (TP + FP + #anomalous), 0 where TP = 0. Matches
    ``sklearn.metrics.precision_recall_curve`` on the flattened pixels up to rounding.

    Parameters
    ----------
    maps : sequence of 2-D arrays (H_i×W_i, sizes may differ) or an N×H×W array
        Anomaly maps, finite real values, higher = more anomalous.
    masks : sequence of 2-D arrays or an N×H×W array, same count and per-image shapes
        Ground truth of any numeric/bool dtype; nonzero = anomalous pixel.

    Returns
    -------
    float
        Best F1 in [0, 1]. ``nan`` with an :class:`UndefinedMetricWarning` when there is no
        anomalous pixel. With no normal pixel the value is defined (1.0).

    Raises
    ------
    ValueError
        Count mismatch, a map/mask pair of different shapes (naming the index and both
        shapes), entries that are not 2-D or empty, non-numeric dtypes, or NaN/Inf in a map
        or mask (naming the index).
    """
    return _pixel_results(maps, masks, [], ("pixel_f1_max",))["pixel_f1_max"]


def au_pro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalized area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    Definition (MVTec AD official evaluation; Bergmann et al., "The MVTec Anomaly Detection
    Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection", IJCV
    2021):

    * Regions are the 8-connected components of each image's mask (3×3 structuring
      element); regions of all images are pooled.
    * For every distinct score threshold t (tied scores enter together), a pixel is
      predicted anomalous when its score >= t. The curve point is
      x = FPR = (#normal pixels predicted anomalous) / (#normal pixels, all images), and
      y = PRO = mean over all regions of the fraction of the region's pixels predicted
      anomalous. The point (0, 0) is prepended.
    * The area over [0, fpr_limit] is computed with the trapezoidal rule, the curve being
      linearly interpolated at ``fpr_limit``, and divided by ``fpr_limit`` (so a perfect
      map gives 1.0).

    Parameters
    ----------
    maps : sequence of 2-D arrays (H_i×W_i, sizes may differ) or an N×H×W array
        Anomaly maps, finite real values, higher = more anomalous.
    masks : sequence of 2-D arrays or an N×H×W array, same count and per-image shapes
        Ground truth of any numeric/bool dtype; nonzero = anomalous pixel.
    fpr_limit : float, default 0.3
        Upper integration limit on the FPR axis, in (0, 1].

    Returns
    -------
    float
        Normalized AU-PRO in [0, 1]. ``nan`` with an :class:`UndefinedMetricWarning` when the
        masks contain no anomalous region or no normal pixel.

    Raises
    ------
    ValueError
        ``fpr_limit`` outside (0, 1]; count mismatch; a map/mask pair of different shapes
        (naming the index and both shapes); entries that are not 2-D or empty; non-numeric
        dtypes; NaN/Inf in a map or mask (naming the index).
    """
    lim = _validate_fpr_limit(fpr_limit)
    return _pixel_results(maps, masks, [lim], ())[f"aupro_{lim:g}"]


def pro_curve(maps, masks, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap (PRO) curve of :func:`au_pro`, up to ``fpr_limit``.

    Same definition as :func:`au_pro` (8-connected regions pooled over all images, one point
    per distinct score threshold, ties entering together, ``(0, 0)`` prepended). Points with
    FPR <= ``fpr_limit`` are kept; if the curve crosses ``fpr_limit`` between two points, a
    last point at exactly ``fpr_limit`` is added by linear interpolation. Hence the
    trapezoidal area ``sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]) / 2) / fpr_limit``
    equals :func:`au_pro` (to rounding, ~1e-12).

    Parameters
    ----------
    maps, masks, fpr_limit
        As for :func:`au_pro`.

    Returns
    -------
    (fpr, pro) : tuple of np.ndarray
        Two float64 arrays of equal length (1-D), ``fpr`` non-decreasing from 0 to
        ``fpr_limit``, ``pro`` in [0, 1] and non-decreasing. Both are empty, with an
        :class:`UndefinedMetricWarning`, when the masks contain no anomalous region or no
        normal pixel. The number of points is at most the number of distinct scores + 2.

    Raises
    ------
    ValueError
        As for :func:`au_pro`.
    """
    lim = _validate_fpr_limit(fpr_limit)
    map_list, mask_list = _validate_maps_masks(maps, masks)
    payloads, inv_sizes, n_regions = _payloads(map_list, mask_list, True)
    n_pos = sum(int(np.count_nonzero(p)) for p in payloads)
    n = sum(m.size for m in map_list)
    n_neg = n - n_pos
    if n_regions == 0 or n_neg == 0:
        why = "no anomalous region" if n_regions == 0 else "no normal pixel"
        warnings.warn(f"PRO curve is undefined: {why} in the masks; returning empty arrays.",
                      UndefinedMetricWarning, stacklevel=2)
        return np.zeros(0), np.zeros(0)
    sp = _SortedPixels(map_list, payloads, _score_dtype(map_list))
    del payloads
    xs, ys = [np.zeros(1)], [np.zeros(1)]
    for tp, fp, w in _sweep(sp, inv_sizes, lambda: True):  # the sweep of _pixel_pass
        xs.append(fp.astype(np.float64) / n_neg)
        ys.append(np.clip(w / n_regions, 0.0, 1.0))
        if xs[-1][-1] > lim:
            break
    fpr, pro = np.concatenate(xs), np.concatenate(ys)
    k = int(np.searchsorted(fpr, lim, side="right"))  # fpr[:k] <= lim
    if k < fpr.size and fpr[k - 1] < lim:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_at = y0 + (y1 - y0) * (lim - x0) / (x1 - x0)
        return np.append(fpr[:k], lim), np.append(pro[:k], y_at)
    return fpr[:k].copy(), pro[:k].copy()


def pixel_metrics(maps, masks, fpr_limits: Sequence[float] = (0.3,)) -> dict[str, float]:
    """All pixel-level metrics from one global sort of the pooled pixel scores.

    Equivalent to calling :func:`pixel_auroc`, :func:`pixel_f1_max` and
    :func:`au_pro` (once per limit) but sorts the pixels only once; use it for large
    evaluations.

    Parameters
    ----------
    maps, masks
        As for :func:`pixel_auroc` (sequences of 2-D arrays whose sizes may differ between
        images, or N×H×W arrays; nonzero mask = anomalous pixel).
    fpr_limits : sequence of float, default (0.3,)
        FPR limits in (0, 1] for AU-PRO; empty to skip AU-PRO (and the region labelling).

    Returns
    -------
    dict
        ``{"pixel_auroc": float, "pixel_f1_max": float, "aupro_<limit>": float, ...}``
        with keys ``aupro_0.3``, ``aupro_0.1`` etc. (limit formatted with ``:g``). Undefined
        entries are ``nan`` with an :class:`UndefinedMetricWarning` (see the single-metric
        functions).

    Raises
    ------
    ValueError
        As for :func:`pixel_auroc` and :func:`au_pro`.
    """
    limits = [_validate_fpr_limit(f) for f in fpr_limits]
    return _pixel_results(maps, masks, limits, ("pixel_auroc", "pixel_f1_max"))


def _pixel_results(maps, masks, limits: list[float], names: tuple[str, ...]) -> dict:
    """Validate, run the pixel pass, and turn undefined results into NaN + warning."""
    map_list, mask_list = _validate_maps_masks(maps, masks)
    r = _pixel_pass(map_list, mask_list, limits)
    out: dict[str, float] = {}
    if "pixel_auroc" in names:
        if r["n_pos"] == 0:
            out["pixel_auroc"] = _undefined("pixel AUROC", "no anomalous pixel in the masks", 4)
        elif r["n_neg"] == 0:
            out["pixel_auroc"] = _undefined("pixel AUROC", "no normal pixel in the masks", 4)
        else:
            out["pixel_auroc"] = float(r["auroc"])
    if "pixel_f1_max" in names:
        if r["n_pos"] == 0:
            out["pixel_f1_max"] = _undefined(
                "pixel F1-max", "no anomalous pixel in the masks", 4
            )
        else:
            out["pixel_f1_max"] = float(r["f1_max"])
    for lim in limits:
        key = f"aupro_{lim:g}"
        if r["n_regions"] == 0:
            out[key] = _undefined("AU-PRO", "no anomalous region in the masks", 4)
        elif r["n_neg"] == 0:
            out[key] = _undefined("AU-PRO", "no normal pixel in the masks (FPR undefined)", 4)
        else:
            out[key] = r["aupro"][lim]
    return out
