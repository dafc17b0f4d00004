"""Reflect-padding the image before encoding, against validation (and test, as a check).

On MTD the maps of normal tiles peak at the tile's edge (docs/ablations.md, "Edge
responses"). One explanation is the encoder's zero padding: a patch at the edge sees a dark
frame no interior patch sees, and the mixture, fitted mostly on interior patches, gives it a
high energy. This script pads the processed image by ``p`` pixels on every side (mirror
reflection, ``torch.nn.functional.pad(mode="reflect")``), encodes it, and keeps the energy
grid's cells of the original image (``p`` a multiple of the grid stride, so the cells are the
unpadded ones). Nothing is refitted: the mixture stays the one fitted on unpadded training
images, so this measures padding at prediction only. Unlike an edge band left out of the image
score, a defect at the edge is still scored.

    python benchmarks/explore_padding.py runs/mtd_s0/model.pt ../shared/data/mtd --pad 0,32,64

Prints one JSON line per ``p``: validation (both kind sets) and test image AUROC, pixel AUROC,
AU-PRO@0.3, test image AUROC per defect, the share of normal test maps whose maximum lies in
the outer 5 % band, and the seconds it took.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch.nn.functional as F


def padded_energy(net, pad: int):
    """``net.patch_energy`` with the input reflect-padded by ``pad`` px, cropped back."""
    plain = net.patch_energy
    stride = int(net.stride)
    if pad % stride:
        raise SystemExit(f"--pad values must be multiples of the grid stride ({stride} px), got {pad}")
    c = pad // stride

    def energy(x, max_tile=None):
        if not pad:
            return plain(x, max_tile)
        return plain(F.pad(x, (pad, pad, pad, pad), mode="reflect"), max_tile)[:, c:-c, c:-c]

    return plain, energy


def edge_peak_share(images: list[dict], maps: list, band: float = 0.05) -> float:
    """Share of the normal images (``evaluate``'s per-image entries) whose map peaks in the
    outer ``band`` × each side."""
    from pedenet.scoring import border_widths

    at_edge = []
    for e, m in zip(images, maps):
        if e["label"] == 0:
            bh, bw = border_widths(m.shape, band)
            r, c = np.unravel_index(int(np.argmax(m)), m.shape)
            at_edge.append(not (bh <= r < m.shape[0] - bh and bw <= c < m.shape[1] - bw))
    return round(float(np.mean(at_edge)), 3)


def score_test_split(model, data) -> dict:
    """``model`` on ``data``'s test split: ``test`` (overall metrics), ``test_per_defect`` (image
    AUROC) and ``normal_max_in_edge_band`` (:func:`edge_peak_share`), rounded."""
    from pedenet.evaluation import evaluate

    from explore_validation_kinds import KEYS

    res, maps = evaluate(model, data, progress=False, return_maps=True)
    return {"test": {k: round(res["overall"][k], 4) for k in KEYS},
            "test_per_defect": {d: round(r["image_auroc"], 4) for d, r in res["per_defect"].items()},
            "normal_max_in_edge_band": edge_peak_share(res["images"], maps)}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from explore_validation_kinds import add_no_test_option, explore_parser, load_model, validation_by_kind_set

    ap = explore_parser(__doc__, "the category folder whose test split is scored")
    ap.add_argument("--pad", default="0,32,64", help="comma-separated paddings, processed pixels")
    add_no_test_option(ap)
    args = ap.parse_args()
    model, held = load_model(args.model)
    net = model.network
    for pad in (int(v) for v in args.pad.split(",")):
        plain, net.patch_energy = padded_energy(net, pad)
        t0 = time.perf_counter()
        rec = {"model": args.model, "pad": pad}
        rec.update(validation_by_kind_set(model, held))
        if not args.no_test:
            rec.update(score_test_split(model, args.data))
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        del net.patch_energy  # back to the class's method
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
