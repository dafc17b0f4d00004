"""``PEDENet``: the estimator (scikit-learn style fit / predict / score_samples / save / load)."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from . import __version__
from .calibration import Calibration, calibrate, min_images_to_hold_out, split_calibration
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PEDENetConfig
from .gmm import GaussianMixture
from .inference import Predictions
from .memory_bank import MemoryBank, build_memory_bank, leave_one_out_quantiles
from .model import PEDENetNetwork
from .progress import progress_bar
from .scoring import grid_to_map, to_tensor
from .training import (
    ImagesMismatchError,
    TrainingHistory,
    _seed_everything,
    cache_frozen_features,
    check_embedding_count,
    check_lp_distance,
    fit_mixture,
    init_membership,
    train_network,
    training_energy_quantiles,
)
from .resume import ResumeWriter, deferred_interrupts, read_resume_state

_DEFAULT_BANK = PEDENetConfig().memory_bank_size

OVERFIT_SPANS = 5.0
"""See :meth:`PEDENet._warn_if_held_out_scores_far_above_training`."""

ImageLike = Union[str, os.PathLike, np.ndarray, "PIL.Image.Image"]  # noqa: F821


def as_rgb_array(image: ImageLike, *, name: str | None = None) -> np.ndarray:
    """Any accepted image → float32 H×W×3 array in [0, 1].

    Accepts a file path (read with ``pedenet.data.load_image``), a PIL image, or a numpy array
    (or torch tensor, read as its array) H×W or H×W×C (C = 1, 3 or 4; alpha dropped) of dtype
    uint8 (0-255), uint16 (0-65535) or float in [0, 1]; channels-first C×H×W is refused with
    the transpose to use. A PIL image in float mode ``"F"`` is checked as a float array (values
    in [0, 1]). A uint16 array or a PIL image in mode ``"I;16"`` whose values all lie in
    0-255, or a PIL image in mode ``"I"`` (32-bit, divided by 2³¹−1) whose values all lie in
    0-65535, warns (UserWarning): it is read nearly black; 8-bit values belong in a uint8
    array (or mode ``"L"``), 16-bit values in a uint16 array. Raises
    ``pedenet.data.DataError`` / ValueError for anything else (floats outside [0, 1], an
    empty image, or an object that is not an image, such as None).
    ``name`` (e.g. ``"input image 3"``) starts those warnings, to say which image they are about.
    """
    from . import data

    if isinstance(image, (str, os.PathLike)):
        return data.load_image(image)
    lead = f"{name}: " if name else ""
    if isinstance(image, Image.Image):
        if image.mode == "I" or image.mode.startswith("I;16"):
            # e.g. an 8-bit image after .convert("I"): divided by 2**31 - 1, black
            bits, divisor, limit = (32, 2**31 - 1, 65535) if image.mode == "I" else (16, 65535, 255)
            values = np.asarray(image) if image.width and image.height else np.zeros(1, np.int32)
            low, top = int(values.min()), int(values.max())
            span = f"0-{top}" if low >= 0 else f"{low} to {top} (negative values read as 0)"
            if top <= limit:
                warnings.warn(f"{lead}PIL image in mode {image.mode!r} with values only in {span}: read "
                              f"as {bits}-bit (divided by {divisor}), "
                              "so it is nearly black; pass 8-bit values as image.convert('L') or a "
                              "uint8 array, 16-bit values as a uint16 array", stacklevel=3)
        if not (image.width and image.height):
            raise ValueError(f"image is empty ({image.width}x{image.height} px); pass an image "
                             "of at least one pixel")
        frames = getattr(image, "n_frames", 1)
        if frames > 1:  # an animated GIF or PNG, a multi-page TIFF: as a file path warns
            warnings.warn(f"{lead}PIL image holds {frames} frames (pages); only its current one "
                          f"(frame {image.tell()}) is used - pass each frame as its own image "
                          "(image.seek(i))", stacklevel=3)
        if image.mode != "F":
            return data.pil_to_array(image)
        image = np.asarray(image, dtype=np.float32)  # checked below, as float arrays are
    if not (isinstance(image, (np.ndarray, list, tuple)) or hasattr(image, "__array__")
            or hasattr(image, "__array_interface__")):
        raise ValueError(f"not an image: {type(image).__name__} - pass a file path, a PIL image "
                         "or a numpy array (H×W or H×W×C)")
    if isinstance(image, torch.Tensor):  # read as an array, H×W or H×W×C as numpy's are
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.size == 0:
        raise ValueError(f"image array is empty (shape {arr.shape}); pass an image of at least one pixel")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        hint = ""
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
            hint = (" - it looks channels-first (C×H×W, as torch keeps images): pass "
                    "arr.transpose(1, 2, 0), or tensor.permute(1, 2, 0)")
        elif arr.ndim == 4:
            hint = " - pass a batch as the N×H×W×C array itself, or as a list of images"
        raise ValueError(f"image array must be H×W or H×W×C with C in 1, 3, 4; got shape "
                         f"{arr.shape}{hint}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        if arr.max() <= 1 and arr.size > 1:
            warnings.warn(f"{lead}uint8 image array with values only in 0-{int(arr.max())}: read as "
                          "8-bit (divided by 255), so it is black; if it holds values in [0, 1] "
                          "(a float image cast to uint8), pass the float array itself, or "
                          "(arr * 255).astype(np.uint8) before the cast", stacklevel=3)
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        if arr.max() <= 255:
            warnings.warn(f"{lead}uint16 image array with values only in 0-{int(arr.max())}: read as "
                          "16-bit (divided by 65535), so it is nearly black; if it holds 8-bit "
                          "values, pass it as uint8 (arr.astype(np.uint8))", stacklevel=3)
        arr = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("image array contains NaN or Inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-4 or hi > 1 + 1e-4:  # tolerate rounding overshoot, clipped below
            raise ValueError(f"float image values must lie in [0, 1]; got [{lo!r}, {hi!r}] - divide "
                             "8-bit values by 255 (or pass the uint8 array as it is)")
        arr = np.clip(arr, 0.0, 1.0).astype(np.float32)
    else:
        raise ValueError(f"unsupported image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    return np.ascontiguousarray(arr)


def check_side(arr: np.ndarray, min_side: int, image: ImageLike = None) -> np.ndarray:
    """Raise ``pedenet.data.DataError`` if a side of the H×W×3 ``arr`` is below ``min_side``."""
    from .data import DataError

    h, w = arr.shape[:2]
    if min_side and min(h, w) < min_side:
        lead = f"{os.fspath(image)}: " if isinstance(image, (str, os.PathLike)) else ""
        raise DataError(
            f"{lead}image is {w}x{h} px, smaller than the {min_side} px patch size; "
            f"images used at their native size (image size 0) need both sides >= {min_side} px - "
            "enlarge or remove the image, or resize all images (--image-size)")
    return arr


def read_image(image: ImageLike, min_side: int = 0, index: int | None = None) -> np.ndarray:
    """:func:`as_rgb_array` then :func:`check_side`: float32 H×W×3 in [0, 1].

    ``index``: the image's position among the images given (after folders are expanded).
    An array or PIL image that cannot be used raises the same error type
    (``pedenet.data.DataError`` / ValueError) with ``input image <index> (<what it is>):``
    before the message, so that the bad item of a list is found (and its dtype warnings start
    with ``input image <index>:``); a file's error names the file already.
    """
    try:
        named = None if index is None else f"input image {index}"
        return check_side(as_rgb_array(image, name=named), min_side, image)
    except ValueError as exc:
        if index is None or isinstance(image, (str, os.PathLike)):
            raise
        what = (f"PIL image, mode {image.mode}" if isinstance(image, Image.Image)
                else f"{type(image).__name__}")
        if isinstance(image, np.ndarray):
            what = f"array, shape {image.shape}, {image.dtype}"
        elif isinstance(image, torch.Tensor):
            what = f"tensor, shape {tuple(image.shape)}, {image.dtype}"
        message = f"input image {index} ({what}): {exc}"
        try:
            error = type(exc)(message)
        except TypeError:  # an exception type with another constructor
            error = ValueError(message)
        raise error from None


def _loaders(images: Sequence[ImageLike], min_side: int = 0, indices: Sequence[int] | None = None):
    """One reader per image (:func:`read_image`); ``indices``: the images' positions in the
    input (default 0, 1, ...), named in errors about arrays and PIL images."""
    indices = range(len(images)) if indices is None else [int(i) for i in indices]
    return [(lambda im=im, i=i: read_image(im, min_side, i)) for im, i in zip(images, indices)]


def _names(indices, items: list) -> list[str]:
    """How history["calibration_images"] records held-out images: a file's absolute path,
    ``<input i>`` for an array or PIL image (i: its index among the images given)."""
    return [os.path.abspath(os.fspath(p)) if isinstance(p, (str, os.PathLike)) else f"<input {i}>"
            for i, p in zip(indices.tolist(), items)]


def _input_hashes(indices, items: list) -> dict[str, str]:
    """``{"<input i>": SHA-1 of its pixels}`` for the arrays and PIL images among ``items``
    (i: its index among the images given; files are recorded by name instead)."""
    from .resume import image_fingerprint

    return {f"<input {int(i)}>": image_fingerprint(it)[1] for i, it in zip(indices, items)
            if not isinstance(it, (str, os.PathLike))}


def _expand(images: Union[ImageLike, Iterable[ImageLike]], training: bool = False) -> list:
    """A folder → its images (sorted); a single image → [image]; a list stays a list.

    A category folder (with train/good) means its train/good images. With ``training``
    (fit, rescore) a folder contributes only the images directly inside it, as ``pedenet
    fit`` reads it, so that defective images or masks in its subfolders (a dataset root's
    test/ and ground_truth/) are never trained on (:func:`_training_folder_images`);
    otherwise (predict) folders are searched recursively (:func:`pedenet.data.find_images`).
    """
    from .data import find_images
    from .inference import items_of

    def folder_images(folder) -> list:
        p = Path(folder)
        if p.is_dir() and (p / "train" / "good").is_dir():
            p = p / "train" / "good"
        return _training_folder_images(p) if training else find_images([p])

    if isinstance(images, (str, os.PathLike)):
        return folder_images(images) if Path(images).is_dir() else find_images([images])
    out = []
    for im in items_of(images):
        if isinstance(im, (str, os.PathLike)) and Path(im).is_dir():
            out.extend(folder_images(im))
        else:
            out.append(im)
    return out


def _training_folder_images(folder: Path) -> list:
    """The images directly inside ``folder``, sorted by name. Raises DataError when there are
    none (naming the categories of a dataset root, or the subfolders that hold images); warns
    (SkippedFileWarning) when subfolders hold images that are left out."""
    from .data import DataError, SkippedFileWarning, categories_under, find_images, list_images

    images = list_images(folder)
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    nested = {}
    for sub in subs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                nested[sub.name] = len(find_images(sub))
            except DataError:  # no readable image under it
                pass
    if not images:
        found = categories_under(folder)
        if found:
            raise DataError(f"{folder}: is a dataset root; pass one category folder (its "
                            f"train/good images are used): {', '.join(found)}")
        if nested:
            raise DataError(f"{folder}: no images directly inside, but its subfolders hold some "
                            f"({', '.join(nested)}); fit does not look into subfolders, so that "
                            "defective images beside the normal ones are never trained on: pass "
                            "the folder of normal images itself")
        raise DataError(f"{folder}: holds no image files; pass a folder of normal images or a "
                        "category folder with train/good")
    if nested:
        warnings.warn(f"{folder}: training on the {len(images)} images directly inside; "
                      f"{sum(nested.values())} images in its subfolders ({', '.join(nested)}) "
                      "are not used (fit does not look into subfolders)", SkippedFileWarning,
                      stacklevel=5)
    return images


RESCORE_TIMINGS = ("memory_bank_seconds", "calibration_seconds")
"""The ``history["timings"]`` stages (seconds) that :meth:`PEDENet.rescore` runs again."""


def _check_device(device) -> None:
    """Raise ValueError unless ``device`` is "cpu", or "cuda" / "cuda:N" with CUDA available."""
    text = str(device)
    if not (text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if text != "cpu":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r}: CUDA is not available on this machine (this "
                             "torch build or no GPU); use device='cpu'")
        if ":" in text and int(text[5:]) >= torch.cuda.device_count():
            raise ValueError(f"device {text!r}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")


def _new_config(values: dict) -> PEDENetConfig:
    """A checked :class:`PEDENetConfig` from constructor keywords (ValueError / TypeError
    naming the setting), including the estimator's own rule on ``memory_bank_size``."""
    config = PEDENetConfig(**values)
    if config.scoring != "distance" and config.memory_bank_size != _DEFAULT_BANK:
        raise ValueError(f"memory_bank_size={config.memory_bank_size} has no effect with "
                         f"scoring={config.scoring!r}: pass scoring='distance' too, or "
                         "leave memory_bank_size out")
    return config


def _same(a, b) -> bool:
    """Equal settings (lists and tuples compare by their items)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. an array: not comparable to a setting
        return False


class PEDENet:
    """PEDENet anomaly detector trained on normal images only.

    >>> model = PEDENet(steps=200).fit("path/to/category/train/good")
    >>> pred = model.predict(["a.png", "b.png"])
    >>> pred.scores, pred.p_values, pred.anomalous      # (N,) float64, float64, bool

    Args: any field of :class:`pedenet.config.PEDENetConfig` as a keyword, plus
        device: "cpu" (default) or "cuda".

    Raises ValueError for an invalid setting, and for a ``memory_bank_size`` other than the
    default without ``scoring="distance"`` (it would have no effect). :meth:`rescore`
    switches a fitted model's scoring without training it again.

    After ``fit``: ``calibration`` (:class:`pedenet.calibration.Calibration`, or None when
    ``calibration_fraction`` is 0) holds the held-out normal scores behind p-values and
    thresholds; ``history`` the training diagnostics.
    """

    def __init__(self, device: str = "cpu", **config):
        _check_device(device)
        self.config = _new_config(config)
        self.device = device
        self._given = dict(config)  # the values as passed: get_params returns these objects
        self.network: PEDENetNetwork | None = None
        self.history: dict = {}
        # quantiles ("0.5", "0.99", "0.999", "1.0") of the patch energy of the training images:
        # the training colour scale (pedenet.visualization.color_range falls back to it when
        # fewer than 10 images are held out)
        self.normal_quantiles: dict[str, float] = {}
        self.calibration: Calibration | None = None

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments (scikit-learn's estimator API): ``device`` and every
        field of :class:`pedenet.config.PEDENetConfig`, so that ``sklearn.base.clone(model)``
        gives an unfitted model with the same settings. ``deep`` is accepted and ignored
        (a PEDENet holds no sub-estimators)."""
        params = {"device": self.device}
        for f in fields(PEDENetConfig):
            value = getattr(self.config, f.name)
            given = self._given.get(f.name, value)
            params[f.name] = given if _same(given, value) else value
        if params["scoring"] != "distance":  # a file saved before that rule may hold another
            params["memory_bank_size"] = _DEFAULT_BANK  # size; it has no effect, clone drops it
        return params

    def set_params(self, **params) -> "PEDENet":
        """Change settings of an unfitted model (scikit-learn's estimator API; e.g. by a grid
        search on a clone). The new settings are checked together, as by the constructor.
        Values equal to the current ones change nothing (a fitted model's settings, those
        :meth:`rescore` set included, stay as they are).

        Returns:
            self.

        Raises:
            ValueError: an unknown name (the message lists the valid ones), an invalid value,
                or a change to a fitted model (its network was built from the old settings:
                change a ``sklearn.base.clone(model)`` or a new ``PEDENet`` instead).
        """
        valid = self.get_params()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} for PEDENet; valid: {sorted(valid)}")
        changed = sorted(k for k, v in params.items() if not _same(v, valid[k]))
        if changed and self.network is not None:
            advice = []
            if {"target_fpr", "pixel_fpr"} & set(changed):
                advice.append("for other false-alarm rates pass predict(fpr=..., pixel_fpr=...) "
                              "or thresholds(fpr, pixel_fpr): no new fit is needed")
            if {"scoring", "memory_bank_size", "image_score_border"} & set(changed):
                advice.append("to change scoring, memory_bank_size or image_score_border use "
                              "rescore(images, ...): no training")
            advice.append("for other settings change sklearn.base.clone(model) or a new PEDENet "
                          "and fit it")
            raise ValueError(f"set_params({', '.join(changed)}) on a fitted model: its network, "
                             "mixture and thresholds were made with the old settings; "
                             + "; ".join(advice))
        if not changed:  # nothing to do (the settings of a fitted or rescored model stay)
            return self
        device = params.pop("device", self.device)
        _check_device(device)
        current = {k: v for k, v in valid.items() if k != "device"}
        if params.get("scoring", "distance") != "distance" and "memory_bank_size" not in params:
            current["memory_bank_size"] = _DEFAULT_BANK  # as rescore does: a grid over scoring works
        config = _new_config({**current, **params})
        # keep the objects as passed (get_params returns them) where they still hold
        given = {k: v for k, v in {**self._given, **params}.items() if _same(v, getattr(config, k))}
        self.config, self.device, self._given = config, device, given
        return self

    def __repr__(self) -> str:
        """``PEDENet(<settings that differ from the defaults>)``, and whether it is fitted."""
        default = PEDENetConfig().to_dict()
        changed = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items() if v != default[k])
        state = "not fitted" if self.network is None else (
            f"fitted on {self.history.get('n_train_images', '?')} images"
            + ("" if self.calibration is None else f", {self.calibration.n} held out for thresholds"))
        return f"PEDENet({changed}{', ' if changed else ''}device={self.device!r}) [{state}]"

    @property
    def min_image_side(self) -> int:
        """Smallest accepted image side in pixels: the patch size when images are used at
        their native size (``image_size`` 0), else 1 (every image is resized first)."""
        return int(self.config.patch_size) if not self.config.image_size else 1

    # ---- training -------------------------------------------------------------------------
    def fit(self, images, y=None, *, progress: bool = True, checkpoint: str | os.PathLike | None = None,
            checkpoint_every: int = 100, resume: bool = False,
            keep_checkpoint: bool = False) -> "PEDENet":
        """Train on normal images.

        Args:
            images: a folder of normal images (or a category folder with train/good), a
                sequence of paths / PIL images / arrays (see :func:`as_rgb_array`), or an
                N×H×W×C array (N images). A set or dict is refused (no order).
            y: ignored (every image is taken as normal); there for scikit-learn's
                ``fit(X, y)`` convention. The other arguments are keyword-only.
            progress: show progress bars.
            checkpoint: resume file (e.g. ``RUN_DIR/resume.pt``). When given, the training
                state is written to it atomically every ``checkpoint_every`` steps, and when
                SIGINT (Ctrl-C), SIGTERM or SIGHUP arrives during training: the current step is
                finished, the state saved, and :class:`pedenet.resume.TrainingInterrupted`
                (a ``KeyboardInterrupt``) raised.
            checkpoint_every: steps between periodic saves (0: only on a signal).
            resume: continue from ``checkpoint`` if it exists (same config and images
                required); the result equals that of an uninterrupted run. The frozen
                features are recomputed; the EM initialization is not redone (the saved
                network holds it).
            keep_checkpoint: keep ``checkpoint`` after a successful fit (default: delete it).

        The result depends only on the images and ``config`` (``seed`` included); the global
        random state of torch (CPU) and numpy is the same after fit as before it.

        A random ``calibration_fraction`` of the images (seeded) is held out of training and
        scored after it to calibrate the thresholds (:mod:`pedenet.calibration`); with fewer
        than 2 images, or ``calibration_fraction`` 0, nothing is held out and the model has no
        p-values or decisions.

        Returns:
            self.

        Raises:
            pedenet.data.DataError: a missing or empty folder, a dataset root, a folder whose
                images are only in subfolders, an unreadable image, or (with ``image_size`` 0)
                an image smaller than the patch size.
            TypeError: a bool as ``y`` (``progress`` is keyword-only).
            ValueError: an empty list, an array that is not an image (see :func:`as_rgb_array`),
                or fewer training patch embeddings than mixture components (before training;
                fewer than K × (D + 1) warns: :func:`pedenet.training.check_embedding_count`).
            CheckpointError: an unusable resume file.

        Every held-out image is read before training starts, so a bad one stops fit at once.
        All or nothing: when fit raises (or is interrupted), a model fitted before is left as
        it was (network, mixture, thresholds and history).
        """
        if isinstance(y, bool):  # fit(images, False): progress used to be the second argument
            raise TypeError("fit(images, y): y is ignored (scikit-learn's convention); pass "
                            f"progress={y} by keyword")
        all_items = _expand(images, training=True)
        if not all_items:
            raise ValueError("fit needs at least one normal image; the input holds none")
        train_idx, cal_idx = split_calibration(len(all_items), self.config.calibration_fraction,
                                               self.config.seed)
        if self.config.calibration_fraction > 0 and len(cal_idx) == 0:
            warnings.warn(f"{len(all_items)} training image(s): too few to hold any out for "
                          "calibration; the model will report scores without p-values or decisions",
                          stacklevel=2)
        items = [all_items[i] for i in train_idx]
        cal_items = [all_items[i] for i in cal_idx]
        state = None
        if resume and checkpoint is not None and Path(checkpoint).exists():
            state = read_resume_state(checkpoint, self.config, items)
        # the held-out images are scored after training: read them now, so that a bad one
        # stops fit before the training, not after it (the training images are read first)
        self._read_held_out(cal_items, cal_idx, progress)
        before = (self.network, self.history, self.calibration, self.normal_quantiles)
        # fit seeds torch's and numpy's global generators (the network's initialization draws
        # from them); the caller's random streams are put back afterwards
        global_rng = (torch.get_rng_state(), np.random.get_state())
        try:  # all or nothing: an error or Ctrl-C part way leaves a fitted model as it was
            _seed_everything(self.config.seed)
            self.network = PEDENetNetwork(self.config).to(self.device)
            cache = cache_frozen_features(self.network, _loaders(items, self.min_image_side, train_idx),
                                          progress)
            check_embedding_count(self.network, cache, held_out=len(cal_items))  # before EM, training
            check_lp_distance(self.network, cache)
            if state is None:
                init = init_membership(self.network, cache, progress) if self.config.de_init == "em" else {}
                start, opt_state, gen_state, history = 0, None, None, None
            else:  # the saved weights hold the EM initialization and the training so far
                try:
                    self.network.load_state_dict(state["state_dict"], strict=True)
                except (RuntimeError, KeyError, TypeError) as exc:
                    raise CheckpointError(f"{checkpoint}: resume state does not match this model: {exc}") from None
                init = state.get("de_init", {})
                start, opt_state, gen_state = int(state["step"]), state["optimizer"], state["generator"]
                history = TrainingHistory(**state.get("history", {}))
            on_step = None
            if checkpoint is not None:
                on_step = ResumeWriter(checkpoint, every=checkpoint_every, network=self.network,
                                       config=self.config, items=items, de_init=init)
            with deferred_interrupts(enabled=checkpoint is not None) as stop:
                if on_step is not None:
                    on_step.stop = stop
                history = train_network(self.network, cache, progress=progress, start_step=start,
                                        optimizer_state=opt_state, generator_state=gen_state,
                                        history=history, on_step=on_step)
            fit_mixture(self.network, cache, progress)
            history.timings.update(self._fit_scoring(cache, cal_items, cal_idx, progress))
            del cache
            self.history = history.to_dict()
            self.history["de_init"] = init
            self.history["n_train_images"] = len(items)
            self.history["n_calibration_images"] = len(cal_items)
            if self.network.memory_bank is not None:
                self.history["memory_bank_rows"] = len(self.network.memory_bank)
            self.history["calibration_images"] = _names(cal_idx, cal_items)
            self.history["calibration_input_hashes"] = _input_hashes(cal_idx, cal_items)
            if state is not None:
                self.history["resumed_from_step"] = start
            if checkpoint is not None and not keep_checkpoint:
                Path(checkpoint).unlink(missing_ok=True)
        except BaseException:
            self.network, self.history, self.calibration, self.normal_quantiles = before
            raise
        finally:
            torch.set_rng_state(global_rng[0])
            np.random.set_state(global_rng[1])
        return self

    def rescore(self, images, scoring: str | None = None, memory_bank_size: int | None = None,
                progress: bool = True, image_score_border: float | None = None) -> "PEDENet":
        """Switch a fitted model to another patch scoring or image-score edge band without
        training it again.

        Training depends on neither, so the result equals a fit with the new ``scoring`` and
        ``image_score_border`` (same images, seed and settings): the frozen features of the training
        images are computed again, then the memory bank (scoring ``"distance"``; removed for
        ``"mixture"``, whose ``memory_bank_size`` returns to the default), the colour scale and
        the held-out thresholds are rebuilt. The network and the mixture do not change. It
        costs the images' encoding, the bank and the held-out images' scoring, not the
        training. All or nothing: when it raises (or is interrupted), the model is as before.

        The images are checked to be the fit's: as many, the held-out ones of the recorded
        file names (files) or pixel hashes (arrays and PIL images, where the model
        recorded them: ``history["calibration_input_hashes"]``), and (pretrained encoder) their features' per-channel mean
        equal to the one fitted then (:func:`pedenet.training.cache_frozen_features`); that
        catches other data, not a change to one training image among many.

        Args:
            images: the images ``fit`` was given (all of them: the same seeded split is drawn
                again to find the training and the held-out ones).
            scoring: ``"mixture"`` or ``"distance"`` (see :class:`pedenet.config.PEDENetConfig`);
                None: the model's own.
            memory_bank_size: M for scoring ``"distance"`` (None: the model's setting,
                default 200 000).
            progress: show progress bars.
            image_score_border: the config's ``image_score_border`` in [0, 0.5) (None: the
                model's own); the thresholds are calibrated again with it.

        Returns:
            self.

        Raises:
            RuntimeError: the model is not fitted.
            ValueError: an unknown scoring, ``memory_bank_size`` with scoring ``"mixture"``, or a
                border outside [0, 0.5).
            pedenet.training.ImagesMismatchError: (a ValueError) images other than those the
                model was fitted on (another count, held-out images of other file names than
                ``history["calibration_images"]``, or other features); its ``problem`` says
                what differs without the advice.
            pedenet.data.DataError: an image that cannot be read (the held-out images are
                read first, before the training images are encoded).
        """
        import copy
        import dataclasses

        net = self._require_fitted()
        scoring = self.config.scoring if scoring is None else scoring
        if memory_bank_size is not None and scoring != "distance":
            raise ValueError(f"memory_bank_size is used by scoring 'distance' only, not {scoring!r}")
        if scoring != "distance":
            memory_bank_size = _DEFAULT_BANK  # as a fit with scoring "mixture" has it
        config = dataclasses.replace(self.config, scoring=scoring, memory_bank_size=(
            self.config.memory_bank_size if memory_bank_size is None else memory_bank_size),
            image_score_border=(self.config.image_score_border if image_score_border is None
                                else image_score_border))
        all_items = _expand(images, training=True)
        train_idx, cal_idx = split_calibration(len(all_items), config.calibration_fraction, config.seed)
        items = [all_items[i] for i in train_idx]
        cal_items = [all_items[i] for i in cal_idx]
        self._check_same_images(items, cal_items, cal_idx)
        self._read_held_out(cal_items, cal_idx, progress)  # before the training images' encoding
        before = (self.config, net.config, net.memory_bank, self.normal_quantiles,
                  self.calibration, copy.deepcopy(self.history))
        try:  # all or nothing: an error or Ctrl-C part way leaves the model as it was
            self.config = net.config = config
            cache = cache_frozen_features(net, _loaders(items, self.min_image_side, train_idx), progress,
                                          fit_stats=False)
            timings = self._fit_scoring(cache, cal_items, cal_idx, progress)
        except BaseException:
            (self.config, net.config, net.memory_bank, self.normal_quantiles,
             self.calibration, self.history) = before
            raise
        del cache
        self.history["timings"] = {**{k: v for k, v in self.history.get("timings", {}).items()
                                      if k not in RESCORE_TIMINGS}, **timings}
        self.history.pop("memory_bank_rows", None)
        if net.memory_bank is not None:
            self.history["memory_bank_rows"] = len(net.memory_bank)
        self.history["calibration_images"] = _names(cal_idx, cal_items)  # where they are now
        return self

    def _read_held_out(self, cal_items: list, cal_idx, progress: bool) -> None:
        """Read every held-out image once (nothing kept), so that a bad one stops fit or
        rescore before their long work, naming it (``cal_idx``: positions in the input)."""
        for load in progress_bar(_loaders(cal_items, self.min_image_side, cal_idx), desc="checking "
                                 "held-out images", unit="img", disable=not progress):
            load()

    def _check_same_images(self, items: list, cal_items: list, cal_idx=()) -> None:
        """Raise :class:`ImagesMismatchError` unless ``items`` (training) and ``cal_items``
        (held out) are as many as fit had, the held-out files have the names fit recorded,
        and the held-out arrays and PIL images (``cal_idx``: their positions) the pixel
        hashes it recorded (``history["calibration_input_hashes"]``)."""
        h = self.history
        n_train, n_cal = h.get("n_train_images"), h.get("n_calibration_images")
        if (n_train, n_cal) != (len(items), len(cal_items)) and n_train is not None:
            raise ImagesMismatchError(f"the model was fitted on {n_train} training and {n_cal} "
                                      f"held-out images; these images split into {len(items)} and "
                                      f"{len(cal_items)}")
        recorded = [Path(c).name for c in h.get("calibration_images", []) if not c.startswith("<input")]
        given = [Path(os.fspath(c)).name for c in cal_items if isinstance(c, (str, os.PathLike))]
        if recorded and given and recorded != given:
            diff = next(f"{a} against {b}" for a, b in zip(recorded, given) if a != b)
            moved = (" (the same names in another order: the held-out images are found by "
                     "their position)" if sorted(given) == sorted(recorded) else "")
            raise ImagesMismatchError(f"these images are not those the model was fitted on: a "
                                      f"held-out image differs ({diff}, recorded first){moved}")
        hashes = h.get("calibration_input_hashes") or {}
        held_as = {digest: name for name, digest in hashes.items()}
        for name, digest in _input_hashes(cal_idx, cal_items).items():
            if name in hashes and hashes[name] != digest:
                if digest in held_as:  # the fit's own images, moved
                    raise ImagesMismatchError(
                        f"these images are in another order than fit's: held-out "
                        f"{name.strip('<>')} has the pixels fit held out as "
                        f"{held_as[digest].strip('<>')} (the held-out images are found by their "
                        "position)")
                raise ImagesMismatchError(f"these images are not those the model was fitted on: "
                                          f"held-out {name.strip('<>')} has other pixels (or "
                                          "another dtype) than the one fit held out")

    def _fit_scoring(self, cache: list[torch.Tensor], cal_items: list, cal_idx, progress: bool) -> dict:
        """What follows training and the mixture: the memory bank (scoring "distance"), the
        colour scale of normal scores (``normal_quantiles``) and the thresholds from the
        held-out ``cal_items`` (``calibration``; None when none are held out; ``cal_idx``:
        their positions among the images given, named in errors). ``cache``: the
        training images' frozen features. Returns the stage timings in seconds
        (``memory_bank_seconds``, ``calibration_seconds``)."""
        timings = {}
        self.network.memory_bank = None
        if self.config.scoring == "distance":
            t0 = time.perf_counter()
            bank, counts = build_memory_bank(self.network, cache, self.config.memory_bank_size,
                                             self.config.seed, progress)
            self.network.memory_bank = bank.to(self.device)
            self.normal_quantiles = leave_one_out_quantiles(self.network, cache, counts, self.config.seed)
            timings["memory_bank_seconds"] = time.perf_counter() - t0
        else:
            self.normal_quantiles = training_energy_quantiles(self.network, cache)
        self.calibration = None
        if cal_items:
            t0 = time.perf_counter()
            from .inference import iter_predict

            maps = [m for _, m, _ in progress_bar(iter_predict(self, cal_items, positions=cal_idx),
                                                  total=len(cal_items),
                                                  desc="calibrating", unit="img", disable=not progress)]
            self.calibration = calibrate(maps, self.config.target_fpr, seed=self.config.seed,
                                         pixel_fpr=self.config.pixel_fpr,
                                         score_fraction=self.config.image_score_fraction,
                                         score_border=self.config.image_score_border)
            self.calibration.image_threshold(stacklevel=4)  # warns if the target is out of reach
            self._warn_if_held_out_scores_far_above_training()
            timings["calibration_seconds"] = time.perf_counter() - t0
        return timings

    def _require_fitted(self) -> PEDENetNetwork:
        if self.network is None or self.network.mixture is None:
            raise RuntimeError("this PEDENet is not fitted: call fit() or pedenet.load() first")
        return self.network

    def _warn_if_held_out_scores_far_above_training(self) -> None:
        """Warn (UserWarning) when the median held-out normal image scores far above the
        training images' colour scale (:func:`pedenet.visualization.color_range` with
        ``source="training"``): more than ``OVERFIT_SPANS`` times the scale's span above its hottest colour.
        The model then fits its training images far better than new normal ones (it
        memorized them: too few images for the mixture), and overlays of normal images come
        out saturated. (Mildly above the scale is common with small training sets: an
        untrained model on 80 built-in 128 px grass crops sits between 0 and 2.5 spans:
        tests/test_calibration.py.)"""
        from .visualization import MIN_HELD_OUT_FOR_SCALE, color_range, color_source

        vmin, vmax = color_range(self, source="training")
        median = float(np.median(self.calibration.scores))
        if vmax is not None and median > vmax + OVERFIT_SPANS * (vmax - vmin):
            if self.calibration.n >= MIN_HELD_OUT_FOR_SCALE:
                overlays = "overlay colours stay valid too (they come from the held-out images)"
            elif color_source(self) == "held_out":
                overlays = (f"overlay colours come from the {self.calibration.n} held-out "
                            f"image(s) (the training scale would paint every normal pixel the "
                            f"hottest colour), a rough scale below {MIN_HELD_OUT_FOR_SCALE}")
            else:
                overlays = (f"overlays of normal images will look hot (their colours come from "
                            f"the training images below {MIN_HELD_OUT_FOR_SCALE} held-out ones)")
            advice = " (or fewer --n-components)" if self.config.scoring == "mixture" else ""
            warnings.warn(
                f"the held-out normal images score far above the training images (median image "
                f"score {median:.4g}; the training patches' hottest colour starts at {vmax:.4g}): "
                f"the model fits its training images much better than new normal ones - use "
                f"more training images{advice}. Thresholds and p-values stay "
                f"valid (they come from the held-out images); {overlays}", stacklevel=4)

    def no_calibration_reason(self) -> str:
        """Why the fitted model holds out no normal images (no thresholds, p-values or
        decisions), with what to do: ``calibration_fraction`` 0, or too few images to hold
        any out (``round(fraction · n)`` is 0, or only one image)."""
        fraction = self.config.calibration_fraction
        if fraction == 0:
            return "fitted with calibration_fraction 0; refit with --calibration-fraction 0.2"
        n = int(self.history.get("n_train_images", 0)) + int(self.history.get("n_calibration_images", 0))
        need = min_images_to_hold_out(fraction)
        return (f"fitted on {n} normal image(s), too few to hold any out at calibration_fraction "
                f"{fraction:g}; fit on at least {need} normal images")

    # ---- inference ------------------------------------------------------------------------
    @torch.inference_mode()
    def anomaly_map(self, image: ImageLike, max_tile: int | None = 1024) -> np.ndarray:
        """Anomaly map of one image: float32 H×W at the image's own resolution (energy, or distance).

        ``max_tile``: images whose processed size exceeds this many pixels on a side are
        encoded in overlapping tiles (see :meth:`iter_predict`); None disables tiling.
        Raises TypeError / ValueError for a ``max_tile`` that is not a whole number >= 1
        (:func:`pedenet.inference.check_options`), RuntimeError if the model is not fitted.
        """
        from .inference import check_options

        _, max_tile = check_options(1, max_tile)
        net = self._require_fitted()
        arr = check_side(as_rgb_array(image), self.min_image_side, image)
        x = to_tensor(arr, self.config.image_size, self.config.keep_aspect).to(self.device)
        grid = net.patch_energy(x, max_tile)[0].cpu().numpy()
        return grid_to_map(grid, stride=net.stride, offset=net.offset, processed_size=tuple(x.shape[-2:]),
                           original_size=arr.shape[:2], sigma=self.config.smoothing_sigma)

    @torch.inference_mode()
    def cluster_map(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray]:
        """Which normal pattern each region resembles: the most likely mixture component per patch.

        For every patch embedding z the component k maximizing the responsibility
        γ_k(z) = φ_k N(z|μ_k,Σ_k) / Σ_j φ_j N(z|μ_j,Σ_j) (DAGMM / PEDENet membership, the
        posterior of the fitted mixture), spread to the pixels nearest to each patch centre.

        Args:
            image: path, PIL image or array (see :func:`as_rgb_array`).

        Returns:
            ``(labels, confidence)``: int64 H×W component indices in [0, K) and float32 H×W
            responsibility of that component (0..1), at the image's own resolution (pixels).
            Raises RuntimeError if the model is not fitted.
        """
        from .scoring import nearest_cells

        net = self._require_fitted()
        arr = check_side(as_rgb_array(image), self.min_image_side, image)
        x = to_tensor(arr, self.config.image_size, self.config.keep_aspect).to(self.device)
        emb = net.embed(x)[0]  # D×h×w
        d, gh, gw = emb.shape
        gamma = net.mixture.responsibilities(emb.permute(1, 2, 0).reshape(-1, d))
        conf, lab = gamma.max(dim=1)
        lab, conf = lab.reshape(gh, gw).cpu().numpy(), conf.reshape(gh, gw).float().cpu().numpy()
        (hp, wp), (h, w) = tuple(x.shape[-2:]), arr.shape[:2]
        rows = nearest_cells(h, hp, gh, net.stride, net.offset)
        cols = nearest_cells(w, wp, gw, net.stride, net.offset)
        return lab[np.ix_(rows, cols)].astype(np.int64), conf[np.ix_(rows, cols)]

    def iter_predict(self, images, batch_size: int = 16, max_tile: int | None = 1024):
        """Stream ``(index, map, score)`` for each image, in input order (a generator).

        Images (paths, folders, arrays, PIL images; a generator is consumed lazily) are read
        in a background thread at most ``2 × batch_size`` ahead, and consecutive images that
        share a processed size (all of them when ``image_size`` > 0) are encoded together in
        batches of at most ``batch_size`` images and ``pedenet.inference.BATCH_PIXELS``
        pixels under ``torch.inference_mode``; nothing is kept after it is
        yielded, so memory stays flat for any number of images. ``map`` is float32 H×W at
        the image's own resolution and equals :meth:`anomaly_map` (to float rounding of the
        batched convolutions); ``score`` is its image score (``config.image_score_fraction`` and
        ``image_score_border``, :func:`pedenet.scoring.image_score`). Images larger than ``max_tile``
        pixels on a side after preprocessing are encoded in overlapping tiles
        (:meth:`pedenet.model.PEDENetNetwork.patch_energy`); None disables tiling.

        Raises (at the call, before any image is read): TypeError / ValueError for a
        ``batch_size`` or ``max_tile`` that is not a whole number >= 1
        (:func:`pedenet.inference.check_options`); RuntimeError if the model is not fitted.
        """
        from .inference import check_options, iter_predict

        batch_size, max_tile = check_options(batch_size, max_tile)  # now, not at the first next()
        self._require_fitted()
        return iter_predict(self, images, batch_size=batch_size, max_tile=max_tile)

    def thresholds(self, fpr: float | None = None, pixel_fpr: float | None = None) -> dict | None:
        """Calibrated thresholds for a target false-alarm rate of images ``fpr`` and of pixels
        ``pixel_fpr`` (defaults ``config.target_fpr``, ``config.pixel_fpr``): a dict with
        target_fpr, image_threshold, pixel_fpr, pixel_threshold (thresholds in energy units, or distance),
        n_calibration, achievable_fpr and guaranteed_fpr; None when the model has no
        calibration. Raises ValueError for rates outside (0, 1)."""
        if self.calibration is None:
            return None
        return self.calibration.summary(self.config.target_fpr if fpr is None else fpr,
                                        self.config.pixel_fpr if pixel_fpr is None else pixel_fpr)

    def predict(self, images, *, progress: bool = False, batch_size: int = 16,
                max_tile: int | None = 1024, fpr: float | None = None,
                pixel_fpr: float | None = None) -> Predictions:
        """Anomaly maps, image scores, p-values, decisions and defect masks.

        Images are batched and streamed (see :meth:`iter_predict`). ``fpr`` is the target
        false-alarm rate of the decisions (default ``config.target_fpr``); a CalibrationWarning
        says when the held-out images are too few to guarantee it. ``pixel_fpr`` (default
        ``config.pixel_fpr``) sets the pixel threshold of the masks.

        Returns:
            :class:`pedenet.inference.Predictions`: ``maps`` (float32 H_i×W_i, energy units, or distance),
            ``scores`` (float64 (N,), image scores), and when calibrated ``p_values`` (float64),
            ``anomalous`` (bool), ``masks`` (bool H_i×W_i) and ``thresholds``. A model
            without calibration warns if ``fpr`` / ``pixel_fpr`` are given. ``images`` as for
            :meth:`fit` (a category folder means its train/good images; pass test folders or
            files to score others).

        Raises:
            pedenet.data.DataError: a missing or unreadable image file.
            ValueError: an array that is not an image, a rate outside (0, 1), or a
                ``batch_size`` / ``max_tile`` below 1.
            TypeError: a rate that is not a number, or a ``batch_size`` / ``max_tile`` that is
                not a whole number.
            RuntimeError: the model is not fitted.
        """
        from .calibration import check_fpr
        from .inference import check_options

        batch_size, max_tile = check_options(batch_size, max_tile)
        fpr = None if fpr is None else check_fpr(fpr, "fpr")
        pixel_fpr = None if pixel_fpr is None else check_fpr(pixel_fpr, "pixel_fpr")
        items = _expand(images)
        maps: list = [None] * len(items)
        scores = np.zeros(len(items), dtype=np.float64)
        results = self.iter_predict(items, batch_size=batch_size, max_tile=max_tile)
        for i, amap, score in progress_bar(results, total=len(items), desc="scoring", unit="img",
                                           disable=not progress):
            maps[i], scores[i] = amap, score
        if self.calibration is None:
            if fpr is not None or pixel_fpr is not None:
                warnings.warn(f"this model has no calibration ({self.no_calibration_reason()}): "
                              "fpr / pixel_fpr are ignored and there are no p-values, decisions or "
                              "masks", stacklevel=2)
            return Predictions(maps=maps, scores=scores)
        if fpr is not None:  # a new target: warn if out of reach (fit warned for the default)
            self.calibration.image_threshold(fpr, stacklevel=3)
        th = self.thresholds(fpr, pixel_fpr)
        image_t = th["image_threshold"]
        anomalous = scores > image_t
        masks = [(m > th["pixel_threshold"]) & bool(a) for m, a in zip(maps, anomalous)]
        return Predictions(maps=maps, scores=scores, p_values=self.calibration.p_values(scores),
                           anomalous=anomalous, masks=masks, thresholds=th)

    def score_samples(self, images) -> np.ndarray:
        """Image anomaly scores (N,) float64: higher = more anomalous (the opposite sign of
        scikit-learn's ``score_samples``, where lower = more abnormal)."""
        return self.predict(images).scores

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to ``path`` atomically (see :mod:`pedenet.checkpoint`)."""
        net = self._require_fitted()
        save_checkpoint(path, {
            "pedenet_version": __version__,
            "config": self.config.to_dict(),
            "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
            "mixture": net.mixture.state_dict(),
            "memory_bank": None if net.memory_bank is None else net.memory_bank.state_dict(),
            "history": self.history,
            "normal_quantiles": self.normal_quantiles,
            "calibration": None if self.calibration is None else {  # tensors: weights_only load
                k: torch.as_tensor(v, dtype=torch.float64) if isinstance(v, float) else torch.as_tensor(v)
                for k, v in self.calibration.state_dict().items()},  # rates in float64: 0.01 stays 0.01
        })

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "PEDENet":
        """Read a model written by :meth:`save`: its ``model.pt``, or the run folder holding
        it (as the command line accepts). Raises CheckpointError for invalid files."""
        _check_device(device)  # before the file: not reported as a checkpoint problem
        if Path(path).is_dir() and (Path(path) / "model.pt").is_file():
            path = Path(path) / "model.pt"
        data = load_checkpoint(path)
        try:
            config = PEDENetConfig.from_dict(data["config"])
            model = cls(device=device)  # not cls(**config): files saved before the constructor
            model.config = config       # refused memory_bank_size without distance scoring load too
            net = PEDENetNetwork(config, load_weights=False)
            net.load_state_dict(data["state_dict"], strict=True)
            net.mixture = GaussianMixture.from_state_dict(data["mixture"])
            if config.scoring == "distance":
                if data.get("memory_bank") is None:
                    raise ValueError("scoring is 'distance' but the file holds no memory bank")
                net.memory_bank = MemoryBank.from_state_dict(data["memory_bank"])
                if net.memory_bank.dim != config.embedding_dim:
                    raise ValueError(f"the memory bank's embeddings have {net.memory_bank.dim} "
                                     f"values, the model's {config.embedding_dim}")
            calibration = (None if data.get("calibration") is None else Calibration.from_state_dict(
                {k: (v.numpy() if isinstance(v, torch.Tensor) else v)
                 for k, v in data["calibration"].items()}))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: checkpoint content does not match this pedenet: {exc}") from None
        net.mixture = net.mixture.to(device)
        if net.memory_bank is not None:
            net.memory_bank = net.memory_bank.to(device)
        model.network = net.to(device).eval()
        model.history = data.get("history", {})
        model.normal_quantiles = data.get("normal_quantiles", {})
        model.calibration = calibration
        return model


def load(path: str | os.PathLike, device: str = "cpu") -> PEDENet:
    """Load a saved :class:`PEDENet` (``pedenet.load(path)``): a ``model.pt`` or the run folder
    holding it.

    Raises:
        CheckpointError: not a pedenet model file, a damaged one, or one from an incompatible
            version; FileNotFoundError: no such file.
    """
    return PEDENet.load(path, device)
