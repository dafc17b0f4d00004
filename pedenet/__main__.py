"""``python -m pedenet``: the same as the ``pedenet`` console script."""

import sys

from .console import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
