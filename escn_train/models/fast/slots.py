"""Edges grouped by atom in a static slot layout, so that per-edge rotations become a few
well-shaped batched GEMMs, and so that no shape depends on the graph's content.

A message block rotates every edge's source and target features into the edge frame and
applies the first SO(2) layer: ``W (D_e x_atom)``. Both maps are linear and act on
different axes (``W`` on channels within a degree l, ``D_e`` on orders within l), so
``W (D_e x) = D_e (W x)``: the channel map runs once per *atom*, and what is left per edge
is a contraction over the (l, m') coefficients, about 20x fewer operations than the
per-edge GEMM, and no gathered copy of the features. Likewise the rotation back and the
sum over a target atom's edges is one product per atom.

Those per-atom products need the edges of an atom side by side: :class:`EdgeGroups` puts
them in groups of ``size`` slots, zero in the empty ones, so that each product is a batched
matrix product over groups. The number of groups is fixed by the atom and edge *counts*
alone (never by a degree read back from the device), so building the layout needs no
device-to-host synchronisation and traces with dynamic shapes for ``torch.export`` and
``torch.compile``:

- *one group per atom* of ``size`` slots (the target side, ``size = max_neighbors``: the
  graph keeps at most that many edges per target). Edges beyond an atom's ``size`` have
  no slot: they are left out (eSCN's input checks refuse such graphs in eager mode);
- *groups of* ``size`` (the source side, whose degrees have no bound): an atom with d edges
  takes ceil(d / size) consecutive groups, so ``num_atoms + ceil(E / size)`` groups hold any
  graph, and the last group is always empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Slots per group on the source side (and on the target side when max_neighbors is larger
#: than :data:`MAX_SLOTS_PER_ATOM`).
GROUP_SIZE = 16
#: Largest max_neighbors given one group per target atom; beyond it the padding to the
#: bound would cost more than the groups of GROUP_SIZE's spare groups.
MAX_SLOTS_PER_ATOM = 64


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


@dataclass(frozen=True)
class EdgeGroups:
    """Edges of each atom (one endpoint) in zero-padded groups of ``size`` slots.

    ``slot[e]`` is edge e's row in the layout of ``num_groups * size`` rows, or
    ``num_slots`` for an edge left out (one-per-atom layout, more than ``size`` edges);
    ``group_atom[g]`` the atom group g belongs to (spare groups: the last atom, with zero
    rows). ``one_per_atom``: group g is atom g, so per-group results need no gather or sum.
    """

    slot: torch.Tensor
    group_atom: torch.Tensor
    size: int
    num_groups: int
    one_per_atom: bool

    @property
    def num_slots(self) -> int:
        return self.num_groups * self.size

    @staticmethod
    def build(atom: torch.Tensor, num_atoms: int, size: int, one_per_atom: bool) -> EdgeGroups:
        """Group the edges by ``atom`` ([E] endpoint per edge), keeping each atom's edges in
        their order. ``one_per_atom``: ``size`` slots per atom, else groups of ``size``."""
        num_edges = atom.shape[0]
        order = torch.argsort(atom, stable=True)
        sorted_atom = atom.index_select(0, order)
        # An edge's rank among its atom's edges: its position after its atom's first edge.
        first = torch.searchsorted(sorted_atom, sorted_atom)
        rank = torch.empty_like(atom).index_copy_(0, order, torch.arange(num_edges, device=atom.device) - first)
        atoms = torch.arange(num_atoms, device=atom.device)
        if one_per_atom:
            slot = torch.where(rank < size, atom * size + rank, num_atoms * size)
            return EdgeGroups(slot, atoms, size, num_atoms, True)
        num_groups = num_atoms + _ceil_div(num_edges, size)
        counts = torch.zeros(num_atoms, dtype=atom.dtype, device=atom.device).index_add_(0, atom, torch.ones_like(atom))
        last_group = torch.cumsum(_ceil_div(counts, size), 0)  # one past each atom's last group
        first_group = last_group - _ceil_div(counts, size)
        slot = (first_group.index_select(0, atom) + rank // size) * size + rank % size
        groups = torch.arange(num_groups, device=atom.device)
        group_atom = torch.searchsorted(last_group, groups, right=True).clamp_(max=max(num_atoms - 1, 0))
        return EdgeGroups(slot, group_atom, size, num_groups, False)

    def scatter(self, values: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """[E, ...] per-edge values -> [slots, ...], ``fill`` in empty slots."""
        out = values.new_full((self.num_slots + 1, *values.shape[1:]), fill)  # + the left-out edges' row
        return out.index_copy_(0, self.slot, values)[: self.num_slots]

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """[E, rows, cols] per-edge values -> [groups, size * rows, cols], zeros in empty slots."""
        return self.scatter(values).view(self.num_groups, self.size * values.shape[1], values.shape[2])

    def per_group(self, per_atom: torch.Tensor) -> torch.Tensor:
        """[atoms, ...] -> [groups, ...]: each group's copy of its atom's values."""
        return per_atom if self.one_per_atom else per_atom.index_select(0, self.group_atom)

    def slot_edges(self) -> torch.Tensor:
        """The edge in each slot, [slots] (edge 0 in empty slots)."""
        return self.scatter(torch.arange(self.slot.shape[0], device=self.slot.device))

    def padded_products(
        self, padded_rows: torch.Tensor, per_atom: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """out[slot of e] = rows_e @ values[atom(e)], zero in empty slots.

        ``padded_rows`` [groups, size * r, K] (from :meth:`pad`), ``per_atom`` [atoms, K, W]
        -> [slots, r, W] (into ``out`` when given).
        """
        rows = padded_rows.shape[1] // self.size
        values = self.per_group(per_atom)
        if out is None:
            return torch.bmm(padded_rows, values).view(self.num_slots, rows, values.shape[-1])
        torch.bmm(padded_rows, values, out=out.view(self.num_groups, padded_rows.shape[1], values.shape[-1]))
        return out

    def sum_padded(self, padded_rows: torch.Tensor, padded_values: torch.Tensor, num_atoms: int) -> torch.Tensor:
        """out[a] = Σ_{e of a} rows_eᵀ @ values[slot of e].

        ``padded_rows`` [groups, size * r, K], ``padded_values`` [slots, r, W] or
        [groups, size * r, W] -> [atoms, K, W].
        """
        padded_values = padded_values.reshape(self.num_groups, padded_rows.shape[1], -1)
        summed = torch.bmm(padded_rows.transpose(1, 2), padded_values)
        return self.per_atom_sums(summed, num_atoms)

    def per_atom_sums(self, per_group: torch.Tensor, num_atoms: int) -> torch.Tensor:
        """[groups, ...] -> [atoms, ...]: the sum of each atom's groups."""
        if self.one_per_atom:
            return per_group
        return per_group.new_zeros(num_atoms, *per_group.shape[1:]).index_add_(0, self.group_atom, per_group)


def target_layout(max_neighbors: int | None) -> tuple[int, bool]:
    """(size, one_per_atom) of the target side's groups: one group of ``max_neighbors``
    slots per atom when the graph guarantees that bound and it is small, else groups of
    :data:`GROUP_SIZE`."""
    if max_neighbors is not None and 0 < max_neighbors <= MAX_SLOTS_PER_ATOM:
        return max_neighbors, True
    return GROUP_SIZE, False
