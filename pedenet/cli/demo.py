"""``pedenet demo``: fit and evaluate on the built-in texture dataset (no download)."""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from .. import __version__
from ..config import MAX_SEED
from ..environment import package_versions
from .common import (DEFAULTS, NonEmptyPath, UserError, _check_out_folder, _device_option, _info,
                     _one_line, _set_verbose, _user_errors, _verbose_option, _write_json,
                     _write_text)
from .evaluate import _evaluate_run
from .fit import _fit_run

DEMO_STEPS = 300
"""Default ``--steps`` of ``pedenet demo``: sized so that the three built-in categories (fit,
evaluation and overlays) finish in about 25 minutes on 2 CPU cores (docs/results.md)."""
DEMO_CATEGORIES = "brick,grass,gravel"
DEMO_TARGET_FPR = 0.1
"""Target false-alarm rate of ``pedenet demo``: its 60 normal images per category leave 12 for
calibration, which can guarantee at best 1/13 ≈ 0.077 (the library default 0.01 needs 99)."""


def _summary_rows(results: dict) -> list[tuple[str, dict]]:
    rows = [(cat, r["overall"]) for cat, r in results.items()]
    if len(rows) > 1:
        keys = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "au_pro_0.3")
        mean = {}
        for k in keys:
            vals = [m[k] for _, m in rows if m.get(k) is not None]
            mean[k] = float(np.mean(vals)) if len(vals) == len(rows) else None
        mean["n_images"] = sum(m["n_images"] for _, m in rows)
        rows.append(("mean", mean))
    return rows


def _decision_lines(results: dict, target_fpr: float) -> list[str]:
    """The realized false-alarm and miss rates of each category's decisions (test split)."""
    from ..evaluation import format_metric

    lines = []
    for cat, res in results.items():
        real = res.get("realized")
        if real:
            fa, miss = format_metric(real.get("false_alarm_rate")), format_metric(real.get("miss_rate"))
            lines.append(f"{cat}: false alarms {fa} of {real['n_normal']} normal images, "
                         f"misses {miss} of {real['n_anomalous']} anomalous images")
    if lines:
        lines.insert(0, f"decisions at target false-alarm rate {target_fpr:g} (test split):")
    return lines


@click.command()
@click.option("--out", "out_dir", type=NonEmptyPath(path_type=Path, file_okay=False),
              default=Path("runs/demo"), show_default=True,
              help="Output folder: one run folder per category, summary.json, summary.md.")
@click.option("--steps", type=click.IntRange(min=1), default=DEMO_STEPS, show_default=True,
              help="Optimizer steps per category.")
@click.option("--categories", default=DEMO_CATEGORIES, show_default=True,
              help="Comma-separated built-in categories (brick, grass, gravel).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=DEFAULTS.seed, show_default=True, help="Random seed.")
@click.option("--target-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=DEMO_TARGET_FPR, show_default=True,
              help="Target false-alarm rate of the decisions (12 held-out normal images per "
              "category guarantee at best 1/13).")
@_device_option
@click.option("--quiet", is_flag=True, default=False, show_default=True,
              help="No progress bars or messages (the summary is still printed).")
@_verbose_option
@_user_errors
def demo(out_dir, steps, categories, seed, target_fpr, device, quiet, verbose):
    """Fit and evaluate on the built-in texture dataset (no download).

    The dataset (synthetic scratches, spots and patches on scikit-image's brick, grass and
    gravel photographs) is written to the pedenet cache (~/.cache/pedenet, or $PEDENET_CACHE),
    or to OUT/data if the cache cannot be written. Each category's run folder gets
    metrics.json, overlays/ and report.html.
    """
    _set_verbose(verbose, quiet)
    from ..builtin import TEXTURES, builtin_dataset_root, make_builtin_dataset
    from ..evaluation import format_table, markdown_table, table_lines

    cats = [c.strip() for c in categories.split(",") if c.strip()]
    unknown = [c for c in cats if c not in TEXTURES]
    if not cats or unknown:
        raise UserError(f"--categories: unknown {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(TEXTURES)}", exit_code=2)
    out_dir = Path(out_dir)
    _check_out_folder(out_dir)
    t_start = time.perf_counter()
    try:
        root = make_builtin_dataset(builtin_dataset_root(), categories=cats, seed=0)
    except OSError as exc:
        _info(quiet, f"cannot use the cache ({_one_line(exc)}); writing the dataset to {out_dir / 'data'}")
        root = make_builtin_dataset(out_dir / "data", categories=cats, seed=0)
    _info(quiet, f"built-in dataset: {root}")
    results, timings = {}, {}
    for cat in cats:
        run_dir = out_dir / cat
        rec = _fit_run(root, cat, run_dir, device=device, overwrite=True, quiet=quiet,
                       config=dict(steps=steps, seed=seed, target_fpr=target_fpr))
        t0 = time.perf_counter()
        res = _evaluate_run(run_dir, None, None, overlays=True, device=device, quiet=quiet,
                            report=True)
        timings[cat] = {"train_seconds": rec["timings"]["train_seconds"],
                        "evaluate_seconds": time.perf_counter() - t0}
        results[cat] = res
        if not quiet:
            click.echo(f"\n{cat}:\n{format_table(res)}", err=True)
    rows = _summary_rows(results)
    total = time.perf_counter() - t_start
    summary = {
        "pedenet_version": __version__,
        "packages": package_versions(),
        "dataset": str(Path(root).resolve()),
        "steps": steps,
        "seed": seed,
        "total_seconds": total,
        "categories": {cat: {"run_dir": str((out_dir / cat).resolve()),
                             "overall": results[cat]["overall"],
                             "per_defect": results[cat]["per_defect"],
                             "thresholds": results[cat].get("thresholds"),
                             "realized": results[cat].get("realized"),
                             **timings[cat]} for cat in cats},
        "mean": dict(rows[-1][1]) if len(rows) > len(cats) else results[cats[0]]["overall"],
    }
    _write_json(out_dir / "summary.json", summary)
    decisions = _decision_lines(results, target_fpr)
    md = (f"# pedenet demo (built-in textures, {steps} steps, seed {seed})\n\n"
          + markdown_table(rows)
          + ("\n" + "\n".join(f"- {line}" if i else line for i, line in enumerate(decisions)) + "\n"
             if decisions else "")
          + f"\nTotal time: {total:.0f} s. Per-category runs (model, metrics, overlays): "
          + ", ".join(f"`{cat}/`" for cat in cats) + ".\n")
    _write_text(out_dir / "summary.md", md)
    click.echo("\n".join(table_lines(rows, first="category")))
    if decisions:
        click.echo("\n".join(decisions))
    click.echo(f"total {total:.0f} s; summary: {out_dir / 'summary.md'}, {out_dir / 'summary.json'}")

