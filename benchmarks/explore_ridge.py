"""Ridge of the mixture's covariances vs validation (synthetic defects on held-out normal images) and test, on one MTD model.

Validation = the model's held-out calibration images and synthetic-defect copies of them
(pedenet.validation); the test column is printed only to check the ranking.
Usage: python benchmarks/explore_ridge.py RUN_DIR/model.pt [DATA]  (writes MODEL.ridge.json)
"""
import json, sys, time, numpy as np, torch, warnings
warnings.filterwarnings("ignore")
import pedenet
from pedenet.gmm import GaussianMixture
from pedenet.validation import validate
from pedenet.evaluation import evaluate
m = pedenet.load(sys.argv[1])
held = m.history["calibration_images"]
base = m.network.mixture
out = {}
for ridge in [1e-3, 1e-2, 3e-2, 1e-1]:
    m.network.mixture = GaussianMixture(base.phi, base.mu, base.cov, ridge=ridge)
    t = time.time()
    v = validate(m, held, seed=0)
    r = evaluate(m, sys.argv[2] if len(sys.argv) > 2 else "../shared/data/mtd", progress=False)["overall"]
    out[ridge] = {"validation": v, "test": r}
    print(ridge, "val img %.3f pix %.3f pro %.3f" % (v["image_auroc"], v["pixel_auroc"], v["au_pro_0.3"]),
          "| test img %.3f pix %.3f pro %.3f" % (r["image_auroc"], r["pixel_auroc"], r["au_pro_0.3"]), "%.0fs" % (time.time()-t), flush=True)
json.dump({str(k): v for k, v in out.items()}, open(sys.argv[1] + ".ridge.json", "w"), indent=1)
