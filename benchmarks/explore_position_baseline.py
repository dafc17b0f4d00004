"""Score relative to each patch position's normal level: does it stop the edge responses?

Normal MTD tiles' maps peak at the tile's edge (docs/ablations.md, "Edge responses"): edge
patches score high on every image, normal or not. Here each cell of the energy grid is
compared with the same cell on normal images: a baseline mean μ (and spread σ) per grid cell,
from the energy grids of ``--n-baseline`` training images (the model's own training part:
train/good less the held-out images), then

    sub:  E' = E − μ            z:  E' = (E − μ) / σ      (σ floored at its median / 4)

before the usual resize, smoothing and image score. The grid must have one shape for every
image (the default: every image resized to ``image_size``). Validation = the held-out normal
images and synthetic-defect copies of them (default kinds and ``region``; ``--sets`` names
others, such as ``edge``); the test split is scored only as a check.

    python benchmarks/explore_position_baseline.py runs/mtd_s0/model.pt ../shared/data/mtd --modes none,sub,z

Prints one JSON line per mode: validation (each kind set) and test image AUROC, pixel AUROC,
AU-PRO@0.3, the share of normal test maps peaking in the 5 % edge band, and seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def baseline_grids(model, paths) -> np.ndarray:
    """N×h×w float64 energy grids of ``paths`` (processed as prediction does)."""
    from pedenet.estimator import as_rgb_array
    from pedenet.scoring import to_tensor

    net = model._require_fitted()
    grids = []
    with torch.inference_mode():
        for p in paths:
            x = to_tensor(as_rgb_array(p), model.config.image_size, model.config.keep_aspect)
            grids.append(net.patch_energy(x.to(model.device))[0].cpu().numpy())
    shapes = {g.shape for g in grids}
    if len(shapes) != 1:
        raise SystemExit(f"grids differ in shape ({sorted(shapes)}): needs a fixed image_size")
    return np.stack(grids)


def main() -> None:
    from pedenet.data import list_images

    sys.path.insert(0, str(Path(__file__).parent))
    from explore_padding import score_test_split
    from explore_validation_kinds import (add_no_test_option, add_sets_option, explore_parser, load_model,
                                          validation_by_kind_set)

    ap = explore_parser(__doc__, "the category folder (train/good for the baseline, test scored)")
    ap.add_argument("--modes", default="none,sub,z", help="comma-separated: none, sub, z")
    ap.add_argument("--n-baseline", type=int, default=200, help="training images for μ, σ")
    add_no_test_option(ap)
    add_sets_option(ap)
    args = ap.parse_args()
    model, held = load_model(args.model)
    net = model._require_fitted()
    held_set = {str(Path(p).resolve()) for p in held}
    train = [p for p in list_images(Path(args.data) / "train" / "good")
             if str(Path(p).resolve()) not in held_set]
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(train), size=min(args.n_baseline, len(train)), replace=False))
    t0 = time.perf_counter()
    grids = baseline_grids(model, [train[i] for i in pick])
    mu, sd = grids.mean(0), grids.std(0)
    sd = np.maximum(sd, np.median(sd) / 4)
    print(json.dumps({"baseline_images": len(pick), "grid": list(mu.shape),
                      "mu_top_bottom_rows_minus_centre": round(float(mu[[0, -1]].mean() - mu[2:-2, 2:-2].mean()), 3),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    raw = net.patch_energy
    mu_t, sd_t = torch.from_numpy(mu), torch.from_numpy(sd)

    for mode in args.modes.split(","):
        def patched(x, max_tile=None, _mode=mode):
            e = raw(x, max_tile)
            if _mode == "none":
                return e
            if tuple(e.shape[-2:]) != tuple(mu_t.shape):
                raise SystemExit(f"grid {tuple(e.shape[-2:])} differs from the baseline's {tuple(mu_t.shape)}")
            e = e - mu_t.to(e)
            return e / sd_t.to(e) if _mode == "z" else e

        net.patch_energy = patched
        t0 = time.perf_counter()
        rec = {"model": args.model, "mode": mode}
        rec.update(validation_by_kind_set(model, held, args.sets))
        if not args.no_test:
            rec.update(score_test_split(model, args.data))
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
