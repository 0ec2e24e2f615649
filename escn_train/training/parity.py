"""Parity plots (predicted vs reference energy and forces) after validation and test.

The callback collects the physical predictions the module returns from its val/test steps
(forces of the atoms the metrics use), capped at ``max_points`` per quantity, draws a
two-panel figure with matplotlib's Agg backend, writes ``<dirpath>/parity_<split>_<tag>.png``
and hands the figure to TensorBoard / Weights & Biases loggers when they are active.
Only rank 0 draws, from its own shard of the data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch


class ParityPlot(L.Callback):
    """Parity plots of energies and forces for the ``val`` and ``test`` splits.

    Args:
        dirpath: output folder (default ``<trainer.default_root_dir>/plots``).
        max_points: most points per quantity kept per split (forces count components).
        every_n_validations: draw after every n-th validation (test is always drawn).
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, max_points: int = 20000, every_n_validations: int = 1):
        super().__init__()
        self.dirpath = dirpath
        self.max_points = int(max_points)
        self.every_n_validations = max(1, int(every_n_validations))
        self._buffers: dict[str, dict[str, list[torch.Tensor]]] = {}
        self._validations = 0
        self.last_paths: dict[str, Path] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.collect_predictions = True

    # ------------------------------------------------------------------ collection
    def _reset(self, split: str) -> None:
        self._buffers[split] = {"e_pred": [], "e_true": [], "f_pred": [], "f_true": []}

    def _collect(self, split: str, outputs: Any) -> None:
        if not isinstance(outputs, dict) or "predictions" not in outputs:
            return
        buf = self._buffers.setdefault(split, {"e_pred": [], "e_true": [], "f_pred": [], "f_true": []})
        (e_pred, e_true), (f_pred, f_true) = outputs["predictions"]["energy"], outputs["predictions"]["forces"]
        if sum(t.numel() for t in buf["e_true"]) < self.max_points:
            buf["e_pred"].append(e_pred.float().flatten())
            buf["e_true"].append(e_true.float().flatten())
        if sum(t.numel() for t in buf["f_true"]) < self.max_points:
            buf["f_pred"].append(f_pred.float().flatten())
            buf["f_true"].append(f_true.float().flatten())

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset("val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset("test")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect("val", outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect("test", outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._draw(trainer, "val", f"epoch{trainer.current_epoch:03d}")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, "test", "final")

    # ------------------------------------------------------------------ drawing
    def _draw(self, trainer: L.Trainer, split: str, tag: str) -> None:
        buf = self._buffers.get(split)
        if not trainer.is_global_zero or not buf or not buf["e_true"]:
            return
        data = {k: torch.cat(v)[: self.max_points].numpy() for k, v in buf.items() if v}
        figure = parity_figure(data, title=f"{split} ({tag}, step {trainer.global_step})")
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "plots")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"parity_{split}_{tag}.png"
        figure.savefig(path, dpi=110)
        self.last_paths[split] = path
        _log_figure(trainer, f"{split}/parity", figure, path)


def parity_figure(data: dict[str, Any], title: str = "") -> Any:
    """Two-panel matplotlib figure: energy and force-component parity with MAE in the titles.

    Built without pyplot (an Agg canvas), so it works headless and leaves no global state.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = (("e", "energy", "eV"), ("f", "force component", "eV/Å"))
    for ax, (key, label, unit) in zip(axes, panels):
        pred, true = data.get(f"{key}_pred"), data.get(f"{key}_true")
        if pred is None or len(true) == 0:
            ax.set_visible(False)
            continue
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, zorder=0)
        ax.scatter(true, pred, s=3, alpha=0.35, linewidths=0)
        ax.set_xlabel(f"reference {label} ({unit})")
        ax.set_ylabel(f"predicted {label} ({unit})")
        ax.set_title(f"{label}: MAE {np.abs(pred - true).mean():.4g} {unit}, n={len(true)}")
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _log_figure(trainer: L.Trainer, key: str, figure: Any, path: Path) -> None:
    """Send the figure to the image-capable loggers (TensorBoard, wandb); others are skipped."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(key, figure, global_step=trainer.global_step, close=False)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
