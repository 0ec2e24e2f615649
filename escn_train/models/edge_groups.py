"""Edges grouped by atom, so that per-edge rotations become a few well-shaped GEMMs.

A message block rotates every edge's source and target features into the edge frame and
applies the first SO(2) layer: ``W (D_e x_atom)``. Both maps are linear and act on
different axes (``W`` on channels within a degree l, ``D_e`` on orders within l), so
``W (D_e x) = D_e (W x)``: the channel map runs once per *atom*, and what is left per edge
is a contraction over the (l, m') coefficients — about 20x fewer operations than the
per-edge GEMM, and no gathered copy of the features. Likewise the rotation back and the
sum over a target atom's edges is one product per atom.

Those per-atom products need the edges of an atom side by side: :class:`EdgeGroups` puts
them in groups of ``size`` slots (an atom with more edges gets several groups, one with
fewer is padded with zeros), so that each product is a batched matrix product over groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Group sizes tried besides the largest degree; the one with the least padding wins.
_CANDIDATE_SIZES = (16, 32)


@dataclass(frozen=True)
class EdgeGroups:
    """Edges of each atom (one endpoint) in padded groups of ``size`` slots.

    ``slot[e]`` is edge e's row in the padded layout of ``num_groups * size`` rows;
    ``group_atom[g]`` the atom group g belongs to. ``one_per_atom`` when group g is atom g
    (every atom has exactly one group), so per-group results need no gather or sum.
    """

    slot: torch.Tensor
    empty_slots: torch.Tensor
    group_atom: torch.Tensor
    size: int
    num_groups: int
    one_per_atom: bool

    @property
    def num_slots(self) -> int:
        return self.num_groups * self.size

    @staticmethod
    def build(atom: torch.Tensor, num_atoms: int) -> "EdgeGroups":
        """Group the edges by ``atom`` ([E] endpoint per edge)."""
        num_edges = atom.shape[0]
        counts = torch.bincount(atom, minlength=num_atoms)
        most = max(int(counts.max()) if num_atoms and num_edges else 1, 1)
        best = None
        for size in (most, *(s for s in _CANDIDATE_SIZES if s < most)):
            groups = int(torch.clamp((counts + size - 1) // size, min=1).sum())
            if best is None or groups * size < best[0] * best[1]:
                best = (groups, size)
        num_groups, size = best
        groups_per_atom = torch.clamp((counts + size - 1) // size, min=1)
        first_group = torch.cumsum(groups_per_atom, 0) - groups_per_atom
        order = torch.argsort(atom, stable=True)
        first_edge = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(atom)
        rank[order] = torch.arange(num_edges, device=atom.device) - first_edge[atom[order]]
        slot = (first_group[atom] + rank // size) * size + rank % size
        group_atom = torch.repeat_interleave(torch.arange(num_atoms, device=atom.device), groups_per_atom)
        empty = torch.ones(num_groups * size, dtype=torch.bool, device=atom.device)
        empty[slot] = False
        return EdgeGroups(slot, empty.nonzero().view(-1), group_atom, size, num_groups, num_groups == num_atoms)

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """[E, rows, cols] per-edge values -> [groups, size * rows, cols], zeros in empty slots."""
        padded = values.new_empty(self.num_slots, *values.shape[1:]).index_fill_(0, self.empty_slots, 0)
        padded.index_copy_(0, self.slot, values)
        return padded.view(self.num_groups, self.size * values.shape[1], values.shape[2])

    def per_group(self, per_atom: torch.Tensor) -> torch.Tensor:
        """[atoms, ...] -> [groups, ...]: each group's copy of its atom's values."""
        return per_atom if self.one_per_atom else per_atom.index_select(0, self.group_atom)

    def slot_edges(self) -> torch.Tensor:
        """The edge in each slot, [slots] (edge 0 in empty slots)."""
        edges = torch.arange(self.slot.shape[0], device=self.slot.device)
        return self.slot.new_zeros(self.num_slots).index_copy_(0, self.slot, edges)

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
        if self.one_per_atom:
            return summed
        return summed.new_zeros(num_atoms, *summed.shape[1:]).index_add(0, self.group_atom, summed)
