"""Large systems end to end: ESCNCalculator (BFGS-family relaxation, MD), escn-predict and an
exported .pt2 on cells of more than 10,000 atoms, with a very small random eSCN.

The check that the large graph is right without an all-pairs oracle: a supercell of a
rattled 256-atom cell (14.4 Å, more than twice the 5 Å cutoff, so no atom meets two images
of another) holds 40 copies of every local environment, so its forces are the small cell's
forces tiled and its model energy 40 times the small cell's (up to the per-structure offset).

The relaxation uses ASE's LBFGS: ASE's BFGS keeps a dense 3N x 3N Hessian, 7.5 GB of float64
at 10,240 atoms (the model itself needs well under 1 GB there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io import read, write
from ase.md.verlet import VelocityVerlet
from ase.optimize import LBFGS

from escn_train.ase import ESCNCalculator
from escn_train.inference.export import main as export_main
from escn_train.inference.loading import load_predictor
from escn_train.inference.reference_checkpoint import potential_checkpoint
from escn_train.models.escn import eSCN
from escn_train.models.potential import ESCNPotential
from escn_train.predict import main as predict_main

#: Smaller than escn_tiny so that each 10,240-atom call takes seconds on a CPU.
CONFIG = {"cutoff": 5.0, "max_neighbors": 12, "max_num_elements": 90, "num_layers": 1, "lmax": 2, "mmax": 1,
          "sphere_channels": 8, "hidden_channels": 16, "edge_channels": 8, "num_sphere_samples": 16}
ENERGY_MEAN = -0.75
COPIES = (5, 4, 2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    potential = ESCNPotential(eSCN(**CONFIG), ENERGY_MEAN, 2.5, 1.9).eval()
    path = tmp_path_factory.mktemp("large") / "tiny.ckpt"
    torch.save(potential_checkpoint(potential, CONFIG), path)
    return path


@pytest.fixture(scope="module")
def cells(checkpoint):
    """(small cell, its supercell of 10,240 atoms, small-cell energy and forces)."""
    small = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(4)
    small.rattle(0.05, seed=0)
    small.calc = ESCNCalculator(checkpoint, device="cpu")
    energy, forces = small.get_potential_energy(), small.get_forces()
    large = small.repeat(COPIES)
    del large.calc
    return small, large, energy, forces


def assert_tiled(energy, forces, small_energy, small_forces):
    """A wrong or missing edge changes an atom's force by O(1) of its size; float32 round-off
    (coordinates up to 72 Å, forces of a random network that nearly cancel) stays near 1e-3."""
    copies = int(np.prod(COPIES))
    scale = np.abs(small_forces).max()
    np.testing.assert_allclose(forces, np.tile(small_forces, (copies, 1)), atol=5e-3 * scale)
    assert energy - ENERGY_MEAN == pytest.approx(copies * (small_energy - ENERGY_MEAN), rel=1e-3)


@pytest.mark.slow
def test_calculator_relaxes_and_runs_md_on_a_large_cell(checkpoint, cells):
    small, large, small_energy, small_forces = cells
    atoms = large.copy()
    assert len(atoms) >= 10_000
    atoms.calc = ESCNCalculator(checkpoint, device="cpu")
    assert_tiled(atoms.get_potential_energy(), atoms.get_forces(), small_energy, small_forces)

    start = atoms.positions.copy()
    LBFGS(atoms, logfile=None).run(fmax=1e-6, steps=2)
    moved = np.linalg.norm(atoms.positions - start, axis=1)
    assert moved.max() > 0 and np.isfinite(atoms.get_forces()).all()

    atoms.set_momenta(np.zeros_like(atoms.positions))
    before = atoms.positions.copy()
    VelocityVerlet(atoms, timestep=1.0).run(2)  # fs
    assert np.isfinite(atoms.get_potential_energy()) and np.abs(atoms.positions - before).max() > 0


@pytest.mark.slow
def test_predict_and_exported_program_on_large_structures(checkpoint, cells, tmp_path):
    small, large, small_energy, small_forces = cells
    shifted = large.copy()
    shifted.positions += np.array([0.7, -0.3, 1.1])  # same structure, atoms outside the cell
    inputs = tmp_path / "large.xyz"
    write(inputs, [large, shifted])

    out = tmp_path / "preds.npz"
    assert predict_main([str(checkpoint), str(inputs), "-o", str(out), "--no-progress", "--device", "cpu"]) == 0
    result = np.load(out)
    forces = np.split(result["forces"], result["chunk_idx"])
    assert [len(f) for f in forces] == [len(large)] * 2
    for energy, f in zip(result["energy"], forces):
        assert_tiled(float(energy), f, small_energy, small_forces)

    assert export_main([str(checkpoint), "-o", str(tmp_path / "tiny"), "--format", "export", "--device", "cpu",
                        "--no-check"]) == 0
    exported = ESCNCalculator(load_predictor(tmp_path / "tiny.pt2", "cpu", trusted=True))
    atoms = read(inputs, index=1)
    atoms.calc = exported
    assert_tiled(atoms.get_potential_energy(), atoms.get_forces(), small_energy, small_forces)
