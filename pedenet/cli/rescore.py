"""``pedenet rescore``: a run with another patch scoring (mixture / distance) or image-score edge
band, without training."""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

import click

from ..config import SCORINGS
from ..data import DataError
from ..environment import package_versions
from ..estimator import RESCORE_TIMINGS
from ..training import ImagesMismatchError
from .common import (NonEmptyPath, UserError, _check_run_dir, _data_moved_to, _debug,
                     _device_option, _info, _load_model, _model_path, _read_json,
                     _recorded_category, _remove_stale_results, _set_verbose, _short_warnings,
                     _thresholds_line, _user_errors, _verbose_option, _write_json)


@click.command()
@click.argument("run_dir", type=NonEmptyPath(path_type=Path))
@click.option("--scoring", type=click.Choice(SCORINGS), default=None,
              help="The new scoring: energy under the Gaussian mixture, or distance to the "
              "nearest of --memory-bank-size training embeddings  [default: RUN_DIR's]")
@click.option("--image-score-border", type=click.FloatRange(0, 0.5, max_open=True), default=None,
              help="The new edge band left out of the image score, a fraction of each side "
              "(fit --image-score-border)  [default: RUN_DIR's]")
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(path_type=Path, file_okay=False),
              help="New run folder to write (RUN_DIR is left as it is).")
@click.option("--memory-bank-size", type=click.IntRange(min=1), default=None,
              help="At most this many training embeddings for --scoring distance  [default: "
              "RUN_DIR's setting: 200000 unless fit was given another]")
@click.option("--data", type=NonEmptyPath(path_type=Path), default=None,
              help="Where the data `fit` ran on is now, if it has moved: its category folder (or "
              "plain folder of normal images), or the dataset root holding that category.")
@_device_option
@click.option("--overwrite", is_flag=True, default=False, show_default=True,
              help="Replace a model already in --out.")
@click.option("--quiet", is_flag=True, default=False, show_default=True,
              help="No progress bars or messages (warnings are still recorded in config.json).")
@_verbose_option
@_user_errors
def rescore(run_dir, scoring, image_score_border, out_dir, memory_bank_size, data, device,
            overwrite, quiet, verbose):
    """Copy RUN_DIR's model to --out with another patch scoring or image-score edge band,
    without training again.

    Training depends on neither, so the new run equals a fit with the new --scoring and
    --image-score-border (same data, seed and options): the training images are encoded again, the
    memory bank (distance) is built or dropped (mixture), and the thresholds are set again
    from the held-out images (on MTD: under a minute, where the fit took half an hour).
    Compare the two runs with `pedenet validate`, then keep one. The training images must be
    those fit read (checked: their count, the held-out file names and the features' mean).
    """
    _set_verbose(verbose, quiet)
    if scoring is None and image_score_border is None and memory_bank_size is None:
        raise click.UsageError("nothing to change: give --scoring, --image-score-border or "
                               "--memory-bank-size (a distance run's)")
    if image_score_border is not None and not 0.0 <= image_score_border < 0.5:  # NaN passes FloatRange
        raise click.BadParameter(f"{image_score_border} is not in [0, 0.5)", param_hint="--image-score-border")
    model_path = _model_path(run_dir)
    run_dir = model_path.parent
    out_dir = Path(out_dir)
    if out_dir.resolve() == run_dir.resolve() or run_dir.resolve() in out_dir.resolve().parents:
        raise UserError(f"{out_dir}: is RUN_DIR or inside it; choose a new --out folder beside "
                        "it (RUN_DIR is kept as it is)", exit_code=2)
    _check_run_dir(out_dir, overwrite=overwrite, resume=False, can_resume=False)
    model = _load_model(model_path, device)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path}: not found; rescore reads the training images' folder "
                        "from it (refit with `pedenet fit`, or use PEDENet.rescore in Python)")
    record = _read_json(config_path)
    scoring = model.config.scoring if scoring is None else scoring
    if memory_bank_size is not None and scoring != "distance":
        raise click.UsageError("--memory-bank-size applies to --scoring distance only; add "
                               "--scoring distance, or leave --memory-bank-size out")
    border = model.config.image_score_border if image_score_border is None else image_score_border
    if (scoring == model.config.scoring and memory_bank_size in (None, model.config.memory_bank_size)
            and border == model.config.image_score_border):
        raise UserError(f"{run_dir}: already scores by {scoring}"
                        + (f" with a memory bank of at most {model.config.memory_bank_size}"
                           if scoring == "distance" else "")
                        + f" and an image-score border of {border:g}; nothing to change", exit_code=2)
    cat_dir = _training_folder(record, config_path, data)
    paths = _training_images(record, cat_dir)
    warned: list[str] = []
    t0 = time.perf_counter()
    with _short_warnings(warned, quiet):
        _info(quiet, f"rescoring {run_dir} by {scoring}, image-score border {border:g}: "
              f"{len(paths)} normal images from {cat_dir}")
        try:
            model.rescore(paths, scoring, memory_bank_size, progress=not quiet, image_score_border=border)
        except DataError as exc:  # an unreadable image: fit read it, so it changed since
            raise UserError(f"{exc} (fit read it: restore the file)") from None
        except ImagesMismatchError as exc:  # its advice replaced by the command line's
            raise UserError(f"{cat_dir}: {exc.problem}; pass the folder fit read (--data), or "
                            "refit") from None
    seconds = time.perf_counter() - t0
    _debug(f"config: {json.dumps(model.config.to_dict())}")
    redone = {k: v for k, v in model.history.get("timings", {}).items()  # not the fit's training
              if k in RESCORE_TIMINGS}
    _debug(f"stage timings (s): rescore {seconds:.1f} in all, of which "
           + (", ".join(f"{k} {v:.1f}" for k, v in redone.items()) or "no timed stage")
           + "; the rest is mostly encoding the training images")
    record.setdefault("fit_warnings", record.get("warnings", []))  # the original fit's
    record.update(
        category_dir=str(cat_dir.resolve()), config=model.config.to_dict(),
        thresholds=model.thresholds(), warnings=warned,
        rescored={"from": str(run_dir.resolve()), "seconds": seconds, "packages": package_versions(),
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    if data is not None:
        record["data"] = str(Path(data).resolve())
    record.setdefault("timings", {})["fit_stages"] = dict(model.history.get("timings", {}))
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:  # the earlier model goes first: an interruption leaves no mismatched pair
        (out_dir / "model.pt").unlink(missing_ok=True)
        _remove_stale_results(out_dir)
    _write_json(out_dir / "config.json", record)
    _write_json(out_dir / "history.json", model.history)
    model.save(out_dir / "model.pt")  # last: model.pt marks a complete run
    _info(quiet, f"rescored in {seconds:.1f} s -> {out_dir}")
    _info(quiet, _thresholds_line(model.thresholds(), model))


def _training_folder(record: dict, config_path: Path, data: Path | None) -> Path:
    """The folder fit read its images from: ``data`` when given (its category under a
    dataset root), else config.json's ``category_dir``. Raises UserError when it is missing."""
    if data is None:
        if not record.get("category_dir"):
            raise UserError(f"{config_path}: records no data folder; pass --data")
        folder = Path(record["category_dir"])
        if not folder.is_dir():
            raise UserError(f"{folder}: the data folder fit read is gone; if the data moved, "
                            "pass --data with its new folder")
        return folder
    folder = _data_moved_to(data, _recorded_category(record))
    if not record.get("plain_folder") and not (folder / "train" / "good").is_dir():
        hint = (f"pass {folder.parent.parent}, the category folder holding it"
                if folder.name == "good" and folder.parent.name == "train"
                else "pass the category folder (holding train/good) or the dataset root holding it")
        raise UserError(f"{data}: no train/good here; {hint}")  # not the MVTec AD layout
    return folder


def _training_images(record: dict, folder: Path) -> list[Path]:
    """The images fit was given, in its order: ``folder``'s train/good (or, for a plain
    folder, the images directly inside), without the files fit skipped."""
    from ..data import list_images, train_samples

    try:
        paths = list_images(folder) if record.get("plain_folder") else [
            s.path for s in train_samples(folder)]
    except DataError as exc:
        raise UserError(str(exc)) from None
    skipped = {Path(s).name for s in record.get("skipped_files", [])}
    return [p for p in paths if Path(p).name not in skipped]
