"""From images to anomaly maps: preprocessing, patch energy grid → per-pixel map, image score.

The anomaly map gives every pixel of the *original* image the patch energy interpolated
bilinearly from the grid of patch centres (separable linear interpolation, clamped at the
borders), then Gaussian smoothing with σ = ``smoothing_sigma`` pixels of the processed image
(converted to original pixels per axis). The image score is the maximum of the map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def to_tensor(image: np.ndarray, image_size: int) -> torch.Tensor:
    """H×W×3 float32 array in [0, 1] → 1×3×S×S tensor (S = image_size; 0 keeps H×W).

    Resizing is bilinear with antialiasing (torch.nn.functional.interpolate), the one
    resizing rule used for training, evaluation and prediction.
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    if image_size and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    # contiguous NCHW: a channels-last view (what permute gives) makes CPU convolutions ~50× slower
    return x.contiguous()


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
        float32 H×W anomaly map.
    """
    grid = np.asarray(grid, dtype=np.float64)
    (hp, wp), (h, w) = processed_size, original_size
    ry = _interp_matrix(h, hp, grid.shape[0], stride, offset)
    rx = _interp_matrix(w, wp, grid.shape[1], stride, offset)
    amap = ry @ grid @ rx.T
    if sigma > 0:
        amap = gaussian_filter(amap, sigma=(sigma * h / hp, sigma * w / wp), mode="nearest", truncate=4.0)
    return amap.astype(np.float32)
