"""Private cloud inference after ARDEN (Wang et al., KDD 2018).

A phone runs the first layers of a model (the device part, trained on public data and
frozen), bounds the representation, nullifies a random fraction of it, adds Laplace
noise and sends only that to the cloud, which runs the rest (the cloud part, trained
on perturbed representations: noisy training)::

    input -> device part -> bound (L1 <= B) -> nullify (mu) -> + Laplace(2B / epsilon)
          -> network -> cloud part -> prediction

Each query is ``epsilon``-DP with respect to replacing the input by any other
(:mod:`veil.inference.perturb` states the mechanism and its proof); a
:class:`Device` records every query in its privacy ledger and refuses a query that
would exceed its budget. :mod:`veil.inference.service` serves a cloud part over HTTP,
:mod:`veil.inference.export` writes the device part to ONNX, and
:mod:`veil.inference.experiment` runs ``veil infer train``.
"""

from veil.inference.artifacts import (
    SPLIT_FORMAT,
    LoadedSplit,
    SplitSpec,
    load_split,
    read_spec,
    save_split,
)
from veil.inference.client import CloudClient, Prediction
from veil.inference.config import InferenceConfig, load_inference_config
from veil.inference.device import Device, pure_epsilon
from veil.inference.export import ExportReport, export_device, onnx_outputs
from veil.inference.perturb import (
    GeneratorLaplace,
    L1Bound,
    LaplaceSource,
    Perturbation,
    SecureLaplace,
    bound_l1,
    nullify,
)
from veil.inference.service import (
    TENSOR_NAME,
    create_app,
    decode_representation,
    max_request_bytes,
)
from veil.inference.training import (
    Augment,
    FitSettings,
    Representations,
    affine_augment,
    evaluate_split,
    fit_cloud,
    pretrain,
    swap_augment,
    train_cloud,
)

__all__ = [
    "SPLIT_FORMAT",
    "TENSOR_NAME",
    "Augment",
    "CloudClient",
    "Device",
    "ExportReport",
    "FitSettings",
    "GeneratorLaplace",
    "InferenceConfig",
    "L1Bound",
    "LaplaceSource",
    "LoadedSplit",
    "Perturbation",
    "Prediction",
    "Representations",
    "SecureLaplace",
    "SplitSpec",
    "affine_augment",
    "bound_l1",
    "create_app",
    "decode_representation",
    "evaluate_split",
    "export_device",
    "fit_cloud",
    "load_inference_config",
    "load_split",
    "max_request_bytes",
    "nullify",
    "onnx_outputs",
    "pretrain",
    "pure_epsilon",
    "read_spec",
    "save_split",
    "swap_augment",
    "train_cloud",
]
