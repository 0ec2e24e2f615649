"""Per-target training losses (energy and forces) with coefficients and an atom mask.

Losses are computed in the network's normalised units: the per-target scales then play
the role the published recipes give them (e.g. ``2 · energy MAE + 100 · force L2-MAE``).

* energy: ``mae``, ``mse``, ``huber`` (``delta`` in normalised units) over structures;
* forces: ``l2mae`` (mean over atoms of the Euclidean norm of the error vector),
  ``mae`` / ``mse`` (mean over atoms *and* components), ``huber``.

The force mask selects the atoms that enter the force loss (free atoms by default); a batch
whose mask is empty contributes a zero force loss that still keeps the graph connected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ENERGY_LOSSES = ("mae", "mse", "huber")
FORCE_LOSSES = ("l2mae", "mae", "mse", "huber")


class LossConfigError(ValueError):
    """A loss setting is invalid; the message names the config key."""


def _elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, delta: float) -> torch.Tensor | None:
    """Mean of an elementwise loss shared by energies and forces; None for an unknown kind."""
    if kind == "mae":
        return (pred - target).abs().mean()
    if kind == "mse":
        return (pred - target).pow(2).mean()
    if kind == "huber":
        return F.huber_loss(pred, target, delta=delta)
    return None


def energy_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mae", delta: float = 1.0) -> torch.Tensor:
    """Mean energy loss over structures (``pred``, ``target``: [B])."""
    loss = _elementwise_loss(pred.float().view(-1), target.float().view(-1), kind, delta)
    if loss is None:
        raise LossConfigError(f"loss.energy.type: unknown energy loss {kind!r}; choose from {', '.join(ENERGY_LOSSES)}")
    return loss


def force_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str = "l2mae",
    mask: torch.Tensor | None = None,
    delta: float = 1.0,
) -> torch.Tensor:
    """Mean force loss over the atoms selected by ``mask`` (``pred``, ``target``: [N, 3])."""
    pred, target = pred.float(), target.float()
    if mask is not None:
        pred, target = pred[mask], target[mask]
    if pred.shape[0] == 0:
        # No atom selected (e.g. only fixed atoms): zero loss, gradient path kept for DDP.
        return pred.sum() * 0.0
    if kind == "l2mae":
        return torch.linalg.vector_norm(pred - target, dim=-1).mean()
    loss = _elementwise_loss(pred, target, kind, delta)
    if loss is None:
        raise LossConfigError(f"loss.forces.type: unknown force loss {kind!r}; choose from {', '.join(FORCE_LOSSES)}")
    return loss


@dataclass(frozen=True)
class TermSpec:
    """One loss term: its kind, coefficient and Huber delta."""

    type: str
    coefficient: float
    delta: float = 1.0


def _term(cfg: Mapping[str, Any] | None, key: str, allowed: tuple[str, ...], default: TermSpec) -> TermSpec:
    if cfg is None:
        return default
    if not isinstance(cfg, Mapping):
        raise LossConfigError(f"loss.{key}: expected a mapping with type/coefficient, got {cfg!r}")
    unknown = set(cfg) - {"type", "coefficient", "delta"}
    if unknown:
        raise LossConfigError(f"loss.{key}: unknown keys {sorted(unknown)}; allowed: type, coefficient, delta")
    kind = cfg.get("type", default.type)
    if kind not in allowed:
        raise LossConfigError(f"loss.{key}.type: unknown {key} loss {kind!r}; choose from {', '.join(allowed)}")
    coefficient = cfg.get("coefficient", default.coefficient)
    if not isinstance(coefficient, (int, float)) or isinstance(coefficient, bool) or coefficient < 0:
        raise LossConfigError(f"loss.{key}.coefficient: must be a number >= 0, got {coefficient!r}")
    delta = cfg.get("delta", default.delta)
    if not isinstance(delta, (int, float)) or delta <= 0:
        raise LossConfigError(f"loss.{key}.delta: must be a positive number, got {delta!r}")
    return TermSpec(kind, float(coefficient), float(delta))


class EnergyForceLoss:
    """Weighted sum of an energy and a force loss, built from a plain config dict.

    ``{"energy": {"type": "mae", "coefficient": 4}, "forces": {"type": "l2mae", "coefficient": 100},
    "forces_on_free_atoms": true}``
    """

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        config = dict(config or {})
        unknown = set(config) - {"energy", "forces", "forces_on_free_atoms"}
        if unknown:
            raise LossConfigError(f"loss: unknown keys {sorted(unknown)}; allowed: energy, forces, forces_on_free_atoms")
        self.energy = _term(config.get("energy"), "energy", ENERGY_LOSSES, TermSpec("mae", 1.0))
        self.forces = _term(config.get("forces"), "forces", FORCE_LOSSES, TermSpec("l2mae", 100.0))
        free = config.get("forces_on_free_atoms", True)
        if not isinstance(free, bool):
            raise LossConfigError(f"loss.forces_on_free_atoms: expected true/false, got {free!r}")
        self.forces_on_free_atoms = free
        if self.energy.coefficient == 0 and self.forces.coefficient == 0:
            raise LossConfigError("loss: energy.coefficient and forces.coefficient are both 0; nothing to train")

    def force_mask(self, fixed: torch.Tensor | None) -> torch.Tensor | None:
        """Atoms in the force loss: ``fixed == 0`` when training on free atoms, else all (None)."""
        if not self.forces_on_free_atoms or fixed is None:
            return None
        return fixed.view(-1) == 0

    def __call__(
        self,
        energy_pred: torch.Tensor,
        energy_target: torch.Tensor,
        forces_pred: torch.Tensor,
        forces_target: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "energy_loss", "forces_loss"}``; inputs in normalised units."""
        e = energy_loss(energy_pred, energy_target, self.energy.type, self.energy.delta)
        f = force_loss(forces_pred, forces_target, self.forces.type, mask, self.forces.delta)
        total = self.energy.coefficient * e + self.forces.coefficient * f
        return {"loss": total, "energy_loss": e.detach(), "forces_loss": f.detach()}
