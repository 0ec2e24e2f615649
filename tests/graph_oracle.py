"""Test oracle: the all-pairs periodic radius graph (the builder before issue 12).

It forms every (target, source, image) triple of each structure, so it costs O(N^2 * images)
time and memory: fine for test structures, never used by the package. Production code
(:func:`escn_train.graph.radius_graph_pbc`) must produce exactly the same edges, in the same
order, including which neighbours are kept at ``max_neighbors`` when distances tie exactly.
"""

from __future__ import annotations

import torch

from escn_train.graph import SELF_DISTANCE_SQ, PeriodicGraph, edge_vectors
from escn_train.precision import autocast_off


def _images_per_structure(cell: torch.Tensor, cutoff: float, pbc: torch.Tensor) -> torch.Tensor:
    """Images needed along each cell vector: ceil(cutoff * |b_k|), 0 where not periodic."""
    # Rows of inv(cell)^T are the reciprocal vectors b_k with a_k . b_k = 1. Molecules and
    # slabs may come with zero vectors along non-periodic directions: there the
    # pseudo-inverse gives the in-plane reciprocal vectors, and those directions get 0 images.
    cell64 = cell.to(torch.float64)
    singular = torch.linalg.det(cell64).abs() < 1e-9
    safe = torch.where(singular[:, None, None], torch.eye(3, dtype=torch.float64, device=cell.device), cell64)
    reciprocal = torch.where(
        singular[:, None, None], torch.linalg.pinv(cell64), torch.linalg.inv(safe)
    ).transpose(1, 2)
    if bool((singular & pbc.all(dim=-1)).any()):
        raise ValueError("a structure periodic in all three directions has a singular cell")
    reps = torch.ceil(cutoff * reciprocal.norm(dim=-1)).long()
    return torch.where(pbc, reps, torch.zeros_like(reps))


def radius_graph_pbc_all_pairs(
    pos: torch.Tensor,
    cell: torch.Tensor,
    natoms: torch.Tensor,
    cutoff: float,
    max_neighbors: int,
    pbc: torch.Tensor | None = None,
) -> PeriodicGraph:
    """Build the periodic radius graph of a batch of structures.

    Args:
        pos: [N, 3] Cartesian positions, structures stored one after another.
        cell: [B, 3, 3] cell vectors as rows.
        natoms: [B] atoms per structure.
        cutoff: neighbour radius in Å (inclusive).
        max_neighbors: keep only this many nearest neighbours per target (strict).
        pbc: [B, 3] or [3] booleans; default periodic in all three directions.

    Candidate pairs are every (i, j, image) with 1e-4 Å^2 < |d|^2 <= cutoff^2, so an atom
    meets its own periodic images but never itself.
    """
    with autocast_off(pos):
        return _build(pos, cell, natoms, cutoff, max_neighbors, pbc)


def _build(pos, cell, natoms, cutoff, max_neighbors, pbc):
    device = pos.device
    natoms = natoms.to(device=device, dtype=torch.long)
    num_structures = natoms.numel()
    cell = cell.view(num_structures, 3, 3).to(pos.dtype)
    if pbc is None:
        pbc = torch.ones(num_structures, 3, dtype=torch.bool, device=device)
    else:
        pbc = pbc.to(device=device, dtype=torch.bool).reshape(-1, 3).expand(num_structures, 3)

    # All ordered atom pairs within each structure, as flat indices.
    start = torch.cumsum(natoms, 0) - natoms
    pairs_per_structure = natoms * natoms
    pair_structure = torch.repeat_interleave(torch.arange(num_structures, device=device), pairs_per_structure)
    pair_start = torch.cumsum(pairs_per_structure, 0) - pairs_per_structure
    local = torch.arange(int(pairs_per_structure.sum()), device=device) - pair_start[pair_structure]
    n_of_pair = natoms[pair_structure]
    target = start[pair_structure] + torch.div(local, n_of_pair, rounding_mode="floor")
    source = start[pair_structure] + local % n_of_pair

    # One image grid for the batch; each structure keeps only its own range.
    reps = _images_per_structure(cell, cutoff, pbc).to(device)
    max_reps = reps.max(dim=0).values.tolist()
    axes = [torch.arange(-r, r + 1, device=device) for r in max_reps]
    images = torch.cartesian_prod(*axes).view(-1, 3)  # [I, 3]
    allowed = (images.abs().unsqueeze(0) <= reps.unsqueeze(1)).all(dim=-1)  # [B, I]

    # Rounding matters for exact ties (an atom's own images at one lattice distance), so
    # distances are formed in the reference's order: |pos_i - (pos_j + shift)|^2.
    shifts = torch.matmul(images.to(pos.dtype), cell)  # [B, I, 3]
    shifted_source = pos[source].unsqueeze(1) + shifts[pair_structure]  # [P, I, 3]
    diff = pos[target].unsqueeze(1) - shifted_source
    dist_sq = (diff * diff).sum(dim=-1)
    keep = (dist_sq <= cutoff * cutoff) & (dist_sq > SELF_DISTANCE_SQ) & allowed[pair_structure]
    pair_idx, image_idx = keep.nonzero(as_tuple=True)

    edge_dist_sq = dist_sq[pair_idx, image_idx]
    edge_target = target[pair_idx]

    keep_idx = _nearest_neighbors(edge_target, edge_dist_sq, natoms, max_neighbors)

    pair_idx, image_idx = pair_idx[keep_idx], image_idx[keep_idx]
    edge_index = torch.stack([source[pair_idx], target[pair_idx]])
    cell_offsets = images[image_idx]
    atom_structure = torch.repeat_interleave(torch.arange(num_structures, device=device), natoms)
    edge_distance, edge_vec = edge_vectors(pos, cell, atom_structure, edge_index, cell_offsets)
    neighbors = torch.bincount(atom_structure[edge_index[1]], minlength=num_structures)
    return PeriodicGraph(edge_index, cell_offsets, edge_distance, edge_vec, neighbors)


def _nearest_neighbors(
    edge_target: torch.Tensor, dist_sq: torch.Tensor, natoms: torch.Tensor, max_neighbors: int
) -> torch.Tensor:
    """Indices of the candidates kept when each target keeps its ``max_neighbors`` nearest.

    ``edge_target`` must be sorted. Candidates stay in their original order. Exact ties
    (an atom's own images, all at one lattice distance) are broken as the reference breaks
    them: an unstable sort over each structure's rows padded with inf to that structure's
    widest row. Structures are grouped by that width, so the loop runs over distinct
    widths, never over atoms or edges.
    """
    device = edge_target.device
    num_atoms = int(natoms.sum())
    num_candidates = edge_target.numel()
    counts = torch.bincount(edge_target, minlength=num_atoms)
    if num_candidates == 0 or max_neighbors <= 0 or int(counts.max()) <= max_neighbors:
        return torch.arange(num_candidates, device=device)

    atom_structure = torch.repeat_interleave(torch.arange(natoms.numel(), device=device), natoms)
    width = torch.zeros(natoms.numel(), dtype=torch.long, device=device)
    width = width.scatter_reduce(0, atom_structure, counts, reduce="amax")
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(num_candidates, device=device) - first[edge_target]
    keep = torch.ones(num_candidates, dtype=torch.bool, device=device)
    for w in torch.unique(width[width > max_neighbors]).tolist():
        atoms = (width[atom_structure] == w).nonzero(as_tuple=True)[0]
        row_of_atom = torch.full((num_atoms,), -1, dtype=torch.long, device=device)
        row_of_atom[atoms] = torch.arange(atoms.numel(), device=device)
        in_group = row_of_atom[edge_target] >= 0
        cand = in_group.nonzero(as_tuple=True)[0]
        padded = torch.full((atoms.numel() * w,), float("inf"), dtype=dist_sq.dtype, device=device)
        padded[row_of_atom[edge_target[cand]] * w + slot[cand]] = dist_sq[cand]
        sorted_dist, order = torch.sort(padded.view(-1, w), dim=1)
        chosen = order[:, :max_neighbors] + first[atoms].unsqueeze(1)
        chosen = chosen[torch.isfinite(sorted_dist[:, :max_neighbors])]
        keep[in_group] = False
        keep[chosen] = True
    return keep.nonzero(as_tuple=True)[0]
