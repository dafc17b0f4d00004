"""PEDENet: unsupervised image anomaly localization by patch embedding and density estimation.

    >>> import pedenet
    >>> model = pedenet.PEDENet().fit("data/mtd/train/good")
    >>> maps, scores = model.predict(["tile.jpg"])
"""

import os

# On small machines shared with other work, OpenMP's busy-waiting threads slow torch's CPU
# kernels by an order of magnitude; a passive wait costs nothing measurable when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from .config import PEDENetConfig  # noqa: E402
from .estimator import PEDENet, load  # noqa: E402

__all__ = ["PEDENet", "PEDENetConfig", "load", "__version__"]
