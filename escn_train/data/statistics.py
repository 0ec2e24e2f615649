"""Dataset statistics for normalisation: energy mean/std, force RMS, per-element references.

Computed in one pass over the train split, a chunk of structures at a time (one LMDB
transaction per chunk; element counts and sums with batched tensor ops, no per-atom Python
loops), and cached as JSON keyed by the dataset fingerprint (file paths, sizes, mtimes,
subset, key mapping), so a run only recomputes after the data changed.

``max_samples`` estimates them from a seeded random subset of that many structures
instead (the OC20 presets use 200,000); the subset size and seed are part of the cache
key, are stored in the result (``max_samples``, ``sample_seed``) and logged.

Linear element references solve ``energy ≈ Σ_Z count_Z · ref_Z`` in the least-squares
sense (minimum-norm where the counts are collinear); elements absent from the data get 0.
They are accumulated as normal equations, so memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from escn_train.data.caching import cache_root, write_atomically, writable
from escn_train.data.checks import BadSample
from escn_train.data.lmdb_dataset import LmdbDataset

STATISTICS_VERSION = 1
#: Seed of the random subset drawn with ``max_samples`` (fixed: the subset does not follow the run's seed).
SAMPLE_SEED = 0

log = logging.getLogger(__name__)


def _chunks(indices: np.ndarray, size: int):
    for start in range(0, indices.size, size):
        yield indices[start : start + size].tolist()


def statistics_indices(num_samples: int, max_samples: int | None, seed: int = SAMPLE_SEED) -> np.ndarray:
    """The structures statistics are computed on: all, or a seeded, sorted random choice of ``max_samples``."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"statistics_max_samples must be positive or null, got {max_samples}")
    if max_samples is None or max_samples >= num_samples:
        return np.arange(num_samples, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_samples, size=max_samples, replace=False))


def compute_statistics(
    dataset: LmdbDataset,
    max_num_elements: int = 100,
    chunk_size: int = 256,
    progress: bool = True,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Statistics of ``dataset`` as a plain dict of floats / lists (JSON-ready).

    Keys: ``energy_mean``, ``energy_std``, ``force_rms`` (over all force components),
    ``force_rms_free`` (free atoms only), ``element_references`` (length ``max_num_elements``,
    index = atomic number), ``referenced_energy_mean`` / ``referenced_energy_std`` (of
    ``energy - Σ counts·refs``), ``mean_natoms``, ``num_samples``, ``num_atoms``,
    ``max_num_elements``, ``fingerprint``, ``max_samples`` and ``sample_seed`` (the subset
    asked for, see :func:`statistics_indices`).
    """
    m = max_num_elements
    ata = torch.zeros(m, m, dtype=torch.float64)
    aty = torch.zeros(m, dtype=torch.float64)
    col_sum = torch.zeros(m, dtype=torch.float64)
    e_sum = e_sq = f_sq = f_sq_free = 0.0
    n_samples = n_atoms = n_free = 0
    has_fixed = True
    chosen = statistics_indices(len(dataset), max_samples)
    if chosen.size < len(dataset):
        log.info("%s: statistics from a random subset of %d of %d structures (seed %d)",
                 dataset.path, chosen.size, len(dataset), SAMPLE_SEED)
    with tqdm(total=chosen.size, desc="dataset statistics", unit="structure", disable=not progress) as bar:
        for indices in _chunks(chosen, chunk_size):
            items = [d for d in dataset.get_many(indices, transform=False) if not isinstance(d, BadSample)]
            if not items:
                continue
            for name in ("energy", "forces"):
                missing = [i for i, d in zip(indices, items) if name not in d]
                if missing:
                    raise KeyError(
                        f"{dataset.path}: structure {missing[0]} has no '{name}' (fields: {sorted(items[0].keys())}); "
                        "pass key_mapping, e.g. {'y': 'energy', 'force': 'forces'}"
                    )
            z = torch.cat([d.atomic_numbers for d in items])
            if int(z.min()) < 0 or int(z.max()) >= m:
                bad = int(z.max()) if int(z.max()) >= m else int(z.min())
                raise ValueError(
                    f"{dataset.path}: atomic number {bad} in structures {indices[0]}..{indices[-1]} is outside "
                    f"0..{m - 1} (max_num_elements={m})"
                )
            natoms = torch.tensor([d.natoms for d in items])
            sample = torch.repeat_interleave(torch.arange(len(items)), natoms)
            counts = torch.zeros(len(items), m, dtype=torch.float64)
            counts.index_put_((sample, z), torch.ones_like(z, dtype=torch.float64), accumulate=True)
            energy = torch.tensor([d.energy for d in items], dtype=torch.float64)
            forces = torch.cat([d.forces for d in items]).to(torch.float64)

            ata += counts.T @ counts
            aty += counts.T @ energy
            col_sum += counts.sum(0)
            e_sum += float(energy.sum())
            e_sq += float((energy * energy).sum())
            f_sq += float((forces * forces).sum())
            if has_fixed and all("fixed" in d for d in items):
                free = torch.cat([d.fixed for d in items]) == 0
                f_sq_free += float((forces[free] ** 2).sum())
                n_free += int(free.sum())
            else:
                has_fixed = False
            n_samples += len(items)
            n_atoms += int(natoms.sum())
            bar.update(len(items))

    present = torch.nonzero(col_sum > 0).flatten()
    refs = torch.zeros(m, dtype=torch.float64)
    if present.numel():
        sub = torch.linalg.lstsq(ata[present][:, present], aty[present].unsqueeze(1), driver="gelsd")
        refs[present] = sub.solution.flatten()
    energy_mean = e_sum / n_samples
    energy_var = max(e_sq / n_samples - energy_mean**2, 0.0)
    # Residuals r = y - A·refs from the accumulated moments: Σr = Σy - refs·colsum,
    # Σr² = yᵀy - 2 refs·Aᵀy + refsᵀ AᵀA refs.
    r_sum = e_sum - float(refs @ col_sum)
    r_sq = e_sq - 2.0 * float(refs @ aty) + float(refs @ ata @ refs)
    r_mean = r_sum / n_samples
    r_var = max(r_sq / n_samples - r_mean**2, 0.0)
    return {
        "version": STATISTICS_VERSION,
        "energy_mean": energy_mean,
        "energy_std": energy_var**0.5,
        "force_rms": (f_sq / (3 * n_atoms)) ** 0.5,
        "force_rms_free": (f_sq_free / (3 * n_free)) ** 0.5 if has_fixed and n_free else None,
        "element_references": refs.tolist(),
        "referenced_energy_mean": r_mean,
        "referenced_energy_std": r_var**0.5,
        "mean_natoms": n_atoms / n_samples,
        "num_samples": n_samples,
        "num_atoms": n_atoms,
        "max_num_elements": m,
        "fingerprint": dataset.fingerprint(),
        "max_samples": max_samples,
        "sample_seed": SAMPLE_SEED if chosen.size < len(dataset) else None,
    }


def statistics_cache_path(dataset: LmdbDataset, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the statistics of ``dataset`` are cached.

    Next to the data (``<file>.stats.json`` or ``<shard dir>/stats.json``) when no
    ``cache_dir`` is given and that directory is writable; else in ``cache_dir`` (default
    ``~/.cache/escn_train``), named by dataset name and fingerprint.
    """
    root = dataset.path if dataset.path.is_dir() else dataset.path.parent
    name = "stats.json" if dataset.path.is_dir() else f"{dataset.path.name}.stats.json"
    if cache_dir is None and writable(root):
        return root / name
    return cache_root(cache_dir) / f"{dataset.path.name}-{dataset.fingerprint()[:16]}.stats.json"


def load_or_compute_statistics(
    dataset: LmdbDataset,
    cache_dir: str | os.PathLike | None = None,
    max_num_elements: int = 100,
    progress: bool = True,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Cached :func:`compute_statistics`: reuse the JSON whose fingerprint matches, else recompute and save.

    The cache holds one entry per fingerprint, ``max_num_elements`` and ``max_samples``
    (several subsets of one file can coexist).
    """
    path = statistics_cache_path(dataset, cache_dir)
    key = f"{dataset.fingerprint()}:{max_num_elements}"
    if max_samples is not None and max_samples < len(dataset):
        key += f":sample{max_samples}:seed{SAMPLE_SEED}"
    cache: dict[str, Any] = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}  # unreadable cache: recompute and overwrite
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("version") == STATISTICS_VERSION:
        log.info("%s: statistics of %d structures read from %s", dataset.path, entry["num_samples"], path)
        return entry
    stats = compute_statistics(dataset, max_num_elements=max_num_elements, progress=progress, max_samples=max_samples)
    cache[key] = stats
    text = json.dumps(cache, indent=1).encode()
    write_atomically(path, lambda handle: handle.write(text))
    log.info("%s: statistics of %d structures computed and cached in %s", dataset.path, stats["num_samples"], path)
    return stats


def __getattr__(name: str) -> Any:
    """``dataset_natoms`` moved to :mod:`escn_train.data.index`; still importable from here.

    Imported lazily, so ``python -m escn_train.data.index`` does not import that module twice.
    """
    if name == "dataset_natoms":
        from escn_train.data.index import dataset_natoms

        return dataset_natoms
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
