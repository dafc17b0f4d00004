"""The built-in demo dataset: synthetic defects on real texture photographs, no download.

:func:`make_builtin_dataset` writes a dataset root in the MVTec AD layout from the three
512 x 512 grayscale texture photographs that scikit-image ships inside its package
(``skimage.data.brick()``, ``grass()``, ``gravel()``)::

    <root>/README.txt
    <root>/<category>/train/good/000.png ...
    <root>/<category>/test/good/000.png ...
    <root>/<category>/test/<defect>/000.png ...          defect: scratch, spot, patch
    <root>/<category>/ground_truth/<defect>/000_mask.png
    <root>/<category>/.complete                          marker with the generation parameters

* Images are ``size x size`` 8-bit grayscale PNG crops.  Training crops come from the top
  :data:`TRAIN_FRACTION` of the photograph's rows, test crops (good and defective) from the
  remaining rows, so every test image shows texture not seen in training.
* Defects:

  - ``scratch``: a thin straight or curved line, 1-3 px wide, about 20-80 px long, much
    brighter or darker than the texture under it;
  - ``spot``: a filled, rotated ellipse 6-20 px across whose intensity is shifted by 70-110
    grey levels;
  - ``patch``: a rectangle or ellipse 16-40 px across pasted from another of the texture
    photographs.

* Masks are 0/255 PNGs and exact: a mask pixel is 255 if and only if the defect changed that
  pixel (every pixel of the drawn shape is changed, at least by one grey level), so masks are
  never empty.
* Output is deterministic for a given ``seed`` (byte-identical files); each category uses its
  own random stream, so a category's images do not depend on which other categories are made.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import draw

__all__ = [
    "DATASET_NAME",
    "DEFECT_TYPES",
    "TEXTURES",
    "TRAIN_FRACTION",
    "builtin_dataset_root",
    "make_builtin_dataset",
    "normal_crops",
]

DATASET_NAME = "builtin-textures-v1"
"""Folder name of the default dataset root (versioned: a change of content gets a new name)."""

TEXTURES: dict[str, Callable[[], np.ndarray]] = {
    "brick": skdata.brick,
    "grass": skdata.grass,
    "gravel": skdata.gravel,
}
"""Category name -> function returning the 512 x 512 uint8 photograph (shipped, no download)."""

DEFECT_TYPES = ("scratch", "spot", "patch")
"""Defect folder names, in generation order."""

TRAIN_FRACTION = 0.62
"""Fraction of the photograph's rows (from the top) that training crops are taken from."""

_MIN_SIZE = 48
_FORMAT_VERSION = 1
_MARKER = ".complete"

_README = """\
pedenet built-in demo dataset ({name})
========================================

Synthetic anomaly-localization data in the MVTec AD folder layout, made by
pedenet.builtin.make_builtin_dataset from the texture photographs that scikit-image ships
(skimage.data.brick, grass, gravel; 512 x 512 grayscale). Nothing was downloaded.

<category>/train/good                 defect-free crops from the top {pct}% of the photograph
<category>/test/good                  defect-free crops from the remaining rows (unseen texture)
<category>/test/<defect>              crops from the remaining rows with one synthetic defect
<category>/ground_truth/<defect>/*_mask.png   0/255 masks: 255 exactly where the defect
                                      changed the pixel

Defects: scratch (thin bright or dark line, 1-3 px wide, 20-80 px long), spot (filled
ellipse 6-20 px with strongly shifted intensity), patch (16-40 px rectangle or ellipse
pasted from another texture photograph).

The files are generated and can be deleted at any time; they are made again on demand.
"""


def builtin_dataset_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Default location of the built-in dataset, created if missing (the dataset itself is not).

    Args:
        cache_dir: cache folder to use; default ``$PEDENET_CACHE`` if set, else
            ``~/.cache/pedenet``.

    Returns:
        ``<cache_dir>/builtin-textures-v1`` as an existing folder.

    Raises:
        OSError: the folder cannot be created.
    """
    if cache_dir is None:
        env = os.environ.get("PEDENET_CACHE")
        cache_dir = Path(env) if env else Path.home() / ".cache" / "pedenet"
    path = Path(cache_dir).expanduser() / DATASET_NAME
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- defects


def _finish(clean: np.ndarray, new: np.ndarray, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep ``new`` inside ``shape`` only, and make sure every pixel of the shape changed."""
    out = np.where(shape, np.clip(np.rint(new), 0, 255), clean).astype(np.uint8)
    same = shape & (out == clean)
    if same.any():
        values = clean[same].astype(np.int16)
        out[same] = np.where(values < 128, values + 1, values - 1).astype(np.uint8)
    return out, shape.copy()


def _direction(rng: np.random.Generator, mean: float, amount: float) -> float:
    """+1 (brighter) or -1 (darker), random but flipped when there is too little room."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    room = (255.0 - mean) if sign > 0 else mean
    if room < 0.8 * amount:
        sign = -sign
    return sign


def _scratch(crop: np.ndarray, rng: np.random.Generator, others) -> tuple[np.ndarray, np.ndarray]:
    s = crop.shape[0]
    length = rng.uniform(20.0, min(70.0, 0.6 * s))
    bend = rng.uniform(-0.2, 0.2) * length if rng.random() < 0.7 else 0.0
    width = int(rng.integers(1, 4))
    margin = length / 2 + abs(bend) + 3
    cy, cx = rng.uniform(margin, s - margin, size=2)
    theta = rng.uniform(0.0, np.pi)
    d = np.array([np.sin(theta), np.cos(theta)])
    n = np.array([np.cos(theta), -np.sin(theta)])
    c = np.array([cy, cx])
    p0, p1, p2 = c - length / 2 * d, c + 2 * bend * n, c + length / 2 * d
    t = np.linspace(0.0, 1.0, int(2 * length) + 2)[:, None]
    pts = np.rint((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(int)
    shape = np.zeros(crop.shape, dtype=bool)
    for (r0, c0), (r1, c1) in zip(pts[:-1], pts[1:]):
        rr, cc = draw.line(r0, c0, r1, c1)
        shape[rr, cc] = True
    if width == 2:
        shape = ndimage.binary_dilation(shape, structure=np.ones((2, 2), bool))
    elif width == 3:
        shape = ndimage.binary_dilation(shape, structure=ndimage.generate_binary_structure(2, 1))
    mean = float(crop[shape].mean())
    contrast = rng.uniform(80.0, 120.0)
    sign = _direction(rng, mean, contrast)
    target = np.clip(mean + sign * contrast, 0, 255)
    new = target + rng.normal(0.0, 4.0, size=crop.shape)
    return _finish(crop, new, shape)


def _spot(crop: np.ndarray, rng: np.random.Generator, others) -> tuple[np.ndarray, np.ndarray]:
    s = crop.shape[0]
    ry, rx = rng.uniform(3.0, 10.0, size=2)
    r = max(ry, rx) + 1
    cy, cx = rng.uniform(r, s - r, size=2)
    rr, cc = draw.ellipse(cy, cx, ry, rx, shape=crop.shape, rotation=rng.uniform(0, np.pi))
    shape = np.zeros(crop.shape, dtype=bool)
    shape[rr, cc] = True
    shift = rng.uniform(70.0, 110.0)
    sign = _direction(rng, float(crop[shape].mean()), shift)
    new = crop.astype(np.float64) + sign * shift
    return _finish(crop, new, shape)


def _patch(crop: np.ndarray, rng: np.random.Generator, others) -> tuple[np.ndarray, np.ndarray]:
    s = crop.shape[0]
    hi = min(40.0, s / 2)
    shape = np.zeros(crop.shape, dtype=bool)
    if rng.random() < 0.5:
        h, w = (int(v) for v in np.rint(rng.uniform(16.0, hi, size=2)))
        r0 = int(rng.integers(0, s - h + 1))
        c0 = int(rng.integers(0, s - w + 1))
        shape[r0:r0 + h, c0:c0 + w] = True
    else:
        ry, rx = rng.uniform(8.0, hi / 2, size=2)
        r = max(ry, rx) + 1
        cy, cx = rng.uniform(r, s - r, size=2)
        rr, cc = draw.ellipse(cy, cx, ry, rx, shape=crop.shape, rotation=rng.uniform(0, np.pi))
        shape[rr, cc] = True
    source = others[int(rng.integers(0, len(others)))]
    sr = int(rng.integers(0, source.shape[0] - s + 1))
    sc = int(rng.integers(0, source.shape[1] - s + 1))
    new = source[sr:sr + s, sc:sc + s].astype(np.float64)
    return _finish(crop, new, shape)


_DEFECTS = {"scratch": _scratch, "spot": _spot, "patch": _patch}


# --------------------------------------------------------------------------- writing


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(path, format="PNG")


def _crops(photo: np.ndarray, n: int, size: int, rows: tuple[int, int],
           rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` crops whose top row lies in ``[rows[0], rows[1]]`` (inclusive)."""
    r = rng.integers(rows[0], rows[1] + 1, size=n)
    c = rng.integers(0, photo.shape[1] - size + 1, size=n)
    return [photo[ri:ri + size, ci:ci + size].copy() for ri, ci in zip(r, c)]


def _write_category(folder: Path, category: str, params: dict) -> None:
    size, n_train = params["size"], params["n_train"]
    n_good, n_defect = params["n_test_good"], params["n_test_defect"]
    rng = np.random.default_rng([params["seed"], zlib.crc32(category.encode())])
    photo = np.asarray(TEXTURES[category](), dtype=np.uint8)
    if photo.ndim == 3:
        photo = photo[..., 0]
    others = [np.asarray(f(), dtype=np.uint8) for k, f in TEXTURES.items() if k != category]
    split = int(round(TRAIN_FRACTION * photo.shape[0]))
    train_rows = (0, split - size)
    test_rows = (split, photo.shape[0] - size)
    width = max(3, len(str(max(n_train, n_good, n_defect, 1) - 1)))

    def name(i: int) -> str:
        return f"{i:0{width}d}"

    train_dir = folder / "train" / "good"
    train_dir.mkdir(parents=True)
    for i, crop in enumerate(_crops(photo, n_train, size, train_rows, rng)):
        _save_png(crop, train_dir / f"{name(i)}.png")
    good_dir = folder / "test" / "good"
    good_dir.mkdir(parents=True)
    for i, crop in enumerate(_crops(photo, n_good, size, test_rows, rng)):
        _save_png(crop, good_dir / f"{name(i)}.png")
    for defect in DEFECT_TYPES:
        img_dir = folder / "test" / defect
        gt_dir = folder / "ground_truth" / defect
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        for i, crop in enumerate(_crops(photo, n_defect, size, test_rows, rng)):
            image, mask = _DEFECTS[defect](crop, rng, others)
            if not mask.any():  # cannot happen with the shapes above; guard the invariant
                raise RuntimeError(f"empty {defect} mask generated for {category}")
            _save_png(image, img_dir / f"{name(i)}.png")
            _save_png(mask.astype(np.uint8) * 255, gt_dir / f"{name(i)}_mask.png")


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_text_atomic(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def normal_crops(category: str, n: int, *, size: int = 160, seed: int = 1) -> list[np.ndarray]:
    """``n`` fresh defect-free crops drawn exactly like the category's train/good images.

    Crops come from the same rows (the top :data:`TRAIN_FRACTION` of the photograph) at random
    positions, so they are exchangeable with the training images: what calibration tests need
    (a test's new normal images). Use a ``seed`` other than the dataset's for new crops.

    Returns:
        list of ``n`` uint8 ``size``×``size`` grayscale arrays.

    Raises:
        ValueError: unknown category, ``n`` < 0, or ``size`` out of range.
    """
    if category not in TEXTURES:
        raise ValueError(f"unknown built-in category {category!r}; choose from {', '.join(TEXTURES)}")
    photo = np.asarray(TEXTURES[category](), dtype=np.uint8)
    if photo.ndim == 3:
        photo = photo[..., 0]
    split = int(round(TRAIN_FRACTION * photo.shape[0]))
    if n < 0 or not _MIN_SIZE <= size <= split:
        raise ValueError(f"need n >= 0 and {_MIN_SIZE} <= size <= {split}; got n={n}, size={size}")
    rng = np.random.default_rng([int(seed), zlib.crc32(category.encode()), 2])
    return _crops(photo, n, size, (0, split - size), rng)


def make_builtin_dataset(
    root: str | os.PathLike,
    *,
    categories: Sequence[str] = ("brick", "grass", "gravel"),
    n_train: int = 60,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size: int = 160,
    seed: int = 0,
) -> Path:
    """Write (or reuse) the built-in texture dataset under ``root`` in the MVTec AD layout.

    Each category is generated into a temporary folder next to ``root`` and renamed into
    place once complete (with a ``.complete`` marker holding the parameters).  A category
    that is already complete with the same parameters is reused as it is; one made by this
    function with other parameters is replaced.  Takes about a second for the defaults.

    Args:
        root: dataset root to write into (created if missing), e.g.
            :func:`builtin_dataset_root`.
        categories: texture names, a subset of :data:`TEXTURES` (``"brick"``, ``"grass"``,
            ``"gravel"``).
        n_train: training images per category (>= 1).
        n_test_good: defect-free test images per category (>= 0).
        n_test_defect: test images per defect type and category (>= 0); there are
            ``len(DEFECT_TYPES)`` defect types.
        size: side of the square crops in pixels, 48 <= size <= 195 (the height of the test
            region of a 512-row photograph).
        seed: seed of the numpy random Generator; the same seed gives byte-identical files.

    Returns:
        ``Path`` of ``root``.

    Raises:
        ValueError: unknown category or out-of-range count/size.
        FileExistsError: ``root/<category>`` exists but was not written by this function
            (no ``.complete`` marker) - it is never overwritten.
    """
    root = Path(root)
    categories = tuple(categories)
    unknown = [c for c in categories if c not in TEXTURES]
    if unknown or not categories:
        raise ValueError(
            f"unknown built-in categories {unknown}; choose from {', '.join(TEXTURES)}"
        )
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0 or n_test_good + n_test_defect < 1:
        raise ValueError(
            "n_train must be >= 1, n_test_good and n_test_defect >= 0, and at least one "
            f"test image is needed (got {n_train}, {n_test_good}, {n_test_defect})"
        )
    rows = 512
    split = int(round(TRAIN_FRACTION * rows))
    max_size = min(split, rows - split)
    if not _MIN_SIZE <= size <= max_size:
        raise ValueError(f"size must be between {_MIN_SIZE} and {max_size} pixels, got {size}")

    root.mkdir(parents=True, exist_ok=True)
    for category in dict.fromkeys(categories):
        params = {
            "format": _FORMAT_VERSION,
            "category": category,
            "n_train": int(n_train),
            "n_test_good": int(n_test_good),
            "n_test_defect": int(n_test_defect),
            "size": int(size),
            "seed": int(seed),
            "defects": list(DEFECT_TYPES),
        }
        target = root / category
        if target.exists():
            marker = _read_marker(target)
            if marker == params:
                continue
            if marker is None and not (target / _MARKER).exists():
                try:
                    target.rmdir()  # an empty folder is harmless to replace
                except OSError:
                    raise FileExistsError(
                        f"{target}: exists but was not made by make_builtin_dataset (no "
                        f"{_MARKER} marker); remove it or choose another root"
                    ) from None
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}-{category}-", dir=root.parent))
        try:
            staged = work / category
            _write_category(staged, category, params)
            (staged / _MARKER).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
            if target.exists():  # ours, with other parameters: swap it out
                os.rename(target, work / "previous")
            try:
                os.rename(staged, target)
            except OSError:
                if _read_marker(target) != params:  # not a concurrent run that finished first
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _write_text_atomic(
        root / "README.txt",
        _README.format(name=DATASET_NAME, pct=int(round(100 * TRAIN_FRACTION))),
    )
    return root
