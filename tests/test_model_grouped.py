"""The static slot layout (escn_train.models.fast.slots) and the grouped SO(2) stage (fast.so2)."""

from __future__ import annotations

import pytest
import torch

from escn_train.models.fast import geometry as fast_geometry
from escn_train.models.fast.geometry import build_geometry, order_rows_index
from escn_train.models.fast.slots import EdgeGroups
from escn_train.models.fast.so2 import (
    _GroupedSO2,
    _forward,
    _so2_operator_call,
    _term_layout,
    order_row_offsets,
    so2_terms,
)


def _random_graph(num_atoms: int, num_edges: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    edges = torch.randint(0, num_atoms, (2, num_edges), generator=gen)
    edges[:, 0] = 0  # atom 0 has the largest degree
    edges[:, :8] = 0
    return edges


LAYOUTS = [(16, False), (3, False), (14, True)]


@pytest.mark.parametrize("size,one_per_atom", LAYOUTS, ids=["groups-of-16", "groups-of-3", "one-per-atom"])
def test_edge_groups_products_equal_per_edge_products(size, one_per_atom):
    num_atoms = 7  # atom 6 has no edge at all
    atom = _random_graph(6, 40, 0)[0]
    assert torch.bincount(atom).max() <= 14
    groups = EdgeGroups.build(atom, num_atoms, size, one_per_atom)
    assert groups.slot.unique().numel() == atom.numel()  # every edge its own slot
    assert torch.equal(groups.group_atom[groups.slot // groups.size], atom)
    # The number of groups follows from the counts alone.
    assert groups.num_groups == (num_atoms if one_per_atom else num_atoms + -(-atom.numel() // size))
    if not one_per_atom:
        assert (groups.slot < groups.num_slots - size).all()  # the last group is always empty

    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(atom.numel(), 2, 5, dtype=torch.float64, generator=gen)
    per_atom = torch.randn(num_atoms, 5, 4, dtype=torch.float64, generator=gen)
    padded = groups.pad(rows)
    products = groups.padded_products(padded, per_atom)
    torch.testing.assert_close(products[groups.slot], torch.bmm(rows, per_atom[atom]))
    empty = torch.ones(groups.num_slots, dtype=torch.bool)
    empty[groups.slot] = False
    assert empty.any() and not products[empty].any()
    assert torch.equal(groups.slot_edges()[groups.slot], torch.arange(atom.numel()))

    values = torch.randn(atom.numel(), 2, 3, dtype=torch.float64, generator=gen)
    expected = torch.zeros(num_atoms, 5, 3, dtype=torch.float64).index_add(0, atom, rows.transpose(1, 2) @ values)
    torch.testing.assert_close(groups.sum_padded(padded, groups.pad(values), num_atoms), expected)


def test_one_group_per_atom_leaves_out_edges_beyond_its_size():
    atom = torch.tensor([0, 1, 0, 0, 1, 0])
    groups = EdgeGroups.build(atom, 2, 3, True)
    assert groups.slot.tolist() == [0, 3, 1, 2, 4, 6]  # the fourth edge of atom 0 has no slot
    assert groups.pad(torch.ones(6, 1, 1)).sum() == 5


@pytest.mark.parametrize("group_size,max_neighbors", [(16, None), (2, None), (2, 12)], ids=["default", "split", "per-atom"])
def test_grouped_so2_backward_passes_gradcheck(group_size, max_neighbors, monkeypatch):
    """The recomputing backward against finite differences (float64)."""
    monkeypatch.setattr(fast_geometry, "GROUP_SIZE", group_size)
    lmax, mmax, hidden, channels, edge_channels, atoms = 2, 1, 3, 2, 4, 4
    edges = _random_graph(atoms, 9, 2)
    gen = torch.Generator().manual_seed(3)
    size = (lmax + 1) ** 2
    wigner = torch.randn(edges.shape[1], size, size, dtype=torch.float64, generator=gen)
    index_shapes = order_rows_index(lmax, mmax)
    geometry = build_geometry(
        wigner, edges, atoms, [i for i, _ in index_shapes], [s for _, s in index_shapes], torch.arange(size),
        max_neighbors,
    )
    terms = so2_terms(hidden, mmax)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)

    # Edge features in the target-slot layout (empty slots too: their rows are zero).
    x_edge = leaf(geometry.num_slots, edge_channels)
    gate_weight, gate_bias = leaf(2 * 3 * hidden, edge_channels), leaf(2 * 3 * hidden)
    projections = [leaf(atoms, size - t.order**2, hidden) for t in terms]
    seconds = [leaf((lmax - t.order + 1) * channels, hidden) for t in terms]
    inputs = (x_edge, gate_weight, gate_bias, *projections, *seconds)

    offsets = order_row_offsets(lmax, mmax)

    def grouped(*tensors):
        return _GroupedSO2.apply(geometry, terms, offsets, channels, *tensors)

    def operator(x_edge, gate_weight, gate_bias, *tensors):
        half = len(tensors) // 2
        return _so2_operator_call(geometry, terms, offsets, channels, x_edge, gate_weight, gate_bias,
                                  list(tensors[:half]), list(tensors[half:]))

    assert torch.autograd.gradcheck(grouped, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(operator, inputs, fast_mode=True)
    rows = [geometry.rows[t.side][t.rows_key][t.order] for t in terms]
    args = (geometry, terms, offsets, rows, x_edge, gate_weight, gate_bias, tuple(projections), tuple(seconds), channels)
    plain = _forward(*args, in_place=False)
    with torch.no_grad():
        in_place = _forward(*args, in_place=True)
    torch.testing.assert_close(grouped(*inputs), plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(operator(*inputs), plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(in_place, plain, rtol=1e-12, atol=1e-12)
    # The operator's registration (fake shapes, autograd, schema) as torch.library checks it.
    source, target = geometry.groups
    layout, flat_offsets = _term_layout(terms, offsets)
    torch.library.opcheck(
        torch.ops.escn_train.so2_stage.default,
        (x_edge, gate_weight, gate_bias, projections, seconds, geometry.tensors(), layout, flat_offsets, channels,
         [source.size, target.size], target.one_per_atom),
    )


def test_first_layer_skips_zero_orders_with_the_same_outputs_and_gradients():
    """Layer 0 sees only l = 0 features: skipping its m > 0 convolutions changes nothing,
    and their parameters still get their (exactly zero) gradients."""
    from reference_fixtures import build_model, fixture_batch

    def run(skip: bool):
        batch = fixture_batch("l4m2_sigmoid")
        batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
        model = build_model("l4m2_sigmoid").double()
        block = model.layer_blocks[0].message_block
        if not skip:
            block.terms_degree_zero = block.terms
        out = model(batch)
        energy, forces = out["energy"], out["forces"]
        (energy.sum() + (forces * torch.linspace(-1, 1, forces.numel(), dtype=forces.dtype).view_as(forces)).sum()).backward()
        return energy, forces, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    e_skip, f_skip, g_skip = run(True)
    e_full, f_full, g_full = run(False)
    torch.testing.assert_close(e_skip, e_full, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(f_skip, f_full, rtol=1e-12, atol=1e-15)
    assert g_skip.keys() == g_full.keys()
    skipped = [n for n in g_skip if n.startswith("layer_blocks.0.message_block.") and ".so2_conv." in n]
    assert skipped and all(g_skip[n] is not None and not g_skip[n].any() for n in skipped)
    for name in g_skip:
        torch.testing.assert_close(g_skip[name], g_full[name], rtol=1e-9, atol=1e-14, msg=name)


@pytest.mark.parametrize("lmax,mmax", [(1, 0), (3, 3), (6, 2)])
@pytest.mark.parametrize("form", ["eager", "traced-form", "operators", "plain-expressions"])
def test_fast_model_equals_the_reference_blocks_on_other_sizes(lmax, mmax, form, monkeypatch):
    """Configurations without fixtures (mmax = 0, mmax = lmax, lmax 6): the fast model (in
    its eager form, in the form that torch.compile and torch.export trace (fresh buffers,
    the stages as operators), with only the stages as operators, and in the traced form
    with the operators' plain expressions that standalone AOTI packages compile) against
    the same model whose message blocks run the readable reference composition
    (MessageBlock.reference), in float64, with gradients."""
    from escn_train.graph import radius_graph_pbc
    from escn_train.models import escn
    from escn_train.models.fast import so2

    gen = torch.Generator().manual_seed(lmax * 10 + mmax)
    natoms = torch.tensor([5, 3])
    pos = torch.rand(8, 3, generator=gen, dtype=torch.float64) * 4
    cell = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1) * 4.0
    graph = radius_graph_pbc(pos, cell, natoms, 3.5, 12)
    args = (pos, torch.repeat_interleave(torch.arange(2), natoms), natoms, torch.randint(1, 10, (8,), generator=gen),
            graph.edge_index, graph.edge_distance, graph.edge_distance_vec)
    torch.manual_seed(0)
    model = escn.eSCN(max_neighbors=12, cutoff=3.5, max_num_elements=10, num_layers=2, lmax=lmax, mmax=mmax,
                      sphere_channels=4, hidden_channels=6, edge_channels=5, num_sphere_samples=16,
                      distance_resolution=0.25, export=True).double()
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.3, generator=gen)

    def run():
        model.zero_grad()
        energy, forces = model(*args)
        (energy.sum() + forces.square().sum()).backward()
        return energy, forces, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    if form == "operators":
        monkeypatch.setattr(so2, "_calls_operators", lambda like: True)
    if form in ("traced-form", "plain-expressions"):
        for module in (fast_geometry, so2):
            monkeypatch.setattr(module, "_tracing", lambda: True)
    if form == "plain-expressions":
        from escn_train.models.fast import grid

        for name, plain in [("so2_stage", so2.so2_stage_unblocked), ("first_layer", so2.first_layer_unblocked),
                            ("grid_silu", grid.grid_silu_unblocked)]:
            monkeypatch.setattr(torch.ops.escn_train, name, plain)  # what inline_operators substitutes
    fast = run()
    monkeypatch.undo()

    def reference_message(self, x, atomic_numbers, edge_distance, edge_index, wigner, **_):
        return self.reference(x, atomic_numbers, edge_distance, edge_index, wigner)

    monkeypatch.setattr(escn.MessageBlock, "forward", reference_message)
    reference = run()
    assert fast[1].abs().max() > 1e-6  # not a trivially zero output
    torch.testing.assert_close(fast[0], reference[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fast[1], reference[1], rtol=1e-10, atol=1e-14)
    for a, b in zip(fast[2], reference[2]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_bf16_autocast_training_step_follows_float32():
    """Under autocast the grouped path runs its plain-autograd form (rotations in float32):
    a bf16-mixed step runs and stays close to the float32 one."""
    from reference_fixtures import build_model, fixture_batch

    batch = fixture_batch("l4m2_sigmoid")
    model = build_model("l4m2_sigmoid")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1, generator=gen)

    def step(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(batch)
        (out["energy"].float().sum() + out["forces"].float().square().sum()).backward()
        return out["energy"].float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    energy32, grads32 = step(False)
    energy16, grads16 = step(True)
    assert grads16.keys() == grads32.keys()
    assert all(torch.isfinite(g).all() for g in grads16.values())
    assert (energy16 - energy32).abs().max() <= 1e-3 * energy32.abs().max()
    errors = sorted(((grads16[n] - g).norm() / g.norm()).item() for n, g in grads32.items() if g.norm() > 0)
    assert errors[len(errors) // 2] < 0.05  # bf16 products: ~1% typical (same as the per-edge code)


@pytest.mark.parametrize("name", ["tiny_l2m1", "l4m2_sigmoid", "l6m3_linsig_rescale"])
def test_bf16_autocast_forces_stay_within_a_few_percent(name):
    """forward_trainable under bf16 autocast (graph, frames, grids and readout in float32;
    linear layers in bf16) against float32, on the fixtures' weights. Measured: 1.0%, 0.6%,
    0.4% of max |F|; 16% and 5% for the first two while the graph was built in bf16."""
    from reference_fixtures import build_model, fixture_batch

    model, batch = build_model(name), fixture_batch(name)
    with torch.no_grad():
        plain = model(batch)["forces"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(batch)["forces"].float()
    assert (mixed - plain).abs().max() <= 0.03 * plain.abs().max()


def test_wigner_matrices_ignore_autocast():
    from escn_train.models.escn import edge_frames
    from escn_train.models.so3 import WignerCalculator

    vectors = torch.randn(50, 3, generator=torch.Generator().manual_seed(4))
    wigner = WignerCalculator(4)
    plain = wigner(edge_frames(vectors))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = wigner(edge_frames(vectors))
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


@pytest.mark.parametrize("lmax,mmax,degree_zero", [(2, 1, False), (3, 3, False), (4, 2, True)])
def test_first_layer_operator_equals_the_plain_projections_with_gradients(lmax, mmax, degree_zero):
    """The operator torch.compile calls for the per-atom first layer: same outputs as
    first_layer_projections, its hand-written backward against finite differences and
    against autograd of the plain expressions, and its registration (opcheck)."""
    from escn_train.models.fast.so2 import first_layer_projections, select_terms

    gen = torch.Generator().manual_seed(lmax + 7 * mmax)
    hidden, channels, atoms = 3, 2, 5
    terms = so2_terms(hidden, mmax)
    if degree_zero:
        terms = select_terms(terms, orders=(0,))
    orders = [t.order for t in terms]
    x = torch.randn(atoms, (lmax + 1) ** 2, channels, dtype=torch.float64, generator=gen, requires_grad=True)
    weights = [torch.randn(hidden, lmax - m + 1, channels, dtype=torch.float64, generator=gen, requires_grad=True)
               for m in orders]

    def operator(x, *weights):
        return tuple(torch.ops.escn_train.first_layer(x, list(weights), orders))

    def plain(x, *weights):
        return tuple(first_layer_projections(x, list(weights), orders))

    for a, b in zip(operator(x, *weights), plain(x, *weights), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.autograd.gradcheck(operator, (x, *weights), fast_mode=True)
    cotangents = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in plain(x, *weights)]
    ours = torch.autograd.grad(operator(x, *weights), (x, *weights), cotangents)
    expected = torch.autograd.grad(plain(x, *weights), (x, *weights), cotangents)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.escn_train.first_layer.default, (x, weights, orders))
