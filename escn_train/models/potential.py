"""An eSCN network together with its target normalisation: predictions in eV and eV/Å.

The network learns normalised targets; this wrapper owns the constants that map them back
(energy mean/std, force scale, per-element reference energies), so a checkpoint or an
exported program carries everything needed to predict physical quantities.

    energy [eV]   = std · e_model + mean + Σ_atoms reference[Z]
    forces [eV/Å] = force_std · f_model
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from escn_train.models.escn import eSCN


class ESCNPotential(nn.Module):
    """Physical-unit predictions of an :class:`eSCN`.

    ``forward`` has the exportable signature of ``eSCN.forward``; ``forward_trainable``
    takes a PyG batch. ``normalize_targets`` maps labels into the network's units.
    """

    def __init__(
        self,
        model: eSCN,
        energy_mean: float = 0.0,
        energy_std: float = 1.0,
        force_std: float = 1.0,
        element_references: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if energy_std <= 0 or force_std <= 0:
            raise ValueError(f"normaliser scales must be positive, got energy_std={energy_std}, force_std={force_std}")
        self.model = model
        references = torch.zeros(model.max_num_elements)
        if element_references is not None:
            given = torch.as_tensor(element_references, dtype=torch.float32).flatten()
            if given.numel() > model.max_num_elements:
                extra = given[model.max_num_elements :]
                if bool((extra != 0).any()):
                    raise ValueError(
                        f"element_references has non-zero entries beyond max_num_elements={model.max_num_elements}"
                    )
                given = given[: model.max_num_elements]
            references[: given.numel()] = given
        self.register_buffer("energy_mean", torch.tensor(float(energy_mean)))
        self.register_buffer("energy_std", torch.tensor(float(energy_std)))
        self.register_buffer("force_std", torch.tensor(float(force_std)))
        self.register_buffer("element_references", references)

    def reference_energy(self, atomic_numbers: torch.Tensor, batch_idx: torch.Tensor, num_structures: int) -> torch.Tensor:
        """Σ over each structure's atoms of the per-element reference energies, [B]."""
        per_atom = self.element_references.to(torch.float32)[atomic_numbers.long()]
        out = torch.zeros(num_structures, dtype=per_atom.dtype, device=per_atom.device)
        return out.index_add(0, batch_idx, per_atom)

    def to_physical(
        self, energy: torch.Tensor, forces: torch.Tensor, atomic_numbers: torch.Tensor, batch_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Network outputs -> (energy [eV], forces [eV/Å])."""
        reference = self.reference_energy(atomic_numbers, batch_idx, energy.shape[0])
        energy = energy.float() * self.energy_std + self.energy_mean + reference
        return energy, forces.float() * self.force_std

    def normalize_targets(
        self, energy: torch.Tensor, forces: torch.Tensor, atomic_numbers: torch.Tensor, batch_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels in eV, eV/Å -> the network's units (inverse of :meth:`to_physical`)."""
        reference = self.reference_energy(atomic_numbers, batch_idx, energy.shape[0])
        return (energy - reference - self.energy_mean) / self.energy_std, forces / self.force_std

    def forward(
        self,
        pos: torch.Tensor,
        batch_idx: torch.Tensor,
        natoms: torch.Tensor,
        atomic_numbers: torch.Tensor,
        edge_index: torch.Tensor,
        edge_distance: torch.Tensor,
        edge_distance_vec: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exportable: (energy [B] in eV, forces [N, 3] in eV/Å) for a prepared graph."""
        energy, forces = self.model.forward(
            pos, batch_idx, natoms, atomic_numbers, edge_index, edge_distance, edge_distance_vec
        )
        return self.to_physical(energy, forces, atomic_numbers, batch_idx)

    def forward_trainable(self, data: Any) -> dict[str, torch.Tensor]:
        """Physical energies and forces of a PyG batch (the graph is built if absent)."""
        out = self.model.forward_trainable(data)
        batch_idx = data.batch if getattr(data, "batch", None) is not None else torch.zeros_like(data.atomic_numbers)
        energy, forces = self.to_physical(out["energy"], out["forces"], data.atomic_numbers, batch_idx)
        return {"energy": energy, "forces": forces}
