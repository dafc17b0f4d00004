"""Why are cracks on wide MTD tiles missed? Where the maps of wide tiles peak, on one fitted model.

MTD tiles are 100-630 px wide; the default resize squashes every one to 256 × 256. Crack image
AUROC is about 0.65 on tiles wider than 400 px against about 0.95 on narrower ones
(docs/ablations.md). For each test image of the ``good`` and ``crack`` folders this script
records the tile width, the image score, whether the map's maximum lies on the crack (its mask
dilated by ``--near`` pixels) and whether it lies within ``--border`` of the tile's edge. It
then rescores every image ignoring a border band, to test whether edge responses on normal wide
tiles hide the cracks. The test split is used for diagnosis only; nothing here is selected.

    python benchmarks/explore_wide_cracks.py runs/mtd_s0/model.pt ../shared/data/mtd

Prints one JSON object: per width group (``narrow`` ≤ 400 px < ``wide``), the crack image
AUROC with the model's image score and with the border excluded, the share of crack maps whose
maximum is on the crack, and the share of maps (good and crack) whose maximum is at the edge.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    from scipy.ndimage import binary_dilation

    from pedenet.data import load_mask, test_samples
    from pedenet.metrics import image_auroc
    from pedenet.scoring import image_score

    sys.path.insert(0, str(Path(__file__).parent))
    from explore_validation_kinds import explore_parser, load_model

    ap = explore_parser(__doc__, "the MTD category folder (test/good, test/crack, ground_truth/crack)")
    ap.add_argument("--wide", type=int, default=400, help="tiles wider than this are 'wide', px")
    ap.add_argument("--border", type=float, default=0.05, help="edge band, fraction of each side")
    ap.add_argument("--near", type=int, default=5, help="mask dilation for 'on the crack', px")
    args = ap.parse_args()
    model, _ = load_model(args.model)
    q = model.config.image_score_fraction
    samples = [t for t in test_samples(args.data) if t.defect in ("good", "crack")]
    maps = model.predict([t.path for t in samples], progress=True).maps
    rows = []
    for sample, amap in zip(samples, maps):
        defect = sample.defect
        h, w = amap.shape
        bh, bw = max(1, int(args.border * h)), max(1, int(args.border * w))
        y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
        row = {"defect": defect, "width": w, "score": image_score(amap, q),
               "score_inner": image_score(amap[bh:h - bh, bw:w - bw], q),
               "max_at_edge": bool(y < bh or y >= h - bh or x < bw or x >= w - bw)}
        if defect == "crack":
            mask = load_mask(sample.mask_path, amap.shape, sample.path)
            row["max_on_crack"] = bool(binary_dilation(mask, iterations=args.near)[y, x])
            row["crack_pixels"] = int(mask.sum())
        rows.append(row)
    out = {"model": args.model, "wide_above_px": args.wide, "border": args.border}
    for group, keep in (("narrow", lambda r: r["width"] <= args.wide), ("wide", lambda r: r["width"] > args.wide)):
        g = [r for r in rows if keep(r)]
        good = [r for r in g if r["defect"] == "good"]
        crack = [r for r in g if r["defect"] == "crack"]
        labels = [0] * len(good) + [1] * len(crack)
        if not good or not crack:
            out[group] = {"n_good": len(good), "n_crack": len(crack)}
            continue
        out[group] = {
            "n_good": len(good), "n_crack": len(crack),
            "crack_image_auroc": round(image_auroc([r["score"] for r in good + crack], labels), 4),
            "crack_image_auroc_border_excluded":
                round(image_auroc([r["score_inner"] for r in good + crack], labels), 4),
            "crack_max_on_crack": round(float(np.mean([r["max_on_crack"] for r in crack])), 3),
            "good_max_at_edge": round(float(np.mean([r["max_at_edge"] for r in good])), 3),
            "crack_max_at_edge": round(float(np.mean([r["max_at_edge"] for r in crack])), 3),
            "good_score_median": round(float(np.median([r["score"] for r in good])), 1),
            "crack_score_median": round(float(np.median([r["score"] for r in crack])), 1),
            "crack_pixels_median": int(np.median([r["crack_pixels"] for r in crack])),
        }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
