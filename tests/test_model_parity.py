"""eSCN against the public reference's fixtures: weights, Wigner matrices, blocks, graph, outputs."""

from __future__ import annotations

import pytest
import torch
from devices import to_device
from reference_fixtures import FIXTURE_NAMES, build_model, fixture_batch, frame_tolerance, load_fixture

from escn_train.graph import radius_graph_pbc
from escn_train.models.escn import eSCN
from escn_train.models.so3 import SO3_Grid, WignerCalculator, wigner_j_matrices


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_parameter_loads_by_name(name):
    fixture = load_fixture(name)
    model = eSCN(**fixture["config"])
    result = model.load_state_dict(fixture["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    reference = fixture["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    learnable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert learnable <= set(reference)


def test_main_layout_loads_and_matches_main_implementation():
    fixture = load_fixture("tiny_l2m1")
    main = fixture["state_dict_main_layout"]
    assert "sphharm_weights.0" in main
    model = eSCN(**fixture["config"])
    model.load_state_dict(main, strict=True)
    assert torch.equal(model.sphharm_weights, main["sphharm_weights.0"])
    s, g = fixture["structures"], fixture["graph"]
    energy, forces = model.forward_with_frames(
        s["batch"], s["natoms"], s["atomic_numbers"], g["edge_index"], g["edge_distance"], fixture["edge_rot_mat"]
    )
    assert (energy - fixture["energy_main_impl"]).abs().max().item() <= frame_tolerance(fixture, "energy")
    assert (forces - fixture["forces_main_impl"]).abs().max().item() <= frame_tolerance(fixture, "forces")


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_derived_constants_match_reference_buffers(name):
    fixture = load_fixture(name)
    config, reference = fixture["config"], fixture["state_dict"]
    for l, j in enumerate(wigner_j_matrices(config["lmax"])):
        # The stored constants carry float32 round-off (~1e-7) although saved as float64.
        torch.testing.assert_close(j, reference[f"Jd_{l}"].double(), atol=1e-6, rtol=0)
    for key, (lmax, mmax) in {"lmax_lmax": (config["lmax"],) * 2, "lmax_mmax": (config["lmax"], config["mmax"])}.items():
        grid = SO3_Grid(lmax, mmax, resolution=config["resolution"], rescale=config["rescale_grid"])
        for mat in ("to_grid_mat", "from_grid_mat"):
            torch.testing.assert_close(getattr(grid, mat), reference[f"SO3_grid.{key}.{mat}"], atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_wigner_matches_reference(name):
    fixture = load_fixture(name)
    wigner = WignerCalculator(fixture["config"]["lmax"])(fixture["edge_rot_mat"][:64])
    assert (wigner - fixture["wigner_first64"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_blocks_reproduce_reference_activations(name, device):
    fixture = to_device(load_fixture(name), device)
    model = build_model(name).to(device)
    s, g = fixture["structures"], fixture["graph"]
    wigner = model.wigner(fixture["edge_rot_mat"])
    assert len(fixture["layers"]) == 2 * fixture["config"]["num_layers"]
    for key, io in fixture["layers"].items():
        layer = model.layer_blocks[int(key.removeprefix("message").removeprefix("layer"))]
        block = layer.message_block if key.startswith("message") else layer
        with torch.no_grad():
            out = block(io["x_in"], s["atomic_numbers"], g["edge_distance"], g["edge_index"], wigner)
        assert _relative_error(out, io["out"]) < 1e-5, key


def _fixture_edge_set(fixture: dict) -> set[tuple[int, int, tuple[int, ...]]]:
    """The fixture's edges as (source, target, image) with the image recovered from the vector."""
    s, g = fixture["structures"], fixture["graph"]
    src, dst = g["edge_index"]
    shift = (g["edge_distance_vec"] - (s["pos"][src] - s["pos"][dst])).double()
    frac = torch.einsum("ed,edk->ek", shift, torch.linalg.inv(s["cell"][s["batch"][dst]].double()))
    image = torch.round(frac)
    assert (frac - image).abs().max() < 1e-3
    return set(zip(src.tolist(), dst.tolist(), map(tuple, image.long().tolist())))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_graph_equals_reference_edge_set(name, device):
    fixture = load_fixture(name)
    s, config = to_device(fixture["structures"], device), fixture["config"]
    graph = to_device(radius_graph_pbc(s["pos"], s["cell"], s["natoms"], config["cutoff"], config["max_neighbors"]),
                      "cpu")
    ours = set(zip(graph.edge_index[0].tolist(), graph.edge_index[1].tolist(), map(tuple, graph.cell_offsets.tolist())))
    assert len(ours) == graph.edge_index.shape[1]
    assert ours == _fixture_edge_set(fixture)
    assert bool((graph.edge_index[1].diff() >= 0).all())


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_forward_with_reference_frames_is_exact(name, device):
    fixture = load_fixture(name)
    model = build_model(name).to(device)
    s, g, frames = to_device((fixture["structures"], fixture["graph"], fixture["edge_rot_mat"]), device)
    with torch.no_grad():
        energy, forces = to_device(model.forward_with_frames(
            s["batch"], s["natoms"], s["atomic_numbers"], g["edge_index"], g["edge_distance"], frames
        ), "cpu")
    assert (energy - fixture["energy"]).abs().max().item() <= frame_tolerance(fixture, "energy")
    assert (forces - fixture["forces"]).abs().max().item() <= frame_tolerance(fixture, "forces")


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_forward_with_own_frames_within_frame_spread(name, device):
    fixture = load_fixture(name)
    model = build_model(name, export=True).to(device)
    s, g = to_device((fixture["structures"], fixture["graph"]), device)
    with torch.no_grad():
        energy, forces = to_device(model(
            s["pos"], s["batch"], s["natoms"], s["atomic_numbers"], g["edge_index"], g["edge_distance"], g["edge_distance_vec"]
        ), "cpu")
    assert (energy - fixture["energy"]).abs().max().item() <= frame_tolerance(fixture, "energy")
    assert (forces - fixture["forces"]).abs().max().item() <= frame_tolerance(fixture, "forces")


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_forward_trainable_builds_graph_and_matches(name, device):
    fixture = load_fixture(name)
    model = build_model(name).to(device)
    with torch.no_grad():
        out = to_device(model(fixture_batch(name).to(device)), "cpu")
    assert set(out) == {"energy", "forces"}
    assert (out["energy"] - fixture["energy"]).abs().max().item() <= frame_tolerance(fixture, "energy")
    assert (out["forces"] - fixture["forces"]).abs().max().item() <= frame_tolerance(fixture, "forces")


def test_forward_trainable_uses_precomputed_edges():
    fixture = load_fixture("tiny_l2m1")
    config = fixture["config"]
    model = build_model("tiny_l2m1")
    batch = fixture_batch("tiny_l2m1")
    graph = radius_graph_pbc(batch.pos, batch.cell, batch.natoms, config["cutoff"], config["max_neighbors"])
    # Drop every other edge: if the batch's edges are used, the result must change.
    batch.edge_index = graph.edge_index[:, ::2]
    batch.cell_offsets = graph.cell_offsets[::2]
    with torch.no_grad():
        sparse = model(batch)
        full = model(fixture_batch("tiny_l2m1"))
    assert not torch.allclose(sparse["forces"], full["forces"])
    batch.edge_index, batch.cell_offsets = graph.edge_index, graph.cell_offsets
    with torch.no_grad():
        again = model(batch)
    torch.testing.assert_close(again["forces"], full["forces"], atol=1e-9, rtol=0)
