"""Periodic radius graphs: the neighbour lists eSCN consumes.

Conventions (ESCN_MATH section 1): ``edge_index[0]`` is the source (neighbour j),
``edge_index[1]`` the target (centre i), targets sorted ascending;
``edge_distance_vec = pos[j] + cell_offsets @ cell - pos[i]``.

The neighbour search is vesin's cell list (O(N) per structure; a loop over structures, never
over atoms). Everything after it -- exact squared distances, the cutoff and image bounds, the
order of edges and the nearest-neighbour selection -- is batched tensor code on the
positions' device. ``tests/graph_oracle.py`` holds the all-pairs definition these graphs
equal edge for edge.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import numpy as np
import torch
import vesin

from escn_train.precision import autocast_off

_F = TypeVar("_F", bound=Callable)

#: Pairs closer than this (squared, in Å^2) are an atom meeting itself, never an edge.
SELF_DISTANCE_SQ = 1e-4


class PeriodicGraph(NamedTuple):
    """A radius graph over a batch of structures."""

    edge_index: torch.Tensor  # [2, E] long: (source j, target i)
    cell_offsets: torch.Tensor  # [E, 3] long: image of the source atom
    edge_distance: torch.Tensor  # [E]
    edge_distance_vec: torch.Tensor  # [E, 3]
    neighbors: torch.Tensor  # [B] long: edges whose target lies in each structure


def _without_autocast(fn: _F) -> _F:
    """Run ``fn`` in its inputs' precision even under autocast (mixed-precision training):
    a bf16 product of cell offsets and cell vectors is off by up to ~0.1 Å, which moves
    edges across the cutoff and tilts every edge's frame."""

    @functools.wraps(fn)
    def wrapper(pos: torch.Tensor, *args, **kwargs):
        with autocast_off(pos):
            return fn(pos, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@_without_autocast
def edge_vectors(
    pos: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    edge_index: torch.Tensor,
    cell_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and vectors of given (for example precomputed) edges.

    Returns ``(edge_distance [E], edge_distance_vec [E, 3])``.
    """
    src, dst = edge_index[0], edge_index[1]
    shift = torch.bmm(cell_offsets.to(pos.dtype).unsqueeze(1), cell[batch[dst]]).squeeze(1)
    vec = pos[src] + shift - pos[dst]
    return vec.norm(dim=-1), vec


def _images_per_structure(cell: torch.Tensor, cutoff: float, pbc: torch.Tensor) -> torch.Tensor:
    """Images allowed along each cell vector: ceil(cutoff * |b_k|), 0 where not periodic.

    This bound (the reference's) decides which periodic images can give edges, so it is part
    of the graph's definition, not only of the search.
    """
    # Rows of inv(cell)^T are the reciprocal vectors b_k with a_k . b_k = 1. Molecules and
    # slabs may come with zero vectors along non-periodic directions: there the
    # pseudo-inverse gives the in-plane reciprocal vectors, and those directions get 0 images.
    cell64 = cell.to(torch.float64)
    singular = torch.linalg.det(cell64).abs() < 1e-9
    safe = torch.where(singular[:, None, None], torch.eye(3, dtype=torch.float64, device=cell.device), cell64)
    reciprocal = torch.where(
        singular[:, None, None], torch.linalg.pinv(cell64), torch.linalg.inv(safe)
    ).transpose(1, 2)
    reps = torch.ceil(cutoff * reciprocal.norm(dim=-1)).long()
    return torch.where(pbc, reps, torch.zeros_like(reps))


def _check_periodic_vectors(cell64: torch.Tensor, pbc: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the structure when its periodic cell vectors span less
    than their own number of dimensions (a zero vector, or two parallel ones)."""
    length = cell64.norm(dim=-1)  # [B, 3]
    unit = cell64 / length.clamp_min(1e-300).unsqueeze(-1)
    # Gram matrix of the periodic unit vectors, with 1 on the diagonal for the others: its
    # determinant is the squared volume spanned by the periodic directions (1 = orthogonal).
    mask = pbc.to(torch.float64)
    gram = (unit @ unit.transpose(1, 2)) * mask[:, :, None] * mask[:, None, :]
    gram = gram + torch.diag_embed(1.0 - mask)
    bad = (pbc & (length < 1e-9)).any(dim=-1) | (torch.linalg.det(gram) < 1e-12)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        directions = "".join("xyz"[k] for k in range(3) if bool(pbc[b, k])) or "none"
        vectors = [[round(float(v), 6) for v in row] for row in cell64[b]]
        raise ValueError(
            f"structure {b} has a singular cell {vectors} but is periodic along {directions} "
            "(pbc); give independent, non-zero cell vectors for its periodic directions or "
            "set pbc False along the others"
        )


def neighbor_pairs(
    pos: torch.Tensor,
    cell: torch.Tensor,
    natoms: torch.Tensor,
    cutoff: float,
    pbc: torch.Tensor,
    with_distances: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Every pair closer than ``cutoff``, from vesin's cell list, on the host.

    Returns CPU tensors ``(target i [P] int64, source j [P] int64, shift S [P, 3] int32)``
    (and the float64 distance [P] when ``with_distances``) with
    ``|pos[j] + S @ cell - pos[i]| <= cutoff``
    over all periodic images (``pbc`` [B, 3] per direction), atom indices counted over
    the whole batch, in no particular order; an atom is never paired with itself at
    ``S = 0``. Cost O(N) per structure. The loop runs over structures (one vesin call each);
    inputs on a GPU are copied to the host once. Raises ``ValueError`` for non-finite
    positions and for singular periodic cells.
    """
    pos_h = pos.detach().to("cpu", torch.float64)
    cell_h = cell.detach().to("cpu", torch.float64).reshape(-1, 3, 3)
    pbc_h = pbc.detach().to("cpu", torch.bool).reshape(-1, 3).expand(cell_h.shape[0], 3)
    _check_periodic_vectors(cell_h, pbc_h)
    if not bool(torch.isfinite(pos_h).all()):
        raise ValueError("atom positions hold NaN or infinite values; cannot search for neighbours")
    cell_h, pbc_h = cell_h.numpy(), pbc_h.numpy()
    counts = natoms.detach().to("cpu", torch.long).tolist()
    search = vesin.NeighborList(cutoff=float(cutoff), full_list=True, n_threads=torch.get_num_threads())
    quantities = "ijSd" if with_distances else "ijS"
    parts: list[list[np.ndarray]] = []
    start = 0
    points_all = pos_h.numpy()
    for b, n in enumerate(counts):
        if n:
            found = search.compute(points_all[start : start + n], cell_h[b], pbc_h[b], quantities, copy=False)
            i, j = found[0].astype(np.int64), found[1].astype(np.int64)  # copies, out of vesin's buffers
            i += start
            j += start
            parts.append([i, j, *(f.copy() for f in found[2:])])
        start += n
    if not parts:
        empty = [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int32), np.zeros(0)]
        parts = [empty[: len(quantities)]]
    columns = [np.concatenate(col) if len(parts) > 1 else col[0] for col in zip(*parts)]
    result = tuple(torch.from_numpy(c) for c in columns[:3])
    return result + (torch.from_numpy(columns[3]),) if with_distances else result


def _search_margin(pos: torch.Tensor, cell: torch.Tensor, reps: torch.Tensor, cutoff: float) -> float:
    """Extra radius (Å) for the search so that its float64 test (distance <= cutoff + margin)
    keeps every pair the float32/float64 test in :func:`radius_graph_pbc` may accept: the
    rounding of |pos_i - (pos_j + shift)| is a few ulps of the coordinates' magnitude."""
    extent = float(pos.abs().max()) if pos.numel() else 0.0
    reach = float((cell.detach().to(torch.float64).norm(dim=-1) * reps).sum(dim=-1).max()) if reps.numel() else 0.0
    return 1e-5 * (1.0 + extent + reach + cutoff)


@_without_autocast
def radius_graph_pbc(
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

    Candidate pairs are every (i, j, image) with 1e-4 Å^2 < |d|^2 <= cutoff^2 and at most
    ceil(cutoff * |b_k|) images along each periodic cell vector a_k, so an atom meets its
    own periodic images but never itself. The search is vesin's cell list (O(N), on the
    host: CUDA inputs cost one copy of the positions to the host and one of the candidate
    pairs back); the squared distances, the cutoff test and the choice of neighbours are
    then computed on ``pos``'s device in the same arithmetic as the all-pairs definition
    (``tests/graph_oracle.py``), so the edges, their order (targets ascending, then source,
    then image) and the neighbours kept at exact distance ties are the same.

    Raises ``ValueError`` when a structure's periodic cell vectors are zero or dependent.
    """
    device = pos.device
    num_structures = natoms.numel()
    natoms = natoms.to(dtype=torch.long)
    cell = cell.view(num_structures, 3, 3).to(pos.dtype)
    if pbc is None:
        pbc = torch.ones(num_structures, 3, dtype=torch.bool, device=device)
    else:
        pbc = pbc.to(dtype=torch.bool).reshape(-1, 3).expand(num_structures, 3)

    pos_h, cell_h, pbc_h = pos.detach().to("cpu", torch.float64), cell.detach().cpu(), pbc.cpu()
    reps_h = _images_per_structure(cell_h, cutoff, pbc_h)  # [B, 3] on the host
    margin = _search_margin(pos_h, cell_h, reps_h, cutoff)
    pairs = neighbor_pairs(pos_h, cell_h, natoms, cutoff + margin, pbc_h)
    target, source, offsets = (t.to(device, non_blocking=True) for t in pairs)

    # The shift table of the all-pairs definition (one image grid for the batch), so every
    # candidate's squared distance is rounded exactly as there; exact ties depend on it.
    max_reps = reps_h.max(dim=0).values.tolist() if num_structures else [0, 0, 0]
    axes = [torch.arange(-r, r + 1, device=device) for r in max_reps]
    images = torch.cartesian_prod(*axes).view(-1, 3)  # [I, 3], last axis fastest
    shifts = torch.matmul(images.to(pos.dtype), cell.detach())  # [B, I, 3]
    width = torch.tensor([2 * r + 1 for r in max_reps], device=device)

    num_atoms = pos.shape[0]
    atom_structure = torch.repeat_interleave(
        torch.arange(num_structures, device=device), natoms.to(device), output_size=num_atoms)
    structure = atom_structure.index_select(0, target)
    inside = (offsets.abs() <= reps_h.to(device).index_select(0, structure)).all(dim=-1)
    grid = (offsets + width // 2).clamp(min=torch.zeros_like(width), max=width - 1)
    image = (grid[:, 0] * width[1] + grid[:, 1]) * width[2] + grid[:, 2]
    del grid
    plain = pos.detach()
    shift = shifts.view(-1, 3).index_select(0, structure * images.shape[0] + image)
    diff = plain.index_select(0, target) - (plain.index_select(0, source) + shift)
    del shift, structure
    dist_sq = (diff * diff).sum(dim=-1)
    del diff
    # Candidates the search found beyond the cutoff (its margin) or beyond the image bounds
    # stay in the arrays as never-chosen (distance inf) until the one compaction at the end.
    valid = (dist_sq <= cutoff * cutoff) & (dist_sq > SELF_DISTANCE_SQ) & inside
    del inside
    dist_sq = torch.where(valid, dist_sq, torch.full_like(dist_sq, float("inf")))
    order = _edge_order(target, source, image, num_atoms, images.shape[0])
    target, source, dist_sq, offsets, valid = (
        t.index_select(0, order) for t in (target, source, dist_sq, offsets, valid))
    del order, image

    chosen = _nearest_neighbors(target, dist_sq, valid, atom_structure, num_structures, max_neighbors)
    kept = chosen.nonzero(as_tuple=True)[0]  # the graph's size: the one read-back it needs
    del chosen, valid
    edge_index = torch.stack([source.index_select(0, kept), target.index_select(0, kept)])
    cell_offsets = offsets.index_select(0, kept).long()
    del target, source, dist_sq, offsets
    edge_distance, edge_vec = edge_vectors(pos, cell, atom_structure, edge_index, cell_offsets)
    neighbors = torch.zeros(num_structures, dtype=torch.long, device=device).index_add_(
        0, atom_structure.index_select(0, edge_index[1]), torch.ones_like(edge_index[1]))
    return PeriodicGraph(edge_index, cell_offsets, edge_distance, edge_vec, neighbors)


def _edge_order(
    target: torch.Tensor, source: torch.Tensor, image: torch.Tensor, num_atoms: int, num_images: int
) -> torch.Tensor:
    """Permutation sorting candidates by (target, source, image index): the order in which
    the all-pairs definition enumerates them, which the tie-break below depends on."""
    pair = target * num_atoms + source
    if num_atoms * num_atoms * num_images < 2**62:
        return torch.sort(pair * num_images + image).indices
    by_image = torch.sort(image, stable=True).indices
    return by_image[torch.sort(pair[by_image], stable=True).indices]


def _nearest_neighbors(
    target: torch.Tensor,
    dist_sq: torch.Tensor,
    valid: torch.Tensor,
    atom_structure: torch.Tensor,
    num_structures: int,
    max_neighbors: int,
) -> torch.Tensor:
    """Mask of the candidates kept when each target keeps its ``max_neighbors`` nearest
    valid candidates (``max_neighbors <= 0``: all of them).

    ``target`` must be sorted; invalid candidates carry ``dist_sq = inf``. The choice is
    batched: candidates ranked per target by distance (one stable sort), without any
    read-back. Only an exact tie at the cut (the k-th and (k+1)-th nearest at one distance:
    a shell of a perfect lattice, an atom's own images) makes the choice depend on how ties
    are broken; one read-back detects it, and then :func:`_break_ties_as_reference` decides
    those rows as the reference does.
    """
    num_candidates = target.numel()
    if num_candidates == 0 or max_neighbors <= 0:
        return valid
    num_atoms = atom_structure.numel()
    device = target.device
    by_row = _rows_nearest_first(target, dist_sq)
    block = torch.zeros(num_atoms, dtype=torch.long, device=device).index_add_(0, target, torch.ones_like(target))
    first = torch.cumsum(block, 0) - block
    rank = torch.empty_like(target).scatter_(
        0, by_row, torch.arange(num_candidates, device=device) - first.index_select(0, target.index_select(0, by_row)))
    chosen = valid & (rank < max_neighbors)

    counts = torch.zeros(num_atoms, dtype=torch.long, device=device).index_add_(0, target, valid.long())
    nearest = dist_sq.index_select(0, by_row)
    last_kept = (first + max_neighbors - 1).clamp(max=num_candidates - 1)
    first_dropped = (first + max_neighbors).clamp(max=num_candidates - 1)
    tied = (counts > max_neighbors) & (nearest.index_select(0, last_kept) == nearest.index_select(0, first_dropped))
    if bool(tied.any()):
        _break_ties_as_reference(chosen, dist_sq, valid, counts, atom_structure, num_structures, tied, max_neighbors)
    return chosen


def _rows_nearest_first(target: torch.Tensor, dist_sq: torch.Tensor) -> torch.Tensor:
    """Permutation grouping candidates by target (ascending), nearest first, exact ties in
    candidate order. Below float64 it is one sort of an int64 key: the target in the high
    32 bits, the float32 distance's bit pattern (ordered as its value, for values >= 0) in
    the low 32; float64 distances take two stable sorts."""
    if dist_sq.dtype != torch.float64:
        bits = dist_sq.float().view(torch.int32).long()
        return torch.sort((target << 32) | bits, stable=True).indices
    by_distance = torch.sort(dist_sq, stable=True).indices
    return by_distance.index_select(0, torch.sort(target.index_select(0, by_distance), stable=True).indices)


def _break_ties_as_reference(
    chosen: torch.Tensor,
    dist_sq: torch.Tensor,
    valid: torch.Tensor,
    counts: torch.Tensor,
    atom_structure: torch.Tensor,
    num_structures: int,
    tied: torch.Tensor,
    max_neighbors: int,
) -> None:
    """Re-decide, in ``chosen``, the rows of ``tied`` targets as the reference does: an
    unstable sort of the row's distances (in candidate order) padded with inf to the widest
    row of its structure. The tie order of that sort depends on the padded width, so the
    rows are sorted in one group per distinct width (a loop over widths, never over atoms
    or edges); only graphs with such ties pay for it.
    """
    device = dist_sq.device
    width = torch.zeros(num_structures, dtype=torch.long, device=device)
    width = width.scatter_reduce(0, atom_structure, counts, reduce="amax")
    candidate = valid.nonzero(as_tuple=True)[0]  # valid candidates, in candidate order
    first = torch.cumsum(counts, 0) - counts  # each target's first entry in ``candidate``
    tied_atoms = tied.nonzero(as_tuple=True)[0]
    row_width = width.index_select(0, atom_structure.index_select(0, tied_atoms))
    for w in torch.unique(row_width).tolist():
        atoms = tied_atoms[row_width == w]
        slots = first.index_select(0, atoms).unsqueeze(1) + torch.arange(w, device=device)
        filled = torch.arange(w, device=device) < counts.index_select(0, atoms).unsqueeze(1)
        ids = candidate.index_select(0, slots.clamp(max=candidate.numel() - 1).view(-1)).view(slots.shape)
        padded = torch.where(filled, dist_sq.index_select(0, ids.view(-1)).view(ids.shape), float("inf"))
        order = torch.sort(padded, dim=1).indices[:, :max_neighbors]  # tied rows: all finite
        chosen.index_fill_(0, ids[filled], False)
        chosen.index_fill_(0, ids.gather(1, order).reshape(-1), True)
