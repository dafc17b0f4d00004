"""Image score with the map's edge band left out, against validation (and test, as a check).

On MTD the maps of normal tiles peak at the tile's edge (docs/ablations.md, "Cracks on wide
tiles"). This script asks whether an image score that ignores a band of ``b`` × each side at
the edge ranks images better. Maps are computed once per image set; the image score is the
model's (mean of the top ``image_score_fraction`` of the remaining pixels). Validation = the
model's held-out normal images and synthetic-defect copies (default kinds, and ``region``;
``--sets`` names others, such as ``edge``);
the test split is scored only to check whether validation ranks ``b`` as the test split does.

    python benchmarks/explore_border.py runs/mtd_s0/model.pt ../shared/data/mtd --border 0,0.02,0.05,0.1

Prints one JSON line per band: validation image AUROC (both kind sets), test image AUROC
overall and per defect.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _inner(amap, b: float):
    h, w = amap.shape
    bh, bw = int(b * h), int(b * w)
    return amap[bh:h - bh, bw:w - bw]


def main() -> None:
    from pedenet.metrics import image_auroc
    from pedenet.scoring import image_score
    from pedenet.data import test_samples
    from pedenet.validation import synthetic_validation_set

    sys.path.insert(0, str(Path(__file__).parent))
    from explore_validation_kinds import KIND_SETS, add_sets_option, explore_parser, load_model

    ap = explore_parser(__doc__, "the category folder whose test split is scored")
    ap.add_argument("--border", default="0,0.02,0.05,0.1", help="comma-separated band fractions")
    add_sets_option(ap)
    args = ap.parse_args()
    model, held = load_model(args.model)
    q = model.config.image_score_fraction
    sets = {}
    for name in args.sets:
        arrays, _, labels = synthetic_validation_set(held, 0, KIND_SETS[name])
        sets[f"validation_{name}"] = (model.predict(arrays).maps, list(labels), None)
    test = test_samples(args.data)
    sets["test"] = (model.predict([t.path for t in test], progress=True).maps,
                    [t.label for t in test], [t.defect for t in test])
    for b in (float(v) for v in args.border.split(",")):
        rec = {"model": args.model, "border": b}
        for name, (maps, labels, defects) in sets.items():
            scores = [image_score(_inner(m, b), q) for m in maps]
            rec[name] = round(image_auroc(scores, labels), 4)
            if defects is not None:
                for d in sorted(set(defects) - {"good"}):
                    keep = [i for i, x in enumerate(defects) if x in ("good", d)]
                    rec[f"test_{d}"] = round(image_auroc([scores[i] for i in keep], [labels[i] for i in keep]), 4)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
