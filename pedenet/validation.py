"""Honest model selection: a validation score from normal images with synthetic defects.

Settings and checkpoints must be chosen without the test split. :func:`validate` scores a
fitted model on held-out normal images (for example the calibration images that ``fit`` kept
out of training, ``model.history["calibration_images"]``) and on copies of them carrying one
synthetic defect each: a scratch, a spot of shifted intensity, or a patch of foreign texture,
drawn as in the built-in dataset (:mod:`pedenet.builtin`), so the masks are exact. Its image
AUROC, pixel AUROC and AU-PRO rank configurations; they are not an estimate of the test
figures (real defects differ from synthetic ones).
"""

from __future__ import annotations

import warnings

import numpy as np

from .builtin import _DEFECTS, DEFECT_TYPES, TEXTURES

__all__ = ["FewImagesWarning", "add_synthetic_defect", "defect_kinds", "synthetic_validation_set",
           "validate"]

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
    """One synthetic defect in a random square window of an image.

    Args:
        image: float32 H×W×3 in [0, 1] (``pedenet.data.load_image``), both sides >= 48 px.
        rng: numpy random Generator (all randomness comes from it).
        kind: "scratch", "spot" or "patch" (:data:`pedenet.builtin.DEFECT_TYPES`); None draws one.

    Returns:
        ``(defective, mask)``: float32 H×W×3 copy with the defect, bool H×W mask that is True
        exactly where the defect changed the (gray) intensity. The defect is drawn on the gray
        image (channel mean) in a window of side min(H, W, 256) pixels and added to every
        channel as the same intensity change.

    Raises:
        ValueError: unknown ``kind``, or an image side below 48 px.
    """
    kind = DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))] if kind is None else kind
    if kind not in _DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(DEFECT_TYPES)}")
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape[:2]
    s = min(h, w, MAX_WINDOW)
    if s < MIN_SIDE:
        raise ValueError(f"image is {w}x{h} px; synthetic defects need both sides >= {MIN_SIDE} px")
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


def defect_kinds(n_images: int) -> list[str]:
    """The synthetic defect kind of each of ``n_images`` held-out images, in order: the kinds
    of :data:`pedenet.builtin.DEFECT_TYPES` in turn (scratch, spot, patch, scratch, ...)."""
    return [DEFECT_TYPES[i % len(DEFECT_TYPES)] for i in range(n_images)]


def synthetic_validation_set(images, seed: int = 0) -> tuple[list, list, np.ndarray]:
    """Each normal image once as it is and once with a synthetic defect.

    Args:
        images: paths, PIL images or arrays of normal images (see ``pedenet.estimator.as_rgb_array``).
        seed: seed of the defects (kinds cycle through scratch, spot, patch).

    Returns:
        ``(arrays, masks, labels)``: 2N float32 H×W×3 images, their bool H×W masks (all False
        for the normal copies) and int64 labels (0 normal, 1 defective).
    """
    from .estimator import as_rgb_array

    images = list(images)
    rng = np.random.default_rng([int(seed), 31337])
    arrays, masks, labels = [], [], []
    for item, kind in zip(images, defect_kinds(len(images))):
        img = as_rgb_array(item)
        bad, mask = add_synthetic_defect(img, rng, kind)
        arrays += [img, bad]
        masks += [np.zeros(img.shape[:2], dtype=bool), mask]
        labels += [0, 1]
    return arrays, masks, np.array(labels, dtype=np.int64)


def validate(model, images, seed: int = 0, progress: bool = False) -> dict:
    """Validation metrics of a fitted model on normal images and synthetic-defect copies.

    Args:
        model: a fitted :class:`pedenet.PEDENet`.
        images: held-out normal images, not used for training (paths, PIL images or arrays).
        seed: seed of the synthetic defects (use the same one to compare configurations).
        progress: show a progress bar while the 2N images are scored.

    Returns:
        ``{"image_auroc", "pixel_auroc", "au_pro_0.3", "n_images", "defect_kinds"}``: floats;
        ``n_images`` = 2N (int); ``defect_kinds``: how many copies got each kind, an int for
        every kind of :data:`pedenet.builtin.DEFECT_TYPES` (``{"scratch": 2, "spot": 1,
        "patch": 1}`` for N = 4; they sum to N). Raises ValueError if ``images`` is empty.
        Warns (:class:`FewImagesWarning`) when N < :data:`MIN_RELIABLE_IMAGES`.
    """
    from .metrics import image_auroc, pixel_metrics

    arrays, masks, labels = synthetic_validation_set(list(images), seed)
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
    kinds = defect_kinds(n)
    return {"image_auroc": image_auroc(pred.scores, labels), "pixel_auroc": pm["pixel_auroc"],
            "au_pro_0.3": pm["aupro_0.3"], "n_images": len(arrays),
            "defect_kinds": {k: kinds.count(k) for k in DEFECT_TYPES}}
