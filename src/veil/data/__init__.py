"""Data: datasets held in memory, readers for standard formats, and partitioners.

This is the first stage of veil's data flow: a dataset is loaded (bundled, or from IDX,
CSV or NPZ files) and split among clients by a partitioner. Nothing here touches the
network.
"""

from veil.data._datasets import (
    DATASETS,
    Dataset,
    FederatedDataset,
    load_dataset,
    load_mnist,
    load_phishing,
    resolve_data_dir,
)
from veil.data._formats import read_arff, read_csv, read_idx, read_npz
from veil.data.partition import PARTITIONERS, dirichlet, iid, natural, partition, shards

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "FederatedDataset",
    "dirichlet",
    "iid",
    "load_dataset",
    "load_mnist",
    "load_phishing",
    "natural",
    "partition",
    "read_arff",
    "read_csv",
    "read_idx",
    "read_npz",
    "resolve_data_dir",
    "shards",
]
