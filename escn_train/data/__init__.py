"""Data pipeline: OC20-style LMDB reading, conversion, batching and dataset statistics."""

from escn_train.data.collate import collate_structures
from escn_train.data.datamodule import LmdbDataModule
from escn_train.data.demo import ensure_demo_dataset
from escn_train.data.graph_selection import GraphSelection
from escn_train.data.lmdb_dataset import LmdbDataset, resolve_lmdb_paths
from escn_train.data.safe_pickle import UnsafePickleError
from escn_train.data.samplers import AtomBalancedBatchSampler
from escn_train.data.statistics import compute_statistics, load_or_compute_statistics

__all__ = [
    "AtomBalancedBatchSampler",
    "GraphSelection",
    "LmdbDataModule",
    "LmdbDataset",
    "UnsafePickleError",
    "collate_structures",
    "compute_statistics",
    "ensure_demo_dataset",
    "load_or_compute_statistics",
    "resolve_lmdb_paths",
]
