"""Bad inputs are refused in eager mode with errors that name the atom or edge."""

from __future__ import annotations

import pytest
import torch
from reference_fixtures import build_model, fixture_batch, load_fixture

NAME = "tiny_l2m1"


def _args(device: torch.device | str = "cpu"):
    fixture = load_fixture(NAME)
    s, g = fixture["structures"], fixture["graph"]
    return [
        s["pos"].clone().to(device),
        s["batch"].clone().to(device),
        s["natoms"].clone().to(device),
        s["atomic_numbers"].clone().to(device),
        g["edge_index"].clone().to(device),
        g["edge_distance"].clone().to(device),
        g["edge_distance_vec"].clone().to(device),
    ]


def test_atomic_number_out_of_range_names_the_atom(device):
    model = build_model(NAME, export=True).to(device)
    args = _args(device)
    args[3][5] = model.max_num_elements
    with pytest.raises(ValueError, match=r"atom 5 has atomic number 90.*max_num_elements=90"):
        model(*args)
    batch = fixture_batch(NAME).to(device)
    batch.atomic_numbers[7] = 120
    with pytest.raises(ValueError, match=r"atom 7 has atomic number 120"):
        build_model(NAME).to(device)(batch)


def test_zero_length_edge_names_the_edge(device):
    model = build_model(NAME, export=True).to(device)
    args = _args(device)
    args[6][3] = 0.0
    args[5][3] = 0.0
    source, target = args[4][:, 3].tolist()
    with pytest.raises(ValueError, match=rf"edge 3 \(source atom {source} -> target atom {target}\) has length 0"):
        model(*args)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_position_names_the_atom(value, device):
    args = _args(device)
    args[0][11, 1] = value
    with pytest.raises(ValueError, match=r"atom 11 has a non-finite position"):
        build_model(NAME, export=True).to(device)(*args)
    batch = fixture_batch(NAME).to(device)
    batch.pos[11, 2] = value
    with pytest.raises(ValueError, match=r"atom 11 has a non-finite position"):
        build_model(NAME).to(device)(batch)


def test_more_edges_per_target_than_max_neighbors_names_the_atom():
    """Edge tensors hold max_neighbors slots per target atom: a denser graph is refused."""
    model = build_model(NAME, export=True)
    args = _args()
    edge_index = args[4]
    extra = (edge_index[1] == 3).nonzero().view(-1)[:5]
    more = edge_index[:, extra].clone()
    more[1] = 2  # atom 2 gets five more incoming edges
    args[4] = torch.cat([edge_index, more], dim=1)
    args[5] = torch.cat([args[5], args[5][extra]])
    args[6] = torch.cat([args[6], args[6][extra]])
    count = int((args[4][1] == 2).sum())
    assert count > model.max_neighbors
    with pytest.raises(ValueError, match=rf"atom 2 is the target of {count} edges, more than the model's max_neighbors=20"):
        model(*args)


def test_check_inputs_false_skips_the_eager_checks():
    model = build_model(NAME, export=True, check_inputs=False)
    assert model.check_inputs is False and "check_inputs" not in str(list(model.state_dict()))
    args = _args()
    args[0][11, 1] = float("nan")  # not refused: the caller has validated its inputs
    args[5][3] = args[6][3, 0] = float("nan")
    energy, forces = model(*args)
    assert not torch.isfinite(forces).all()


def test_checks_are_skipped_inside_an_exported_program():
    model = build_model(NAME, export=True)
    program = torch.export.export(model, tuple(_args()))
    args = _args()
    args[3][5] = 3  # still a valid index: the exported graph simply has no validation op
    energy, forces = program.module()(*args)
    assert torch.isfinite(energy).all() and torch.isfinite(forces).all()
    assert not [n for n in program.graph.nodes if "assert" in str(n.target) and "async" in str(n.target)]


def test_invalid_configuration_is_refused():
    from escn_train.models.escn import eSCN

    with pytest.raises(ValueError, match="mmax must be between 0 and lmax"):
        eSCN(lmax=2, mmax=3)
    with pytest.raises(ValueError, match="distance_function='cosine'"):
        eSCN(lmax=2, mmax=1, num_layers=1, sphere_channels=8, hidden_channels=8, edge_channels=8, distance_function="cosine")


def test_calling_convention_follows_the_export_flag(device):
    batch = fixture_batch(NAME).to(device)
    out = build_model(NAME).to(device)(batch)
    assert isinstance(out, dict) and out["energy"].shape == (4,) and out["forces"].shape == (38, 3)
    energy, forces = build_model(NAME, export=True).to(device)(*_args(device))
    assert energy.shape == (4,) and forces.shape == (38, 3)


def test_structures_without_edges_get_zero_messages(device):
    """An isolated atom (no neighbour within the cutoff) still gets a prediction."""
    from torch_geometric.data import Data

    model = build_model(NAME).to(device)
    lone = Data(
        pos=torch.zeros(1, 3), cell=torch.zeros(1, 3, 3), atomic_numbers=torch.tensor([29]),
        natoms=torch.tensor([1]), batch=torch.zeros(1, dtype=torch.long), pbc=torch.zeros(1, 3, dtype=torch.bool),
    ).to(device)
    with torch.no_grad():
        out = model(lone)
    assert out["energy"].shape == (1,) and out["forces"].shape == (1, 3)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()


def test_grid_silu_gradient_matches_autograd():
    from escn_train.models.fast.grid import grid_silu

    gen = torch.Generator().manual_seed(1)
    y = torch.randn(6, 7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    to_grid = torch.randn(18, 7, dtype=torch.float64, generator=gen)
    from_grid = torch.randn(7, 18, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda v: grid_silu(v, to_grid, from_grid), (y,))
    y32 = y.detach().float().requires_grad_()
    grad_out = torch.randn(6, 7, 4, generator=gen).float()
    (grid_silu(y32, to_grid.float(), from_grid.float()) * grad_out).sum().backward()
    plain = y.detach().float().requires_grad_()
    reference = torch.matmul(from_grid.float(), torch.nn.functional.silu(torch.matmul(to_grid.float(), plain)))
    (reference * grad_out).sum().backward()
    assert torch.equal(y32.grad, plain.grad)


@pytest.mark.parametrize("channels", [4, 32], ids=["pytorch-operations", "cpu-kernel"])
def test_grid_silu_in_several_edge_blocks_equals_the_plain_expression(channels, monkeypatch):
    """Blocks of 3 edges (the last one short) against the unblocked expression in float64,
    forward and backward; 32 channels take the fused CPU kernel where the machine has it."""
    from escn_train.models.fast import grid as escn

    monkeypatch.setattr(escn, "_block_floats", lambda: 3 * 18 * channels)
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(10, 7, channels, generator=gen, requires_grad=True)
    to_grid, from_grid = torch.randn(18, 7, generator=gen), torch.randn(7, 18, generator=gen)
    grad_out = torch.randn(10, 7, channels, generator=gen)
    blocked = escn.grid_silu(y, to_grid, from_grid)
    (blocked * grad_out).sum().backward()
    plain_y = y.detach().double().requires_grad_()
    plain = torch.matmul(from_grid.double(), torch.nn.functional.silu(torch.matmul(to_grid.double(), plain_y)))
    (plain * grad_out.double()).sum().backward()
    torch.testing.assert_close(blocked.double(), plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.grad.double(), plain_y.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(escn.grid_silu(y, to_grid, from_grid), blocked, rtol=0, atol=0)


@pytest.mark.parametrize("group_size,max_neighbors", [(16, 30), (3, None)], ids=["one-group-per-atom", "split-groups"])
def test_message_block_gradients_match_a_plain_composition_of_the_public_blocks(group_size, max_neighbors, monkeypatch):
    """The fused message path (custom backward passes included) against the same message
    written with the public SO2Block.forward, index_add and an unblocked grid; also with
    atoms' edges split over several groups."""
    from escn_train.models.fast import geometry as fast_geometry

    monkeypatch.setattr(fast_geometry, "GROUP_SIZE", group_size)
    fixture = load_fixture("l4m2_sigmoid")
    model = build_model("l4m2_sigmoid").double()
    s, g = fixture["structures"], fixture["graph"]
    wigner = model.wigner(fixture["edge_rot_mat"].double())
    block = model.layer_blocks[1].message_block
    x = fixture["layers"]["message1"]["x_in"].double()
    z, dist, edges = s["atomic_numbers"], g["edge_distance"].double(), g["edge_index"]
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def plain():
        x_edge = block.edge_block(dist, z[edges[0]], z[edges[1]])
        rows = wigner[:, block.out_mask, :]
        y = block.so2_block_source(torch.bmm(rows, x[edges[0]]), x_edge) + block.so2_block_target(
            torch.bmm(rows, x[edges[1]]), x_edge
        )
        grid = block.SO3_grid["lmax_mmax"]
        y = grid.from_grid_flat(torch.nn.functional.silu(grid.to_grid_flat(y)))
        y = torch.bmm(rows.transpose(1, 2), y)
        return torch.zeros_like(x).index_add(0, edges[1], y)

    x.requires_grad_()
    params = [x] + [p for p in block.parameters() if p.requires_grad]
    geometry = block.geometry(wigner, edges, x.shape[0], max_neighbors)
    assert geometry.groups[1].one_per_atom == (max_neighbors is not None)
    assert geometry.groups[0].size == group_size
    fused = block(x, z, dist, edges, wigner, geometry=geometry)
    fused_grads = torch.autograd.grad((fused * weights).sum(), params)
    reference = plain()
    reference_grads = torch.autograd.grad((reference * weights).sum(), params)
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block.reference(x, z, dist, edges, wigner), reference, rtol=1e-12, atol=1e-14)
    for a, b in zip(fused_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gaussian_smearing_sets_only_subnormal_values_to_zero():
    """The fast path (no autograd) equals the plain formula (to the last bit or so: exp()'s
    vector and scalar code differ by an ulp) except where exp() would give a value below
    about the smallest normal float32 (exponent below -87), which becomes exactly 0."""
    from escn_train.models.smearing import GaussianSmearing

    smearing = GaussianSmearing(0.0, 6.0, 300, 1.0)
    # Beyond both ends of the centres too (the band of evaluated centres is clipped there).
    dist = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 6.6 - 0.3
    dist[:4] = torch.tensor([0.0, 6.0, -2.0, 9.0])
    shifted = dist.view(-1, 1) - smearing.offset.view(1, -1)
    plain = torch.exp(smearing.coeff * shifted * shifted)
    fast = smearing(dist)
    normal = smearing.coeff * shifted * shifted >= -87.0  # exp >= 1.6e-38, a normal float32
    torch.testing.assert_close(fast[normal], plain[normal], rtol=3e-7, atol=0)
    assert not fast[~normal].any() and (~normal).any() and normal.any()
    assert plain[~normal].max() < 2e-38
    with_grad = dist.clone().requires_grad_()
    torch.testing.assert_close(smearing(with_grad), plain, rtol=0, atol=2e-38)
    wide = GaussianSmearing(0.0, 6.0, 20, 1.0)  # every centre within reach: the dense path
    shifted = dist.view(-1, 1) - wide.offset.view(1, -1)
    torch.testing.assert_close(wide(dist), torch.exp(wide.coeff * shifted * shifted), rtol=3e-7, atol=2e-38)


@pytest.mark.parametrize("group_atom", [None, [0, 0, 1, 2, 2]], ids=["one-group-per-atom", "split-groups"])
def test_grid_silu_operator_rotated_back_matches_its_plain_expressions(group_atom, monkeypatch):
    """The blocked operator that eager, compile and export run, with the rotation back and
    its Wigner-row gradient, against the plain expressions AOTInductor compiles."""
    from escn_train.models.fast import grid

    monkeypatch.setattr(grid, "_block_floats", lambda: 2 * 18 * 4)  # blocks of one group (2 slots)
    gen = torch.Generator().manual_seed(3)
    group_atom = None if group_atom is None else torch.tensor(group_atom)
    num_groups, size, num_atoms = (3 if group_atom is None else 5), 2, 3
    y = torch.randn(num_groups * size, 7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    rows = torch.randn(num_groups, size * 7, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    to_grid = torch.randn(18, 7, dtype=torch.float64, generator=gen)
    from_grid = torch.randn(7, 18, dtype=torch.float64, generator=gen)

    def blocked(y, rows):
        return torch.ops.escn_train.grid_silu(y, to_grid, from_grid, rows, group_atom, num_atoms, size)

    torch.testing.assert_close(
        blocked(y, rows), grid.grid_silu_unblocked(y, to_grid, from_grid, rows, group_atom, num_atoms, size),
        rtol=1e-12, atol=1e-12,
    )
    assert torch.autograd.gradcheck(blocked, (y, rows))
    torch.library.opcheck(torch.ops.escn_train.grid_silu.default,
                          (y, to_grid, from_grid, rows, group_atom, num_atoms, size))
