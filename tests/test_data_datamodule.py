"""LmdbDataModule: batch layout, seeded shuffling, graph selection, errors."""

from __future__ import annotations

import warnings

from pathlib import Path

import pytest
import torch

from escn_train.data import LmdbDataModule
from escn_train.graph import edge_vectors, radius_graph_pbc

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
LEGACY = ROOT.parent / "shared" / "reference" / "lmdb" / "oc20_pyg1_legacy_sample.lmdb"
OC20_MAPPING = {"y": "energy", "force": "forces"}


def demo_module(**kwargs) -> LmdbDataModule:
    defaults = dict(train={"src": DEMO / "train.lmdb", "subset": 64}, val=DEMO / "val.lmdb", batch_size=8, progress=False)
    defaults.update(kwargs)
    return LmdbDataModule(**defaults)


def test_train_batches_have_the_documented_layout():
    dm = demo_module()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    b, n = 8, int(batch.natoms.sum())
    assert batch.pos.shape == (n, 3) and batch.pos.dtype == torch.float32
    assert batch.cell.shape == (b, 3, 3)
    assert batch.atomic_numbers.dtype == torch.long and batch.atomic_numbers.shape == (n,)
    assert batch.natoms.dtype == torch.long and batch.natoms.shape == (b,)
    assert batch.batch.shape == (n,) and batch.batch.max() == b - 1
    assert batch.energy.shape == (b,) and batch.forces.shape == (n, 3)
    assert batch.tags.shape == batch.fixed.shape == (n,)
    assert torch.equal(batch.fixed == 1, batch.tags == 0)
    assert batch.sid.shape == (b,) and batch.pbc.shape == (b, 3) and batch.pbc.dtype == torch.bool
    assert "edge_index" not in batch
    # Values are those of the dataset entries the batch was made from.
    dataset = dm.dataset("train")
    first = [d for d in (dataset[i] for i in range(len(dataset))) if d.sid == int(batch.sid[0]) and d.fid == int(batch.fid[0])][0]
    torch.testing.assert_close(batch.pos[: first.natoms], first.pos)
    assert float(batch.energy[0]) == pytest.approx(first.energy, rel=1e-6)


def test_shuffling_is_seeded_and_changes_with_epoch():
    def order(seed: int, epoch: int = 0) -> list[int]:
        loader = demo_module(seed=seed).train_dataloader()
        loader.batch_sampler.sampler.set_epoch(epoch)  # as Lightning does
        return [int(s) * 100 + int(f) for batch in loader for s, f in zip(batch.sid, batch.fid)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1) != order(1, epoch=1)
    assert sorted(order(1)) == sorted(order(1, epoch=1))
    val = [int(s) for batch in demo_module().val_dataloader() for s in batch.sid]
    assert val == sorted(val)  # evaluation is in file order


def test_max_atoms_per_batch_packs_batches():
    dm = demo_module(max_atoms_per_batch=100, batch_size=64)
    sizes = [int(batch.natoms.sum()) for batch in dm.train_dataloader()]
    assert max(sizes) <= 100 and sum(sizes) == sum(int(n) for n in dm._natoms_of("train"))


def test_precomputed_edges_are_used_only_when_allowed():
    common = dict(train=None, val=LEGACY, key_mapping=OC20_MAPPING, batch_size=1, progress=False)
    with pytest.warns(UserWarning, match="disagree"):
        with_edges = list(LmdbDataModule(use_precomputed_edges=True, **common).val_dataloader())
    kept = [b for b in with_edges if "edge_index" in b]
    assert 1 <= len(kept) < len(with_edges)  # consistent entries keep theirs, the others are stripped
    for batch in kept:
        dist, _ = edge_vectors(batch.pos, batch.cell, batch.batch, batch.edge_index, batch.cell_offsets)
        torch.testing.assert_close(dist, batch.distances, atol=1e-4, rtol=0)
    # Edges that are not used are stripped without being checked (no warning).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        without = list(LmdbDataModule(use_precomputed_edges=False, batch_size=4, **{k: v for k, v in common.items() if k != "batch_size"}).val_dataloader())
    assert all("edge_index" not in b and "cell_offsets" not in b and "distances" not in b for b in without)


def test_graph_built_in_workers_matches_the_batched_builder():
    dm = demo_module(graph_cutoff=6.0, graph_max_neighbors=20, num_workers=2)
    batch = next(iter(dm.train_dataloader()))
    reference = radius_graph_pbc(batch.pos, batch.cell, batch.natoms, 6.0, 20, pbc=batch.pbc)
    assert torch.equal(batch.edge_index, reference.edge_index)
    assert torch.equal(batch.cell_offsets, reference.cell_offsets)
    with pytest.raises(ValueError, match="must be set together"):
        demo_module(graph_cutoff=6.0)


def test_missing_split_and_paths_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"searched: .*nothere"):
        LmdbDataModule(train=tmp_path / "nothere").setup("fit")
    with pytest.raises(ValueError, match="no 'test' split"):
        demo_module().test_dataloader()
    with pytest.raises(ValueError, match="'src' required"):
        LmdbDataModule(train={"path": "x"})


def test_statistics_of_the_train_split(tmp_path):
    dm = demo_module(stats_cache_dir=tmp_path)
    stats = dm.statistics()
    assert stats["num_samples"] == 64 and len(stats["element_references"]) == 100
    assert list(tmp_path.glob("train.lmdb-*.stats.json"))
