"""``torch.compile`` of the model's forward, built on first use and kept between calls."""

from __future__ import annotations

from typing import Any, Callable

import torch

from escn_train.models.fast.distance import DistanceBands
from escn_train.models.fast.geometry import MessageGeometry
from escn_train.models.so3 import edge_frames


#: The dynamic dimension of each of ``forward``'s seven arguments (pos, batch_idx, natoms,
#: atomic_numbers, edge_index, edge_distance, edge_distance_vec) and the count it holds:
#: the one description of them that ``torch.compile`` here and ``torch.export``
#: (:func:`escn_train.inference.export.dynamic_shapes`) both follow.
FORWARD_DYNAMIC_DIMS = ((0, "atoms"), (0, "atoms"), (0, "structures"), (0, "atoms"), (1, "edges"), (0, "edges"),
                        (0, "edges"))


class CompiledForward:
    """Calls an eSCN's ``forward(pos, batch_idx, natoms, atomic_numbers, edge_index,
    edge_distance, edge_distance_vec)`` with its graph constants built in eager mode and the
    layers and readout through one ``torch.compile``.

    The graph constants (edge frames, Wigner matrices, slot layout, distance bands) hold no
    parameter and no gradient, and eager mode builds them as fast: compiling them only added
    generated kernels (large model, first training call, 2 threads: 113-116 s with them
    compiled, 77-85 s without). They enter the compiled code as inputs, rebuilt from their
    tensors there (:meth:`MessageGeometry.from_tensors`).

    Only the atom, edge and structure counts are dynamic (:data:`FORWARD_DYNAMIC_DIMS`, as
    for ``torch.export``), and every constant's first dimension, which follows from them.
    The fixed dimensions (3 coordinates, 2 edge endpoints) stay constants, which halves the
    traced size arithmetic and the time spent tracing (large model, first training call:
    75 s against 46 s). A batch of one structure is the common inference case: the
    structure count is unbacked, so size 1 neither specialises nor recompiles. Pickling and
    deepcopy drop the compiled callable (it supports neither); the next call compiles again.
    """

    def __init__(self) -> None:
        self._compiled: Callable[..., Any] | None = None

    def __call__(
        self, model: Any, pos: torch.Tensor, batch_idx: torch.Tensor, natoms: torch.Tensor,
        atomic_numbers: torch.Tensor, edge_index: torch.Tensor, edge_distance: torch.Tensor,
        edge_distance_vec: torch.Tensor,
    ) -> Any:
        if self._compiled is None:
            self._compiled = torch.compile(_network)
        wigner, geometry, expanded = model.graph_constants(
            edge_index, edge_distance, edge_frames(edge_distance_vec, model.random_frames), atomic_numbers.shape[0])
        constants, layout = [wigner], None
        if geometry is not None:
            banded = isinstance(expanded, DistanceBands)
            constants += [*geometry.tensors(), *((expanded.values, expanded.columns, expanded.row) if banded
                                                 else (expanded,))]
            target = geometry.groups[1]
            layout = (geometry.groups[0].size, target.size, target.one_per_atom, banded)
        marked = []
        graph = (batch_idx, natoms, atomic_numbers, edge_index, edge_distance)
        for tensor, (dim, count) in zip(graph, FORWARD_DYNAMIC_DIMS[1:6], strict=True):
            if count == "structures":
                if tensor._base is not None:  # a view would be guarded through its base: mark a tensor of its own
                    tensor = tensor.clone()
                torch._dynamo.decorators.mark_unbacked(tensor, dim)
            else:
                # maybe_: a graph of one atom or one edge specialises (and a later size
                # recompiles once, dynamic) instead of failing.
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
            marked.append(tensor)
        for tensor in constants:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self._compiled(model, *marked, *constants, layout=layout)

    def __getstate__(self) -> dict[str, Any]:
        return {"_compiled": None}


def _network(
    model: Any, batch_idx: torch.Tensor, natoms: torch.Tensor, atomic_numbers: torch.Tensor,
    edge_index: torch.Tensor, edge_distance: torch.Tensor, wigner: torch.Tensor, *constants: torch.Tensor,
    layout: tuple[int, int, bool, bool] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies and forces from the graph and its constants (as :class:`CompiledForward`
    passes them; ``layout``: the groups' sizes, whether the target side has one group per
    atom, and whether the distances are banded; None without geometry)."""
    geometry = expanded = None
    if layout is not None:
        source_size, target_size, one_per_atom, banded = layout
        split = len(constants) - (3 if banded else 1)
        geometry = MessageGeometry.from_tensors(list(constants[:split]), (source_size, target_size), one_per_atom,
                                                model.workspace)
        expanded = DistanceBands(*constants[split:]) if banded else constants[split]
    x = model.message_passing(atomic_numbers, edge_index, edge_distance, wigner, geometry, expanded)
    return model.readout(x, batch_idx, natoms.shape[0])


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
