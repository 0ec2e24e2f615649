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
values are exact under DDP (up to the structures the distributed sampler repeats). Selection
and skipping are weights, not boolean indexing, so an update makes no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

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
    if mask is not None:  # errors are >= 0, so a zero leaves the maximum of the selected atoms
        err = torch.where(mask, err, 0.0)
    max_err = torch.zeros(num, dtype=err.dtype, device=err.device)
    max_err = max_err.scatter_reduce(0, batch_idx, err, reduce="amax", include_self=True)
    energy_ok = (energy_pred.float() - energy_true.float()).abs() < energy_threshold
    return energy_ok & (max_err < force_threshold)


class WeightedMean(Metric):
    """``Σ w·x / Σ w`` over all updates, with states summed across ranks.

    Unlike torchmetrics' ``MeanMetric`` it does no NaN check (which reads a flag on the host
    every update); a zero weight drops an entry exactly, also a non-finite one.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: torch.Tensor) -> None:
        """Add ``value`` entries with ``weight`` (broadcast to ``value``'s shape)."""
        weight = torch.broadcast_to(weight, value.shape).to(self.total.dtype)
        self.total += torch.where(weight != 0, value.to(self.total.dtype), 0.0).mul(weight).sum()
        self.weight += weight.sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


class EnergyForceMetrics(nn.Module):
    """The metrics of one split; ``update`` with physical predictions, log the members."""

    def __init__(self) -> None:
        super().__init__()
        for name in METRIC_NAMES:
            setattr(self, name, WeightedMean())

    def update(
        self,
        energy_pred: torch.Tensor,
        energy_true: torch.Tensor,
        forces_pred: torch.Tensor,
        forces_true: torch.Tensor,
        batch_idx: torch.Tensor,
        mask: torch.Tensor | None = None,
        include: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one batch (energies [B] in eV, forces [N, 3] in eV/Å, mask [N] bool).

        ``include``: a 0-dim bool tensor; False leaves every metric unchanged (a training step
        with a non-finite loss), decided on the device without a host sync.
        """
        energy_pred, energy_true = energy_pred.detach().float(), energy_true.detach().float()
        forces_pred, forces_true = forces_pred.detach().float(), forces_true.detach().float()
        structures = torch.ones_like(energy_true) if include is None else include.float().expand_as(energy_true)
        atoms = torch.ones_like(forces_true[:, 0]) if mask is None else mask.float()
        if include is not None:
            atoms = atoms * include.float()
        self.energy_mae.update((energy_pred - energy_true).abs(), structures)
        efwt = efwt_per_structure(energy_pred, energy_true, forces_pred, forces_true, batch_idx, mask)
        self.efwt.update(efwt.float(), structures)
        self.forces_mae.update((forces_pred - forces_true).abs(), atoms[:, None])
        self.forces_cosine.update(F.cosine_similarity(forces_pred, forces_true, dim=-1, eps=1e-8), atoms)
        magnitude = torch.linalg.vector_norm(forces_pred, dim=-1) - torch.linalg.vector_norm(forces_true, dim=-1)
        self.forces_magnitude_error.update(magnitude.abs(), atoms)
        self.forces_mae_zero_baseline.update(forces_true.abs(), atoms[:, None])

    def members(self) -> dict[str, nn.Module]:
        """Name → metric object, for ``LightningModule.log``."""
        return {name: getattr(self, name) for name in METRIC_NAMES}
