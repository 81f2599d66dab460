"""Experiments: a TOML config in, a run directory with metrics, models and a report out.

This is the last stage of veil's data flow: it drives the data, learning and runtime
packages for every method a config names, and turns what they measured into a report.
"""

from veil.experiment.config import ExperimentConfig, load_config, parse_config
from veil.experiment.report import write_report
from veil.experiment.runner import METHODS, run_experiment

__all__ = [
    "METHODS",
    "ExperimentConfig",
    "load_config",
    "parse_config",
    "run_experiment",
    "write_report",
]
