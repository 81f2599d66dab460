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
from veil.data._mobile import (
    HAPT_ACTIVITIES,
    load_hapt,
    load_hapt12,
    load_tuandromd,
    session_windows,
)
from veil.data.partition import PARTITIONERS, dirichlet, iid, natural, partition, shards

DATASETS["hapt"] = load_hapt
DATASETS["hapt-12"] = load_hapt12
DATASETS["tuandromd"] = load_tuandromd

__all__ = [
    "DATASETS",
    "HAPT_ACTIVITIES",
    "PARTITIONERS",
    "Dataset",
    "FederatedDataset",
    "dirichlet",
    "iid",
    "load_dataset",
    "load_hapt",
    "load_hapt12",
    "load_mnist",
    "load_phishing",
    "load_tuandromd",
    "natural",
    "partition",
    "read_arff",
    "read_csv",
    "read_idx",
    "read_npz",
    "resolve_data_dir",
    "session_windows",
    "shards",
]
