"""Heatmap overlays of anomaly maps, and atomic PNG writing.

* :func:`heatmap_overlay` blends a colour-mapped anomaly map over the image and draws the
  ground-truth contour.
* :func:`color_range` gives one colour scale per model (from the anomaly maps of its held-out
  normal images, or the energies of its training images), so that overlays of different
  images are comparable.
* :func:`save_png` writes a PNG atomically.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

__all__ = ["CONTOUR_COLOR", "HEADROOM", "MIN_HELD_OUT_FOR_SCALE", "LEGEND_BACKGROUND", "LEGEND_MAX_LINES", "cluster_overlay", "cluster_palette", "color_range", "color_source", "heatmap_overlay", "legend_components", "save_png"]

CONTOUR_COLOR = (255, 255, 255)
"""RGB colour of the ground-truth contour: pure white, which a jet or inferno overlay blended
with ``alpha > 0`` never produces, so the contour is always distinguishable."""


HEADROOM = 0.25
"""``vmax`` of :func:`color_range` lies this fraction of the normal spread (max − median of the
normal scores) above the largest normal score."""


MIN_HELD_OUT_FOR_SCALE = 10
"""Held-out normal images needed before :func:`color_range` takes its scale from them."""


def color_range(model, amap: np.ndarray | None = None, headroom: float = HEADROOM,
                source: str = "auto") -> tuple[float | None, float | None]:
    """Colour scale ``(vmin, vmax)`` (energy, or distance) for the overlays of ``model``.

    The scale runs from a typical normal pixel (coldest colour) to ``vmax = top + headroom ·
    (top − typical)``, so only pixels above (nearly) everything the normal images reached get
    the hottest colours. (Measured with the training scale: with ``headroom = 2`` the defects
    of the built-in demo stayed in the blue third of the scale; 0.25 showed them orange to
    red.) Where these come from (``source``):

    * ``"held_out"``: the pixel scores of the held-out normal images' anomaly maps
      (``model.calibration.pixel_scores``, a random sample of at most 200 000 of them):
      typical = its median, top = its maximum, which is the largest held-out pixel score
      (the sample always keeps it; in checkpoints saved before 2026-12-01 it is the sample's
      maximum, and a held-out pixel outside the sample can lie slightly above). These
      maps were made exactly as the overlays are, on images the model did not train on, so a
      new normal image looks like the held-out ones: cold.
    * ``"training"``: the patch energy quantiles over the training images
      (``model.normal_quantiles``): typical = ``"0.5"``, top = ``"1.0"``. A model that fits
      its training images better than new ones (small training sets) gives a scale that new
      normal images already exceed, so their overlays look warm.
    * ``"auto"`` (default): :func:`color_source`: ``"held_out"`` when the model holds out at
      least :data:`MIN_HELD_OUT_FOR_SCALE` normal images, or fewer whose median pixel the
      training scale would already paint the hottest colour; else ``"training"``.

    Without the chosen statistics (a model without held-out images, an older checkpoint) it
    falls back to the training quantiles, then to ``amap``'s own min/max, then to
    ``(None, None)`` (meaning: per image, see :func:`heatmap_overlay`).

    Raises:
        ValueError: ``source`` is not one of the three above.
    """
    if source not in ("auto", "held_out", "training"):
        raise ValueError(f"source must be 'auto', 'held_out' or 'training'; got {source!r}")
    if source == "auto":
        source = color_source(model, headroom)
    lo = hi = float("nan")
    pixels = _held_out_pixels(model)
    if source == "held_out" and pixels is not None:
        lo, hi = float(np.median(pixels)), float(np.max(pixels))
    else:
        lo, hi = _training_typical_top(model)
    if np.isfinite(lo) and np.isfinite(hi):
        return lo, _scale_top(lo, hi, headroom)
    if amap is not None:
        return float(np.min(amap)), float(np.max(amap))
    return None, None


def color_source(model, headroom: float = HEADROOM) -> str:
    """Which statistics :func:`color_range` takes by default: ``"held_out"`` or ``"training"``.

    ``"held_out"`` when the model has held-out pixel scores and either holds out at least
    :data:`MIN_HELD_OUT_FOR_SCALE` normal images, or holds out fewer but the training scale
    is plainly wrong for new images: the held-out pixels' median lies above the training
    scale's hottest colour (the model memorized its training images, so every new normal
    image would be painted solid red). Otherwise (few held-out images, none, or an older
    checkpoint without their pixel scores) ``"training"``.
    """
    pixels = _held_out_pixels(model)
    if pixels is None:
        return "training"
    if len(model.calibration.scores) >= MIN_HELD_OUT_FOR_SCALE:
        return "held_out"
    lo, hi = _training_typical_top(model)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "held_out"
    return "held_out" if float(np.median(pixels)) > _scale_top(lo, hi, headroom) else "training"


def _held_out_pixels(model) -> np.ndarray | None:
    pixels = getattr(getattr(model, "calibration", None), "pixel_scores", None)
    return pixels if pixels is not None and len(pixels) else None


def _training_typical_top(model) -> tuple[float, float]:
    q = getattr(model, "normal_quantiles", None) or {}
    try:
        return float(q["0.5"]), float(q["1.0"])
    except (KeyError, TypeError, ValueError):
        return float("nan"), float("nan")


def _scale_top(lo: float, hi: float, headroom: float) -> float:
    vmax = hi + headroom * (hi - lo)
    return vmax if vmax > lo else lo + max(1e-6, abs(lo) * 1e-6)


def _as_rgb_float(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be H×W or H×W×C (C in 1, 3, 4), got shape {img.shape}")
    img = img[:, :, :3]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    return np.clip(img.astype(np.float32), 0.0, 1.0)


def heatmap_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    vmin: float | None,
    vmax: float | None,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    contour_color: tuple[int, int, int] = CONTOUR_COLOR,
    contour_mode: str = "outer",
) -> np.ndarray:
    """Colour-mapped anomaly map blended over the image, with the ground-truth contour.

    Args:
        image: float32 H×W×3 in [0, 1] (H×W grayscale and uint8 are accepted too).
        amap: H×W anomaly map (energy, or distance), clipped to [vmin, vmax] then scaled to [0, 1]
            and coloured with matplotlib colormap ``cmap``. ``vmin``/``vmax`` ``None`` use the
            map's own min/max.
        mask: optional H×W ground truth (nonzero = anomalous); its boundary
            (``skimage.segmentation.find_boundaries(mask, mode=contour_mode)``; "outer" = the
            normal pixels touching the defect, so the heat inside thin defects stays visible)
            is painted opaque in ``contour_color``.
        alpha: weight of the heatmap, 0..1 (0 = image only, 1 = heatmap only).

    Returns:
        uint8 H×W×3 RGB array.
    """
    from matplotlib import colormaps
    from skimage.segmentation import find_boundaries

    img = _as_rgb_float(image)
    amap = np.asarray(amap, dtype=np.float64)
    if amap.shape != img.shape[:2]:
        raise ValueError(f"anomaly map shape {amap.shape} differs from the image shape {img.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    finite = np.isfinite(amap)
    if vmin is not None:
        lo = float(vmin)
    else:
        lo = float(np.min(amap[finite])) if finite.any() else 0.0
    if vmax is not None:
        hi = float(vmax)
    else:
        hi = float(np.max(amap[finite])) if finite.any() else lo + 1.0
    if not hi > lo:
        hi = lo + 1e-12 if lo == 0 else lo + abs(lo) * 1e-6
    norm = np.clip((np.nan_to_num(amap, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo), 0.0, 1.0)
    heat = colormaps[cmap](norm)[..., :3].astype(np.float32)
    out = (1.0 - alpha) * img + alpha * heat
    out = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    if mask is not None:
        mask = np.asarray(mask) != 0
        if mask.shape != out.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} differs from the image shape {out.shape[:2]}")
        if mask.any():
            out[find_boundaries(mask, mode=contour_mode)] = np.asarray(contour_color, dtype=np.uint8)
    return out


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 H×W (gray) or H×W×3 / H×W×4 array as PNG, atomically.

    The image is written to a temporary file in the destination folder (created if missing)
    and renamed onto ``path`` with ``os.replace``, so ``path`` is never half-written; it gets
    the usual permissions of a new file (0o666 minus the umask), like the other outputs.

    Raises:
        ValueError: ``array`` is not uint8 or not of one of those shapes.
    """
    from .checkpoint import atomic_write_bytes

    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png expects a uint8 array, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"save_png expects H×W, H×W×3 or H×W×4, got shape {arr.shape}")
    image = Image.fromarray(np.ascontiguousarray(arr))
    atomic_write_bytes(path, lambda fh: image.save(fh, format="PNG"))


LEGEND_BACKGROUND = (40, 40, 40)
"""RGB of the legend strip under a cluster overlay."""

LEGEND_MAX_LINES = 3
"""Lines the legend of a cluster overlay may take before it counts the rest as ``+n``."""


def cluster_palette(n_components: int) -> np.ndarray:
    """float32 K×3 RGB colours in [0, 1] of the mixture components in cluster overlays.

    The first 9 are matplotlib's "tab10" without its grey (invisible over grayscale images);
    each further colour is the one of a 16×16×16 RGB grid (CIELAB lightness 30-92, so it shows
    over dark and light images; chroma above 30, so it is no grey) farthest, in CIELAB
    distance, from all colours before it (greedy farthest-point selection). Neighbouring
    indices thus get contrasting colours and the K colours stay apart: the smallest CIELAB
    distance between two of them is about 27 at K = 40 and 23 at K = 60 (matplotlib's tab20,
    tab20b and tab20c in turn gave 7 at K = 40). Deterministic; the first K of a larger
    palette are the K of a smaller one.
    """
    return _palette(int(n_components)).copy()


@functools.lru_cache(maxsize=8)
def _palette(n_components: int) -> np.ndarray:
    from matplotlib import colormaps
    from skimage.color import rgb2lab

    base = np.array([c[:3] for i, c in enumerate(colormaps["tab10"].colors) if i != 7],
                    dtype=np.float64)  # tab10 without its grey (index 7)
    if n_components <= len(base):
        return base[:n_components].astype(np.float32)
    grid = np.linspace(0.0, 1.0, 16)
    candidates = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    lab = rgb2lab(candidates[None])[0]
    usable = (lab[:, 0] > 30) & (lab[:, 0] < 92) & (np.hypot(lab[:, 1], lab[:, 2]) > 30)
    candidates, lab = candidates[usable], lab[usable]
    base_lab = rgb2lab(base[None])[0]
    nearest = np.linalg.norm(lab[:, None] - base_lab[None], axis=-1).min(axis=1)
    chosen = list(base)
    while len(chosen) < n_components:
        j = int(np.argmax(nearest))
        chosen.append(candidates[j])
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[j], axis=-1))
    return np.array(chosen, dtype=np.float32)


def legend_components(labels: np.ndarray) -> list[int]:
    """The components present in ``labels`` (int H×W), largest area first (ties: lower
    index first): the order of the cluster overlay's legend."""
    counts = np.bincount(np.asarray(labels).ravel())
    present = np.flatnonzero(counts)
    return [int(k) for k in sorted(present, key=lambda k: (-counts[k], k))]


def cluster_overlay(image: np.ndarray, labels: np.ndarray, n_components: int,
                    alpha: float = 0.45) -> np.ndarray:
    """Mixture component of each region (:meth:`pedenet.PEDENet.cluster_map`) as colours over
    the image (blended with weight ``alpha``; each region's 1-pixel inner border in its
    unblended colour, the colour of its legend swatch), with a legend strip along the bottom:
    for each component present, largest area first (:func:`legend_components`), a swatch of
    its colour and its number (the component index k of ``cluster_map``), on as many lines as
    needed up to :data:`LEGEND_MAX_LINES`, then ``+n`` for the rest.

    Args:
        image: H×W×3 float32 in [0, 1] (or uint8 / H×W grayscale).
        labels: int H×W component indices in [0, n_components).
        n_components: K; colours from :func:`cluster_palette`.
        alpha: weight of the colours, 0..1.

    Returns:
        uint8 (H + legend)×W×3 RGB array; each line of the legend is max(12, H // 16) pixels
        high.
        Raises ValueError for a shape mismatch or labels outside [0, n_components).
    """
    from PIL import Image, ImageDraw, ImageFont
    from skimage.segmentation import find_boundaries

    img = _as_rgb_float(image)
    labels = np.asarray(labels)
    if labels.shape != img.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} differs from the image shape {img.shape[:2]}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_components):
        raise ValueError(f"labels must lie in [0, {n_components}); got [{labels.min()}, {labels.max()}]")
    palette = cluster_palette(n_components)
    colours = palette[labels]
    out = (1 - alpha) * img + alpha * colours
    edges = find_boundaries(labels, mode="inner")  # each region outlined in its pure colour,
    out[edges] = colours[edges]  # as in the legend, whatever the blend gives over the image
    out = np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)
    h, w = labels.shape
    line_h = max(12, h // 16)
    font = ImageFont.load_default(size=line_h - 3)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = legend_components(labels) if labels.size else []
    swatch = line_h - 4
    placed, line, x = [], 0, 2  # (line, x, k) of each entry shown

    def room(i: int, line: int, x: int) -> int:  # width left for entry i (the last line keeps
        last = line == LEGEND_MAX_LINES - 1      # room for "+n" after it unless it is the last)
        more = last and i < len(entries) - 1
        return w - x - (int(measure.textlength(f"+{len(entries) - i}", font=font)) + 2 if more else 0)

    for i, k in enumerate(entries):
        width = swatch + 2 + int(measure.textlength(str(k), font=font)) + 6
        if width > room(i, line, x):
            if line == LEGEND_MAX_LINES - 1 or x == 2:  # no further line, or it fits no line
                break
            line, x = line + 1, 2
            if width > room(i, line, x):
                break
        placed.append((line, x, k))
        x += width
    lines = (placed[-1][0] + 1) if placed else 1
    strip = Image.new("RGB", (w, line_h * lines), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for line, x, k in placed:
        top = line * line_h
        colour = tuple(int(v) for v in np.rint(palette[k] * 255))
        draw.rectangle([x, top + 2, x + swatch - 1, top + 2 + swatch - 1], fill=colour)
        draw.text((x + swatch + 2, top + line_h // 2), str(k), fill=(255, 255, 255), font=font,
                  anchor="lm")
    if len(placed) < len(entries):  # the rest, counted, after the last entry shown
        line, x = (placed[-1][0], placed[-1][1] + swatch + 2 + int(measure.textlength(
            str(placed[-1][2]), font=font)) + 6) if placed else (0, 2)
        draw.text((x, line * line_h + line_h // 2), f"+{len(entries) - len(placed)}",
                  fill=(255, 255, 255), font=font, anchor="lm")
    return np.concatenate([out, np.asarray(strip, dtype=np.uint8)])
