"""Image score = max of the map vs mean of its top-q fraction of pixels: validation and test image AUROC, one MTD model.

Validation = the model's held-out calibration images and synthetic-defect copies of them
(pedenet.validation); the test column is printed only to check the ranking.
Usage: python benchmarks/explore_image_score.py RUN_DIR/model.pt [DATA]
"""
import sys, numpy as np, warnings
warnings.filterwarnings("ignore")
import pedenet
from pedenet.validation import synthetic_validation_set
from pedenet.data import test_samples
from pedenet.metrics import image_auroc
m = pedenet.load(sys.argv[1])
arrays, masks, yv = synthetic_validation_set(m.history["calibration_images"], seed=0)
mv = m.predict(arrays).maps
ts = test_samples(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/mtd")
mt = m.predict([s.path for s in ts]).maps
yt = np.array([s.label for s in ts])
def agg(maps, q):
    if q == 0: return np.array([x.max() for x in maps])
    return np.array([np.sort(x.ravel())[-max(1, int(q * x.size)):].mean() for x in maps])
for q in [0, 0.001, 0.01, 0.05, 0.2]:
    print("top %.3f: val %.3f test %.3f" % (q, image_auroc(agg(mv, q), yv), image_auroc(agg(mt, q), yt)), flush=True)
