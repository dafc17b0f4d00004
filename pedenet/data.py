"""Reading images and masks, and finding samples in the MVTec AD folder layout.

Image conversion rule
---------------------
Every image in pedenet is read by :func:`load_image`, which returns a ``float32`` array of shape
``H x W x 3`` with values in ``[0, 1]``:

* The file is opened with Pillow and fully decoded (``img.load()``), so truncated files are
  detected.  The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so the array
  is the image as a viewer shows it.
* 8-bit modes (``"L"``, ``"RGB"``, ...) are divided by 255.  ``"1"`` (bilevel) gives 0 or 1.
* 16-bit integer modes (``"I;16"``, ``"I;16B"``, ...) are divided by 65535; the 32-bit integer
  mode ``"I"`` is divided by the maximum of its dtype (2**31 - 1).  Negative values clip to 0.
* The float mode ``"F"`` is clipped to ``[0, 1]`` (NaN becomes 0, +inf 1), with a warning
  naming the file when more than 1 % of its values are above 1 (an image on the 0..255 scale).
* Palette images (``"P"``) become RGB, or RGBA when the palette has transparency, and then
  the alpha channel is dropped.
* Alpha channels (``"LA"``, ``"RGBA"``, ``"PA"``) are dropped; the colour channels are used as
  they are (no compositing onto a background).
* Grayscale is replicated to 3 channels.  ``"CMYK"``, ``"YCbCr"`` and any other mode are
  converted to RGB by Pillow.
* TIFF files that Pillow cannot decode (for example multi-channel float TIFFs) are read with
  ``tifffile`` under the same rule (integers divided by the maximum of their dtype, floats
  clipped, extra channels dropped).
* Pillow's decompression-bomb guard stays on: an image larger than ``2 * Image.MAX_IMAGE_PIXELS``
  pixels raises :class:`DataError`.  Any other size is accepted.

Unreadable files (corrupt, truncated, not an image) raise :class:`DataError` naming the file.

Checking inputs up front
------------------------
:func:`check_images` decodes every image (and its mask) before any work starts and reports
*all* bad files at once: unreadable images or masks, masks whose size differs from their
image, images over the size limit, and - when images are used at their native size
(``image_size`` 0) - images with a side shorter than the patch size (``min_side``).  It raises
:class:`BadFilesError` (a :class:`DataError`), or, with ``skip_bad=True``, warns once per
bad file (:class:`SkippedFileWarning`) and returns the usable ones.

Mask rule
---------
:func:`load_mask` returns a ``bool`` array ``H x W`` (``True`` = anomalous):

* The mask is decoded and EXIF-transposed like an image, so it follows the orientation of
  its image.
* It is reduced to one channel: grayscale is used as it is, alpha is dropped, and colour
  masks use the maximum over their colour channels (a red or white annotation both count).
  16-bit masks are scaled to the 0..255 range first (value / 65535 * 255).
* Binarization: if the largest raw value is <= 1 (masks stored as {0, 1}), anomalous means
  value >= 1; otherwise anomalous means value >= 128 on the 0..255 scale (half of 255; {0, 255}
  masks and soft masks).  Float (``"F"``) masks with values in [0, 1] count as fractions of
  255, i.e. anomalous means value >= 0.5.
* An all-zero mask is valid and gives an all-False array.

MVTec AD layout
---------------
::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Image files are recognised by extension (:data:`IMAGE_EXTENSIONS`, case-insensitive); hidden
files (names starting with ``"."``, such as macOS ``._x.png`` resource forks) are ignored.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "UNREAD_IMAGE_EXTENSIONS",
    "BadFilesError",
    "DataError",
    "MissingMaskWarning",
    "SkippedFileWarning",
    "check_image",
    "check_images",
    "Sample",
    "load_image",
    "load_mask",
    "list_images",
    "resolve_category",
    "is_category_dir",
    "categories_under",
    "train_samples",
    "test_samples",
    "find_images",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""File extensions read as images (compared in lower case)."""

UNREAD_IMAGE_EXTENSIONS = frozenset({
    ".gif", ".webp", ".jp2", ".j2k", ".jxl", ".heic", ".heif", ".avif", ".ppm", ".pgm", ".pbm",
    ".pnm", ".tga", ".ico", ".dng", ".raw", ".exr", ".hdr", ".jfif", ".jpe", ".psd", ".svg",
})
"""Image formats that pedenet does not read.  A folder listing that skips such files warns
(:class:`SkippedFileWarning`, with their count), so they are not dropped silently; convert them
to PNG to use them."""

_TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


class DataError(ValueError):
    """A data file or folder is missing, unreadable or inconsistent.

    The message always names the file or folder and says what to do about it.
    """


class MissingMaskWarning(UserWarning):
    """A defective test image has no ground-truth mask file."""


class BadFilesError(DataError):
    """One or more input files cannot be used; ``bad`` lists ``(path, message)`` for each."""

    def __init__(self, message: str, bad: list[tuple[Path, str]]):
        super().__init__(message)
        self.bad = bad


class SkippedFileWarning(UserWarning):
    """An unusable input file was skipped (``skip_bad=True``)."""


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _warn_unread_images(folder: Path, names: list[str]) -> None:
    """Warn once about the files of ``folder`` whose format pedenet does not read."""
    unread = sorted(n for n in names
                    if Path(n).suffix.lower() in UNREAD_IMAGE_EXTENSIONS and not n.startswith("."))
    if unread:
        kinds = ", ".join(sorted({Path(n).suffix.lower() for n in unread}))
        example = ", ".join(unread[:3]) + (", ..." if len(unread) > 3 else "")
        warnings.warn(
            f"{folder}: skipped {len(unread)} image file(s) in a format pedenet does not read "
            f"({kinds}: {example}); convert them to PNG to use them "
            f"(read: {', '.join(sorted(IMAGE_EXTENSIONS))})",
            SkippedFileWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- decoding


def _cannot_read(path: Path, reason: object) -> DataError:
    return DataError(f"{path}: cannot read image ({reason}); replace or remove the file")


def _too_large(path: Path, detail: object) -> DataError:
    return DataError(
        f"{path}: image is too large to read safely ({detail}); "
        "resize it or remove it from the data"
    )


def _transpose(img: Image.Image, path: Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF must not make the pixels unreadable
        warnings.warn(
            f"{path}: cannot apply the EXIF orientation ({exc}); the image is used as stored",
            stacklevel=3,
        )
        return img


def _decode(path: Path) -> Image.Image | np.ndarray:
    """Decode ``path`` into a loaded, EXIF-transposed PIL image, or (TIFF fallback) an array."""
    if not path.exists():
        raise DataError(f"{path}: file does not exist; check the path")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file; pass an image file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                wide_tiff = _wide_colour(img) and path.suffix.lower() in _TIFF_EXTENSIONS
                if not wide_tiff:
                    if getattr(img, "n_frames", 1) > 1:  # a multi-page TIFF, an animated PNG
                        _warn_extra_pages(path, img.n_frames, stacklevel=4)
                        img.seek(0)
                    if _wide_colour(img):
                        warnings.warn(f"{path}: 16-bit colour image read at 8 bits per channel (the image "
                                      "library has no 16-bit colour mode: each value is v // 256, then / 255); "
                                      "save it as a 16-bit TIFF to keep the full precision", stacklevel=3)
                    img.load()
                    out = _transpose(img, path)
                    if out is img:
                        out = img.copy()
            if wide_tiff:
                out = _read_tiff(path)  # tifffile keeps the 16 bits (and warns of extra pages)
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                warnings.warn(f"{path}: very large image ({w.message}); reading it needs a lot "
                              "of memory - downscale it if that is a problem",
                              Image.DecompressionBombWarning, stacklevel=3)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out
    except Image.DecompressionBombError as exc:
        raise _too_large(path, exc) from exc
    except _PIL_ERRORS as exc:
        if path.suffix.lower() in _TIFF_EXTENSIONS:
            try:
                return _read_tiff(path)
            except DataError:
                raise
            except Exception:
                pass  # report Pillow's reason, it is usually the clearer one
        raise _cannot_read(path, exc) from exc


def _wide_colour(img: Image.Image) -> bool:
    """True for a colour image stored with more than 8 bits per channel (e.g. a 16-bit RGB
    PNG or TIFF), which Pillow decodes to 8-bit ``RGB``; checked on a TIFF's BitsPerSample
    tag (Pillow misreads planar 16-bit TIFFs as 8-bit tiles) and on the undecoded tiles."""
    if img.mode not in ("RGB", "RGBA"):
        return False
    bits = getattr(img, "tag_v2", {}).get(258)  # TIFF BitsPerSample, one value per channel
    if isinstance(bits, (tuple, list)) and any(isinstance(b, int) and b > 8 for b in bits):
        return True
    for tile in getattr(img, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def _warn_extra_pages(path: Path, n_pages: int, stacklevel: int) -> None:
    warnings.warn(f"{path}: holds {n_pages} pages (frames); only the first is used - save each "
                  "page as its own image to use the others", stacklevel=stacklevel)


def _read_tiff(path: Path) -> np.ndarray:
    """Read the first page of a TIFF with tifffile, as H x W or H x W x C (colour last)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if len(tif.pages) > 1:
            _warn_extra_pages(path, len(tif.pages), stacklevel=5)
        shape = tuple(page.shape)
        n_pixels = int(np.prod(shape[:2])) if len(shape) >= 2 else 0
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and n_pixels > 2 * limit:
            raise _too_large(path, f"{n_pixels} pixels, limit {2 * limit}")
        photometric = getattr(page, "photometric", None)
        arr = page.asarray()
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (2, 3, 4)):
        raise _cannot_read(path, f"unsupported TIFF layout {arr.shape}")
    if arr.ndim == 3 and arr.shape[-1] == 4 and photometric is not None:
        if getattr(photometric, "name", "") == "SEPARATED":
            raise _cannot_read(path, "CMYK TIFF with more than 8 bits per channel")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise _cannot_read(path, f"unsupported TIFF sample type {arr.dtype}")
    return arr


def _drop_alpha(arr: np.ndarray) -> np.ndarray:
    """H x W x C -> H x W (1-2 channels) or H x W x 3 (3-4 channels): alpha dropped."""
    if arr.ndim == 3:
        return arr[..., 0] if arr.shape[-1] <= 2 else arr[..., :3]
    return arr


def _to_unit_float(arr: np.ndarray) -> np.ndarray:
    """Integer -> divided by the max of its dtype; float -> NaN/inf handled; clipped to [0, 1]."""
    if np.issubdtype(arr.dtype, np.integer):
        out = arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)
    else:
        out = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _unit8(a: np.ndarray) -> np.ndarray:
    out = a.astype(np.float32)
    out /= 255.0
    return out


def _to_rgb_array(img: Image.Image | np.ndarray) -> np.ndarray:
    """Apply the image conversion rule to a decoded image: float32 H x W x 3 in [0, 1]."""
    if isinstance(img, np.ndarray):
        arr = _to_unit_float(_drop_alpha(img))
    else:
        mode = img.mode
        # 8-bit modes: one float32 copy, divided in place (same values as ``a / 255.0``; keeps
        # the peak memory of large images at one float32 image)
        if mode == "1":
            arr = _unit8(np.asarray(img.convert("L")))
        elif mode in ("L", "RGB"):
            arr = _unit8(np.asarray(img))
        elif mode in ("LA", "La", "RGBA", "RGBa", "RGBX"):
            arr = _unit8(_drop_alpha(np.asarray(img)))
        elif mode in ("P", "PA"):
            has_alpha = mode == "PA" or "transparency" in img.info
            converted = img.convert("RGBA" if has_alpha else "RGB")
            arr = _unit8(np.asarray(converted)[..., :3])
        elif mode.startswith("I;16") or mode in ("I", "F"):
            arr = _to_unit_float(np.asarray(img))
        else:  # CMYK, YCbCr, LAB, HSV, ...
            arr = _unit8(np.asarray(img.convert("RGB")))
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.float32)


def pil_to_array(img: Image.Image) -> np.ndarray:
    """Apply the image conversion rule to an in-memory PIL image: float32 H×W×3 in [0, 1].

    The same rule as :func:`load_image` (EXIF orientation applied, alpha dropped, 16-bit
    scaled, grayscale replicated to three channels).
    """
    img = ImageOps.exif_transpose(img) or img
    return _to_rgb_array(img)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB following the module's conversion rule.

    Args:
        path: image file (any format Pillow reads; TIFFs also through tifffile).

    Returns:
        ``np.ndarray`` of dtype ``float32``, shape ``(H, W, 3)``, values in ``[0, 1]``;
        ``H x W`` is the size after applying the EXIF orientation.

    Raises:
        DataError: the file does not exist, is a folder, cannot be decoded (corrupt,
            truncated, not an image) or exceeds Pillow's decompression-bomb limit.
    """
    path = Path(path)
    decoded = _decode(path)
    _warn_if_float_above_one(decoded, path)
    return _to_rgb_array(decoded)


def _warn_if_float_above_one(img: Image.Image | np.ndarray, path: Path) -> None:
    """Warn, naming ``path``, when a float image (mode ``"F"``, a float TIFF) has more than 1 %
    of its values above 1: the rule clips them to 1, which turns an image stored on the
    0..255 scale into a white one."""
    if isinstance(img, np.ndarray):
        if not np.issubdtype(img.dtype, np.floating):
            return
        values = img
    elif img.mode == "F":
        values = np.asarray(img)
    else:
        return
    over = values > 1.0  # NaN compares False
    above = float(over.mean())
    if above > 0.01:
        top = float(values[over].max())  # inf when there is one
        warnings.warn(f"{path}: float image with {above:.0%} of its values above 1 (up to {top:.4g}); "
                      "values are clipped to [0, 1], so those read as white - if the image holds "
                      "0..255 values, save it as 8-bit or divide it by 255", stacklevel=3)


def _mask_channel(img: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return (raw single-channel values, values on the 0..255 scale, is_fraction_float)."""
    if isinstance(img, np.ndarray):
        raw = _drop_alpha(img)
        if raw.ndim == 3:
            raw = raw.max(axis=2)
        if np.issubdtype(raw.dtype, np.integer):
            scale = 255.0 / float(np.iinfo(raw.dtype).max)
            return raw, raw.astype(np.float64) * scale, False
        raw = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return raw, raw, True
    mode = img.mode
    if mode == "1":
        raw = np.asarray(img.convert("L"))
    elif mode == "L":
        raw = np.asarray(img)
    elif mode in ("LA", "La"):
        raw = np.asarray(img)[..., 0]
    elif mode.startswith("I;16") or mode == "I":
        raw = np.asarray(img)
        scale = 255.0 / float(np.iinfo(raw.dtype).max)
        return raw, raw.astype(np.float64) * scale, False
    elif mode == "F":
        raw = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return raw, raw, True
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        raw = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))[..., :3].max(axis=2)
    elif mode in ("RGB", "RGBA", "RGBa", "RGBX"):
        raw = np.asarray(img)[..., :3].max(axis=2)
    else:  # CMYK, YCbCr, ...
        raw = np.asarray(img.convert("RGB")).max(axis=2)
    return raw, raw.astype(np.float64), False


def load_mask(
    path: str | os.PathLike, expected_shape: tuple[int, ...] | None = None,
    image: str | os.PathLike | None = None,
) -> np.ndarray:
    """Read a ground-truth mask following the module's mask rule.

    Args:
        path: mask image file.
        expected_shape: ``(H, W)`` (or ``(H, W, C)``, only the first two are compared) of the
            image the mask belongs to; ``None`` skips the check.
        image: the image file the mask belongs to (only used in error messages).

    Returns:
        ``np.ndarray`` of dtype ``bool``, shape ``(H, W)``; ``True`` marks anomalous pixels.
        An all-zero mask gives an all-False array. A mask with non-zero values none of
        which reaches the threshold (e.g. 0/60) warns (UserWarning) that it marks nothing.

    Raises:
        DataError: the mask cannot be read (see :func:`load_image`), or its size differs
            from ``expected_shape`` (the message names the mask, ``image`` if given, and
            both shapes).
    """
    path = Path(path)
    raw, scaled, is_float = _mask_channel(_decode(path))
    if raw.size == 0:
        mask = np.zeros(raw.shape, dtype=bool)
    elif is_float:
        threshold = 0.5 if raw.max() <= 1.0 else 128.0
        mask = raw >= threshold
    elif raw.max() <= 1:
        mask = raw >= 1
    else:
        mask = scaled >= 128.0
    if raw.size and not mask.any() and float(raw.max()) > 0:
        warnings.warn(f"{path}: mask has non-zero pixels (up to {float(raw.max()):g}) but none "
                      "at the anomalous threshold, so it marks no defect pixel; masks are 0 = "
                      "normal, >= 128 of 255 (or 1 in a 0/1 mask, 0.5 in a float one) = anomalous "
                      "- rescale it if its values mark the defect", stacklevel=2)
    mask = np.ascontiguousarray(mask, dtype=bool)
    if expected_shape is not None:
        want = tuple(int(s) for s in tuple(expected_shape)[:2])
        if mask.shape != want:
            of_image = f" of {image}" if image is not None else ""
            raise DataError(
                f"{path}: mask shape {mask.shape} (H, W) does not match the image shape "
                f"{want} (H, W){of_image}; the mask must have the size of its image "
                "(after EXIF orientation) - fix or replace it"
            )
    return mask


# --------------------------------------------------------------------------- checking


def check_image(path: str | os.PathLike, min_side: int = 0) -> tuple[int, int]:
    """Decode ``path`` completely (as :func:`load_image` does) and return its ``(H, W)``.

    Args:
        path: image file.
        min_side: smallest accepted side in pixels (0: any size).  pedenet passes the patch
            size when images are used at their native size (``image_size`` 0).

    Raises:
        DataError: the file cannot be read (see :func:`load_image`) or a side is shorter than
            ``min_side``; the message names the file.
    """
    path = Path(path)
    decoded = _decode(path)
    if isinstance(decoded, np.ndarray):
        h, w = int(decoded.shape[0]), int(decoded.shape[1])
    else:
        w, h = decoded.size
    if min_side and min(h, w) < min_side:
        raise DataError(
            f"{path}: image is {w}x{h} px, smaller than the {min_side} px patch size; images "
            f"used at their native size (image size 0) need both sides >= {min_side} px - "
            "enlarge or remove the image, or resize all images (--image-size)"
        )
    return h, w


def check_images(
    paths: Iterable[str | os.PathLike],
    *,
    masks: Iterable[str | os.PathLike | None] | None = None,
    min_side: int = 0,
    skip_bad: bool = False,
    progress: bool = False,
    desc: str = "checking images",
) -> list[int]:
    """Check every image (and mask) before any work starts.

    Each image is decoded completely (:func:`check_image`); each mask given in ``masks``
    (aligned with ``paths``; ``None`` = no mask) is read and compared with its image's size.

    Args:
        paths: image files.
        masks: optional mask file (or ``None``) for each image.
        min_side: see :func:`check_image`.
        skip_bad: warn (:class:`SkippedFileWarning`, one per bad file) and leave bad files
            out instead of raising.
        progress: show a tqdm progress bar.
        desc: progress bar label.

    Returns:
        the indices of the usable images, in input order.

    Raises:
        BadFilesError: some files are bad (and ``skip_bad`` is False), or all are bad; the
            message names the first bad file and counts the others, ``.bad`` lists them all.
    """
    from .progress import progress_bar

    paths = [Path(p) for p in paths]
    mask_list = list(masks) if masks is not None else [None] * len(paths)
    if len(mask_list) != len(paths):
        raise ValueError("masks must have one entry per image")
    ok: list[int] = []
    bad: list[tuple[Path, str]] = []
    for i, (path, mask) in enumerate(progress_bar(list(zip(paths, mask_list)), desc=desc, unit="img",
                                          disable=not progress)):
        try:
            shape = check_image(path, min_side)
            if mask is not None:
                load_mask(mask, expected_shape=shape, image=path)
        except DataError as exc:
            bad.append((path, str(exc)))
            continue
        ok.append(i)
    if bad and skip_bad:
        for path, msg in bad:
            warnings.warn(f"skipped: {msg}", SkippedFileWarning, stacklevel=2)
    if bad and (not skip_bad or not ok):
        first = bad[0][1]
        more = ""
        if len(bad) > 1:
            others = ", ".join(str(p) for p, _ in bad[1:4]) + (", ..." if len(bad) > 4 else "")
            more = f" [and {len(bad) - 1} more bad file(s): {others}]"
        if skip_bad:
            raise BadFilesError(f"all {len(paths)} files are unusable; first: {first}{more}", bad)
        raise BadFilesError(first + more, bad)
    return ok


# --------------------------------------------------------------------------- layout


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by file name.

    Only direct children whose extension is in :data:`IMAGE_EXTENSIONS` (case-insensitive)
    are returned; subfolders, hidden files (``.DS_Store``, ``._x.png``) and other files
    (``Thumbs.db``, ``notes.txt``) are ignored.  Files in an image format pedenet does not
    read (:data:`UNREAD_IMAGE_EXTENSIONS`: ``.gif``, ``.webp``, ...) are skipped with one
    :class:`SkippedFileWarning` that counts them.  Files are not opened.

    Returns:
        list of ``Path`` (possibly empty).

    Raises:
        DataError: ``folder`` does not exist or is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"{folder}: {what}; pass a folder that contains the images")
    files = [p for p in folder.iterdir() if p.is_file()]
    _warn_unread_images(folder, [p.name for p in files])
    return sorted((p for p in files if _is_image_file(p)), key=lambda p: p.name)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split.

    Attributes:
        path: the image file.
        label: 0 normal, 1 anomalous.
        defect: ``"good"`` or the name of the defect folder.
        mask_path: ground-truth mask file; ``None`` for good images, or for a defective image
            without a mask file.
    """

    path: Path
    label: int
    defect: str
    mask_path: Path | None = None


def is_category_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a category folder of the MVTec AD layout: it holds ``train/`` or
    ``test/`` (or both). Never raises; a missing path gives ``False``."""
    path = Path(path)
    return (path / "train").is_dir() or (path / "test").is_dir()


def categories_under(root: str | os.PathLike) -> list[str]:
    """Names of the category folders directly under a dataset root, sorted (hidden folders
    skipped); ``[]`` when ``root`` is not a folder or holds none. Never raises."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and is_category_dir(p)
    )


def resolve_category(data: str | os.PathLike, category: str | None = None) -> Path:
    """Find the category folder (the one holding ``train/`` and/or ``test/``).

    Args:
        data: a category folder, or a dataset root that holds category folders.
        category: name of the category under ``data``; ``None`` when ``data`` is itself a
            category folder.  If ``data`` is a category folder named ``category`` it is accepted.

    Returns:
        the category folder as a ``Path``.

    Raises:
        DataError: ``data`` does not exist, or no category folder is found; the message lists
            the categories found under ``data`` (if any).
    """
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: does not exist; pass a dataset root or a category folder")
    if not data.is_dir():
        raise DataError(f"{data}: is not a folder; pass a dataset root or a category folder")
    if category is None:
        if is_category_dir(data):
            return data
        found = categories_under(data)
        if found:
            raise DataError(
                f"{data}: is a dataset root, not a category folder (no train/ or test/ inside); "
                f"choose a category: {', '.join(found)}"
            )
        raise DataError(
            f"{data}: has neither train/ nor test/ and no category folders that do; "
            "pass a folder in the MVTec AD layout (<category>/train/good, <category>/test/...)"
        )
    candidate = data / category
    if candidate.is_dir() and is_category_dir(candidate):
        return candidate
    if is_category_dir(data) and data.name == category:
        return data
    found = categories_under(data)
    listing = (f"categories found: {', '.join(found)}" if found
               else "no category folders (with train/ or test/) were found there")
    raise DataError(f"{data}: has no category {category!r}; {listing}")


def train_samples(category_dir: str | os.PathLike) -> list[Sample]:
    """Training samples: the images in ``<category_dir>/train/good``, sorted by name.

    Returns:
        list of :class:`Sample` with ``label=0``, ``defect="good"``, ``mask_path=None``.

    Raises:
        DataError: ``train/good`` is missing or holds no image files.
    """
    folder = Path(category_dir) / "train" / "good"
    if not folder.is_dir():
        raise DataError(
            f"{folder}: training folder not found; put the defect-free training images there"
        )
    images = list_images(folder)
    if not images:
        raise DataError(
            f"{folder}: contains no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "put the defect-free training images there"
        )
    return [Sample(p, 0, "good", None) for p in images]


def _mask_index(folder: Path) -> dict[str, Path]:
    """stem -> mask file for the image files in ``folder`` (empty if it does not exist)."""
    if not folder.is_dir():
        return {}
    index: dict[str, Path] = {}
    for p in list_images(folder):
        index.setdefault(p.stem, p)
    return index


def test_samples(category_dir: str | os.PathLike) -> list[Sample]:
    """Test samples: the images in ``<category_dir>/test/<defect>/``.

    Defect folders are visited in name order, images in name order.  ``test/good`` gives
    ``label=0`` and no mask; any other folder gives ``label=1``, ``defect=<folder name>`` and
    the mask ``ground_truth/<defect>/<stem>_mask.<ext>`` (or ``<stem>.<ext>``), any image
    extension.  A defective image without a mask file keeps ``label=1`` with
    ``mask_path=None`` and triggers a :class:`MissingMaskWarning` naming the image.
    Mask files are not opened here.

    Returns:
        list of :class:`Sample`.

    Raises:
        DataError: ``test/`` is missing or holds no image files in its subfolders.
    """
    category_dir = Path(category_dir)
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise DataError(
            f"{test_dir}: test folder not found; put test images in test/good and "
            "test/<defect> (MVTec AD layout)"
        )
    samples: list[Sample] = []
    defect_dirs = sorted(
        (p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    for ddir in defect_dirs:
        defect = ddir.name
        images = list_images(ddir)
        if defect == "good":
            samples.extend(Sample(p, 0, "good", None) for p in images)
            continue
        gt_dir = category_dir / "ground_truth" / defect
        masks = _mask_index(gt_dir)
        for p in images:
            mask = masks.get(p.stem + "_mask") or masks.get(p.stem)
            if mask is None:
                warnings.warn(
                    f"{p}: defective image has no mask (looked for {gt_dir / (p.stem + '_mask.png')}"
                    " or another image extension); it keeps label 1 but has no pixel-level "
                    "ground truth - add the mask to use it",
                    MissingMaskWarning,
                    stacklevel=2,
                )
            samples.append(Sample(p, 1, defect, mask))
    if not samples:
        raise DataError(
            f"{test_dir}: contains no image files in its subfolders; put test images in "
            "test/good and test/<defect>"
        )
    return samples


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted by relative path; hidden entries
    skipped. A linked folder is followed when it lies outside ``folder`` (each real folder
    once); one inside it is not (its files are found under their real path, whatever the
    listing order); one that holds ``folder`` (a link up the tree) is skipped with a
    :class:`SkippedFileWarning`: following it would take in the folders around ``folder``."""
    root = os.path.realpath(folder)
    found = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a second link to one outside folder
            dirnames[:] = []
            continue
        visited.add(real)
        kept = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if d.startswith("."):
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if _within(target, root):
                    continue  # found under its real path
                if _within(root, target):
                    warnings.warn(f"skipped: {full}: a link to {target}, which holds {folder}; "
                                  "not followed", SkippedFileWarning, stacklevel=4)
                    continue
            kept.append(d)
        dirnames[:] = kept
        base = Path(dirpath)
        _warn_unread_images(base, [f for f in filenames if (base / f).is_file()])
        found.extend(base / f for f in filenames if _is_image_file(base / f))
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _within(path: str, folder: str) -> bool:
    """True when the real path ``path`` is ``folder`` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def find_images(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Collect the image files to run ``predict`` on.

    Args:
        inputs: a path or an iterable of paths.  A file must have an image extension
            (:data:`IMAGE_EXTENSIONS`); a folder contributes its image files, recursively,
            sorted by relative path (hidden files and folders skipped; linked folders
            outside it followed, see ``_walk_images``; files in a format
            pedenet does not read, such as ``.webp``, skipped with a
            :class:`SkippedFileWarning` per folder).

    Returns:
        list of ``Path`` in input order, duplicates removed (a ``UserWarning`` says how many
        and names the first left out and the path it is kept under: the same file named
        twice, also found in a folder given, or reached through a symbolic link).
        Files are not opened.

    Raises:
        DataError: a path does not exist, a file is not an image by extension, a folder holds
            no image files, or ``inputs`` is empty.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    result: list[Path] = []
    seen: dict[Path, Path] = {}  # resolved path -> the path kept for it
    repeated: list[tuple[Path, Path]] = []  # (path left out, the path kept)
    n_inputs = 0
    for item in inputs:
        n_inputs += 1
        path = Path(item)
        if not path.exists():
            raise DataError(f"{path}: does not exist; check the path")
        if path.is_dir():
            found = _walk_images(path)
            if not found:
                raise DataError(
                    f"{path}: folder contains no image files "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))}); check the path"
                )
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            found = [path]
        else:
            raise DataError(
                f"{path}: not an image file (extension {path.suffix or 'none'}; expected one of "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); pass image files or folders"
            )
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen[key] = p
                result.append(p)
            else:
                repeated.append((p, seen[key]))
    if n_inputs == 0:
        raise DataError("no input paths given; pass image files or folders")
    if repeated:
        dropped, kept = repeated[0]
        first = (f"first: {kept}" if dropped == kept else
                 f"first left out: {dropped}, the same file as {kept}, which is scored")
        warnings.warn(f"{len(repeated)} input image(s) given more than once ({first}); each image "
                      "is scored once, under the path given first", UserWarning, stacklevel=2)
    return result

# ``test_samples`` is a library function, not a pytest test: keep pytest from collecting it
# when a test module imports it by name.
test_samples.__test__ = False  # type: ignore[attr-defined]
