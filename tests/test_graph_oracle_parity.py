"""radius_graph_pbc (cell list) against the all-pairs oracle: the same edges, in the same order.

Compared field by field with ``torch.equal``: (source, target, image) triples, their order,
distances, vectors and per-structure counts, including which neighbours are kept at
``max_neighbors`` when distances tie exactly (lattices, an atom's own images).
"""

from __future__ import annotations

import pytest
import torch
from graph_oracle import radius_graph_pbc_all_pairs
from reference_fixtures import FIXTURE_NAMES, SHARED, load_fixture

from escn_train.graph import neighbor_pairs, radius_graph_pbc

BENCH_BATCH = SHARED / "reference" / "bench" / "cu111_co_x4.pt"


def assert_same_graph(pos, cell, natoms, cutoff, max_neighbors, pbc=None):
    expected = radius_graph_pbc_all_pairs(pos, cell, natoms, cutoff, max_neighbors, pbc)
    graph = radius_graph_pbc(pos, cell, natoms, cutoff, max_neighbors, pbc)
    for name, a, b in zip(graph._fields, graph, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    return graph


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_reference_fixtures(name):
    fixture = load_fixture(name)
    s, config = fixture["structures"], fixture["config"]
    for max_neighbors in (config["max_neighbors"], 5, 10_000):
        assert_same_graph(s["pos"], s["cell"], s["natoms"], config["cutoff"], max_neighbors)


def test_reference_bench_batch():
    """(Its stored edges come from fairchem's ASE-based AtomsToGraphs, a different selection.)"""
    b = torch.load(BENCH_BATCH, weights_only=True)
    for max_neighbors in (50, 12):
        assert_same_graph(b["pos"], b["cell"], b["natoms"], 6.0, max_neighbors)


def _structure(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Positions, cell and pbc of one random structure of the given kind."""
    u = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if kind == "bulk":
        cell = torch.diag(4.0 + 4.0 * u(3)) + 0.8 * (u(3, 3) - 0.5) * (1 - torch.eye(3, dtype=torch.float64))
        return (u(n, 3) * 1.2 - 0.1) @ cell, cell, [True, True, True]  # some atoms outside the cell
    if kind == "slab":
        cell = torch.diag(torch.tensor([5.0, 5.5, 25.0], dtype=torch.float64)) + torch.tensor(
            [[0, 0, 0], [2.0, 0, 0], [0, 0, 0]], dtype=torch.float64
        )
        frac = u(n, 3) * torch.tensor([1.0, 1.0, 0.3], dtype=torch.float64)
        return frac @ cell, cell, [True, True, True]  # OC20-style: periodic in z too, with vacuum
    if kind == "slab_open":
        cell = torch.tensor([[4.5, 0, 0], [1.5, 4.0, 0], [0, 0, 0]], dtype=torch.float64)  # zero vacuum vector
        pos = u(n, 3) @ torch.tensor([[4.5, 0, 0], [1.5, 4.0, 0], [0, 0, 6.0]], dtype=torch.float64)
        return pos, cell, [True, True, False]
    if kind == "molecule":
        return 6.0 * u(n, 3) - 3.0, torch.zeros(3, 3, dtype=torch.float64), [False, False, False]
    if kind == "small":  # cutoff several times the cell: many images of every atom
        cell = torch.diag(1.3 + u(3)) + 0.3 * (u(3, 3) - 0.5) * (1 - torch.eye(3, dtype=torch.float64))
        return u(n, 3) @ cell, cell, [True, True, True]
    if kind == "skewed":  # strongly sheared (about 15 degrees between a and b)
        cell = torch.tensor([[6.0, 0, 0], [5.8, 1.6, 0], [1.0, 0.5, 5.0]], dtype=torch.float64)
        return u(n, 3) @ cell, cell, [True, True, True]
    if kind == "wire":  # periodic along one direction only, with a general cell
        cell = torch.tensor([[3.0, 0, 0], [0.5, 8.0, 0], [0, 0.3, 8.0]], dtype=torch.float64)
        return u(n, 3) @ cell, cell, [True, False, False]
    raise ValueError(kind)


KINDS = ("bulk", "slab", "slab_open", "molecule", "small", "skewed", "wire")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_random_structures(kind, dtype):
    gen = torch.Generator().manual_seed(KINDS.index(kind))
    for trial in range(3):
        n = [1, 9, 16 if kind == "small" else 40][trial]
        pos, cell, pbc = _structure(kind, n, gen)
        cutoff = 6.0 if kind == "small" else 5.0
        for max_neighbors in (6, 30, 10_000):
            assert_same_graph(pos.to(dtype), cell[None].to(dtype), torch.tensor([n]), cutoff, max_neighbors, torch.tensor(pbc))


def test_mixed_batches():
    gen = torch.Generator().manual_seed(11)
    for trial in range(6):
        kinds = [KINDS[int(k)] for k in torch.randint(0, len(KINDS), (4,), generator=gen)]
        parts = [_structure(kind, int(torch.randint(1, 17, (1,), generator=gen)), gen) for kind in kinds]
        pos = torch.cat([p for p, _, _ in parts]).float()
        cell = torch.stack([c for _, c, _ in parts]).float()
        natoms = torch.tensor([p.shape[0] for p, _, _ in parts])
        pbc = torch.tensor([b for _, _, b in parts])
        for max_neighbors in (8, 40):
            assert_same_graph(pos, cell, natoms, 5.0, max_neighbors, pbc)


def test_exact_ties_on_lattices():
    """Lattice sites: whole shells of neighbours (and an atom's own images) at one distance."""
    fcc = torch.tensor([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]], dtype=torch.float64)
    for a, reps, cutoff, k in [(3.61, 2, 6.0, 50), (3.61, 3, 5.0, 12), (2.0, 1, 4.5, 20), (2.87, 2, 6.0, 7)]:
        grid = torch.stack(torch.meshgrid(*[torch.arange(reps, dtype=torch.float64)] * 3, indexing="ij"), -1).view(-1, 1, 3)
        pos = ((grid + fcc).view(-1, 3) * a).float()
        cell = (a * reps * torch.eye(3)).unsqueeze(0)
        natoms = torch.tensor([pos.shape[0]])
        assert_same_graph(pos, cell, natoms, cutoff, k)
        simple = torch.zeros(1, 3)  # one atom: only its own images, all tied per shell
        assert_same_graph(simple, cell / reps, torch.tensor([1]), cutoff, k)
        batch = assert_same_graph(torch.cat([pos, simple]), torch.cat([cell, cell / reps]), torch.tensor([pos.shape[0], 1]), cutoff, k)
        assert int(torch.bincount(batch.edge_index[1]).max()) == k


def test_ties_in_batches_of_several_row_widths():
    """Tied lattices of three sizes (three padded widths) between random structures: the
    rows cut inside a shell are decided per width, every other row by the batched ranking."""
    gen = torch.Generator().manual_seed(5)
    fcc = torch.tensor([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]], dtype=torch.float64)
    parts = []
    for a in (3.61, 2.87, 4.05):
        parts.append(((fcc * a), a * torch.eye(3, dtype=torch.float64), [True] * 3))
        parts.append(_structure("bulk", 7, gen))
    pos = torch.cat([p for p, _, _ in parts]).float()
    cell = torch.stack([c for _, c, _ in parts]).float()
    natoms = torch.tensor([p.shape[0] for p, _, _ in parts])
    for max_neighbors in (13, 20, 30):
        graph = assert_same_graph(pos, cell, natoms, 6.0, max_neighbors, torch.tensor([b for _, _, b in parts]))
        assert int(torch.bincount(graph.edge_index[1]).max()) == max_neighbors


def test_empty_and_edgeless():
    far = torch.tensor([[0.0, 0, 0], [10.0, 0, 0]])
    graph = assert_same_graph(far, torch.zeros(1, 3, 3), torch.tensor([2]), 5.0, 10, torch.zeros(3, dtype=torch.bool))
    assert graph.edge_index.shape == (2, 0) and graph.neighbors.tolist() == [0]
    # a structure without atoms between two others
    pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]])
    cell = (4.0 * torch.eye(3)).expand(3, 3, 3).contiguous()
    graph = assert_same_graph(pos, cell, torch.tensor([2, 0, 1]), 3.0, 10)
    assert graph.neighbors[1] == 0


@pytest.mark.parametrize(
    "cell, pbc",
    [
        (torch.zeros(3, 3), [True, True, True]),
        (torch.tensor([[3.0, 0, 0], [6.0, 0, 0], [0, 0, 3.0]]), [True, True, True]),  # parallel a and b
        (torch.tensor([[3.0, 0, 0], [0, 0, 0], [0, 0, 0]]), [True, True, False]),  # zero periodic vector
        (torch.tensor([[3.0, 0, 0], [6.0, 0, 0], [0, 0, 0]]), [True, True, False]),
    ],
)
def test_singular_periodic_cell_is_a_clear_error(cell, pbc):
    pos = torch.zeros(2, 3)
    pos[1, 0] = 1.0
    with pytest.raises(ValueError, match=r"structure 0 has a singular cell .* periodic along"):
        radius_graph_pbc(pos, cell[None], torch.tensor([2]), 3.0, 10, torch.tensor(pbc))


def test_neighbor_pairs_include_coincident_atoms():
    """The raw search keeps distinct atoms at zero distance (the data checks need them)."""
    pos = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [2.0, 1.0, 1.0]])
    target, source, shift, distance = neighbor_pairs(
        pos, torch.zeros(1, 3, 3), torch.tensor([3]), 0.5, torch.zeros(1, 3, dtype=torch.bool), with_distances=True
    )
    assert sorted(zip(target.tolist(), source.tolist())) == [(0, 1), (1, 0)]
    assert distance.tolist() == [0.0, 0.0] and shift.abs().sum() == 0
