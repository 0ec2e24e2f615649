"""Device-to-host synchronisations of the model, counted with escn_train.testing.SyncCounter.

A sync is any op whose result the host must read back: a scalar read (``.item()``,
``bool(t)``, ``.tolist()`` -> ``aten._local_scalar_dense``), an output whose *shape*
depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``bincount``, ``repeat_interleave`` without ``output_size``), or a host-side comparison
(``equal``, ``is_nonzero``). On a GPU each one stalls the device; ``torch.compile`` cannot
capture across them.
"""

from __future__ import annotations

import pytest
import torch
from reference_fixtures import build_model, fixture_batch, load_fixture

from escn_train.testing.sync_counter import SyncCounter


def _forward_args(name: str) -> tuple[torch.Tensor, ...]:
    fixture = load_fixture(name)
    s, g = fixture["structures"], fixture["graph"]
    return (s["pos"], s["batch"], s["natoms"], s["atomic_numbers"], g["edge_index"], g["edge_distance"],
            g["edge_distance_vec"])


def _loss(energy: torch.Tensor, forces: torch.Tensor) -> torch.Tensor:
    return energy.abs().mean() + forces.abs().mean()


def test_the_counter_sees_the_syncs_it_is_meant_to_see():
    x = torch.tensor([0.0, 1.0, 2.0])
    with SyncCounter() as counter:
        x.sum().item()
        x[x > 0]
        x.nonzero()
        torch.bincount(torch.tensor([1, 2]))
        bool(x.any())
    assert counter.count == 5, counter.summary()


@pytest.mark.parametrize("name", ["tiny_l2m1", "l4m2_sigmoid", "l6m3_linsig_rescale"])
def test_forward_and_backward_make_no_host_sync_without_input_checks(name):
    model = build_model(name, export=True, check_inputs=False).train()
    args = _forward_args(name)
    with SyncCounter() as counter:
        _loss(*model(*args)).backward()  # training
        with torch.no_grad():
            model(*args)  # inference
    assert counter.count == 0, counter.summary()


def test_with_input_checks_the_model_does_sync():
    """The checks read their verdict back (that is their cost, and why they can be off)."""
    args = _forward_args("tiny_l2m1")
    with SyncCounter() as counter:
        build_model("tiny_l2m1", export=True)(*args)
    assert counter.count > 0


def test_forward_trainable_syncs_do_not_grow_with_layers_or_batch():
    """Given a graph (edge_index + cell_offsets), forward_trainable adds none of its own."""
    counts = []
    for layers, structures in ((1, [0]), (2, [0, 1, 2, 3])):
        config = dict(load_fixture("tiny_l2m1")["config"], num_layers=layers, check_inputs=False)
        from escn_train.graph import radius_graph_pbc
        from escn_train.models.escn import eSCN

        model = eSCN(**config)
        batch = fixture_batch("tiny_l2m1", structures)
        graph = radius_graph_pbc(batch.pos, batch.cell, batch.natoms, config["cutoff"], config["max_neighbors"])
        batch.edge_index, batch.cell_offsets = graph.edge_index, graph.cell_offsets
        with SyncCounter() as counter:
            out = model(batch)
            _loss(out["energy"], out["forces"]).backward()
        counts.append(counter.count)
    assert counts == [0, 0]


def test_forward_trainable_building_its_graph_syncs_a_constant_number_of_times():
    """Building the graph reads back a fixed number of values (the host neighbour search, the
    tie check and the edge count), whatever the batch holds and however many layers follow."""
    from escn_train.models.escn import eSCN

    config = dict(load_fixture("tiny_l2m1")["config"], check_inputs=False)
    counts = []
    for layers, structures, max_neighbors in ((1, [0], 20), (2, [0, 1], 20), (3, [0, 1, 2, 3], 5), (2, [3, 1], 8)):
        model = eSCN(**dict(config, num_layers=layers, max_neighbors=max_neighbors))
        batch = fixture_batch("tiny_l2m1", structures)
        for key in ("edge_index", "cell_offsets"):
            if key in batch:
                del batch[key]
        with SyncCounter() as counter:
            out = model.forward_trainable(batch)
            _loss(out["energy"], out["forces"]).backward()
        counts.append(counter.count)
        assert counter.count_matching("escn_train/graph.py") == counter.count, counter.summary()
    assert len(set(counts)) == 1 and counts[0] <= 12, counts
