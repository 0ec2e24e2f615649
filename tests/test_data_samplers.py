"""AtomBalancedBatchSampler: coverage, packing, determinism, per-rank balance."""

from __future__ import annotations

import numpy as np
import pytest

from escn_train.data import AtomBalancedBatchSampler


def natoms_fixture(n: int = 103, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 80, size=n)


def test_fixed_batches_cover_every_index_once_and_reshuffle_per_epoch():
    sampler = AtomBalancedBatchSampler(103, batch_size=10, seed=7)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 11
    assert sorted(i for b in epoch0 for i in b) == list(range(103))
    assert epoch0 == list(AtomBalancedBatchSampler(103, batch_size=10, seed=7))  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.sampler.set_epoch(0)  # the hook Lightning calls
    assert list(sampler) == epoch0
    assert list(AtomBalancedBatchSampler(103, batch_size=10, shuffle=False))[1] == list(range(10, 20))
    assert len(AtomBalancedBatchSampler(103, batch_size=10, drop_last=True)) == 10


def test_max_atoms_packing_respects_the_budget():
    natoms = natoms_fixture()
    sampler = AtomBalancedBatchSampler(len(natoms), natoms=natoms, max_atoms=200, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(natoms)))
    totals = [int(natoms[b].sum()) for b in batches]
    assert max(totals) <= 200
    assert np.mean(totals) > 150  # packing fills batches well
    capped = list(AtomBalancedBatchSampler(len(natoms), natoms=natoms, max_atoms=10_000, batch_size=4))
    assert max(len(b) for b in capped) == 4
    big = np.array([10, 500, 10])
    assert [len(b) for b in AtomBalancedBatchSampler(3, natoms=big, max_atoms=100, shuffle=False)] == [1, 1, 1]


@pytest.mark.parametrize("max_atoms,batch_size", [(None, 6), (240, None)])
def test_ranks_get_equal_batch_counts_balanced_atoms_and_full_coverage(max_atoms, batch_size):
    natoms = natoms_fixture(211)
    replicas = 4
    per_rank = []
    for rank in range(replicas):
        sampler = AtomBalancedBatchSampler(
            len(natoms), natoms=natoms, batch_size=batch_size, max_atoms=max_atoms,
            num_replicas=replicas, rank=rank, seed=3,
        )
        sampler.set_epoch(2)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler)
    assert len({len(b) for b in per_rank}) == 1
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(len(natoms)))
    # Ranks are disjoint except for the batches repeated to complete the last step.
    counts = np.bincount([i for batches in per_rank for b in batches for i in b], minlength=len(natoms))
    assert counts.max() <= 2
    # Step-by-step, the batches of the ranks have similar atom counts; totals per rank too.
    step_atoms = np.array([[natoms[b].sum() for b in batches] for batches in per_rank])  # [R, steps]
    spread = (step_atoms.max(0) - step_atoms.min(0)) / step_atoms.mean(0)
    assert np.median(spread) < 0.15
    totals = step_atoms.sum(1)
    assert (totals.max() - totals.min()) / totals.mean() < 0.05


def test_rank_assignment_is_deterministic_and_errors_are_clear():
    natoms = natoms_fixture(50)
    a = list(AtomBalancedBatchSampler(50, natoms=natoms, batch_size=4, num_replicas=2, rank=1, seed=5))
    b = list(AtomBalancedBatchSampler(50, natoms=natoms, batch_size=4, num_replicas=2, rank=1, seed=5))
    assert a == b
    with pytest.raises(ValueError, match="natoms is needed"):
        AtomBalancedBatchSampler(50, batch_size=4, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank 2 outside"):
        AtomBalancedBatchSampler(50, natoms=natoms, batch_size=4, num_replicas=2, rank=2)


@pytest.mark.parametrize("max_atoms", [None, 150])
def test_evaluation_shards_cover_each_structure_once_without_padding(max_atoms):
    natoms = natoms_fixture(23)
    shards = [
        list(AtomBalancedBatchSampler(23, natoms=natoms, batch_size=4, max_atoms=max_atoms, num_replicas=3, rank=r,
                                      shuffle=False, even=False))
        for r in range(3)
    ]
    seen = sorted(i for shard in shards for batch in shard for i in batch)
    assert seen == list(range(23))  # no repeats, nothing dropped
    assert all(len(shard) >= 1 for shard in shards)
    tiny = [list(AtomBalancedBatchSampler(3, natoms=natoms[:3], batch_size=8, num_replicas=2, rank=r, shuffle=False,
                                          even=False)) for r in range(2)]
    assert sorted(i for shard in tiny for b in shard for i in b) == [0, 1, 2] and all(tiny)
    with pytest.raises(ValueError, match="at least one"):
        AtomBalancedBatchSampler(1, natoms=natoms[:1], batch_size=8, num_replicas=2, rank=0, even=False)
