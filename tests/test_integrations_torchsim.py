"""TorchSim integration: TorchSim's own conformance check, batched = one by one = ESCNCalculator,
float32/float64 states, periodic and non-periodic systems, no stress, batched FIRE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ts = pytest.importorskip("torch_sim")
from ase import Atoms  # noqa: E402
from ase.build import add_adsorbate, bulk, fcc111, molecule  # noqa: E402
from ase.constraints import FixAtoms  # noqa: E402
from test_inference_reference_checkpoint import reference_checkpoint  # noqa: E402
from torch_sim.models.interface import validate_model_outputs  # noqa: E402

from escn_train.ase import ESCNCalculator  # noqa: E402
from escn_train.inference.loading import load_predictor  # noqa: E402
from escn_train.inference.reference_checkpoint import convert_checkpoint  # noqa: E402
from escn_train.integrations.torchsim import ESCNTorchSimModel  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("torchsim") / "tiny.ckpt"
    torch.save(convert_checkpoint(reference_checkpoint("tiny_l2m1", layout="escn_export"), source="test"), path)
    return path


def slab_with(adsorbate: str, size=(2, 2, 3), seed: int = 0) -> Atoms:
    slab = fcc111("Cu", size=size, vacuum=6.0)
    add_adsorbate(slab, molecule(adsorbate), 2.0, "fcc")
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag >= 2]))
    slab.rattle(0.05, seed=seed)
    slab.pbc = True
    return slab


def systems() -> list[Atoms]:
    water = molecule("H2O")
    water.center(vacuum=4.0)
    return [slab_with("CO"), bulk("Cu", "fcc", a=3.6, cubic=True), slab_with("OH", seed=1), water]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torchsim_validator_passes(checkpoint, dtype):
    model = ESCNTorchSimModel(checkpoint, device="cpu", dtype=dtype)
    validate_model_outputs(model, torch.device("cpu"), dtype)
    assert model.compute_stress is False and model.compute_forces is True
    assert model.memory_scales_with == "n_atoms"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_state_matches_ase_calculator_one_by_one(checkpoint, dtype):
    model = ESCNTorchSimModel(checkpoint, device="cpu", dtype=dtype)
    structures = systems()
    structures[3].pbc = False  # the molecule is not periodic (TorchSim: one pbc flag per state)
    periodic = ts.io.atoms_to_state(structures[:3], torch.device("cpu"), dtype)
    molecule_state = ts.io.atoms_to_state([structures[3]], torch.device("cpu"), dtype)
    assert molecule_state.pbc is False or not bool(torch.as_tensor(molecule_state.pbc).any())
    calculator = ESCNCalculator(checkpoint, device="cpu")
    for state, group in ((periodic, structures[:3]), (molecule_state, structures[3:])):
        out = model(state)
        assert out["energy"].dtype == dtype and out["forces"].dtype == dtype
        assert out["energy"].shape == (len(group),) and out["forces"].shape == (state.n_atoms, 3)
        assert "stress" not in out
        start = 0
        for i, atoms in enumerate(group):
            atoms = atoms.copy()
            atoms.calc = calculator
            n = len(atoms)
            np.testing.assert_allclose(out["energy"][i].item(), atoms.get_potential_energy(), rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(out["forces"][start:start + n].numpy(), atoms.get_forces(apply_constraint=False), atol=1e-4)
            start += n


def test_dict_input_and_loaded_potential(checkpoint):
    predictor = load_predictor(checkpoint, "cpu")
    from_path = ESCNTorchSimModel(checkpoint, device="cpu")
    from_predictor = ESCNTorchSimModel(predictor, device="cpu")
    from_potential = ESCNTorchSimModel(predictor.potential, device="cpu")
    state = ts.io.atoms_to_state(systems()[:2], torch.device("cpu"), torch.float32)
    reference = from_path(state)
    as_dict = {"positions": state.positions, "cell": state.cell, "pbc": state.pbc,
               "atomic_numbers": state.atomic_numbers, "system_idx": state.system_idx}
    for model, given in ((from_predictor, state), (from_potential, state), (from_path, as_dict)):
        out = model(given)
        torch.testing.assert_close(out["energy"], reference["energy"])
        torch.testing.assert_close(out["forces"], reference["forces"])


def test_stress_is_refused_clearly(checkpoint):
    model = ESCNTorchSimModel(checkpoint, device="cpu")
    model.compute_stress = False  # switching it off is fine
    with pytest.raises(NotImplementedError, match="computes no stress: eSCN predicts forces directly"):
        model.compute_stress = True
    state = ts.io.atoms_to_state(systems()[:1], torch.device("cpu"), torch.float32)
    with pytest.raises(NotImplementedError, match="computes no stress"):
        model(state, compute_stress=True)
    with pytest.raises(ValueError, match="dtype"):
        ESCNTorchSimModel(checkpoint, device="cpu", dtype=torch.float16)


def test_batched_fire_with_in_flight_autobatcher(checkpoint):
    model = ESCNTorchSimModel(checkpoint, device="cpu", dtype=torch.float64)
    structures = [slab_with("CO", seed=s) for s in range(3)] + [slab_with("OH", seed=3)]
    state = ts.io.atoms_to_state(structures, torch.device("cpu"), torch.float64)
    start = model(state)
    batcher = ts.InFlightAutoBatcher(model, max_memory_scaler=2 * len(structures[0]), memory_scales_with="n_atoms")
    relaxed = ts.optimize(
        state, model, optimizer=ts.optimizers.fire, autobatcher=batcher, max_steps=10, steps_between_swaps=5,
        convergence_fn=ts.generate_force_convergence_fn(0.05, include_cell_forces=False),
    )
    assert relaxed.n_systems == len(structures)
    moved = (relaxed.positions - state.positions).norm(dim=-1)
    assert bool((moved > 0).any())
    final = model(relaxed)
    assert torch.isfinite(final["energy"]).all() and final["energy"].shape == start["energy"].shape
