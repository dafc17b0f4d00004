"""Command line interface: ``pedenet fit | evaluate | predict | validate | demo``.

Run folder (``RUN_DIR``) written by ``pedenet fit`` and read by the other verbs::

    RUN_DIR/model.pt        the fitted model (PEDENet.save)
    RUN_DIR/resume.pt       training state of an unfinished fit (deleted when the fit ends)
    RUN_DIR/config.json     config, pedenet version, seed, data path, category, timings
    RUN_DIR/history.json    training diagnostics (PEDENet.history)
    RUN_DIR/metrics.json    written by ``pedenet evaluate``
    RUN_DIR/validation.json written by ``pedenet validate``
    RUN_DIR/overlays/<defect>/<stem>.png   written by ``pedenet evaluate --overlays``

User errors (missing or unreadable data, bad checkpoints, existing runs) end with a one-line
``Error: ...`` message and a nonzero exit code, never a traceback. Every input image (and
mask) is checked before any work starts; ``--skip-bad-files`` leaves bad ones out with a
warning. Existing results are never replaced without ``--overwrite``. See docs/conventions.md.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import functools
import heapq
import io
import json
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

# OpenMP threads that busy-wait between parallel regions make torch 10-30x slower whenever
# another process is using a core (measured on 2 cores: 1.9 s vs 0.12 s per 160 px image).
# Passive waiting costs next to nothing on an idle machine. Must be set before torch loads;
# a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402
import numpy as np  # noqa: E402

from . import __version__  # noqa: E402
from .checkpoint import CheckpointError, atomic_write_bytes
from .config import ENCODERS, PEDENetConfig
from .data import (BadFilesError, DataError, Sample, check_images, find_images, list_images,
                   load_image, load_mask, resolve_category, train_samples)

DEFAULTS = PEDENetConfig()
DEMO_STEPS = 300
"""Default ``--steps`` of ``pedenet demo``: sized so that the three built-in categories (fit,
evaluation and overlays) finish in well under 10 minutes on 2 CPU cores."""
DEMO_CATEGORIES = "brick,grass,gravel"
REPORT_GALLERY = 60
"""Images shown in the gallery of an HTML report."""
DEMO_TARGET_FPR = 0.1
"""Target false-alarm rate of ``pedenet demo``: its 60 normal images per category leave 12 for
calibration, which can guarantee at best 1/13 ≈ 0.077 (the library default 0.01 needs 99)."""


# --------------------------------------------------------------------------- helpers


class UserError(click.ClickException):
    """A one-line ``Error: ...`` message with a chosen exit code (default 1)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    msg = " ".join(lines)
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in msg:
        msg = f"{exc.filename}: {msg}"
    if isinstance(exc, FileNotFoundError) and "check" not in msg:
        msg += "; check the path"
    return msg


def _user_errors(fn):
    """Turn expected user-input errors into one-line click errors (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except BadFilesError as exc:
            msg = _one_line(exc)
            ctx = click.get_current_context(silent=True)
            if ctx is not None and "skip_bad_files" in ctx.params and not ctx.params["skip_bad_files"]:
                msg += " (or pass --skip-bad-files to leave bad files out)"
            raise UserError(msg) from None
        except (DataError, CheckpointError, FileNotFoundError, FileExistsError, ValueError,
                OSError) as exc:
            raise UserError(_one_line(exc)) from None
        except FloatingPointError as exc:
            raise UserError(_one_line(exc)) from None
        except MemoryError:
            raise UserError("out of memory; use a smaller --image-size or --batch-size, or "
                            "smaller images") from None

    return wrapper


@contextlib.contextmanager
def _short_warnings():
    """Show warnings as one ``Warning: ...`` line on stderr while a command runs."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        click.echo(f"Warning: {text}", err=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


@contextlib.contextmanager
def _recorded_warnings(log: list[str], quiet: bool):
    """Append the text of each warning shown meanwhile to ``log`` (one line each); print it
    as usual (``Warning: ...``) unless ``quiet``. Warnings Python's filters hide are not seen;
    one shown by an earlier block (an earlier fit of ``pedenet demo``) is seen again."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        log.append(" ".join(str(message).split()))
        if not quiet:
            previous(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning; resets the "shown once" registries
        warnings.showwarning = show
        yield


def _info(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


_VERBOSE = {"on": False}


def _set_verbose(verbose: bool, quiet: bool) -> None:
    """--verbose: details (settings, timings, thresholds, per-image scores) on stderr."""
    if verbose and quiet:
        raise UserError("--verbose and --quiet contradict each other; pass one", exit_code=2)
    _VERBOSE["on"] = bool(verbose)


def _debug(message: str) -> None:
    if _VERBOSE["on"]:
        click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def _verbose_option(fn):
    return click.option("--verbose", is_flag=True, default=False, show_default=True,
                        help="Print details: settings, stage timings, thresholds, per-image scores.")(fn)


def _rate_options(fn):
    """--fpr and --pixel-fpr: targets of the decisions, overriding the model's."""
    rate = click.FloatRange(0, 1, min_open=True, max_open=True)
    fn = click.option("--pixel-fpr", type=rate, default=None,
                      help="Fraction of normal pixels above the pixel threshold [default: the model's].")(fn)
    return click.option("--fpr", type=rate, default=None,
                        help="Target false-alarm rate of the decisions [default: the one the model "
                        "was fitted with].")(fn)


def _thresholds_line(th: dict | None) -> str:
    if not th:
        return "no thresholds (fitted with --calibration-fraction 0): scores only"
    line = (f"thresholds from {th['n_calibration']} held-out normal images: target false-alarm rate "
            f"{th['target_fpr']:g} -> image threshold {th['image_threshold']:.4g}; "
            f"pixel threshold {th['pixel_threshold']:.4g} (about {th['pixel_fpr']:g} of normal pixels above)")
    if th["guaranteed_fpr"] > th["target_fpr"]:
        line += f" (guaranteed only {th['guaranteed_fpr']:.3g}: too few held-out images)"
    return line


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


def _write_json(path: Path, obj) -> None:
    from .evaluation import to_jsonable

    _write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({_one_line(exc)}); fix or delete the file") from None


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu")


def _model_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    path = run_dir / "model.pt"
    if not run_dir.exists():
        raise UserError(f"{run_dir}: run folder does not exist; run `pedenet fit DATA --out {run_dir}` first")
    if not path.is_file():
        if not _is_run_dir(run_dir):
            raise UserError(f"{run_dir}: not a pedenet run folder (no model.pt); pass the folder "
                            "written by `pedenet fit DATA --out RUN_DIR`, or its model.pt")
        raise UserError(f"{path}: no model in this run folder; run `pedenet fit DATA --out {run_dir}` first")
    return path


def _load_model(run_dir: Path, device: str):
    from .estimator import PEDENet

    _check_device(device)
    return PEDENet.load(_model_path(run_dir), device=device)


def _unique_names(paths: list[Path]) -> list[str]:
    """Output names for ``paths``: the file stem; stems that occur more than once get
    ``_<k>`` (k = 1, 2, ... in input order), skipping names that are already taken."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    taken = {s for s, c in counts.items() if c == 1}
    names = []
    next_k: dict[str, int] = {}
    for p in paths:
        stem = p.stem
        if counts[stem] == 1:
            names.append(stem)
            continue
        k = next_k.get(stem, 1)
        while f"{stem}_{k}" in taken:
            k += 1
        name = f"{stem}_{k}"
        next_k[stem] = k + 1
        taken.add(name)
        names.append(name)
    return names


def _progress(items, quiet: bool, desc: str, unit: str = "img", total: int | None = None):
    from .progress import progress_bar

    return progress_bar(items, desc=desc, unit=unit, disable=quiet, total=total)


def _checked(paths: list[Path], *, min_side: int, skip_bad_files: bool, quiet: bool,
             desc: str) -> list[Path]:
    """Decode every image before any work starts (see pedenet.data.check_images)."""
    keep = check_images(paths, min_side=min_side, skip_bad=skip_bad_files, progress=not quiet,
                        desc=desc)
    return [paths[i] for i in keep]


RUN_FILES = ("model.pt", "resume.pt", "config.json", "history.json")


def _is_run_dir(run_dir: Path) -> bool:
    """A folder holding a pedenet run: model.pt, resume.pt, pedenet's config.json, or a
    temporary file left by an interrupted atomic write of one of them."""
    if (run_dir / "model.pt").exists() or (run_dir / "resume.pt").exists():
        return True
    if any(p.name.startswith(tuple(f".{n}." for n in RUN_FILES)) and p.name.endswith(".tmp")
           for p in run_dir.iterdir()):
        return True
    cfg = run_dir / "config.json"
    try:
        return "pedenet_version" in json.loads(cfg.read_text())
    except (OSError, ValueError, TypeError):
        return False


def _check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to replace anything in ``run_dir`` unless asked (--overwrite / --resume)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder; choose another --out", exit_code=2)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not _is_run_dir(run_dir):
        raise UserError(f"{run_dir}: folder is not empty and holds no pedenet run; choose a new "
                        "or empty --out folder", exit_code=2)
    model_path, resume_path = run_dir / "model.pt", run_dir / "resume.pt"
    if model_path.exists() and not overwrite:
        done = " (the run is complete; nothing to resume)" if resume else ""
        raise UserError(f"{model_path}: a model already exists{done}; pass --overwrite to replace it "
                        "or choose another --out", exit_code=2)
    if resume_path.exists() and not (resume or overwrite):
        from .resume import resume_step

        step = resume_step(resume_path)
        at = f" at step {step}" if step is not None else ""
        raise UserError(f"{resume_path}: an unfinished fit was interrupted{at}; pass --resume to "
                        "continue it, or --overwrite to start over", exit_code=2)
    if not (model_path.exists() or resume_path.exists()) and not (overwrite or resume):
        raise UserError(f"{run_dir}: holds an incomplete run (no model.pt); pass --overwrite to "
                        "replace it or choose another --out", exit_code=2)


# --------------------------------------------------------------------------- shared steps


def _fit_run(data: Path, category: str | None, run_dir: Path, *, device: str, overwrite: bool,
             quiet: bool, config: dict, resume: bool = False, skip_bad_files: bool = False,
             checkpoint_every: int = 100) -> dict:
    """Fit a model on ``data``'s training images and write the run folder; return config.json.

    Training state goes to RUN_DIR/resume.pt every ``checkpoint_every`` steps and on
    SIGINT/SIGTERM; ``resume`` continues from it. It is deleted once model.pt is written.
    Warnings (skipped files, thresholds that cannot be guaranteed) go to config.json
    ("warnings") and, unless ``quiet``, to stderr: with ``quiet`` only errors are printed.
    """
    import torch

    from .calibration import split_calibration
    from .estimator import PEDENet
    from .resume import TrainingInterrupted

    run_dir = Path(run_dir)
    model_path = run_dir / "model.pt"
    resume_path = run_dir / "resume.pt"
    _check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    _check_device(device)
    warned: list[str] = []  # the fit's warnings: config.json "warnings"; printed unless quiet
    with _recorded_warnings(warned, quiet):
        try:
            cat_dir = resolve_category(data, category)
            samples = train_samples(cat_dir)
        except DataError:
            # a plain folder of normal images (no MVTec layout yet: nothing defective collected)
            if category is not None or not Path(data).is_dir() or not list_images(data):
                raise
            cat_dir = Path(data)
            samples = [Sample(p, 0, "good", None) for p in list_images(data)]
        model = PEDENet(device=device, **config)
        all_paths = [s.path for s in samples]
        paths = _checked(all_paths, min_side=model.min_image_side, skip_bad_files=skip_bad_files,
                         quiet=quiet, desc="checking training images")
        kept = set(paths)
        skipped = [str(p) for p in all_paths if p not in kept]
        resuming = resume and resume_path.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:  # results of the previous model would be stale
            (run_dir / "metrics.json").unlink(missing_ok=True)
            (run_dir / "validation.json").unlink(missing_ok=True)
            (run_dir / "report.html").unlink(missing_ok=True)
            shutil.rmtree(run_dir / "overlays", ignore_errors=True)
            if not resuming:
                resume_path.unlink(missing_ok=True)
        if resume and not resuming:
            _info(quiet, f"--resume: no {resume_path}; starting from step 0")
        _debug(f"config: {json.dumps(model.config.to_dict())}")
        _debug(f"torch threads: {torch.get_num_threads()}, "
               f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
        n_held = len(split_calibration(len(paths), model.config.calibration_fraction,
                                       model.config.seed)[1])
        _info(quiet, f"fitting {cat_dir}: {len(paths)} normal images "
                     f"({n_held} held out for thresholds), {model.config.steps} steps, "
                     f"encoder {model.config.encoder}, device {device}"
                     + (" (resuming)" if resuming else ""))
        t0 = time.perf_counter()
        try:
            model.fit(paths, progress=not quiet, checkpoint=resume_path,
                      checkpoint_every=checkpoint_every, resume=resume, keep_checkpoint=True)
        except KeyboardInterrupt as exc:
            ctx = click.get_current_context(silent=True)
            how = ("rerun the same command with --resume to continue"
                   if ctx is not None and "resume" in ctx.params else "rerun to start again")
            if isinstance(exc, TrainingInterrupted):
                code = 143 if exc.signum == getattr(signal, "SIGTERM", None) else 130
                raise UserError(f"interrupted after step {exc.step}/{exc.total}; progress saved to "
                                f"{resume_path} - {how}", exit_code=code) from None
            if resume_path.exists():
                raise UserError(f"interrupted; the last saved progress is in {resume_path} - {how}",
                                exit_code=130) from None
            raise UserError("interrupted before any progress was saved; rerun the command",
                            exit_code=130) from None
    train_seconds = time.perf_counter() - t0
    record = {
        "pedenet_version": __version__,
        "seed": model.config.seed,
        "data": str(Path(data).resolve()),
        "category": category,
        "category_dir": str(cat_dir.resolve()),
        "device": device,
        "n_train_images": len(paths),
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
    _info(quiet, _thresholds_line(model.thresholds()))
    _debug("stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in model.history.get("timings", {}).items()))
    last = {k: v[-1] for k, v in model.history.items() if isinstance(v, list) and v
            and isinstance(v[-1], (int, float))}
    _debug("last training diagnostics: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
    return record


def _resolve_eval_data(run_dir: Path, data: Path | None, category: str | None) -> Path:
    cfg_path = Path(run_dir) / "config.json"
    recorded: dict = {}
    if cfg_path.is_file():
        recorded = _read_json(cfg_path)
    if data is None:
        if not recorded.get("category_dir") and not recorded.get("data"):
            raise UserError(f"{cfg_path}: not found or records no data; pass --data DATA "
                            "(a category folder or dataset root)")
        if category is None and recorded.get("category_dir"):
            return resolve_category(recorded["category_dir"])
        return resolve_category(recorded.get("data") or recorded["category_dir"],
                                category if category is not None else recorded.get("category"))
    if category is not None:
        return resolve_category(data, category)
    try:
        return resolve_category(data)
    except DataError:
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
    """
    from .evaluation import evaluate
    from .visualization import color_range, heatmap_overlay, save_png

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
    cat_dir = _resolve_eval_data(run_dir, data, category)
    _debug(f"model {model_path}; test data {cat_dir}; device {device}")
    _debug(_thresholds_line(model.thresholds(fpr, pixel_fpr)))
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
              **result}
    _write_json(run_dir / "metrics.json", record)
    if overlays:
        out_root = run_dir / "overlays"
        by_defect: dict[str, list[int]] = {}
        for i, entry in enumerate(result["images"]):
            by_defect.setdefault(entry["defect"], []).append(i)
        names: dict[int, str] = {}
        for idx in by_defect.values():
            for i, n in zip(idx, _unique_names([Path(result["images"][i]["path"]) for i in idx])):
                names[i] = n
        for i in _progress(range(len(maps)), quiet, "overlays"):
            entry = result["images"][i]
            amap = maps[i]
            image = load_image(entry["path"])
            mask = load_mask(entry["mask"], expected_shape=amap.shape) if entry["mask"] else None
            vmin, vmax = color_range(model, amap)
            save_png(out_root / entry["defect"] / f"{names[i]}.png",
                     heatmap_overlay(image, amap, vmin, vmax, mask=mask))
        _info(quiet, f"overlays -> {out_root}")
    if report:
        from .report import write_evaluation_report

        path = write_evaluation_report(run_dir / "report.html", result, maps,
                                       color_range=color_range(model),
                                       title=f"pedenet evaluation: {Path(result['category']).name}")
        _info(quiet, f"report -> {path}")
    return record


# --------------------------------------------------------------------------- commands


def _parse_blocks(value) -> tuple[int, ...]:
    """``"4,10,14,15"`` → (4, 10, 14, 15), checked like the config (a usage error otherwise)."""
    from .encoders import check_feature_blocks

    try:
        return check_feature_blocks([v for v in str(value).replace(" ", "").split(",") if v])
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="pedenet")
@click.pass_context
def main(ctx: click.Context) -> None:
    """PEDENet: unsupervised image anomaly localization.

    Train on defect-free images (MVTec AD folder layout), then evaluate on the test split or
    predict anomaly maps for new images. Start with `pedenet demo`.
    """
    ctx.with_resource(_short_warnings())


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Run folder to write (model.pt, config.json, history.json).")
@click.option("--category", default=None, show_default=True,
              help="Category under DATA when DATA is a dataset root.")
@click.option("--steps", type=click.IntRange(min=0), default=DEFAULTS.steps, show_default=True,
              help="Optimizer steps.")
@click.option("--seed", type=click.IntRange(min=0), default=DEFAULTS.seed, show_default=True, help="Random seed.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--encoder", type=click.Choice(list(ENCODERS)), default=DEFAULTS.encoder,
              show_default=True, help="Patch encoder: frozen pretrained EfficientNet-Lite0 or "
              "a small CNN trained from scratch.")
@click.option("--image-size", type=click.IntRange(min=0), default=DEFAULTS.image_size,
              show_default=True, help="Images are resized to this square side (0 = native size).")
@click.option("--keep-aspect", is_flag=True, default=DEFAULTS.keep_aspect, show_default=True,
              help="Resize the shorter side to --image-size and keep the aspect ratio (no squashing).")
@click.option("--image-score-fraction", type=click.FloatRange(0, 1, max_open=True),
              default=DEFAULTS.image_score_fraction, show_default=True,
              help="Image score = mean of this fraction of the map's largest pixels (0: the map's maximum).")
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
              "Ctrl-C/SIGTERM).")
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
        image_score_fraction, embedding_dim, n_components, feature_blocks, patch_size, batch_size,
        encoder_lr, lr, overwrite, resume, checkpoint_every, calibration_fraction, target_fpr,
        pixel_fpr, skip_bad_files, quiet, verbose):
    """Train a model on the defect-free images DATA/train/good.

    DATA is a category folder (holding train/ and test/), a dataset root with --category, or
    a plain folder of normal images. --calibration-fraction of them are held out of training
    to calibrate the decision thresholds.
    Every training image is checked before training starts. Ctrl-C or SIGTERM saves the
    training state to RUN_DIR/resume.pt; rerun with --resume to continue.
    """
    _set_verbose(verbose, quiet)
    config = dict(steps=steps, seed=seed, encoder=encoder, image_size=image_size,
                  keep_aspect=keep_aspect, image_score_fraction=image_score_fraction,
                  embedding_dim=embedding_dim, n_components=n_components,
                  feature_blocks=feature_blocks, patch_size=patch_size, batch_size=batch_size,
                  lr=lr, encoder_lr=encoder_lr,
                  calibration_fraction=calibration_fraction, target_fpr=target_fpr,
                  pixel_fpr=pixel_fpr)
    try:  # settings that contradict each other: say so before reading any data
        PEDENetConfig(**config)
    except ValueError as exc:
        raise UserError(str(exc), exit_code=2) from None
    _fit_run(data, category, run_dir, device=device, overwrite=overwrite, quiet=quiet, config=config,
             resume=resume, skip_bad_files=skip_bad_files, checkpoint_every=checkpoint_every)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None, show_default=True,
              help="Category folder or dataset root; default: the data recorded in "
              "RUN_DIR/config.json.")
@click.option("--category", default=None, show_default=True,
              help="Category under --data when it is a dataset root.")
@click.option("--overlays/--no-overlays", default=True, show_default=True,
              help="Write heatmap overlays to RUN_DIR/overlays/<defect>/<stem>.png.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
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
              help="No progress bars or messages (the table is still printed).")
@_verbose_option
@_user_errors
def evaluate(run_dir, data, category, overlays, device, overwrite, skip_bad_files, fpr, pixel_fpr,
             report, quiet, verbose):
    """Evaluate RUN_DIR's model on the test split; write RUN_DIR/metrics.json.

    Every test image and mask is checked first. Undefined metrics (e.g. no defective test
    images) are shown as n/a and stored as null. For a model with thresholds, the realized
    false-alarm and miss rates of its decisions are reported next to the target.
    """
    from .evaluation import format_table

    _set_verbose(verbose, quiet)
    result = _evaluate_run(run_dir, data, category, overlays=overlays, device=device, quiet=quiet,
                           overwrite=overwrite, skip_bad_files=skip_bad_files, fpr=fpr,
                           pixel_fpr=pixel_fpr, report=report)
    click.echo(f"{result['category']}  ({result['n_images']} test images, "
               f"{result['seconds_per_image']:.3f} s/image)")
    click.echo(format_table(result), nl=False)


@main.command()
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
              "region (which normal pattern it resembles), legend strip at the bottom.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, default=False, show_default=True,
              help="Write into an --out folder that is not empty: the files of an earlier "
              "prediction there (those its scores.csv lists) are replaced or removed; other "
              "files are kept.")
@click.option("--skip-bad-files", is_flag=True, default=False, show_default=True,
              help="Leave unreadable or too small images out (with a warning) instead of stopping.")
@click.option("--quiet", is_flag=True, default=False, show_default=True,
              help="No progress bars or messages.")
@_verbose_option
@_user_errors
def predict(run_dir, inputs, out_dir, fmt, fpr, pixel_fpr, report, clusters, device, overwrite,
            skip_bad_files, quiet, verbose):
    """Anomaly maps, overlays, scores and decisions for image files or folders INPUT...

    Folders are searched recursively (the --out folder excluded). Every image is checked
    first. Images sharing a file stem get _1, _2, ... suffixes (input order). scores.csv
    lists path, score (the image score: mean of the map's top --image-score-fraction of
    pixels, energy units), p_value, anomalous (the decision at the target false-alarm rate)
    and the output name; <stem>_mask.png (0/255) marks the
    pixels above the pixel threshold in images decided anomalous. A model fitted with
    --calibration-fraction 0 gives scores only.
    """
    from .outputs import SCORES_COLUMNS, earlier_prediction_files
    from .visualization import cluster_overlay, color_range, heatmap_overlay, save_png

    _set_verbose(verbose, quiet)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose another --out", exit_code=2)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: output folder is not empty; pass --overwrite to write into it "
                        "or choose another --out", exit_code=2)
    earlier = earlier_prediction_files(out_dir) if out_dir.is_dir() else []
    out_resolved = out_dir.resolve()
    images = [p for p in find_images(list(inputs))
              if out_resolved not in p.resolve().parents]  # never read our own outputs
    if not images:
        raise UserError(f"{out_dir}: all inputs lie inside the --out folder; choose another --out")
    model = _load_model(run_dir, device)
    images = _checked(images, min_side=model.min_image_side, skip_bad_files=skip_bad_files,
                      quiet=quiet, desc="checking images")
    names = _unique_names(images)
    cal = model.calibration
    th = None
    if cal is not None:
        if fpr is not None:
            cal.image_threshold(fpr)  # warns when the target is out of reach
        th = model.thresholds(fpr, pixel_fpr)
    _info(quiet, _thresholds_line(th))
    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = color_range(model)
    _debug(f"model {_model_path(run_dir)}; {len(images)} images; device {device}; "
           f"overlay colour range {vmin} to {vmax} (energy)")
    t_start = time.perf_counter()
    rows, kept_maps, top = [], [], []
    loaded: dict[int, np.ndarray] = {}  # decoded once: for the model and for the overlay
    written: set[Path] = set()  # every file this run writes (the earlier run's others go)

    def output(filename: str) -> Path:
        written.add(out_dir / filename)
        return out_dir / filename

    def decoded():  # runs in iter_predict's reader thread, at most 2 × batch ahead
        for i, path in enumerate(images):
            loaded[i] = load_image(path)
            yield loaded[i]

    results = model.iter_predict(decoded())
    for i, amap, score in _progress(results, quiet, "predicting", total=len(images)):
        path, name = images[i], names[i]
        image = loaded.pop(i)
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
        rows.append(row)
        if report:  # keep only the maps the gallery can show: memory stays bounded
            kept_maps.append(None)
            heapq.heappush(top, (float(score), -i, i))
            kept_maps[i] = amap
            if len(top) > REPORT_GALLERY:
                kept_maps[heapq.heappop(top)[2]] = None
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(SCORES_COLUMNS)
    for r in rows:
        writer.writerow([r["path"], repr(r["score"]),
                         "" if r["p_value"] is None else repr(r["p_value"]),
                         "" if r["anomalous"] is None else int(r["anomalous"]), r["name"]])
    _write_text(output("scores.csv"), text.getvalue())
    if report:
        from .report import write_prediction_report

        path = write_prediction_report(output("report.html"), rows, kept_maps,
                                       color_range=(vmin, vmax), thresholds=th,
                                       max_gallery=REPORT_GALLERY,
                                       reference_scores=cal.scores if cal is not None else None)
        _info(quiet, f"report -> {path}")
    stale = [f for f in earlier if f not in written]  # the earlier run's, not replaced: remove
    for f in stale:
        f.unlink(missing_ok=True)
    if stale:
        _debug(f"removed {len(stale)} file(s) of the earlier prediction in {out_dir}")
    _debug(f"{len(rows)} images in {time.perf_counter() - t_start:.1f} s (reading, scoring and writing)")
    flagged = sum(bool(r["anomalous"]) for r in rows)
    _info(quiet, f"{len(rows)} image(s) -> {out_dir} (scores.csv, *_overlay.png, *_map.{fmt}"
                 + (", *_mask.png" if th is not None else "") + ")"
                 + (f"; {flagged} flagged anomalous" if th is not None else ""))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the synthetic defects (keep it fixed to compare runs).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, default=False, show_default=True,
              help="Replace an earlier RUN_DIR/validation.json.")
@click.option("--skip-bad-files", is_flag=True, default=False, show_default=True,
              help="Leave missing, unreadable or too small held-out images out (with a warning) "
              "instead of stopping.")
@click.option("--quiet", is_flag=True, default=False, show_default=True,
              help="No progress bars or messages (the result is still printed).")
@_verbose_option
@_user_errors
def validate(run_dir, seed, device, overwrite, skip_bad_files, quiet, verbose):
    """Validation score of RUN_DIR's model, for choosing settings without the test split.

    Scores the normal images that fit held out of training (--calibration-fraction) and a
    copy of each carrying one synthetic defect (scratch, spot or foreign patch, exact masks).
    Compare runs of the same data by these figures; keep the test split for the final report.
    Writes RUN_DIR/validation.json (with the count of each defect kind and any skipped files).
    """
    from .validation import validate as _validate

    _set_verbose(verbose, quiet)
    model_path = _model_path(run_dir)
    model = _load_model(model_path, device)
    out = model_path.parent / "validation.json"
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it", exit_code=2)
    held = model.history.get("calibration_images") or []
    if not held:
        raise UserError(f"{run_dir}: the model holds out no normal images (fitted with "
                        "--calibration-fraction 0); refit with --calibration-fraction 0.2 to validate")
    unnamed = [h for h in held if h.startswith("<input")]
    if unnamed:
        raise UserError(f"{run_dir}: the held-out images were passed as arrays, not files, so they "
                        "cannot be reloaded; use pedenet.validation.validate(model, images) in Python")
    paths = _held_out_images([Path(h) for h in held], model.min_image_side,
                             skip_bad_files=skip_bad_files, quiet=quiet)
    t0 = time.perf_counter()
    result = _validate(model, paths, seed=seed, progress=not quiet)
    used = set(paths)
    result.update(seed=seed, seconds=time.perf_counter() - t0,
                  skipped_files=[h for h in held if Path(h) not in used])
    _write_json(out, result)
    _debug("synthetic defects: " + ", ".join(f"{n} {k}" for k, n in result["defect_kinds"].items()))
    click.echo(f"validation ({len(paths)} held-out normal images + {len(paths)} synthetic-defect "
               f"copies, seed {seed}): image AUROC {result['image_auroc']:.3f}, pixel AUROC "
               f"{result['pixel_auroc']:.3f}, AU-PRO@0.3 {result['au_pro_0.3']:.3f}")
    _info(quiet, f"-> {out}")


def _held_out_images(held: list[Path], min_side: int, *, skip_bad_files: bool,
                     quiet: bool) -> list[Path]:
    """The held-out images validate can use: present, readable, both sides >= MIN_SIDE.

    A bad one stops validate with an error suggesting --skip-bad-files (the held-out set is
    fixed at fit time: removing the file does not take it out); with ``skip_bad_files`` it is
    left out with a ``skipped: ...`` warning naming it. Raises UserError/BadFilesError.
    """
    from PIL import Image

    from .data import SkippedFileWarning
    from .validation import MIN_SIDE

    missing = [h for h in held if not h.is_file()]
    if missing and not skip_bad_files:
        where = ("the path is relative to the folder `fit` ran in: run validate from there"
                 if not missing[0].is_absolute() else "moved or deleted since fit")
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
    from .evaluation import _fmt

    lines = []
    for cat, res in results.items():
        real = res.get("realized")
        if real:
            lines.append(f"{cat}: false alarms {_fmt(real.get('false_alarm_rate'))} of {real['n_normal']} "
                         f"normal images, misses {_fmt(real.get('miss_rate'))} of "
                         f"{real['n_anomalous']} anomalous images")
    if lines:
        lines.insert(0, f"decisions at target false-alarm rate {target_fpr:g} (test split):")
    return lines


def _markdown(rows: list[tuple[str, dict]]) -> str:
    from .evaluation import TABLE_COLUMNS, _fmt

    head = ["category"] + [c for c, _ in TABLE_COLUMNS] + ["n images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows:
        cells = [name] + [_fmt(m.get(k)) for _, k in TABLE_COLUMNS] + [str(m.get("n_images", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("runs/demo"), show_default=True,
              help="Output folder: one run folder per category, summary.json, summary.md.")
@click.option("--steps", type=click.IntRange(min=1), default=DEMO_STEPS, show_default=True,
              help="Optimizer steps per category.")
@click.option("--categories", default=DEMO_CATEGORIES, show_default=True,
              help="Comma-separated built-in categories (brick, grass, gravel).")
@click.option("--seed", type=click.IntRange(min=0), default=DEFAULTS.seed, show_default=True, help="Random seed.")
@click.option("--target-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=DEMO_TARGET_FPR, show_default=True,
              help="Target false-alarm rate of the decisions (12 held-out normal images per "
              "category guarantee at best 1/13).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
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
    from .builtin import TEXTURES, builtin_dataset_root, make_builtin_dataset
    from .evaluation import format_table, table_lines

    cats = [c.strip() for c in categories.split(",") if c.strip()]
    unknown = [c for c in cats if c not in TEXTURES]
    if not cats or unknown:
        raise UserError(f"--categories: unknown {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(TEXTURES)}", exit_code=2)
    out_dir = Path(out_dir)
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
          + _markdown(rows)
          + ("\n" + "\n".join(f"- {line}" if i else line for i, line in enumerate(decisions)) + "\n"
             if decisions else "")
          + f"\nTotal time: {total:.0f} s. Per-category runs (model, metrics, overlays): "
          + ", ".join(f"`{cat}/`" for cat in cats) + ".\n")
    _write_text(out_dir / "summary.md", md)
    click.echo("\n".join(table_lines(rows, first="category")))
    if decisions:
        click.echo("\n".join(decisions))
    click.echo(f"total {total:.0f} s; summary: {out_dir / 'summary.md'}, {out_dir / 'summary.json'}")


# `pedenet export` and `pedenet benchmark` (pedenet/cli_perf.py)
from .cli_perf import register as _register_perf_commands  # noqa: E402

_register_perf_commands(main)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
