"""Count device-to-host synchronisations by recognising the operations that cause them.

A host sync stalls the CPU until the accelerator has finished all queued work, and
``torch.compile`` cannot capture a graph across one. :class:`SyncCounter` records every
operation that forces one while it is active::

    with SyncCounter() as syncs:
        loss = model(batch).sum()
        loss.backward()
    assert syncs.count == 0, syncs.summary()

It recognises the operations themselves, so it works on CPU, where nothing really waits:

* reading a value on the host: ``aten._local_scalar_dense`` (``.item()``, ``int()``,
  ``float()``, ``bool()`` / ``if tensor:``), ``Tensor.tolist()``, ``Tensor.numpy()``,
  ``torch.equal``, ``torch.allclose``, ``aten.is_nonzero``;
* outputs whose shape depends on the data: ``nonzero`` (``argwhere``, one-argument
  ``where``), ``masked_select``, indexing or index-assignment with a boolean mask,
  ``unique`` (all variants), ``bincount``, ``repeat_interleave`` without ``output_size``;
* error checks that read a device flag: ``aten._linalg_check_errors``;
* blocking copies between the host and an accelerator (``.cpu()``, ``.to("cpu")``,
  ``torch.tensor(x, device="cuda")``): these only occur, and are only counted, when a
  non-CPU device is involved.

``include_cpu=False`` counts the first three groups only for tensors on an accelerator
(a ``.item()`` of a tensor that lives on the CPU, such as a non-capturable optimizer's step
counter, costs nothing on a GPU run). The default counts them on every device, which is
what a CPU-only test needs to see the syncs a GPU run would make.

Counting covers the thread that entered the counter and the autograd engine's backward
(which inherits the mode). Dispatch modes see operations below autograd, so ``backward``
is included.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

#: Operations that return a host value computed on the device.
_HOST_READS = {
    aten._local_scalar_dense.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.allclose.default,
}
#: Operations whose output shape depends on tensor values.
_DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
}
_CHECK_ERRORS = {aten._linalg_check_errors.default}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEX_WITH_MASK = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}
#: Frames skipped when naming where an event came from (libraries and this module).
LIBRARY_FRAMES = (
    "/torch/", "/lightning/", "/lightning_utilities/", "/torchmetrics/", "escn_train/testing/sync_counter.py",
)
#: Tensor methods that read data on the host without passing through the dispatcher.
_HOST_METHODS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy"}


@dataclass
class SyncEvent:
    """One recognised synchronisation: the operation, why it syncs, and where it was called."""

    op: str
    reason: str
    stack: list[str] = field(default_factory=list)

    def origin(self, skip: tuple[str, ...] = ()) -> str:
        """The innermost recorded frame outside torch and this module (``file:line in func``)."""
        for frame in reversed(self.stack):
            if not any(part in frame for part in skip):
                return frame
        return self.stack[-1] if self.stack else "?"


def _tensors(args: Any, kwargs: Any) -> list[torch.Tensor]:
    return [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]


def _on_accelerator(tensors: list[torch.Tensor]) -> bool:
    return any(t.device.type not in ("cpu", "meta") for t in tensors)


def _classify(func: Any, args: tuple, kwargs: dict, out: Any) -> str | None:
    """Why ``func`` syncs (a short reason), or None; device rules for ``include_cpu`` are applied by the caller."""
    if func in _HOST_READS:
        return "host read"
    if func in _DATA_DEPENDENT:
        return "data-dependent shape"
    if func in _CHECK_ERRORS:
        return "error check"
    if func in _REPEAT_INTERLEAVE:
        return None if kwargs.get("output_size") is not None else "data-dependent shape"
    if func in _INDEX_WITH_MASK:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return "boolean-mask indexing"
        return None
    if func in _COPIES:
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
        else:
            src, dst = args[0], out
            blocking = not kwargs.get("non_blocking", False)
        if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)):
            return None
        kinds = {src.device.type, dst.device.type}
        if blocking and "cpu" in kinds and len(kinds - {"meta"}) == 2:
            return "device-to-host copy" if dst.device.type == "cpu" else "blocking host-to-device copy"
    return None


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, counter: "SyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        reason = _classify(func, args, kwargs, out)
        if reason is not None and (
            reason.endswith("copy") or self.counter.include_cpu or _on_accelerator(_tensors(args, kwargs))
        ):
            self.counter._record(str(func.overloadpacket.__name__), reason)
        return out


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, counter: "SyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = _HOST_METHODS.get(func)
        if name is not None and args and isinstance(args[0], torch.Tensor):
            if self.counter.include_cpu or args[0].device.type != "cpu":
                self.counter._record(name, "host read")
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Context manager recording device-to-host synchronising operations (see module docstring).

    Args:
        include_cpu: also count host reads of CPU tensors (default True, for CPU-only tests).
        record_stack: keep the Python call stack of each event (for :meth:`summary` and
            :meth:`count_outside`); costs a few microseconds per event.
    """

    def __init__(self, include_cpu: bool = True, record_stack: bool = True) -> None:
        self.include_cpu = include_cpu
        self.record_stack = record_stack
        self.events: list[SyncEvent] = []
        self._modes: list[Any] = []

    @property
    def count(self) -> int:
        """Number of synchronising operations recorded."""
        return len(self.events)

    def by_op(self) -> Counter:
        """Operation name → count."""
        return Counter(e.op for e in self.events)

    def by_origin(self, skip: tuple[str, ...] = LIBRARY_FRAMES) -> Counter:
        """``file:line in func`` of the innermost frame outside ``skip`` → count."""
        return Counter(f"{e.op} at {e.origin(skip)}" for e in self.events)

    def count_matching(self, path_part: str) -> int:
        """Events with a recorded stack frame whose file path contains ``path_part``."""
        return sum(any(path_part in frame for frame in e.stack) for e in self.events)

    def summary(self) -> str:
        """One line per (operation, origin) with its count, most frequent first."""
        lines = [f"{n} × {where}" for where, n in self.by_origin().most_common()]
        return f"{self.count} host syncs" + ("".join(f"\n  {line}" for line in lines) if lines else "")

    def reset(self) -> None:
        self.events.clear()

    def _record(self, op: str, reason: str) -> None:
        stack = []
        if self.record_stack:
            stack = [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_stack()[:-1]]
        self.events.append(SyncEvent(op, reason, stack))

    def __enter__(self) -> "SyncCounter":
        self._modes = [_FunctionRecorder(self), _DispatchRecorder(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
