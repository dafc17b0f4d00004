"""Ablation runs: fit and evaluate PEDENet variants over several seeds; print a mean ± std table.

Each (row, seed) is fitted on DATA/train/good with the variant's settings and evaluated on
DATA/test; one JSON line per finished run is appended to --results, so an interrupted
sweep continues where it stopped (finished runs are skipped). The table is printed from
everything in the results file.

    python benchmarks/ablations.py --data ../shared/data/mtd --results runs/ablations/mtd.jsonl
    python benchmarks/ablations.py --results runs/ablations/mtd.jsonl --table-only

Rows that use the default configuration (the full model, and the rows that only score its
trained embeddings another way: EM refit, nearest neighbour) can reuse the default's
checkpoints instead of fitting again: ``--reuse "runs/mtd_s{seed}"`` (a run folder or
model.pt per seed, fitted with the default configuration and that seed; refused otherwise).
Without it, rows with the same configuration in one invocation (the full model, EM refit and
nearest neighbour) share one fit per seed, kept in memory.

Rows (``ROWS``) change one thing against the default configuration each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROWS: dict[str, dict] = {
    "full (default)": {},
    "without LP (lambda_lp 0)": {"lambda_lp": 0.0},
    "LP weight 0.3": {"lambda_lp": 0.3},
    "LP weight 3": {"lambda_lp": 3.0},
    "LP neighbour distance 2 patches": {"lp_distance": 2.0},
    "untrained (steps 0: EM mixture on initial embeddings)": {"steps": 0},
    "native size (image_size 0)": {"image_size": 0},
    "aspect kept (short side 256)": {"keep_aspect": True},
    "K 1": {"n_components": 1},
    "K 5": {"n_components": 5},
    "K 10": {"n_components": 10},
    "K 20 (previous default)": {"n_components": 20},
    "K 80": {"n_components": 80},
    "D 16": {"embedding_dim": 16},
    "D 32": {"embedding_dim": 32},
    "D 64": {"embedding_dim": 64},
    "backbone blocks 4, 10 (stride 8 and 16 only)": {"feature_blocks": (4, 10)},
    "previous default (blocks 4, 10; D 64)": {"feature_blocks": (4, 10), "embedding_dim": 64},
    "scratch encoder": {"encoder": "scratch"},
    "scratch encoder, patch 64": {"encoder": "scratch", "patch_size": 64},
    # the trained embeddings scored another way (keys starting with "_" are not config fields)
    "DE replaced by EM refit (sklearn, same K)": {"_scorer": "em"},
    "DE replaced by nearest-neighbour distance": {"_scorer": "nn"},
}

NN_BANK = 200_000
"""Training embeddings kept (uniform random subset) as the nearest-neighbour memory bank."""

METRICS = ("image_auroc", "pixel_auroc", "au_pro_0.3")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _done(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: ignore it
                print(f"warning: {path}: skipping an unreadable line", file=sys.stderr)
    return out


def _train_embeddings(model, paths: list, n_max: int, seed: int):
    """About ``n_max`` patch embeddings (N×D float32 tensor) drawn uniformly from ``paths``."""
    import math

    import torch

    from pedenet.data import load_image
    from pedenet.scoring import to_tensor

    gen = torch.Generator().manual_seed(seed)
    per = max(1, math.ceil(n_max / len(paths)))
    rows = []
    with torch.inference_mode():
        for p in paths:
            emb = model.network.embed(to_tensor(load_image(p), model.config.image_size))[0]
            z = emb.reshape(emb.shape[0], -1).T
            rows.append(z[torch.randperm(len(z), generator=gen)[:per]].clone())
    return torch.cat(rows)


def _swap_scorer(model, scorer: str, train_paths: list, seed: int) -> None:
    """Replace the density of a fitted model: ``em`` = a Gaussian mixture refitted by EM
    (scikit-learn, K components, full covariances) on the trained embeddings; ``nn`` = distance
    to the nearest of ``NN_BANK`` training embeddings (a PatchCore/SPADE-style memory bank:
    :class:`pedenet.memory_bank.MemoryBank`, as ``scoring="distance"`` builds; the figures of
    docs/ablations.md before it existed kept the rows in float32)."""
    import torch
    from sklearn.mixture import GaussianMixture as SkGMM

    from pedenet.gmm import GaussianMixture

    net, cfg = model.network, model.config
    z = _train_embeddings(model, train_paths, NN_BANK if scorer == "nn" else 100_000, seed)
    if scorer == "em":
        gm = SkGMM(cfg.n_components, covariance_type="full", reg_covar=1e-6, max_iter=200,
                   random_state=seed).fit(z.double().numpy())
        net.mixture = GaussianMixture(torch.from_numpy(gm.weights_), torch.from_numpy(gm.means_),
                                      torch.from_numpy(gm.covariances_), ridge=cfg.ridge)
        return
    from pedenet.memory_bank import MemoryBank

    net.memory_bank = MemoryBank(z.float())  # what fit's scoring="distance" uses (float16 rows)


def _reused_model(template: str, config: dict):
    """The checkpoint ``template`` names for ``config["seed"]``; exits with a message naming
    the file and the differing fields unless it was fitted with exactly ``config``."""
    import pedenet

    path = Path(template.format(seed=config["seed"]))
    model = pedenet.load(path / "model.pt" if path.is_dir() else path)
    want = pedenet.PEDENet(**config).config.to_dict()
    got = model.config.to_dict()
    diff = sorted(k for k in want if want[k] != got.get(k))
    if diff:
        raise SystemExit(f"{path}: fitted with another configuration than this row's "
                         f"({', '.join(f'{k} {got.get(k)!r} != {want[k]!r}' for k in diff)})")
    return model, str(path)


def run_one(data: Path, row: str, seed: int, steps: int | None = None,
            reuse: str | None = None, fitted: dict | None = None) -> dict:
    """Fit (or, with ``reuse`` and a row of the default configuration, load) and evaluate one
    variant; return the JSON record. ``fitted`` (configuration JSON -> (model, row)) keeps this
    invocation's fits: a row whose configuration was already fitted starts from a copy of it."""
    import copy
    import warnings

    import pedenet
    from pedenet.data import find_images
    from pedenet.evaluation import evaluate

    config = {k: v for k, v in ROWS[row].items() if not k.startswith("_")}
    config["seed"] = seed
    if steps is not None:
        config.setdefault("steps", steps)
    scorer = ROWS[row].get("_scorer")
    t0 = time.perf_counter()
    images = find_images([Path(data) / "train" / "good"])
    reused = None
    key = json.dumps(config, sort_keys=True)
    if reuse and not set(config) - {"seed"}:
        model, reused = _reused_model(reuse, config)
    elif fitted is not None and key in fitted:
        model, reused = copy.deepcopy(fitted[key][0]), f"fit of row {fitted[key][1]!r}, this invocation"
    else:
        with warnings.catch_warnings():  # decisions are not used here
            warnings.filterwarnings("ignore", message=".*cannot guarantee a false-alarm rate")
            model = pedenet.PEDENet(**config).fit(images, progress=False)
        if fitted is not None:
            fitted[key] = (copy.deepcopy(model), row)
    held = set(model.history.get("calibration_images", []))  # absolute paths
    # compared resolved: with a relative --data the held-out images would otherwise join the
    # EM-refit and nearest-neighbour training embeddings (as they did before 2026-12-02,
    # docs/ablations.md)
    resolved = {str(Path(p).resolve()) for p in held}
    train_paths = [p for p in images if str(Path(p).resolve()) not in resolved]
    if scorer:
        _swap_scorer(model, scorer, train_paths, seed)
    fit_s = time.perf_counter() - t0
    validation = None
    if held:  # selection score: held-out normal images and synthetic-defect copies of them
        from pedenet.validation import validate

        validation = validate(model, sorted(held), seed=0)
    t0 = time.perf_counter()
    result = evaluate(model, data, progress=False)
    eval_s = time.perf_counter() - t0
    return {"row": row, "seed": seed, "config": model.config.to_dict(), "commit": _commit(),
            "data": str(Path(data).resolve()), "overall": result["overall"],
            "per_defect": result["per_defect"], "validation": validation,
            "fit_seconds": fit_s, "eval_seconds": eval_s, "reused_checkpoint": reused,
            "seconds_per_image": result["seconds_per_image"],
            "history_last": {k: v[-1] for k, v in model.history.items()
                             if isinstance(v, list) and v and not isinstance(v[-1], list)}}


def table(records: list[dict]) -> str:
    """Markdown table: one line per row, mean ± std over seeds of each metric."""
    import numpy as np

    lines = ["| variant | seeds | image AUROC | pixel AUROC | AU-PRO@0.3 | validation image / pixel AUROC | fit (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        recs = [r for r in records if r["row"] == row]
        if not recs:
            continue
        cells = []
        for m in METRICS:
            v = np.array([r["overall"][m] for r in recs if r["overall"].get(m) is not None], float)
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}" if len(v) else "n/a")
        vals = [r["validation"] for r in recs if r.get("validation")]
        cells.append(f"{np.mean([v['image_auroc'] for v in vals]):.3f} / "
                     f"{np.mean([v['pixel_auroc'] for v in vals]):.3f}" if vals else "n/a")
        fit = np.mean([r["fit_seconds"] for r in recs])
        lines.append(f"| {row} | {len(recs)} | " + " | ".join(cells) + f" | {fit:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/mtd"))
    ap.add_argument("--results", type=Path, required=True, help="JSON-lines file (appended)")
    ap.add_argument("--rows", default=";".join(ROWS), help="semicolon-separated row names (default all)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None,
                    help="override the training steps of every row (quick checks; rows that set "
                         "steps keep theirs)")
    ap.add_argument("--reuse", default=None, metavar="TEMPLATE",
                    help="rows of the default configuration (full, EM refit, nearest neighbour) "
                         "load this checkpoint per seed instead of fitting, e.g. "
                         "'runs/mtd_s{seed}'; fit_seconds is then the loading and rescoring time")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.table_only:
        rows = [r.strip() for r in args.rows.split(";") if r.strip()]
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
        if not (args.data / "train" / "good").is_dir():
            ap.error(f"{args.data}: no train/good folder (MVTec AD layout expected)")
        args.results.parent.mkdir(parents=True, exist_ok=True)
        seeds = [int(s) for s in args.seeds.split(",")]
        fitted: dict = {}
        for seed in seeds:  # seeds outermost: every row gets one seed before any gets three
            fitted.clear()  # fits are shared within a seed only
            for row in rows:
                if any(r["row"] == row and r["seed"] == seed for r in _done(args.results)):
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {row}, seed {seed}", file=sys.stderr, flush=True)
                rec = run_one(args.data, row, seed, steps=args.steps, reuse=args.reuse,
                              fitted=fitted)
                with open(args.results, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                summary = ", ".join(f"{m} {rec['overall'][m]:.3f}" for m in METRICS)
                print(f"    {summary} (fit {rec['fit_seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(table(_done(args.results)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
