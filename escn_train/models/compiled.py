"""``torch.compile`` of the model's forward, built on first use and kept between calls."""

from __future__ import annotations

from typing import Any, Callable

import torch


#: The dynamic dimension of each of ``forward``'s seven arguments (pos, batch_idx, natoms,
#: atomic_numbers, edge_index, edge_distance, edge_distance_vec) and the count it holds:
#: the one description of them that ``torch.compile`` here and ``torch.export``
#: (:func:`escn_train.inference.export.dynamic_shapes`) both follow.
FORWARD_DYNAMIC_DIMS = ((0, "atoms"), (0, "atoms"), (0, "structures"), (0, "atoms"), (1, "edges"), (0, "edges"),
                        (0, "edges"))


class CompiledForward:
    """Calls ``forward(pos, batch_idx, natoms, atomic_numbers, edge_index, edge_distance,
    edge_distance_vec)`` through one ``torch.compile``.

    Only the atom, edge and structure counts are dynamic (:data:`FORWARD_DYNAMIC_DIMS`, as
    for ``torch.export``): the fixed dimensions (3 coordinates, 2 edge endpoints) stay
    constants, which halves the traced size arithmetic and the time spent tracing (large
    model, first training call: 75 s against 46 s). A batch of one structure is the common
    inference case: the structure count is unbacked, so size 1 neither specialises nor
    recompiles. Pickling and deepcopy drop the compiled callable (it supports neither); the
    next call compiles again.
    """

    def __init__(self) -> None:
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, forward: Callable[..., Any], *args: torch.Tensor) -> Any:
        if self._compiled is None:
            self._compiled = torch.compile(forward)
        marked = []
        for tensor, (dim, count) in zip(args, FORWARD_DYNAMIC_DIMS, strict=True):
            if count == "structures":
                if tensor._base is not None:  # a view would be guarded through its base: mark a tensor of its own
                    tensor = tensor.clone()
                torch._dynamo.decorators.mark_unbacked(tensor, dim)
            else:
                # maybe_: a graph of one atom or one edge specialises (and a later size
                # recompiles once, dynamic) instead of failing.
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
            marked.append(tensor)
        return self._compiled(*marked)

    def __getstate__(self) -> dict[str, Any]:
        return {"_compiled": None}


@torch.compiler.nested_compile_region
def compiled_layer(
    layer: torch.nn.Module, x: torch.Tensor, atomic_numbers: torch.Tensor, edge_distance: torch.Tensor,
    edge_index: torch.Tensor, wigner: torch.Tensor, expanded_distance: Any, geometry: Any,
) -> torch.Tensor:
    """A message-passing layer after the first, as one nested compile region: under
    ``torch.compile`` its code is generated once and reused by every such layer (the first
    layer differs: its input has degree zero only)."""
    return layer(x, atomic_numbers, edge_distance, edge_index, wigner, expanded_distance=expanded_distance,
                 geometry=geometry)
