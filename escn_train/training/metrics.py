"""Energy/force accuracy metrics in physical units, as torchmetrics (summed across ranks).

Per split, :class:`EnergyForceMetrics` tracks

* ``energy_mae`` (eV, per structure),
* ``forces_mae`` (eV/Å, per component over the selected atoms),
* ``forces_cosine`` (mean cosine similarity of predicted and reference force vectors),
* ``forces_magnitude_error`` (mean | |F_pred| - |F_ref| |, eV/Å),
* ``efwt`` (energy and forces within threshold: the fraction of structures with
  |ΔE| < 0.02 eV and max |ΔF component| < 0.03 eV/Å over their selected atoms),
* ``forces_mae_zero_baseline`` (mean |F_ref component|: the MAE of predicting zero forces).

"Selected atoms" are the free atoms (``fixed == 0``) unless configured otherwise, as in the
OC20 evaluation. Every metric keeps sums and counts whose states are summed over ranks, so
values are exact under DDP (up to the structures the distributed sampler repeats).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanMetric

#: EFwT thresholds of the OC20 S2EF evaluation.
EFWT_ENERGY_THRESHOLD = 0.02
EFWT_FORCE_THRESHOLD = 0.03

METRIC_NAMES = (
    "energy_mae",
    "forces_mae",
    "forces_cosine",
    "forces_magnitude_error",
    "efwt",
    "forces_mae_zero_baseline",
)


def efwt_per_structure(
    energy_pred: torch.Tensor,
    energy_true: torch.Tensor,
    forces_pred: torch.Tensor,
    forces_true: torch.Tensor,
    batch_idx: torch.Tensor,
    mask: torch.Tensor | None = None,
    energy_threshold: float = EFWT_ENERGY_THRESHOLD,
    force_threshold: float = EFWT_FORCE_THRESHOLD,
) -> torch.Tensor:
    """Boolean [B]: structure within both thresholds (max over its selected atoms' components)."""
    num = energy_true.shape[0]
    err = (forces_pred.float() - forces_true.float()).abs().amax(dim=-1)
    idx = batch_idx
    if mask is not None:
        err, idx = err[mask], idx[mask]
    max_err = torch.zeros(num, dtype=err.dtype, device=err.device)
    max_err = max_err.scatter_reduce(0, idx, err, reduce="amax", include_self=True)
    energy_ok = (energy_pred.float() - energy_true.float()).abs() < energy_threshold
    return energy_ok & (max_err < force_threshold)


class EnergyForceMetrics(nn.Module):
    """The metrics of one split; ``update`` with physical predictions, log the members."""

    def __init__(self) -> None:
        super().__init__()
        self.energy_mae = MeanAbsoluteError()
        self.forces_mae = MeanAbsoluteError()
        self.forces_cosine = MeanMetric()
        self.forces_magnitude_error = MeanMetric()
        self.efwt = MeanMetric()
        self.forces_mae_zero_baseline = MeanMetric()

    def update(
        self,
        energy_pred: torch.Tensor,
        energy_true: torch.Tensor,
        forces_pred: torch.Tensor,
        forces_true: torch.Tensor,
        batch_idx: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one batch (energies [B] in eV, forces [N, 3] in eV/Å, mask [N] bool)."""
        energy_pred, energy_true = energy_pred.detach().float(), energy_true.detach().float()
        forces_pred, forces_true = forces_pred.detach().float(), forces_true.detach().float()
        self.energy_mae.update(energy_pred, energy_true)
        self.efwt.update(
            efwt_per_structure(energy_pred, energy_true, forces_pred, forces_true, batch_idx, mask).float()
        )
        if mask is not None:
            forces_pred, forces_true = forces_pred[mask], forces_true[mask]
        if forces_true.shape[0] == 0:
            return
        self.forces_mae.update(forces_pred, forces_true)
        self.forces_cosine.update(F.cosine_similarity(forces_pred, forces_true, dim=-1, eps=1e-8))
        magnitude = torch.linalg.vector_norm(forces_pred, dim=-1) - torch.linalg.vector_norm(forces_true, dim=-1)
        self.forces_magnitude_error.update(magnitude.abs())
        self.forces_mae_zero_baseline.update(forces_true.abs().flatten())

    def members(self) -> dict[str, nn.Module]:
        """Name → metric object, for ``LightningModule.log``."""
        return {name: getattr(self, name) for name in METRIC_NAMES}
