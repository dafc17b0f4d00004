"""``pedenet evaluate``: a run's metrics on the test split (also run by ``pedenet demo``)."""

from __future__ import annotations

import datetime as _dt
import shutil
from pathlib import Path

import click

from ..data import DataError, list_images, load_image, load_mask, resolve_category
from ..environment import package_versions
from .common import (NonEmptyPath, UserError, _check_writable, _debug, _device_option, _info,
                     _interrupt_exit_code, _interrupt_name, _load_model, _model_path, _progress,
                     _rate_options, _read_json, _set_verbose, _short_warnings, _thresholds_line,
                     _unique_names, _user_errors, _verbose_option, _write_json)


def _resolve_eval_data(run_dir: Path, data: Path | None, category: str | None) -> Path:
    """The category folder to evaluate on: ``data`` (with ``category``) when given, else the
    one config.json records. The run record is read only where it is needed, so a damaged
    config.json does not block ``--data CATEGORY_FOLDER``. Raises UserError, DataError."""
    cfg_path = Path(run_dir) / "config.json"
    if data is None:
        recorded = _read_json(cfg_path) if cfg_path.is_file() else {}
        if not recorded.get("category_dir") and not recorded.get("data"):
            raise UserError(f"{cfg_path}: not found or records no data; pass --data DATA "
                            "(a category folder or dataset root)")
        try:
            if category is None and recorded.get("category_dir"):
                return resolve_category(recorded["category_dir"])
            return resolve_category(recorded.get("data") or recorded["category_dir"],
                                    category if category is not None else recorded.get("category"))
        except DataError as exc:  # the data was moved or deleted since fit
            fitted_on = Path(recorded.get("category_dir") or recorded["data"])
            if recorded.get("plain_folder") or (fitted_on.is_dir() and list_images(fitted_on)):
                raise UserError(
                    f"{run_dir} was fitted on a plain folder of normal images ({fitted_on}), "
                    "which has no test images: pass --data with a folder in the MVTec AD layout "
                    "(test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png), or run "
                    f"pedenet validate {run_dir} to score synthetic defects") from None
            raise UserError(f"{exc} (the test data recorded in {cfg_path} at fit time); pass "
                            "--data DATA if it has moved") from None
    if not Path(data).is_dir():  # a --data that does not exist or is a file: a usage error
        try:
            resolve_category(data)  # for its message
        except DataError as exc:
            raise UserError(str(exc), exit_code=2) from None
    if category is not None:
        return resolve_category(data, category)
    try:
        return resolve_category(data)
    except DataError as exc:  # a dataset root: the category fit recorded, if it is there
        try:
            recorded = _read_json(cfg_path) if cfg_path.is_file() else {}
        except UserError:  # a damaged record: the data's own message (it lists the categories)
            raise exc from None
        name = Path(recorded["category_dir"]).name if recorded.get("category_dir") else None
        if name and (Path(data) / name).is_dir():
            return resolve_category(data, name)
        raise


def _evaluate_run(run_dir: Path, data: Path | None, category: str | None, *, overlays: bool,
                  device: str, quiet: bool, overwrite: bool = True,
                  skip_bad_files: bool = False, fpr: float | None = None,
                  pixel_fpr: float | None = None, report: bool = False) -> dict:
    """Evaluate the run's model, write metrics.json (and overlays, report.html); return the result.

    Without ``overwrite``, existing results (metrics.json, overlays/, report.html) are not replaced.
    Warnings (skipped files, missing masks, thresholds that cannot be guaranteed) go to
    metrics.json ("warnings") and, unless ``quiet``, to stderr: with ``quiet`` only errors are
    printed.
    """
    from ..evaluation import evaluate
    from ..visualization import color_range, heatmap_overlay, save_png

    warned: list[str] = []  # metrics.json "warnings"; printed unless quiet
    with _short_warnings(warned, quiet):
        run_dir = Path(run_dir)
        model_path = _model_path(run_dir)
        if model_path == run_dir:  # a model file was given: results go beside it
            run_dir = run_dir.parent
        model = _load_model(model_path, device)  # first: a file that is no model is the error to report
        old = [p for p in (run_dir / "metrics.json", run_dir / "overlays", run_dir / "report.html")
               if p.exists()]
        if old and not overwrite:
            raise UserError(f"{old[0]}: results of an earlier evaluation exist; pass --overwrite to "
                            "replace them", exit_code=2)
        _check_writable(run_dir)  # before the scoring, not after it
        cat_dir = _resolve_eval_data(run_dir, data, category)
        _debug(f"model {model_path}; test data {cat_dir}; device {device}")
        _debug(_thresholds_line(model.thresholds(fpr, pixel_fpr), model))
        result, maps = evaluate(model, cat_dir, progress=not quiet, return_maps=True,
                                skip_bad_files=skip_bad_files, fpr=fpr, pixel_fpr=pixel_fpr)
        _debug(f"scored {result['n_images']} images in {result['seconds_total']:.1f} s "
               f"({result['seconds_per_image']:.3f} s/image inference)")
        for entry in result["images"]:
            _debug(f"{entry['path']}: score {entry['score']:.4g}"
                   + (f", p-value {entry['p_value']:.3g}, {'ANOMALOUS' if entry['anomalous'] else 'normal'}"
                      if "p_value" in entry else ""))
        shutil.rmtree(run_dir / "overlays", ignore_errors=True)  # stale results of an earlier run
        (run_dir / "report.html").unlink(missing_ok=True)
        record = {"run_dir": str(run_dir.resolve()), "model": str(model_path.resolve()),
                  "evaluated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "packages": package_versions(), **result, "warnings": warned}
        _write_json(run_dir / "metrics.json", record)
        n_recorded = len(warned)
        stage = "the overlays"
        try:
            if overlays:
                out_root = run_dir / "overlays"
                by_defect: dict[str, list[int]] = {}
                for i, entry in enumerate(result["images"]):
                    by_defect.setdefault(entry["defect"], []).append(i)
                names: dict[int, str] = {}
                for idx in by_defect.values():
                    paths = [Path(result["images"][i]["path"]) for i in idx]
                    names.update(zip(idx, _unique_names(paths)))
                for i in _progress(range(len(maps)), quiet, "overlays"):
                    entry = result["images"][i]
                    amap = maps[i]
                    image = load_image(entry["path"])
                    mask = load_mask(entry["mask"], expected_shape=amap.shape) if entry["mask"] else None
                    vmin, vmax = color_range(model, amap)
                    save_png(out_root / entry["defect"] / f"{names[i]}.png",
                             heatmap_overlay(image, amap, vmin, vmax, mask=mask))
                _info(quiet, f"overlays -> {out_root}")
            stage = "the report"
            if report:
                from ..report import write_evaluation_report

                path = write_evaluation_report(run_dir / "report.html", result, maps,
                                               color_range=color_range(model),
                                               title=f"pedenet evaluation: {Path(result['category']).name}")
                _info(quiet, f"report -> {path}")
        except KeyboardInterrupt as exc:  # the metrics are written: say so, and what is not
            code = _interrupt_exit_code(exc)
            by = "" if code == 130 else f" by {_interrupt_name(exc)}"
            o = {k: "n/a" if v != v else f"{v:.3f}" for k, v in result["overall"].items()
                 if isinstance(v, float)}  # NaN: undefined, as the table shows it
            ctx = click.get_current_context(silent=True)
            again = ("rerun with --overwrite to write everything again"
                     if ctx is not None and "overwrite" in ctx.params else "rerun the command")
            raise UserError(f"interrupted{by} while writing {stage}; the metrics are complete in "
                            f"{run_dir / 'metrics.json'} (image AUROC {o['image_auroc']}, pixel "
                            f"AUROC {o['pixel_auroc']}, AU-PRO@0.3 {o['au_pro_0.3']}), {stage} "
                            f"not: {again}", exit_code=code) from None
        if len(warned) > n_recorded:  # warned while writing overlays or the report
            _write_json(run_dir / "metrics.json", record)
        return record


@click.command()
@click.argument("run_dir", type=NonEmptyPath(path_type=Path))
@click.option("--data", type=NonEmptyPath(path_type=Path), default=None, show_default=True,
              help="Category folder or dataset root; default: the data recorded in "
              "RUN_DIR/config.json.")
@click.option("--category", default=None, show_default=True,
              help="Category under --data when it is a dataset root.")
@click.option("--overlays/--no-overlays", default=True, show_default=True,
              help="Write heatmap overlays to RUN_DIR/overlays/<defect>/<stem>.png.")
@_device_option
@click.option("--overwrite", is_flag=True, default=False, show_default=True,
              help="Replace the results of an earlier evaluation (metrics.json, overlays/, report.html).")
@click.option("--skip-bad-files", is_flag=True, default=False, show_default=True,
              help="Leave test images with an unreadable image or mask out (with a warning) "
              "instead of stopping.")
@_rate_options
@click.option("--report", is_flag=True, default=False, show_default=True,
              help="Write RUN_DIR/report.html: metrics, ROC and PRO curves, score histograms, "
              "a gallery of the worst errors (self-contained, opens offline).")
@click.option("--quiet", is_flag=True, default=False, show_default=True,
              help="No progress bars, messages or warnings (the table is still printed; "
              "warnings are still recorded in metrics.json).")
@_verbose_option
@_user_errors
def evaluate(run_dir, data, category, overlays, device, overwrite, skip_bad_files, fpr, pixel_fpr,
             report, quiet, verbose):
    """Evaluate RUN_DIR's model on the test split; write RUN_DIR/metrics.json.

    Every test image and mask is checked first. Undefined metrics (e.g. no defective test
    images) are shown as n/a and stored as null. For a model with thresholds, the realized
    false-alarm and miss rates of its decisions are reported next to the target.
    Warnings (skipped files, missing masks, ...) are also recorded in metrics.json ("warnings").
    """
    from ..evaluation import format_table

    _set_verbose(verbose, quiet)
    result = _evaluate_run(run_dir, data, category, overlays=overlays, device=device, quiet=quiet,
                           overwrite=overwrite, skip_bad_files=skip_bad_files, fpr=fpr,
                           pixel_fpr=pixel_fpr, report=report)
    click.echo(f"{result['category']}  ({result['n_images']} test images, "
               f"{result['seconds_per_image']:.3f} s/image)")
    click.echo(format_table(result), nl=False)
