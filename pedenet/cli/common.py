"""Helpers shared by the ``pedenet`` commands: errors, warnings, messages, options, files.

User errors end with a one-line ``Error: ...`` message and a nonzero exit code, never a
traceback (:func:`_user_errors`); run folders are checked before anything is replaced
(:func:`_check_run_dir`). See docs/conventions.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import click

from ..checkpoint import CheckpointError, atomic_write_bytes
from ..config import PEDENetConfig
from ..data import BadFilesError, DataError, check_images

DEFAULTS = PEDENetConfig()


class UserError(click.ClickException):
    """A one-line ``Error: ...`` message with a chosen exit code: 1 (the default) for the
    content of files or the environment, 2 for a wrong command line or a refusal to replace
    outputs, 128+N for signal N (docs/conventions.md, "Exit codes")."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class NonEmptyPath(click.Path):
    """``click.Path`` that refuses an empty string (exit code 2): an unset shell variable
    (``"$DIR"``) would otherwise mean the current folder, to read or to write into."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty (an unset shell variable?); give a path, or . for the current "
                      "folder", param, ctx)
        return super().convert(value, param, ctx)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    msg = " ".join(lines)
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in msg:
        msg = f"{exc.filename}: {msg}"
    if isinstance(exc, FileNotFoundError) and "check" not in msg:
        msg += "; check the path"
    return msg


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler, ``timeout``, ``docker stop``, a closed terminal) turned
    into an interruption, so that a command stops as on Ctrl-C, keeping its finished work.

    Attributes: ``signum`` (the signal's number).
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP), the shell's
    convention."""
    return 128 + int(getattr(exc, "signum", None) or signal.SIGINT)


def _interrupt_name(exc: KeyboardInterrupt) -> str:
    """"Ctrl-C" or the signal's name ("SIGTERM")."""
    signum = getattr(exc, "signum", None)
    return "Ctrl-C" if signum in (None, signal.SIGINT) else signal.Signals(signum).name


@contextlib.contextmanager
def _termination_as_interrupt():
    """While the block runs (in the main thread), SIGTERM and SIGHUP raise :class:`Terminated`
    where the program is, as Ctrl-C raises KeyboardInterrupt; the previous handlers are put back
    on exit. SIGHUP stays ignored where the process ignores it (under ``nohup``). Elsewhere than
    in the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    from ..resume import stop_signals

    previous = {s: signal.signal(s, handler) for s in stop_signals() if s != signal.SIGINT}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _out_of_memory(exc: RuntimeError) -> bool:
    """Whether torch raised ``exc`` for want of memory (torch.cuda.OutOfMemoryError, or the CPU
    allocator's "can't allocate memory")."""
    text = str(exc)
    return (type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower()
            or "can't allocate memory" in text)


def _user_errors(fn):
    """Turn expected user-input errors into one-line click errors (no traceback); SIGTERM and
    SIGHUP interrupt the command as Ctrl-C does (:class:`Terminated`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _termination_as_interrupt():
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
        except RuntimeError as exc:  # torch's: CUDA out of memory, or a failed CPU allocation
            if not _out_of_memory(exc):
                raise
            where = " on the GPU" if type(exc).__name__ == "OutOfMemoryError" else ""
            raise UserError(f"out of memory{where}; use a smaller --image-size or --batch-size, or "
                            "smaller images") from None
        except KeyboardInterrupt as exc:  # where a command has no more specific message
            raise UserError(f"interrupted ({_interrupt_name(exc)})",
                            exit_code=_interrupt_exit_code(exc)) from None

    return wrapper


@contextlib.contextmanager
def _short_warnings(log: list[str] | None = None, quiet: bool = False):
    """While the block runs, show each warning as one ``Warning: ...`` line on stderr (none
    if ``quiet``) and, given ``log``, append its text (one line) to it.

    The ``main`` group wraps every command in one (printing only); a command that records its
    warnings (fit's config.json, evaluate's metrics.json, predict's warnings.txt) opens another.
    A text already shown by this block is not shown (or logged) again. Warnings Python's
    filters hide are not seen; entering resets the "shown once" registries,
    so one shown by an earlier block (an earlier fit of ``pedenet demo``) is seen again. The
    previous display and filters are restored on exit.
    """

    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        if text in seen:  # e.g. an image's warning from the check and again from the work
            return
        seen.add(text)
        if log is not None:
            log.append(text)
        if not quiet:  # through tqdm: printed above a running progress bar, not glued to it
            from tqdm import tqdm

            tqdm.write(f"Warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
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
    if _VERBOSE["on"]:  # through tqdm: a line printed while a progress bar runs goes above it
        from tqdm import tqdm

        tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


_device_option = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
                              show_default=True)
"""``--device``: where the model runs (``_check_device`` refuses cuda without a GPU)."""


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


def _thresholds_line(th: dict | None, model) -> str:
    if not th:
        return f"no thresholds ({model.no_calibration_reason()}): scores only"
    line = (f"thresholds from {th['n_calibration']} held-out normal images: target false-alarm rate "
            f"{th['target_fpr']:g} -> image threshold {th['image_threshold']:.4g}; "
            f"pixel threshold {th['pixel_threshold']:.4g} (about {th['pixel_fpr']:g} of normal pixels above)")
    if th["guaranteed_fpr"] > th["target_fpr"]:
        line += f" (guaranteed only {th['guaranteed_fpr']:.3g}: too few held-out images)"
    return line


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


def _write_json(path: Path, obj) -> None:
    from ..evaluation import to_jsonable

    _write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


# the fields of a run record (config.json) that commands read, and their JSON types
RUN_RECORD_FIELDS = {"data": str, "category_dir": str, "category": (str, type(None)),
                     "plain_folder": bool, "skipped_files": list, "warnings": list, "timings": dict}


def _read_json(path: Path) -> dict:
    """A run's config.json (the record `fit` wrote: where its data is), parsed and checked
    for the types of :data:`RUN_RECORD_FIELDS` that it holds. Raises FileNotFoundError, or
    UserError when it cannot be read or parsed or is not such a record."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({_one_line(exc)}); it is the run record `fit` "
                        "wrote: restore it, or refit") from None
    wrong = ([k for k, kind in RUN_RECORD_FIELDS.items() if k in record and not isinstance(record[k], kind)]
             if isinstance(record, dict) else ["the whole file (not a JSON object)"])
    if wrong:
        raise UserError(f"{path}: not a pedenet run record as `fit` writes it (wrong: "
                        f"{', '.join(wrong)}); restore it, or refit")
    return record


def _recorded_category(record: dict) -> str | None:
    """The category name of the run record ``record`` (config.json): the one recorded, else
    the name of the category folder fit read; None for a plain folder of normal images."""
    if record.get("plain_folder"):
        return None
    folder = record.get("category_dir")
    return record.get("category") or (Path(folder).name if folder else None)


def _data_moved_to(data: Path, category: str | None) -> Path:
    """The category folder under ``data``, the --data of a verb whose data has moved since
    fit: ``data`` itself, or ``data/<category>`` when ``data`` is the dataset root holding
    it. Raises UserError (exit code 2) when ``data`` is not a folder."""
    folder = Path(data)
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{data}: {what}; pass the folder the data now lies in", exit_code=2)
    if category and not (folder / "train").is_dir() and (folder / category).is_dir():
        folder = folder / category  # the dataset root was given
    return folder


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu")


def _at_step(resume_path: Path) -> str:
    """`` at step N`` for the interrupted fit saved in ``resume_path``, or "" if unreadable."""
    from ..resume import resume_step

    step = resume_step(resume_path)
    return f" at step {step}" if step is not None else ""


def _model_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    path = run_dir / "model.pt"
    if not run_dir.exists():  # a RUN_DIR argument that does not exist: a usage error
        raise UserError(f"{run_dir}: run folder does not exist; run `pedenet fit DATA --out {run_dir}` "
                        "first", exit_code=2)
    if not path.is_file():
        if not _is_run_dir(run_dir):
            raise UserError(f"{run_dir}: not a pedenet run folder (no model.pt); pass the folder "
                            "written by `pedenet fit DATA --out RUN_DIR`, or its model.pt")
        if (run_dir / "resume.pt").is_file():
            raise UserError(f"{path}: no model yet: the fit in this run folder was interrupted"
                            f"{_at_step(run_dir / 'resume.pt')}; "
                            f"finish it with `pedenet fit DATA --out {run_dir} --resume` (the same "
                            "DATA and options as before)")
        raise UserError(f"{path}: no model in this run folder; run `pedenet fit DATA --out {run_dir}` first")
    return path


def _load_model(run_dir: Path, device: str):
    from ..estimator import PEDENet

    _check_device(device)
    return PEDENet.load(_model_path(run_dir), device=device)


def _unique_names(paths: list[Path]) -> list[str]:
    """Output names for ``paths``: the file stem. Stems that occur more than once are prefixed
    with their folder's name (``test/crack/000.png`` -> ``crack_000``), or with as many of their
    last folders as needed (up to 4: ``brick/test/good/000.png`` -> ``brick_test_good_000``), when
    that makes every name unique; otherwise they get ``_<k>`` (k = 1, 2, ... in input order),
    skipping names that are already taken. Names are compared ignoring case (``A.png`` and
    ``a.png`` would overwrite each other's outputs on macOS or Windows)."""
    def key(name: str) -> str:
        return name.casefold()

    counts: dict[str, int] = {}
    for p in paths:
        counts[key(p.stem)] = counts.get(key(p.stem), 0) + 1
    taken = {key(p.stem) for p in paths if counts[key(p.stem)] == 1}
    shared = [p for p in paths if counts[key(p.stem)] > 1]
    for depth in range(1, 5):  # the fewest trailing folders that tell the shared stems apart
        if not all(len(p.parent.parts) >= depth and p.parent.name for p in shared):
            break
        prefixed = {p: "_".join(p.parent.parts[-depth:] + (p.stem,)) for p in shared}
        keys = {key(v) for v in prefixed.values()}
        if len(keys) == len(shared) and not taken.intersection(keys):
            return [prefixed.get(p, p.stem) for p in paths]
    names = []
    next_k: dict[str, int] = {}
    for p in paths:
        stem = p.stem
        if counts[key(stem)] == 1:
            names.append(stem)
            continue
        k = next_k.get(key(stem), 1)
        while key(f"{stem}_{k}") in taken:
            k += 1
        name = f"{stem}_{k}"
        next_k[key(stem)] = k + 1
        taken.add(key(name))
        names.append(name)
    return names


def _progress(items, quiet: bool, desc: str, unit: str = "img", total: int | None = None):
    from ..progress import progress_bar

    return progress_bar(items, desc=desc, unit=unit, disable=quiet, total=total)


def _checked(paths: list[Path], *, min_side: int, skip_bad_files: bool, quiet: bool,
             desc: str) -> list[Path]:
    """Decode every image before any work starts (see pedenet.data.check_images)."""
    keep = check_images(paths, min_side=min_side, skip_bad=skip_bad_files, progress=not quiet,
                        desc=desc)
    return [paths[i] for i in keep]


RUN_FILES = ("model.pt", "resume.pt", "config.json", "history.json")
RESULT_FILES = ("metrics.json", "validation.json", "report.html")
"""Files that evaluate and validate write into a run folder."""


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


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_out_folder(folder: Path, option: str = "--out") -> None:
    """Fail at once, in one line, when ``folder`` can't be used as an output folder: it is a
    file, a file stands where one of its parent folders would be created (exit code 2), or its
    nearest existing parent can't take a new folder (exit code 1: permission bits, a read-only
    mount, /proc or /sys; :func:`_write_probe`). Leaves nothing behind. Raises UserError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder; choose another {option}", exit_code=2)
    _check_parents(folder, folder, option, "created")


def _check_out_file(path: Path, option: str = "--out") -> None:
    """As :func:`_check_out_folder`, for an output file (click's ``dir_okay=False`` already
    refuses a folder): refuse a path whose folder can't be created (exit code 2) or written
    (exit code 1). Leaves nothing behind. Raises UserError."""
    path = Path(path)
    _check_parents(path, path.parent, option, "written")


def _check_parents(named: Path, folder: Path, option: str, verb: str) -> None:
    existing = _nearest_existing(folder)
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{named}: cannot be {verb} because {existing} is a file, not a folder; "
                        f"choose another {option}", exit_code=2)
    if existing.exists():
        problem = _write_probe(existing, make_folder=True)
        if problem:  # found before writing, but the environment's (exit code 1)
            raise UserError(f"{named}: cannot be {verb}: {existing} takes no new files ({problem}); "
                            f"choose another {option}")


def _write_probe(where: Path, make_folder: bool = False) -> str | None:
    """Why the existing folder ``where`` can't take a new file (with ``make_folder``: a new
    folder), as the system says it (``"Permission denied"``, ``"Read-only file system"``), or
    None when it can. Creates and removes a hidden temporary entry there, which also catches
    what permission bits don't show (read-only mounts, /proc and /sys, running as root)."""
    try:
        if make_folder:
            os.rmdir(tempfile.mkdtemp(dir=where, prefix=".pedenet-write-check."))
        else:
            with tempfile.NamedTemporaryFile(dir=where, prefix=".pedenet-write-check.", suffix=".tmp"):
                pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _check_writable(folder: Path) -> None:
    """Fail at once, in one line, when the existing ``folder`` (a run folder that results will
    be written into) can't take a new file (:func:`_write_probe`). Raises UserError (exit code
    1: the environment's, found before writing)."""
    problem = _write_probe(folder)
    if problem:
        raise UserError(f"{folder}: cannot write results into this run folder ({problem}); make "
                        "it writable, or copy the run folder somewhere writable and pass that")


def _remove_stale_results(run_dir: Path, keep_resume: bool = False) -> None:
    """Delete what an earlier model left in ``run_dir`` (its evaluation, validation, report,
    overlays, and unless ``keep_resume`` an unfinished fit's resume.pt): stale beside a new
    model. For --overwrite."""
    for name in ("metrics.json", "validation.json", "report.html") + (() if keep_resume else ("resume.pt",)):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "overlays", ignore_errors=True)


def _check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool, can_resume: bool = True) -> None:
    """Refuse to replace anything in ``run_dir`` unless asked (--overwrite / --resume), and
    refuse a ``run_dir`` that can't be created or written (:func:`_check_out_folder`).
    ``can_resume``: the command has --resume (fit), so the messages may suggest it."""
    _check_out_folder(run_dir)
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
        how = ("pass --resume to continue it, or --overwrite to start over" if can_resume else
               "choose another --out, or pass --overwrite to replace it")
        raise UserError(f"{resume_path}: an unfinished fit was interrupted{_at_step(resume_path)}; "
                        f"{how}", exit_code=2)
    if not (model_path.exists() or resume_path.exists()) and not (overwrite or resume):
        raise UserError(f"{run_dir}: holds an incomplete run (no model.pt); pass --overwrite to "
                        "replace it or choose another --out", exit_code=2)
