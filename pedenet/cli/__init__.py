"""Command line: ``pedenet fit | evaluate | predict | validate | rescore | demo | export | benchmark``.

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

Exit codes, one rule for every command (docs/conventions.md, "Exit codes")::

    0       success
    1       the content of files or the environment: unreadable images or masks, a data folder
            without the MVTec AD layout or images, a damaged or incompatible checkpoint or
            config.json, recorded data that is gone, out of memory, no CUDA, disk full or no
            permission to write
    2       the command line is wrong or would destroy something: usage errors, contradictory
            options, a path argument that does not exist, is empty or is the wrong kind,
            refusals to replace outputs without --overwrite, a --resume that does not match,
            --out inside RUN_DIR
    128+N   interrupted by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)

This module holds the ``main`` group (the ``pedenet`` console script) and registers the
commands, one module each: :mod:`.fit`, :mod:`.evaluate`, :mod:`.predict`, :mod:`.validate`,
:mod:`.rescore`, :mod:`.demo` and :mod:`.perf` (``export``, ``benchmark``); their shared helpers are in
:mod:`.common`.
"""

from __future__ import annotations

import os

# OpenMP threads that busy-wait between parallel regions make torch 10-30x slower whenever
# another process is using a core (measured on 2 cores: 1.9 s vs 0.12 s per 160 px image).
# Passive waiting costs next to nothing on an idle machine. Must be set before torch loads;
# a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from .. import __version__  # noqa: E402
from . import demo, evaluate, fit, perf, predict, rescore, validate  # noqa: E402
from .common import _short_warnings  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="pedenet")
@click.pass_context
def main(ctx: click.Context) -> None:
    """PEDENet: unsupervised image anomaly localization.

    Train on defect-free images (MVTec AD folder layout), then evaluate on the test split or
    predict anomaly maps for new images. Start with `pedenet demo`.
    """
    ctx.with_resource(_short_warnings())


for _command in (fit.fit, evaluate.evaluate, predict.predict, validate.validate,
                 rescore.rescore, demo.demo,
                 perf.export_command, perf.benchmark_command):
    main.add_command(_command)
del _command

__all__ = ["main"]
