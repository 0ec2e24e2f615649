"""Read OC20-style LMDBs (one file, or a directory of ``*.lmdb`` shards) as a PyTorch dataset.

Each entry is unpickled with the allow-list of :mod:`escn_train.data.safe_pickle` and
normalised by :mod:`escn_train.data.records`, so both PyG pickle generations and both
naming conventions come out as the same :class:`torch_geometric.data.Data`.

LMDB environments are opened lazily, per process, read-only and without locking, as many
concurrent readers on a network filesystem need. One environment per file and process is
shared by every dataset reading that file (py-lmdb refuses a second one); a forked child
closes the environments it inherited and opens its own.

Precomputed edges that contradict the stored positions (checked against a stored
``distances`` field, see :func:`escn_train.data.graph_selection.edge_distance_error`) are
removed from the sample with a warning, so the graph is rebuilt from the positions.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Union

import lmdb
import numpy as np
import torch
from torch_geometric.data import Data

from escn_train.data.checks import BadSample, BadSampleError, SampleChecker
from escn_train.data.fatal_read import enable_crash_report, read_entry
from escn_train.data.graph_selection import edge_distance_error, strip_edges
from escn_train.data.metadata import MetadataError, checker_settings, files_fingerprint, find_metadata, read_verdicts
from escn_train.data.records import apply_key_mapping, fields_to_data
from escn_train.data.safe_pickle import record_fields, safe_loads

#: A subset: first N entries (int), a fraction (float in (0, 1]), an index file
#: (``.txt`` with whitespace-separated integers, or ``.npy``), or explicit indices.
Subset = Union[int, float, str, os.PathLike, Sequence[int], np.ndarray, None]

_LENGTH_KEY = b"length"


def resolve_lmdb_paths(path: str | os.PathLike) -> list[Path]:
    """The shard files of a dataset: ``path`` itself, or the sorted ``*.lmdb`` files in a directory."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if root.is_dir():
        shards = sorted(p for p in root.glob("*.lmdb") if p.is_file())
        if shards:
            return shards
        raise FileNotFoundError(f"No LMDB shards in directory {root} (searched {root / '*.lmdb'})")
    raise FileNotFoundError(
        f"No LMDB dataset at {root} (searched: {root} as an .lmdb file, and {root / '*.lmdb'} as shards)"
    )


# One read-only environment per file in this process, shared by all datasets reading it.
_ENVS: dict[Path, lmdb.Environment] = {}


def _forget_inherited_envs() -> None:
    """In a forked child: close the parent's environments (never use them across a fork)."""
    for env in _ENVS.values():
        try:
            env.close()
        except lmdb.Error:
            pass
    _ENVS.clear()


os.register_at_fork(after_in_child=_forget_inherited_envs)


def open_lmdb(path: Path) -> lmdb.Environment:
    """This process's read-only environment for one shard (no lock, no readahead), opened on first use.

    A file shorter than its LMDB index says (an interrupted copy or download) is refused here:
    reading its missing pages through the memory map would kill the process with SIGBUS.
    """
    key = path.resolve()
    env = _ENVS.get(key)
    if env is None:
        enable_crash_report()  # a corrupt page can still kill a read: name the shard and key then
        expected = "expected an OC20-style LMDB file, e.g. written by escn-convert"
        size = path.stat().st_size
        if size == 0:
            raise lmdb.InvalidError(f"{path}: the file is empty (0 bytes), not an LMDB database ({expected})")
        try:
            env = lmdb.open(
                str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False, max_readers=1024
            )
        except lmdb.Error as err:
            message = str(err) if str(path) in str(err) else f"{path}: {err}"
            raise type(err)(f"{message} ({expected})") from None
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        if size < needed:
            env.close()
            raise lmdb.CorruptedError(
                f"{path}: the file is truncated: {size} bytes, but its LMDB index uses {needed} bytes "
                "(an interrupted copy or download? copy the file again)"
            )
        _ENVS[key] = env
    return env


def close_lmdb(path: Path) -> None:
    """Close this process's environment for ``path``, if open."""
    env = _ENVS.pop(path.resolve(), None)
    if env is not None:
        env.close()


# Files whose short ``length`` was reported in this process (warned once per file).
_WARNED_SHORT_LENGTH: set[Path] = set()


def _entry_count(length: object, path: Path) -> int:
    """The ``length`` value as an entry count: an integer >= 0 (3.0, a 1-element tensor or "3" are fine)."""
    if isinstance(length, torch.Tensor) and length.numel() == 1:
        length = length.item()
    elif isinstance(length, (np.ndarray, np.generic)) and length.size == 1:
        length = length.item()
    elif isinstance(length, (str, bytes)) and length.strip().isdigit():
        length = int(length)
    whole = isinstance(length, int) or (isinstance(length, float) and length.is_integer())
    if isinstance(length, bool) or not whole or length < 0:
        raise ValueError(f"{path}: key b'length' holds {length!r}; expected the number of entries (an integer >= 0)")
    return int(length)


def _warn_if_length_is_short(txn: lmdb.Transaction, length: int, path: Path) -> None:
    """Warn (once per file) when entries beyond ``length`` exist: they would be silently left out."""
    if txn.get(str(length).encode("ascii")) is None or path.resolve() in _WARNED_SHORT_LENGTH:
        return
    _WARNED_SHORT_LENGTH.add(path.resolve())
    stored = sum(1 for k in txn.cursor().iternext(keys=True, values=False) if k.isdigit())
    warnings.warn(
        f"{path}: key b'length' says {length} entries but the file holds {stored} numbered entries; "
        f"only keys b'0'..b'{length - 1}' are read (fix 'length' to read them all)",
        stacklevel=4,
    )


def _shard_keys(env: lmdb.Environment, path: Path) -> tuple[int, np.ndarray | None]:
    """Entry count of a shard and, when it has no ``length`` key, its sorted index keys."""
    with env.begin() as txn:
        raw = read_entry(txn, path, _LENGTH_KEY)
        if raw is not None:
            length = _entry_count(safe_loads(raw, f"{path}, key b'length'"), path)
            _warn_if_length_is_short(txn, length, path)
            return length, None
        keys = [int(k) for k in txn.cursor().iternext(keys=True, values=False) if k.isdigit()]
    keys.sort()
    if keys == list(range(len(keys))):
        return len(keys), None
    return len(keys), np.asarray(keys, dtype=np.int64)


def _read_index_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"Subset index file {path} does not exist")
    if path.suffix == ".npy":
        values = np.load(path, allow_pickle=False)
    else:
        try:
            values = np.asarray(path.read_text().split(), dtype=np.float64)
        except ValueError as exc:
            raise ValueError(f"Subset index file {path} must hold whitespace-separated integers: {exc}") from None
    values = np.asarray(values).reshape(-1)
    if values.size and not np.all(np.mod(values, 1) == 0):
        raise ValueError(f"Subset index file {path} holds non-integer values")
    return values.astype(np.int64)


def select_subset(total: int, subset: Subset, seed: int | None, source: str) -> np.ndarray | None:
    """Indices (into ``0..total-1``) picked by ``subset``; ``None`` means all entries.

    A fraction takes the first ``round(f * total)`` entries, or a random (sorted) choice of
    that many when ``seed`` is given.
    """
    if subset is None:
        return None
    if isinstance(subset, bool):
        raise TypeError(f"{source}: subset must be an int, a fraction, an index file or indices, not {subset!r}")
    if isinstance(subset, (int, np.integer)):
        if not 0 < subset <= total:
            raise ValueError(f"{source}: subset={subset} asks for the first {subset} of {total} entries")
        count = int(subset)
        return _first_or_random(total, count, seed)
    if isinstance(subset, float):
        if not 0.0 < subset <= 1.0:
            raise ValueError(f"{source}: a fractional subset must lie in (0, 1], got {subset}")
        count = max(1, int(round(subset * total)))
        return _first_or_random(total, count, seed)
    if isinstance(subset, (str, os.PathLike)):
        indices = _read_index_file(Path(subset).expanduser())
        where = f"index file {subset}"
    else:
        indices = np.asarray(list(subset), dtype=np.int64).reshape(-1)
        where = "subset indices"
    bad = indices[(indices < 0) | (indices >= total)]
    if bad.size:
        raise IndexError(f"{source}: {where} holds {bad[0]} (and {bad.size - 1} more) outside 0..{total - 1}")
    if indices.size == 0:
        raise ValueError(f"{source}: {where} selects no entries")
    return indices


def _first_or_random(total: int, count: int, seed: int | None) -> np.ndarray:
    if seed is None:
        return np.arange(count, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False)).astype(np.int64)


class LmdbDataset(torch.utils.data.Dataset):
    """OC20-style LMDB dataset: ``dataset[i]`` is a normalised :class:`torch_geometric.data.Data`.

    Args:
        path: one ``.lmdb`` file, or a directory whose ``*.lmdb`` shards (sorted by name)
            are concatenated.
        key_mapping: field renames applied to every entry, e.g. ``{"y": "energy", "force": "forces"}``.
        subset: first N (int), a fraction (float), an index file (.txt/.npy) or indices.
        subset_seed: with a fractional or first-N subset, pick a random sorted choice instead.
        transform: called on every decoded ``Data`` (e.g. graph selection); its result is returned.
        check_edges: compare precomputed edges with a stored ``distances`` field and drop
            them (with a warning) from entries where they contradict the positions. Off by
            default, so entries come back exactly as stored; the data module turns it on
            when it will feed precomputed edges to the model.
        checker: a :class:`~escn_train.data.checks.SampleChecker` run on every decoded entry.
        skip_bad: instead of raising on an unreadable or failing entry, warn (once per entry)
            and return a :class:`~escn_train.data.checks.BadSample` marker, which collation
            drops and counts; :attr:`skipped` lists the entries skipped in this process.
        cache_dir: where ``escn-index`` put the metadata of a dataset whose folder is
            read-only (default ``~/.cache/escn_train``).
        use_metadata: read the dataset's ``metadata.npz`` when there is one.

    Atom counts come from a ``metadata.npz`` (see :mod:`escn_train.data.metadata`) when one
    exists: :attr:`natoms`, checked at construction against the dataset's length and a few
    entries. With stored check verdicts for ``checker``'s settings, entries that passed are
    not checked again, and failing ones fail (or are skipped) with the stored reason.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        key_mapping: Mapping[str, str] | None = None,
        subset: Subset = None,
        subset_seed: int | None = None,
        transform: Callable[[Data], Data] | None = None,
        check_edges: bool = False,
        checker: SampleChecker | None = None,
        skip_bad: bool = False,
        cache_dir: str | os.PathLike | None = None,
        use_metadata: bool = True,
    ) -> None:
        self.checker = checker
        self.skip_bad = skip_bad
        #: Sources (file, key) of the entries skipped in this process, with the reason.
        self.skipped: dict[str, str] = {}
        self.path = Path(path).expanduser()
        self.paths = resolve_lmdb_paths(self.path)
        self.key_mapping = dict(key_mapping or {})
        self.transform = transform
        self.check_edges = check_edges

        lengths, self._keys = [], []
        for shard in self.paths:
            already_open = shard.resolve() in _ENVS
            try:
                length, keys = _shard_keys(open_lmdb(shard), shard)
            finally:
                if not already_open:  # nothing opened here outlives construction (fork safety)
                    close_lmdb(shard)
            lengths.append(length)
            self._keys.append(keys)
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        total = int(self._starts[-1])
        if total == 0:
            raise ValueError(f"LMDB dataset is empty: {', '.join(map(str, self.paths))} hold no entries")
        self.indices = select_subset(total, subset, subset_seed, str(self.path))
        self._subset_digest = None if self.indices is None else hashlib.sha256(self.indices.tobytes()).hexdigest()
        self._warned_shards: set[int] = set()
        #: One bit per entry: passed the checker (skipped on later reads). With a checker the bits
        #: live in shared memory, so DataLoader workers forked from this process share them.
        bits = torch.zeros((total + 7) // 8 if checker is not None else 0, dtype=torch.uint8)
        self._checked_bits = bits.share_memory_() if checker is not None else bits
        self._checked = self._checked_bits.numpy()
        self.cache_dir = cache_dir
        #: The metadata file the atom counts come from (None: no metadata found).
        self.metadata_path: Path | None = None
        self._natoms_all: np.ndarray | None = None
        #: Failing entries (flat index -> reason) from stored check verdicts; None: check as read.
        self._verdicts: dict[int, str] | None = None
        if use_metadata:
            self.attach_metadata()

    # ----------------------------------------------------------------------------- metadata
    def attach_metadata(self, validate: int = 4) -> bool:
        """Look for this dataset's metadata (and check verdicts) again; True when found.

        The file's length and ``validate`` random entries (plus the first and last) are
        compared with the data; a mismatch raises :class:`~escn_train.data.metadata.MetadataError`
        naming the file.
        """
        found = find_metadata(self.path, self.total_entries, files_fingerprint(self.paths), self.cache_dir)
        if found is None:
            return False
        file, natoms = found
        total = self.total_entries
        picks = {0, total - 1, *np.random.default_rng().integers(0, total, size=validate).tolist()}
        for flat in sorted(picks):
            actual = self._stored_natoms(flat)
            if actual is not None and actual != int(natoms[flat]):
                shard = int(np.searchsorted(self._starts, flat, side="right") - 1)
                raise MetadataError(
                    f"{file}: natoms[{flat}] = {int(natoms[flat])}, but entry {flat} of {self.path} "
                    f"({self.paths[shard].name}) has {actual} atoms; the metadata does not match the data "
                    f"(delete the file or rebuild it with: escn-index {self.path} --force)"
                )
        self.metadata_path, self._natoms_all = file, natoms
        if self.checker is not None:
            self._verdicts = read_verdicts(file, checker_settings(self.checker, self.key_mapping), total)
        return True

    def _stored_natoms(self, flat: int) -> int | None:
        """Atom count of entry ``flat`` as stored (None when the entry cannot be decoded)."""
        shard = int(np.searchsorted(self._starts, flat, side="right") - 1)
        local = flat - int(self._starts[shard])
        keys = self._keys[shard]
        key = str(local if keys is None else int(keys[local])).encode("ascii")
        source = f"{self.paths[shard]}, key {key!r}"
        already_open = self.paths[shard].resolve() in _ENVS
        try:
            with self._env(shard).begin() as txn:
                raw = txn.get(key)
            if raw is None:
                return None
            return fields_to_data(record_fields(safe_loads(raw, source), source), source).natoms
        except Exception:  # an unreadable entry is reported when it is read, not here
            return None
        finally:
            if not already_open:  # fork safety, as in __init__
                close_lmdb(self.paths[shard])

    @property
    def natoms(self) -> np.ndarray | None:
        """Atoms per entry (subset applied) from the metadata, or None when there is none (see ``escn-index``)."""
        if self._natoms_all is None:
            return None
        return self._natoms_all if self.indices is None else self._natoms_all[self.indices]

    # ----------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self._starts[-1]) if self.indices is None else int(self.indices.size)

    @property
    def total_entries(self) -> int:
        """Entries in the files, before any subset."""
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, bytes]:
        shard, key, _ = self._locate_flat(index)
        return shard, key

    def _locate_flat(self, index: int) -> tuple[int, bytes, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset {self.path} of length {n}")
        index %= n
        flat = int(self.indices[index]) if self.indices is not None else index
        shard = int(np.searchsorted(self._starts, flat, side="right") - 1)
        local = flat - int(self._starts[shard])
        keys = self._keys[shard]
        return shard, str(local if keys is None else int(keys[local])).encode("ascii"), flat

    def _env(self, shard: int) -> lmdb.Environment:
        return open_lmdb(self.paths[shard])

    def _decode(
        self, raw: bytes | None, shard: int, key: bytes, transform: bool = True, flat: int = -1
    ) -> Data | BadSample:
        if not self.skip_bad:
            return self._decode_strict(raw, shard, key, transform, flat)
        try:
            return self._decode_strict(raw, shard, key, transform, flat)
        except Exception as err:  # skip mode: every kind of bad entry becomes a counted marker
            source = f"{self.paths[shard]}, key {key!r}"
            if source not in self.skipped:
                self.skipped[source] = str(err)
                warnings.warn(f"skipping bad sample ({type(err).__name__}): {err}", stacklevel=2)
            return BadSample(source, str(err))

    def _decode_strict(self, raw: bytes | None, shard: int, key: bytes, transform: bool = True, flat: int = -1) -> Data:
        source = f"{self.paths[shard]}, key {key!r}"
        if raw is None:
            raise KeyError(f"{source}: entry is missing (the file's 'length' says it should exist)")
        fields = apply_key_mapping(record_fields(safe_loads(raw, source), source), self.key_mapping, source)
        data = fields_to_data(fields, source)
        if self._verdicts is not None and flat >= 0:  # checked at index time: fail with the stored reason
            if flat in self._verdicts:
                raise BadSampleError(self._verdicts[flat])
        elif self.checker is not None and not (flat >= 0 and self._checked[flat >> 3] & (1 << (flat & 7))):
            self.checker(data, source)
            if flat >= 0:  # each entry is checked once per process (the geometry checks cost ~1-2 ms)
                self._checked[flat >> 3] |= 1 << (flat & 7)
        if self.check_edges:
            bad, worst = edge_distance_error(data)
            if bad:
                self._warn_inconsistent_edges(shard, source, bad, data.edge_index.shape[1], worst)
                strip_edges(data)
        if transform and self.transform is not None:
            data = self.transform(data)
        return data

    def __getitem__(self, index: int) -> Data:
        shard, key, flat = self._locate_flat(int(index))
        with self._env(shard).begin() as txn:
            raw = read_entry(txn, self.paths[shard], key)
        return self._decode(raw, shard, key, flat=flat)

    def get_many(self, indices: Sequence[int], transform: bool = True) -> list[Data]:
        """Read several entries with one read transaction per shard.

        ``transform=False`` skips the dataset's transform (for scans such as statistics).
        """
        located = [self._locate_flat(int(i)) for i in indices]
        raws: list[bytes | None] = [None] * len(located)
        for shard in sorted({s for s, _, _ in located}):
            with self._env(shard).begin() as txn:
                for pos, (s, key, _) in enumerate(located):
                    if s == shard:
                        raws[pos] = read_entry(txn, self.paths[shard], key)
        return [self._decode(raw, s, key, transform, flat) for raw, (s, key, flat) in zip(raws, located)]

    def __getitems__(self, indices: Sequence[int]) -> list[Data]:
        """Batched read used by ``DataLoader`` (one call per batch instead of one per sample)."""
        return self.get_many(indices)

    def _warn_inconsistent_edges(self, shard: int, source: str, bad: int, total: int, worst: float) -> None:
        if shard in self._warned_shards:
            return
        self._warned_shards.add(shard)
        warnings.warn(
            f"{source}: {bad} of {total} precomputed edges disagree with the stored positions "
            f"(stored 'distances' differ by up to {worst:.3f} Å from pos/cell/cell_offsets); "
            "dropping this entry's precomputed edges so the graph is rebuilt from positions. "
            "Other such entries of this file are treated the same way without another warning.",
            stacklevel=3,
        )

    # ----------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close this process's environments for this dataset's shards (reopened on next access)."""
        for shard in self.paths:
            close_lmdb(shard)

    # ----------------------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """Hash of the shard files (path, size, mtime), the selected indices and the key mapping.

        Changes whenever the data a cache was computed from could have changed.
        """
        files = []
        for shard in self.paths:
            stat = shard.stat()
            files.append([str(shard.resolve()), stat.st_size, stat.st_mtime_ns])
        payload = {
            "files": files,
            "subset": self._subset_digest,
            "key_mapping": sorted(self.key_mapping.items()),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, shards={len(self.paths)}, len={len(self)})"
