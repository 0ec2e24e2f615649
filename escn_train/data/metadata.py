"""Per-structure metadata of an LMDB dataset: atom counts in fairchem's ``metadata.npz`` layout.

fairchem 1.10 reads ``metadata.npz`` (an integer ``natoms`` array, one entry per structure
in dataset order; ``scripts/make_lmdb_sizes.py`` may add ``neighbors``) from
``<dir>/metadata.npz`` for a shard directory and ``<parent>/metadata.npz`` for a single
``.lmdb`` file. This module finds, reads and writes those files:

* a shard directory: ``<dir>/metadata.npz``;
* a single ``.lmdb`` file alone in its folder: ``<parent>/metadata.npz`` (where fairchem
  looks);
* a single ``.lmdb`` file next to other ``.lmdb`` files: ``<parent>/<file>.metadata.npz``,
  because the files would otherwise share one ``metadata.npz``. When reading such a file,
  its own name is tried first; a shared ``metadata.npz`` whose length differs from the
  file's is ignored with a warning (it belongs to a sibling file);
* a dataset whose folder is read-only: ``<cache>/<name>-<fingerprint>.metadata.npz``.

Structure-check verdicts computed at index time (``escn-index --check``) are stored next to
the metadata as ``<metadata stem>.checks.json``, one entry per checker configuration.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from escn_train.data.caching import cache_root, write_atomically

METADATA_NAME = "metadata.npz"
#: Version of the verdicts file layout (``*.checks.json``).
CHECKS_VERSION = 1


class MetadataError(ValueError):
    """A ``metadata.npz`` that cannot be used for a dataset; the message names the file."""


def _own_name(lmdb_file: Path) -> Path:
    return lmdb_file.with_name(f"{lmdb_file.name}.metadata.npz")


def has_lmdb_siblings(lmdb_file: Path) -> bool:
    """Whether other ``*.lmdb`` files share the folder of ``lmdb_file``."""
    return any(p.is_file() and p.name != lmdb_file.name for p in lmdb_file.parent.glob("*.lmdb"))


def metadata_locations(path: Path) -> list[Path]:
    """Files next to the dataset ``path`` that may hold its metadata, in the order they are tried."""
    if path.is_dir():
        return [path / METADATA_NAME]
    return [_own_name(path), path.parent / METADATA_NAME]


def metadata_target(path: Path) -> Path:
    """Where the metadata of dataset ``path`` is written next to the data (see module docstring)."""
    if path.is_dir():
        return path / METADATA_NAME
    return _own_name(path) if has_lmdb_siblings(path) else path.parent / METADATA_NAME


def files_fingerprint(paths: Sequence[Path]) -> str:
    """Hash of the shard files (resolved path, size, mtime): names cached metadata of exactly these files."""
    files = []
    for shard in paths:
        stat = shard.stat()
        files.append([str(shard.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def cached_metadata_path(path: Path, fingerprint: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The metadata file of dataset ``path`` in the cache directory (used when the data folder is read-only)."""
    return cache_root(cache_dir) / f"{path.name}-{fingerprint[:16]}.{METADATA_NAME}"


def checks_path(metadata_file: Path) -> Path:
    """The verdicts file stored next to ``metadata_file``."""
    return metadata_file.with_name(metadata_file.name[: -len(".npz")] + ".checks.json")


def read_metadata(file: Path) -> dict[str, np.ndarray]:
    """The arrays of a ``metadata.npz``; ``natoms`` must be a 1-D integer array (fairchem's rule)."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError) as err:
        raise MetadataError(f"{file}: cannot read it as a metadata .npz file ({err}); delete it or rebuild it with escn-index") from None
    natoms = arrays.get("natoms")
    if natoms is None:
        raise MetadataError(f"{file}: no 'natoms' array (found {sorted(arrays)}); expected fairchem's metadata.npz layout")
    if natoms.ndim != 1 or not np.issubdtype(natoms.dtype, np.integer):
        raise MetadataError(
            f"{file}: 'natoms' must be a 1-D integer array, got dtype {natoms.dtype} and shape {natoms.shape}"
        )
    if natoms.size and int(natoms.min()) < 0:
        raise MetadataError(f"{file}: 'natoms' holds a negative count ({int(natoms.min())})")
    return arrays


def write_metadata(file: Path, natoms: np.ndarray, neighbors: np.ndarray | None = None) -> Path:
    """Write ``natoms`` (and optionally ``neighbors``) as fairchem does: int32 arrays in an .npz, atomically."""
    arrays = {"natoms": np.asarray(natoms, dtype=np.int32)}
    if neighbors is not None:
        arrays["neighbors"] = np.asarray(neighbors, dtype=np.int32)

    def write(handle: Any) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        handle.write(buffer.getvalue())

    return write_atomically(file, write)


def find_metadata(
    path: Path, total: int, fingerprint: str, cache_dir: str | os.PathLike | None = None
) -> tuple[Path, np.ndarray] | None:
    """The metadata file of dataset ``path`` (``total`` entries) and its ``natoms``, or None when there is none.

    A file whose length differs from ``total`` is an error, except a shared
    ``<parent>/metadata.npz`` of a single file that has sibling ``.lmdb`` files: that one
    is taken to belong to a sibling and skipped with a warning.
    """
    import warnings

    candidates = [*metadata_locations(path), cached_metadata_path(path, fingerprint, cache_dir)]
    for file in candidates:
        if not file.is_file():
            continue
        natoms = read_metadata(file)["natoms"]
        if natoms.size == total:
            return file, natoms
        shared = path.is_file() and file == path.parent / METADATA_NAME and has_lmdb_siblings(path)
        if shared:
            warnings.warn(
                f"{file}: holds {natoms.size} atom counts but {path} has {total} entries; this metadata.npz "
                f"belongs to another .lmdb file in {path.parent}, so it is not used for {path.name} "
                f"(escn-index writes {_own_name(path).name} for it)",
                stacklevel=3,
            )
            continue
        raise MetadataError(
            f"{file}: holds {natoms.size} atom counts, but the dataset {path} has {total} entries "
            "(metadata of other data?); delete the file or rebuild it with: escn-index " + f"{path} --force"
        )
    return None


# ----------------------------------------------------------------------------- check verdicts
def checker_settings(checker: Any, key_mapping: Mapping[str, str]) -> str:
    """A stable key of a structure checker's configuration and the key mapping its entries were read with."""
    def plain(value: Any) -> Any:  # 12 and 12.0 Å are the same setting
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    fields = {
        "class": f"{type(checker).__module__}.{type(checker).__qualname__}",
        "settings": {name: plain(getattr(checker, name)) for name in sorted(vars(checker))},
        "key_mapping": sorted(dict(key_mapping).items()),
    }
    return json.dumps(fields, sort_keys=True, default=str)


def read_verdicts(metadata_file: Path, settings: str, total: int) -> dict[int, str] | None:
    """The failing entries (flat index -> reason) checked with ``settings``, or None when never checked so."""
    file = checks_path(metadata_file)
    if not file.is_file():
        return None
    try:
        content = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable verdicts: the entries are checked as they are read
    entry = content.get(settings) if isinstance(content, dict) else None
    if not isinstance(entry, dict) or entry.get("version") != CHECKS_VERSION or entry.get("num_entries") != total:
        return None
    return {int(k): str(v) for k, v in entry.get("bad", {}).items()}


def write_verdicts(metadata_file: Path, settings: str, total: int, bad: Mapping[int, str]) -> Path:
    """Add the verdicts of one checker configuration to the verdicts file next to ``metadata_file``."""
    file = checks_path(metadata_file)
    content: dict[str, Any] = {}
    if file.is_file():
        try:
            content = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            content = {}
    content[settings] = {"version": CHECKS_VERSION, "num_entries": total, "bad": {str(k): v for k, v in sorted(bad.items())}}
    text = json.dumps(content, indent=1).encode()
    return write_atomically(file, lambda handle: handle.write(text))
