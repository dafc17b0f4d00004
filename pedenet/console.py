"""The ``pedenet`` console script.

Loads the command line (:mod:`pedenet.cli`, which imports torch: a few seconds) inside a
``try``, so a Ctrl-C while it loads ends with one line and exit code 130 instead of a
traceback from inside an import. Once loaded, a Ctrl-C ends a command with ``Error:
interrupted (Ctrl-C)`` and exit code 130 (:mod:`pedenet.cli.common`), and ``pedenet fit``
saves its progress (see :mod:`pedenet.resume`).
"""

from __future__ import annotations

import sys

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report it


def main() -> int | None:
    """Run ``pedenet`` with ``sys.argv``; return the exit code of an interrupted start."""
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        print("Interrupted while starting; nothing was done.", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return cli()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
