"""Dataset statistics: values against direct numpy, element references, caching."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from escn_train.data import LmdbDataset, compute_statistics, load_or_compute_statistics
from escn_train.data import statistics as statistics_module
from escn_train.data.convert import write_lmdb_shards

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PYG2 = SHARED / "reference" / "lmdb" / "oc20_pyg2_sample.lmdb"


def synthetic_lmdb(path: Path, n: int = 60, seed: int = 0) -> tuple[Path, np.ndarray, list[Data]]:
    """Structures whose energy is exactly Σ count_Z · ref_Z, so the references are recoverable."""
    rng = np.random.default_rng(seed)
    refs = np.zeros(100)
    refs[[1, 8, 29, 79]] = [-3.4, -7.2, -4.1, -3.2]
    entries = []
    for i in range(n):
        natoms = int(rng.integers(3, 12))
        z = rng.choice([1, 8, 29, 79], size=natoms)
        entries.append(
            Data(
                pos=torch.tensor(rng.normal(size=(natoms, 3)), dtype=torch.float32),
                cell=torch.eye(3).view(1, 3, 3) * 10,
                atomic_numbers=torch.tensor(z),
                natoms=natoms,
                energy=float(refs[z].sum()),
                forces=torch.tensor(rng.normal(size=(natoms, 3)), dtype=torch.float32),
                tags=torch.ones(natoms, dtype=torch.long),
                fixed=torch.tensor(rng.integers(0, 2, natoms)),
                sid=i,
                fid=0,
            )
        )
    write_lmdb_shards(entries, len(entries), path, progress=False)
    return path, refs, entries


def test_statistics_match_direct_computation(tmp_path):
    path, refs, entries = synthetic_lmdb(tmp_path / "syn.lmdb")
    stats = compute_statistics(LmdbDataset(path), chunk_size=7, progress=False)
    energies = np.array([d.energy for d in entries])
    forces = torch.cat([d.forces for d in entries]).double().numpy()
    free = torch.cat([d.fixed for d in entries]).numpy() == 0
    assert stats["num_samples"] == 60
    assert stats["energy_mean"] == pytest.approx(energies.mean(), rel=1e-12)
    assert stats["energy_std"] == pytest.approx(energies.std(), rel=1e-9)
    assert stats["force_rms"] == pytest.approx(np.sqrt((forces**2).mean()), rel=1e-9)
    assert stats["force_rms_free"] == pytest.approx(np.sqrt((forces[free] ** 2).mean()), rel=1e-9)
    assert len(stats["element_references"]) == 100
    np.testing.assert_allclose(stats["element_references"], refs, atol=1e-8)
    assert abs(stats["referenced_energy_mean"]) < 1e-8 and stats["referenced_energy_std"] < 1e-6
    assert stats["mean_natoms"] == pytest.approx(np.mean([d.natoms for d in entries]))


def test_references_are_least_squares_on_real_data():
    dataset = LmdbDataset(PYG2)
    stats = compute_statistics(dataset, progress=False)
    items = [dataset[i] for i in range(len(dataset))]
    counts = np.zeros((len(items), 100))
    for row, d in enumerate(items):
        np.add.at(counts[row], d.atomic_numbers.numpy(), 1)
    energies = np.array([d.energy for d in items])
    expected = np.linalg.lstsq(counts, energies, rcond=None)[0]
    np.testing.assert_allclose(stats["element_references"], expected, atol=1e-6)
    residual = energies - counts @ expected
    assert stats["referenced_energy_std"] == pytest.approx(residual.std(), rel=1e-6)


def test_cache_is_reused_and_invalidated_by_file_changes(tmp_path, monkeypatch):
    path, _, _ = synthetic_lmdb(tmp_path / "syn.lmdb")
    first = load_or_compute_statistics(LmdbDataset(path), progress=False)
    cache = tmp_path / "syn.lmdb.stats.json"
    assert cache.is_file() and first["fingerprint"] == LmdbDataset(path).fingerprint()

    def fail(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(statistics_module, "compute_statistics", fail)
    assert load_or_compute_statistics(LmdbDataset(path), progress=False) == first
    monkeypatch.undo()
    subset = load_or_compute_statistics(LmdbDataset(path, subset=10), progress=False)
    assert subset["num_samples"] == 10
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert LmdbDataset(path).fingerprint() != first["fingerprint"]
    again = load_or_compute_statistics(LmdbDataset(path), progress=False)
    assert again["fingerprint"] != first["fingerprint"] and again["energy_mean"] == first["energy_mean"]


def test_read_only_dataset_dir_caches_elsewhere(tmp_path, monkeypatch):
    data_dir = tmp_path / "ro"
    data_dir.mkdir()
    path, _, _ = synthetic_lmdb(data_dir / "syn.lmdb")
    data_dir.chmod(0o555)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    try:
        stats = load_or_compute_statistics(LmdbDataset(path), progress=False)
        given = load_or_compute_statistics(LmdbDataset(path), cache_dir=tmp_path / "cache", progress=False)
    finally:
        data_dir.chmod(0o755)
    assert sorted(p.name for p in data_dir.iterdir()) == ["syn.lmdb"]
    assert len(list((tmp_path / "home" / ".cache" / "escn_train").glob("syn.lmdb-*.stats.json"))) == 1
    assert len(list((tmp_path / "cache").glob("syn.lmdb-*.stats.json"))) == 1
    assert given == stats


def test_missing_energy_is_named(tmp_path):
    data = Data(pos=torch.zeros(1, 3), cell=torch.eye(3).view(1, 3, 3), atomic_numbers=torch.ones(1, dtype=torch.long), natoms=1)
    write_lmdb_shards([data], 1, tmp_path / "nolabel.lmdb", progress=False)
    with pytest.raises(KeyError, match=r"nolabel\.lmdb: structure 0 has no 'energy'"):
        compute_statistics(LmdbDataset(tmp_path / "nolabel.lmdb"), progress=False)


def test_statistics_from_a_seeded_random_subset(tmp_path, caplog):
    import json
    import logging

    from escn_train.data.statistics import statistics_indices

    path, _, entries = synthetic_lmdb(tmp_path / "syn.lmdb", n=60)
    chosen = statistics_indices(60, 20)
    assert chosen.tolist() == statistics_indices(60, 20).tolist() and chosen.size == 20 and len(set(chosen.tolist())) == 20
    assert chosen.tolist() != list(range(20)) and chosen.tolist() == sorted(chosen.tolist())
    with caplog.at_level(logging.INFO, logger="escn_train.data.statistics"):
        stats = compute_statistics(LmdbDataset(path), max_samples=20, progress=False)
    assert "statistics from a random subset of 20 of 60 structures (seed 0)" in caplog.text
    assert stats == compute_statistics(LmdbDataset(path), max_samples=20, progress=False)
    energies = np.array([entries[i].energy for i in chosen])
    assert stats["num_samples"] == 20 and stats["max_samples"] == 20 and stats["sample_seed"] == 0
    assert stats["energy_mean"] == pytest.approx(energies.mean(), rel=1e-12)
    assert stats["energy_std"] == pytest.approx(energies.std(), rel=1e-9)
    everything = compute_statistics(LmdbDataset(path), max_samples=1000, progress=False)  # more than there are: all
    assert everything["num_samples"] == 60 and everything["sample_seed"] is None
    # cached under a key that names the subset, next to the full statistics
    sub = load_or_compute_statistics(LmdbDataset(path), max_samples=20, progress=False)
    full = load_or_compute_statistics(LmdbDataset(path), progress=False)
    assert sub == stats and full["num_samples"] == 60
    keys = list(json.loads((tmp_path / "syn.lmdb.stats.json").read_text()))
    assert len(keys) == 2 and sum(key.endswith(":100:sample20:seed0") for key in keys) == 1
    with pytest.raises(ValueError, match="statistics_max_samples must be positive or null, got 0"):
        compute_statistics(LmdbDataset(path), max_samples=0, progress=False)
