"""Image score = maximum of the map against the mean of its top fraction q: image AUROC on validation and test.

One fitted model; the maps are computed once and every q scores the same maps
(:func:`pedenet.scoring.image_score`). Validation = the model's held-out normal images and a
synthetic-defect copy of each (``pedenet validate``); the test column is printed to check the
ranking, not to choose.

    python benchmarks/explore_image_score.py runs/mtd_b15_s0/model.pt ../shared/data/mtd

Prints one JSON line: ``val_<q>`` and ``test_<q>`` image AUROC for each q.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

QS = (0.0, 0.001, 0.003, 0.01, 0.03)


def main() -> None:
    from pedenet.data import test_samples
    from pedenet.metrics import image_auroc
    from pedenet.scoring import image_score
    from pedenet.validation import synthetic_validation_set

    sys.path.insert(0, str(Path(__file__).parent))
    from explore_validation_kinds import explore_parser, load_model

    ap = explore_parser(__doc__, "category folder with test/ (MVTec AD layout)", full_doc=True)
    ap.add_argument("--q", default=",".join(map(str, QS)), help="comma-separated fractions")
    args = ap.parse_args()
    model, held = load_model(args.model)
    arrays, _, y_val = synthetic_validation_set(held, seed=0)
    val_maps = model.predict(arrays).maps
    test = test_samples(args.data)
    test_maps = model.predict([s.path for s in test]).maps
    y_test = np.array([s.label for s in test])
    out = {"model": args.model}
    for q in (float(v) for v in args.q.split(",")):
        out[f"val_{q:g}"] = round(image_auroc([image_score(m, q) for m in val_maps], y_val), 4)
        out[f"test_{q:g}"] = round(image_auroc([image_score(m, q) for m in test_maps], y_test), 4)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
