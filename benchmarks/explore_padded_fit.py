"""Fit with the image reflect-padded before the pretrained backbone, then validate and test.

``explore_padding.py`` pads at prediction only, against a mixture fitted on unpadded images;
this script pads everywhere (the training features the mixture and the LP head are fitted on,
and every prediction): the backbone sees the processed image padded by ``p`` px on each side
(mirror reflection; ``p`` a multiple of 32, the deepest block's stride) and each block's
output is cropped back to the cells of the unpadded image, so the grid, the map and
everything after are as without padding. Patch embeddings at the edge then see mirrored
image content instead of the backbone's zero padding. It changes
``PretrainedEncoder.backbone_features`` for this process only (a trial, not a setting).

    python benchmarks/explore_padded_fit.py ../shared/data/mtd --pad 32 --seed 0 --out runs/mtd_pad32_s0

Writes OUT/model.pt (loadable only with the same --pad through this script: the padding is not
part of the model) and prints one JSON line: validation (default kinds and region) and test
image AUROC, pixel AUROC, AU-PRO@0.3, test image AUROC per defect, test image AUROC with an
edge band of 0.05 left out of the image score, the share of normal test maps whose maximum
lies in the 5 % edge band, and the fit's seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch.nn.functional as F


def pad_backbone(pad: int) -> None:
    """Make every PretrainedEncoder reflect-pad its input by ``pad`` px and crop each block."""
    from pedenet.encoders import BLOCK_STRIDES, PretrainedEncoder

    if pad % 32:
        raise SystemExit(f"--pad must be a multiple of 32 px (the deepest block's stride), got {pad}")
    plain = PretrainedEncoder.backbone_features

    def backbone_features(self, x):
        if not pad:
            return plain(self, x)
        outs = plain(self, F.pad(x, (pad, pad, pad, pad), mode="reflect"))
        cropped = []
        for f, b in zip(outs, self.feature_blocks):
            c = pad // BLOCK_STRIDES[b]
            cropped.append(f[..., c:f.shape[-2] - c, c:f.shape[-1] - c])
        return cropped

    PretrainedEncoder.backbone_features = backbone_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="category folder (train/good, test/...)")
    ap.add_argument("--pad", type=int, default=32, help="padding in processed pixels (multiple of 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the fit default)")
    ap.add_argument("--out", required=True, help="folder for model.pt")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    pad_backbone(args.pad)

    import pedenet
    from pedenet.evaluation import evaluate
    from pedenet.scoring import image_score
    from pedenet.metrics import image_auroc

    sys.path.insert(0, str(Path(__file__).parent))
    from explore_padding import edge_peak_share
    from explore_validation_kinds import KEYS, validation_by_kind_set

    out = Path(args.out)
    t0 = time.perf_counter()
    if (out / "model.pt").is_file():
        model = pedenet.load(out / "model.pt")
    else:
        steps = {} if args.steps is None else {"steps": args.steps}
        model = pedenet.PEDENet(seed=args.seed, **steps).fit(Path(args.data) / "train" / "good", progress=False)
        out.mkdir(parents=True, exist_ok=True)
        model.save(out / "model.pt")
    rec = {"pad": args.pad, "seed": args.seed, "fit_seconds": round(time.perf_counter() - t0, 1)}
    held = model.history["calibration_images"]
    rec.update(validation_by_kind_set(model, held))
    res, maps = evaluate(model, args.data, progress=False, return_maps=True)
    rec["test"] = {k: round(res["overall"][k], 4) for k in KEYS}
    rec["test_per_defect"] = {d: round(r["image_auroc"], 4) for d, r in res["per_defect"].items()}
    labels = [e["label"] for e in res["images"]]
    q = model.config.image_score_fraction
    rec["test_image_auroc_band_0.05"] = round(image_auroc([image_score(m, q, 0.05) for m in maps], labels), 4)
    rec["normal_max_in_edge_band"] = edge_peak_share(res["images"], maps)
    rec["held_out"] = len(held)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
