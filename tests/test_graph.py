"""The periodic radius graph against an independent brute-force search."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from escn_train.graph import edge_vectors, radius_graph_pbc


def _random_structures(seed: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cells, positions = [], []
    for n in sizes:
        lengths = 3.0 + 5.0 * torch.rand(3, generator=gen)
        cell = torch.diag(lengths) + 1.5 * (torch.rand(3, 3, generator=gen) - 0.5) * (1 - torch.eye(3))
        frac = torch.rand(n, 3, generator=gen)
        cells.append(cell)
        positions.append(frac @ cell)
    return torch.cat(positions).double(), torch.stack(cells).double(), torch.tensor(sizes)


def _brute_force(pos, cell, natoms, cutoff, pbc):
    """Every (source, target, image) within the cutoff, by explicit loops (test oracle)."""
    edges = {}
    start = 0
    for b, n in enumerate(natoms.tolist()):
        lattice = cell[b].numpy()
        reciprocal = np.linalg.inv(lattice).T
        reps = [math.ceil(cutoff * np.linalg.norm(reciprocal[k])) if pbc[b][k] else 0 for k in range(3)]
        p = pos[start : start + n].numpy()
        for i, j in itertools.product(range(n), range(n)):
            for image in itertools.product(*[range(-r, r + 1) for r in reps]):
                vec = p[j] + np.array(image) @ lattice - p[i]
                d2 = float(vec @ vec)
                if 1e-4 < d2 <= cutoff * cutoff:
                    edges[(start + j, start + i, image)] = math.sqrt(d2)
        start += n
    return edges


def _as_dict(graph):
    keys = zip(graph.edge_index[0].tolist(), graph.edge_index[1].tolist(), map(tuple, graph.cell_offsets.tolist()))
    return dict(zip(keys, graph.edge_distance.tolist()))


@pytest.mark.parametrize("pbc", [[True, True, True], [True, True, False], [False, False, False], "mixed"])
def test_matches_brute_force_without_truncation(pbc):
    pos, cell, natoms = _random_structures(0, [5, 1, 7])
    if pbc == "mixed":
        pbc_rows = [[True, True, True], [True, False, True], [False, False, False]]
    else:
        pbc_rows = [pbc] * 3
    cutoff = 4.0
    graph = radius_graph_pbc(pos, cell, natoms, cutoff, max_neighbors=10_000, pbc=torch.tensor(pbc_rows))
    expected = _brute_force(pos, cell, natoms, cutoff, pbc_rows)
    ours = _as_dict(graph)
    assert set(ours) == set(expected)
    for key, distance in expected.items():
        assert ours[key] == pytest.approx(distance, abs=1e-9)
    assert bool((graph.edge_index[1].diff() >= 0).all())
    assert graph.neighbors.tolist() == [
        sum(1 for (_, t, _) in expected if lo <= t < lo + n)
        for lo, n in zip((torch.cumsum(natoms, 0) - natoms).tolist(), natoms.tolist())
    ]


def test_default_pbc_is_periodic_in_all_directions():
    pos, cell, natoms = _random_structures(1, [4, 6])
    implicit = radius_graph_pbc(pos, cell, natoms, 3.5, 10_000)
    explicit = radius_graph_pbc(pos, cell, natoms, 3.5, 10_000, pbc=torch.ones(2, 3, dtype=torch.bool))
    assert _as_dict(implicit) == _as_dict(explicit)
    assert implicit.cell_offsets.abs().sum() > 0


def test_max_neighbors_keeps_the_nearest_strictly():
    pos, cell, natoms = _random_structures(2, [6, 9])
    full = _as_dict(radius_graph_pbc(pos, cell, natoms, 5.0, 10_000))
    k = 7
    graph = radius_graph_pbc(pos, cell, natoms, 5.0, k)
    kept = _as_dict(graph)
    counts = torch.bincount(graph.edge_index[1], minlength=int(natoms.sum()))
    assert int(counts.max()) == k
    for target in range(int(natoms.sum())):
        candidates = sorted(d for (s, t, _), d in full.items() if t == target)
        mine = sorted(d for (s, t, _), d in kept.items() if t == target)
        assert mine == pytest.approx(candidates[:k], abs=1e-12)
    assert set(kept) <= set(full)


def test_edge_vectors_follow_the_convention():
    pos, cell, natoms = _random_structures(3, [5, 5])
    graph = radius_graph_pbc(pos, cell, natoms, 4.0, 100)
    batch = torch.repeat_interleave(torch.arange(2), natoms)
    src, dst = graph.edge_index
    manual = pos[src] + torch.einsum("ek,ekd->ed", graph.cell_offsets.double(), cell[batch[dst]]) - pos[dst]
    torch.testing.assert_close(graph.edge_distance_vec, manual)
    distance, vec = edge_vectors(pos, cell, batch, graph.edge_index, graph.cell_offsets)
    torch.testing.assert_close(vec, graph.edge_distance_vec)
    torch.testing.assert_close(distance, manual.norm(dim=-1))


def test_an_isolated_atom_meets_only_its_images():
    pos = torch.zeros(1, 3)
    cell = (3.0 * torch.eye(3)).unsqueeze(0)
    graph = radius_graph_pbc(pos, cell, torch.tensor([1]), 3.1, 100)
    assert graph.edge_index.shape[1] == 6
    assert sorted(map(tuple, graph.cell_offsets.tolist())) == sorted(
        [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    )
    none = radius_graph_pbc(pos, cell, torch.tensor([1]), 3.1, 100, pbc=torch.tensor([False, False, False]))
    assert none.edge_index.shape[1] == 0


def test_molecule_without_cell_and_slab_with_zero_vacuum_vector():
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.1], [0.0, 1.0, 0.0]])
    graph = radius_graph_pbc(pos, torch.zeros(1, 3, 3), torch.tensor([3]), 1.6, 100, pbc=torch.zeros(3, dtype=torch.bool))
    assert graph.edge_index.shape[1] == 6 and graph.cell_offsets.abs().sum() == 0
    slab_cell = torch.tensor([[[2.5, 0.0, 0.0], [0.0, 2.5, 0.0], [0.0, 0.0, 0.0]]])
    slab = radius_graph_pbc(pos[:1], slab_cell, torch.tensor([1]), 2.6, 100, pbc=torch.tensor([True, True, False]))
    assert sorted(map(tuple, slab.cell_offsets.tolist())) == [(-1, 0, 0), (0, -1, 0), (0, 1, 0), (1, 0, 0)]
    with pytest.raises(ValueError, match="singular cell"):
        radius_graph_pbc(pos, torch.zeros(1, 3, 3), torch.tensor([3]), 1.6, 100)


def test_graph_and_edge_vectors_ignore_autocast():
    """Mixed-precision training builds the graph inside autocast: it must stay in the
    positions' precision (a bf16 cell product is off by up to ~0.1 Å)."""
    pos, cell, natoms = _random_structures(7, [9, 14])
    pos, cell = pos.float(), cell.float()
    plain = radius_graph_pbc(pos, cell, natoms, 5.0, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = radius_graph_pbc(pos, cell, natoms, 5.0, 30)
        batch = torch.repeat_interleave(torch.arange(2), natoms)
        distance, vec = edge_vectors(pos, cell, batch, plain.edge_index, plain.cell_offsets)
    for a, b in zip(plain, mixed):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert vec.dtype == torch.float32 and torch.equal(vec, plain.edge_distance_vec)
    assert torch.equal(distance, plain.edge_distance)
