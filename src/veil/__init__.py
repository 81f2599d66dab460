"""veil: privacy-preserving deep learning for mobile devices.

The algorithms (local training, FedAvg, and the privacy layers built on them) are plain
PyTorch with no I/O; a runtime decides where a client's work runs; an experiment turns a
TOML config into a run directory with metrics, models and a report.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
