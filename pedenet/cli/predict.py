"""``pedenet predict``: anomaly maps, overlays, scores and decisions for new images."""

from __future__ import annotations

import csv
import heapq
import io
import json
import time
import warnings
from pathlib import Path

import click
import numpy as np

from ..checkpoint import atomic_write_bytes
from ..data import find_images, load_image
from .common import (UserError, _check_out_folder, _checked, _debug, _device_option, _info,
                     _load_model, _model_path, _progress, _rate_options, _set_verbose,
                     _short_warnings, _thresholds_line, _unique_names, _user_errors,
                     _verbose_option, _write_text)

REPORT_GALLERY = 60
"""Images shown in the gallery of an HTML report."""


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for <stem>_overlay.png, <stem>_map.npy|tiff, <stem>_mask.png and scores.csv.")
@click.option("--format", "fmt", type=click.Choice(["npy", "tiff"]), default="npy",
              show_default=True, help="File format of the raw float32 anomaly maps.")
@_rate_options
@click.option("--report", is_flag=True, default=False, show_default=True,
              help="Write OUT/report.html: scores, histogram with the threshold, gallery "
              "(self-contained, opens offline).")
@click.option("--clusters", is_flag=True, default=False, show_default=True,
              help="Also write <stem>_clusters.png: the most likely mixture component of each "
              "region (which normal pattern it resembles); the legend at the bottom numbers the "
              "components present, largest area first.")
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
    first. Images sharing a file stem are named <folder>_<stem> (crack_000), or get _1, _2,
    ... suffixes (input order) where folder names do not tell them apart. scores.csv
    lists path, score (the image score: mean of the map's top --image-score-fraction of
    pixels, energy units), p_value, anomalous (the decision at the target false-alarm rate)
    and the output name; <stem>_mask.png (0/255) marks the
    pixels above the pixel threshold in images decided anomalous. A model fitted with
    --calibration-fraction 0 gives scores only. Warnings (skipped files, very large images,
    ...) are also written to OUT/warnings.txt, one per line, when there are any.
    Ctrl-C keeps the images finished so far (scores.csv lists them; exit code 130);
    the same command with --resume predicts the rest.
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
    if resume and overwrite:
        raise UserError("--resume keeps the finished images and --overwrite replaces them; pass "
                        "one", exit_code=2)
    if resume and not (out_dir / SETTINGS_FILE).is_file():
        raise UserError(f"{out_dir}: no interrupted prediction to resume (no {SETTINGS_FILE}); "
                        "run without --resume", exit_code=2)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (overwrite or resume):
        raise UserError(f"{out_dir}: output folder is not empty; pass --overwrite to write into it "
                        "(or --resume to continue an interrupted prediction) or choose another "
                        "--out", exit_code=2)
    earlier = earlier_prediction_files(out_dir) if out_dir.is_dir() else []
    out_resolved = out_dir.resolve()
    images = [p for p in find_images(list(inputs))
              if out_resolved not in p.resolve().parents]  # never read our own outputs
    if not images:
        raise UserError(f"{out_dir}: all inputs lie inside the --out folder; choose another --out")
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
    kept: dict[int, dict] = {}  # --resume: index -> the earlier run's row, for images kept
    if resume:
        kept = _resumable(out_dir, settings, images, names, th is not None)
    _info(quiet, _thresholds_line(th, model))
    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = color_range(model)
    held_out = color_source(model) == "held_out"
    _debug(f"model {_model_path(run_dir)}; {len(images)} images; device {device}; "
           f"overlay colour range {vmin} to {vmax} (energy; from the "
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

    def write_scores():  # scores.csv lists what was written (a later --overwrite replaces it)
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
        return len(stale)

    _write_text(output(SETTINGS_FILE), json.dumps(settings, indent=1) + "\n")
    for i, row in kept.items():  # --resume: the earlier run's images stay as they are
        for f in _image_files(row["name"], fmt, th is not None, clusters):
            output(f)
        done[i] = row
        if report:
            gallery(i, row["score"], lambda: _read_map(out_dir / f"{row['name']}_map.{fmt}"))
    pending.clear()
    if kept:
        _info(quiet, f"resuming: {len(kept)} of {len(images)} images kept from the interrupted "
                     f"prediction, {len(todo)} to predict")
    results = model.iter_predict(decoded())
    try:
        for j, amap, score in _progress(results, quiet, "predicting", total=len(todo)):
            i = todo[j]
            path, name = images[i], names[i]
            image = loaded.pop(j)
            lo, hi = (vmin, vmax) if vmin is not None else color_range(model, amap)
            row = {"path": str(path), "score": float(score), "p_value": None, "anomalous": None, "name": name}
            if th is not None:
                row["p_value"] = float(cal.p_values(score))
                row["anomalous"] = bool(score > th["image_threshold"])
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
    except KeyboardInterrupt:
        for f in pending:  # an image half written: none of its files
            f.unlink(missing_ok=True)
            written.discard(f)
        removed = write_scores()
        gone = (f" (the {removed} other file(s) of the earlier prediction there were removed, "
                "as --overwrite asks)" if removed else "")
        raise UserError(f"interrupted after {len(done)} of {len(images)} images; their outputs "
                        f"are in {out_dir} and listed in its scores.csv{gone} - rerun the same "
                        "command with --resume to predict the rest", exit_code=130) from None
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
                 + (f", {WARNINGS_FILE}" if warned else "") + ")"
                 + (f"; {flagged} flagged anomalous" if th is not None else ""))


RESUME_KEYS = ("model_sha256", "image_threshold", "pixel_threshold", "format", "clusters")
"""The settings of OUT/predict.json that --resume requires unchanged (the model by content;
the decisions and masks by their thresholds, whatever rates gave them)."""


def _settings(run_dir: Path, fmt: str, clusters: bool, th: dict | None) -> dict:
    """What a prediction's outputs depend on besides the images (OUT/predict.json): the
    model file and its SHA-256, the thresholds in use (and their target rates), the map
    format, --clusters."""
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
            "format": fmt, "clusters": bool(clusters)}


def _image_files(name: str, fmt: str, masks: bool, clusters: bool) -> list[str]:
    """The files predict writes for the image named ``name``."""
    files = [f"{name}_overlay.png", f"{name}_map.{fmt}"]
    return files + ([f"{name}_mask.png"] if masks else []) + ([f"{name}_clusters.png"] if clusters else [])


def _resumable(out_dir: Path, settings: dict, images: list[Path], names: list[str],
               masks: bool) -> dict[int, dict]:
    """--resume: the rows of ``out_dir``'s scores.csv to keep, by index into ``images``: those
    whose path and name match and whose files all exist. Raises UserError when the earlier
    run's settings (predict.json) differ from ``settings`` (other than the version)."""
    from ..outputs import SETTINGS_FILE, read_scores

    try:
        saved = json.loads((out_dir / SETTINGS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{out_dir / SETTINGS_FILE}: cannot read it ({exc}); run with --overwrite "
                        "instead of --resume") from None
    diffs = [k for k in RESUME_KEYS if saved.get(k) != settings[k]]
    if diffs:
        listing = ", ".join("model file (other contents)" if k == "model_sha256"
                            else f"{k} {saved.get(k)!r} there, {settings[k]!r} now" for k in diffs[:4])
        raise UserError(f"{out_dir}: the interrupted prediction used another model or other "
                        f"options ({listing}); resume with the same ones, or pass --overwrite "
                        "instead of --resume to start over", exit_code=2)
    rows = read_scores(out_dir)
    inputs = {str(p) for p in images}
    others = [r["path"] for r in rows if r["path"] not in inputs]
    if others:
        raise UserError(f"{out_dir}: its scores.csv lists {len(others)} image(s) that are not "
                        f"among the inputs now (e.g. {others[0]}); resume with the same inputs, "
                        "or pass --overwrite instead of --resume to start over", exit_code=2)
    earlier = {(r["path"], r["name"]): r for r in rows}
    kept = {}
    for i, (path, name) in enumerate(zip(images, names)):
        row = earlier.get((str(path), name))
        if row is not None and all((out_dir / f).is_file()
                                   for f in _image_files(name, settings["format"], masks,
                                                         settings["clusters"])):
            kept[i] = row
    return kept


def _read_map(path: Path) -> np.ndarray:
    """A raw anomaly map written by predict (.npy or .tiff)."""
    if path.suffix == ".npy":
        return np.load(path)
    import tifffile

    return tifffile.imread(path)
