"""``pedenet fit``: train a model and write its run folder (also used by ``pedenet demo``)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
import warnings
from pathlib import Path

import click

from .. import __version__
from ..config import ENCODERS, MAX_SEED, SCORINGS, PEDENetConfig
from ..environment import package_versions
from ..data import (UNREAD_IMAGE_EXTENSIONS, DataError, Sample, SkippedFileWarning,
                    categories_under, find_images, is_category_dir, list_images, resolve_category,
                    train_samples)
from .common import (DEFAULTS, NonEmptyPath, UserError, _check_device, _check_run_dir, _checked,
                     _debug, _device_option, _info, _interrupt_exit_code, _interrupt_name,
                     _remove_stale_results, _set_verbose, _short_warnings, _thresholds_line,
                     _user_errors, _verbose_option, _write_json)


def _fit_run(data: Path, category: str | None, run_dir: Path, *, device: str, overwrite: bool,
             quiet: bool, config: dict, resume: bool = False, skip_bad_files: bool = False,
             checkpoint_every: int = 100) -> dict:
    """Fit a model on ``data``'s training images and write the run folder; return config.json.

    Training state goes to RUN_DIR/resume.pt every ``checkpoint_every`` steps and on
    SIGINT/SIGTERM/SIGHUP; ``resume`` continues from it. It is deleted once model.pt is written.
    Warnings (skipped files, thresholds that cannot be guaranteed) go to config.json
    ("warnings") and, unless ``quiet``, to stderr: with ``quiet`` only errors are printed.
    """
    import torch

    from ..calibration import split_calibration
    from ..estimator import PEDENet
    from ..resume import TrainingInterrupted

    run_dir = Path(run_dir)
    model_path = run_dir / "model.pt"
    resume_path = run_dir / "resume.pt"
    _check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    _check_device(device)
    warned: list[str] = []  # the fit's warnings: config.json "warnings"; printed unless quiet
    with _short_warnings(warned, quiet):
        accepted = ("pass a folder of normal images, a category folder in the MVTec AD layout "
                    "(train/good, test/<defect>), or a dataset root with --category")
        if not Path(data).exists():  # a DATA argument that does not exist: a usage error
            raise UserError(f"{data}: does not exist; {accepted}", exit_code=2)
        if not Path(data).is_dir():
            raise UserError(f"{data}: is a file, not a folder; {accepted}", exit_code=2)
        plain_folder = False  # trained on a plain folder of normal images (no test split)
        try:
            cat_dir = resolve_category(data, category)
            samples = train_samples(cat_dir)
        except DataError:
            # a plain folder of normal images (no MVTec layout yet: nothing defective collected)
            plain = list_images(data) if category is None else []
            if not plain:
                if category is None and _has_unread_images(Path(data)):
                    raise DataError(
                        f"{data}: holds images only in formats pedenet does not read (see the "
                        "warning above); convert them to PNG, or pass a folder in the MVTec AD "
                        "layout (train/good, test/<defect>)") from None
                nested = _images_in_subfolders(Path(data)) if category is None else {}
                if nested:
                    listed = ", ".join(f"{name}/ ({n})" for name, n in list(nested.items())[:5])
                    more = f" and {len(nested) - 5} more" if len(nested) > 5 else ""
                    raise DataError(
                        f"{data}: no images directly inside, but its subfolders hold some: "
                        f"{listed}{more}. fit does not look into subfolders, so that a folder "
                        "of defective images beside the normal ones is never trained on: pass "
                        "the folder of normal images itself (e.g. "
                        f"{Path(data) / next(iter(nested))}), or put all normal images in one "
                        "folder, or use the MVTec AD layout (train/good, test/<defect>)") from None
                if category is None and not is_category_dir(data) and not categories_under(data):
                    raise DataError(f"{data}: holds no images (none directly inside, no "
                                    f"train/good, no category folders); {accepted}") from None
                raise
            cat_dir = Path(data)
            plain_folder = True
            samples = [Sample(p, 0, "good", None) for p in plain]
            nested = _images_in_subfolders(cat_dir)
            if nested:
                warnings.warn(
                    f"{data}: training on the {len(plain)} images directly inside; "
                    f"{sum(nested.values())} images in its subfolders "
                    f"({', '.join(list(nested)[:5])}{', ...' if len(nested) > 5 else ''}) are "
                    "not used (fit does not look into subfolders)", SkippedFileWarning)
        model = PEDENet(device=device, **config)
        all_paths = [s.path for s in samples]
        paths = _checked(all_paths, min_side=model.min_image_side, skip_bad_files=skip_bad_files,
                         quiet=quiet, desc="checking training images")
        kept = set(paths)
        skipped = [str(p) for p in all_paths if p not in kept]
        resuming = resume and resume_path.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:  # results of the previous model would be stale
            _remove_stale_results(run_dir, keep_resume=resuming)
        if resume and not resuming:
            _info(quiet, f"--resume: no {resume_path}; starting from step 0")
        _debug(f"config: {json.dumps(model.config.to_dict())}")
        _debug(f"torch threads: {torch.get_num_threads()}, "
               f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
        train_idx, held_idx = split_calibration(len(paths), model.config.calibration_fraction,
                                                model.config.seed)
        n_held = len(held_idx)
        if resuming:  # other options or images: say so before announcing a resumed fit
            from ..resume import ResumeMismatchError, read_resume_state

            try:
                read_resume_state(resume_path, model.config, [paths[i] for i in train_idx])
            except ResumeMismatchError as exc:  # other options or images: a usage error
                raise UserError(str(exc), exit_code=2) from None
        _info(quiet, f"fitting {cat_dir}: {len(paths)} normal images "
                     f"({n_held} held out for thresholds), {model.config.steps} steps, "
                     f"encoder {model.config.encoder}, device {device}"
                     + (f", scoring by distance to at most {model.config.memory_bank_size} training "
                        "embeddings" if model.config.scoring == "distance" else "")
                     + (" (resuming)" if resuming else ""))
        t0 = time.perf_counter()
        try:
            model.fit(paths, progress=not quiet, checkpoint=resume_path,
                      checkpoint_every=checkpoint_every, resume=resume, keep_checkpoint=True)
        except KeyboardInterrupt as exc:
            ctx = click.get_current_context(silent=True)
            how = ("rerun the same command with --resume to continue"
                   if ctx is not None and "resume" in ctx.params else "rerun to start again")
            code = _interrupt_exit_code(exc)
            by = "" if code == 130 else f" by {_interrupt_name(exc)}"
            if isinstance(exc, TrainingInterrupted):
                raise UserError(f"interrupted{by} after step {exc.step}/{exc.total}; progress saved "
                                f"to {resume_path} - {how}", exit_code=code) from None
            if resume_path.exists():
                raise UserError(f"interrupted{by}; the last saved progress is in {resume_path} - "
                                f"{how}", exit_code=code) from None
            raise UserError(f"interrupted{by} before any progress was saved; rerun the command",
                            exit_code=code) from None
    train_seconds = time.perf_counter() - t0
    record = {
        "pedenet_version": __version__,
        "packages": package_versions(),
        "seed": model.config.seed,
        "data": str(Path(data).resolve()),
        "category": category,
        "category_dir": str(cat_dir.resolve()),
        "plain_folder": plain_folder,  # True: a folder of normal images, nothing to evaluate on
        "device": device,
        # the usable normal images: trained on (n_train_images) or held out for thresholds
        "n_normal_images": len(paths),
        "n_train_images": model.history.get("n_train_images", len(paths)),
        "skipped_files": skipped,
        "warnings": warned,
        "config": model.config.to_dict(),
        # train_seconds: the whole fit (feature caching, training, mixture); fit_stages: the
        # estimator's own stage timings (history["timings"])
        "timings": {"train_seconds": train_seconds,
                    "fit_stages": dict(model.history.get("timings", {}))},
        "n_calibration_images": model.history.get("n_calibration_images", 0),
        "thresholds": model.thresholds(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(run_dir / "config.json", record)
    _write_json(run_dir / "history.json", model.history)
    model.save(model_path)  # last: model.pt marks a complete run
    resume_path.unlink(missing_ok=True)  # only now: the model is safely on disk
    _info(quiet, f"fitted in {train_seconds:.1f} s -> {run_dir}")
    _info(quiet, _thresholds_line(model.thresholds(), model))
    _debug("stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in model.history.get("timings", {}).items()))
    last = {k: v[-1] for k, v in model.history.items() if isinstance(v, list) and v
            and isinstance(v[-1], (int, float))}
    _debug("last training diagnostics: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
    return record


def _parse_blocks(value) -> tuple[int, ...]:
    """``"4,10,14,15"`` → (4, 10, 14, 15), checked like the config (a usage error otherwise)."""
    from ..encoders import check_feature_blocks

    try:
        return check_feature_blocks([v for v in str(value).replace(" ", "").split(",") if v])
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("data", type=NonEmptyPath(path_type=Path))
@click.option("--out", "run_dir", required=True, type=NonEmptyPath(path_type=Path, file_okay=False),
              help="Run folder to write (model.pt, config.json, history.json).")
@click.option("--category", default=None, show_default=True,
              help="Category under DATA when DATA is a dataset root.")
@click.option("--steps", type=click.IntRange(min=0), default=DEFAULTS.steps, show_default=True,
              help="Optimizer steps.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=DEFAULTS.seed, show_default=True, help="Random seed.")
@_device_option
@click.option("--encoder", type=click.Choice(list(ENCODERS)), default=DEFAULTS.encoder,
              show_default=True, help="Patch encoder: frozen pretrained EfficientNet-Lite0 or "
              "a small CNN trained from scratch.")
@click.option("--image-size", type=click.IntRange(min=0), default=DEFAULTS.image_size,
              show_default=True, help="Images are resized to this square side (0 = native size).")
@click.option("--keep-aspect", is_flag=True, default=DEFAULTS.keep_aspect, show_default=True,
              help="Resize the shorter side to --image-size and keep the aspect ratio (no squashing).")
@click.option("--image-score-fraction", type=click.FloatRange(0, 1, max_open=True),
              default=DEFAULTS.image_score_fraction, show_default=True,
              help="Image score = mean of this fraction of the scored pixels (the map less "
              "--image-score-border's band), the largest ones (0: their maximum).")
@click.option("--image-score-border", type=click.FloatRange(0, 0.5, max_open=True),
              default=DEFAULTS.image_score_border, show_default=True,
              help="Leave a band of this fraction of each side at the map's edge out of the image "
              "score (0: none). For images whose normal maps run hot at the edge (MTD: 0.05 "
              "ranked better); a defect only in the band is then missed.")
@click.option("--scoring", type=click.Choice(SCORINGS), default=DEFAULTS.scoring, show_default=True,
              help="How a patch is scored: its energy under the Gaussian mixture (the paper), or "
              "its distance to the nearest of --memory-bank-size training embeddings (better "
              "localization on the test splits of MTD and bottle, ~20x slower per image, a "
              "larger model.pt, no export; compare the two with pedenet validate).")
@click.option("--memory-bank-size", type=click.IntRange(min=1), default=DEFAULTS.memory_bank_size,
              show_default=True, help="At most this many training embeddings are kept for "
              "--scoring distance (an equal share of each training image).")
@click.option("--embedding-dim", type=click.IntRange(min=1), default=DEFAULTS.embedding_dim,
              show_default=True, help="Patch embedding size D.")
@click.option("--n-components", type=click.IntRange(min=1), default=DEFAULTS.n_components,
              show_default=True, help="Gaussian mixture components K.")
@click.option("--feature-blocks", callback=lambda ctx, param, value: _parse_blocks(value),
              default=",".join(str(b) for b in DEFAULTS.feature_blocks), show_default=True,
              help="EfficientNet-Lite0 blocks whose outputs form the pretrained encoder's features, "
              "comma-separated: the first at stride 8 (3 or 4), others in 5-15.")
@click.option("--patch-size", type=click.IntRange(min=1), default=DEFAULTS.patch_size,
              show_default=True, help="Patch side in pixels of the resized image.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size,
              show_default=True, help="Images per optimizer step.")
@click.option("--encoder-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate of the encoder's trainable part [default: --lr for scratch, 1e-4 for pretrained].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr,
              show_default=True, help="Adam learning rate.")
@click.option("--overwrite", is_flag=True, default=False, show_default=True,
              help="Replace a model (or an unfinished run) already in RUN_DIR.")
@click.option("--resume", is_flag=True, default=False, show_default=True,
              help="Continue an interrupted fit from RUN_DIR/resume.pt (same options and images); "
              "starts from step 0 if there is none.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=100, show_default=True,
              help="Save the training state to RUN_DIR/resume.pt every N steps (0: only on "
              "Ctrl-C/SIGTERM/SIGHUP).")
@click.option("--calibration-fraction", type=click.FloatRange(0, 1, max_open=True),
              default=DEFAULTS.calibration_fraction, show_default=True,
              help="Fraction of the normal images held out of training to calibrate the "
              "thresholds (0: no thresholds).")
@click.option("--target-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=DEFAULTS.target_fpr, show_default=True,
              help="Default target false-alarm rate: the fraction of normal images that may be flagged.")
@click.option("--pixel-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=DEFAULTS.pixel_fpr, show_default=True,
              help="Default fraction of normal pixels above the pixel threshold (defect masks).")
@click.option("--skip-bad-files", is_flag=True, default=False, show_default=True,
              help="Leave unreadable or too small images out (with a warning) instead of stopping.")
@click.option("--quiet", is_flag=True, default=False, show_default=True,
              help="No progress bars or messages.")
@_verbose_option
@_user_errors
def fit(data, run_dir, category, steps, seed, device, encoder, image_size, keep_aspect,
        image_score_fraction, image_score_border, scoring, memory_bank_size, embedding_dim, n_components,
        feature_blocks, patch_size, batch_size, encoder_lr, lr, overwrite, resume,
        checkpoint_every, calibration_fraction, target_fpr, pixel_fpr, skip_bad_files, quiet,
        verbose):
    """Train a model on the defect-free images DATA/train/good.

    DATA is a category folder (holding train/ and test/), a dataset root with --category, or
    a plain folder of normal images. --calibration-fraction of them are held out of training
    to calibrate the decision thresholds.
    Every training image is checked before training starts. Ctrl-C, SIGTERM or SIGHUP saves the
    training state to RUN_DIR/resume.pt; rerun with --resume to continue.
    """
    _set_verbose(verbose, quiet)
    config = dict(steps=steps, seed=seed, encoder=encoder, image_size=image_size,
                  keep_aspect=keep_aspect, image_score_fraction=image_score_fraction,
                  image_score_border=image_score_border,
                  scoring=scoring, memory_bank_size=memory_bank_size,
                  embedding_dim=embedding_dim, n_components=n_components,
                  feature_blocks=feature_blocks, patch_size=patch_size, batch_size=batch_size,
                  lr=lr, encoder_lr=encoder_lr,
                  calibration_fraction=calibration_fraction, target_fpr=target_fpr,
                  pixel_fpr=pixel_fpr)
    if resume and overwrite:  # as predict: one keeps the run's work, the other replaces it
        raise UserError("--resume continues an interrupted fit and --overwrite starts over; pass "
                        "one", exit_code=2)
    source = click.get_current_context().get_parameter_source("memory_bank_size")
    if scoring != "distance" and source is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--memory-bank-size applies to --scoring distance only; add "
                               "--scoring distance, or leave --memory-bank-size out")
    try:  # settings that contradict each other: say so before reading any data
        PEDENetConfig(**config)
    except ValueError as exc:
        raise UserError(str(exc), exit_code=2) from None
    _fit_run(data, category, run_dir, device=device, overwrite=overwrite, quiet=quiet, config=config,
             resume=resume, skip_bad_files=skip_bad_files, checkpoint_every=checkpoint_every)


def _images_in_subfolders(folder: Path) -> dict[str, int]:
    """Readable image files under each direct, non-hidden subfolder of ``folder`` that holds
    any (recursively, hidden folders skipped): {subfolder name: count}, sorted by name; empty
    when ``folder`` or one of its subfolders is in the MVTec AD layout."""
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if is_category_dir(folder) or any(is_category_dir(p) for p in subs):
        return {}  # an MVTec AD layout: resolve_category's own message says what is wrong
    counts = {}
    for sub in subs:
        with warnings.catch_warnings():  # unread formats are not the point of this message
            warnings.simplefilter("ignore")
            try:
                n = len(find_images(sub))
            except DataError:  # no readable image under it
                n = 0
        if n:
            counts[sub.name] = n
    return counts


def _has_unread_images(folder: Path) -> bool:
    """Whether ``folder`` directly holds files in an image format pedenet does not read."""
    return any(p.suffix.lower() in UNREAD_IMAGE_EXTENSIONS and p.is_file()
               for p in folder.iterdir())
