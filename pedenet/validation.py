"""Honest model selection: a validation score from normal images with synthetic defects.

Settings and checkpoints must be chosen without the test split. :func:`validate` scores a
fitted model on held-out normal images (for example the calibration images that ``fit`` kept
out of training, ``model.history["calibration_images"]``) and on copies of them carrying one
synthetic defect each: a scratch, a spot of shifted intensity, or a patch of foreign texture,
drawn as in the built-in dataset (:mod:`pedenet.builtin`), so the masks are exact; on request
also a ``region``: a band over 15-45 % of the image whose texture is the image's own, magnified
(a large, low-contrast defect whose size follows the image, like a differently ground
surface), or an ``edge``: the same kind of change over a piece cut off at the image's border or
a corner, 3-10 % of the image (like a chipped edge: real defects can reach the border, and
the default kinds are never cut off by it). Its image
AUROC, pixel AUROC and AU-PRO rank configurations; they are not an estimate of the test
figures (real defects differ from synthetic ones).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .builtin import _DEFECTS, DEFECT_TYPES, TEXTURES

__all__ = ["FewImagesWarning", "VALIDATION_KINDS", "add_synthetic_defect", "check_kinds", "defect_kinds",
           "synthetic_validation_set", "validate"]

VALIDATION_KINDS = (*DEFECT_TYPES, "region", "edge")
"""Every synthetic defect kind :func:`validate` can draw. The default set is
:data:`pedenet.builtin.DEFECT_TYPES` (scratch, spot, patch); ``region`` and ``edge`` are opt-in."""

REGION_FRACTION = (0.15, 0.45)
"""Range of the share of the image's pixels that a ``region`` defect covers."""

EDGE_FRACTION = (0.03, 0.10)
"""Range of the share of the image's pixels that an ``edge`` defect covers."""

REGION_ZOOM = (1.5, 2.5)
"""Range of the magnification of the image's own texture inside a ``region`` defect."""

REGION_MIN_CHANGE = 0.03
"""Mean absolute intensity change (0-1 scale) below which a ``region`` is also shifted in
intensity, so a flat area (a black background) still carries a visible defect."""

MIN_RELIABLE_IMAGES = 10
"""Fewer held-out normal images than this get a :class:`FewImagesWarning` from :func:`validate`:
with N normal and N defective images the image AUROC moves in steps of 1/N² and is 0, 0.5 or 1
for N = 1, too coarse to choose settings by."""


class FewImagesWarning(UserWarning):
    """Validation figures from so few held-out images that they are too coarse to compare runs."""

MAX_WINDOW = 256
"""Side (pixels) of the square window of the image that receives the defect, at most."""

MIN_SIDE = 48
"""Smallest image side (pixels) that can receive a synthetic defect."""


def add_synthetic_defect(image: np.ndarray, rng: np.random.Generator,
                         kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect in an image.

    Args:
        image: float32 H×W×3 in [0, 1] (``pedenet.data.load_image``), both sides >= 48 px.
        rng: numpy random Generator (all randomness comes from it).
        kind: "scratch", "spot" or "patch" (:data:`pedenet.builtin.DEFECT_TYPES`), "region"
            or "edge"; None draws one of the first three.

    Returns:
        ``(defective, mask)``: float32 H×W×3 copy with the defect, bool H×W mask.
        scratch, spot, patch: the defect is drawn on the gray image (channel mean) in a random
        square window of side min(H, W, 256) pixels and added to every channel as the same
        intensity change; the mask is True exactly where the (gray) intensity changed.
        region, edge: see :func:`_region`; the mask is the changed piece.

    Raises:
        ValueError: unknown ``kind``, or an image side below 48 px.
    """
    kind = DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))] if kind is None else kind
    if kind not in VALIDATION_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(VALIDATION_KINDS)}")
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape[:2]
    s = min(h, w, MAX_WINDOW)
    if s < MIN_SIDE:
        raise ValueError(f"image is {w}x{h} px; synthetic defects need both sides >= {MIN_SIDE} px")
    if kind in ("region", "edge"):
        return _region(img, rng, at_edge=kind == "edge")
    r0, c0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    gray = np.clip(np.rint(img[r0:r0 + s, c0:c0 + s].mean(axis=2) * 255), 0, 255).astype(np.uint8)
    others = [np.asarray(f(), dtype=np.uint8) for f in TEXTURES.values()]
    others = [o[..., 0] if o.ndim == 3 else o for o in others]
    new, shape = _DEFECTS[kind](gray, rng, others)
    delta = (new.astype(np.float32) - gray.astype(np.float32)) / 255.0
    out = img.copy()
    out[r0:r0 + s, c0:c0 + s] = np.clip(out[r0:r0 + s, c0:c0 + s] + delta[..., None], 0.0, 1.0)
    mask = np.zeros((h, w), dtype=bool)
    mask[r0:r0 + s, c0:c0 + s] = shape
    return out, mask


def _region(img: np.ndarray, rng: np.random.Generator,
            at_edge: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A large, low-contrast defect whose size follows the image: a band between two parallel
    lines at a random angle, covering a share of the pixels drawn from :data:`REGION_FRACTION`
    (it may touch the image border, then it is a half-plane). With ``at_edge`` (the ``edge``
    kind) the share is drawn from :data:`EDGE_FRACTION` and the band always starts at the
    image's border: the piece beyond one line, a strip along a side or a corner cut off
    diagonally, as the angle falls. Either is filled with the image's own
    texture magnified by a factor from :data:`REGION_ZOOM` (a random window of side 1/zoom,
    resized bilinearly), shifted and scaled per channel to the band's original mean and
    standard deviation: the texture's scale changes, its brightness does not. Where that
    changes the band by less than :data:`REGION_MIN_CHANGE` on average (flat areas), the band
    is also shifted by 0.1 in intensity. Returns ``(defective, mask)``, mask = the band."""
    from PIL import Image

    h, w = img.shape[:2]
    share = rng.uniform(*(EDGE_FRACTION if at_edge else REGION_FRACTION))
    theta = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    proj = xx * np.cos(theta) + yy * np.sin(theta)
    if at_edge:  # from one end of the projection: the piece touches the border
        start = 0.0 if rng.integers(2) == 0 else 1.0 - share
    else:
        start = rng.uniform(0.0, 1.0 - share)
    lo, hi = np.quantile(proj, [start, start + share])
    band = (proj >= lo) & (proj <= hi)
    zoom = rng.uniform(*REGION_ZOOM)
    ch, cw = max(2, int(round(h / zoom))), max(2, int(round(w / zoom)))
    r0, c0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    texture = np.stack([np.asarray(Image.fromarray(img[r0:r0 + ch, c0:c0 + cw, c]).resize(
        (w, h), Image.BILINEAR), dtype=np.float32) for c in range(img.shape[2])], axis=2)
    out = img.copy()
    for c in range(img.shape[2]):
        orig, new = img[..., c][band], texture[..., c][band]
        sd = new.std()
        scaled = (new - new.mean()) * (orig.std() / sd if sd > 1e-6 else 1.0) + orig.mean()
        out[..., c][band] = scaled
    out = np.clip(out, 0.0, 1.0)
    if np.abs(out[band] - img[band]).mean() < REGION_MIN_CHANGE:
        mean = float(img[band].mean())
        out[band] = np.clip(img[band] + (0.1 if mean < 0.5 else -0.1), 0.0, 1.0)
    return out, band


def defect_kinds(n_images: int, kinds=DEFECT_TYPES) -> list[str]:
    """The synthetic defect kind of each of ``n_images`` held-out images, in order: ``kinds``
    (names, or one comma-separated string) in turn (default scratch, spot, patch, scratch,
    ...). Raises ValueError for unknown, repeated or no kinds."""
    kinds = check_kinds(kinds)
    return [kinds[i % len(kinds)] for i in range(n_images)]


def check_kinds(kinds) -> tuple[str, ...]:
    """``kinds`` (names, or one comma-separated string) as a tuple of names. Raises ValueError
    unless they are distinct names from :data:`VALIDATION_KINDS`, at least one."""
    if isinstance(kinds, str):  # "edge" or "scratch,edge", not its letters
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in VALIDATION_KINDS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise ValueError(f"defect kinds must be distinct names from {', '.join(VALIDATION_KINDS)}; "
                         f"got {', '.join(kinds) or 'none'}")
    return kinds


def synthetic_validation_set(images, seed: int = 0,
                             kinds=DEFECT_TYPES) -> tuple[list, list, np.ndarray]:
    """Each normal image once as it is and once with a synthetic defect.

    Args:
        images: paths, PIL images or arrays of normal images (see ``pedenet.estimator.as_rgb_array``).
        seed: seed of the defects.
        kinds: the defect kinds, given to the images in turn (:data:`VALIDATION_KINDS`): a
            sequence of names, or one comma-separated string.

    Returns:
        ``(arrays, masks, labels)``: 2N float32 H×W×3 images, their bool H×W masks (all False
        for the normal copies) and int64 labels (0 normal, 1 defective).

    Raises:
        ValueError: an unknown or repeated kind, a ``seed`` that is not a whole number >= 0,
            or an image side below 48 px (the message names the file, or ``input image i``).
    """
    from .estimator import read_image

    from .config import whole_number

    kinds = check_kinds(kinds)
    number = whole_number(seed)
    if number is None or number < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    images = list(images)
    rng = np.random.default_rng([number, 31337])
    arrays, masks, labels = [], [], []
    for i, (item, kind) in enumerate(zip(images, defect_kinds(len(images), kinds))):
        img = read_image(item, index=i)
        try:
            bad, mask = add_synthetic_defect(img, rng, kind)
        except ValueError as exc:  # too small: say which image
            name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"input image {i}"
            raise ValueError(f"{name}: {exc}") from None
        arrays += [img, bad]
        masks += [np.zeros(img.shape[:2], dtype=bool), mask]
        labels += [0, 1]
    return arrays, masks, np.array(labels, dtype=np.int64)


def validate(model, images, seed: int = 0, progress: bool = False,
             kinds=DEFECT_TYPES) -> dict:
    """Validation metrics of a fitted model on normal images and synthetic-defect copies.

    Args:
        model: a fitted :class:`pedenet.PEDENet`.
        images: held-out normal images, not used for training: a sequence of paths, PIL
            images or arrays (or an N×H×W×C array), one of them, or a folder (all the image
            files under it, as for ``predict``; a category folder is refused: its train/good
            images were trained on and its test/ images are not all normal).
        seed: seed of the synthetic defects (use the same one to compare configurations).
        progress: show a progress bar while the 2N images are scored.
        kinds: the synthetic defect kinds, given to the images in turn (default scratch, spot,
            patch; add ``"region"`` for large defects whose size follows the image, ``"edge"``
            for defects on a piece cut off at the border); a sequence of names, or one
            comma-separated string. Compare runs only on the same kinds and seed.

    Returns:
        ``{"image_auroc", "pixel_auroc", "au_pro_0.3", "n_images", "defect_kinds",
        "normal_scores", "defect_scores", "copy_kinds"}``: floats; ``n_images`` = 2N (int);
        ``defect_kinds``: how many copies got each kind, an int for every kind asked for
        (``{"scratch": 2, "spot": 1, "patch": 1}`` for N = 4; they sum to N);
        ``normal_scores`` and ``defect_scores``: the N image anomaly scores (floats) of the
        held-out images and of their synthetic-defect copies, in the order of ``images``;
        ``copy_kinds``: the N kinds given to the copies, in that order. Raises ValueError if ``images`` is empty, a category folder, or a kind is unknown. Warns
        (:class:`FewImagesWarning`) when N < :data:`MIN_RELIABLE_IMAGES`.
    """
    from .metrics import image_auroc, pixel_metrics

    from .data import find_images, is_category_dir
    from .estimator import _expand

    kinds = check_kinds(kinds)
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        if is_category_dir(images):  # its train/good was trained on, its test/ is not normal
            raise ValueError(f"{images}: is a category folder (train/, test/); pass the folder "
                             "of held-out normal images, or their paths")
        items = find_images([images])
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)  # a stack of N images
    else:
        items = _expand(images)
    arrays, masks, labels = synthetic_validation_set(items, seed, kinds)
    if not arrays:
        raise ValueError("validation needs at least one held-out normal image")
    n = len(arrays) // 2
    if n < MIN_RELIABLE_IMAGES:
        warnings.warn(f"validation on only {n} held-out normal image(s): its image AUROC moves in "
                      f"steps of 1/{n}² = {1 / n ** 2:.3g}, too coarse to compare settings by; "
                      f"hold out at least {MIN_RELIABLE_IMAGES} (more training images or a larger "
                      "calibration fraction)", FewImagesWarning, stacklevel=2)
    pred = model.predict(arrays, progress=progress)
    pm = pixel_metrics(pred.maps, masks, (0.3,))
    given = defect_kinds(n, kinds)
    scores = np.asarray(pred.scores, dtype=np.float64)
    return {"image_auroc": image_auroc(pred.scores, labels), "pixel_auroc": pm["pixel_auroc"],
            "au_pro_0.3": pm["aupro_0.3"], "n_images": len(arrays),
            "defect_kinds": {k: given.count(k) for k in kinds},
            "normal_scores": scores[labels == 0].tolist(), "defect_scores": scores[labels == 1].tolist(),
            "copy_kinds": list(given)}
