"""escn-predict: LMDB and ASE inputs, the S2EF npz layout, extxyz output, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.io import read, write
from reference_fixtures import build_model, load_fixture
from torch_geometric.data import Data

from escn_train.data.collate import collate_structures
from escn_train.data.convert import LmdbWriter, atoms_to_data
from escn_train.inference.export import main as export_main
from escn_train.inference.reference_checkpoint import potential_checkpoint
from escn_train.models.potential import ESCNPotential
from escn_train.predict import main, parse_key_mapping

NAME = "tiny_l2m1"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    potential = ESCNPotential(build_model(NAME), -0.75, 2.5, 40.0).eval()
    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    torch.save(potential_checkpoint(potential, load_fixture(NAME)["config"]), path)
    return path, potential


def slab_with_adsorbate(size: int, seed: int):
    slab = fcc111("Cu", (2, 2, size), vacuum=6.0)
    add_adsorbate(slab, "O", 1.8, "fcc")
    slab.rattle(0.05, seed=seed)
    slab.set_constraint(FixAtoms(indices=list(range(4))))  # bottom layer
    slab.set_tags([0] * (len(slab) - 1) + [2])
    return slab


def expected(potential: ESCNPotential, structures) -> tuple[np.ndarray, list[np.ndarray]]:
    """One structure at a time, straight through the potential."""
    energies, forces = [], []
    for atoms in structures:
        data = atoms_to_data(atoms, 0, 0, "test", require_labels=False, require_cell=False)
        with torch.no_grad():
            out = potential.forward_trainable(collate_structures([data]))
        energies.append(float(out["energy"][0]))
        forces.append(out["forces"].numpy())
    return np.array(energies), forces


def test_lmdb_with_renamed_fields_gives_s2ef_layout(model, tmp_path, device):
    path, potential = model
    structures = [slab_with_adsorbate(2 + i % 2, i) for i in range(5)]
    lmdb = tmp_path / "val.lmdb"
    with LmdbWriter(lmdb) as writer:
        for i, atoms in enumerate(structures):
            atoms.calc = EMT()
            atoms.get_forces()
            data = atoms_to_data(atoms, 1000 + i, i % 2, "test")
            # OC20's original field names, as in the public S2EF LMDBs.
            writer.add(Data(**{("y" if k == "energy" else "force" if k == "forces" else k): v for k, v in data.items()}))

    out, xyz = tmp_path / "preds.npz", tmp_path / "preds.xyz"
    argv = [str(path), str(lmdb), "-o", str(out), "--key-mapping", "y=energy,force=forces", "--batch-size", "2",
            "--extxyz", str(xyz), "--no-progress", "--device", device.type]
    assert main(argv) == 0
    result = np.load(out)
    assert sorted(result.files) == ["chunk_idx", "energy", "forces", "ids"]
    assert list(result["ids"]) == [f"{1000 + i}_{i % 2}" for i in range(5)]
    natoms = [len(a) for a in structures]
    assert result["forces"].shape == (sum(natoms), 3) and result["energy"].shape == (5,)
    np.testing.assert_array_equal(result["chunk_idx"], np.cumsum(natoms)[:-1])

    energies, forces = expected(potential, structures)
    scale = np.abs(np.concatenate(forces)).max()
    np.testing.assert_allclose(result["energy"], energies, rtol=1e-6, atol=1e-6)
    for got, want in zip(np.split(result["forces"], result["chunk_idx"]), forces):
        np.testing.assert_allclose(got, want, atol=1e-5 * scale)

    written = read(xyz, index=":")
    assert len(written) == 5
    for atoms, original, energy, want in zip(written, structures, energies, forces):
        assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-5)
        np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), want, atol=1e-5 * scale)
        np.testing.assert_allclose(atoms.positions, original.positions, atol=1e-5)
        assert atoms.constraints and list(atoms.constraints[0].index) == [0, 1, 2, 3]


def test_ase_files_free_atom_forces_and_exported_model(model, tmp_path):
    path, potential = model
    slab = slab_with_adsorbate(3, 0)
    labelled = bulk("Cu", cubic=True)
    labelled.info.update(sid=7, fid=3)
    water = molecule("H2O")  # no cell, not periodic
    inputs = tmp_path / "structures.xyz"
    write(inputs, [slab, labelled, water])
    traj = tmp_path / "more.traj"
    write(traj, [bulk("Pt", "fcc", a=3.9)])

    out = tmp_path / "preds.npz"
    assert main([str(path), str(inputs), str(traj), "-o", str(out), "--forces", "free", "--no-progress",
                 "--device", "cpu"]) == 0
    result = np.load(out)
    # The running index counts across inputs; sid/fid from atoms.info when present.
    assert list(result["ids"]) == ["0", "7_3", "2", "3"]
    free = [len(slab) - 4, len(labelled), len(water), 1]
    np.testing.assert_array_equal(result["chunk_idx"], np.cumsum(free)[:-1])
    energies, forces = expected(potential, [slab, labelled, water, read(traj)])
    np.testing.assert_allclose(result["energy"], energies, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.split(result["forces"], result["chunk_idx"])[0], forces[0][4:], atol=1e-6)

    # The same predictions from an exported program, written in float16 as fairchem does.
    assert export_main([str(path), "-o", str(tmp_path / "tiny"), "--format", "export", "--device", "cpu",
                        "--no-check"]) == 0
    out16 = tmp_path / "preds16.npz"
    assert main([str(tmp_path / "tiny.pt2"), str(inputs), str(traj), "-o", str(out16), "--forces", "free",
                 "--dtype", "float16", "--no-progress", "--trust-exported"]) == 0
    half = np.load(out16)
    assert half["energy"].dtype == np.float16 and half["forces"].dtype == np.float16
    np.testing.assert_allclose(half["energy"], result["energy"], rtol=1e-3)
    np.testing.assert_allclose(half["forces"], result["forces"], atol=2e-3 * np.abs(result["forces"]).max())


def test_errors_name_the_problem(model, tmp_path, capsys):
    path, _ = model
    missing = tmp_path / "nowhere.lmdb"
    assert main([str(path), str(missing), "-o", str(tmp_path / "x.npz"), "--no-progress"]) == 2
    assert "nowhere.lmdb" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert main([str(notes), str(notes), "-o", str(tmp_path / "x.npz"), "--no-progress"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    heavy = bulk("Cu")  # the model knows elements 1..89
    heavy.numbers[:] = 95
    write(tmp_path / "heavy.xyz", heavy)
    assert main([str(path), str(tmp_path / "heavy.xyz"), "-o", str(tmp_path / "x.npz"), "--no-progress"]) == 2
    assert "atomic number 95" in capsys.readouterr().err
    assert parse_key_mapping('{"y": "energy"}') == {"y": "energy"}
    assert parse_key_mapping("y=energy, force=forces") == {"y": "energy", "force": "forces"}
    with pytest.raises(ValueError, match="OLD=NEW"):
        parse_key_mapping("y:energy")
