"""SampleChecker's geometry checks (overlap, no neighbours) on the cell-list search."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Data

from escn_train.data.checks import BadSampleError, SampleChecker


def structure(pos, cell, pbc=(True, True, True)) -> Data:
    pos = torch.as_tensor(pos, dtype=torch.float32)
    return Data(
        pos=pos, cell=torch.as_tensor(cell, dtype=torch.float32).view(1, 3, 3),
        atomic_numbers=torch.full((pos.shape[0],), 29), natoms=pos.shape[0], pbc=torch.tensor([pbc]),
    )


CHECK = SampleChecker(require_labels=False, min_distance=0.5, neighbor_cutoff=6.0)


def test_reports_the_closest_direct_pair():
    pos = [[0, 0, 0], [3, 0, 0], [3.3, 0, 0], [6, 0, 0], [6.1, 0, 0]]
    with pytest.raises(BadSampleError, match=r"^f.lmdb key 7: atoms 3 and 4 are 0.100 Å apart \(overlapping; minimum 0.5 Å\)$"):
        CHECK(structure(pos, torch.eye(3) * 20), "f.lmdb key 7")


def test_an_atom_on_the_periodic_image_of_another_is_an_overlap():
    # 0 and 10 are the same point of a 10 Å cell: distance 0 through the boundary.
    pos = [[0, 0, 0], [10.0, 0, 0], [5, 5, 5], [5, 5, 7]]
    with pytest.raises(BadSampleError, match=r"atom 0 is closer than 0.5 Å to a periodic image of atom 1"):
        CHECK(structure(pos, torch.eye(3) * 10), "f.lmdb key 0")
    CHECK(structure(pos, torch.eye(3) * 10, pbc=(False, True, True)), "f.lmdb key 0")  # not periodic along x


def test_an_atom_too_close_to_its_own_image():
    with pytest.raises(BadSampleError, match=r"atom 0 is closer than 0.5 Å to a periodic image of atom 0"):
        CHECK(structure([[0, 0, 0]], torch.diag(torch.tensor([0.4, 5.0, 5.0]))), "k")


def test_no_neighbours_and_singular_cell_name_the_entry():
    with pytest.raises(BadSampleError, match=r"^k3: no two atoms are within the cutoff of 6.0 Å"):
        CHECK(structure([[0, 0, 0], [9, 0, 0]], torch.eye(3) * 30), "k3")
    with pytest.raises(BadSampleError, match=r"^k4: structure 0 has a singular cell .* periodic along xyz"):
        CHECK(structure([[0, 0, 0], [2, 0, 0]], torch.zeros(3, 3)), "k4")
    CHECK(structure([[0, 0, 0], [2, 0, 0]], torch.zeros(3, 3), pbc=(False, False, False)), "k4")  # a molecule


def test_large_structure_is_checked_without_all_pairs():
    """20,000 atoms on a jittered grid: an all-pairs distance matrix would be 3.2 GB."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(28.0)] * 3, indexing="ij"), -1).view(-1, 3)[:20_000]
    pos = 2.5 * grid + 0.2 * torch.rand(grid.shape, generator=gen)
    cell = torch.eye(3) * 70.0
    CHECK(structure(pos, cell), "big")
    pos[12_345] = pos[777] + torch.tensor([0.3, 0.0, 0.0])
    with pytest.raises(BadSampleError, match=r"atoms 777 and 12345 are 0.300 Å apart"):
        CHECK(structure(pos, cell), "big")
