"""Unpickle LMDB entries with an allow-list, so a downloaded file cannot run code.

``pickle`` calls whatever callable the stream names. OC20-style entries only ever need
tensors (rebuilt from their storages), numpy scalars/arrays, builtin containers and the
PyG ``Data`` classes. Everything else is refused before it is looked up, so nothing from
a hostile entry executes.

The PyG classes are never instantiated here: they are replaced by inert record types that
keep the pickled state, and :func:`record_fields` reads the field dict out of either
pickle generation (PyG 2 ``_store`` or the PyG 1.x plain attribute dict).
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import warnings
from typing import Any

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """An entry names a global that is not on the allow-list."""


class _NotPlainStorage(Exception):
    """The bytes are not one plain little-endian CPU storage; use ``torch.load`` instead."""


def _legacy_storage_dtypes() -> dict[str, torch.dtype]:
    """``{"FloatStorage": torch.float32, ...}`` for torch's legacy typed-storage classes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notice on .dtype
        return {
            name: cls.dtype
            for name, cls in vars(torch).items()
            if name.endswith("Storage") and isinstance(cls, type) and issubclass(cls, torch.storage._LegacyStorage)
        }


_STORAGE_DTYPES = _legacy_storage_dtypes()


class _StorageHeaderUnpickler(pickle.Unpickler):
    """Reads the small pickles of torch's legacy format; ``torch.<T>Storage`` resolves to its dtype."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise _NotPlainStorage(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid


def _read_plain_storage(raw: bytes) -> torch.storage.TypedStorage:
    """Decode the legacy ``torch.save`` bytes of one storage (what ``pickle`` puts in a tensor).

    Layout: pickled magic number, protocol, system info, the storage's persistent id
    ``("storage", <cls>, key, location, numel, view_metadata)``, the list of keys, then
    the raw data preceded by its element count (int64). Only data bytes are turned into
    objects, so this is as safe as ``torch.load(weights_only=True)`` and much faster.
    """
    f = io.BytesIO(raw)
    header = [_StorageHeaderUnpickler(f).load() for _ in range(3)]
    if header[0] != torch.serialization.MAGIC_NUMBER or header[1] != torch.serialization.PROTOCOL_VERSION:
        raise _NotPlainStorage("unexpected header")
    if not isinstance(header[2], dict) or header[2].get("little_endian") is not True or sys.byteorder != "little":
        raise _NotPlainStorage("byte order")
    pid = _StorageHeaderUnpickler(f).load()
    keys = _StorageHeaderUnpickler(f).load()
    if not (
        isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
        and pid[5] is None and keys == [pid[2]]
    ):
        raise _NotPlainStorage("not a single plain storage")
    dtype = pid[1]
    count = int.from_bytes(f.read(8), "little", signed=True)
    nbytes = count * torch._utils._element_size(dtype)
    data = f.read(nbytes)
    if count < 0 or len(data) != nbytes or count != pid[4]:
        raise _NotPlainStorage("truncated data")
    untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if nbytes else torch.UntypedStorage(0)
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _load_storage_from_bytes(raw: bytes) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes`` that cannot unpickle arbitrary objects.

    The common case (one plain storage) is decoded directly; anything else goes through
    ``torch.load(weights_only=True)``.
    """
    try:
        return _read_plain_storage(raw)
    except (_NotPlainStorage, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
        return torch.load(io.BytesIO(raw), weights_only=True)


class PickledRecord:
    """Inert stand-in for a pickled PyG ``Data`` or storage object: it only keeps its state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _PickledClassRef:
    """Placeholder for a class that is referenced (not instantiated) inside a PyG state."""


_PYG_RECORD_CLASSES = {
    ("torch_geometric.data.data", "Data"),
    ("torch_geometric.data", "Data"),
    ("torch_geometric.data.storage", "GlobalStorage"),
    ("torch_geometric.data.storage", "BaseStorage"),
}
_PYG_CLASS_REFS = {
    ("torch_geometric.data.data", "DataEdgeAttr"),
    ("torch_geometric.data.data", "DataTensorAttr"),
}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
}
# numpy's array and scalar rebuild functions, looked up through numpy itself so both the
# numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) module names map to them.
_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NUMPY_SCALAR = np.float64(0.0).__reduce__()[0]
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _NUMPY_RECONSTRUCT
    _ALLOWED[(_mod, "scalar")] = _NUMPY_SCALAR


def _numpy_dtype_class(name: str) -> Any:
    """``numpy.dtypes.Float64DType`` and friends (protocol-5 pickles of dtypes name them)."""
    dtypes = getattr(np, "dtypes", None)
    cls = getattr(dtypes, name, None) if dtypes is not None else None
    if isinstance(cls, type) and issubclass(cls, np.dtype):
        return cls
    return None


class SafeUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only allow-listed globals.

    ``source`` names the file and key in error messages.
    """

    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if key in _PYG_RECORD_CLASSES:
            return PickledRecord
        if key in _PYG_CLASS_REFS:
            return _PickledClassRef
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "numpy.dtypes" and _numpy_dtype_class(name) is not None:
            return _numpy_dtype_class(name)
        raise UnsafePickleError(
            f"{self.source} references {module}.{name}, which is not on the allow-list of "
            "safe types (tensors, numpy arrays, builtin containers, PyG Data); refusing to "
            "unpickle it. Only open this file with plain pickle if you trust its origin."
        )


def safe_loads(raw: bytes, source: str) -> Any:
    """Unpickle ``raw`` with the allow-list; ``source`` (e.g. ``"file.lmdb, key b'3'"``) goes into errors."""
    try:
        return SafeUnpickler(io.BytesIO(raw), source).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated or corrupt entries
        raise pickle.UnpicklingError(f"{source}: cannot unpickle entry: {exc}") from exc


def record_fields(obj: Any, source: str) -> dict[str, Any]:
    """The per-structure fields of an unpickled entry, for both PyG pickle generations.

    PyG >= 2 pickles ``Data`` with state ``{"_store": GlobalStorage}`` whose state holds
    ``_mapping``; PyG 1.x pickled the attributes directly (with ``None`` placeholders such
    as ``x``, ``face`` and ``__num_nodes__``, which are dropped). A plain dict is accepted too.
    """
    state = obj.state if isinstance(obj, PickledRecord) else obj
    if not isinstance(state, dict):
        raise TypeError(f"{source}: expected a pickled torch_geometric Data or dict, got {type(obj).__name__}")
    store = state.get("_store")
    if isinstance(store, PickledRecord) and isinstance(store.state, dict):
        mapping = store.state.get("_mapping")
        if not isinstance(mapping, dict):
            raise TypeError(f"{source}: PyG Data entry has no '_mapping' in its storage")
        return dict(mapping)
    return {k: v for k, v in state.items() if v is not None and not (k.startswith("__") and k.endswith("__"))}
