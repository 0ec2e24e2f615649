"""``escn-index``: build the ``metadata.npz`` (atom counts) of an LMDB dataset in one parallel pass.

Training needs every structure's atom count to balance atoms across ranks and to pack
batches by ``max_atoms_per_batch``. Without metadata that means decoding every entry, on
every run and every rank; with it, one small file read. This module builds it once:

* one pass over the entries, split into chunks of consecutive entries (over all shards)
  and decoded in a pool of processes, with a progress bar;
* optionally (``--check``, or the data module's checker) running the structure checks on
  the same pass and storing their verdicts, so training does not check again;
* written next to the data when that folder is writable, else into the cache directory
  under the dataset's fingerprint (see :mod:`escn_train.data.metadata` for the names).

The data module runs it on first need (rank 0 builds, the other ranks wait at a barrier and
read the file). For a cluster, run ``escn-index`` once per dataset before submitting jobs.

Example::

    escn-index /data/oc20/s2ef/2M/train --workers 16
    escn-index /data/oc20/s2ef/2M/train --check --neighbor-cutoff 12 --key-mapping y=energy,force=forces
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from tqdm import tqdm

from escn_train.data.caching import writable
from escn_train.data.checks import BadSample, BadSampleError, SampleChecker
from escn_train.data.lmdb_dataset import LmdbDataset
from escn_train.data.metadata import (
    MetadataError,
    cached_metadata_path,
    checker_settings,
    files_fingerprint,
    metadata_target,
    read_verdicts,
    write_metadata,
    write_verdicts,
)

#: Entries per task handed to a worker process.
CHUNK = 2048
#: Datasets smaller than this are indexed in this process (a pool costs more than it saves).
MIN_PARALLEL = 8192

# The dataset and checker a worker process reads with (built by its initializer).
_WORKER: dict[str, Any] = {}


def _index_range(dataset: LmdbDataset, checker: SampleChecker | None, start: int, stop: int) -> tuple[int, np.ndarray, dict[int, str]]:
    """Atom counts of entries ``start..stop-1`` and the failing ones' reasons (with a checker)."""
    natoms = np.zeros(stop - start, dtype=np.int32)
    bad: dict[int, str] = {}
    for offset, data in enumerate(dataset.get_many(range(start, stop), transform=False)):
        if isinstance(data, BadSample):  # undecodable entry (skip mode): no atoms
            bad[start + offset] = data.reason
            continue
        natoms[offset] = data.natoms
        if checker is not None:
            source = data_source(dataset, start + offset)
            try:
                checker(data, source)
            except BadSampleError as err:
                bad[start + offset] = str(err)
    return start, natoms, bad


def data_source(dataset: LmdbDataset, flat: int) -> str:
    """``"<file>, key b'…'"`` of entry ``flat``, as the dataset names it in errors."""
    shard, key, _ = dataset._locate_flat(flat)
    return f"{dataset.paths[shard]}, key {key!r}"


def _worker_range(bounds: tuple[int, int]) -> tuple[int, np.ndarray, dict[int, str]]:
    return _index_range(_WORKER["dataset"], _WORKER["checker"], *bounds)


def _init_worker(path: str, key_mapping: dict[str, str], skip_bad: bool, checker: SampleChecker | None) -> None:
    torch.set_num_threads(1)
    _WORKER.update(dataset=LmdbDataset(path, key_mapping=key_mapping, skip_bad=skip_bad, use_metadata=False),
                   checker=checker)


def default_workers() -> int:
    """Processes used by default: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def scan_dataset(
    dataset: LmdbDataset, checker: SampleChecker | None = None, workers: int | None = None, progress: bool = True
) -> tuple[np.ndarray, dict[int, str]]:
    """Atom counts of all entries of ``dataset`` (subset ignored) and, with ``checker``, the failing entries."""
    total = dataset.total_entries
    # Every entry in file order, no checker (it runs here, so failures become verdicts, not errors).
    full = LmdbDataset(dataset.path, key_mapping=dataset.key_mapping, skip_bad=dataset.skip_bad, use_metadata=False)
    workers = default_workers() if workers is None else max(1, workers)
    tasks = [(start, min(total, start + CHUNK)) for start in range(0, total, CHUNK)]
    natoms = np.zeros(total, dtype=np.int32)
    bad: dict[int, str] = {}
    what = "indexing and checking" if checker is not None else "indexing"
    with tqdm(total=total, desc=f"{what} {dataset.path.name}", unit="structure", disable=not progress, smoothing=0.1) as bar:
        if workers == 1 or total < MIN_PARALLEL:
            results = (_index_range(full, checker, *task) for task in tasks)
            pool = None
        else:
            # spawn, not fork: the caller may be a DDP rank whose threads (gloo, OpenMP) hold locks
            # that a forked child would inherit locked (a forked pool hung there)
            pool = multiprocessing.get_context("spawn").Pool(
                min(workers, len(tasks)), initializer=_init_worker,
                initargs=(str(dataset.path), dict(dataset.key_mapping), dataset.skip_bad, checker),
            )
            results = pool.imap_unordered(_worker_range, tasks)
        try:
            for start, counts, failing in results:
                natoms[start : start + counts.size] = counts
                bad.update(failing)
                bar.update(counts.size)
        except (ValueError, KeyError, TypeError, IndexError, OSError, lmdb.Error) as err:
            if pool is None:
                raise
            # a worker's data error (it names the file and key), raised here as train.py's one-line errors expect
            raise type(err)(*err.args) from None
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            full.close()
    return natoms, bad


def index_target(dataset: LmdbDataset, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the metadata of ``dataset`` is written: next to the data when writable, else the cache."""
    target = metadata_target(dataset.path)
    if writable(target.parent) and (not target.exists() or os.access(target, os.W_OK)):
        return target
    return cached_metadata_path(dataset.path, files_fingerprint(dataset.paths), cache_dir or dataset.cache_dir)


def build_index(
    dataset: LmdbDataset,
    checker: SampleChecker | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Write the metadata (and, with ``checker``, its verdicts) of ``dataset``; returns the metadata file.

    Skips the pass when the dataset already has metadata (and verdicts for ``checker``),
    unless ``force``. Afterwards ``dataset`` uses the new files.
    """
    settings = None if checker is None else checker_settings(checker, dataset.key_mapping)
    if not force and not needs_index(dataset, checker):
        return dataset.metadata_path
    natoms, bad = scan_dataset(dataset, checker, workers, progress)
    if dataset.metadata_path is not None and not force:
        target = dataset.metadata_path  # metadata exists (e.g. fairchem's): add only the verdicts
    else:
        target = index_target(dataset, cache_dir)
        write_metadata(target, natoms)
    if settings is not None:
        if writable(target.parent):
            write_verdicts(target, settings, dataset.total_entries, bad)
        else:
            warnings.warn(f"{target.parent} is read-only: check verdicts not stored; entries are checked as they are read")
    if cache_dir is not None and dataset.cache_dir is None:
        dataset.cache_dir = cache_dir
    dataset.metadata_path = None
    if not dataset.attach_metadata():
        raise MetadataError(f"{target}: written, but not found again for {dataset.path}")
    return target


def needs_index(dataset: LmdbDataset, checker: SampleChecker | None = None) -> bool:
    """Whether ``dataset`` lacks metadata, or (with ``checker``) verdicts for that checker's settings."""
    if dataset.metadata_path is None:
        return True
    if checker is None:
        return False
    settings = checker_settings(checker, dataset.key_mapping)
    return read_verdicts(dataset.metadata_path, settings, dataset.total_entries) is None


def dataset_natoms(
    dataset: LmdbDataset, cache_dir: str | os.PathLike | None = None, progress: bool = True, workers: int | None = None
) -> np.ndarray:
    """Atoms per entry of ``dataset`` (subset applied): from its metadata, built first when missing.

    The build also stores the verdicts of the dataset's checker, if it has one.
    """
    if dataset.natoms is None:
        build_index(dataset, dataset.checker, cache_dir=cache_dir, workers=workers, progress=progress)
    natoms = dataset.natoms
    assert natoms is not None
    return natoms


# ----------------------------------------------------------------------------- command line
def _key_mapping(text: str) -> dict[str, str]:
    mapping = {}
    for pair in filter(None, text.split(",")):
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise argparse.ArgumentTypeError(f"--key-mapping expects old=new pairs separated by commas, got {text!r}")
        mapping[old.strip()] = new.strip()
    return mapping


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="escn-index",
        description="Build metadata.npz (atom count per structure, fairchem's layout) for OC20-style LMDB datasets, "
        "optionally with stored structure-check verdicts.",
    )
    parser.add_argument("paths", nargs="+", help="datasets: an .lmdb file or a directory of .lmdb shards")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all available CPUs)")
    parser.add_argument("--cache-dir", default=None, help="where to write when a dataset's folder is read-only "
                        "(default ~/.cache/escn_train; pass the same as data.stats_cache_dir)")
    parser.add_argument("--force", action="store_true", help="rebuild even when metadata exists")
    parser.add_argument("--key-mapping", type=_key_mapping, default={}, help="field renames, e.g. y=energy,force=forces")
    checks = parser.add_argument_group("structure checks (as data.check_samples; the settings must match the training config)")
    checks.add_argument("--check", action="store_true", help="run the structure checks and store their verdicts")
    checks.add_argument("--no-labels", action="store_true", help="do not require energy and forces (prediction data)")
    checks.add_argument("--max-num-elements", type=int, default=100, help="data.max_num_elements (default 100)")
    checks.add_argument("--min-distance", type=float, default=0.1, help="data.min_distance in Å (default 0.1; <0: off)")
    checks.add_argument("--neighbor-cutoff", type=float, default=None, help="data.neighbor_cutoff in Å (the model cutoff)")
    parser.add_argument("--skip-bad", action="store_true", help="record undecodable entries as bad instead of failing")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``escn-index``, ``python -m escn_train.data.index``)."""
    args = build_parser().parse_args(argv)
    checker = None
    if args.check:
        checker = SampleChecker(
            require_labels=not args.no_labels,
            max_num_elements=args.max_num_elements,
            min_distance=None if args.min_distance < 0 else args.min_distance,
            neighbor_cutoff=args.neighbor_cutoff,
        )
    for path in args.paths:
        try:
            start = time.perf_counter()
            dataset = LmdbDataset(path, key_mapping=args.key_mapping, skip_bad=args.skip_bad, cache_dir=args.cache_dir,
                                  use_metadata=not args.force)
            if not args.force and not needs_index(dataset, checker):
                print(f"{path}: metadata already present: {dataset.metadata_path} ({dataset.total_entries} entries)")
                continue
            target = build_index(dataset, checker, cache_dir=args.cache_dir, workers=args.workers,
                                 progress=not args.no_progress, force=args.force)
        except (FileNotFoundError, ValueError, KeyError, OSError, lmdb.Error) as err:
            print(f"escn-index: error: {err}", file=sys.stderr)
            return 2
        line = f"{path}: {dataset.total_entries} entries -> {target} ({time.perf_counter() - start:.1f} s)"
        if checker is not None:
            bad = read_verdicts(target, checker_settings(checker, dataset.key_mapping), dataset.total_entries) or {}
            line += f"; {len(bad)} fail the checks" + (f", e.g. {next(iter(bad.values()))}" if bad else "")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
