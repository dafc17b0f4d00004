"""Markdown tables from evaluated run folders (metrics.json + config.json).

Usage: python benchmarks/results_table.py RUN_DIR [RUN_DIR ...]
"""

import json
import sys
from pathlib import Path


def fmt(v):
    return "n/a" if v is None else f"{v:.3f}"


def main(runs):
    print("| run | encoder | steps | image AUROC | pixel AUROC | AU-PRO@0.3 | train time (s) | inference (s/image) |")
    print("|---|---|---|---|---|---|---|---|")
    per_defect = {}
    for run in map(Path, runs):
        m = json.loads((run / "metrics.json").read_text())
        c = json.loads((run / "config.json").read_text())
        o = m["overall"]
        t = c.get("timings", {}).get("train_seconds")
        print(f"| {run.name} | {c['config']['encoder']} | {c['config']['steps']} | {fmt(o['image_auroc'])} | "
              f"{fmt(o['pixel_auroc'])} | {fmt(o['au_pro_0.3'])} | {t:.0f} | {m['seconds_per_image']:.3f} |")
        per_defect[run.name] = m["per_defect"]
    for name, defects in per_defect.items():
        print(f"\nPer defect type, `{name}` (each defect's images against all good test images):\n")
        print("| defect | images | image AUROC | pixel AUROC | AU-PRO@0.3 |")
        print("|---|---|---|---|---|")
        for d, v in defects.items():
            print(f"| {d} | {v['n_images']} | {fmt(v['image_auroc'])} | {fmt(v['pixel_auroc'])} | {fmt(v['au_pro_0.3'])} |")


if __name__ == "__main__":
    main(sys.argv[1:])
