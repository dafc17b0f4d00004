"""Screen backbone blocks, embedding size D and mixture size K on cached features, by validation.

The untrained pipeline only (standardized backbone features → PCA to D → a K-component
Gaussian mixture fitted by EM, scikit-learn), so each variant costs one EM fit instead of a
full training run. Selection uses the validation column: the category's held-out normal
images (the same 20 % split ``pedenet fit`` holds out for thresholds, seed 0) and a copy of
each with a synthetic defect (``pedenet.validation``). The test columns are printed to check
that the ranking carries over, not to choose.

    python benchmarks/explore_blocks.py extract ../shared/data/mtd runs/explore/mtd256.npz --image-size 256
    python benchmarks/explore_blocks.py screen runs/explore/mtd256.npz --blocks 4,10,14,15 --D 128 --pixel

``extract --kinds region`` builds the validation set from large region defects instead
(``pedenet validate --kinds``). ``screen --context subtract|concat`` tries features relative to
the image's own median feature (a trial for MTD's ``uneven``: large regions whose texture is
locally normal but differs from the rest of the tile).

One JSON line per ``screen`` run (val_* = validation image AUROC, test_* = test image AUROC;
q0 = maximum of the map, q0.01 = mean of its top 1 %; pix, pro = test pixel AUROC and
AU-PRO@0.3 at the original resolution with ``--pixel``).
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
import warnings

import numpy as np
import torch

ALL_BLOCKS = (4, 7, 10, 14, 15)


def extract(data: str, out: str, image_size: int, kinds: str = "") -> None:
    """Cache the features of ``ALL_BLOCKS`` (float16, C×h×w per image) for train, validation and test.

    ``kinds``: the validation set's synthetic defect kinds, comma-separated (``pedenet validate
    --kinds``; empty: the default kinds)."""
    from pedenet.validation import DEFECT_TYPES
    from pedenet.calibration import split_calibration
    from pedenet.data import load_image, load_mask, test_samples, train_samples
    from pedenet.encoders import PretrainedEncoder
    from pedenet.scoring import to_tensor
    from pedenet.validation import synthetic_validation_set

    enc = PretrainedEncoder(8, feature_blocks=ALL_BLOCKS).eval()

    def feats(img):
        with torch.inference_mode():
            return enc.raw_features(to_tensor(img, image_size))[0].half().numpy()

    train = train_samples(data)
    train_idx, held_idx = split_calibration(len(train), 0.2, 0)
    test = test_samples(data)
    val_images, _, val_labels = synthetic_validation_set(
        [load_image(train[i].path) for i in held_idx], seed=0,
        kinds=tuple(kinds.split(",")) if kinds else DEFECT_TYPES)
    t0 = time.time()
    f_train = np.stack([feats(load_image(train[i].path)) for i in train_idx])
    f_val = np.stack([feats(a) for a in val_images])
    test_images = [load_image(s.path) for s in test]
    f_test = np.stack([feats(a) for a in test_images])
    print(f"features of {len(f_train) + len(f_val) + len(f_test)} images in {time.time() - t0:.0f} s", flush=True)
    np.savez(out, train=f_train, val=f_val, test=f_test, val_labels=val_labels,
             test_labels=np.array([s.label for s in test]), test_defects=np.array([s.defect for s in test]))
    sizes = [a.shape[:2] for a in test_images]
    masks = [load_mask(s.mask_path, sz) if s.mask_path else np.zeros(sz, bool) for s, sz in zip(test, sizes)]
    with open(out + ".masks.pkl", "wb") as fh:
        pickle.dump({"masks": masks, "sizes": sizes, "image_size": image_size}, fh)


def _channels(blocks: list[int]) -> np.ndarray:
    from pedenet.encoders import BLOCK_CHANNELS

    starts = np.cumsum([0] + [BLOCK_CHANNELS[b] for b in ALL_BLOCKS])
    return np.concatenate([np.arange(starts[ALL_BLOCKS.index(b)], starts[ALL_BLOCKS.index(b) + 1]) for b in blocks])


def _image_scores(grids: np.ndarray, q: float) -> np.ndarray:
    """Max (q = 0) or mean of the top q fraction of each σ = 0.5-cell smoothed grid (N×h×w)."""
    from scipy.ndimage import gaussian_filter

    flat = np.stack([gaussian_filter(g, 0.5, mode="nearest") for g in grids]).reshape(len(grids), -1)
    if q == 0:
        return flat.max(1)
    k = max(1, int(round(q * flat.shape[1])))
    return np.sort(flat, 1)[:, -k:].mean(1)


def energy_grids(args) -> tuple[dict, dict, tuple[float, float]]:
    """The untrained pipeline of ``args`` (npz, blocks, context, D, K, seed, em_samples):
    (settings and EM figures, {"val", "test": N×h×w energy grids}, the mean and standard
    deviation of the training embeddings' energies in the EM sample)."""
    from sklearn.mixture import GaussianMixture

    torch.set_num_threads(1)
    z = np.load(args.npz)
    idx = _channels([int(b) for b in args.blocks.split(",")])
    f_train = z["train"][:, idx]
    n, c_in, h, w = f_train.shape

    def rows(f):  # n×c×h×w features → (n·h·w)×c' rows, with the image context of --context
        t = torch.from_numpy(f).permute(0, 2, 3, 1).reshape(len(f), h * w, c_in)
        if args.context == "none":
            return t.reshape(-1, c_in)
        out = []
        for i in range(0, len(t), 64):  # per image: its channel-wise median over positions
            part = t[i:i + 64].float()
            rel = part - part.median(dim=1, keepdim=True).values
            out.append(rel if args.context == "subtract" else torch.cat([part, rel], 2))
        return torch.cat(out).reshape(-1, out[0].shape[-1])

    x = rows(f_train)
    c = x.shape[1]
    rng = np.random.default_rng(args.seed)
    sample = x[torch.from_numpy(rng.choice(len(x), min(300_000, len(x)), replace=False))].double()
    mean, std = sample.mean(0), sample.std(0).clamp_min(1e-6)
    sample = (sample - mean) / std
    evals, evecs = torch.linalg.eigh(sample.T @ sample / len(sample))
    proj = evecs[:, torch.argsort(evals, descending=True)[: args.D]]

    def embed(f):
        t = rows(f)
        return torch.cat([((t[i:i + 100_000].double() - mean) / std) @ proj
                          for i in range(0, len(t), 100_000)]).float().numpy()

    del x
    z_train = embed(f_train)
    t0 = time.time()
    em_sample = z_train[rng.choice(len(z_train), min(args.em_samples, len(z_train)), replace=False)]
    gmm = GaussianMixture(args.K, covariance_type="full", reg_covar=1e-3, max_iter=100,
                          random_state=args.seed).fit(em_sample)
    res = {"blocks": args.blocks, "context": args.context, "D": args.D, "K": args.K, "seed": args.seed, "em_samples": args.em_samples,
           "em_s": round(time.time() - t0, 1), "em_iter": int(gmm.n_iter_)}
    grids = {part: -gmm.score_samples(embed(z[part][:, idx])).reshape(-1, h, w) for part in ("val", "test")}
    train_energy = -gmm.score_samples(em_sample)
    return res, grids, (float(train_energy.mean()), float(train_energy.std()))


def grid_metrics(grids: dict, npz: str, pixel: bool) -> dict:
    """Validation and test image AUROC (q = 0 and 0.01) of energy grids {"val", "test": N×h×w}
    on the stride-8 grid of ``npz``'s processing size, and with ``pixel`` the test pixel AUROC
    and AU-PRO@0.3 at the original resolution."""
    from pedenet.metrics import image_auroc, pixel_metrics
    from pedenet.scoring import grid_to_map

    z = np.load(npz)
    res = {}
    for q in (0, 0.01):
        res[f"val_q{q}"] = round(image_auroc(_image_scores(grids["val"], q), z["val_labels"]), 4)
        res[f"test_q{q}"] = round(image_auroc(_image_scores(grids["test"], q), z["test_labels"]), 4)
    if pixel:
        with open(npz + ".masks.pkl", "rb") as fh:
            m = pickle.load(fh)
        s = m["image_size"]
        maps = [grid_to_map(g, stride=8, offset=7.5, processed_size=(s, s), original_size=tuple(sz), sigma=4.0)
                for g, sz in zip(grids["test"], m["sizes"])]
        pm = pixel_metrics(maps, m["masks"], (0.3,))
        res["pix"], res["pro"] = round(pm["pixel_auroc"], 4), round(pm["aupro_0.3"], 4)
    return res


def screen(args) -> dict:
    res, grids, _ = energy_grids(args)
    res.update(grid_metrics(grids, args.npz, args.pixel))
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("data")
    e.add_argument("out")
    e.add_argument("--image-size", type=int, default=256)
    e.add_argument("--kinds", default="", help="validation defect kinds, e.g. region or edge (default: the default kinds)")
    s = sub.add_parser("screen")
    s.add_argument("npz")
    s.add_argument("--blocks", default="4,10,14,15")
    s.add_argument("--D", type=int, default=128)
    s.add_argument("--K", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--em-samples", type=int, default=200_000, help="training embeddings the EM fit uses")
    s.add_argument("--pixel", action="store_true")
    s.add_argument("--context", choices=("none", "subtract", "concat"), default="none",
                   help="image context of each position's features: none (the pipeline's), the "
                        "features less the image's channel-wise median over positions "
                        "(subtract), or both side by side (concat); before standardizing and PCA")
    args = ap.parse_args()
    if args.cmd == "extract":
        extract(args.data, args.out, args.image_size, args.kinds)
    else:
        screen(args)


if __name__ == "__main__":
    main()
