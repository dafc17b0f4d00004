"""How much of a dataset's real defects lies at the image's border?

For each defect type of a category in the MVTec AD layout: the share of its mask pixels that
lie in the outer band of ``--band`` × each side, and how many of its masks reach into that
band. Compare the first figure with the band's share of the image area, 1 − (1 − 2b)²: a
larger share means defects sit at the edge more often than by chance, and a validation set
whose synthetic defects are drawn inside the image (the default kinds) cannot see how a setting
treats them (``pedenet validate --kinds ...,edge``; docs/ablations.md).

    python benchmarks/defects_at_edge.py ../shared/data/mtd --band 0.05

Prints one JSON line per defect type and one for the band's area share.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main() -> None:
    from pedenet.data import load_mask, test_samples
    from pedenet.scoring import border_widths

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a category folder in the MVTec AD layout")
    ap.add_argument("--band", type=float, default=0.05, help="band width, fraction of each side")
    args = ap.parse_args()
    counts = defaultdict(lambda: [0, 0, 0, 0])  # masks, masks in the band, pixels, pixels in the band
    for s in test_samples(args.data):
        if s.label == 0 or s.mask_path is None:
            continue
        m = load_mask(s.mask_path)
        bh, bw = border_widths(m.shape, args.band)
        at_edge = int(m.sum()) - int(m[bh:m.shape[0] - bh, bw:m.shape[1] - bw].sum())
        c = counts[s.defect]
        c[0] += 1
        c[1] += at_edge > 0
        c[2] += int(m.sum())
        c[3] += at_edge
    for d, (n, n_edge, px, px_edge) in sorted(counts.items()):
        print(json.dumps({"defect": d, "masks": n, "masks_in_band": n_edge,
                          "pixel_share_in_band": round(px_edge / max(px, 1), 3)}))
    print(json.dumps({"band": args.band, "area_share": round(1 - (1 - 2 * args.band) ** 2, 3)}))


if __name__ == "__main__":
    main()
