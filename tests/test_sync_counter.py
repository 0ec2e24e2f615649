"""The host-sync counter recognises each kind of synchronising op, and nothing else."""

from __future__ import annotations

import pytest
import torch

from escn_train.testing import SyncCounter


def _count(fn) -> SyncCounter:
    with SyncCounter() as syncs:
        fn()
    return syncs


x = torch.linspace(-1.0, 1.0, 7)
mask = x > 0


@pytest.mark.parametrize("name, fn, op", [
    ("item", lambda: x[0].item(), "_local_scalar_dense"),
    ("float", lambda: float(x.sum()), "_local_scalar_dense"),
    ("if tensor", lambda: bool(mask.any()), "_local_scalar_dense"),
    ("tolist", lambda: x.tolist(), "tolist"),
    ("numpy", lambda: x.numpy(), "numpy"),
    ("nonzero", lambda: torch.nonzero(mask), "nonzero"),
    ("argwhere", lambda: torch.argwhere(mask), "nonzero"),
    ("mask index", lambda: x[mask], "index"),
    ("mask assign", lambda: x.clone().__setitem__(mask, 0.0), "index_put_"),
    ("masked_select", lambda: torch.masked_select(x, mask), "masked_select"),
    ("unique", lambda: torch.unique(mask), "_unique2"),
    ("bincount", lambda: torch.bincount(torch.tensor([0, 2, 2])), "bincount"),
    ("repeat_interleave", lambda: torch.repeat_interleave(torch.tensor([1, 2])), "repeat_interleave"),
    ("equal", lambda: torch.equal(x, x), "equal"),
])
def test_each_synchronising_op_counts_once(name, fn, op):
    syncs = _count(fn)
    assert syncs.count == 1, syncs.summary()
    assert syncs.by_op() == {op: 1}
    assert "test_sync_counter.py" in syncs.summary()  # the event names the calling line


def test_pure_tensor_code_forward_and_backward_make_no_syncs():
    layer = torch.nn.Linear(3, 2)
    pos = torch.randn(5, 3, requires_grad=True)
    batch = torch.tensor([0, 0, 1, 1, 1])

    def step():
        energy = torch.zeros(2).index_add(0, batch, layer(pos).sum(-1))
        (forces,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
        loss = energy.abs().mean() + torch.where(mask[:5, None], forces, 0.0).norm(dim=-1).mean()
        loss.backward()
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # size given: no sync
        x[torch.tensor([0, 3])]  # integer indices: no sync
        torch.isfinite(loss) & torch.isfinite(x).all()

    syncs = _count(step)
    assert syncs.count == 0, syncs.summary()


def test_counts_add_up_and_cpu_tensors_can_be_left_out():
    with SyncCounter() as syncs:
        for _ in range(3):
            x.sum().item()
        x[mask]
    assert syncs.count == 4 and syncs.by_op() == {"_local_scalar_dense": 3, "index": 1}
    with SyncCounter(include_cpu=False) as device_only:
        x.sum().item()
        x.tolist()
    assert device_only.count == 0  # a CPU tensor's value costs no device sync on a GPU run
    with SyncCounter(record_stack=False) as bare:
        x.sum().item()
    assert bare.count == 1 and bare.events[0].stack == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copies_between_host_and_device_count_on_cuda():
    y = torch.ones(3, device="cuda")
    with SyncCounter(include_cpu=False) as syncs:
        y.cpu()
        y.sum().item()
        y * 2
    assert syncs.by_op() == {"_to_copy": 1, "_local_scalar_dense": 1}, syncs.summary()
