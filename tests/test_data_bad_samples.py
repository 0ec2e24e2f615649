"""Bad entries: each fails with a message naming file, key and problem, or is skipped and counted."""

from __future__ import annotations

import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest

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
    "missing_cell": (with_(cell=None), r"key b'1'.*no 'cell' field"),
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
