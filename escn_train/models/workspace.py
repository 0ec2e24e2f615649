"""Buffers that forward passes keep from one call to the next.

Without autograd, the message blocks' large edge-sized intermediates (tens of MB) are
needed only until the next layer. Allocated fresh, each costs a page fault per 4 KB page
on first touch, on every call — on virtual machines a large share of an inference step.
A :class:`Workspace` keeps them instead: named flat buffers, grown when a call needs more
and otherwise reused, one set per thread (so that threads sharing a model do not share
buffers). A model's buffers go with the model; the fast stages' operators, which compiled
models, exported programs and AOTInductor packages call, keep theirs in one workspace of
their own: :func:`release_buffers` releases those too.

Values that an autograd graph saves for backward (training) cannot live in a buffer that
the next layer overwrites. :meth:`Workspace.unshared` keeps pools of buffers for them, and
hands out only a buffer whose storage no other tensor shares any more. Inductor's CUDA-graph
trees use the same storage reference count to decide that a buffer is free.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

#: Extra capacity when a buffer grows, so that graphs of slowly varying size (molecular
#: dynamics) do not reallocate on every call.
_GROWTH = 1.25
#: Buffers per pool of :meth:`Workspace.unshared` (one per message block is the most a
#: training step holds at once).
_POOL_LIMIT = 64


def _storage_users(tensor: torch.Tensor) -> int:
    """References to ``tensor``'s storage: its own, the temporary storage object's, and one
    per other tensor (view, autograd saved tensor) that shares it."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


#: :func:`_storage_users` of a tensor that shares its storage with no other.
_UNSHARED = _storage_users(torch.empty(1))


def _fits(buffer: torch.Tensor, numel: int, like: torch.Tensor) -> bool:
    """Whether ``buffer`` can back ``numel`` values of ``like``'s dtype and device."""
    return buffer.numel() >= numel and buffer.dtype == like.dtype and buffer.device == like.device


def _new_buffer(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer for ``numel`` values of ``like``'s dtype and device, with headroom."""
    return like.new_empty(max(1, int(numel * _GROWTH)))


class Workspace:
    """Named buffers reused across calls, per thread; :meth:`clear` releases them."""

    def __init__(self) -> None:
        self._local = threading.local()
        _WORKSPACES.add(self)

    def _buffers(self) -> dict[str, torch.Tensor]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        return buffers

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (``like``'s dtype and device) backed by the
        buffer ``name``. It stays valid until the next request for the same name."""
        numel = math.prod(shape)
        buffers = self._buffers()
        buffer = buffers.get(name)
        if buffer is None or not _fits(buffer, numel, like):
            buffers.pop(name, None)  # release the old one before allocating its successor
            buffer = buffers[name] = _new_buffer(numel, like)
        return buffer[:numel].view(shape)

    def unshared(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` backed by a buffer of the pool ``name`` that no
        other tensor shares (an autograd graph, a view, a caller's reference): values that a
        graph saves for backward can live there, and the next step writes into pages
        already touched. Busy buffers are skipped; when all are, the pool grows by one, up
        to :data:`_POOL_LIMIT` (beyond that, a fresh tensor)."""
        numel = math.prod(shape)
        pool = self._pools().setdefault(name, [])
        for i, buffer in enumerate(pool):
            if _storage_users(buffer) > _UNSHARED:
                continue
            if not _fits(buffer, numel, like):
                del buffer
                pool[i] = None  # release the old one before allocating its successor
                pool[i] = _new_buffer(numel, like)
            return pool[i][:numel].view(shape)
        if len(pool) >= _POOL_LIMIT:
            return like.new_empty(shape)
        pool.append(_new_buffer(numel, like))
        return pool[-1][:numel].view(shape)

    def _pools(self) -> dict[str, list[torch.Tensor]]:
        pools = getattr(self._local, "pools", None)
        if pools is None:
            pools = self._local.pools = {}
        return pools

    def clear(self) -> None:
        """Release this thread's buffers."""
        self._local.buffers = {}
        self._local.pools = {}

    def nbytes(self) -> int:
        """Bytes this thread's buffers hold."""
        kept = [*self._buffers().values(), *(b for pool in self._pools().values() for b in pool)]
        return sum(b.numel() * b.element_size() for b in kept)

    def __getstate__(self) -> dict:
        return {}  # buffers are caches: copies and pickles start empty

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()
        _WORKSPACES.add(self)


#: Every live workspace (models' and the operators'), for :func:`release_buffers`.
_WORKSPACES: weakref.WeakSet[Workspace] = weakref.WeakSet()


def release_buffers() -> int:
    """Release the calling thread's kept buffers in every workspace: every model's and the
    operators' (compiled models, exported programs and AOTInductor packages run in Python).
    Returns the bytes released; the next call allocates them again."""
    released = 0
    for workspace in list(_WORKSPACES):
        released += workspace.nbytes()
        workspace.clear()
    return released
