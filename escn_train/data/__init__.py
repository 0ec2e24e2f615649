"""Data pipeline: OC20-style LMDB reading, conversion, batching and dataset statistics."""

from escn_train.data.lmdb_dataset import LmdbDataset, resolve_lmdb_paths
from escn_train.data.safe_pickle import UnsafePickleError

__all__ = ["LmdbDataset", "UnsafePickleError", "resolve_lmdb_paths"]
