"""The banded Gaussian expansion (escn_train.models.fast.distance) against the dense one."""

from __future__ import annotations

import pytest
import torch
from reference_fixtures import build_model, load_fixture

from escn_train.models.fast import distance as distance_bands
from escn_train.models.fast.distance import DistanceBands
from escn_train.models.smearing import GaussianSmearing

CUTOFF = 6.0
NUM_GAUSSIANS = 300


def _distances(num_edges: int, seed: int) -> torch.Tensor:
    """Unsorted distances over the whole range, with both ends and a little beyond them."""
    dist = torch.rand(num_edges, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * CUTOFF
    ends = torch.tensor([0.0, 1e-3, CUTOFF - 1e-3, CUTOFF, -0.05, CUTOFF + 0.05], dtype=torch.float64)
    count = min(num_edges, ends.numel())
    dist[:count] = ends[:count]
    return dist


def _weights(dtype: torch.dtype, out: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(out, NUM_GAUSSIANS, dtype=torch.float64, generator=gen).to(dtype)
    bias = torch.randn(out, dtype=torch.float64, generator=gen).to(dtype)
    return weight, bias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_edges", [0, 1, 5, 3000])
def test_project_equals_the_dense_expansion_times_the_weight(dtype, num_edges):
    smearing = GaussianSmearing(0.0, CUTOFF, NUM_GAUSSIANS).to(dtype)
    dist = _distances(num_edges, seed=num_edges).to(dtype)
    weight, bias = _weights(dtype)
    bands = DistanceBands.build(dist, smearing)
    if num_edges == 3000:
        assert bands.values.shape[0] > 1 and bands.values.shape[2] < NUM_GAUSSIANS  # several narrow chunks
    dense = smearing(dist)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(bands.project(weight, bias), dense @ weight.T + bias, **tolerance)
    torch.testing.assert_close(bands.project(weight), dense @ weight.T, **tolerance)


@pytest.mark.parametrize("chunk_edges", [distance_bands.CHUNK_EDGES, 3])
def test_bands_hold_exactly_the_dense_no_grad_values(chunk_edges, monkeypatch):
    """Projected on the identity, the bands give back the dense expansion: the same values
    (to an ulp of exp()) and exact zeros at the same places (outside each edge's band);
    also with chunks of 3 edges (many chunks per block, partly filled ones)."""
    monkeypatch.setattr(distance_bands, "CHUNK_EDGES", chunk_edges)
    smearing = GaussianSmearing(0.0, CUTOFF, NUM_GAUSSIANS)
    dist = _distances(3000, seed=2).float()
    bands = DistanceBands.build(dist, smearing)
    assert bands.values.shape[1] == chunk_edges
    expanded = bands.project(torch.eye(NUM_GAUSSIANS))
    dense = smearing(dist)
    torch.testing.assert_close(expanded, dense, rtol=3e-7, atol=0)
    assert torch.equal(expanded == 0, dense == 0)
    padding = torch.ones(bands.values.shape[0] * chunk_edges, dtype=torch.bool)
    padding[bands.row] = False
    assert padding.any() and not bands.values.view(-1, bands.values.shape[2])[padding].any()


def test_project_gradients_equal_the_dense_ones():
    smearing = GaussianSmearing(0.0, CUTOFF, NUM_GAUSSIANS).double()
    dist = _distances(500, seed=3)
    weight, bias = (t.requires_grad_() for t in _weights(torch.float64))
    grad_out = torch.randn(500, weight.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    banded = torch.autograd.grad((DistanceBands.build(dist, smearing).project(weight, bias) * grad_out).sum(), (weight, bias))
    dense = torch.autograd.grad(((smearing(dist) @ weight.T + bias) * grad_out).sum(), (weight, bias))
    for a, b in zip(banded, dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_model_with_bands_equals_the_dense_path(dtype, monkeypatch):
    """Node features, energies, forces and parameter gradients with the bands (the default
    for a Gaussian basis) and with the dense expansion, which the model uses when the
    distances carry autograd."""
    fixture = load_fixture("tiny_l2m1")
    model = build_model("tiny_l2m1").to(dtype)
    s, g = fixture["structures"], fixture["graph"]
    frames = fixture["edge_rot_mat"].to(dtype)
    z, edges, dist = s["atomic_numbers"], g["edge_index"], g["edge_distance"].to(dtype)
    original, built = DistanceBands.build, []

    def counting_build(distances: torch.Tensor, smearing: GaussianSmearing) -> DistanceBands:
        built.append(distances.shape[0])
        return original(distances, smearing)

    monkeypatch.setattr(DistanceBands, "build", staticmethod(counting_build))
    max_neighbors = model.max_neighbors

    def run(distances: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        x = model.node_features(z, edges, distances, frames)
        energy, forces = model.readout(x, s["batch"], s["natoms"].shape[0])
        (energy.sum() + forces.square().sum()).backward()
        return [x, energy, forces, model.layer_blocks[1].message_block.edge_block.fc1_dist.weight.grad]

    banded = run(dist)
    geometry = model.layer_blocks[0].message_block.geometry(model.wigner(frames), edges, z.shape[0], max_neighbors)
    slots = geometry.num_slots
    assert built == [slots]  # one expansion of the target-slot layout's distances, for every layer
    dense = run(dist.clone().requires_grad_())
    assert built == [slots]
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5  # of each tensor's largest value
    for a, b in zip(banded, dense):
        assert (a - b).abs().max() <= tolerance * b.abs().max()
