"""Converter round trips (extxyz, traj, ASE db -> LMDB -> LmdbDataset) and the demo dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from escn_train.data import LmdbDataset, ensure_demo_dataset
from escn_train.data.convert import convert_files, main
from escn_train.data.demo import MAX_FORCE, generate_demo_dataset
from escn_train.graph import edge_vectors, radius_graph_pbc

ROOT = Path(__file__).resolve().parents[1]


def structures(n: int = 6) -> list:
    frames = []
    for i in range(n):
        atoms = fcc111("Cu", (2, 2, 3), vacuum=6.0)
        add_adsorbate(atoms, "O", 1.5, "fcc")
        atoms.set_tags([0] * 4 + [1] * 8 + [2])
        atoms.set_constraint(FixAtoms(indices=range(4)))
        atoms.rattle(0.05, seed=i)
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(atoms)
    return frames


def check_round_trip(frames: list, dataset: LmdbDataset, sids: list[int]) -> None:
    assert len(dataset) == len(frames)
    for i, atoms in enumerate(frames):
        data = dataset[i]
        torch.testing.assert_close(data.pos, torch.tensor(atoms.positions, dtype=torch.float32))
        torch.testing.assert_close(data.cell[0], torch.tensor(atoms.cell.array, dtype=torch.float32))
        assert data.atomic_numbers.tolist() == atoms.numbers.tolist() and data.natoms == len(atoms)
        assert data.energy == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
        torch.testing.assert_close(data.forces, torch.tensor(atoms.get_forces(apply_constraint=False), dtype=torch.float32))
        assert data.tags.tolist() == atoms.get_tags().tolist()
        assert data.fixed.tolist() == [1] * 4 + [0] * 9
        assert data.pbc.tolist() == [list(atoms.pbc)]
        assert (data.sid, data.fid) == (sids[i], i)


@pytest.mark.parametrize("suffix", [".extxyz", ".traj", ".db"])
def test_round_trip_through_ase_formats(tmp_path, suffix):
    frames = structures()
    source = tmp_path / f"input{suffix}"
    ase.io.write(source, frames)
    paths = convert_files([source], tmp_path / "out.lmdb", progress=False)
    assert paths == [tmp_path / "out.lmdb"]
    check_round_trip(frames, LmdbDataset(paths[0]), sids=list(range(len(frames))))


def test_shards_workers_and_precomputed_edges(tmp_path):
    frames = structures(7)
    ase.io.write(tmp_path / "a.traj", frames[:3])
    ase.io.write(tmp_path / "b.traj", frames[3:])
    paths = convert_files(
        [tmp_path / "a.traj", tmp_path / "b.traj"], tmp_path / "out", num_shards=3, workers=2,
        cutoff=5.0, max_neighbors=12, sid_per_file=True, progress=False,
    )
    assert [p.name for p in paths] == ["data.0000.lmdb", "data.0001.lmdb", "data.0002.lmdb"]
    assert [len(LmdbDataset(p)) for p in paths] == [2, 2, 3]
    dataset = LmdbDataset(tmp_path / "out")
    assert [dataset[i].sid for i in range(7)] == [0, 0, 0, 1, 1, 1, 1]
    assert [dataset[i].fid for i in range(7)] == [0, 1, 2, 0, 1, 2, 3]
    for i in range(7):
        data = dataset[i]
        graph = radius_graph_pbc(data.pos, data.cell, torch.tensor([data.natoms]), 5.0, 12, pbc=data.pbc)
        assert torch.equal(data.edge_index, graph.edge_index) and torch.equal(data.cell_offsets, graph.cell_offsets)
        dist, _ = edge_vectors(data.pos, data.cell, torch.zeros(data.natoms, dtype=torch.long), data.edge_index, data.cell_offsets)
        torch.testing.assert_close(dist, data.distances)
        assert data.edge_index.shape[1] > 0 and dist.max() <= 5.0 + 1e-5


def test_errors_name_the_offending_file(tmp_path):
    unlabelled = structures(2)
    for atoms in unlabelled:
        atoms.calc = None
    ase.io.write(tmp_path / "nolabels.extxyz", unlabelled)
    with pytest.raises(ValueError, match=r"nolabels\.extxyz, frame 0: no energy"):
        convert_files([tmp_path / "nolabels.extxyz"], tmp_path / "x.lmdb", progress=False)
    (tmp_path / "garbage.xyz").write_text("this is not a structure\n")
    assert main([str(tmp_path / "garbage.xyz"), "-o", str(tmp_path / "y.lmdb"), "--no-progress"]) == 2
    with pytest.raises(FileNotFoundError, match=r"missing\.traj does not exist"):
        convert_files([tmp_path / "missing.traj"], tmp_path / "z.lmdb", progress=False)
    ase.io.write(tmp_path / "ok.traj", structures(1))
    convert_files([tmp_path / "ok.traj"], tmp_path / "ok.lmdb", progress=False)
    with pytest.raises(FileExistsError, match=r"ok\.lmdb already exists"):
        convert_files([tmp_path / "ok.traj"], tmp_path / "ok.lmdb", progress=False)


def test_module_entry_point(tmp_path):
    ase.io.write(tmp_path / "in.extxyz", structures(2))
    result = subprocess.run(
        [sys.executable, "-m", "escn_train.data.convert", str(tmp_path / "in.extxyz"), "-o", str(tmp_path / "o.lmdb"), "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert len(LmdbDataset(tmp_path / "o.lmdb")) == 2


def test_committed_demo_dataset_follows_its_rules():
    root = ensure_demo_dataset(ROOT / "data" / "demo")  # present: returned without regenerating
    sids = {}
    for split, minimum in (("train", 2000), ("val", 250), ("test", 250)):
        dataset = LmdbDataset(root / f"{split}.lmdb")
        assert len(dataset) >= minimum
        items = dataset.get_many(range(len(dataset)))
        sids[split] = {d.sid for d in items}
        natoms = torch.tensor([d.natoms for d in items])
        assert 12 <= int(natoms.min()) and int(natoms.max()) <= 25
        tags, fixed = torch.cat([d.tags for d in items]), torch.cat([d.fixed for d in items])
        assert torch.equal(fixed == 1, tags == 0) and set(tags.tolist()) == {0, 1, 2}
        forces = torch.cat([d.forces for d in items])
        assert float(forces.norm(dim=1).max()) <= MAX_FORCE
    assert not (sids["train"] & sids["val"]) and not (sids["train"] & sids["test"]) and not (sids["val"] & sids["test"])


def test_demo_generation_is_deterministic(tmp_path):
    a = LmdbDataset(generate_demo_dataset(tmp_path / "a", scale=0.01, progress=False) / "val.lmdb")
    b = LmdbDataset(generate_demo_dataset(tmp_path / "b", scale=0.01, progress=False) / "val.lmdb")
    assert len(a) == len(b) >= 3
    for x, y in zip(a.get_many(range(len(a))), b.get_many(range(len(b)))):
        assert torch.equal(x.pos, y.pos) and x.energy == y.energy and torch.equal(x.forces, y.forces)
    assert ensure_demo_dataset(tmp_path / "a") == tmp_path / "a"
