"""Unpickle LMDB entries with an allow-list, so a downloaded file cannot run code.

``pickle`` calls whatever callable the stream names. OC20-style entries only ever need
tensors (rebuilt from their storages), numpy scalars/arrays, builtin containers and the
PyG ``Data`` classes. Everything else is refused before it is looked up, so nothing from
a hostile entry executes.

The PyG classes are never instantiated here: they are replaced by inert record types that
keep the pickled state, and :func:`record_fields` reads the field dict out of either
pickle generation (PyG 2 ``_store`` or the PyG 1.x plain attribute dict).

Allow-listed callables could still be asked for huge objects (``bytearray(3e9)``, a numpy
array of 4e8 elements, a tensor view with stride 0 over 1e12 elements), so every allocation
the entry asks for is charged against a budget of :data:`ALLOCATION_FACTOR` times the entry's
size plus :data:`ALLOCATION_SLACK` bytes: legitimate entries carry their data in the pickle,
so they need about one times their size. Rebuilt tensors must lie inside their storage, and
numpy dtypes and arrays are checked before numpy sees them (a crafted dtype state can make
numpy read raw bytes as object pointers).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import math
import pickle
import re
import sys
import warnings
import zipfile
from typing import Any

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """An entry names a global that is not on the allow-list, or asks an allowed one for
    more memory than its size justifies, or for a tensor outside its storage."""


#: Bytes an entry may allocate while it is unpickled: FACTOR x its size + SLACK.
ALLOCATION_FACTOR = 4
ALLOCATION_SLACK = 1 << 20


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


def _zip_payload_bytes(raw: bytes) -> int | None:
    """Uncompressed size of a ``torch.save`` zip archive, or None when ``raw`` is none (or
    compressed: torch writes its archives uncompressed)."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        return None
    if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
        return None
    return sum(info.file_size for info in infos)


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
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
}
#: Allowed callables that allocate: resolved to methods of the unpickler, which check and
#: charge what they are asked for.
_GUARDED: dict[tuple[str, str], str] = {
    ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor_v2",
    ("torch._utils", "_rebuild_tensor"): "_rebuild_tensor",
    ("torch.storage", "_load_from_bytes"): "_load_storage_from_bytes",
    ("numpy", "dtype"): "_numpy_dtype",
    ("builtins", "bytearray"): "_bytearray",
    ("builtins", "bytes"): "_bytes",
    ("_codecs", "encode"): "_codecs_encode",
}
# numpy's array and scalar rebuild functions, under both the numpy 1 (``numpy.core``) and
# numpy 2 (``numpy._core``) module names.
for _mod in ("numpy.core", "numpy._core"):
    _GUARDED[(f"{_mod}.multiarray", "_reconstruct")] = "_numpy_reconstruct"
    _GUARDED[(f"{_mod}.multiarray", "scalar")] = "_numpy_scalar"
    _GUARDED[(f"{_mod}.numeric", "_frombuffer")] = "_numpy_frombuffer"  # protocol 5
_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NUMPY_SCALAR = np.float64(0.0).__reduce__()[0]
#: dtype strings numpy pickles for plain (non-object) arrays and scalars: bool, integers,
#: floats, complex, datetimes, and short byte/unicode strings.
_DTYPE_STRING = re.compile(r"[<>|=]?([?bBhHiIlLqQpPefdgFDG]|[biuf][1248]|f2|f16|c(8|16|32)|[SUa][0-9]{1,4}|[mM]8(\[[0-9]*[a-zA-Z]{1,2}\])?)")


class _NdarrayClass:
    """What ``numpy.ndarray`` resolves to: only an argument of ``_reconstruct``; calling it
    (``numpy.ndarray(shape)`` allocates uninitialised memory of any size) is refused."""

    def __init__(self, unpickler: "SafeUnpickler") -> None:
        self.unpickler = unpickler

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.unpickler._refuse(f"numpy.ndarray{_short(args)} called directly (not how numpy pickles arrays)")


class _CheckedArray(np.ndarray):
    """An array being unpickled: its ``__setstate__`` checks the state before numpy reads it."""

    def __setstate__(self, state: Any) -> None:
        unpickler = self.__dict__.pop("_unpickler", None)
        if unpickler is None:
            raise pickle.UnpicklingError("array state set twice")
        unpickler._check_array_state(state)
        super().__setstate__(state)


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

    def __init__(self, file: io.BytesIO, source: str, size: int | None = None) -> None:
        super().__init__(file)
        self.source = source
        size = len(file.getbuffer()) if size is None else size
        self.budget = ALLOCATION_FACTOR * size + ALLOCATION_SLACK
        self.entry_size = size
        self.arrays = 0  # numpy arrays made (turned back into plain ndarrays after load)

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (``__builtin__.bytearray`` in protocols 0-2), as pickle's own
        # find_class maps them; the result must still be on the allow-list.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if key in _GUARDED:
            return getattr(self, _GUARDED[key])
        if key == ("numpy", "ndarray"):
            return _NdarrayClass(self)
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

    # ------------------------------------------------------------------ checks and charges
    def _refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"{self.source}: {what}; refusing to unpickle it (the entry is corrupt or crafted)")

    def _charge(self, nbytes: int, what: str, shape: Any = None) -> None:
        if nbytes > self.budget:  # (messages are formatted only here: this runs for every tensor)
            what = what if shape is None else f"{what} of size {tuple(shape)}"
            raise self._refuse(
                f"{what} asks for {nbytes} bytes, more than an entry of {self.entry_size} bytes may allocate "
                f"({ALLOCATION_FACTOR} x its size + {ALLOCATION_SLACK})"
            )
        self.budget -= nbytes

    def _int(self, value: Any, what: str) -> int:
        if type(value) is not int or value < 0:
            raise self._refuse(f"{what} is {value!r}, expected a non-negative integer")
        return value

    def _bytearray(self, *args: Any) -> bytearray:
        if not args:
            return bytearray()
        first = args[0]
        if isinstance(first, (bytes, bytearray)) and len(args) == 1:
            self._charge(len(first), "bytearray")
        elif isinstance(first, str) and args[1:] == ("latin1",):  # pickle protocols 0-2
            self._charge(len(first), "bytearray")
        else:
            raise self._refuse(f"bytearray{_short(args)} (only copies of bytes in the entry are expected)")
        return bytearray(*args)

    def _bytes(self, *args: Any) -> bytes:
        if args:  # pickle writes bytes() only for b""
            raise self._refuse(f"bytes{_short(args)} (only bytes() is expected)")
        return b""

    def _codecs_encode(self, text: Any, encoding: Any = None, *rest: Any) -> bytes:
        """Pickle protocols 0-2 write ``bytes`` as ``_codecs.encode(text, "latin1")``."""
        if not isinstance(text, str) or encoding != "latin1" or rest:
            raise self._refuse(f"_codecs.encode{_short((text, encoding, *rest))} (only latin1 text is expected)")
        self._charge(len(text), "_codecs.encode")
        return codecs.encode(text, "latin1")

    def _load_storage_from_bytes(self, raw: Any) -> Any:
        """Stand-in for ``torch.storage._load_from_bytes`` that cannot unpickle arbitrary objects.

        The common case (one plain storage, what ``torch`` writes) is decoded directly, its
        data taken from the bytes; a ``torch.save`` zip archive goes through
        ``torch.load(weights_only=True)`` once its size is known to fit the budget.
        """
        if not isinstance(raw, (bytes, bytearray)):
            raise self._refuse(f"storage bytes of type {type(raw).__name__}")
        try:
            return _read_plain_storage(bytes(raw))
        except (_NotPlainStorage, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
            pass
        payload = _zip_payload_bytes(bytes(raw))
        if payload is None:
            raise self._refuse("tensor storage bytes that are neither one plain storage nor a torch.save archive")
        self._charge(payload, "tensor storage archive")
        return torch.load(io.BytesIO(raw), weights_only=True)

    def _check_view(self, storage: Any, offset: Any, size: Any, stride: Any) -> None:
        """A tensor view must lie inside its storage; its logical size is charged (views with
        stride 0, as torch writes for expanded tensors, are materialised by collation).
        Written as one plain loop: it runs for every tensor of every entry."""
        if type(storage) is not torch.storage.TypedStorage:
            raise self._refuse(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
        element_size = torch._utils._element_size(storage.dtype)
        available = storage._untyped_storage.nbytes() // element_size
        if type(offset) is not int or offset < 0:
            raise self._refuse(f"tensor storage offset is {offset!r}, expected a non-negative integer")
        if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride) or len(size) > 64:
            raise self._refuse(f"tensor with size {_short(size)} and stride {_short(stride)}")
        numel, last = 1, offset
        for n, step in zip(size, stride):
            if type(n) is not int or n < 0:
                raise self._refuse(f"tensor size is {n!r}, expected a non-negative integer")
            if type(step) is not int or step < 0:
                raise self._refuse(f"tensor stride is {step!r}, expected a non-negative integer")
            numel *= n
            last += (n - 1) * step
        if numel and last >= available:
            raise self._refuse(
                f"tensor view (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) reaches element "
                f"{last} of a storage of {available} elements"
            )
        self._charge(numel * element_size, "tensor", size)

    def _rebuild_tensor_v2(
        self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
        backward_hooks: Any = None, metadata: Any = None,
    ) -> torch.Tensor:
        if type(requires_grad) is not bool or (backward_hooks is not None and len(backward_hooks)) or metadata:
            raise self._refuse("tensor with backward hooks or metadata")
        tensor = self._rebuild_tensor(storage, offset, size, stride)
        return tensor.requires_grad_() if requires_grad else tensor

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
        """What ``torch._utils._rebuild_tensor`` does for a CPU storage, once the view is checked."""
        self._check_view(storage, offset, size, stride)
        return torch.empty((0,), dtype=storage.dtype).set_(storage._untyped_storage, offset, size, stride)

    def _numpy_dtype(self, spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
        if spec in ("O", "O4", "O8"):  # a careless writer's object array, not necessarily an attack
            raise UnsafePickleError(
                f"{self.source}: the entry holds a numpy array of Python objects (dtype object); expected "
                "numeric arrays (store fields as float/int arrays or tensors; object arrays can run code "
                "when unpickled, so they are refused)"
            )
        if not isinstance(spec, str) or not _DTYPE_STRING.fullmatch(spec) or type(align) is not bool:
            raise self._refuse(f"numpy.dtype{_short((spec, align, copy))} (only plain numeric and string dtypes)")
        return np.dtype(spec, align, copy)

    def _check_dtype(self, dtype: Any) -> np.dtype:
        """The dtype after its pickled state was applied must be exactly the plain dtype it names."""
        if not isinstance(dtype, np.dtype):
            raise self._refuse(f"numpy value with dtype {_short(dtype)}")
        plain = np.dtype(dtype.str)
        if dtype != plain or dtype.flags != plain.flags or dtype.itemsize != plain.itemsize:
            raise self._refuse(f"numpy dtype {dtype.str} with a modified state (flags {dtype.flags})")
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise self._refuse(f"numpy value with dtype {dtype!r} (only plain numeric and string dtypes)")
        return dtype

    def _numpy_scalar(self, dtype: Any, data: Any = None) -> Any:
        dtype = self._check_dtype(dtype)
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise self._refuse(f"numpy scalar of {dtype.str} from {type(data).__name__}")
        return _NUMPY_SCALAR(dtype, data)

    def _numpy_frombuffer(self, buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        """Protocol 5 writes contiguous arrays as ``_frombuffer(bytes, dtype, shape, order)``."""
        dtype = self._check_dtype(dtype)
        if not isinstance(shape, tuple) or order not in ("C", "F") or not isinstance(buffer, (bytes, bytearray)):
            raise self._refuse(f"numpy._frombuffer with shape {_short(shape)} and order {order!r}")
        nbytes = math.prod(self._int(n, "numpy shape") for n in shape) * dtype.itemsize
        if len(buffer) != nbytes:
            raise self._refuse(f"numpy array of shape {shape} and dtype {dtype.str} with {len(buffer)} data bytes (expected {nbytes})")
        self._charge(nbytes, f"numpy array of shape {shape}")
        return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)

    def _numpy_reconstruct(self, cls: Any, shape: Any, typecode: Any) -> np.ndarray:
        if not isinstance(cls, _NdarrayClass) or not isinstance(shape, tuple) or typecode != b"b":
            raise self._refuse(f"numpy._reconstruct{_short((cls, shape, typecode))}")
        self._charge(math.prod(self._int(n, "numpy shape") for n in shape), "numpy array")
        array = _NUMPY_RECONSTRUCT(_CheckedArray, shape, typecode)
        array.__dict__["_unpickler"] = self
        self.arrays += 1
        return array

    def _check_array_state(self, state: Any) -> None:
        """``(version, shape, dtype, is_fortran, data)`` with ``data`` exactly the array's bytes."""
        if not isinstance(state, tuple) or len(state) != 5:
            raise self._refuse(f"numpy array state {_short(state)}")
        _, shape, dtype, fortran, data = state
        dtype = self._check_dtype(dtype)
        if not isinstance(shape, tuple) or type(fortran) is not bool:
            raise self._refuse(f"numpy array state {_short(state)}")
        nbytes = math.prod(self._int(n, "numpy shape") for n in shape) * dtype.itemsize
        if not isinstance(data, (bytes, bytearray)) or len(data) != nbytes:
            raise self._refuse(f"numpy array of shape {shape} and dtype {dtype.str} with {len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__} data bytes (expected {nbytes})")
        self._charge(nbytes, f"numpy array of shape {shape}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _plain_arrays(value: Any) -> Any:
    """``value`` with every unpickled :class:`_CheckedArray` turned into a plain ndarray."""
    if isinstance(value, _CheckedArray):
        return value.view(np.ndarray)
    if isinstance(value, PickledRecord):
        value.state = _plain_arrays(value.state)
        return value
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _plain_arrays(item)
        return value
    if isinstance(value, list):
        value[:] = [_plain_arrays(item) for item in value]
        return value
    if isinstance(value, tuple):
        return tuple(_plain_arrays(item) for item in value)
    return value


def safe_loads(raw: bytes, source: str) -> Any:
    """Unpickle ``raw`` with the allow-list; ``source`` (e.g. ``"file.lmdb, key b'3'"``) goes into errors."""
    try:
        unpickler = SafeUnpickler(io.BytesIO(raw), source, len(raw))
        value = unpickler.load()
        return _plain_arrays(value) if unpickler.arrays else value
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
