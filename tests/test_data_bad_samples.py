"""Bad entries: each fails with a message naming file, key and problem, or is skipped and counted."""

from __future__ import annotations

import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from escn_train.data import LmdbDataModule, LmdbDataset
from escn_train.data.checks import BadSample, BadSampleError, SampleChecker, SkippedBatch
from escn_train.data.collate import collate_structures


def good(seed: int = 0, natoms: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    pos = np.stack([np.arange(natoms) * 2.0, rng.uniform(0, 0.5, natoms), np.zeros(natoms)], 1).astype(np.float32)
    return {
        "pos": pos, "cell": (np.eye(3) * 20.0).astype(np.float32), "atomic_numbers": np.array([1, 6, 8, 29][:natoms] * 1),
        "natoms": natoms, "energy": -1.5 - seed, "forces": rng.normal(size=(natoms, 3)).astype(np.float32),
        "fixed": np.zeros(natoms, dtype=np.int64), "sid": seed,
    }


def write_lmdb(path: Path, entries: dict[bytes, bytes], length: int | None = None) -> Path:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key, value)
        if length is not None:
            txn.put(b"length", pickle.dumps(length))
    env.close()
    return path


def dataset_of(tmp_path: Path, bad: dict | bytes | None, skip: bool = False, name: str = "d.lmdb", **checks) -> LmdbDataset:
    entries = {str(i).encode(): pickle.dumps(good(i)) for i in range(3)}
    if bad is not None:
        entries[b"1"] = bad if isinstance(bad, bytes) else pickle.dumps(bad)
    path = write_lmdb(tmp_path / name, entries, length=3)
    return LmdbDataset(path, checker=SampleChecker(**checks), skip_bad=skip)


def with_(**changes) -> dict:
    entry = good(1)
    for key, value in changes.items():
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    return entry


CASES = {
    "undecodable": (b"\x80\x04not a pickle", r"key b'1'.*cannot unpickle"),
    "truncated": (pickle.dumps(good(1))[:40], r"key b'1'.*cannot unpickle"),
    "missing_pos": (with_(pos=None), r"key b'1'.*no 'pos' field"),
    "missing_atomic_numbers": (with_(atomic_numbers=None), r"key b'1'.*no 'atomic_numbers' field"),
    "natoms_mismatch": (with_(natoms=7), r"key b'1'.*natoms=7 but pos has 4 rows"),
    "missing_energy": (with_(energy=None), r"key b'1'.*no 'energy' label"),
    "missing_forces": (with_(forces=None), r"key b'1'.*no 'forces' label"),
    "unknown_element": (with_(atomic_numbers=np.array([1, 6, 120, 8])), r"key b'1'.*atom 2 has atomic number 120, outside 1..99"),
    "nan_positions": (with_(pos=np.full((4, 3), np.nan, dtype=np.float32)), r"key b'1'.*'pos' holds NaN"),
    "overlap": (with_(pos=np.array([[0, 0, 0], [0.05, 0, 0], [4, 0, 0], [6, 0, 0]], dtype=np.float32)),
                r"key b'1'.*atoms 0 and 1 are 0.050 Å apart"),
    "overlap_periodic": (with_(pos=np.array([[0, 0, 0], [19.95, 0, 0], [4, 0, 0], [8, 0, 0]], dtype=np.float32)),
                         r"key b'1'.*periodic image"),
    "isolated": (with_(pos=np.array([[0, 0, 0], [7, 0, 0], [14, 0, 0], [0, 7, 7]], dtype=np.float32),
                       cell=(np.eye(3) * 50).astype(np.float32)), r"key b'1'.*no two atoms are within the cutoff of 6.0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_entry_error_names_file_key_and_problem(tmp_path, case):
    bad, pattern = CASES[case]
    dataset = dataset_of(tmp_path, bad, neighbor_cutoff=6.0)
    assert dataset[0].natoms == 4
    with pytest.raises(Exception, match=pattern) as info:
        dataset[1]
    assert str(tmp_path / "d.lmdb") in str(info.value)


@pytest.mark.parametrize("case", ["truncated", "unknown_element", "overlap", "missing_energy"])
def test_skip_mode_drops_and_counts_bad_entries(tmp_path, case):
    bad, _ = CASES[case]
    dataset = dataset_of(tmp_path, bad, skip=True, neighbor_cutoff=6.0)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        items = dataset.get_many([0, 1, 2])
    assert isinstance(items[1], BadSample) and "key b'1'" in items[1].source
    batch = collate_structures(items)
    assert batch.num_graphs == 2 and batch.sid.tolist() == [0, 2]
    assert batch.skipped == [items[1].source]
    assert list(dataset.skipped) == [items[1].source]
    empty = collate_structures([items[1]])  # nothing left: a marker the training step turns into a no-op
    assert isinstance(empty, SkippedBatch) and empty.num_graphs == 0 and empty.skipped == [items[1].source]
    assert int(empty.natoms.sum()) == 0


def test_missing_entry_and_empty_and_missing_paths(tmp_path):
    path = write_lmdb(tmp_path / "gap.lmdb", {b"0": pickle.dumps(good(0))}, length=2)
    with pytest.raises(KeyError, match=r"gap.lmdb, key b'1': entry is missing"):
        LmdbDataset(path)[1]
    empty = write_lmdb(tmp_path / "empty.lmdb", {})
    with pytest.raises(ValueError, match="empty.lmdb hold no entries"):
        LmdbDataset(empty)
    with pytest.raises(FileNotFoundError, match=r"searched: .*nowhere.*nowhere/\*\.lmdb"):
        LmdbDataset(tmp_path / "nowhere")
    (tmp_path / "nodata").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No LMDB shards in directory .*nodata"):
        LmdbDataset(tmp_path / "nodata")


def test_predict_split_needs_no_labels_and_datamodule_wires_checks(tmp_path):
    entries = {str(i).encode(): pickle.dumps(with_(energy=None, forces=None)) for i in range(2)}
    path = write_lmdb(tmp_path / "p.lmdb", entries, length=2)
    dm = LmdbDataModule(train=str(path), predict=str(path), neighbor_cutoff=6.0, progress=False)
    assert dm.dataset("predict")[0].natoms == 4
    with pytest.raises(BadSampleError, match="no 'energy' label"):
        dm.dataset("train")[0]
    skipping = LmdbDataModule(train=str(path), skip_bad_samples=True, progress=False)
    with pytest.warns(UserWarning):
        assert isinstance(skipping.dataset("train")[0], BadSample)


# ----------------------------------------------------------------------------- end to end
REPO = Path(__file__).resolve().parents[1]


def _copy_demo_with_a_bad_entry(path: Path, count: int = 16, bad_key: int = 5) -> Path:
    from escn_train.data.lmdb_dataset import open_lmdb

    with open_lmdb(REPO / "data" / "demo" / "train.lmdb").begin() as txn:
        entries = {str(i).encode(): txn.get(str(i).encode()) for i in range(count)}
    entries[str(bad_key).encode()] = entries[str(bad_key).encode()][:100]  # truncated pickle
    return write_lmdb(path, entries, length=count)


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "data" / "demo" / "train.lmdb").exists(), reason="demo data not generated")
def test_train_fails_naming_the_bad_entry_or_skips_and_counts_it(tmp_path):
    import json
    import os
    import subprocess
    import sys

    data = _copy_demo_with_a_bad_entry(tmp_path / "train.lmdb")
    args = [
        sys.executable, str(REPO / "train.py"), "data=lmdb", f"data.train.src={data}", f"data.val.src={data}",
        "data.test=null", "data.batch_size=4", "data.progress=false", f"data.stats_cache_dir={tmp_path}",
        "model.num_layers=1", "model.lmax=1", "model.mmax=1", "model.sphere_channels=8", "model.hidden_channels=8",
        "model.edge_channels=8", "model.num_sphere_samples=8", "model.max_neighbors=12",
        "model.distance_resolution=0.1", "trainer.max_epochs=1", "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "callbacks.parity_plot=null",
        "threads=1", "test_after_fit=false",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    failed = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'strict'}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    assert f"data error: {data}, key b'5': cannot unpickle entry" in failed.stderr
    assert "Traceback" not in failed.stderr and "skip_bad_samples=true skips such entries" in failed.stderr
    skipped = subprocess.run([*args, "data.skip_bad_samples=true", f"hydra.run.dir={tmp_path / 'skip'}"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0, skipped.stderr[-4000:]
    assert f"skipped bad samples: {data}, key b'5'" in skipped.stdout
    metrics = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert metrics["data/skipped_samples_train"] == 1 and metrics["data/skipped_samples_val"] == 1
    assert metrics["global_step"] == 4


def test_each_entry_is_checked_once_per_process(tmp_path):
    calls = []

    class Counting(SampleChecker):
        def __call__(self, data, source):
            calls.append(source)
            super().__call__(data, source)

    path = write_lmdb(tmp_path / "c.lmdb", {str(i).encode(): pickle.dumps(good(i)) for i in range(3)}, length=3)
    dataset = LmdbDataset(path, checker=Counting())
    dataset.get_many([0, 1, 2])
    dataset.get_many([2, 1])
    dataset[0]
    assert len(calls) == 3


# ----------------------------------------------------------------------------- broken files
def test_truncated_empty_and_foreign_files_fail_at_open_naming_the_file(tmp_path):
    import lmdb as lmdb_module

    entries = {str(i).encode(): pickle.dumps(good(i)) for i in range(40)}
    whole = write_lmdb(tmp_path / "whole.lmdb", entries, length=40)
    truncated = tmp_path / "cut.lmdb"
    data = whole.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # an interrupted copy
    # Without the check, reading an entry past the end of the file kills the process (SIGBUS).
    with pytest.raises(lmdb_module.CorruptedError, match=rf"{truncated}: the file is truncated: {len(data) // 2} bytes, "
                       rf"but its LMDB index uses {len(data)} bytes"):
        LmdbDataset(truncated)
    (tmp_path / "zero.lmdb").write_bytes(b"")
    with pytest.raises(lmdb_module.Error, match=r"zero\.lmdb: the file is empty \(0 bytes\), not an LMDB database"):
        LmdbDataset(tmp_path / "zero.lmdb")
    (tmp_path / "text.lmdb").write_text("not a database\n" * 1000)
    with pytest.raises(lmdb_module.Error, match=r"text\.lmdb.*(MDB_INVALID|not an LMDB).*expected an OC20-style LMDB file"):
        LmdbDataset(tmp_path / "text.lmdb")
    dm = LmdbDataModule(train=str(truncated), progress=False)
    with pytest.raises(lmdb_module.CorruptedError, match=r"^train split: .*cut\.lmdb: the file is truncated"):
        dm.dataset("train")


def test_data_error_message_recognises_data_errors_also_from_loader_workers(tmp_path):
    import torch

    from escn_train.data.checks import data_error_message

    dataset = dataset_of(tmp_path, with_(atomic_numbers=np.array([1, 6, 120, 8])), neighbor_cutoff=6.0)
    with pytest.raises(BadSampleError) as direct:
        dataset[1]
    assert data_error_message(direct.value) == str(direct.value) and "key b'1'" in str(direct.value)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_structures)
    with pytest.raises(BadSampleError) as in_worker:
        next(iter(loader))
    assert "DataLoader worker" in str(in_worker.value)  # torch wraps it with the worker's traceback
    assert data_error_message(in_worker.value) == str(direct.value)
    try:
        {}["not data"]
    except KeyError as err:  # raised outside escn_train/data: not a data error, keeps its traceback
        assert data_error_message(err) is None
    assert data_error_message(RuntimeError("x")) is None


# ------------------------------------------------------------- entries refused or altered
def _read_bad(tmp_path: Path, entry: dict) -> str:
    """The message of reading key b'1' (holding ``entry``) of a fresh file; checks run too."""
    dataset = dataset_of(tmp_path, entry, neighbor_cutoff=6.0)
    with pytest.raises((ValueError, pickle.UnpicklingError)) as info:  # UnsafePickleError for object arrays
        dataset[1]
    return str(info.value)


ZERO_CELL = "[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]"
INDEPENDENT = ("expected linearly independent cell vectors along the periodic directions (for a molecule store "
               "pbc false, or no cell)")
EXACT = {
    "singular_cell_pbc_true": (
        with_(cell=np.zeros((3, 3), np.float32), pbc=np.array([True, True, True])),
        f"field 'cell' is singular ({ZERO_CELL}) but pbc is [True, True, True]; {INDEPENDENT}",
    ),
    "singular_cell_pbc_not_stored": (
        with_(cell=np.array([[5, 0, 0], [10, 0, 0], [0, 0, 5]], np.float32)),
        "field 'cell' is singular ([[5.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 0.0, 5.0]]) but pbc is not stored, "
        f"so periodic in all three directions; {INDEPENDENT}",
    ),
    "slab_cell_missing_a_periodic_vector": (
        with_(cell=np.diag([20.0, 0.0, 0.0]).astype(np.float32), pbc=np.array([True, True, False])),
        "field 'cell' is singular ([[20.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]) but pbc is "
        f"[True, True, False]; {INDEPENDENT}",
    ),
    "forces_n_by_1": (with_(forces=np.zeros((4, 1), np.float32)),
                      "field 'forces' has shape (4, 1), expected (4, 3) (one row per atom)"),
    "forces_n_by_6": (with_(forces=np.zeros((4, 6), np.float32)),
                      "field 'forces' has shape (4, 6), expected (4, 3) (one row per atom)"),
    "pos_n_by_6": (with_(pos=np.zeros((4, 6), np.float32)),
                   "field 'pos' has shape (4, 6), expected (N, 3): one row per atom"),
    "object_array": (with_(forces=np.zeros((4, 3)).astype(object)),
                     ("the entry holds a numpy array of Python objects (dtype object); expected numeric arrays (store fields "
                     "as float/int arrays or tensors; object arrays can run code when unpickled, so they are refused)")),
    "object_array_extra_field": (with_(extra=np.array(["a", 1], dtype=object)),
                                 ("the entry holds a numpy array of Python objects (dtype object); expected numeric arrays (store fields "
                     "as float/int arrays or tensors; object arrays can run code when unpickled, so they are refused)")),
    "fractional_atomic_number": (with_(atomic_numbers=np.array([1.0, 6.0, 29.4, 8.0])),
                                 "field 'atomic_numbers' holds 29.4 at atom 2; expected whole numbers (integers "
                                 "stored as floats, such as 29.0, are fine)"),
    "fractional_float32_atomic_number": (with_(atomic_numbers=np.array([1.0, 6.5, 29.0, 8.0], np.float32)),
                                         "field 'atomic_numbers' holds 6.5 at atom 1; expected whole numbers "
                                         "(integers stored as floats, such as 29.0, are fine)"),
    "fractional_fixed": (with_(fixed=np.array([0.0, 0.5, 1.0, 0.0])),
                         "field 'fixed' holds 0.5 at atom 1; expected whole numbers (integers stored as floats, "
                         "such as 29.0, are fine)"),
    "pbc_without_cell": (with_(cell=None, pbc=np.array([True, True, True])),
                         "entry has no 'cell' field but pbc is [True, True, True]; expected a 3x3 'cell' for a "
                         "periodic structure (or pbc false for a molecule)"),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_bad_entry_exact_one_line_message(tmp_path, case):
    entry, message = EXACT[case]
    assert _read_bad(tmp_path, entry) == f"{tmp_path / 'd.lmdb'}, key b'1': {message}"


def test_data_error_message_is_the_plain_line(tmp_path):
    from escn_train.data.checks import data_error_message

    dataset = dataset_of(tmp_path, EXACT["forces_n_by_6"][0])
    with pytest.raises(ValueError) as info:
        dataset[1]
    assert data_error_message(info.value) == f"{tmp_path / 'd.lmdb'}, key b'1': {EXACT['forces_n_by_6'][1]}"


def test_float_atomic_numbers_that_are_whole_are_read_as_integers(tmp_path):
    dataset = dataset_of(tmp_path, with_(atomic_numbers=np.array([1.0, 6.0, 29.0, 8.0], np.float32)))
    assert dataset[1].atomic_numbers.tolist() == [1, 6, 29, 8] and dataset[1].atomic_numbers.dtype == torch.long


def test_molecule_without_cell_is_non_periodic(tmp_path):
    dataset = dataset_of(tmp_path, with_(cell=None), neighbor_cutoff=6.0)
    molecule = dataset[1]
    assert torch.equal(molecule.cell, torch.zeros(1, 3, 3))
    assert molecule.pbc.tolist() == [[False, False, False]]
    # the graph has no periodic images: every edge offset is zero and distances are the plain ones
    from escn_train.graph import radius_graph_pbc

    graph = radius_graph_pbc(molecule.pos, molecule.cell, torch.tensor([4]), 6.0, 12, pbc=molecule.pbc)
    assert graph.edge_index.shape[1] > 0 and not graph.cell_offsets.any()
    # pbc stored false, no cell: the same
    assert dataset_of(tmp_path, with_(cell=None, pbc=np.array([False] * 3)), name="e.lmdb")[1].pbc.tolist() == [
        [False, False, False]
    ]
    # a slab may lack the vacuum vector along its non-periodic direction
    slab = dataset_of(tmp_path, with_(cell=np.diag([20.0, 20.0, 0.0]).astype(np.float32),
                                      pbc=np.array([True, True, False])), name="s.lmdb")[1]
    assert slab.pbc.tolist() == [[True, True, False]]


@pytest.mark.parametrize("length", [-2, 3.5, "three"])
def test_bad_length_names_file_and_expected_value(tmp_path, length):
    path = write_lmdb(tmp_path / "n.lmdb", {str(i).encode(): pickle.dumps(good(i)) for i in range(3)}, length=length)
    with pytest.raises(ValueError) as info:
        LmdbDataset(path)
    assert str(info.value) == f"{path}: key b'length' holds {length!r}; expected the number of entries (an integer >= 0)"


def test_whole_float_length_is_fine(tmp_path):
    path = write_lmdb(tmp_path / "f.lmdb", {str(i).encode(): pickle.dumps(good(i)) for i in range(3)}, length=3.0)
    assert len(LmdbDataset(path)) == 3


def test_short_length_warns_once_naming_file_and_counts(tmp_path):
    import warnings

    path = write_lmdb(tmp_path / "short.lmdb", {str(i).encode(): pickle.dumps(good(i)) for i in range(5)}, length=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(LmdbDataset(path)) == 3
        assert len(LmdbDataset(path)) == 3  # a second dataset over the same file: no second warning
    messages = [str(w.message) for w in caught if "length" in str(w.message)]
    assert messages == [
        f"{path}: key b'length' says 3 entries but the file holds 5 numbered entries; only keys b'0'..b'2' are "
        "read (fix 'length' to read them all)"
    ]
    exact = write_lmdb(tmp_path / "exact.lmdb", {str(i).encode(): pickle.dumps(good(i)) for i in range(3)}, length=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LmdbDataset(exact)
    assert not [w for w in caught if "length" in str(w.message)]
