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


def _elementwise_loss(error: torch.Tensor, kind: str, delta: float) -> torch.Tensor:
    """Per-element ``mae`` / ``mse`` / ``huber`` loss of an error ``pred - target``."""
    if kind == "mae":
        return error.abs()
    if kind == "mse":
        return error.pow(2)
    return F.huber_loss(error, torch.zeros_like(error), delta=delta, reduction="none")


def energy_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mae", delta: float = 1.0) -> torch.Tensor:
    """Mean energy loss over structures (``pred``, ``target``: [B])."""
    if kind not in ENERGY_LOSSES:
        raise LossConfigError(f"loss.energy.type: unknown energy loss {kind!r}; choose from {', '.join(ENERGY_LOSSES)}")
    return _elementwise_loss(pred.float().view(-1) - target.float().view(-1), kind, delta).mean()


def force_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str = "l2mae",
    mask: torch.Tensor | None = None,
    delta: float = 1.0,
) -> torch.Tensor:
    """Mean force loss over the atoms selected by ``mask`` (``pred``, ``target``: [N, 3]).

    The mask weights the per-atom errors instead of selecting rows, so the loss has a fixed
    shape and no host sync; unselected atoms get an exact zero error and gradient. With no
    atom selected (e.g. only fixed atoms) the loss is zero and still reaches ``pred`` (DDP).
    """
    if kind not in FORCE_LOSSES:
        raise LossConfigError(f"loss.forces.type: unknown force loss {kind!r}; choose from {', '.join(FORCE_LOSSES)}")
    error = pred.float() - target.float()
    count: torch.Tensor | float = float(max(error.shape[0], 1))
    if mask is not None:
        keep = mask.view(-1, 1)
        error = torch.where(keep, error, 0.0)
        count = keep.sum().float().clamp(min=1.0)
    if kind == "l2mae":
        # the norm's gradient at an exactly zero error vector is defined as zero
        return torch.linalg.vector_norm(error, dim=-1).sum() / count
    return _elementwise_loss(error, kind, delta).sum() / (3.0 * count)


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
