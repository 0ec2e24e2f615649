"""Name the shard and key in the crash report when reading an LMDB entry kills the process.

A shard whose pages were overwritten can make LMDB copy past the end of the memory map:
the process dies with SIGBUS (or SIGSEGV) inside C code, where no Python handler runs.
:mod:`faulthandler` still prints the Python stack on such signals, showing each frame's file
name and function name. :func:`read_entry` therefore performs ``txn.get`` inside a function
whose code object is named after the read, so the dump reads::

    Fatal Python error: Bus error
      File "/data/train/shard_03.lmdb", line 2 in reading key b'17' (a fatal error here means
      the shard is corrupt: run escn-check-data /data/train/shard_03.lmdb)

:func:`enable_crash_report` switches faulthandler on (once per process) when a shard is
opened. One code object and function per read cost a few microseconds, against hundreds for
unpickling the entry.
"""

from __future__ import annotations

import faulthandler
import io
import sys
import types
from pathlib import Path
from typing import Any


def _get(txn: Any, key: bytes) -> bytes | None:
    return txn.get(key)


_wanted = True


def disable_crash_report() -> None:
    """For processes whose parent reports crashes itself (``escn-check-data``'s children)."""
    global _wanted
    _wanted = False
    faulthandler.disable()


def enable_crash_report() -> None:
    """Turn on :mod:`faulthandler` (to the process's real stderr) unless something already did.

    In a DataLoader worker it is installed again: torch replaces the SIGBUS/SIGSEGV handlers
    there with its own, whose message blames shared memory."""
    from torch.utils.data import get_worker_info

    in_worker = get_worker_info() is not None
    if not _wanted or (faulthandler.is_enabled() and not in_worker):
        return
    stream = sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
    try:
        if in_worker:
            faulthandler.disable()  # enable() is a no-op while faulthandler counts itself enabled
        faulthandler.enable(file=stream)
    except (AttributeError, ValueError, RuntimeError, io.UnsupportedOperation):
        pass  # no usable stderr (embedded interpreters): reads still work, crashes stay unnamed


def crash_hint(path: str | Path) -> str:
    return f"(a fatal error here means the shard is corrupt: run escn-check-data {path})"


def read_entry(txn: Any, path: str | Path, key: bytes) -> bytes | None:
    """``txn.get(key)``, run in a frame that names ``path`` and ``key`` in a faulthandler dump."""
    name = f"reading key {key!r} {crash_hint(path)}"
    code = _get.__code__.replace(co_filename=str(path), co_name=name, co_firstlineno=1)
    return types.FunctionType(code, {})(txn, key)
