"""ASE calculator for trained eSCN potentials.

Energies in eV and forces in eV/Å from a checkpoint (``.ckpt``, escn-train or fairchem/OCP)
or a file written by ``escn-export`` (``.pt2`` program or ``.aoti.pt2`` package; these are
code and need ``trusted=True``)::

    from escn_train.ase import ESCNCalculator
    atoms.calc = ESCNCalculator("runs/best.ckpt", device="auto")
    atoms.calc = ESCNCalculator("deploy/escn.pt2", device="auto", trusted=True)
    BFGS(atoms).run(fmax=0.05)

Periodicity follows ``atoms.pbc`` per direction; molecules need no cell (a zero cell with
``pbc=False`` is fine). eSCN predicts forces directly rather than as the gradient of its
energy, so they are not exactly conservative; stress is not available.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from escn_train.data.collate import collate_structures
from escn_train.data.convert import atoms_to_data
from escn_train.inference.loading import (
    AOTI_PACKAGE,
    CHECKPOINT,
    EXPORTED_PROGRAM,
    Predictor,
    artifact_kind,
    load_predictor,
)


class ESCNCalculator(Calculator):
    """ASE calculator running an eSCN potential (see the module docstring).

    Args:
        model: path to a checkpoint, exported program or AOTInductor package, or a
            :class:`~escn_train.inference.loading.Predictor` already loaded.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
        use_ema: checkpoints only: use the EMA weights when the checkpoint has them.
        trusted: required for exported programs and AOTInductor packages, which are code
            (loading one runs whatever its author put in it); checkpoints are data.
        **kwargs: passed to :class:`ase.calculators.calculator.Calculator`.
    """

    implemented_properties = ["energy", "forces", "free_energy"]

    def __init__(
        self,
        model: str | os.PathLike | Predictor,
        device: str = "auto",
        use_ema: bool = True,
        trusted: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.predictor = model if isinstance(model, Predictor) else load_predictor(model, device, use_ema, trusted)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto", use_ema: bool = True, **kwargs: Any) -> "ESCNCalculator":
        """From a training checkpoint (or a converted / fairchem eSCN checkpoint)."""
        kind = artifact_kind(path)
        if kind != CHECKPOINT:
            raise ValueError(f"{path} is an {kind.replace('_', ' ')}, not a checkpoint; use ESCNCalculator.from_exported")
        return cls(path, device, use_ema, **kwargs)

    @classmethod
    def from_exported(
        cls, path: str | os.PathLike, device: str = "auto", trusted: bool = False, **kwargs: Any
    ) -> "ESCNCalculator":
        """From an ``escn-export`` file: torch.export program or AOTInductor package
        (code: needs ``trusted=True``)."""
        kind = artifact_kind(path)
        if kind not in (EXPORTED_PROGRAM, AOTI_PACKAGE):
            raise ValueError(f"{path} is a {kind}, not an escn-export file; use ESCNCalculator.from_checkpoint")
        return cls(path, device, trusted=trusted, **kwargs)

    def calculate(
        self, atoms: Any = None, properties: Any = ("energy",), system_changes: Any = all_changes
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        data = atoms_to_data(self.atoms, 0, 0, "ESCNCalculator input", require_labels=False, require_cell=False)
        energy, forces = self.predictor.predict(collate_structures([data]))
        energy = float(energy[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": forces.detach().cpu().numpy().astype(np.float64),
        }
