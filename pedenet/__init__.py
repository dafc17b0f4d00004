"""PEDENet: unsupervised image anomaly localization by patch embedding and density estimation.

    >>> import pedenet
    >>> model = pedenet.PEDENet().fit("data/mtd/train/good")
    >>> pred = model.predict(["tile.jpg"])        # maps, scores, p_values, anomalous, masks
    >>> pedenet.evaluate(model, "data/mtd")       # metrics on the test split
"""

import os

# On small machines shared with other work, OpenMP's busy-waiting threads slow torch's CPU
# kernels by an order of magnitude; a passive wait costs nothing measurable when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from .config import PEDENetConfig  # noqa: E402
from .estimator import PEDENet, load  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .inference import Predictions  # noqa: E402

__all__ = ["PEDENet", "PEDENetConfig", "Predictions", "evaluate", "load", "__version__"]
