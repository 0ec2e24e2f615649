"""ESCNCalculator: agreement with ESCNPotential, periodicity, relaxations and MD.

eSCN predicts forces directly, so a random network's forces are not the gradient of any
energy and relaxing with them proves nothing. The relaxation test therefore first fits a
tiny eSCN to EMT forces of a Cu4 cluster (a few seconds), then checks that BFGS driven by
the calculator converges and lands on EMT's minimum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import fcc111, molecule
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.optimize import BFGS
from reference_fixtures import build_model, fixture_batch, load_fixture

from escn_train.ase import ESCNCalculator
from escn_train.data.collate import collate_structures
from escn_train.data.convert import atoms_to_data
from escn_train.inference.export import main as export_main
from escn_train.inference.reference_checkpoint import potential_checkpoint
from escn_train.models.escn import eSCN
from escn_train.models.potential import ESCNPotential

NAME = "tiny_l2m1"


def fixture_atoms(index: int) -> Atoms:
    s = load_fixture(NAME)["structures"]
    start = int(s["natoms"][:index].sum())
    atoms = slice(start, start + int(s["natoms"][index]))
    return Atoms(
        numbers=s["atomic_numbers"][atoms].numpy(),
        positions=s["pos"][atoms].double().numpy(),
        cell=s["cell"][index].double().numpy(),
        pbc=True,
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The fixture's weights with synthetic normalisers and element references."""
    refs = torch.zeros(90)
    refs[[1, 6, 8, 29, 47, 78]] = torch.tensor([-3.4, -7.2, -4.9, -3.7, -2.8, -6.1])
    potential = ESCNPotential(build_model(NAME), -0.75, 2.5, 1.9, refs).eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny.ckpt"
    torch.save(potential_checkpoint(potential, load_fixture(NAME)["config"]), path)
    return path, potential


def test_calculator_equals_potential_on_periodic_structures(tiny_checkpoint):
    path, potential = tiny_checkpoint
    calc = ESCNCalculator(path, device="cpu")
    for index in range(4):
        atoms = fixture_atoms(index)
        atoms.calc = calc
        with torch.no_grad():
            expected = potential.forward_trainable(fixture_batch(NAME, [index]))
        assert atoms.get_potential_energy() == pytest.approx(float(expected["energy"][0]), rel=1e-6, abs=1e-6)
        assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()
        np.testing.assert_allclose(atoms.get_forces(), expected["forces"].numpy(), rtol=1e-5, atol=1e-6)


def test_periodicity_follows_atoms_pbc(tiny_checkpoint):
    calc = ESCNCalculator(tiny_checkpoint[0], device="cpu")

    def predict(atoms: Atoms) -> tuple[float, np.ndarray]:
        atoms.calc = calc
        return atoms.get_potential_energy(), atoms.get_forces()

    def assert_same(a: tuple, b: tuple) -> None:
        scale = np.abs(a[1]).max()
        assert a[0] == pytest.approx(b[0], abs=1e-5)
        np.testing.assert_allclose(a[1], b[1], atol=1e-4 * scale)

    def assert_different(a: tuple, b: tuple) -> None:
        # The fixture's random weights give small forces: compare relative to their size.
        assert np.abs(a[1] - b[1]).max() > 1e-2 * np.abs(a[1]).max()

    # A molecule without any cell equals the same molecule in a box larger than the cutoff ...
    free = molecule("CH3CH2OH")
    assert not free.pbc.any() and free.cell.rank == 0
    boxed = free.copy()
    boxed.center(vacuum=8.0)
    boxed.pbc = True
    assert_same(predict(free), predict(boxed))
    # ... and differs once periodic images come within the cutoff.
    tight = free.copy()
    tight.center(vacuum=1.0)
    tight.pbc = True
    assert_different(predict(free), predict(tight))

    # A slab periodic in-plane: no vacuum vector (pbc T,T,F) equals a padded cell, and the
    # non-periodic direction ignores images even when the cell is short along it.
    slab = fcc111("Cu", (2, 2, 3), vacuum=None)
    slab.pbc = [True, True, False]
    slab.cell[2] = [0.0, 0.0, 0.0]
    padded = slab.copy()
    padded.cell[2] = [0.0, 0.0, 30.0]
    short = slab.copy()
    short.cell[2] = [0.0, 0.0, 5.0]
    reference = predict(slab)
    assert_same(reference, predict(padded))
    assert_same(reference, predict(short))
    short.pbc = True
    assert_different(reference, predict(short))


def test_exported_program_in_the_calculator(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    assert export_main([str(path), "-o", str(tmp_path / "tiny"), "--format", "export", "--device", "cpu", "--no-check"]) == 0
    exported = tmp_path / "tiny.pt2"
    atoms = fixture_atoms(3)
    for calc in (
        ESCNCalculator.from_exported(exported, device="cpu", trusted=True),
        ESCNCalculator(exported, device="cpu", trusted=True),
    ):
        atoms.calc = calc
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = ESCNCalculator.from_checkpoint(path, device="cpu")
    assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), forces, atol=1e-6)
    with pytest.raises(ValueError, match="not a checkpoint"):
        ESCNCalculator.from_checkpoint(exported)
    with pytest.raises(ValueError, match="not an escn-export file"):
        ESCNCalculator.from_exported(path)


# ------------------------------------------------------------------------ a model fitted to EMT
FIT_MODEL = dict(
    max_neighbors=12, cutoff=5.0, max_num_elements=30, num_layers=2, lmax=2, mmax=1, sphere_channels=16,
    hidden_channels=32, edge_channels=16, num_sphere_samples=32, basis_width_scalar=2.0, distance_resolution=0.1,
)


@pytest.fixture(scope="module")
def emt_fitted(tmp_path_factory):
    """A tiny eSCN fitted (300 Adam steps, ~5 s) to EMT on rattled and strained Cu4 clusters."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    minimum = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0], [1.25, 0.7, 2.0]])
    minimum.calc = EMT()
    BFGS(minimum, logfile=None).run(fmax=1e-4)
    samples = []
    for i in range(96):
        atoms = minimum.copy()
        atoms.positions = minimum.positions * rng.uniform(0.95, 1.06) + rng.normal(0, 0.12, (4, 3))
        atoms.calc = EMT()
        atoms.get_forces()
        samples.append(atoms_to_data(atoms, i, 0, "EMT sample", require_cell=False))
    forces = torch.cat([d.forces for d in samples])
    energies = torch.tensor([d.energy for d in samples])
    potential = ESCNPotential(eSCN(**FIT_MODEL), energies.mean(), energies.std(), forces.pow(2).mean().sqrt())
    optimizer = torch.optim.Adam(potential.parameters(), lr=3e-3)
    for _ in range(300):
        batch = collate_structures([samples[i] for i in rng.choice(len(samples), 16, replace=False)])
        out = potential.model.forward_trainable(batch)
        energy, forces = potential.normalize_targets(batch.energy, batch.forces, batch.atomic_numbers, batch.batch)
        loss = (out["forces"] - forces).pow(2).sum(-1).mean() + 0.1 * (out["energy"] - energy).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("emt") / "cu4.ckpt"
    torch.save(potential_checkpoint(potential.eval(), FIT_MODEL), path)
    return path, minimum


def pair_distances(atoms: Atoms) -> np.ndarray:
    return np.sort(atoms.get_all_distances()[np.triu_indices(len(atoms), 1)])


def test_bfgs_relaxation_reaches_the_emt_minimum(emt_fitted):
    path, minimum = emt_fitted
    rng = np.random.default_rng(1)
    atoms = minimum.copy()
    atoms.positions = minimum.positions + rng.normal(0, 0.1, (4, 3))
    start = atoms.copy()
    start.calc = EMT()
    emt_start = np.abs(start.get_forces()).max()

    atoms.calc = ESCNCalculator(path, device="cpu")
    optimizer = BFGS(atoms, logfile=None)
    assert optimizer.run(fmax=0.05, steps=100), "BFGS did not converge on the calculator's forces"
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.05

    final = atoms.copy()
    final.calc = EMT()
    assert np.abs(final.get_forces()).max() < 0.25 * emt_start
    np.testing.assert_allclose(pair_distances(atoms), pair_distances(minimum), atol=0.05)


def test_langevin_md_runs_50_steps(emt_fitted):
    from ase import units

    path, minimum = emt_fitted
    atoms = minimum.copy()
    atoms.calc = ESCNCalculator(path, device="cpu")
    energies = []
    dynamics = Langevin(
        atoms, 2 * units.fs, temperature_K=300, friction=0.02, fixcm=False, rng=np.random.default_rng(0)
    )
    dynamics.attach(lambda: energies.append(atoms.get_potential_energy()), interval=1)
    dynamics.run(50)
    assert len(energies) == 51 and np.all(np.isfinite(energies))
    assert np.all(np.isfinite(atoms.positions))
    assert np.abs(atoms.positions - minimum.positions).max() > 1e-3  # it moved
    assert pair_distances(atoms).min() > 1.5  # and stayed a cluster, no collapse
