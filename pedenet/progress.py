"""Progress bars (tqdm) that stay readable in log files.

On a terminal a bar redraws several times a second. When stderr is not a terminal (a log
file, CI, ``nohup``), every redraw would append another carriage-return line, so the bar
refreshes at most once every :data:`LOG_INTERVAL_S` seconds there (and at the end).
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0
"""Seconds between refreshes of a bar written to a non-terminal stderr."""


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, refreshing every :data:`LOG_INTERVAL_S` s when stderr is
    not a terminal (unless ``mininterval`` is given)."""
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
