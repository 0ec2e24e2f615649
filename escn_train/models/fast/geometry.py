"""The per-graph constants of the fast message blocks, built once per forward pass.

Edge-sized tensors live in the *target-slot layout*: one row per slot of the edges grouped
by target atom (:mod:`.slots`), zero in the empty slots. The grid stage and the rotation
back then read their input as it is, and the target block's products need no reordering.
Every shape follows from the atom and edge counts, and nothing is read back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from escn_train.models.fast.slots import GROUP_SIZE, EdgeGroups, target_layout
from escn_train.models.workspace import Workspace


def _tracing() -> bool:
    """Traced by ``torch.compile`` or ``torch.export``."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _compiling() -> bool:
    """Traced by ``torch.compile`` (not by ``torch.export``)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


@dataclass
class MessageGeometry:
    """Per-graph constants shared by every message block of a forward pass.

    ``groups``: the edges grouped by source and by target atom. The target groups' slots
    are the rows of every edge-sized tensor: ``slot_edge`` is the edge in each slot (edge 0
    in empty slots), ``source_slot`` the source-group slot of that edge (an always-empty
    source slot for empty target slots) and ``target_slot`` the target slot of each source
    slot's edge (0 for empty source slots, whose rows are zero). ``rows[side][key][m]``:
    each order's Wigner rows (of order m, or ±m, restricted to degrees l >= m) padded to
    that side's groups; ``back_rows``: the reduced rotation padded to the target groups
    (rotation back and sum over each target atom's edges). Eager code takes its large
    edge-sized buffers from ``workspace`` through :meth:`scratch` (see
    :mod:`escn_train.models.workspace`); traced code allocates them."""

    groups: tuple[EdgeGroups, EdgeGroups]
    slot_edge: torch.Tensor
    source_slot: torch.Tensor
    target_slot: torch.Tensor
    rows: tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]
    back_rows: torch.Tensor
    workspace: Workspace

    def scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The workspace's buffer ``name``, for values no autograd graph keeps (it is valid
        until the next request for that name)."""
        if _tracing():
            return like.new_empty(shape)
        return self.workspace.get(name, shape, like)

    @property
    def num_slots(self) -> int:
        return self.groups[1].num_slots

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the geometry, in the order :meth:`from_tensors` reads them."""
        source, target = self.groups
        rows = [r for side in self.rows for r in (*side["plain"], *side["swapped"][1:])]
        return [source.slot, source.group_atom, target.slot, target.group_atom, self.slot_edge, self.source_slot,
                self.target_slot, self.back_rows, *rows]

    @staticmethod
    def from_tensors(
        tensors: list[torch.Tensor], sizes: tuple[int, int], target_one_per_atom: bool, workspace: Workspace
    ) -> MessageGeometry:
        """The geometry of :meth:`tensors`, with the groups' ``sizes`` (source, target); every
        count follows from the tensors' shapes."""
        source_edges, source_atom, target_edges, target_atom, slot_edge, source_slot, target_slot, back_rows, *rows = (
            tensors)
        groups = (EdgeGroups(source_edges, source_atom, sizes[0], source_atom.shape[0], False),
                  EdgeGroups(target_edges, target_atom, sizes[1], target_atom.shape[0], target_one_per_atom))
        per_side = len(rows) // 2
        orders = (per_side + 1) // 2
        sides = tuple({"plain": rows[i:i + orders], "swapped": [None, *rows[i + orders:i + per_side]]}
                      for i in (0, per_side))
        return MessageGeometry(groups, slot_edge, source_slot, target_slot, sides, back_rows, workspace)

    def hidden(self, side: int, rows: torch.Tensor, per_atom: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """rows_e @ per_atom[atom of e on ``side``] in the target-slot layout, [slots, r, W]
        (with ``reuse``, in workspace buffers)."""
        groups = self.groups[side]
        out = None
        if reuse:
            shape = (groups.num_slots, rows.shape[1] // groups.size, per_atom.shape[-1])
            out = self.scratch(f"hidden{side}", shape, per_atom)
        padded = groups.padded_products(rows, per_atom, out)
        if side == 1:
            return padded
        if reuse:
            out = self.scratch("hidden", (self.num_slots, *padded.shape[1:]), per_atom)
            return torch.index_select(padded, 0, self.source_slot, out=out)
        return padded.index_select(0, self.source_slot)

    def sum_to_atoms(
        self, side: int, rows: torch.Tensor, values: torch.Tensor, num_atoms: int, reuse: bool = False
    ) -> torch.Tensor:
        """Σ over each atom's edges (on ``side``) of rows_eᵀ @ values[slot of e], values in
        the target-slot layout -> [atoms, K, W] (with ``reuse``, reordered in a workspace
        buffer)."""
        groups = self.groups[side]
        if side == 0:
            if reuse:
                out = self.scratch("source_values", (groups.num_slots, *values.shape[1:]), values)
                values = torch.index_select(values, 0, self.target_slot, out=out)
            else:
                values = values.index_select(0, self.target_slot)
        return groups.sum_padded(rows, values, num_atoms)


def order_rows_index(lmax: int, mmax: int) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Flat indices into a [(lmax+1)^2, (lmax+1)^2] Wigner matrix, per order m, of rows ±m
    on the columns of degree l >= m (each column read in its own degree block), with their
    shape: m = 0 -> (1, K_0), m > 0 -> (2, K_m) rows (+m, -m), K_m = (lmax+1)^2 - m^2."""
    size = (lmax + 1) ** 2
    degree = [l for l in range(lmax + 1) for _ in range(2 * l + 1)]
    out = []
    for m in range(mmax + 1):
        signs = (0,) if m == 0 else (1, -1)
        columns = range(m * m, size)
        index = [(degree[k] ** 2 + degree[k] + s * m) * size + k for s in signs for k in columns]
        out.append((torch.tensor(index, dtype=torch.long), (len(signs), len(columns))))
    return out


def imaginary_rows(rows: torch.Tensor) -> torch.Tensor:
    """[E, 2, ...] rows (+m, -m) -> (-rows[-m], +rows[+m]): how an imaginary part enters the
    output rows of its order."""
    return torch.stack([-rows[:, 1], rows[:, 0]], dim=1)


def build_geometry(
    wigner: torch.Tensor,
    edge_index: torch.Tensor,
    num_atoms: int,
    rows_index: list[torch.Tensor],
    rows_shape: list[tuple[int, int]],
    rotation_rows: torch.Tensor,
    max_neighbors: int | None = None,
    workspace: Workspace | None = None,
) -> MessageGeometry:
    """:class:`MessageGeometry` of a graph (at least one edge) from its Wigner matrices
    [E, S, S]. ``max_neighbors``: the graph's bound on edges per target atom (one group of
    that many slots per atom; None: no bound); ``workspace``: the model's kept buffers (a
    fresh one when None)."""
    size, one_per_atom = target_layout(max_neighbors)
    target = EdgeGroups.build(edge_index[1], num_atoms, size, one_per_atom)
    source = EdgeGroups.build(edge_index[0], num_atoms, GROUP_SIZE, False)
    # An edge left out of the target layout is left out of the source layout too.
    source = replace(source, slot=torch.where(target.slot < target.num_slots, source.slot, source.num_slots))
    groups = (source, target)
    slot_edge = target.slot_edges()
    # The source layout's last slot is always empty (see .slots): empty target slots read it.
    source_slot = target.scatter(source.slot, fill=source.num_slots - 1)
    target_slot = source.scatter(target.slot.clamp(max=target.num_slots - 1))
    flat = wigner.flatten(1)
    per_order = [flat.index_select(1, index).view(-1, *shape) for index, shape in zip(rows_index, rows_shape)]
    swapped = [None] + [imaginary_rows(r) for r in per_order[1:]]
    rows = tuple(
        {
            "plain": [g.pad(r) for r in per_order],
            "swapped": [None] + [g.pad(r) for r in swapped[1:]],
        }
        for g in groups
    )
    back_rows = target.pad(wigner.index_select(1, rotation_rows))
    return MessageGeometry(
        groups, slot_edge, source_slot, target_slot, rows, back_rows, Workspace() if workspace is None else workspace
    )
