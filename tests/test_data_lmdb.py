"""LmdbDataset: both published pickle layouts, shards, subsets, safe unpickling, errors."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from escn_train.data import LmdbDataset, UnsafePickleError
from escn_train.data.lmdb_dataset import open_lmdb
from escn_train.graph import edge_vectors

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LMDB_DIR = SHARED / "reference" / "lmdb"
PYG2 = LMDB_DIR / "oc20_pyg2_sample.lmdb"
LEGACY = LMDB_DIR / "oc20_pyg1_legacy_sample.lmdb"
OC20_MAPPING = {"y": "energy", "force": "forces"}

pytestmark = pytest.mark.skipif(not PYG2.exists(), reason="shared reference LMDBs not available")


def raw_entries(path: Path) -> dict[bytes, object]:
    """Every entry of a trusted reference file, decoded with plain pickle (independent of the loader).

    The environment comes from the loader's per-process registry: py-lmdb refuses a second one.
    """
    with open_lmdb(path).begin() as txn:
        return {key: pickle.loads(value) for key, value in txn.cursor()}


def write_raw_lmdb(path: Path, entries: dict[bytes, bytes]) -> Path:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key, value)
    env.close()
    return path


def test_pyg2_sample_every_field_matches_raw_pickle():
    raw = raw_entries(PYG2)
    dataset = LmdbDataset(PYG2)
    assert len(dataset) == raw[b"length"] == 24
    for i in range(len(dataset)):
        data, ref = dataset[i], raw[str(i).encode()]
        assert data.pos.dtype == torch.float32 and data.pos.shape == (ref.natoms, 3)
        torch.testing.assert_close(data.pos, ref.pos.float(), rtol=0, atol=0)
        assert data.cell.shape == (1, 3, 3) and data.cell.dtype == torch.float32
        torch.testing.assert_close(data.cell, ref.cell.view(1, 3, 3).float(), rtol=0, atol=0)
        assert data.atomic_numbers.dtype == torch.long
        assert data.atomic_numbers.tolist() == ref.atomic_numbers.long().tolist()
        assert data.natoms == ref.natoms == data.pos.shape[0]
        assert isinstance(data.energy, float) and data.energy == float(ref.energy)
        torch.testing.assert_close(data.forces, ref.forces.float(), rtol=0, atol=0)
        assert data.tags.dtype == torch.long and data.tags.tolist() == ref.tags.tolist()
        assert data.fixed.dtype == torch.long and data.fixed.tolist() == ref.fixed.tolist()
        assert (data.sid, data.fid) == (ref.sid, ref.fid)
        assert set(data.keys()) == set(ref.keys())


def test_legacy_sample_reads_every_field_as_stored():
    raw = raw_entries(LEGACY)
    samples = [LmdbDataset(LEGACY, key_mapping=OC20_MAPPING)[i] for i in range(8)]
    for i, data in enumerate(samples):
        ref = raw[str(i).encode()].__dict__
        assert data.edge_index.tolist() == ref["edge_index"].tolist()
        assert data.cell_offsets.tolist() == ref["cell_offsets"].tolist()
        torch.testing.assert_close(data.distances, ref["distances"], rtol=0, atol=0)
        torch.testing.assert_close(data.pos, ref["pos"], rtol=0, atol=0)


def test_legacy_sample_every_field_and_edge_consistency():
    raw = raw_entries(LEGACY)
    dataset = LmdbDataset(LEGACY, key_mapping=OC20_MAPPING, check_edges=True)
    assert len(dataset) == raw[b"length"] == 8
    consistent_seen = inconsistent_seen = 0
    with pytest.warns(UserWarning, match=r"oc20_pyg1_legacy_sample\.lmdb, key b'\d+'.*disagree"):
        samples = [dataset[i] for i in range(len(dataset))]
    for i, data in enumerate(samples):
        ref = raw[str(i).encode()].__dict__  # PyG 1.x layout: a plain attribute dict
        torch.testing.assert_close(data.pos, ref["pos"], rtol=0, atol=0)
        torch.testing.assert_close(data.cell, ref["cell"].view(1, 3, 3), rtol=0, atol=0)
        assert data.atomic_numbers.dtype == torch.long
        assert data.atomic_numbers.tolist() == ref["atomic_numbers"].long().tolist()
        assert data.natoms == ref["natoms"]
        assert data.energy == ref["y"] and "y" not in data
        torch.testing.assert_close(data.forces, ref["force"], rtol=0, atol=0)
        assert "force" not in data
        assert data.tags.tolist() == ref["tags"].tolist() and data.fixed.tolist() == ref["fixed"].tolist()
        assert (data.sid, data.fid) == (ref["sid"], ref["fid"])
        for placeholder in ("x", "edge_attr", "face", "normal", "__num_nodes__"):
            assert placeholder not in data

        # Independent check of the stored graph: do the stored distances match the positions?
        batch = torch.zeros(ref["natoms"], dtype=torch.long)
        dist, vec = edge_vectors(ref["pos"], ref["cell"], batch, ref["edge_index"], ref["cell_offsets"])
        if torch.allclose(dist, ref["distances"], atol=1e-3, rtol=0):
            consistent_seen += 1
            assert data.edge_index.tolist() == ref["edge_index"].tolist()
            assert data.cell_offsets.dtype == torch.long
            assert data.cell_offsets.tolist() == ref["cell_offsets"].tolist()
            d2, v2 = edge_vectors(data.pos, data.cell, batch, data.edge_index, data.cell_offsets)
            torch.testing.assert_close(d2, data.distances, atol=1e-4, rtol=0)
            torch.testing.assert_close(v2, data.edge_distance_vec, atol=1e-4, rtol=0)
            assert data.nedges == data.edge_index.shape[1]
        else:
            inconsistent_seen += 1
            for name in ("edge_index", "cell_offsets", "distances", "edge_distance_vec", "nedges"):
                assert name not in data
    assert consistent_seen >= 1 and inconsistent_seen >= 1  # the sample holds both kinds


def test_both_layouts_decode_to_the_same_fields():
    pyg2 = LmdbDataset(PYG2)[0]
    legacy = LmdbDataset(LEGACY, key_mapping=OC20_MAPPING, check_edges=False)[0]
    common = {"pos", "cell", "atomic_numbers", "natoms", "energy", "forces", "tags", "fixed", "sid", "fid"}
    assert common <= set(pyg2.keys()) and common <= set(legacy.keys())
    for name in common:
        a, b = pyg2[name], legacy[name]
        assert type(a) is type(b), name
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.dim() == b.dim(), name


def test_directory_of_shards_is_concatenated_in_name_order(tmp_path):
    shutil.copy(PYG2, tmp_path / "b.lmdb")
    shutil.copy(LEGACY, tmp_path / "a.lmdb")
    (tmp_path / "notes.txt").write_text("ignored")
    dataset = LmdbDataset(tmp_path, key_mapping=OC20_MAPPING, check_edges=False)
    assert len(dataset) == 32
    assert dataset[0].energy == raw_entries(LEGACY)[b"0"].__dict__["y"]
    assert dataset[8].energy == float(raw_entries(PYG2)[b"0"].energy)
    assert dataset[-1].energy == float(raw_entries(PYG2)[b"23"].energy)
    with pytest.raises(IndexError, match="out of range"):
        dataset[32]


def test_file_without_length_key_counts_index_keys(tmp_path):
    raw = raw_entries(PYG2)
    entries = {str(i).encode(): pickle.dumps(raw[str(i).encode()]) for i in range(5)}
    path = write_raw_lmdb(tmp_path / "nolength.lmdb", entries)
    dataset = LmdbDataset(path)
    assert len(dataset) == 5
    assert [d.fid for d in dataset.__getitems__([4, 0, 2])] == [raw[b"4"].fid, raw[b"0"].fid, raw[b"2"].fid]


def test_subsets_first_fraction_and_index_files(tmp_path):
    full = LmdbDataset(PYG2)
    energies = [full[i].energy for i in range(len(full))]
    assert [d.energy for d in LmdbDataset(PYG2, subset=5)] == energies[:5]
    assert len(LmdbDataset(PYG2, subset=0.25)) == 6
    random = LmdbDataset(PYG2, subset=0.25, subset_seed=3)
    assert len(random) == 6 and [d.energy for d in random] == [d.energy for d in LmdbDataset(PYG2, subset=0.25, subset_seed=3)]
    (tmp_path / "idx.txt").write_text("7\n3 11\n")
    assert [d.energy for d in LmdbDataset(PYG2, subset=tmp_path / "idx.txt")] == [energies[i] for i in (7, 3, 11)]
    np.save(tmp_path / "idx.npy", np.array([23, 0]))
    assert [d.energy for d in LmdbDataset(PYG2, subset=str(tmp_path / "idx.npy"))] == [energies[23], energies[0]]
    with pytest.raises(ValueError, match="first 30 of 24"):
        LmdbDataset(PYG2, subset=30)
    (tmp_path / "bad.txt").write_text("1 24")
    with pytest.raises(IndexError, match=r"bad\.txt holds 24"):
        LmdbDataset(PYG2, subset=tmp_path / "bad.txt")
    assert LmdbDataset(PYG2, subset=5).fingerprint() != LmdbDataset(PYG2, subset=6).fingerprint()


def test_missing_and_empty_datasets_name_what_was_searched(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*nowhere/\*\.lmdb"):
        LmdbDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"No LMDB shards in directory"):
        LmdbDataset(tmp_path)
    empty = write_raw_lmdb(tmp_path / "empty.lmdb", {b"length": pickle.dumps(0)})
    with pytest.raises(ValueError, match=r"empty.*empty\.lmdb"):
        LmdbDataset(empty)


class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_entry_is_refused_and_never_executes(tmp_path):
    target = tmp_path / "pwned"
    good = pickle.dumps(raw_entries(PYG2)[b"0"])
    bad = pickle.dumps(Data(pos=torch.zeros(1, 3), payload=_Exploit(str(target))))
    path = write_raw_lmdb(tmp_path / "evil.lmdb", {b"0": good, b"1": bad, b"length": pickle.dumps(2)})
    dataset = LmdbDataset(path)
    assert dataset[0].natoms == 37
    with pytest.raises(UnsafePickleError, match=r"evil\.lmdb, key b'1'.*(posix|os)\.system"):
        dataset[1]
    assert not target.exists()


def test_malicious_length_key_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = write_raw_lmdb(tmp_path / "evil.lmdb", {b"length": pickle.dumps(_Exploit(str(target)))})
    with pytest.raises(UnsafePickleError, match=r"evil\.lmdb, key b'length'"):
        LmdbDataset(path)
    assert not target.exists()


def test_key_mapping_clash_and_missing_field_are_named(tmp_path):
    entry = Data(pos=torch.zeros(2, 3), cell=torch.eye(3).view(1, 3, 3), atomic_numbers=torch.ones(2), y=1.0, energy=2.0)
    path = write_raw_lmdb(tmp_path / "clash.lmdb", {b"0": pickle.dumps(entry)})
    with pytest.raises(ValueError, match=r"clash\.lmdb, key b'0'.*'y' to 'energy'"):
        LmdbDataset(path, key_mapping=OC20_MAPPING)[0]
    no_pos = Data(cell=torch.eye(3).view(1, 3, 3), atomic_numbers=torch.ones(2))
    path = write_raw_lmdb(tmp_path / "nopos.lmdb", {b"0": pickle.dumps(no_pos)})
    with pytest.raises(KeyError, match=r"nopos\.lmdb, key b'0'.*no 'pos'"):
        LmdbDataset(path)[0]


def test_forked_workers_open_their_own_environment():
    dataset = LmdbDataset(PYG2)
    expected = [dataset[i].energy for i in range(len(dataset))]  # parent now holds an open environment
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=2, collate_fn=lambda items: [d.energy for d in items],
        multiprocessing_context="fork",
    )
    assert [e for batch in loader for e in batch] == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool, torch.bfloat16])
def test_tensors_of_every_dtype_and_view_round_trip(dtype):
    from escn_train.data.safe_pickle import safe_loads

    base = (torch.randn(6, 3) * 10).to(dtype)
    for tensor in (base, base[2:5], base.T, base[:0]):
        out = safe_loads(pickle.dumps(tensor), "test")
        assert out.dtype == tensor.dtype and out.shape == tensor.shape and torch.equal(out, tensor)


class _EvilStorage:
    """Pretends to be a tensor storage whose inner bytes run a command when torch.load-ed unsafely."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        import torch.storage

        return (torch.storage._load_from_bytes, (pickle.dumps(_Exploit(self.target)),))


def test_storage_bytes_are_loaded_weights_only(tmp_path):
    from escn_train.data.safe_pickle import safe_loads

    target = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="storage-entry"):
        safe_loads(pickle.dumps(_EvilStorage(str(target))), "storage-entry")
    assert not target.exists()


def test_molecules_without_a_cell_and_crystals_without_pbc_collate_together(tmp_path):
    """A molecule (no cell: zero cell, pbc false) and an OC20 crystal (no pbc field:
    periodic) in one batch: the crystal's pbc is filled in as periodic, nothing is dropped."""
    from escn_train.data.collate import collate_structures

    raw = raw_entries(PYG2)
    crystal = raw[b"0"]
    assert "pbc" not in crystal.keys() and "cell" in crystal.keys()
    molecule = raw[b"1"].clone()
    del molecule.cell
    path = write_raw_lmdb(tmp_path / "mixed.lmdb", {b"0": pickle.dumps(crystal), b"1": pickle.dumps(molecule)})
    dataset = LmdbDataset(path, key_mapping=OC20_MAPPING)
    for order in ([0, 1], [1, 0]):
        batch = collate_structures(dataset.__getitems__(order))
        expected = [[True] * 3 if i == 0 else [False] * 3 for i in order]
        assert batch.pbc.tolist() == expected
        assert batch.natoms.tolist() == [int(crystal.natoms) if i == 0 else int(molecule.natoms) for i in order]
        molecule_index = order.index(1)
        assert not batch.cell[molecule_index].any()
        torch.testing.assert_close(batch.cell[1 - molecule_index], crystal.cell.reshape(3, 3).float())
