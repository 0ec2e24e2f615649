"""Training throughput (atoms/s, structures/s) and peak memory, logged every ``log_every_n_steps``.

The atom count is summed on the device and read once per logging interval (no host sync in
the other steps). Throughput is measured on rank 0 between logging points over the batches that rank trained
(multiplied by the world size as an estimate of the global rate, since the datamodule
balances atoms across ranks). Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and
the process's peak resident set size (``ru_maxrss``) on CPU, in MiB.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
import torch


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process on ``device`` in MiB (GPU allocator peak, else peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class ThroughputMonitor(L.Callback):
    """Logs ``perf/atoms_per_s``, ``perf/structures_per_s`` and ``perf/peak_memory_mib``."""

    def __init__(self) -> None:
        super().__init__()
        self._atoms: torch.Tensor | int = 0  # summed on the batch's device, read when logged
        self._structures = 0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._atoms = self._structures = 0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._atoms = batch.natoms.sum() + self._atoms
        self._structures += batch.natoms.numel()
        if (batch_idx + 1) % max(1, trainer.log_every_n_steps) != 0 or self._start is None:
            return
        atoms = int(self._atoms)  # the one host read per logging interval
        elapsed = time.perf_counter() - self._start
        if elapsed <= 0:
            return
        world = trainer.world_size
        pl_module.log_dict(
            {
                "perf/atoms_per_s": atoms * world / elapsed,
                "perf/structures_per_s": self._structures * world / elapsed,
                "perf/peak_memory_mib": peak_memory_mib(pl_module.device),
            },
            on_step=True,
            on_epoch=False,
            rank_zero_only=True,
        )
        self._atoms = self._structures = 0
        self._start = time.perf_counter()
