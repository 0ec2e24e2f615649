"""TorchSim model interface for eSCN potentials: batched MD and relaxation of many systems.

::

    import torch_sim as ts
    from escn_train.integrations.torchsim import ESCNTorchSimModel

    model = ESCNTorchSimModel("runs/best.ckpt", device="cuda")          # or .pt2, a converted fairchem file
    state = ts.io.atoms_to_state(list_of_atoms, model.device, model.dtype)
    batcher = ts.InFlightAutoBatcher(model, max_memory_scaler=4096, memory_scales_with="n_atoms")
    relaxed = ts.optimize(state, model, optimizer=ts.optimizers.fire, autobatcher=batcher,
                          convergence_fn=ts.generate_force_convergence_fn(0.05, include_cell_forces=False))

(TorchSim 0.3 API. ``autobatcher=True`` sizes batches from the GPU memory a trial run takes;
on CPU give ``max_memory_scaler``, the number of atoms per batch.)

Install with ``pip install -e ".[torchsim]"`` (package ``torch-sim-atomistic``).

A state of S systems goes through the model as one batch: the periodic radius graph of all
systems is built at once on the state's device by :func:`escn_train.graph.radius_graph_pbc`
(with the cutoff and ``max_neighbors`` stored with the model), and energies and forces
come back on that device, in the state's dtype. Nothing goes through ASE or the CPU, the
reason batched runs pay off (torch-sim#553). The network itself runs in float32; float64
states are converted on the way in and out.

eSCN predicts forces directly rather than as the gradient of its energy, so there is no
stress: the model says ``compute_stress=False``, refuses to switch it on, and variable-cell
workflows (cell filters, NPT) cannot use it. Periodicity: ``state.pbc`` (one flag for all
systems in TorchSim 0.3, or three per-direction flags); non-periodic systems need no cell.
"""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace
from typing import Any

import torch
import torch_sim as ts
from torch_sim.models.interface import ModelInterface

from escn_train.inference.loading import EagerPredictor, ModelInfo, Predictor, CHECKPOINT, load_predictor

NO_STRESS = (
    "ESCNTorchSimModel computes no stress: eSCN predicts forces directly, not as the gradient of its energy, "
    "so there is no virial. Use fixed-cell optimizers and integrators (e.g. FIRE without a cell filter, NVE, "
    "NVT Langevin)"
)


def _predictor(
    model: str | os.PathLike | Predictor | torch.nn.Module, device: torch.device, use_ema: bool, trusted: bool | None
) -> Predictor:
    """A :class:`Predictor` on ``device`` from a path, a predictor or an ``ESCNPotential``."""
    if isinstance(model, Predictor):
        if model.device != device:
            raise ValueError(f"the predictor runs on {model.device} but device={device} was asked for")
        return model
    if isinstance(model, torch.nn.Module):
        from escn_train.models.potential import ESCNPotential

        if not isinstance(model, ESCNPotential):
            raise TypeError(f"model: expected a path, a Predictor or an ESCNPotential, got {type(model).__name__}")
        net = model.model
        info = ModelInfo(
            model={"cutoff": net.cutoff, "max_neighbors": net.max_neighbors, "max_num_elements": net.max_num_elements},
            normalizers={},
            kind=CHECKPOINT,
            source=f"<{type(model).__name__} in memory>",
        )
        return EagerPredictor(model, info, device)
    kwargs: dict[str, Any] = {}
    if trusted is not None and "trusted" in inspect.signature(load_predictor).parameters:
        kwargs["trusted"] = trusted
    return load_predictor(model, device, use_ema, **kwargs)


def _pbc_per_system(pbc: Any, num_systems: int, device: torch.device) -> torch.Tensor:
    """[S, 3] bool from one flag, three per-direction flags, or [S, 3] flags."""
    flags = torch.as_tensor(pbc, dtype=torch.bool, device=device)
    if flags.numel() == 1:
        return flags.reshape(1, 1).expand(num_systems, 3)
    if flags.numel() == 3 and flags.shape != (num_systems, 3):
        return flags.reshape(1, 3).expand(num_systems, 3)
    return flags.reshape(num_systems, 3)


class ESCNTorchSimModel(ModelInterface):
    """TorchSim ``ModelInterface`` around an escn-train potential (see the module docstring).

    Args:
        model: path to anything :func:`~escn_train.inference.loading.load_predictor` opens
            (``.ckpt``, a converted or raw fairchem eSCN checkpoint, ``.pt2``, ``.aoti.pt2``),
            a loaded :class:`~escn_train.inference.loading.Predictor`, or an ``ESCNPotential``.
        device: where states live and the model runs (default: CUDA when available).
        dtype: the dtype of the states this model is meant for (float32 or float64); outputs
            follow the dtype of the state actually passed.
        use_ema: checkpoints only: the EMA weights when the checkpoint has them.
        trusted: passed to ``load_predictor`` when it takes it (loading compiled packages).
    """

    def __init__(
        self,
        model: str | os.PathLike | Predictor | torch.nn.Module,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        use_ema: bool = True,
        trusted: bool | None = None,
    ) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = _predictor(model, torch.device(device), use_ema, trusted)
        self._device = self.predictor.device
        self._dtype = dtype
        self._compute_stress = False
        self._compute_forces = True
        # eSCN keeps at most max_neighbors edges per atom: cost and memory grow with the atom count
        self._memory_scales_with = "n_atoms"

    @property
    def compute_stress(self) -> bool:
        return False

    @compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        if value:
            raise NotImplementedError(NO_STRESS)

    @property
    def compute_forces(self) -> bool:
        return self._compute_forces

    @compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        self._compute_forces = bool(value)

    @property
    def cutoff(self) -> float:
        return self.predictor.info.cutoff

    def forward(self, state: ts.SimState | dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        """``{"energy": [S] eV, "forces": [N, 3] eV/Å}`` for every system of ``state``."""
        if kwargs.get("compute_stress"):
            raise NotImplementedError(NO_STRESS)
        if isinstance(state, dict):
            state = ts.SimState(**state, masses=torch.ones_like(state["positions"][:, 0]))
        positions = state.positions
        system_idx = state.system_idx.to(self._device)
        num_systems = state.n_systems
        natoms = torch.bincount(system_idx, minlength=num_systems)
        pbc = _pbc_per_system(state.pbc, num_systems, self._device)
        batch = SimpleNamespace(
            pos=positions.to(self._device),
            cell=state.row_vector_cell.to(self._device),  # rows = cell vectors, as the graph expects
            atomic_numbers=state.atomic_numbers.to(self._device),
            natoms=natoms,
            batch=system_idx,
            pbc=pbc,
        )
        energy, forces = self.predictor.predict(batch)
        out = {"energy": energy.to(positions.dtype)}
        if self._compute_forces:
            out["forces"] = forces.to(positions.dtype)
        return out
