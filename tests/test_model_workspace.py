"""Inference buffers kept between calls (escn_train.models.workspace)."""

from __future__ import annotations

import copy
import pickle
import threading

import torch

from escn_train.models.workspace import Workspace
from reference_fixtures import build_model, fixture_batch


def test_workspace_reuses_grows_and_separates_threads():
    workspace, like = Workspace(), torch.zeros(1)
    first = workspace.get("a", (4, 5), like)
    assert workspace.get("a", (2, 10), like).data_ptr() == first.data_ptr()  # same buffer, new shape
    assert workspace.get("b", (4, 5), like).data_ptr() != first.data_ptr()
    grown = workspace.get("a", (100,), like)
    assert grown.shape == (100,) and workspace.get("a", (110,), like).data_ptr() == grown.data_ptr()  # headroom
    assert workspace.get("a", (3,), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    other = []
    thread = threading.Thread(target=lambda: other.append(workspace.get("b", (4, 5), like).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != workspace.get("b", (4, 5), like).data_ptr()
    workspace.clear()
    assert workspace.get("b", (1,), like).numel() == 1
    assert pickle.loads(pickle.dumps(workspace))._buffers() == {}


def test_unshared_buffers_skip_what_a_graph_or_a_caller_still_holds(monkeypatch):
    workspace, like = Workspace(), torch.zeros(1)
    weight = torch.ones(4, requires_grad=True)
    first = workspace.unshared("y", (4,), like).fill_(2.0)
    first_pointer = first.data_ptr()
    loss = (weight * first).sum()  # the graph saves ``first`` for weight's gradient
    del first
    second = workspace.unshared("y", (4,), like)  # the graph's buffer is busy: another one
    assert second.data_ptr() != first_pointer
    second.fill_(5.0)
    loss.backward()
    assert torch.equal(weight.grad, torch.full((4,), 2.0))  # the saved values were not overwritten
    del loss, second
    again = workspace.unshared("y", (2, 2), like)  # both free: the first one, in any shape
    assert again.shape == (2, 2) and again.data_ptr() == first_pointer
    view = again[0]
    del again
    assert workspace.unshared("y", (3,), like).data_ptr() != first_pointer  # a view keeps it busy
    assert len(workspace._pools()["y"]) == 2
    monkeypatch.setattr("escn_train.models.workspace._POOL_LIMIT", 2)
    busy = [workspace.unshared("y", (3,), like) for _ in range(2)]
    extra = workspace.unshared("y", (3,), like)  # beyond the limit: a fresh tensor, not kept
    assert len(workspace._pools()["y"]) == 2 and extra.untyped_storage().nbytes() == 12
    assert workspace.nbytes() == sum(b.untyped_storage().nbytes() for b in workspace._pools()["y"])
    del busy, view
    workspace.clear()
    assert workspace.nbytes() == 0


def test_training_steps_reuse_the_so2_outputs_and_match_fresh_buffers():
    """Two training steps through kept SO(2) outputs give the gradients a model without kept
    buffers gives, bit for bit, and the second step writes into the first step's buffers."""
    model = build_model("tiny_l2m1")
    batch = fixture_batch("tiny_l2m1")

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        out = model(batch)
        (out["energy"].sum() + out["forces"].square().sum()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    first = gradients()
    pool = [b.data_ptr() for b in model.workspace._pools()["so2_out"]]
    assert len(pool) == model.num_layers  # one per message block, all saved at once
    second = gradients()
    assert [b.data_ptr() for b in model.workspace._pools()["so2_out"]] == pool
    model.workspace.clear()
    fresh = gradients()
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, fresh))


def test_inference_reusing_buffers_between_graphs_of_other_sizes_gives_fresh_results():
    """Calls on graphs of different sizes, in turn, through one model's kept buffers give
    bit for bit what a model without kept buffers gives."""
    model = build_model("tiny_l2m1")
    batches = [fixture_batch("tiny_l2m1", [0]), fixture_batch("tiny_l2m1"), fixture_batch("tiny_l2m1", [1])]
    with torch.no_grad():
        reused = [model(b) for b in batches + batches[:1]]
        assert model.workspace._buffers()  # the grouped path did keep buffers
        for batch, out in zip(batches + batches[:1], reused):
            model.workspace.clear()
            fresh = model(batch)
            assert torch.equal(out["energy"], fresh["energy"]) and torch.equal(out["forces"], fresh["forces"])
        clone = copy.deepcopy(model)
    assert clone.workspace._buffers() == {}


def test_release_buffers_frees_the_models_and_the_operators_buffers(monkeypatch):
    """The operators keep their buffers in a workspace of their own, which outlives any
    model: release_buffers() frees it and every model's, and the results stay the same."""
    from escn_train.models.fast import so2
    from escn_train.models.workspace import release_buffers

    model = build_model("tiny_l2m1")
    batch = fixture_batch("tiny_l2m1")
    release_buffers()
    with torch.no_grad():
        eager = model(batch)
        monkeypatch.setattr(so2, "_calls_operators", lambda like: True)  # as compiled and exported code calls it
        through_operators = model(batch)
    kept = model.workspace.nbytes() + so2._OPERATOR_WORKSPACE.nbytes()
    assert model.workspace.nbytes() > 0 and so2._OPERATOR_WORKSPACE.nbytes() > 0
    assert release_buffers() == kept
    assert model.workspace.nbytes() == 0 and so2._OPERATOR_WORKSPACE.nbytes() == 0
    torch.testing.assert_close(through_operators["energy"], eager["energy"])
    torch.testing.assert_close(through_operators["forces"], eager["forces"])


def test_ema_copy_shares_the_kept_buffers_but_not_the_weights():
    """Training and validation never run at once: the EMA copy uses the same buffers."""
    from escn_train.training.ema import ExponentialMovingAverage

    model = build_model("tiny_l2m1")
    ema = ExponentialMovingAverage(model)
    assert ema.module.workspace is model.workspace
    weight = model.sphere_embedding.weight
    assert ema.module.sphere_embedding.weight.data_ptr() != weight.data_ptr()
    assert torch.equal(ema.module.sphere_embedding.weight, weight)
