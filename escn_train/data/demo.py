"""A small, deterministic slab + adsorbate dataset labelled with ASE's EMT calculator.

Meant for smoke tests, tutorials and CPU training runs of a tiny eSCN in minutes. Every
structure is a 3-layer fcc(111) or fcc(100) slab of Cu, Ag, Au, Ni, Pd, Pt or Al (2×2 or
3×2 surface cell, 12–18 metal atoms, 8 Å of vacuum on each side, periodic in all three
directions as in OC20) with one adsorbate (H, O, C, N, CO or OH) on a random site.

Each *system* (one ``sid``) is one trajectory of frames (``fid`` 0, 1, …):

* 3 rattled copies of the start structure (free atoms displaced by N(0, σ), σ 0.05–0.15 Å);
* 8 frames of a short Langevin MD run (1 fs steps, 300–900 K, every 5th step);
* 4 frames of a BFGS relaxation from a rattled start (every step).

Tags follow OC20: 0 subsurface (the bottom layer, fixed with ``FixAtoms`` while generating
and ``fixed = 1`` in the files), 1 surface (the two upper layers), 2 adsorbate.

**Filtering rule:** a frame is dropped when any atom's force exceeds
:data:`MAX_FORCE` (10 eV/Å); such frames are far from anything a potential is used for.
Splits never share a system: train, val and test draw systems from disjoint ``sid``
ranges (0…, 100000…, 200000…) and take whole trajectories until they hold at least the
requested number of frames. Everything is seeded by ``(seed, sid)``, so the files are
identical on every run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

#: Frames whose largest per-atom force norm exceeds this (eV/Å) are not written.
MAX_FORCE = 10.0
METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
ADSORBATES = ("H", "O", "C", "N", "CO", "OH")
SPLITS = {"train": (2000, 0), "val": (250, 100_000), "test": (250, 200_000)}  # (min frames, first sid)
VACUUM = 8.0
DEMO_FILES = tuple(f"{split}.lmdb" for split in SPLITS)


def _label(atoms):
    """A copy of ``atoms`` carrying its EMT energy and forces in a single-point calculator."""
    from ase.calculators.singlepoint import SinglePointCalculator

    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
    return frame


def build_system(sid: int, seed: int = 0):
    """The start structure of system ``sid``: slab + adsorbate with OC20 tags and the bottom layer fixed."""
    from ase import Atoms
    from ase.build import add_adsorbate, fcc100, fcc111
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    rng = np.random.default_rng([seed, sid])
    metal = METALS[rng.integers(len(METALS))]
    facet = (fcc111, fcc100)[rng.integers(2)]
    size = ((2, 2, 3), (3, 2, 3))[rng.integers(2)]
    slab = facet(metal, size=size, vacuum=VACUUM)
    layer = slab.get_tags().copy()  # ASE: 1 = top layer ... 3 = bottom layer
    sites = list(slab.info["adsorbate_info"]["sites"])
    ads_name = ADSORBATES[rng.integers(len(ADSORBATES))]
    adsorbate = Atoms(ads_name, positions=[[0, 0, 0], [0, 0, 1.16 if ads_name == "CO" else 0.97]][: len(ads_name)])
    height = float(rng.uniform(1.2, 2.0))
    add_adsorbate(slab, adsorbate, height, position=sites[rng.integers(len(sites))],
                  offset=tuple(rng.uniform(-0.2, 0.2, 2)))
    n_metal = len(layer)
    tags = np.full(len(slab), 2)
    tags[:n_metal] = np.where(layer == size[2], 0, 1)
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    slab.pbc = True
    slab.center(vacuum=VACUUM, axis=2)
    slab.calc = EMT()
    return slab, rng


def system_frames(sid: int, seed: int = 0) -> list:
    """All labelled frames of one system's trajectory (before filtering), in order."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.optimize import BFGS

    start, rng = build_system(sid, seed)
    frames = []
    for _ in range(3):
        atoms = start.copy()
        atoms.calc = start.calc
        atoms.set_positions(atoms.get_positions() + rng.normal(0.0, rng.uniform(0.05, 0.15), (len(atoms), 3)))
        frames.append(_label(atoms))  # FixAtoms keeps the bottom layer in place

    md = start.copy()
    md.calc = start.calc
    temperature = float(rng.uniform(300, 900))
    MaxwellBoltzmannDistribution(md, temperature_K=temperature, rng=rng)
    dyn = Langevin(md, 1.0 * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=rng)
    for _ in range(8):
        dyn.run(5)
        frames.append(_label(md))

    relax = start.copy()
    relax.calc = start.calc
    relax.set_positions(relax.get_positions() + rng.normal(0.0, 0.1, (len(relax), 3)))
    opt = BFGS(relax, logfile=None)
    for _ in range(4):
        frames.append(_label(relax))
        opt.run(fmax=0.0, steps=1)
    return frames


def _split_frames(first_sid: int, min_frames: int, seed: int, bar: tqdm) -> Iterator[tuple[int, int, object]]:
    """(sid, fid, atoms) of whole trajectories from ``first_sid`` on until ``min_frames`` are kept."""
    kept, sid = 0, first_sid
    while kept < min_frames:
        for fid, atoms in enumerate(system_frames(sid, seed)):
            if np.linalg.norm(atoms.get_forces(apply_constraint=False), axis=1).max() > MAX_FORCE:
                continue
            kept += 1
            bar.update()
            yield sid, fid, atoms
        sid += 1


def generate_demo_dataset(root: str | os.PathLike, seed: int = 0, scale: float = 1.0, progress: bool = True) -> Path:
    """Write ``train.lmdb``, ``val.lmdb`` and ``test.lmdb`` under ``root``; returns ``root``.

    ``scale`` multiplies the frame counts (e.g. 0.05 for a quick test set).
    """
    from escn_train.data.convert import atoms_to_data, write_lmdb_shards

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, (min_frames, first_sid) in SPLITS.items():
        target = max(1, int(round(min_frames * scale)))
        with tqdm(total=target, desc=f"demo {split}", unit="frame", disable=not progress) as bar:
            entries = [
                atoms_to_data(atoms, sid, fid, f"demo system {sid}, frame {fid}")
                for sid, fid, atoms in _split_frames(first_sid, target, seed, bar)
            ]
        write_lmdb_shards(entries, len(entries), root / f"{split}.lmdb", progress=False)
    return root


def ensure_demo_dataset(root: str | os.PathLike = "data/demo") -> Path:
    """The demo dataset directory, generated (about a minute on 2 cores) when any split is missing.

    Generation goes to a temporary sibling directory that is renamed into place, so an
    interrupted run never leaves a half-written dataset behind.
    """
    root = Path(root)
    if all((root / name).is_file() for name in DEMO_FILES):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        generate_demo_dataset(tmp)
        root.mkdir(exist_ok=True)
        for name in DEMO_FILES:
            if not (root / name).exists():
                os.replace(tmp / name, root / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
