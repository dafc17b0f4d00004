"""Streaming, batched inference: what ``PEDENet.iter_predict`` / ``predict`` run.

Images are read and preprocessed in a background thread (a bounded queue of at most
``2 × batch_size`` ready tensors, so memory stays flat however many images there are), grouped
into batches of consecutive images that share a processed size (all of them when
``image_size`` > 0; runs of equal native sizes when ``image_size`` = 0) of at most
``batch_size`` images and :data:`BATCH_PIXELS` pixels, encoded in one pass per batch under
``torch.inference_mode``, and turned into maps one by one (two small matrix
products per image, :func:`pedenet.scoring.grid_to_map`). Results come back in input order.

Images larger than ``max_tile`` pixels on a side (only possible with ``image_size`` = 0, or an
``image_size`` above ``max_tile``) are encoded in overlapping tiles
(:meth:`pedenet.model.PEDENetNetwork.patch_energy`).
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .config import whole_number
from .scoring import grid_to_map, image_score, to_tensor

DEFAULT_MAX_TILE = 1024
"""Default tile side (pixels) above which an image is encoded in overlapping tiles."""

DEFAULT_BATCH_SIZE = 16
"""Default largest number of images encoded together."""

BATCH_PIXELS = {"cpu": 4 * 256 * 256, "cuda": 64 * 256 * 256}
"""Pixels encoded together at most (a batch holds ``min(batch_size, budget // (H·W))``
images, at least one). On CPU larger batches are slower per image once the pretrained
encoder's activations overflow the caches: with the blocks 4, 10 encoder (2 idle cores,
encoder ms per image for batches of 1/2/4/8/16) 256×256 took 58/39/46/43/63 and 400×632
took 103/122/184/227/361. Re-measured with the default blocks 4, 10, 14, 15, no budget was
clearly better than this one, so it was kept."""

_END = object()


def check_options(batch_size, max_tile) -> tuple[int, int | None]:
    """Refuse unusable inference options before any image is read; return them as ints.

    Args:
        batch_size: most images encoded together: a whole number >= 1.
        max_tile: tile side in pixels above which an image is tiled: a whole number >= 1,
            or None (never tile).

    Integers of any kind (Python, numpy, a 0-d integer array or tensor) and whole floats
    (2.0) are accepted.

    Raises:
        TypeError: a value that is not a whole number (a float such as 2.5, a string, a bool).
        ValueError: ``batch_size`` < 1 or ``max_tile`` < 1 (use None to disable tiling).
    """
    checked = {"batch_size": batch_size, "max_tile": max_tile}
    for name, value in checked.items():
        if name == "max_tile" and value is None:
            continue
        number = whole_number(value)
        if number is None:
            raise TypeError(f"{name} must be a whole number, got {value!r}")
        if number < 1:
            hint = " (None disables tiling)" if name == "max_tile" else ""
            raise ValueError(f"{name} must be >= 1, got {value}{hint}")
        checked[name] = number
    return checked["batch_size"], checked["max_tile"]


@dataclass
class Predictions:
    """What :meth:`pedenet.PEDENet.predict` returns, one entry per input image (input order).

    Attributes:
        maps: list of float32 H_i×W_i anomaly maps at each image's own resolution (energy
            units, −log density; higher = more anomalous).
        scores: float64 (N,), image anomaly scores (:func:`pedenet.scoring.image_score`).
        p_values: float64 (N,) conformal p-values in [1/(n+1), 1] (small = anomalous), or None
            when the model was fitted without calibration (``calibration_fraction`` 0).
        anomalous: bool (N,), the decision ``score > thresholds["image_threshold"]``, or None.
        masks: list of bool H_i×W_i defect masks (``map > thresholds["pixel_threshold"]`` in
            images decided anomalous; all False in the others), or None.
        thresholds: the thresholds used (:meth:`pedenet.calibration.Calibration.summary`), or None.
    """

    maps: list
    scores: np.ndarray
    p_values: np.ndarray | None = None
    anomalous: np.ndarray | None = None
    masks: list | None = None
    thresholds: dict | None = None

    def __len__(self) -> int:
        return len(self.maps)

    def __repr__(self) -> str:
        """A one-line summary (not the arrays): count, score range, decisions."""
        if not len(self):
            return "Predictions(0 images)"
        text = f"Predictions({len(self)} images, scores {float(np.min(self.scores)):.4g}-{float(np.max(self.scores)):.4g}"
        if self.anomalous is not None and self.thresholds is not None:
            text += (f", {int(np.sum(self.anomalous))} flagged anomalous at image threshold "
                     f"{float(self.thresholds['image_threshold']):.4g} (fpr {self.thresholds['target_fpr']:g})")
        return text + ")"


def iter_items(images) -> Iterator:
    """Lazily expand ``images`` like ``estimator._expand``: a folder → its images (sorted; a
    category folder → its train/good), a single image → itself, an iterable → its items
    with folders expanded. A generator is consumed one item at a time."""
    from .data import find_images

    if isinstance(images, (str, os.PathLike)):
        p = Path(images)
        if p.is_dir() and (p / "train" / "good").is_dir():
            p = p / "train" / "good"
        yield from find_images([p])
        return
    for im in items_of(images):
        if isinstance(im, (str, os.PathLike)) and Path(im).is_dir():
            yield from find_images([im])
        else:
            yield im


def items_of(images) -> Iterable:
    """The items of an input that is not a path: one image (array, tensor, PIL image) →
    ``(image,)``; an N×H×W×C array or 4-D tensor → its N images; another iterable → itself.

    Raises ValueError for a set or dict: it has no order to match results to (pass a list).
    """
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor, Image.Image)):
        return (images,)
    if isinstance(images, (set, frozenset, dict)):
        raise ValueError(f"images given as a {type(images).__name__}: it has no order to match "
                         "the results to; pass a list (for a dict, list(d.values()))")
    return images


def prefetched(items: Iterable, fn: Callable, depth: int) -> Iterator:
    """``map(fn, items)`` computed in a background thread, at most ``depth`` results ahead.

    Exceptions raised by ``fn`` (or by iterating ``items``) are re-raised in the consumer at
    the position where they occurred. Closing the generator early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(obj) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if stop.is_set() or not put((True, fn(item))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((False, exc))
            return
        put((True, _END))

    thread = threading.Thread(target=work, name="pedenet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = q.get()
            if not ok:
                raise value
            if value is _END:
                return
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


@torch.inference_mode()
def iter_predict(model, images, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_tile: int | None = DEFAULT_MAX_TILE,
                 positions: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray, float]]:
    """Yield ``(index, map, score)`` for each image of ``images`` in input order.

    ``model`` is a fitted :class:`pedenet.PEDENet`; ``map`` is float32 H×W at the image's
    own resolution, ``score`` its image score (float, :func:`pedenet.scoring.image_score` with
    ``config.image_score_fraction`` and ``config.image_score_border``). See :meth:`pedenet.PEDENet.iter_predict`.
    ``positions``: the images' positions in a larger input (e.g. the held-out images among
    those given to fit), named in errors and warnings about arrays and PIL images instead
    of ``index``; the yielded ``index`` still counts 0, 1, ... Unlike the method, this
    generator checks its options at its first ``next()``.
    """
    from .estimator import read_image

    batch_size, max_tile = check_options(batch_size, max_tile)
    net = model._require_fitted()
    size, sigma, min_side = model.config.image_size, model.config.smoothing_sigma, model.min_image_side
    fraction, border = model.config.image_score_fraction, model.config.image_score_border
    device = model.device
    budget = BATCH_PIXELS["cuda" if str(device).startswith("cuda") else "cpu"]

    def load(numbered):
        i, item = numbered
        arr = read_image(item, min_side, i if positions is None else int(positions[i]))
        return arr.shape[:2], to_tensor(arr, size, model.config.keep_aspect)

    def run(batch):
        xb = torch.cat([x for _, _, x in batch]).to(device)
        grids = net.patch_energy(xb, max_tile).cpu().numpy()
        processed = tuple(xb.shape[-2:])
        for (i, original, _), grid in zip(batch, grids):
            amap = grid_to_map(grid, stride=net.stride, offset=net.offset, processed_size=processed,
                               original_size=original, sigma=sigma)
            yield i, amap, image_score(amap, fraction, border)

    batch: list = []
    for i, (original, x) in enumerate(prefetched(enumerate(iter_items(images)), load, depth=2 * batch_size)):
        limit = max(1, min(batch_size, budget // (x.shape[-2] * x.shape[-1])))
        if batch and (len(batch) >= limit or x.shape != batch[0][2].shape):
            yield from run(batch)
            batch = []
        batch.append((i, original, x))
    if batch:
        yield from run(batch)
