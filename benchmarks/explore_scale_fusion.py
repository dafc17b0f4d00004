"""Multi-scale fusion, screened: the untrained pipeline at several processing sizes, maps fused.

Features cached at each size with ``explore_blocks.py extract`` (same data, same validation
kinds), then:

    python benchmarks/explore_blocks.py extract ../shared/data/mtd runs/explore/mtd256r.npz --image-size 256 --kinds region
    python benchmarks/explore_blocks.py extract ../shared/data/mtd runs/explore/mtd128r.npz --image-size 128 --kinds region
    python benchmarks/explore_scale_fusion.py runs/explore/mtd256r.npz runs/explore/mtd128r.npz --pixel

Each size gets its own PCA and mixture (``explore_blocks.energy_grids``, the same settings for
all). Its energy grid is standardized by the mean and standard deviation of its training
embeddings' energies (training data only), resized to the first file's grid (bilinear), and
the standardized grids are averaged. One JSON line per size alone (on its own grid) and one
for the fusion of all (on the first file's grid). Validation image AUROC chooses; the test
columns check.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _resized(grids: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """N×h×w grids resized to N×shape (bilinear, half-pixel centres)."""
    if grids.shape[1:] == tuple(shape):
        return grids
    t = torch.from_numpy(np.ascontiguousarray(grids, dtype=np.float32))[:, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[:, 0].numpy()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from explore_blocks import energy_grids, grid_metrics

    warnings.filterwarnings("ignore", category=UserWarning)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("npz", nargs="+", help="features at each size; the first sets the fused grid")
    ap.add_argument("--blocks", default="4,10,14,15")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--em-samples", type=int, default=200_000)
    ap.add_argument("--pixel", action="store_true")
    args = ap.parse_args()
    labels = [np.load(p)["val_labels"] for p in args.npz]
    if any(not np.array_equal(labels[0], other) for other in labels[1:]):
        sys.exit("the files hold different validation sets: extract them with the same --kinds")
    standardized = []
    for path in args.npz:
        one = argparse.Namespace(**{**vars(args), "npz": path, "context": "none"})
        res, grids, (mean, std) = energy_grids(one)
        res.update(grid_metrics(grids, path, args.pixel), npz=path)
        print(json.dumps(res), flush=True)
        standardized.append({k: (g - mean) / std for k, g in grids.items()})
    first = standardized[0]
    fused = {k: np.mean([_resized(s[k], first[k].shape[1:]) for s in standardized], axis=0)
             for k in first}
    res = {"fused": args.npz, "blocks": args.blocks, "D": args.D, "K": args.K, "seed": args.seed}
    res.update(grid_metrics(fused, args.npz[0], args.pixel))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
