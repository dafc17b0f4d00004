"""Smoothing σ of the anomaly map against validation (and test, as a check), on one fitted model.

The map of every patch position is smoothed with a Gaussian of σ = ``smoothing_sigma`` pixels
of the processed image (default 4) before it is resized to the input image. σ is applied at
prediction, so one fitted model serves every value. Validation = the model's held-out normal
images and synthetic-defect copies of them, once with the default kinds (scratch, spot, patch)
and once with ``region`` (large defects that follow the image size; :mod:`pedenet.validation`).
The test split is scored only to check whether validation ranks σ as the test split does.

    python benchmarks/explore_smoothing.py runs/mtd_s0/model.pt ../shared/data/mtd --sigma 0,2,4,8

Prints one JSON line per σ: validation (both kind sets) and test image AUROC, pixel AUROC,
AU-PRO@0.3, and the seconds it took.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path


def main() -> None:
    from pedenet.evaluation import evaluate

    sys.path.insert(0, str(Path(__file__).parent))
    from explore_validation_kinds import (KEYS, add_no_test_option, explore_parser, load_model,
                                          validation_by_kind_set)

    ap = explore_parser(__doc__, "the category folder whose test split is scored")
    ap.add_argument("--sigma", default="0,2,4,8", help="comma-separated σ values, pixels")
    add_no_test_option(ap)
    args = ap.parse_args()
    model, held = load_model(args.model)
    for sigma in (float(v) for v in args.sigma.split(",")):
        model.config = dataclasses.replace(model.config, smoothing_sigma=sigma)
        t0 = time.perf_counter()
        rec = {"model": args.model, "smoothing_sigma": sigma}
        rec.update(validation_by_kind_set(model, held))
        if not args.no_test:
            r = evaluate(model, args.data, progress=False)["overall"]
            rec["test"] = {k: round(r[k], 4) for k in KEYS}
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
