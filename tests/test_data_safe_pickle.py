"""Allow-listed unpickling: bounded allocations, tensors inside their storage, checked numpy
dtypes, and the pickle protocols writers use (0-5, bytes via ``_codecs.encode`` in 0-2).

The hostile entries are written here with ``__reduce__`` so the writer never allocates what
the entry asks for; each must be refused, naming the file and key, before the allocation.
"""

from __future__ import annotations

import collections
import pickle
import shutil
import resource
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from escn_train.data import LmdbDataset, UnsafePickleError
from escn_train.data.safe_pickle import ALLOCATION_FACTOR, ALLOCATION_SLACK, safe_loads

SOURCE = "bombs.lmdb, key b'3'"


class Reduce:
    """Pickles as ``func(*args)`` (with an optional BUILD ``state``), without calling it."""

    def __init__(self, func, args, state=None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def one_float_storage() -> torch.TypedStorage:
    return torch.ones(1).storage()


NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]
NUMPY_SCALAR = np.float64(0).__reduce__()[0]
F8_STATE = (3, "<", None, None, None, -1, -1, 0)

BOMBS = {
    "bytearray of 3 GB": (Reduce(bytearray, (3_000_000_000,)), r"bytearray\(3000000000,\)"),
    "bytes of 3 GB": (Reduce(bytes, (3_000_000_000,)), r"bytes\(3000000000,\)"),
    "numpy.ndarray((4e8,))": (Reduce(np.ndarray, ((400_000_000,),)), r"numpy\.ndarray\(\(400000000,\),\) called directly"),
    "numpy _reconstruct of 4e8": (Reduce(NUMPY_RECONSTRUCT, (np.ndarray, (400_000_000,), b"b")),
                                  r"asks for 400000000 bytes"),
    "array state bigger than its data": (
        Reduce(NUMPY_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (400_000_000,), np.dtype("f8"), False, b"\0" * 8)),
        r"numpy array of shape \(400000000,\) and dtype <f8 with 8 data bytes \(expected 3200000000\)"),
    "object array (numpy segfaults on short lists)": (
        Reduce(NUMPY_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (4,), np.dtype("O"), False, [1])),
        r"numpy array of Python objects \(dtype object\)"),
    "dtype with object flags": (
        Reduce(NUMPY_SCALAR, (Reduce(np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 63)),
                              b"\0" * 8)),
        r"numpy dtype <f8 with a modified state \(flags 63\)"),
    "huge void dtype": (Reduce(np.dtype, ("V1000000000", False, True), F8_STATE), r"only plain numeric"),
    "tensor of 1e12 elements with stride 0": (
        Reduce(torch._utils._rebuild_tensor_v2,
               (one_float_storage(), 0, (10**12,), (0,), False, collections.OrderedDict())),
        r"tensor of size \(1000000000000,\) asks for 4000000000000 bytes"),
    "tensor beyond its storage": (
        Reduce(torch._utils._rebuild_tensor_v2, (one_float_storage(), 0, (100,), (1,), False, collections.OrderedDict())),
        r"tensor view \(offset 0, size \(100,\), stride \(1,\)\) reaches element 99 of a storage of 1 elements"),
    "tensor with a negative stride": (
        Reduce(torch._utils._rebuild_tensor_v2, (one_float_storage(), 0, (1,), (-1,), False, collections.OrderedDict())),
        r"tensor stride is -1"),
    "tensor offset beyond its storage": (
        Reduce(torch._utils._rebuild_tensor, (one_float_storage(), 5, (1,), (1,))),
        r"reaches element 5 of a storage of 1 elements"),
    "_codecs.encode with another codec": (Reduce(__import__("_codecs").encode, ("abc", "utf-8")),
                                         r"only latin1 text"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_memory_bombs_are_refused_before_allocating(name):
    bomb, pattern = BOMBS[name]
    raw = pickle.dumps(bomb, protocol=4)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(UnsafePickleError, match=rf"^{SOURCE}: .*{pattern}"):
        safe_loads(raw, SOURCE)
    assert time.perf_counter() - started < 1.0
    # ru_maxrss is in KiB on Linux: nothing near the gigabytes asked for was touched
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200_000


def test_a_bomb_in_a_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bombs.lmdb"
    env = lmdb.open(str(path), subdir=False, map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(Reduce(bytearray, (3_000_000_000,))))
        txn.put(b"length", pickle.dumps(1))
    env.close()
    assert len(pickle.dumps(Reduce(bytearray, (3_000_000_000,)))) < 64
    with pytest.raises(UnsafePickleError, match=rf"^{path}, key b'0': bytearray\(3000000000,\) .*refusing to unpickle"):
        LmdbDataset(path)[0]


def _entry() -> dict:
    base = torch.arange(12, dtype=torch.float32).view(4, 3)
    return {
        "pos": base,
        "view": base[1:3, ::2],
        "transposed": base.T,
        "expanded": torch.zeros(1, 3).expand(5, 3),  # torch writes stride 0 for these
        "atomic_numbers": torch.tensor([29, 29, 8, 1]),
        "empty": torch.zeros(0, 3),
        "energy": np.float64(-3.25),
        "tags": np.array([0, 1, 2, 2], dtype=np.int64),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "dt": np.dtype("<f4"),
        "names": np.array(["Cu", "O"]),
        "blob": b"\x00\xff" * 10,
        "empty_bytes": b"",
        "buffer": bytearray(b"abc"),
        "ids": {1, 2},
        "sid": 7,
    }


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_round_trips(protocol):
    entry = _entry()
    got = safe_loads(pickle.dumps(entry, protocol=protocol), SOURCE)
    assert set(got) == set(entry)
    for key, value in entry.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value) and got[key].dtype == value.dtype
        elif isinstance(value, np.ndarray):
            assert type(got[key]) is np.ndarray and got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value)
        else:
            assert got[key] == value and type(got[key]) is type(value)


def test_protocol_2_entries_with_codecs_bytes_read_like_protocol_5(tmp_path):
    """pickle protocol 2 (the default of old Python 2 era writers) writes bytes as
    ``_codecs.encode(text, 'latin1')``, torch storages included."""
    from torch_geometric.data import Data

    data = Data(pos=torch.randn(3, 3), cell=torch.eye(3).view(1, 3, 3), atomic_numbers=torch.tensor([1, 8, 1]),
                natoms=3, energy=-1.5, forces=torch.randn(3, 3))
    path = tmp_path / "p2.lmdb"
    env = lmdb.open(str(path), subdir=False, map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(data, protocol=2))
        txn.put(b"1", pickle.dumps(data, protocol=5))
        txn.put(b"length", pickle.dumps(2, protocol=2))
    env.close()
    assert b"_codecs" in pickle.dumps(data, protocol=2)
    dataset = LmdbDataset(path)
    old, new = dataset[0], dataset[1]
    for key in ("pos", "cell", "atomic_numbers", "forces"):
        assert torch.equal(old[key], new[key]) and torch.equal(old[key], data[key].view(old[key].shape))
    assert float(old.energy) == float(new.energy) == -1.5


def test_budget_scales_with_the_entry_and_allows_real_entries(tmp_path):
    """Real OC20 entries fit; copies of the entry's own bytes are charged each time, up to
    FACTOR x the entry's size + SLACK."""
    references = sorted(Path(__file__).resolve().parents[2].glob("shared/reference/lmdb/*.lmdb"))
    assert references
    for reference in references:
        # a copy: LMDB refuses a second environment on a file another test of this process opened
        path = tmp_path / reference.name
        shutil.copyfile(reference, path)
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
        with env.begin() as txn:
            for key, raw in txn.cursor():
                safe_loads(raw, f"{path}, key {key!r}")
        env.close()
    size = 1 << 20
    blob = b"\1" * size  # stored once in the entry, referenced by every copy

    def copies(n: int) -> bytes:
        return pickle.dumps([Reduce(bytearray, (blob,)) for _ in range(n)])

    budget_in_copies = (ALLOCATION_FACTOR * size + ALLOCATION_SLACK) // size
    assert len(copies(1)) == pytest.approx(size, rel=0.01)
    assert len(safe_loads(copies(budget_in_copies - 1), SOURCE)) == budget_in_copies - 1
    with pytest.raises(UnsafePickleError, match=rf"^{SOURCE}: bytearray asks for {size} bytes, more than an entry of"):
        safe_loads(copies(budget_in_copies + 2), SOURCE)
