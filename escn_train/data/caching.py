"""Where derived files of a dataset (statistics, metadata) go: next to the data, or a cache directory.

One rule for both: next to the data when that directory is writable, otherwise in a cache
directory (``~/.cache/escn_train`` unless given) under a name that carries the dataset's
fingerprint, so a changed dataset never reuses a stale file. Files are written to a
temporary name in the target directory and renamed into place, so readers never see a
partial file and concurrent writers cannot interleave.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def writable(directory: Path) -> bool:
    """Writable, and not marked read-only by its mode bits (root passes ``os.access`` everywhere)."""
    return directory.is_dir() and os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``cache_dir`` when given, else ``~/.cache/escn_train``."""
    return Path(cache_dir or Path.home() / ".cache" / "escn_train").expanduser()


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary file next to ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        try:
            write(tmp)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)
    return path
