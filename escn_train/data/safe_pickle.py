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
from typing import Any

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """An entry names a global that is not on the allow-list."""


def _load_storage_from_bytes(raw: bytes) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes`` that cannot unpickle arbitrary objects."""
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
