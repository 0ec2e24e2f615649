"""Batch sampling that balances atoms: packed batches and an even split across ranks.

Cost per training step scales with atoms (and edges), not with structures. This sampler

1. orders the dataset (a permutation seeded by ``seed + epoch``, or in order);
2. cuts it into batches of ``batch_size`` structures, or packs consecutive structures into
   batches of at most ``max_atoms`` atoms (and at most ``batch_size`` structures if both
   are given);
3. for ``num_replicas`` ranks, so that the batches of one step (one per rank) hold similar
   numbers of atoms and the ranks' totals even out:

   * fixed-size batches: each step's ``R * batch_size`` structures are sorted by size and
     dealt to the ranks in a snake order;
   * packed batches: the batches are sorted by atom count and dealt one step at a time,
     the largest of a step to the rank with the fewest atoms so far; steps are shuffled.

   Every rank gets the same number of batches: the last step is completed with structures
   (or batches) from the start of the order, or dropped with ``drop_last``.

It is deterministic given ``seed`` and the epoch set with :meth:`set_epoch`. Lightning
calls ``set_epoch`` on ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``, not
on the batch sampler itself, so :attr:`AtomBalancedBatchSampler.sampler` is a small hook
that forwards it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class AtomBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields lists of dataset indices for one rank (see the module docstring).

    Args:
        num_samples: dataset length.
        natoms: atoms per structure (length ``num_samples``); required for ``max_atoms``
            and for balancing across ranks, optional otherwise.
        batch_size: structures per batch (a cap when ``max_atoms`` is also given).
        max_atoms: pack batches up to this many atoms; a structure larger than this
            forms a batch of its own.
        num_replicas, rank: distributed layout.
        shuffle: permute the dataset each epoch.
        seed: base seed; the epoch is added to it.
        drop_last: drop the last incomplete fixed-size batch, and the incomplete last
            step across ranks instead of completing it with repeated batches.
        even: give every rank the same number of batches (training under DDP needs it).
            ``even=False`` (evaluation): every structure exactly once over all ranks, no
            repeats; ranks may get different numbers of batches (at least one each), which
            sum-reduced metrics (torchmetrics) handle exactly.
    """

    def __init__(
        self,
        num_samples: int,
        natoms: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        batch_size: int | None = None,
        max_atoms: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        even: bool = True,
    ) -> None:
        if batch_size is None and max_atoms is None:
            raise ValueError("give batch_size, max_atoms, or both")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        if natoms is None and (max_atoms is not None or num_replicas > 1):
            raise ValueError("natoms is needed to pack by max_atoms or to balance atoms across ranks")
        if natoms is not None:
            natoms = np.asarray(torch.as_tensor(natoms), dtype=np.int64).reshape(-1)
            if natoms.size != num_samples:
                raise ValueError(f"natoms has {natoms.size} entries for a dataset of {num_samples}")
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.num_samples = num_samples
        self.natoms = natoms
        self.batch_size = batch_size
        self.max_atoms = max_atoms
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.even = even
        if not even and num_samples < num_replicas:
            raise ValueError(
                f"{num_samples} structures cannot give each of {num_replicas} ranks at least one "
                "(evaluation shards are not padded with repeats)"
            )
        self.epoch = 0
        self._cached: tuple[int, list[np.ndarray]] | None = None
        self._resume: tuple[int, int] | None = None
        self.sampler = _EpochHook(self)

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of this epoch (call before iterating, on every rank)."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, position: int) -> None:
        """Continue an interrupted epoch: the next iteration in ``epoch`` starts at batch ``position``.

        Applies once, to the first iteration that runs with ``epoch`` set; ``len`` is unchanged
        (the training loop counts the consumed batches itself).
        """
        if position < 0:
            raise ValueError(f"resume position must be >= 0, got {position}")
        self._resume = (int(epoch), int(position))

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def _batches(self, generator: torch.Generator) -> list[np.ndarray]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator).numpy()
        else:
            order = np.arange(self.num_samples)
        if self.max_atoms is None:
            bounds = list(range(0, self.num_samples, self.batch_size)) + [self.num_samples]
            if self.drop_last and self.num_samples % self.batch_size:
                bounds.pop()
        else:
            bounds = _pack_bounds(self.natoms[order], self.max_atoms, self.batch_size)
        return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _rank_batches(self) -> list[np.ndarray]:
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._compute_rank_batches())
        return self._cached[1]

    def _compute_rank_batches(self) -> list[np.ndarray]:
        generator = self._generator()
        if self.num_replicas > 1 and not self.even:
            return self._split_batches(self._batches(generator))
        if self.num_replicas > 1 and self.max_atoms is None:
            return self._deal_samples(generator)
        batches = self._batches(generator)
        if self.num_replicas == 1:
            return batches
        return self._deal_batches(batches, generator)

    def _steps(self, count: int, per_step: int, what: str) -> int:
        steps = count // per_step if self.drop_last else -(-count // per_step)
        if steps == 0:
            raise ValueError(
                f"{count} {what} cannot give each of {self.num_replicas} ranks a full batch with drop_last=True"
            )
        return steps

    def _deal_samples(self, generator: torch.Generator) -> list[np.ndarray]:
        """Fixed-size batches across ranks: each step's ``R * batch_size`` structures are sorted
        by size and dealt in a snake (0, 1, …, R-1, R-1, …, 0, …), mirrored on odd steps."""
        replicas, size = self.num_replicas, self.batch_size
        order = torch.randperm(self.num_samples, generator=generator).numpy() if self.shuffle else np.arange(self.num_samples)
        steps = self._steps(self.num_samples, replicas * size, "structures")
        order = np.resize(order, steps * replicas * size).reshape(steps, replicas * size)  # repeats from the start
        by_size = np.take_along_axis(order, np.argsort(-self.natoms[order], axis=1, kind="stable"), axis=1)
        k = np.arange(replicas * size)
        snake = np.where((k // replicas) % 2 == 0, k % replicas, replicas - 1 - k % replicas)
        mirrored = np.arange(steps) % 2 == 1
        mine = np.where(mirrored[:, None], snake == replicas - 1 - self.rank, snake == self.rank)
        return [by_size[s, mine[s]] for s in range(steps)]

    def _split_batches(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Uneven shards without repeats: batch ``i`` goes to rank ``i % R``; with fewer batches
        than ranks, the structures are re-cut into ``R`` batches so no rank is left empty."""
        if len(batches) < self.num_replicas:
            order = np.concatenate(batches)
            batches = [chunk for chunk in np.array_split(order, self.num_replicas)]
        return batches[self.rank :: self.num_replicas]

    def _deal_batches(self, batches: list[np.ndarray], generator: torch.Generator) -> list[np.ndarray]:
        """Packed batches across ranks: sorted by atoms, dealt one step (one batch per rank) at a
        time, the largest batch of a step to the rank with the fewest atoms so far."""
        replicas = self.num_replicas
        steps = self._steps(len(batches), replicas, "batches")
        needed = steps * replicas
        while len(batches) < needed:  # complete the last step with batches from the start
            batches = batches + batches[: needed - len(batches)]
        sizes = np.array([int(self.natoms[b].sum()) for b in batches], dtype=np.int64)
        by_size = np.argsort(-sizes, kind="stable")[:needed]  # with drop_last: drops the smallest
        totals = np.zeros(replicas, dtype=np.int64)
        step_batch = []
        for step in range(steps):
            group = by_size[step * replicas : (step + 1) * replicas]  # descending sizes
            ranks = np.argsort(totals, kind="stable")
            totals[ranks] += sizes[group]
            step_batch.append(int(group[int(np.nonzero(ranks == self.rank)[0][0])]))
        step_order = torch.randperm(steps, generator=generator).tolist() if self.shuffle else range(steps)
        return [batches[step_batch[step]] for step in step_order]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
            self._resume = None
        for batch in batches[start:]:
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._rank_batches())


def _pack_bounds(natoms: np.ndarray, max_atoms: int, max_structures: int | None) -> list[int]:
    """Start offsets (plus the end) of greedy consecutive packs of at most ``max_atoms`` atoms."""
    bounds, total, count = [0], 0, 0
    for i, n in enumerate(natoms.tolist()):  # one pass over structures, not atoms
        if count and (total + n > max_atoms or (max_structures is not None and count >= max_structures)):
            bounds.append(i)
            total, count = 0, 0
        total += n
        count += 1
    bounds.append(len(natoms))
    return bounds


class _EpochHook:
    """What Lightning finds at ``batch_sampler.sampler``: forwards ``set_epoch`` to the batch sampler."""

    def __init__(self, owner: AtomBalancedBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)
