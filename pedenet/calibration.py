"""Thresholds from normal images only: split-conformal p-values and calibrated thresholds.

``PEDENet.fit`` holds out a random part of the normal training images (``calibration_fraction``),
trains on the rest, then scores the held-out images. Their image scores give every new image a
conformal p-value (Vovk, Gammerman & Shafer 2005; Bates et al., "Testing for outliers with
conformal p-values", Ann. Statist. 2023):

    p(x) = (1 + #{i : s_i >= s(x)}) / (n + 1),        s_i: the n held-out normal scores.

**Guarantee.** If the held-out images and a new normal image are exchangeable (drawn the same
way from the same production process; for example not from a different camera, lighting or
batch), then P(p(x) <= alpha) <= alpha for the new normal image: flagging images with
p <= alpha raises a false alarm on at most a fraction alpha of normal images, on average over
the draw of the held-out set. The realized rate for one particular held-out set scatters around
alpha with a standard deviation of about sqrt(alpha (1 - alpha) / (n + 2)). Nothing is
guaranteed about missed defects.

Equivalently an image is flagged when its score exceeds the image threshold, the
k-th smallest held-out score with k = ceil((n + 1)(1 - alpha)). With fewer than
1 / alpha - 1 held-out images no k <= n exists; the threshold is then the largest held-out score
and the guaranteed rate is 1 / (n + 1) (``achievable_fpr``), with a warning.

The pixel threshold is the (1 - beta) quantile of the pooled pixel scores of the held-out maps,
beta = ``pixel_fpr`` (default 0.01, separate from alpha): about a fraction beta of normal pixels
exceed it. Pixels within an image are correlated, so
this is an estimate, not a distribution-free guarantee. Defect masks mark the pixels above it in
images flagged at the image threshold, so an image that passes has an empty mask.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .config import real_number
from .scoring import image_score

__all__ = ["Calibration", "CalibrationWarning", "calibrate", "split_calibration"]

MAX_PIXEL_SAMPLES = 200_000
"""Held-out pixel scores kept (a uniform random subsample) to set the pixel threshold."""


class CalibrationWarning(UserWarning):
    """The target false-alarm rate cannot be guaranteed with this many held-out images."""


def split_calibration(n_images: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random split of ``n_images`` normal images into training and held-out (calibration) indices.

    ``round(fraction * n_images)`` images are held out, but at least one image is always kept
    for training; ``fraction`` 0 holds out none. Deterministic for a given ``seed``.

    Returns:
        ``(train_idx, calibration_idx)``: sorted int64 arrays that partition ``range(n_images)``.

    Raises:
        ValueError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1); got {fraction}")
    n_cal = min(int(round(fraction * n_images)), max(n_images - 1, 0))
    order = np.random.default_rng([int(seed), 7919]).permutation(n_images)
    return np.sort(order[n_cal:]).astype(np.int64), np.sort(order[:n_cal]).astype(np.int64)


def min_images_to_hold_out(fraction: float) -> int:
    """The fewest normal images from which :func:`split_calibration` holds out at least one at
    ``fraction`` > 0: ``round(fraction · n)`` >= 1 needs fraction · n > 0.5, and one image
    always stays for training."""
    return max(2, math.floor(0.5 / fraction) + 1)


def check_fpr(fpr: float, name: str = "target false-alarm rate (fpr)") -> float:
    """``fpr`` as a float after checking it is a rate: a number in (0, 1).

    Any real number is accepted (:func:`pedenet.config.real_number`: Python, numpy,
    ``Decimal``, a 0-d array or tensor; a float32 0.01 means 0.01). Raises TypeError for a
    value that is not a number (a string, a bool, None, an array of several values, a complex
    number), ValueError for one outside (0, 1) or NaN."""
    value = real_number(fpr)
    if value is None:
        raise TypeError(f"{name} must be a number in (0, 1), got {fpr!r}")
    fpr = value
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"{name} must be in (0, 1); got {fpr}")
    return fpr


@dataclass
class Calibration:
    """Held-out normal scores and the thresholds they give.

    Attributes:
        scores: float64 (n,), image scores (map maxima: energy, or distance) of the held-out normal
            images, sorted ascending.
        pixel_scores: float32 (m,), a random subsample (m <= ``MAX_PIXEL_SAMPLES``) of the
            pooled pixel scores of their anomaly maps, sorted ascending; it always holds their
            maximum (one sampled pixel is swapped for it; checkpoints written before
            2026-12-01 hold a plain sample).
        target_fpr: default target false-alarm rate alpha (fraction of normal images flagged).
        pixel_fpr: default fraction beta of normal pixels above the pixel threshold.
    """

    scores: np.ndarray
    pixel_scores: np.ndarray
    target_fpr: float = 0.01
    pixel_fpr: float = 0.01

    @property
    def n(self) -> int:
        """Number of held-out normal images."""
        return int(len(self.scores))

    @property
    def achievable_fpr(self) -> float:
        """1 / (n + 1): the smallest false-alarm rate these n held-out images can guarantee."""
        return 1.0 / (self.n + 1)

    def p_values(self, scores) -> np.ndarray:
        """Conformal p-values (float64, same shape as ``scores``, in [1/(n+1), 1]) of image scores.

        Small p = more anomalous than the held-out normal images. Formula in the module docstring.
        """
        s = np.asarray(scores, dtype=np.float64)
        at_least = self.n - np.searchsorted(self.scores, s, side="left")
        return (1.0 + at_least) / (self.n + 1.0)

    def image_threshold(self, fpr: float | None = None, *, stacklevel: int = 2) -> float:
        """Score above which an image is flagged, for a target false-alarm rate ``fpr``
        (default ``target_fpr``): the k-th smallest held-out score, k = ceil((n+1)(1-fpr));
        flagging ``score > threshold`` equals ``p_value <= fpr`` whenever k <= n. With too few
        held-out images (k > n) it is the largest held-out score, with a CalibrationWarning."""
        fpr = check_fpr(self.target_fpr if fpr is None else fpr)
        k = math.ceil((self.n + 1) * (1.0 - fpr) - 1e-9)
        if k > self.n:
            warnings.warn(
                f"{self.n} held-out normal image(s) cannot guarantee a false-alarm rate of {fpr:g}: "
                f"the smallest guaranteed rate is 1/(n+1) = {self.achievable_fpr:.3g}; images are "
                f"flagged when they score above every held-out image. Hold out at least "
                f"{math.ceil(1 / fpr - 1)} normal images (more training images or a larger "
                "calibration fraction) or raise the target rate", CalibrationWarning,
                stacklevel=stacklevel)
            k = self.n
        return float(self.scores[k - 1])

    def pixel_threshold(self, pixel_fpr: float | None = None) -> float:
        """Pixel score above which a pixel is marked defective: the (1 - pixel_fpr) quantile
        (``numpy.quantile``, method "higher") of the held-out pixel scores (default
        ``self.pixel_fpr``)."""
        fpr = check_fpr(self.pixel_fpr if pixel_fpr is None else pixel_fpr, "pixel_fpr")
        return float(np.quantile(self.pixel_scores, 1.0 - fpr, method="higher"))

    def summary(self, fpr: float | None = None, pixel_fpr: float | None = None) -> dict:
        """JSON-ready thresholds for ``fpr`` and ``pixel_fpr`` (defaults ``target_fpr``,
        ``pixel_fpr``): target_fpr, image_threshold, pixel_fpr, pixel_threshold,
        n_calibration, achievable_fpr, guaranteed_fpr."""
        fpr = check_fpr(self.target_fpr if fpr is None else fpr)
        pixel_fpr = check_fpr(self.pixel_fpr if pixel_fpr is None else pixel_fpr, "pixel_fpr")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            image_t = self.image_threshold(fpr)
        return {"target_fpr": fpr, "image_threshold": image_t,
                "pixel_fpr": pixel_fpr, "pixel_threshold": self.pixel_threshold(pixel_fpr),
                "n_calibration": self.n,
                "achievable_fpr": self.achievable_fpr,
                "guaranteed_fpr": max(fpr, self.achievable_fpr)}

    def state_dict(self) -> dict:
        """Plain content for a checkpoint (numpy arrays and a float)."""
        return {"scores": self.scores.astype(np.float64), "pixel_scores": self.pixel_scores.astype(np.float32),
                "target_fpr": float(self.target_fpr), "pixel_fpr": float(self.pixel_fpr)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Calibration":
        """Inverse of :meth:`state_dict`. Raises ValueError for inconsistent content."""
        scores = np.sort(np.asarray(state["scores"], dtype=np.float64))
        pixels = np.sort(np.asarray(state["pixel_scores"], dtype=np.float32))
        if scores.ndim != 1 or len(scores) == 0 or pixels.ndim != 1 or len(pixels) == 0:
            raise ValueError("calibration scores must be non-empty 1-D arrays")
        if not (np.isfinite(scores).all() and np.isfinite(pixels).all()):
            raise ValueError("calibration scores contain NaN or Inf")
        return cls(scores=scores, pixel_scores=pixels, target_fpr=check_fpr(_rate(state["target_fpr"])),
                   pixel_fpr=check_fpr(_rate(state.get("pixel_fpr", 0.01))))


def _rate(value) -> float:
    """A stored rate as a float. Checkpoints written before rates were stored in float64 hold
    float32 (0.01 became 0.009999999776, one hold-out image more in the warnings): those are
    read back as the shortest decimal that gives the same float32 (0.01)."""
    a = np.asarray(value)
    if a.dtype == np.float32:
        return float(str(a.reshape(())[()]))
    return float(a)


def calibrate(maps, target_fpr: float = 0.01, seed: int = 0,
              max_pixels: int = MAX_PIXEL_SAMPLES, pixel_fpr: float = 0.01,
              score_fraction: float = 0.0, score_border: float = 0.0) -> Calibration:
    """Build a :class:`Calibration` from the anomaly maps of held-out normal images.

    Args:
        maps: iterable of float H_i×W_i anomaly maps (energy, or distance) of normal images that were
            not used for training.
        target_fpr: default target false-alarm rate of images, in (0, 1).
        pixel_fpr: default fraction of normal pixels above the pixel threshold, in (0, 1).
        seed: seed of the pixel subsample.
        max_pixels: pixel scores kept (uniform subsample over all pixels, with the largest
            pixel score swapped in when the sample missed it).
        score_fraction: the image score of :func:`pedenet.scoring.image_score` (0 = map
            maximum); pass the model's ``config.image_score_fraction`` so the held-out scores
            are the ones ``PEDENet.predict`` gives.
        score_border: the edge band left out of the image score (the model's
            ``config.image_score_border``; 0 = none). The pixel threshold uses every pixel.

    Raises:
        ValueError: no maps, a map with NaN/Inf, ``target_fpr`` outside (0, 1), or
            ``score_border`` outside [0, 0.5).
    """
    target_fpr, pixel_fpr = check_fpr(target_fpr), check_fpr(pixel_fpr)
    maps = [np.asarray(m, dtype=np.float32) for m in maps]
    if not maps:
        raise ValueError("calibration needs at least one held-out normal image")
    if not all(np.isfinite(m).all() for m in maps):
        raise ValueError("a held-out anomaly map contains NaN or Inf")
    scores = np.sort(np.array([image_score(m, score_fraction, score_border) for m in maps], dtype=np.float64))
    pixels = np.concatenate([m.ravel() for m in maps])
    if len(pixels) > max_pixels:
        rng = np.random.default_rng([int(seed), 104729])
        keep = rng.choice(len(pixels), size=max_pixels, replace=False)
        top = int(np.argmax(pixels))
        if top not in keep:  # the sample's maximum is the held-out maximum (the overlay scale's top)
            keep[0] = top
        pixels = pixels[keep]
    return Calibration(scores=scores, pixel_scores=np.sort(pixels), target_fpr=target_fpr,
                       pixel_fpr=pixel_fpr)
