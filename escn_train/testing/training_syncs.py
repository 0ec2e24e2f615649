"""Host syncs per Lightning training step, measured with :class:`~escn_train.testing.SyncCounter`.

Two fits that differ only in their number of steps (``log_every_n_steps`` and ``2 ×``) run
under the counter; the difference, divided by ``log_every_n_steps``, is the steady-state
cost of one step including its share of one logging interval, with setup, the first
batch and teardown cancelled out. Each sync is attributed to the model (a frame in
``escn_train/models/``) or to the rest of the step (losses, metrics, EMA, finiteness
check, throughput, Lightning's logging).
"""

from __future__ import annotations

import gc
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L

from escn_train.testing.sync_counter import LIBRARY_FRAMES, SyncCounter

__all__ = ["StepSyncs", "training_step_syncs"]

MODEL_PATH = "escn_train/models/"
#: Batches are read, checked and collated inside the DataLoader (worker processes in real runs,
#: on the CPU): not part of the step.
DATA_LOADING_PATH = "/torch/utils/data/"


@dataclass
class StepSyncs:
    """Syncs per training step, in the model and outside it, and the outside ones by origin."""

    per_step: float
    model_per_step: float
    outside_per_step: float
    outside_origins: Counter

    def __str__(self) -> str:
        lines = [f"{self.per_step:g} syncs/step "
                 f"({self.model_per_step:g} in the model, {self.outside_per_step:g} outside)"]
        lines += [f"  {n} × {where}" for where, n in self.outside_origins.most_common()]
        return "\n".join(lines)


def _fit(make_module: Callable[[], L.LightningModule], make_data: Callable[[], Any], steps: int, log_every: int,
         make_callbacks: Callable[[], list[L.Callback]], root: str) -> SyncCounter:
    from lightning.pytorch.loggers import CSVLogger

    from lightning.pytorch.callbacks import ProgressBar

    module, data, callbacks = make_module(), make_data(), make_callbacks()
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, log_every_n_steps=log_every, limit_val_batches=0, num_sanity_val_steps=0,
        enable_model_summary=False, enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        enable_checkpointing=False, accelerator="auto", devices=1, logger=CSVLogger(root, name="csv", version=""),
        callbacks=callbacks, default_root_dir=root,
    )
    # Garbage of earlier work (other fits, other tests) is collected first and not during the
    # count: a finalizer that reads a tensor would otherwise land in one fit and not the other.
    gc.collect()
    gc.disable()
    try:
        with SyncCounter(record_stack=True) as syncs:
            trainer.fit(module, datamodule=data)
    finally:
        gc.enable()
    return syncs


def training_step_syncs(
    make_module: Callable[[], L.LightningModule],
    make_data: Callable[[], Any],
    make_callbacks: Callable[[], list[L.Callback]] = list,
    log_every_n_steps: int = 4,
) -> StepSyncs:
    """Syncs per step of ``trainer.fit`` (fresh module, data and callbacks for each of the two fits)."""
    with tempfile.TemporaryDirectory() as root:
        short = _fit(make_module, make_data, log_every_n_steps, log_every_n_steps, make_callbacks, root)
        long = _fit(make_module, make_data, 2 * log_every_n_steps, log_every_n_steps, make_callbacks, root)
    for syncs in (short, long):
        syncs.events = [e for e in syncs.events if not any(DATA_LOADING_PATH in f for f in e.stack)]
    n = float(log_every_n_steps)
    model = (long.count_matching(MODEL_PATH) - short.count_matching(MODEL_PATH)) / n
    total = (long.count - short.count) / n

    def outside(syncs: SyncCounter) -> Counter:
        return Counter(
            f"{e.op} at {e.origin(LIBRARY_FRAMES)}" for e in syncs.events if not any(MODEL_PATH in f for f in e.stack)
        )

    origins = outside(long)
    origins.subtract(outside(short))
    return StepSyncs(total, model, total - model, +origins)
