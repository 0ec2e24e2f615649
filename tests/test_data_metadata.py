"""Per-structure metadata (metadata.npz), escn-index, stored check verdicts and atomic conversion output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from torch_geometric.data import Data

from escn_train.data import LmdbDataModule, LmdbDataset
from escn_train.data import index as index_module
from escn_train.data.checks import BadSample, BadSampleError, SampleChecker
from escn_train.data.convert import convert_files, write_lmdb_shards
from escn_train.data.index import build_index, dataset_natoms, main
from escn_train.data.metadata import MetadataError

ROOT = Path(__file__).resolve().parents[1]


def structure(natoms: int, seed: int, overlap: bool = False) -> Data:
    """A labelled structure of ``natoms`` atoms near the sites of a 2 Å grid in a 12 Å box (none closer than 1.6 Å)."""
    sites = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3) * 2.0 + 1.0
    pos = sites[:natoms] + np.random.default_rng(seed).uniform(-0.1, 0.1, size=(natoms, 3))
    if overlap:
        pos[1] = pos[0] + [0.05, 0.0, 0.0]
    return Data(
        pos=torch.tensor(pos, dtype=torch.float32),
        cell=torch.eye(3).view(1, 3, 3) * 12.0,
        atomic_numbers=torch.full((natoms,), 29),
        natoms=natoms,
        energy=float(-natoms),
        forces=torch.zeros(natoms, 3),
        sid=seed,
        fid=0,
    )


def counts(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, 20, size=n)


def write(path: Path, natoms: np.ndarray, num_shards: int = 1, metadata: bool = False, bad: tuple[int, ...] = ()) -> Path:
    entries = [structure(int(n), i, overlap=i in bad) for i, n in enumerate(natoms)]
    write_lmdb_shards(entries, len(entries), path, num_shards=num_shards, progress=False, metadata=metadata)
    return path


# ----------------------------------------------------------------------------- reading metadata
def test_written_metadata_round_trips_in_fairchem_places(tmp_path):
    natoms = counts(23)
    shards = write(tmp_path / "shards", natoms, num_shards=3, metadata=True)
    single = write(tmp_path / "alone" / "train.lmdb", natoms[:9], metadata=True)
    assert (shards / "metadata.npz").is_file() and (single.parent / "metadata.npz").is_file()
    loaded = np.load(shards / "metadata.npz")
    assert loaded["natoms"].dtype == np.int32 and loaded["natoms"].tolist() == natoms.tolist()
    assert LmdbDataset(shards).natoms.tolist() == natoms.tolist()
    assert LmdbDataset(shards).metadata_path == shards / "metadata.npz"
    assert LmdbDataset(single).natoms.tolist() == natoms[:9].tolist()
    subset = LmdbDataset(shards, subset=[4, 0, 22])
    assert subset.natoms.tolist() == natoms[[4, 0, 22]].tolist()


def test_two_files_in_one_folder_do_not_share_metadata(tmp_path):
    first = write(tmp_path / "train.lmdb", counts(12, 1), metadata=True)
    second = write(tmp_path / "val.lmdb", counts(5, 2), metadata=True)
    assert (tmp_path / "metadata.npz").is_file()  # the first file was alone: fairchem's place
    assert (tmp_path / "val.lmdb.metadata.npz").is_file()  # the second gets its own name
    assert LmdbDataset(first).natoms.tolist() == counts(12, 1).tolist()
    assert LmdbDataset(second).natoms.tolist() == counts(5, 2).tolist()
    third = write(tmp_path / "test.lmdb", counts(7, 3))
    with pytest.warns(UserWarning, match=r"metadata\.npz: holds 12 atom counts but .*test\.lmdb has 7 entries; "
                      r"this metadata\.npz belongs to another \.lmdb file"):
        assert LmdbDataset(third).natoms is None
    assert main([str(third), "--no-progress"]) == 0
    assert (tmp_path / "test.lmdb.metadata.npz").is_file()
    assert LmdbDataset(third).natoms.tolist() == counts(7, 3).tolist()


@pytest.mark.parametrize("with_neighbors", [False, True])
def test_fairchem_made_metadata_is_read(tmp_path, with_neighbors):
    """As fairchem's scripts/make_lmdb_sizes.py writes it: np.savez, int32 natoms, optionally neighbors."""
    natoms = counts(10)
    path = write(tmp_path / "shards", natoms, num_shards=2)
    arrays = {"natoms": np.array(natoms, dtype=np.int32)}
    if with_neighbors:
        arrays["neighbors"] = np.array(natoms * 20, dtype=np.int32)
    np.savez(path / "metadata.npz", **arrays)
    dataset = LmdbDataset(path)
    assert dataset.natoms.tolist() == natoms.tolist() and dataset.metadata_path == path / "metadata.npz"
    np.savez(path / "metadata.npz", natoms=natoms.astype(np.int64))  # any integer dtype
    assert LmdbDataset(path).natoms.tolist() == natoms.tolist()


def test_mismatched_metadata_is_an_error_naming_the_file(tmp_path):
    natoms = counts(15)
    path = write(tmp_path / "shards", natoms, num_shards=2)
    meta = path / "metadata.npz"
    np.savez(meta, natoms=natoms[:-1])
    with pytest.raises(MetadataError, match=rf"^{meta}: holds 14 atom counts, but the dataset {path} has 15 entries"):
        LmdbDataset(path)
    np.savez(meta, natoms=natoms + 1)
    with pytest.raises(MetadataError, match=rf"^{meta}: natoms\[\d+\] = \d+, but entry \d+ of {path} "
                       r"\(data\.000[01]\.lmdb\) has \d+ atoms; the metadata does not match the data"):
        LmdbDataset(path)
    np.savez(meta, natoms=natoms.astype(np.float32))
    with pytest.raises(MetadataError, match=rf"^{meta}: 'natoms' must be a 1-D integer array, got dtype float32"):
        LmdbDataset(path)
    meta.write_bytes(b"not an npz")
    with pytest.raises(MetadataError, match=rf"^{meta}: cannot read it as a metadata \.npz file"):
        LmdbDataset(path)
    # --force rebuilds it; the command line reports the error in one line otherwise
    np.savez(meta, natoms=natoms[:-1])
    run = subprocess.run([sys.executable, "-m", "escn_train.data.index", str(path), "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith(f"escn-index: error: {meta}: holds 14 atom counts")
    assert "Traceback" not in run.stderr
    assert main([str(path), "--force", "--no-progress"]) == 0
    assert LmdbDataset(path).natoms.tolist() == natoms.tolist()


# ----------------------------------------------------------------------------- escn-index
@pytest.mark.parametrize("workers", [1, 2])
def test_escn_index_on_shards_matches_the_data(tmp_path, monkeypatch, capsys, workers):
    monkeypatch.setattr(index_module, "CHUNK", 4)  # several tasks per shard, and a pool even for small data
    monkeypatch.setattr(index_module, "MIN_PARALLEL", 0)
    natoms = counts(37)
    path = write(tmp_path / "shards", natoms, num_shards=4)
    assert LmdbDataset(path).natoms is None
    assert main([str(path), "--workers", str(workers), "--no-progress"]) == 0
    assert f"{path}: 37 entries -> {path / 'metadata.npz'}" in capsys.readouterr().out
    assert np.load(path / "metadata.npz")["natoms"].tolist() == natoms.tolist()
    assert main([str(path), "--no-progress"]) == 0
    assert "metadata already present" in capsys.readouterr().out


def test_read_only_data_dir_indexes_into_the_cache(tmp_path, monkeypatch):
    data_dir = tmp_path / "ro"
    path = write(data_dir / "train.lmdb", counts(11))
    data_dir.chmod(0o555)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    try:
        assert main([str(path), "--no-progress"]) == 0  # into ~/.cache/escn_train
        assert main([str(path), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
        default = LmdbDataset(path)
        given = LmdbDataset(path, cache_dir=tmp_path / "cache")
        module = LmdbDataModule(train=path, max_atoms_per_batch=40, stats_cache_dir=tmp_path / "cache2", progress=False)
        module.setup("fit")  # builds on first need, into its stats_cache_dir
    finally:
        data_dir.chmod(0o755)
    assert sorted(p.name for p in data_dir.iterdir()) == ["train.lmdb"]
    for root, dataset in [(tmp_path / "home" / ".cache" / "escn_train", default), (tmp_path / "cache", given),
                          (tmp_path / "cache2", module.dataset("train"))]:
        cached = list(root.glob("train.lmdb-*.metadata.npz"))
        assert len(cached) == 1 and dataset.metadata_path == cached[0]
        assert dataset.natoms.tolist() == counts(11).tolist()
    # changing the data changes the fingerprint: the cached metadata is not used for other data
    data_dir.chmod(0o755)
    path.unlink()
    write(path, counts(11, seed=5))
    data_dir.chmod(0o555)
    try:
        assert LmdbDataset(path).natoms is None
    finally:
        data_dir.chmod(0o755)


def test_datamodule_builds_metadata_once_on_first_need(tmp_path, monkeypatch):
    natoms = counts(30)
    path = write(tmp_path / "shards", natoms, num_shards=2)
    module = LmdbDataModule(train=path, batch_size=50, max_atoms_per_batch=60, progress=False, check_samples=False)
    module.setup("fit")
    assert (path / "metadata.npz").is_file()
    batches = list(module.batch_sampler("train"))
    assert all(natoms[b].sum() <= 60 or len(b) == 1 for b in batches) and sorted(sum(batches, [])) == list(range(30))

    def no_scan(*args, **kwargs):
        raise AssertionError("the dataset was scanned again")

    monkeypatch.setattr(index_module, "scan_dataset", no_scan)
    again = LmdbDataModule(train=path, batch_size=50, max_atoms_per_batch=60, progress=False, check_samples=False)
    again.setup("fit")
    assert list(again.batch_sampler("train")) == batches
    assert dataset_natoms(again.dataset("train")).tolist() == natoms.tolist()


# ----------------------------------------------------------------------------- stored check verdicts
def test_check_verdicts_are_stored_and_used_instead_of_rechecking(tmp_path, monkeypatch):
    natoms = counts(12)
    path = write(tmp_path / "shards", natoms, num_shards=2, bad=(7,))
    assert main([str(path), "--check", "--neighbor-cutoff", "6", "--no-progress"]) == 0
    assert (path / "metadata.checks.json").is_file()
    checker = SampleChecker(neighbor_cutoff=6.0)
    calls = []
    original = SampleChecker.__call__
    monkeypatch.setattr(SampleChecker, "__call__", lambda self, data, source: calls.append(source) or original(self, data, source))
    dataset = LmdbDataset(path, checker=checker)
    assert [d.natoms for d in dataset.get_many([0, 1, 2, 11])] == natoms[[0, 1, 2, 11]].tolist()
    assert calls == []  # verdicts were stored for exactly these settings
    with pytest.raises(BadSampleError, match=r"data\.0001\.lmdb, key b'1': atoms 0 and 1 are 0\.050 Å apart"):
        dataset[7]
    skipping = LmdbDataset(path, checker=checker, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        assert isinstance(skipping[7], BadSample)
    other = LmdbDataset(path, checker=SampleChecker(neighbor_cutoff=5.0))  # other settings: checked as read
    other[0]
    assert len(calls) == 1
    assert LmdbDataModule(train=path, neighbor_cutoff=6).dataset("train")._verdicts == dataset._verdicts  # as train.py sets it
    assert LmdbDataModule(train=path, neighbor_cutoff=6, key_mapping={"y": "energy"}).dataset("train")._verdicts is None


def test_datamodule_index_pass_stores_its_checks(tmp_path):
    path = write(tmp_path / "shards", counts(10), num_shards=2)
    module = LmdbDataModule(train=path, batch_size=4, max_atoms_per_batch=50, neighbor_cutoff=6.0, progress=False)
    module.setup("fit")
    assert (path / "metadata.checks.json").is_file()
    assert module.dataset("train")._verdicts == {}
    fresh = LmdbDataModule(train=path, batch_size=4, max_atoms_per_batch=50, neighbor_cutoff=6.0, progress=False)
    assert fresh.dataset("train")._verdicts == {}  # read back for the same checker


# ----------------------------------------------------------------------------- escn-convert output
def frames(n: int, missing_energy_at: int | None = None) -> list[Atoms]:
    out = []
    for i in range(n):
        atoms = Atoms("Cu4", positions=np.eye(4, 3) * 2.5 + i * 0.01, cell=np.eye(3) * 8, pbc=True)
        if i != missing_energy_at:
            atoms.calc = SinglePointCalculator(atoms, energy=-1.0 * i, forces=np.zeros((4, 3)))
        out.append(atoms)
    return out


@pytest.mark.parametrize("output", ["train.lmdb", "shards", "existing_dir"])
def test_failed_conversion_leaves_nothing_and_a_rerun_works(tmp_path, output):
    good, broken = tmp_path / "good.extxyz", tmp_path / "broken.extxyz"
    ase.io.write(good, frames(6))
    ase.io.write(broken, frames(6, missing_energy_at=4))
    out = tmp_path / "out" / output
    if output == "existing_dir":
        out.mkdir(parents=True)
    before = sorted(p.name for p in out.parent.rglob("*"))
    num_shards = 1 if output.endswith(".lmdb") else 2
    with pytest.raises(ValueError, match=r"broken\.extxyz, frame 4: no energy"):
        convert_files([broken], out, num_shards=num_shards, progress=False)
    assert sorted(p.name for p in out.parent.rglob("*")) == before  # no partial output, no temporary files
    paths = convert_files([good], out, num_shards=num_shards, progress=False)
    dataset = LmdbDataset(out)
    assert len(dataset) == 6 and dataset.natoms.tolist() == [4] * 6 and all(p.is_file() for p in paths)
    left = sorted(p.name for p in out.parent.rglob("*") if p.name.startswith("."))
    assert left == []


def test_loader_workers_share_which_entries_were_checked(tmp_path):
    """Without stored verdicts, an entry checked by one DataLoader worker is not checked again by another."""
    path = write(tmp_path / "c.lmdb", counts(16))
    dataset = LmdbDataset(path, checker=SampleChecker())
    assert dataset._verdicts is None and not dataset._checked.any()
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=lambda items: items)
    assert sum(len(batch) for batch in loader) == 16
    assert np.unpackbits(dataset._checked).sum() == 16  # set by the workers, seen here


def test_single_process_fit_runs_the_checks_once_at_index_time(tmp_path):
    path = write(tmp_path / "shards", counts(10), num_shards=2, bad=(3,))
    LmdbDataModule(train={"src": path, "subset": 5}, batch_size=4, neighbor_cutoff=6.0, progress=False).setup("fit")
    assert not (path / "metadata.npz").exists()  # a subset is checked as it is read, not indexed whole
    module = LmdbDataModule(train=path, batch_size=4, neighbor_cutoff=6.0, progress=False)
    module.setup("fit")
    assert (path / "metadata.checks.json").is_file() and list(module.dataset("train")._verdicts) == [3]
    with pytest.raises(BadSampleError, match=r"data\.0000\.lmdb, key b'3': atoms 0 and 1 are 0\.050 Å apart"):
        module.dataset("train")[3]
