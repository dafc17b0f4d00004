"""Time and memory of the pixel metrics in ``pedenet.metrics`` on ~50 million pixels.

Each metric runs in its own subprocess so that the reported peak RSS
(``resource.getrusage(...).ru_maxrss``) belongs to that metric alone. The data (random maps
and masks with rectangular anomalous regions, seeded) are generated inside each subprocess;
"data MB" is the peak RSS after generating them (interpreter, libraries and the arrays),
"peak MB" the high-water mark after the metric; their difference is the metric's own
working memory.

Usage::

    python benchmarks/metrics_benchmark.py                   # 763 maps of 256×256 (50.0 M px)
    python benchmarks/metrics_benchmark.py --layout tall     # 200 maps of 5000×50 (50 M px)
    python benchmarks/metrics_benchmark.py --sklearn         # also time sklearn's roc_auc_score
    python benchmarks/metrics_benchmark.py --dtype float64   # float64 maps (argsort path)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

LAYOUTS = {"square": (763, 256, 256), "tall": (200, 5000, 50)}
METRICS = ["pixel_auroc", "pixel_f1_max", "au_pro", "pixel_metrics"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_data(n: int, h: int, w: int, seed: int = 0, dtype: str = "float32"):
    rng = np.random.default_rng(seed)
    maps = rng.random((n, h, w), dtype=np.float32)
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        if i % 4 == 0:  # a quarter of the images are normal
            continue
        for _ in range(int(rng.integers(1, 4))):
            rh = int(rng.integers(1, max(2, h // 5)))
            rw = int(rng.integers(1, max(2, w // 5)))
            y0 = int(rng.integers(0, h - rh + 1))
            x0 = int(rng.integers(0, w - rw + 1))
            masks[i, y0 : y0 + rh, x0 : x0 + rw] = 1
    np.add(maps, np.float32(0.6), out=maps, where=masks != 0)  # anomalous pixels score higher
    if dtype != "float32":
        maps = maps.astype(dtype)
        for m in maps:  # per image, to keep temporaries small
            m += rng.random(m.shape) * 1e-9  # make float64 scores genuinely float64
    return maps, masks


def run_one(metric: str, layout: str, dtype: str) -> dict:
    from pedenet import metrics as M

    maps, masks = make_data(*LAYOUTS[layout], dtype=dtype)
    data_mb = _rss_mb()
    t0 = time.perf_counter()
    if metric == "pixel_auroc":
        value = M.pixel_auroc(maps, masks)
    elif metric == "pixel_f1_max":
        value = M.pixel_f1_max(maps, masks)
    elif metric == "au_pro":
        value = M.au_pro(maps, masks, fpr_limit=0.3)
    elif metric == "pixel_metrics":
        value = M.pixel_metrics(maps, masks, fpr_limits=(0.3, 0.1))
    elif metric == "sklearn_roc_auc_score":
        from sklearn.metrics import roc_auc_score

        value = float(roc_auc_score(masks.ravel() != 0, maps.ravel()))
    else:
        raise ValueError(metric)
    seconds = time.perf_counter() - t0
    return {
        "metric": metric,
        "value": value,
        "seconds": seconds,
        "data_mb": data_mb,
        "peak_mb": _rss_mb(),
        "pixels": int(maps.size),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="square")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--sklearn", action="store_true", help="also time sklearn roc_auc_score")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one metric, print JSON
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one, args.layout, args.dtype)))
        return

    n, h, w = LAYOUTS[args.layout]
    print(
        f"layout {args.layout}: {n} maps of {h}x{w} = {n * h * w / 1e6:.1f} M pixels, "
        f"{args.dtype}"
    )
    print(f"{'metric':<24}{'seconds':>9}{'data MB':>10}{'peak MB':>10}{'extra MB':>10}  value")
    metrics = METRICS + (["sklearn_roc_auc_score"] if args.sklearn else [])
    for metric in metrics:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", metric, "--layout", args.layout,
             "--dtype", args.dtype],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        value = r["value"]
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:.6f}" for k, v in value.items())
        else:
            value = f"{value:.6f}"
        print(
            f"{r['metric']:<24}{r['seconds']:>9.2f}{r['data_mb']:>10.0f}{r['peak_mb']:>10.0f}"
            f"{r['peak_mb'] - r['data_mb']:>10.0f}"
            f"  {value}"
        )


if __name__ == "__main__":
    main()
