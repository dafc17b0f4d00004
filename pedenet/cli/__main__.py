"""``python -m pedenet.cli``: the same as the ``pedenet`` console script."""

import sys

from . import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
