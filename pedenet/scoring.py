"""From images to anomaly maps: preprocessing, patch energy grid → per-pixel map, image score.

The anomaly map gives every pixel of the *original* image the patch energy interpolated
bilinearly from the grid of patch centres (separable linear interpolation, clamped at the
borders), then Gaussian smoothing with σ = ``smoothing_sigma`` pixels of the processed image
(converted to original pixels per axis). The image score (:func:`image_score`) is the mean
of the map's largest ``image_score_fraction`` of pixels, or its maximum when that is 0,
leaving out an edge band of ``image_score_border`` × each side (none by default).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

# Quantiles of normal patch scores kept as a model's colour scale (``PEDENet.normal_quantiles``).
NORMAL_QUANTILES = (0.5, 0.99, 0.999, 1.0)


def normal_quantiles(values: np.ndarray) -> dict[str, float]:
    """``{"0.5": ..., "0.99": ..., "0.999": ..., "1.0": ...}`` of a 1-D array of normal
    patch scores (energy, or distance)."""
    return {str(q): float(np.quantile(values, q)) for q in NORMAL_QUANTILES}


def processed_size(h: int, w: int, image_size: int, keep_aspect: bool = False) -> tuple[int, int]:
    """The size (H', W') in pixels that an H×W image is resized to before encoding.

    ``image_size`` 0: (h, w) unchanged. Else (S, S) with S = image_size, or, with
    ``keep_aspect``, the shorter side S and the longer side round(S · long / short) (at
    least S), so that a wide image is not squashed.
    """
    if not image_size:
        return int(h), int(w)
    if not keep_aspect:
        return int(image_size), int(image_size)
    s = int(image_size)
    if h <= w:
        return s, max(s, int(round(s * w / h)))
    return max(s, int(round(s * h / w))), s


def to_tensor(image: np.ndarray, image_size: int, keep_aspect: bool = False) -> torch.Tensor:
    """H×W×3 float32 array in [0, 1] → 1×3×H'×W' tensor, (H', W') = :func:`processed_size`
    (S×S for S = image_size; 0 keeps H×W; ``keep_aspect``: shorter side S, aspect kept).

    Resizing is bilinear with antialiasing (torch.nn.functional.interpolate), the one
    resizing rule used for training, evaluation and prediction.
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    target = processed_size(x.shape[-2], x.shape[-1], image_size, keep_aspect)
    if tuple(x.shape[-2:]) != target:
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    # contiguous NCHW: a channels-last view (what permute gives) makes CPU convolutions ~50× slower
    return x.contiguous()


def nearest_cells(n_out: int, n_processed: int, n_grid: int, stride: float, offset: float) -> np.ndarray:
    """Index (int64, length ``n_out``) of the grid cell whose centre is nearest to each output
    pixel along one axis, with the geometry of :func:`grid_to_map` (clamped at the borders)."""
    centres = (np.arange(n_out) + 0.5) * (n_processed / n_out)  # in processed pixels
    return np.clip(np.rint((centres - offset) / stride), 0, n_grid - 1).astype(np.int64)


def _interp_matrix(n_out: int, n_processed: int, n_grid: int, stride: float, offset: float) -> np.ndarray:
    """n_out×n_grid weights of linear interpolation from grid cells to output pixel centres."""
    centres = (np.arange(n_out) + 0.5) * (n_processed / n_out)  # in processed pixels
    g = np.clip((centres - offset) / stride, 0.0, n_grid - 1)
    lo = np.floor(g).astype(int)
    hi = np.minimum(lo + 1, n_grid - 1)
    frac = g - lo
    m = np.zeros((n_out, n_grid))
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The 1-D kernel of ``scipy.ndimage.gaussian_filter`` (order 0): weights of offsets
    −r..r, r = int(truncate·σ + 0.5), summing to 1. Used by the exported models."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x ** 2)
    return phi / phi.sum()


@functools.lru_cache(maxsize=32)
def map_operators(
    grid_shape: tuple[int, int],
    stride: float,
    offset: float,
    processed_size: tuple[int, int],
    original_size: tuple[int, int],
    sigma: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The two matrices of :func:`grid_to_map`: ``map = My @ grid @ Mx.T`` (float64, read-only).

    ``My`` (H×h) is the bilinear interpolation from the h grid rows to the H map rows
    followed by the Gaussian smoothing along that axis (``gaussian_filter1d`` with
    mode="nearest", truncate 4, applied to the interpolation matrix: the filter is linear,
    so filtering the matrix equals filtering every map); ``Mx`` (W×w) likewise for columns.
    Cached for the last 32 geometries (a dataset has few).
    """
    (hp, wp), (h, w) = processed_size, original_size
    ry = _interp_matrix(h, hp, grid_shape[0], stride, offset)
    rx = _interp_matrix(w, wp, grid_shape[1], stride, offset)
    if sigma > 0:
        ry = gaussian_filter1d(ry, sigma * h / hp, axis=0, mode="nearest", truncate=4.0)
        rx = gaussian_filter1d(rx, sigma * w / wp, axis=0, mode="nearest", truncate=4.0)
    ry.setflags(write=False)
    rx.setflags(write=False)
    return ry, rx


def grid_to_map(
    grid: np.ndarray,
    *,
    stride: float,
    offset: float,
    processed_size: tuple[int, int],
    original_size: tuple[int, int],
    sigma: float = 4.0,
) -> np.ndarray:
    """Patch score grid → anomaly map at the original image resolution.

    Args:
        grid: h×w patch scores (energy), cell (i, j) centred at processed pixel
            (offset + stride·i, offset + stride·j).
        stride, offset: geometry of the grid in processed pixels.
        processed_size: (H', W') of the image the encoder saw.
        original_size: (H, W) of the map to return.
        sigma: Gaussian smoothing in processed pixels (0 disables it).

    Returns:
        float32 H×W anomaly map: bilinear interpolation from the patch centres (clamped at
        the borders), then ``scipy.ndimage.gaussian_filter(…, sigma=(σ·H/H', σ·W/W'),
        mode="nearest", truncate=4)``, computed in float64 as two matrix products
        (:func:`map_operators`; equal to the filter to rounding, and ~5× faster) on one
        BLAS thread (:func:`_one_blas_thread`).
    """
    grid = np.asarray(grid, dtype=np.float64)
    my, mx = map_operators(tuple(int(n) for n in grid.shape), float(stride), float(offset),
                           tuple(int(n) for n in processed_size), tuple(int(n) for n in original_size),
                           float(sigma))
    with _BLAS_LOCK, _one_blas_thread():
        out = my @ grid @ mx.T
    return out.astype(np.float32)


def top_count(n_pixels: int, fraction: float) -> int:
    """Pixels averaged by :func:`image_score`: round(fraction · n_pixels), at least 1."""
    return max(1, int(np.rint(float(fraction) * int(n_pixels))))


def border_widths(shape: tuple[int, int], border: float) -> tuple[int, int]:
    """Rows and columns left out at each edge by :func:`image_score`: floor(border·H),
    floor(border·W) for an H×W map (each < half the side for border < 0.5)."""
    return int(float(border) * int(shape[0])), int(float(border) * int(shape[1]))


def image_score(amap: np.ndarray, fraction: float = 0.0, border: float = 0.0) -> float:
    """Image anomaly score of an anomaly map (energy units).

    Args:
        amap: float H×W anomaly map (with ``border`` 0, any shape: all its values count).
        fraction: 0 gives the maximum of the map (the MVTec AD convention); f in (0, 1) gives
            the mean of its :func:`top_count` (round(f·n), at least 1) largest values, n the
            pixels scored. A small fraction reads a defect's whole peak instead of its single
            highest pixel, which on MTD ranked images better (docs/ablations.md); the fraction
            is of the map's pixels, so the averaged area scales with the image.
        border: b in [0, 0.5): the :func:`border_widths` (floor(b·H) rows at the top and at the
            bottom, floor(b·W) columns at the left and at the right) are left out of the
            score; the map itself is unchanged. On MTD the maps of normal tiles peak at the
            tile's edge and a 5 % band ranked images better (docs/ablations.md, "Edge
            responses"); a defect that lies only in the band is then not scored. 0 (default)
            scores every pixel.

    Returns:
        float (computed in float64).

    Raises:
        ValueError: an empty map, ``border`` outside [0, 0.5), or ``border`` > 0 with a map
            that is not 2-D.
    """
    amap = np.asarray(amap)
    if amap.size == 0:
        raise ValueError("image_score: empty anomaly map")
    if not 0.0 <= float(border) < 0.5:
        raise ValueError(f"image_score: border must be in [0, 0.5), got {border}")
    if border > 0:
        if amap.ndim != 2:
            raise ValueError(f"image_score: border needs a 2-D H×W map, got shape {amap.shape}")
        bh, bw = border_widths(amap.shape, border)
        amap = amap[bh:amap.shape[0] - bh, bw:amap.shape[1] - bw]
    flat = amap.ravel()
    if fraction <= 0:
        return float(flat.max())
    k = top_count(flat.size, fraction)
    return float(np.partition(flat, flat.size - k)[flat.size - k:].astype(np.float64).mean())


_BLAS_LOCK = threading.Lock()
_blas_controller = None  # threadpoolctl's view of the loaded BLAS libraries; False if unavailable


def _one_blas_thread():
    """Context limiting the BLAS behind numpy to one thread (threadpoolctl ≥ 3.0, a dependency
    of scikit-learn; without it, a no-op).

    :func:`grid_to_map`'s products are tiny (~2·10⁶ multiply-adds at 256×256): with more
    threads, OpenBLAS wakes worker threads for the second one, and they keep spinning after
    it, taking the cores from torch's threads during the next encoder pass (on 2 cores
    ``PEDENet.anomaly_map`` took about twice as long). Multiplying with torch avoids the
    spinning as well and was as fast in most measurements, but its 2-thread products can
    wait for a free core on a busy machine (in one comparison on 2 shared cores, median
    anomaly map ~52 ms against ~35-40 ms here). The limit is process-wide while it lasts;
    ``_BLAS_LOCK`` keeps concurrent :func:`grid_to_map` calls from restoring it out of order.
    """
    global _blas_controller
    if _blas_controller is None:
        try:
            import warnings

            from threadpoolctl import ThreadpoolController

            with warnings.catch_warnings():  # e.g. about OpenMP runtimes, irrelevant to BLAS
                warnings.simplefilter("ignore")
                _blas_controller = ThreadpoolController().select(user_api="blas")
        except Exception:  # noqa: BLE001 - missing or older threadpoolctl: leave BLAS as it is
            _blas_controller = False
    return _blas_controller.limit(limits=1) if _blas_controller else contextlib.nullcontext()
