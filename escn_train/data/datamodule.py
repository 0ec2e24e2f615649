"""LightningDataModule over OC20-style LMDB splits.

Plain constructor arguments (Hydra can instantiate it directly). Each split is ``None``, a
path, or a dict ``{"src": path, "subset": ..., "subset_seed": ..., "key_mapping": ...}``
(``subset`` as in :class:`~escn_train.data.LmdbDataset`; a split's ``key_mapping``
overrides the module-wide one).

Batches are ``torch_geometric.data.Batch`` objects built by
:func:`~escn_train.data.collate.collate_structures`; batch composition comes from
:class:`~escn_train.data.samplers.AtomBalancedBatchSampler` (seeded shuffling, optional
packing by atom count, atom-balanced sharding across ranks). With several ranks the
Trainer must be created with ``use_distributed_sampler=False``, since the sharding is done
here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Union

import lightning as L
import lmdb
import torch
from torch.utils.data import DataLoader

from escn_train.data.checks import SampleChecker
from escn_train.data.collate import collate_structures
from escn_train.data.graph_selection import GraphSelection
from escn_train.data.lmdb_dataset import LmdbDataset
from escn_train.data.samplers import AtomBalancedBatchSampler
from escn_train.data.statistics import load_or_compute_statistics

#: A split: a path, or ``{"src": path, "subset": ..., "subset_seed": ..., "key_mapping": ...}``.
SplitSpec = Union[str, os.PathLike, Mapping[str, Any], None]
_SPLIT_KEYS = {"src", "subset", "subset_seed", "key_mapping"}
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


def is_absent_split(spec: SplitSpec) -> bool:
    """``None``, or a mapping whose ``src`` is null (a preset's placeholder such as ``test: {src: null}``)."""
    return spec is None or (isinstance(spec, Mapping) and "src" in spec and spec["src"] is None)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers share the CPU with training; one thread each


class LmdbDataModule(L.LightningDataModule):
    """Train/val/test/predict LMDB splits as Lightning dataloaders.

    Args:
        train, val, test, predict: split specs (see module docstring); ``None`` = absent.
        key_mapping: field renames for every split, e.g. ``{"y": "energy", "force": "forces"}``.
        batch_size: structures per training batch (a cap when ``max_atoms_per_batch`` is set).
        eval_batch_size: structures per val/test/predict batch (default ``batch_size``).
        num_workers, pin_memory, persistent_workers: passed to the DataLoaders.
        seed: shuffling seed (the epoch is added each epoch).
        use_precomputed_edges: keep ``edge_index``/``cell_offsets`` stored in the files.
        graph_cutoff, graph_max_neighbors: build the radius graph in the loader workers for
            structures left without one (both or neither).
        max_atoms_per_batch: pack batches up to this many atoms instead of a fixed count.
        drop_last: drop the incomplete last training batch / step.
        stats_cache_dir: where statistics and metadata (``escn-index``) are cached when the
            data directory is read-only (default ``~/.cache/escn_train``).
        statistics_max_samples: estimate the statistics from a seeded random subset of this
            many train structures (None: all).
        max_num_elements: length of the element-reference vector in the statistics.
        progress: show progress bars for dataset scans.
        check_samples: check every structure as it is read (labels for train/val/test,
            element range, finite values, overlaps; see :class:`~escn_train.data.checks.SampleChecker`).
        min_distance: atoms closer than this (Å) are an error (None: no overlap check).
        neighbor_cutoff: a structure with no pair within this radius is an error (the
            model's cutoff; None: no check).
        skip_bad_samples: skip (warn, count, log as ``data/skipped_samples``) instead of failing.
    """

    def __init__(
        self,
        train: SplitSpec = None,
        val: SplitSpec = None,
        test: SplitSpec = None,
        predict: SplitSpec = None,
        key_mapping: Mapping[str, str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        use_precomputed_edges: bool = False,
        graph_cutoff: float | None = None,
        graph_max_neighbors: int | None = None,
        max_atoms_per_batch: int | None = None,
        drop_last: bool = False,
        stats_cache_dir: str | os.PathLike | None = None,
        max_num_elements: int = 100,
        progress: bool = True,
        check_samples: bool = True,
        min_distance: float | None = 0.1,
        neighbor_cutoff: float | None = None,
        skip_bad_samples: bool = False,
        statistics_max_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.statistics_max_samples = statistics_max_samples
        self.check_samples = check_samples
        self.min_distance = min_distance
        self.neighbor_cutoff = neighbor_cutoff
        self.skip_bad_samples = skip_bad_samples
        self.splits = {
            name: None if is_absent_split(spec) else spec
            for name, spec in {"train": train, "val": val, "test": test, "predict": predict}.items()
        }
        for name, spec in self.splits.items():
            if isinstance(spec, Mapping):
                unknown = set(spec) - _SPLIT_KEYS
                if "src" not in spec or unknown:
                    raise ValueError(
                        f"split '{name}': expected keys {sorted(_SPLIT_KEYS)} with 'src' required, got {sorted(spec)}"
                    )
        self.key_mapping = dict(key_mapping or {})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.max_atoms_per_batch = max_atoms_per_batch
        self.drop_last = drop_last
        self.stats_cache_dir = stats_cache_dir
        self.max_num_elements = max_num_elements
        self.progress = progress
        self.graph_selection = GraphSelection(use_precomputed_edges, graph_cutoff, graph_max_neighbors)
        self.datasets: dict[str, LmdbDataset] = {}
        self._natoms: dict[str, Any] = {}
        #: (epoch, batches consumed) of an interrupted training epoch, from a checkpoint.
        self._train_resume: tuple[int, int] | None = None

    # --------------------------------------------------------------------------- datasets
    def dataset(self, split: str) -> LmdbDataset:
        """The dataset of ``split`` (opened on first use)."""
        if split not in self.datasets:
            spec = self.splits.get(split)
            if spec is None:
                raise ValueError(f"no '{split}' split configured for {type(self).__name__}")
            if not isinstance(spec, Mapping):
                spec = {"src": spec}
            mapping = spec.get("key_mapping", self.key_mapping)
            try:
                self.datasets[split] = LmdbDataset(
                    spec["src"],
                    key_mapping=mapping,
                    subset=spec.get("subset"),
                    subset_seed=spec.get("subset_seed"),
                    transform=self.graph_selection,
                    check_edges=self.graph_selection.use_precomputed_edges,
                    checker=self._checker(split),
                    skip_bad=self.skip_bad_samples,
                    cache_dir=self.stats_cache_dir,
                )
            except (FileNotFoundError, ValueError, lmdb.Error) as err:  # name the split whose files are wrong
                raise type(err)(f"{split} split: {err}") from None
        return self.datasets[split]

    def _checker(self, split: str) -> SampleChecker | None:
        if not self.check_samples:
            return None
        return SampleChecker(
            require_labels=split != "predict",
            max_num_elements=self.max_num_elements,
            min_distance=self.min_distance,
            neighbor_cutoff=self.neighbor_cutoff,
        )

    def setup(self, stage: str | None = None) -> None:
        """Open the datasets the stage needs (all configured ones when ``stage`` is None)."""
        names = _STAGE_SPLITS.get(stage, tuple(self.splits)) if stage else tuple(self.splits)
        names = [name for name in names if self.splits.get(name) is not None]
        for name in names:
            self.dataset(name)
        self._index(names)

    def _index(self, names: list[str]) -> None:
        """Run the index pass where it is first needed: rank 0 builds, the other ranks wait and read.

        Needed for a split's atom counts (several ranks, or ``max_atoms_per_batch``), and for
        the structure checks of a split read whole (no subset) that has no stored verdicts
        for this module's check settings. The pass is ``escn-index``'s (all CPUs), and its
        results are kept next to the data or in ``stats_cache_dir``. Later runs and the
        other ranks only read them, and entries with a stored verdict are not checked again.
        """
        from escn_train.data.index import build_index, needs_index

        replicas, rank = self._world()
        needs_natoms = self.max_atoms_per_batch is not None or replicas > 1

        def wanted(dataset: LmdbDataset) -> bool:
            unchecked = dataset.checker is not None and dataset.indices is None and dataset._verdicts is None
            return (needs_natoms and dataset.natoms is None) or unchecked

        todo = [name for name in names if wanted(self.dataset(name))]
        if rank == 0:
            for name in todo:
                dataset = self.dataset(name)
                if needs_index(dataset, dataset.checker if dataset.indices is None else None):
                    build_index(dataset, dataset.checker if dataset.indices is None else None,
                                cache_dir=self.stats_cache_dir, progress=self.progress)
        if replicas > 1:  # every rank, whatever it found: the barrier must be reached by all
            self._barrier("escn-index")
            for name in names:
                if rank != 0 and wanted(self.dataset(name)):
                    self.dataset(name).attach_metadata()

    def _barrier(self, name: str) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            trainer.strategy.barrier(name)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def statistics(self) -> dict[str, Any]:
        """Normalisation statistics of the train split (cached; see :mod:`escn_train.data.statistics`)."""
        return load_or_compute_statistics(
            self.dataset("train"), self.stats_cache_dir, self.max_num_elements, progress=self.progress,
            max_samples=self.statistics_max_samples,
        )

    # --------------------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _natoms_of(self, split: str):
        if split not in self._natoms:
            from escn_train.data.index import dataset_natoms  # here: `python -m escn_train.data.index` imports it once

            self._natoms[split] = dataset_natoms(self.dataset(split), self.stats_cache_dir, progress=self.progress)
        return self._natoms[split]

    def batch_sampler(self, split: str) -> AtomBalancedBatchSampler:
        """The batch sampler ``split``'s DataLoader uses on this rank."""
        dataset = self.dataset(split)
        replicas, rank = self._world()
        training = split == "train"
        needs_natoms = self.max_atoms_per_batch is not None or replicas > 1
        return AtomBalancedBatchSampler(
            len(dataset),
            natoms=self._natoms_of(split) if needs_natoms else None,
            batch_size=self.batch_size if training else self.eval_batch_size,
            max_atoms=self.max_atoms_per_batch,
            num_replicas=replicas,
            rank=rank,
            shuffle=training,
            seed=self.seed,
            drop_last=self.drop_last and training,
            even=training,  # evaluation: each structure once (no padding), uneven shards
        )

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_sampler=self.batch_sampler(split),
            collate_fn=collate_structures,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            worker_init_fn=_worker_init if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train")
        if self._train_resume is not None:  # kept: Lightning may build the loader more than once
            loader.batch_sampler.resume_at(*self._train_resume)
        return loader

    # --------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the training epoch and how many of its batches were consumed.

        Lightning's loops restore their own counters but re-iterate a custom batch sampler
        from its start; with this state the sampler skips the consumed batches instead.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        loop = trainer.fit_loop.epoch_loop
        return {"train_epoch": int(trainer.current_epoch), "train_batches_done": int(loop.batch_progress.current.processed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_epoch" in state_dict:
            self._train_resume = (int(state_dict["train_epoch"]), int(state_dict["train_batches_done"]))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
