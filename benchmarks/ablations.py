"""Ablation runs: fit and evaluate PEDENet variants over several seeds; print a mean ± std table.

Each (row, seed) is fitted on DATA/train/good with the variant's settings and evaluated on
DATA/test; one JSON line per finished run is appended to --results, so an interrupted
sweep continues where it stopped (finished runs are skipped). The table is printed from
everything in the results file.

    python benchmarks/ablations.py --data ../shared/data/mtd --results runs/ablations/mtd.jsonl
    python benchmarks/ablations.py --results runs/ablations/mtd.jsonl --table-only

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
    "untrained (steps 0: EM mixture on initial embeddings)": {"steps": 0},
    "native size (image_size 0)": {"image_size": 0},
    "K 1": {"n_components": 1},
    "K 5": {"n_components": 5},
    "K 20": {"n_components": 20},
    "D 16": {"embedding_dim": 16},
    "D 32": {"embedding_dim": 32},
    "scratch encoder": {"encoder": "scratch"},
    "scratch encoder, patch 64": {"encoder": "scratch", "patch_size": 64},
}

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


def run_one(data: Path, row: str, seed: int) -> dict:
    """Fit and evaluate one variant; return the JSON record."""
    import pedenet
    from pedenet.evaluation import evaluate

    config = dict(ROWS[row], seed=seed)
    t0 = time.perf_counter()
    model = pedenet.PEDENet(**config).fit(Path(data) / "train" / "good", progress=False)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate(model, data, progress=False)
    eval_s = time.perf_counter() - t0
    return {"row": row, "seed": seed, "config": model.config.to_dict(), "commit": _commit(),
            "data": str(Path(data).resolve()), "overall": result["overall"],
            "per_defect": result["per_defect"], "fit_seconds": fit_s, "eval_seconds": eval_s,
            "seconds_per_image": result["seconds_per_image"],
            "history_last": {k: v[-1] for k, v in model.history.items()
                             if isinstance(v, list) and v and not isinstance(v[-1], list)}}


def table(records: list[dict]) -> str:
    """Markdown table: one line per row, mean ± std over seeds of each metric."""
    import numpy as np

    lines = ["| variant | seeds | image AUROC | pixel AUROC | AU-PRO@0.3 | fit (s) |",
             "|---|---|---|---|---|---|"]
    for row in ROWS:
        recs = [r for r in records if r["row"] == row]
        if not recs:
            continue
        cells = []
        for m in METRICS:
            v = np.array([r["overall"][m] for r in recs if r["overall"].get(m) is not None], float)
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}" if len(v) else "n/a")
        fit = np.mean([r["fit_seconds"] for r in recs])
        lines.append(f"| {row} | {len(recs)} | " + " | ".join(cells) + f" | {fit:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/mtd"))
    ap.add_argument("--results", type=Path, required=True, help="JSON-lines file (appended)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default all)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.table_only:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
        if not (args.data / "train" / "good").is_dir():
            ap.error(f"{args.data}: no train/good folder (MVTec AD layout expected)")
        args.results.parent.mkdir(parents=True, exist_ok=True)
        seeds = [int(s) for s in args.seeds.split(",")]
        for seed in seeds:  # seeds outermost: every row gets one seed before any gets three
            for row in rows:
                if any(r["row"] == row and r["seed"] == seed for r in _done(args.results)):
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {row}, seed {seed}", file=sys.stderr, flush=True)
                rec = run_one(args.data, row, seed)
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
