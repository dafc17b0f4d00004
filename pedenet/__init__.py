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

# The public names load on first use (PEP 562), so ``import pedenet`` and the console script
# start without importing torch: a Ctrl-C during those seconds is then caught by
# pedenet.console, not shown as a traceback from inside an import.
_PUBLIC = {"PEDENet": "estimator", "load": "estimator", "PEDENetConfig": "config",
           "evaluate": "evaluation", "Predictions": "inference"}

__all__ = ["PEDENet", "PEDENetConfig", "Predictions", "evaluate", "load", "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pedenet' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
