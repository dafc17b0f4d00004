"""``pedenet predict``: anomaly maps, overlays, scores and decisions for new images."""

from __future__ import annotations

import csv
import heapq
import io
import json
import os
import time
import warnings
from pathlib import Path

import click
import numpy as np

from ..checkpoint import atomic_write_bytes
from ..data import IMAGE_EXTENSIONS, DataError, find_images, load_image
from .common import (NonEmptyPath, UserError, _check_out_folder, _checked, _debug, _device_option,
                     _info, _interrupt_exit_code, _interrupt_name, _load_model, _model_path,
                     _progress, _rate_options, _set_verbose, _short_warnings, _thresholds_line,
                     _unique_names, _user_errors, _verbose_option, _write_text)

REPORT_GALLERY = 60
"""Images shown in the gallery of an HTML report."""

SAVE_EVERY_S = 5.0
"""Seconds between rewrites of scores.csv while predicting, so that a run killed without a
chance to save (SIGKILL, power loss) loses at most this much work to ``--resume``."""


@click.command()
@click.argument("run_dir", type=NonEmptyPath(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=NonEmptyPath(path_type=Path))
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(path_type=Path, file_okay=False),
              help="Folder for <stem>_overlay.png, <stem>_map.npy|tiff, <stem>_mask.png "
              "(<stem>_clusters.png with --clusters), scores.csv and predict.json (the settings "
              "--resume checks).")
@click.option("--format", "fmt", type=click.Choice(["npy", "tiff"]), default="npy",
              show_default=True, help="File format of the raw float32 anomaly maps.")
@_rate_options
@click.option("--report", is_flag=True, default=False, show_default=True,
              help="Write OUT/report.html: scores, histogram with the threshold, gallery "
              "(self-contained, opens offline).")
@click.option("--clusters", is_flag=True, default=False, show_default=True,
              help="Also write <stem>_clusters.png: the most likely mixture component of each "
              "region (which normal pattern it resembles); the legend at the bottom lists the "
              "components present by index (0 to K-1), largest area first (+n: more not shown).")
@_device_option
@click.option("--overwrite", is_flag=True, default=False, show_default=True,
              help="Write into an --out folder that is not empty: the files of an earlier "
              "prediction there (those its scores.csv lists) are replaced or removed; other "
              "files are kept.")
@click.option("--resume", is_flag=True, default=False, show_default=True,
              help="Continue an interrupted prediction in --out: images its scores.csv already "
              "lists (with their files) are kept, the rest are predicted. Refused when the "
              "model or options differ from that run's (OUT/predict.json).")
@click.option("--skip-bad-files", is_flag=True, default=False, show_default=True,
              help="Leave unreadable or too small images out (with a warning) instead of stopping.")
@click.option("--quiet", is_flag=True, default=False, show_default=True,
              help="No progress bars, messages or warnings (warnings are still written to "
              "OUT/warnings.txt).")
@_verbose_option
@_user_errors
def predict(run_dir, inputs, out_dir, fmt, fpr, pixel_fpr, report, clusters, device, overwrite,
            resume, skip_bad_files, quiet, verbose):
    """Anomaly maps, overlays, scores and decisions for image files or folders INPUT...

    Folders are searched recursively (the --out folder excluded). Every image is checked
    first. Images sharing a file stem are named by their folder(s) (crack_000,
    brick_test_good_000), or get _1, _2, ... suffixes (input order) where folder names do not
    tell them apart. scores.csv
    lists path, score (the image score: mean of the map's top --image-score-fraction of
    pixels, the fit's --image-score-border band left out, in the map's units: energy, or distance with fit --scoring distance), p_value,
    anomalous (the decision at the target false-alarm rate)
    and the output name; <stem>_mask.png (0/255) marks the
    pixels above the pixel threshold in images decided anomalous. A model fitted with
    --calibration-fraction 0 gives scores only. Warnings (skipped files, very large images,
    ...) are also written to OUT/warnings.txt, one per line, when there are any.
    Ctrl-C, SIGTERM or SIGHUP keeps the images finished so far (scores.csv lists them, and
    is also rewritten every few seconds; exit code 130, 143 or 129); the same command with
    --resume predicts the rest.
    """
    from ..data import SkippedFileWarning
    from ..outputs import (SCORES_COLUMNS, SETTINGS_FILE, WARNINGS_FILE,
                           earlier_prediction_files, earlier_prediction_outputs)
    from ..visualization import (cluster_overlay, color_range, color_source,
                                 heatmap_overlay, save_png)

    _set_verbose(verbose, quiet)
    warned: list[str] = []  # OUT/warnings.txt; printed unless quiet
    click.get_current_context().with_resource(_short_warnings(warned, quiet))  # until predict ends
    out_dir = Path(out_dir)
    _check_out_folder(out_dir)
    if run_dir.is_dir() and out_dir.resolve() == run_dir.resolve():
        raise UserError(f"{out_dir}: is RUN_DIR; its report.html and overlays/ are the "
                        "evaluation's - choose another --out (a subfolder such as "
                        f"{run_dir / 'predictions'} works)", exit_code=2)
    if resume and overwrite:
        raise UserError("--resume keeps the finished images and --overwrite replaces them; pass "
                        "one", exit_code=2)
    if resume and not (out_dir / SETTINGS_FILE).is_file():
        raise UserError(f"{out_dir}: no interrupted prediction to resume (no {SETTINGS_FILE}); "
                        "run without --resume"
                        + (" and with --overwrite (the folder is not empty) or another --out"
                           if out_dir.is_dir() and any(out_dir.iterdir()) else ""), exit_code=2)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (overwrite or resume):
        if (out_dir / SETTINGS_FILE).is_file():
            raise UserError(f"{out_dir}: holds an earlier prediction ({SETTINGS_FILE}); pass "
                            "--resume to continue it if it was interrupted, --overwrite to "
                            "replace it, or choose another --out", exit_code=2)
        raise UserError(f"{out_dir}: output folder is not empty; pass --overwrite to write into it "
                        "or choose another --out", exit_code=2)
    earlier = earlier_prediction_files(out_dir) if out_dir.is_dir() else []
    if resume:  # a report of the earlier, finished run stays unless --report writes a new one
        earlier = [f for f in earlier if f.name != "report.html"]
    for item in map(Path, inputs):  # an INPUT that does not exist or is no image file: a usage error
        if not item.is_dir() and (not item.exists() or item.suffix.lower() not in IMAGE_EXTENSIONS):
            try:
                find_images([item])  # for its message
            except DataError as exc:
                raise UserError(str(exc), exit_code=2) from None
    out_resolved = out_dir.resolve()
    images = [p for p in find_images(list(inputs))
              if out_resolved not in p.resolve().parents]  # never read our own outputs
    if not images:
        raise UserError(f"{out_dir}: all inputs lie inside the --out folder; choose another --out",
                        exit_code=2)
    named = {Path(i).resolve() for i in inputs if Path(i).is_file()}  # named files are kept
    drop: set[Path] = set()
    for folder, files in earlier_prediction_outputs(images).items():
        files = [p for p in files if p.resolve() not in named]
        if files:  # an earlier --out folder inside the input folders: its overlays are no inputs
            warnings.warn(f"skipped: {len(files)} file(s) in {folder}: written by an earlier "
                          "pedenet predict (its scores.csv lists them); name a file to score it",
                          SkippedFileWarning, stacklevel=2)
            drop.update(files)
    images = [p for p in images if p not in drop]
    if not images:
        raise UserError("all images found are outputs of earlier pedenet predictions (see the "
                        "warnings); pass the folders of the images to score")
    model = _load_model(run_dir, device)
    images = _checked(images, min_side=model.min_image_side, skip_bad_files=skip_bad_files,
                      quiet=quiet, desc="checking images")
    names = _unique_names(images)
    cal = model.calibration
    th = None
    if cal is not None:
        cal.image_threshold(fpr)  # warns (and OUT/warnings.txt records) when out of reach
        th = model.thresholds(fpr, pixel_fpr)
    settings = _settings(run_dir, fmt, clusters, th)

    def decide(row: dict) -> dict:  # p-value and decision from the row's score
        if th is not None:
            row["p_value"] = float(cal.p_values(row["score"]))
            row["anomalous"] = bool(row["score"] > th["image_threshold"])
        return row

    kept: dict[int, dict] = {}  # --resume: index -> the earlier run's row, for images kept
    if resume:  # decisions follow the kept scores, as in a fresh prediction
        kept = {i: decide(row) for i, row in _resumable(
            out_dir, settings, images, names, th is not None,
            model.config.image_score_fraction, model.config.image_score_border).items()}
    _info(quiet, _thresholds_line(th, model))
    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = color_range(model)
    held_out = color_source(model) == "held_out"
    unit = "energy" if model.config.scoring == "mixture" else "distance"
    _debug(f"model {_model_path(run_dir)}; {len(images)} images; device {device}; "
           f"overlay colour range {vmin} to {vmax} ({unit}; from the "
           f"{'held-out normal images' if held_out else 'training images'})")
    t_start = time.perf_counter()
    done: dict[int, dict] = {}  # index -> scores.csv row of the images finished
    kept_maps: dict[int, np.ndarray] = {}
    top: list = []
    loaded: dict[int, np.ndarray] = {}  # decoded once: for the model and for the overlay
    written: set[Path] = set()  # every file this run writes (the earlier run's others go)
    pending: list[Path] = []  # the files of the image being written (removed if interrupted)

    def output(filename: str) -> Path:
        written.add(out_dir / filename)
        pending.append(out_dir / filename)
        return out_dir / filename

    todo = [i for i in range(len(images)) if i not in kept]

    def decoded():  # runs in iter_predict's reader thread, at most 2 × batch ahead
        for j, i in enumerate(todo):
            loaded[j] = load_image(images[i])
            yield loaded[j]

    def gallery(i: int, score: float, amap) -> None:  # keep the maps the report can show
        if len(top) == REPORT_GALLERY and (score, -i) <= top[0][:2]:
            return  # below all the gallery holds: not kept (a callable amap is never read)
        heapq.heappush(top, (score, -i, i))
        kept_maps[i] = amap() if callable(amap) else amap
        if len(top) > REPORT_GALLERY:
            kept_maps.pop(heapq.heappop(top)[2], None)

    removed: list[Path] = []  # the earlier run's files that this run did not replace

    def write_scores():  # scores.csv lists what was written (a later --overwrite replaces it)
        nonlocal earlier
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(SCORES_COLUMNS)
        for r in (done[i] for i in sorted(done)):
            writer.writerow([r["path"], repr(r["score"]),
                             "" if r["p_value"] is None else repr(r["p_value"]),
                             "" if r["anomalous"] is None else int(r["anomalous"]), r["name"]])
        _write_text(output("scores.csv"), text.getvalue())
        if warned:
            _write_text(output(WARNINGS_FILE), "".join(f"{w}\n" for w in warned))
        stale = [f for f in earlier if f not in written]  # the earlier run's, not replaced: remove
        for f in stale:
            f.unlink(missing_ok=True)
        if stale:
            _debug(f"removed {len(stale)} file(s) of the earlier prediction in {out_dir}")
        removed.extend(stale)
        earlier = [f for f in earlier if f in written]  # each is removed once, not every save
        return len(removed)

    _write_text(output(SETTINGS_FILE), json.dumps(settings, indent=1) + "\n")
    for i, row in kept.items():  # --resume: the earlier run's images stay as they are
        for f in _image_files(row["name"], fmt, th is not None, clusters):
            output(f)
        done[i] = row
        if report:
            gallery(i, row["score"], lambda: _read_map(out_dir / f"{row['name']}_map.{fmt}"))
    pending.clear()
    if resume:
        _info(quiet, f"resuming: all {len(images)} images were already predicted; scores.csv"
                     + (" and the report are" if report else " is") + " written again"
              if not todo else
              f"resuming: {len(kept)} of {len(images)} images kept from the interrupted "
              f"prediction, {len(todo)} to predict")
    results = model.iter_predict(decoded())
    last_save = time.monotonic()
    try:
        for j, amap, score in _progress(results, quiet, "predicting", total=len(todo)):
            i = todo[j]
            path, name = images[i], names[i]
            image = loaded.pop(j)
            lo, hi = (vmin, vmax) if vmin is not None else color_range(model, amap)
            row = decide({"path": str(path), "score": float(score), "p_value": None,
                          "anomalous": None, "name": name})
            if th is not None:
                mask = (amap > th["pixel_threshold"]) & row["anomalous"]
                save_png(output(f"{name}_mask.png"), mask.astype(np.uint8) * 255)
            save_png(output(f"{name}_overlay.png"), heatmap_overlay(image, amap, lo, hi))
            if clusters:
                labels, _ = model.cluster_map(image)
                save_png(output(f"{name}_clusters.png"),
                         cluster_overlay(image, labels, model.config.n_components))
            if fmt == "npy":
                atomic_write_bytes(output(f"{name}_map.npy"), lambda fh: np.save(fh, amap))
            else:
                import tifffile

                buf = io.BytesIO()
                tifffile.imwrite(buf, amap)
                atomic_write_bytes(output(f"{name}_map.tiff"), lambda fh: fh.write(buf.getvalue()))
            _debug(f"{path}: score {score:.4g}" + (f", p-value {row['p_value']:.3g}, "
                                                 f"{'ANOMALOUS' if row['anomalous'] else 'normal'}"
                                                 if th is not None else ""))
            done[i] = row
            pending.clear()
            if report:  # keep only the maps the gallery can show: memory stays bounded
                gallery(i, float(score), amap)
            if time.monotonic() - last_save > SAVE_EVERY_S:  # a kill -9 loses at most this
                write_scores()
                last_save = time.monotonic()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (common.Terminated)
        for f in pending:  # an image half written: none of its files
            f.unlink(missing_ok=True)
            written.discard(f)
        n_removed = write_scores()
        gone = (f" (the {n_removed} other file(s) of the earlier prediction there were removed, "
                "as --overwrite asks)" if n_removed else "")
        code = _interrupt_exit_code(exc)
        by = "" if code == 130 else f" by {_interrupt_name(exc)}"
        rerun = ("rerun the same command with --resume in place of --overwrite" if overwrite
                 else "rerun the same command with --resume")
        raise UserError(f"interrupted{by} after {len(done)} of {len(images)} images; their "
                        f"outputs are in {out_dir} and listed in its scores.csv{gone} - {rerun} "
                        "to predict the rest", exit_code=code) from None
    write_scores()
    rows = [done[i] for i in range(len(images))]
    if report:
        from ..report import write_prediction_report

        maps = [kept_maps.get(i) for i in range(len(images))]
        path = write_prediction_report(output("report.html"), rows, maps,
                                       color_range=(vmin, vmax), thresholds=th,
                                       max_gallery=REPORT_GALLERY,
                                       reference_scores=cal.scores if cal is not None else None)
        _info(quiet, f"report -> {path}")
    _debug(f"{len(todo)} images in {time.perf_counter() - t_start:.1f} s (reading, scoring and writing)")
    flagged = sum(bool(r["anomalous"]) for r in rows)
    _info(quiet, f"{len(rows)} image(s) -> {out_dir} (scores.csv, *_overlay.png, *_map.{fmt}"
                 + (", *_mask.png" if th is not None else "")
                 + (", *_clusters.png" if clusters else "") + f", {SETTINGS_FILE}"
                 + (f", {WARNINGS_FILE}" if warned else "") + ")"
                 + (f"; {flagged} flagged anomalous" if th is not None else ""))


RESUME_KEYS = ("model_sha256", "image_threshold", "pixel_threshold", "format", "clusters")
"""The settings of OUT/predict.json that --resume requires unchanged (the model by content;
the decisions and masks by their thresholds, whatever rates gave them)."""
RESUME_KEY_OPTIONS = {"image_threshold": " (set by --fpr)",
                      "pixel_threshold": " (set by --pixel-fpr)"}
"""The option behind a setting of RESUME_KEYS, named when --resume is refused for it."""


def _settings(run_dir: Path, fmt: str, clusters: bool, th: dict | None) -> dict:
    """What a prediction's outputs depend on besides the images (OUT/predict.json): the
    model file and its SHA-256, the thresholds in use (and their target rates), the map
    format, --clusters, and the working folder (relative input paths in scores.csv are relative
    to it)."""
    import hashlib

    from .. import __version__

    model_path = _model_path(run_dir)
    digest = hashlib.sha256()
    with open(model_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"pedenet_version": __version__, "model": str(model_path.resolve()),
            "model_sha256": digest.hexdigest(),
            **{k: None if th is None else float(th[k])
               for k in ("target_fpr", "pixel_fpr", "image_threshold", "pixel_threshold")},
            "format": fmt, "clusters": bool(clusters), "cwd": os.getcwd()}


def _image_files(name: str, fmt: str, masks: bool, clusters: bool) -> list[str]:
    """The files predict writes for the image named ``name``."""
    files = [f"{name}_overlay.png", f"{name}_map.{fmt}"]
    return files + ([f"{name}_mask.png"] if masks else []) + ([f"{name}_clusters.png"] if clusters else [])


def _resumable(out_dir: Path, settings: dict, images: list[Path], names: list[str],
               masks: bool, score_fraction: float, score_border: float = 0.0) -> dict[int, dict]:
    """--resume: the rows of ``out_dir``'s scores.csv to keep, by index into ``images``.

    A row is kept when its image is among ``images`` (paths compared after resolving them, a
    relative one against the folder the earlier run worked in) under the same output name, and
    its files all exist and read back: the PNGs pass Pillow's check and the map gives the
    row's score (``score_fraction``, ``score_border``, :func:`pedenet.scoring.image_score`). Other rows' images
    are predicted again, with one warning that says why. A kept row's path is written as given
    now. Raises UserError when the earlier run's settings (predict.json) differ from
    ``settings`` (other than the version and working folder), when it lists images that are not
    among the inputs, or when an image's output name changed (the inputs or their order).
    """
    from ..outputs import SETTINGS_FILE, read_scores

    try:
        saved = json.loads((out_dir / SETTINGS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{out_dir / SETTINGS_FILE}: cannot read it ({exc}); run with --overwrite "
                        "instead of --resume") from None
    diffs = [k for k in RESUME_KEYS if saved.get(k) != settings[k]]
    if diffs:
        def shown(v):
            return f"{v:.6g}" if isinstance(v, float) else repr(v)

        listing = ", ".join("model file (other contents)" if k == "model_sha256"
                            else f"{k}{RESUME_KEY_OPTIONS.get(k, '')} {shown(saved.get(k))} there, "
                            f"{shown(settings[k])} now" for k in diffs[:4])
        raise UserError(f"{out_dir}: the interrupted prediction used another model or other "
                        f"options ({listing}); resume with the same ones, or pass --overwrite "
                        "instead of --resume to start over", exit_code=2)
    rows = read_scores(out_dir)
    scores = out_dir / "scores.csv"
    if not rows:
        why = ("is not a pedenet scores.csv (header) or cannot be read" if scores.exists() else
               "is missing (the prediction stopped before its first save)")
        if any(out_dir.glob(f"*_map.{settings['format']}")):
            warnings.warn(f"{scores}: {why}; no image is kept: all are predicted again",
                          stacklevel=2)
    base = Path(saved.get("cwd") or os.getcwd())
    index = {p.resolve(): i for i, p in enumerate(images)}
    matched = [(r, index.get((base / r["path"]).resolve())) for r in rows]
    others = [r["path"] for r, i in matched if i is None]
    if others:
        raise UserError(f"{out_dir}: its scores.csv lists {len(others)} image(s) that are not "
                        f"among the inputs now (e.g. {others[0]}, relative to {base}); resume "
                        "with the same inputs, or pass --overwrite instead of --resume to start "
                        "over", exit_code=2)
    renamed = [(r, i) for r, i in matched if r["name"] != names[i]]
    if renamed:
        r, i = renamed[0]
        raise UserError(f"{out_dir}: {len(renamed)} image(s) would get other output names than in "
                        f"the interrupted prediction (e.g. {images[i]}: {r['name']!r} there, "
                        f"{names[i]!r} now); names of images that share a file stem depend on the "
                        "inputs and their order: resume with the same inputs in the same order, "
                        "or pass --overwrite instead of --resume to start over", exit_code=2)
    kept, redo = {}, []
    for row, i in matched:
        files = [out_dir / f for f in _image_files(row["name"], settings["format"], masks,
                                                   settings["clusters"])]
        problem = _kept_files_problem(files, row["score"], score_fraction, score_border)
        if problem:
            redo.append(problem)
            continue
        kept[i] = {**row, "path": str(images[i])}
    if redo:
        more = f"; and {len(redo) - 5} more" if len(redo) > 5 else ""
        warnings.warn(f"{out_dir}: {len(redo)} image(s) listed in scores.csv are predicted again: "
                      + "; ".join(redo[:5]) + more, stacklevel=2)
    return kept


def _kept_files_problem(files: list[Path], score: float, score_fraction: float,
                        score_border: float = 0.0) -> str | None:
    """Why an image's earlier outputs cannot be kept ("FILE: missing", "FILE: unreadable
    (...)", "FILE: gives the image score X, scores.csv lists Y"), or None when they can."""
    from PIL import Image

    from ..scoring import image_score

    for f in files:
        if not f.is_file():
            return f"{f}: missing"
        try:
            if f.suffix == ".png":
                with Image.open(f) as img:
                    img.verify()  # structure and checksums, without decoding
            else:
                amap = _read_map(f)
                if amap.ndim != 2:
                    return f"{f}: not a 2-D anomaly map (shape {amap.shape})"
                got = image_score(amap, score_fraction, score_border)
                if not np.isclose(got, score, rtol=1e-9, atol=0.0):
                    return f"{f}: gives the image score {got:.6g}, scores.csv lists {score:.6g}"
        except Exception as exc:  # any reader's error: the file is not what predict wrote
            return f"{f}: unreadable ({type(exc).__name__}: {exc})"
    return None


def _read_map(path: Path) -> np.ndarray:
    """A raw anomaly map written by predict (.npy or .tiff)."""
    if path.suffix == ".npy":
        return np.load(path)
    import tifffile

    return tifffile.imread(path)
