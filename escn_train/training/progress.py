"""The training progress bar: Lightning's TQDM bar, with the training loss read only when it refreshes.

Lightning converts every ``prog_bar=True`` value logged with ``on_step`` to a Python number
after every batch (a host sync per step on a GPU). The module therefore logs ``train/loss``
without ``prog_bar``, and this bar reads it from the callback metrics when it redraws,
every ``refresh_rate`` batches.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class LossProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` that also shows ``loss`` (the last training step's), read at each redraw."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("train/loss"))
        if loss is not None and trainer.training:
            items["loss"] = f"{float(loss):.3g}"
        return items
