"""torch.export, torch.compile and AOTInductor on the eSCN model."""

from __future__ import annotations

import pytest
import torch
from reference_fixtures import build_model, fixture_batch, frame_tolerance, load_fixture
from torch.export import Dim

from escn_train.graph import radius_graph_pbc
from escn_train.models.escn import LayerBlock, SO2Block

NAME = "tiny_l2m1"


def _forward_args(structures: list[int], repeat: int = 1) -> tuple[torch.Tensor, ...]:
    """Arguments of ``eSCN.forward`` for a subset of the fixture's structures, optionally repeated."""
    batch = fixture_batch(NAME, structures * repeat)
    config = load_fixture(NAME)["config"]
    graph = radius_graph_pbc(batch.pos, batch.cell, batch.natoms, config["cutoff"], config["max_neighbors"])
    return (
        batch.pos,
        batch.batch,
        batch.natoms,
        batch.atomic_numbers,
        graph.edge_index,
        graph.edge_distance,
        graph.edge_distance_vec,
    )


# Five inputs of different atom, edge and structure counts (one structure included).
SIZES = [([0, 1, 2, 3], 1), ([1], 1), ([2, 3], 1), ([0, 2], 3), ([3, 1, 0], 2)]


def _dynamic_shapes():
    atoms, edges, structures = Dim("num_atoms", min=2), Dim("num_edges", min=2), Dim("num_structures", min=1)
    return ({0: atoms}, {0: atoms}, {0: structures}, {0: atoms}, {1: edges}, {0: edges}, {0: edges})


@pytest.fixture(scope="module")
def exported():
    model = build_model(NAME, export=True)
    return model, torch.export.export(model, _forward_args([0, 1, 2, 3]), dynamic_shapes=_dynamic_shapes())


def test_exported_program_matches_eager_on_many_sizes(exported, tmp_path):
    model, program = exported
    path = tmp_path / "escn.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    sizes_seen = set()
    for structures, repeat in SIZES:
        args = _forward_args(structures, repeat)
        sizes_seen.add((args[0].shape[0], args[4].shape[1]))
        with torch.no_grad():
            energy, forces = model(*args)
            for module in (program.module(), loaded):
                e, f = module(*args)
                assert e.shape == energy.shape and f.shape == forces.shape
                # The same computation (the grid stage unblocked, plain-operation SO(2)
                # stage): float32 rounding of outputs that cancel.
                assert (e - energy).abs().max().item() <= 5e-5 * max(energy.abs().max().item(), 1e-6)
                assert (f - forces).abs().max().item() <= 5e-5 * forces.abs().max().item()
    assert len(sizes_seen) == len(SIZES)


def test_exported_program_has_no_random_op(exported):
    _, program = exported
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets, "empty graph"
    assert not [t for t in targets if "rand" in t or "bernoulli" in t or "normal" in t]


def test_random_frames_option_reproduces_reference_behaviour():
    deterministic = build_model(NAME, export=True)
    random = build_model(NAME, export=True, random_frames=True)
    args = _forward_args([0, 1, 2, 3])
    with torch.no_grad():
        e1, f1 = deterministic(*args)
        e2, f2 = deterministic(*args)
        torch.manual_seed(0)
        e3, f3 = random(*args)
        torch.manual_seed(1)
        e4, f4 = random(*args)
    assert torch.equal(f1, f2) and torch.equal(e1, e2)
    assert not torch.equal(f3, f4)
    torch.testing.assert_close(f3, f4, atol=1e-8, rtol=0)


def test_blocks_export_with_dynamic_edges_and_atoms():
    fixture = load_fixture(NAME)
    model = build_model(NAME)
    s, g = fixture["structures"], fixture["graph"]
    wigner = model.wigner(fixture["edge_rot_mat"])
    layer: LayerBlock = model.layer_blocks[1]
    so2: SO2Block = layer.message_block.so2_block_source
    x_in = fixture["layers"]["layer1"]["x_in"]
    atoms, edges = Dim("num_atoms", min=2), Dim("num_edges", min=2)

    layer_args = (x_in, s["atomic_numbers"], g["edge_distance"], g["edge_index"], wigner)
    layer_program = torch.export.export(
        layer, layer_args, dynamic_shapes=({0: atoms}, {0: atoms}, {0: edges}, {1: edges}, {0: edges})
    )
    reduced = torch.randn(g["edge_distance"].shape[0], 7, 16)
    x_edge = torch.randn(g["edge_distance"].shape[0], 16)
    so2_program = torch.export.export(so2, (reduced, x_edge), dynamic_shapes=({0: edges}, {0: edges}))

    # Smaller inputs than the ones traced with.
    keep_atoms = 20
    keep_edges = (g["edge_index"] < keep_atoms).all(dim=0)
    small = (x_in[:keep_atoms].clone(), s["atomic_numbers"][:keep_atoms].clone(), g["edge_distance"][keep_edges].clone(),
             g["edge_index"][:, keep_edges].clone(), wigner[keep_edges].clone())
    with torch.no_grad():
        torch.testing.assert_close(layer_program.module()(*small), layer(*small), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            so2_program.module()(reduced[:100], x_edge[:100]), so2(reduced[:100], x_edge[:100]), atol=1e-6, rtol=1e-5
        )


def test_compile_matches_eager_without_recompiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fixture = load_fixture(NAME)
    compiled = build_model(NAME, compile=True)
    eager = build_model(NAME)
    with torch.no_grad():
        for structures, repeat in SIZES:
            batch = fixture_batch(NAME, structures * repeat)
            out, ref = compiled(batch), eager(batch)
            # Inductor fuses and reorders float32 sums: allow the fixture's intrinsic
            # round-off (its frame spread), as for reference parity.
            for key in ("energy", "forces"):
                assert (out[key] - ref[key]).abs().max().item() <= frame_tolerance(fixture, key)
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_training_matches_eager_gradients_without_recompiling():
    """A compile=True training step (graph constants built eagerly, the layers compiled) gives
    eager mode's losses and parameter gradients, on two batch sizes with one graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled, eager = build_model(NAME, compile=True).train(), build_model(NAME).train()
    for structures in ([0, 1, 2, 3], [2, 0, 2]):
        grads = []
        for model in (compiled, eager):
            model.zero_grad()
            out = model(fixture_batch(NAME, structures))
            (out["energy"].square().sum() + out["forces"].square().sum()).backward()
            grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
        for name, grad in grads[1].items():
            torch.testing.assert_close(grads[0][name], grad, atol=1e-5 * (1 + grad.abs().max().item()), rtol=1e-4,
                                       msg=name)
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_traces_only_counts_as_symbols_and_no_graph_constants(monkeypatch):
    """compile=True keeps fixed dimensions (2 edge endpoints, every constant's trailing
    dimensions) and every parameter's shape constant, as torch.export does, so the traced
    size arithmetic stays small; the graph constants (frames, Wigner matrices, slot layout,
    distance bands) come in built, so none of their arithmetic is traced."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=capture, **kwargs))
    torch._dynamo.reset()
    model = build_model(NAME, compile=True)
    with torch.no_grad():
        model.forward(*_forward_args([0, 1, 2, 3]))
    torch._dynamo.reset()
    assert len(graphs) == 1
    shapes = {node.name: node.meta["example_value"].shape for node in graphs[0].graph.nodes
              if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.Tensor)}
    constants = [shape for name, shape in shapes.items() if name.startswith("l_constants_")]
    assert len(constants) > 10
    for shape in [shapes["l_atomic_numbers_"], shapes["l_edge_distance_"], *constants]:
        assert [isinstance(d, torch.SymInt) for d in shape] == [True] + [False] * (len(shape) - 1), shapes
    assert [isinstance(d, torch.SymInt) for d in shapes["l_edge_index_"]] == [False, True]
    parameters = [shape for name, shape in shapes.items() if "_parameters_" in name or "_buffers_" in name]
    assert parameters and not any(isinstance(d, torch.SymInt) for shape in parameters for d in shape)
    traced = " ".join(str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function")
    for name in ("atan2", "acos", "argsort", "searchsorted", "index_copy"):
        assert name not in traced
    assert "escn_train.so2_stage" in traced


@pytest.mark.slow
def test_aot_inductor_package_runs_on_cpu(exported, tmp_path):
    _, program = exported
    # The package calls the grid operator, as escn-export's default package does (its
    # standalone form is built and checked in tests/test_inference_export.py).
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "escn.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    model = build_model(NAME, export=True)
    fixture = load_fixture(NAME)
    for structures, repeat in SIZES[:3]:
        args = _forward_args(structures, repeat)
        with torch.no_grad():
            energy, forces = model(*args)
        e, f = runner(*args)
        # Compiled kernels reorder float32 sums: the fixture's intrinsic round-off applies.
        assert (e - energy).abs().max().item() <= frame_tolerance(fixture, "energy")
        assert (f - forces).abs().max().item() <= frame_tolerance(fixture, "forces")
