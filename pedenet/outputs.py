"""The files ``pedenet predict`` writes into its ``--out`` folder, and those of an earlier run.

For each image, named ``<name>`` (its file stem, made unique by its folder's name or a
``_<k>`` suffix; the ``name`` column of scores.csv)::

    <name>_overlay.png   heatmap overlay
    <name>_map.npy       raw float32 anomaly map (``--format tiff``: <name>_map.tiff)
    <name>_mask.png      defect mask (models with thresholds only)
    <name>_clusters.png  most likely mixture component per region (``--clusters`` only)

and once per run ``scores.csv`` (the manifest: one row per image), ``predict.json`` (the
settings the outputs were made with: model file and its SHA-256, rates, map format, clusters;
what ``predict --resume`` checks), ``warnings.txt`` (the run's warnings, one per line; only
when there were any) and, with ``--report``, ``report.html``.
``predict --overwrite`` replaces an earlier run's files and removes those the new run does
not write: only files named in the earlier scores.csv, never other files.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

SCORES_COLUMNS = ("path", "score", "p_value", "anomalous", "name")
"""Header of scores.csv."""

PER_IMAGE_SUFFIXES = ("_overlay.png", "_map.npy", "_map.tiff", "_mask.png", "_clusters.png")
"""Every per-image file ``<name><suffix>`` predict can write."""

SETTINGS_FILE = "predict.json"
"""The settings of a prediction, beside scores.csv (what ``predict --resume`` compares)."""

WARNINGS_FILE = "warnings.txt"
"""The warnings of a prediction, one per line, beside scores.csv (only when there are any)."""

REPORT_TITLE = b"<title>pedenet"
"""Start of the title of a report pedenet wrote (pedenet.report)."""


def earlier_prediction_files(out_dir: Path) -> list[Path]:
    """Existing files of an earlier predict run in ``out_dir``, read from its scores.csv.

    Returns the existing ``<name><suffix>`` files (every suffix of :data:`PER_IMAGE_SUFFIXES`)
    of each name in scores.csv, scores.csv itself, warnings.txt beside it, and report.html if
    pedenet wrote it. Empty
    when there is no scores.csv, or it is not pedenet's (other header, unreadable): then
    nothing in the folder is known to be pedenet's. Names holding a path separator or
    starting with "." are ignored.
    """
    scores = out_dir / "scores.csv"
    rows = _scores_rows(scores)
    if rows is None:
        return []
    names = [row[-1] for row in rows if len(row) == len(SCORES_COLUMNS)]
    files = [out_dir / f"{n}{s}" for n in dict.fromkeys(names)
             if n and Path(n).name == n and not n.startswith(".") for s in PER_IMAGE_SUFFIXES]
    files += [scores, out_dir / WARNINGS_FILE, out_dir / SETTINGS_FILE]
    report = out_dir / "report.html"
    try:
        with open(report, "rb") as fh:
            if REPORT_TITLE in fh.read(512):
                files.append(report)
    except OSError:
        pass
    return [f for f in files if f.is_file()]


def read_scores(out_dir: Path) -> list[dict]:
    """The rows of ``out_dir``/scores.csv as dicts: path (str), score (float), p_value (float
    or None), anomalous (bool or None), name (str). Empty when there is no pedenet scores.csv
    (missing, other header, unreadable). Rows that do not parse (another number of columns, a
    value that is no number: a cut or edited line) are skipped with one warning that names
    the file and their line numbers."""
    rows, bad = [], []
    for line, row in enumerate(_scores_rows(out_dir / "scores.csv") or [], start=2):
        try:
            path, score, p_value, anomalous, name = row
            rows.append({"path": path, "score": float(score),
                         "p_value": float(p_value) if p_value else None,
                         "anomalous": bool(int(anomalous)) if anomalous else None, "name": name})
        except ValueError:
            bad.append(line)
    if bad:
        warnings.warn(f"{out_dir / 'scores.csv'}: line(s) {', '.join(map(str, bad[:10]))}"
                      f"{' ...' if len(bad) > 10 else ''} do not parse and are skipped (with --resume, "
                      "their images are predicted again)",
                      stacklevel=2)
    return rows


def _scores_rows(scores: Path) -> list[list[str]] | None:
    """The rows (lists of strings) after the header of a pedenet scores.csv; None when the
    file is missing, unreadable or not pedenet's (another header)."""
    try:
        with open(scores, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            if tuple(next(reader, ())) != SCORES_COLUMNS:
                return None
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def earlier_prediction_outputs(images: list[Path]) -> dict[Path, list[Path]]:
    """Those of ``images`` that an earlier ``pedenet predict`` wrote, by folder.

    A file counts when the pedenet scores.csv in its folder lists it
    (:func:`earlier_prediction_files`): overlays, masks, cluster maps of an earlier --out
    folder that lies inside the folders given to predict. Returns ``{folder: [image, ...]}``
    in input order, only folders with such files.
    """
    found: dict[Path, list[Path]] = {}
    written: dict[Path, set[Path]] = {}
    for p in images:
        folder = p.parent
        if folder not in written:
            written[folder] = {f.resolve() for f in earlier_prediction_files(folder)}
        if p.resolve() in written[folder]:
            found.setdefault(folder, []).append(p)
    return found
