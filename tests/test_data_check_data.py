"""escn-check-data, and crash reports that name the shard and key when a read kills the process.

The corrupt shards are made here: a valid shard whose leaf nodes for some keys claim a value
of 2 GB (LMDB then copies past the end of the file: SIGBUS), with a garbage entry besides;
and a shard whose data pages were overwritten with random bytes (meta pages intact).
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import torch

from escn_train.data.check_data import main
from escn_train.data.checks import data_error_message

CRASH_KEYS = (b"17", b"21")


def _entry(i: int) -> dict:
    """64 atoms: the pickle (~3.4 kB) is larger than a page, so LMDB stores it in overflow pages."""
    g = torch.Generator().manual_seed(i)
    return {"pos": torch.rand(64, 3, generator=g) * 16, "cell": torch.eye(3).view(1, 3, 3) * 16,
            "atomic_numbers": torch.full((64,), 29), "natoms": 64, "energy": float(i), "forces": torch.zeros(64, 3)}


def write_shard(path: Path, n: int, extra: dict[bytes, bytes] | None = None) -> Path:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(str(i).encode(), pickle.dumps(_entry(i)))
        for key, value in (extra or {}).items():
            txn.put(key, value)
        txn.put(b"length", pickle.dumps(n))
    env.close()
    return path


def crashing_shard(path: Path) -> Path:
    """30 entries; b'5' is garbage, reading b'17' or b'21' kills the process with SIGBUS."""
    write_shard(path, 30, {b"5": b"garbage"})
    data = bytearray(path.read_bytes())
    for key in CRASH_KEYS:
        size = len(pickle.dumps(_entry(int(key))))
        node = struct.pack("<HHHH", size & 0xFFFF, size >> 16, 0x01, len(key)) + key  # F_BIGDATA leaf node
        at = data.find(node)
        assert at > 0
        while at >= 0:  # every copy (LMDB keeps stale copies of split pages)
            data[at:at + 4] = struct.pack("<HH", 0xFFF0, 0x7FFF)
            at = data.find(node, at + 1)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("shards")
    good = write_shard(folder / "a_good.lmdb", 20)
    bad = crashing_shard(folder / "b_bad.lmdb")
    return folder, good, bad


READER = r"""
import sys
import torch
from escn_train.data import LmdbDataset
from escn_train.data.checks import data_error_message

dataset = LmdbDataset(sys.argv[1], subset=list(range(16, 30)))  # the first batch holds b"17": no tensors in flight
loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=lambda batch: batch)
try:
    for _ in loader:
        pass
except RuntimeError as err:
    print("MAIN:", data_error_message(err), flush=True)
for i in range(len(dataset)):  # now in this process: the crash kills it
    dataset[i]
"""


def test_a_fatal_read_names_the_shard_and_key(shards):
    """In a DataLoader worker and in the main process: faulthandler's report names the shard,
    the key and escn-check-data; the main process says the same when its worker died."""
    _, _, bad = shards
    done = subprocess.run([sys.executable, "-c", READER, str(bad)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONFAULTHANDLER": ""})
    assert done.returncode == -signal.SIGBUS, done.stderr[-2000:]
    report = f'File "{bad}", line 2 in reading key b\'17\' (a fatal error here means the shard is corrupt: run escn-check-data {bad})'
    assert done.stderr.count(report) == 2, done.stderr[-3000:]  # the worker's and the main process's
    assert "Fatal Python error: Bus error" in done.stderr
    main_line = next(line for line in done.stdout.splitlines() if line.startswith("MAIN:"))
    assert "DataLoader worker (pid" in main_line and "run escn-check-data on the data" in main_line


def test_check_data_names_every_bad_key_and_goes_on_after_crashes(shards, capsys):
    folder, good, bad = shards
    assert main([str(folder), "--no-progress", "--jobs", "2"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{bad}, key b'5': cannot unpickle entry:")
    for line, key in zip(lines[1:3], CRASH_KEYS):
        assert line == (f"{bad}, key {key!r}: reading this entry killed the checking process with SIGBUS (Bus error): "
                        "the shard's pages are corrupt; copy or re-create the shard")
    assert lines[3] == f"escn-check-data: 3 problem(s) in 1 of 2 shard(s) (50 entries): {bad} (3)"
    assert len(lines) == 4 and str(good) not in "\n".join(lines)


def test_check_data_on_good_data_and_on_random_pages(shards, tmp_path, capsys):
    _, good, _ = shards
    assert main([str(good), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == (
        "escn-check-data: all 20 entries of 1 shard(s) are readable and pass the checks"
    )
    scrambled = write_shard(tmp_path / "scrambled.lmdb", 40)
    data = bytearray(scrambled.read_bytes())
    data[2 * 4096:] = random.Random(3).randbytes(len(data) - 2 * 4096)  # meta pages 0 and 1 intact
    scrambled.write_bytes(bytes(data))
    assert main([str(scrambled), str(good), "--no-progress"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"{scrambled}") and "MDB_CORRUPTED" in out[0]
    assert out[-1].startswith("escn-check-data: 1 problem(s) in 1 of 2 shard(s)") and out[-1].endswith(f"{scrambled} (1)")
    assert main([str(tmp_path / "missing.lmdb"), "--no-progress"]) == 2
    assert "escn-check-data: error: No LMDB dataset at" in capsys.readouterr().err


def test_dataloader_worker_death_points_to_check_data():
    err = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    assert data_error_message(err) == (
        "DataLoader worker (pid(s) 4242) exited unexpectedly. If it was reading an LMDB shard, the 'Fatal Python "
        "error' report above names the shard and key; run escn-check-data on the data to list every corrupt entry."
    )
    assert data_error_message(RuntimeError("CUDA out of memory")) is None
