"""PEDENet: unsupervised image anomaly localization by patch embedding and density estimation."""

__version__ = "0.1.0"
