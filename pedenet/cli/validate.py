"""``pedenet validate``: a score from the held-out normal images and synthetic defects."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import click

from .common import (NonEmptyPath, UserError, _check_writable, _checked, _data_moved_to, _debug,
                     _device_option, _info, _load_model, _model_path, _read_json,
                     _recorded_category, _set_verbose, _short_warnings, _thresholds_line,
                     _user_errors, _verbose_option, _write_json)


@click.command()
@click.argument("run_dir", type=NonEmptyPath(path_type=Path))
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the synthetic defects (keep it fixed to compare runs).")
@click.option("--kinds", default="scratch,spot,patch", show_default=True, metavar="KIND,...",
              help="Synthetic defect kinds, given to the held-out images in turn: scratch, spot, "
              "patch, and region (a band over 15-45 % of the image whose texture is the image's "
              "own, magnified: large, low-contrast defects) and edge (the same change on a piece "
              "cut off at the border or a corner, 3-10 % of the image, as chipped edges are). "
              "Compare runs on the same kinds.")
@click.option("--data", type=NonEmptyPath(path_type=Path), default=None,
              help="Where the data `fit` ran on is now, if it has moved: its category folder (or "
              "plain folder of normal images), or the dataset root holding that category. The "
              "held-out images are found there by their path relative to the folder recorded "
              "in RUN_DIR/config.json.")
@_device_option
@click.option("--overwrite", is_flag=True, default=False, show_default=True,
              help="Replace an earlier RUN_DIR/validation.json.")
@click.option("--skip-bad-files", is_flag=True, default=False, show_default=True,
              help="Leave missing, unreadable or too small held-out images out (with a warning) "
              "instead of stopping.")
@click.option("--quiet", is_flag=True, default=False, show_default=True,
              help="No progress bars, messages or warnings (the result is still printed; warnings "
              "are still recorded in validation.json).")
@_verbose_option
@_user_errors
def validate(run_dir, seed, kinds, data, device, overwrite, skip_bad_files, quiet, verbose):
    """Validation score of RUN_DIR's model, for choosing settings without the test split.

    Scores the normal images that fit held out of training (--calibration-fraction) and a
    copy of each carrying one synthetic defect (scratch, spot or foreign patch by default;
    --kinds adds region and edge), with exact masks.
    Compare runs of the same data by these figures; keep the test split for the final report.
    Writes RUN_DIR/validation.json (with the count of each defect kind, each image's anomaly
    score, any skipped files and the warnings, also printed unless --quiet).
    """
    from ..validation import VALIDATION_KINDS, check_kinds
    from ..validation import validate as _validate

    _set_verbose(verbose, quiet)
    try:
        kinds = check_kinds(kinds)
    except ValueError:
        given = ",".join(k.strip() for k in kinds.split(",") if k.strip())
        raise click.BadParameter(f"{given or 'nothing'}: give distinct kinds from "
                                 f"{', '.join(VALIDATION_KINDS)}, comma-separated",
                                 param_hint="--kinds") from None
    warned: list[str] = []  # validation.json "warnings"; printed unless quiet
    click.get_current_context().with_resource(_short_warnings(warned, quiet))  # until validate ends
    model_path = _model_path(run_dir)
    model = _load_model(model_path, device)
    out = model_path.parent / "validation.json"
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it", exit_code=2)
    _check_writable(out.parent)  # before the validation, not after it
    held = model.history.get("calibration_images") or []
    if not held:
        raise UserError(f"{run_dir}: the model holds out no normal images to validate on "
                        f"({model.no_calibration_reason()})")
    unnamed = [h for h in held if h.startswith("<input")]
    if unnamed:
        raise UserError(f"{run_dir}: the held-out images were passed as arrays, not files, so they "
                        "cannot be reloaded; use pedenet.validation.validate(model, images) in Python")
    held_paths = [Path(h) for h in held]
    if data is not None:
        held_paths = _moved(held_paths, model_path.parent / "config.json", data)
    paths = _held_out_images(held_paths, model.min_image_side, data=data,
                             skip_bad_files=skip_bad_files, quiet=quiet)
    _debug(f"settings: kinds {','.join(kinds)}, seed {seed}, model {model_path}")
    t0 = time.perf_counter()
    result = _validate(model, paths, seed=seed, progress=not quiet, kinds=kinds)
    used = set(paths)
    result.update(seed=seed, seconds=time.perf_counter() - t0, images=[str(p) for p in paths],
                  skipped_files=[str(h) for h in held_paths if h not in used], warnings=warned)
    _write_json(out, result)
    _debug("synthetic defects: " + ", ".join(f"{n} {k}" for k, n in result["defect_kinds"].items()))
    _debug(_thresholds_line(model.thresholds(), model))
    for path, normal, bad, kind in zip(paths, result["normal_scores"], result["defect_scores"],
                                       result["copy_kinds"]):
        _debug(f"{path}: score {normal:.4g}; its copy with a synthetic {kind} defect: {bad:.4g}")
    _debug(f"validation took {result['seconds']:.1f} s ({len(paths)} held-out "
           f"image{'s' * (len(paths) != 1)}, device {device})")
    drawn = [k for k in kinds if result["defect_kinds"].get(k)]  # with few images, not every kind
    n = len(paths)
    click.echo(f"validation ({n} held-out normal image{'s' * (n != 1)} + {n} synthetic-defect "
               f"cop{'ies' if n != 1 else 'y'}: {', '.join(drawn)}; seed {seed}): image AUROC {result['image_auroc']:.3f}, pixel AUROC "
               f"{result['pixel_auroc']:.3f}, AU-PRO@0.3 {result['au_pro_0.3']:.3f}")
    _info(quiet, f"-> {out}")


def _moved(held: list[Path], config_path: Path, data: Path) -> list[Path]:
    """The held-out image paths ``held`` (recorded at fit time) under ``data``, where the data
    has moved: each path relative to the category folder recorded in ``config_path``, joined
    to ``data`` (or to ``data/<category>`` when ``data`` is the dataset root). Raises
    UserError when the config records no data folder, a held-out path lies outside it,
    ``data`` is not a folder, or (exit code 2) none of the images is under ``data`` but they
    are under one of its two parent folders, which the message names."""
    recorded = _read_json(config_path) if config_path.is_file() else {}
    old = recorded.get("category_dir")
    category = _recorded_category(recorded)
    new_root = _data_moved_to(data, category)
    if not old:
        raise UserError(f"{config_path}: not found or records no data folder, so --data cannot "
                        "relocate the held-out images")
    old_dirs = [Path(old), Path(old).resolve()]
    out = []
    for h in held:
        for base in old_dirs:
            try:
                out.append(new_root / h.relative_to(base))
                break
            except ValueError:
                continue
        else:
            raise UserError(f"{h}: held-out image is not under the data folder recorded at fit "
                            f"time ({old}), so --data cannot relocate it")
    if out and not any(p.is_file() for p in out):  # e.g. --data .../bottle/train/good
        here = Path(data).resolve()
        for up in (here.parent, here.parent.parent):
            root = _data_moved_to(up, category)
            moved = [root / p.relative_to(new_root) for p in out]
            if 2 * sum(p.is_file() for p in moved) >= len(moved):  # most of them: not a chance name
                raise UserError(f"--data {data}: none of the held-out images is under it; they are "
                                f"under {up}: pass --data {up} (the category folder `fit` read, or "
                                "the dataset root holding it)", exit_code=2)
    return out


def _held_out_images(held: list[Path], min_side: int, *, skip_bad_files: bool,
                     quiet: bool, data: Path | None = None) -> list[Path]:
    """The held-out images validate can use: present, readable, both sides >= MIN_SIDE.

    A bad one stops validate with an error suggesting --skip-bad-files (the held-out set is
    fixed at fit time: removing the file does not take it out); with ``skip_bad_files`` it is
    left out with a ``skipped: ...`` warning naming it. Raises UserError/BadFilesError.
    """
    from PIL import Image

    from ..data import SkippedFileWarning
    from ..validation import MIN_SIDE

    missing = [h for h in held if not h.is_file()]
    if missing and not skip_bad_files:
        if data is not None and len(missing) == len(held):
            where = (f"not under --data {data}: pass the category folder `fit` read, or the "
                     "dataset root holding it")
        elif data is not None:
            where = "moved or deleted since fit"
        elif not missing[0].is_absolute():
            where = "the path is relative to the folder `fit` ran in: run validate from there"
        else:
            where = "moved or deleted since fit; if the data moved, pass --data with its new folder"
        raise UserError(f"{missing[0]}: held-out image not found ({len(missing)} of {len(held)} "
                        f"missing; {where}); restore it, or pass --skip-bad-files to validate "
                        "on the other held-out images")
    for h in missing:
        warnings.warn(f"skipped: {h}: held-out image not found", SkippedFileWarning, stacklevel=2)
    present = [h for h in held if h.is_file()]
    if not present:
        raise UserError(f"none of the {len(held)} held-out images exists (first: {held[0]}); "
                        "restore them, or refit to hold out current images")
    paths = []
    for p in _checked(present, min_side=min_side, skip_bad_files=skip_bad_files, quiet=quiet,
                      desc="checking held-out images"):
        with Image.open(p) as im:  # the header only: the size
            w, h = im.size
        if min(w, h) >= MIN_SIDE:
            paths.append(p)
            continue
        too_small = (f"{p}: held-out image is {w}x{h} px; validate draws its synthetic defects in "
                     f"windows of at least {MIN_SIDE} px, so held-out images need both sides "
                     f">= {MIN_SIDE} px")
        if not skip_bad_files:
            raise UserError(too_small + " (or pass --skip-bad-files to leave such images out)")
        warnings.warn(f"skipped: {too_small}", SkippedFileWarning, stacklevel=2)
    if not paths:
        raise UserError(f"all {len(held)} held-out images are unusable (see the warnings above); "
                        "refit with images that validate can use")
    return paths
