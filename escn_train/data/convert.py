"""Convert ASE-readable structures (extxyz, .traj, ASE db, ...) into OC20-style LMDBs.

Output follows the layout fairchem's ``LmdbDataset`` reads and :class:`LmdbDataset` of this
project reads: one environment per file (``subdir=False``), keys ``b"0"``, ``b"1"``, …
holding pickled PyG-2 ``Data`` objects, plus a ``b"length"`` key. Each ``Data`` has
``pos, cell, atomic_numbers, natoms, energy, forces, tags, fixed, sid, fid, pbc`` and,
with ``--cutoff``/``--max-neighbors``, a precomputed ``edge_index``, ``cell_offsets`` and
``distances`` built with :func:`escn_train.graph.radius_graph_pbc`.

Next to the output goes a ``metadata.npz`` with every entry's atom count, where fairchem
and ``escn-index`` look for it (see :mod:`escn_train.data.metadata`). Output is written
under a temporary name and renamed into place when every structure converted, so a
failure (a frame without energy, say) leaves nothing behind and a rerun starts clean.

Labels come from the structure's calculator (as ASE stores them in extxyz, .traj and db
files) or, failing that, from ``atoms.info[energy_key]`` / ``atoms.arrays[forces_key]``.
``fixed`` is 1 for atoms under an ASE ``FixAtoms`` constraint; ``tags`` are ASE's tags, or with
``--tags oc20`` OC20's (0 sub-surface, 1 surface, 2 adsorbate; :mod:`escn_train.data.tags`).
``sid`` / ``fid`` come from ``atoms.info`` (or the db row's key-value pairs) when present;
otherwise ``sid`` is the running structure index (or the input file's index with
``--sid-per-file``) and ``fid`` the frame index within its file.

Example::

    escn-convert traj/*.traj -o data/train --num-shards 4 --workers 2 --cutoff 6 --max-neighbors 20
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import lmdb
import numpy as np
import torch
from torch_geometric.data import Data
from tqdm import tqdm

from escn_train.data.tags import TAG_MODES, TagWarning, layer_tag_warning, looks_like_ase_layer_tags, structure_tags
from escn_train.data.metadata import METADATA_NAME, metadata_target, write_metadata
from escn_train.graph import radius_graph_pbc

#: Entries written per LMDB write transaction.
COMMIT_EVERY = 1000
#: Address space reserved for an LMDB being written (sparse; the file only grows as needed).
MAP_SIZE = 1 << 40


class ConversionError(ValueError):
    """A structure or input file cannot be converted; the message names it."""


@dataclass(frozen=True)
class LabelKeys:
    """Where labels are looked up when a structure has no calculator results."""

    energy: str = "energy"
    forces: str = "forces"


def _info_value(atoms: Any, key: str) -> Any:
    if key in atoms.info:
        return atoms.info[key]
    return atoms.info.get("key_value_pairs", {}).get(key)  # ASE db rows read back this way


def _calculator_result(atoms: Any, name: str) -> Any:
    calc = atoms.calc
    if calc is None:
        return None
    results = getattr(calc, "results", {})
    if name in results:
        return results[name]
    if name == "energy" and "free_energy" in results:
        return results["free_energy"]
    return None


def atoms_to_data(
    atoms: Any,
    sid: int | str,
    fid: int,
    source: str,
    cutoff: float | None = None,
    max_neighbors: int | None = None,
    label_keys: LabelKeys = LabelKeys(),
    *,
    require_labels: bool = True,
    require_cell: bool = True,
    tags: str = "keep",
) -> Data:
    """One ASE ``Atoms`` as an OC20-style PyG ``Data`` (see module docstring for the fields).

    ``source`` (e.g. ``"relax.traj, frame 3"``) names the structure in errors. For
    inference, ``require_labels=False`` leaves missing energy/forces out instead of failing,
    and ``require_cell=False`` accepts a cell that is singular along non-periodic directions
    (molecules without a cell, slabs without a vacuum vector), which the graph builder handles.
    ``tags``: ``keep`` ASE's tags or derive OC20's (``oc20``, see :mod:`escn_train.data.tags`).
    """
    from ase.constraints import FixAtoms

    natoms = len(atoms)
    if natoms == 0:
        raise ConversionError(f"{source}: structure has no atoms")
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if abs(np.linalg.det(cell)) < 1e-8 and (require_cell or bool(np.all(atoms.pbc))):
        raise ConversionError(
            f"{source}: cell is degenerate ({cell.tolist()}); eSCN's periodic graph needs a full 3D cell "
            "(for a molecule or slab set one, e.g. atoms.center(vacuum=10))"
        )
    energy = _calculator_result(atoms, "energy")
    if energy is None:
        energy = _info_value(atoms, label_keys.energy)
    forces = _calculator_result(atoms, "forces")
    if forces is None:
        forces = atoms.arrays.get(label_keys.forces)
    if energy is None and require_labels:
        raise ConversionError(
            f"{source}: no energy (looked in the attached calculator and atoms.info['{label_keys.energy}'])"
        )
    if forces is None and require_labels:
        raise ConversionError(
            f"{source}: no forces (looked in the attached calculator and atoms.arrays['{label_keys.forces}'])"
        )
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float32)
        if forces.shape != (natoms, 3):
            raise ConversionError(f"{source}: forces have shape {forces.shape}, expected ({natoms}, 3)")

    fixed = np.zeros(natoms, dtype=np.int64)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.get_indices()] = 1

    data = Data(
        pos=torch.tensor(atoms.get_positions(), dtype=torch.float32),
        cell=torch.tensor(cell, dtype=torch.float32).view(1, 3, 3),
        atomic_numbers=torch.tensor(atoms.get_atomic_numbers(), dtype=torch.long),
        natoms=natoms,
        energy=None if energy is None else float(energy),  # None: not stored (unlabelled input)
        forces=None if forces is None else torch.from_numpy(forces),
        tags=torch.from_numpy(structure_tags(atoms, tags, source)),
        fixed=torch.from_numpy(fixed),
        sid=sid,
        fid=fid,
        pbc=torch.tensor(np.asarray(atoms.pbc, dtype=bool)).view(1, 3),
    )
    if cutoff is not None:
        if max_neighbors is None:
            raise ConversionError("--cutoff needs --max-neighbors")
        graph = radius_graph_pbc(data.pos, data.cell, torch.tensor([natoms]), cutoff, max_neighbors, pbc=data.pbc)
        data.edge_index = graph.edge_index
        data.cell_offsets = graph.cell_offsets
        data.distances = graph.edge_distance
    return data


class LmdbWriter:
    """Write pickled ``Data`` entries under keys ``b"0"``, ``b"1"``, … and a ``b"length"`` key on close."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} already exists; refusing to overwrite it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # lock=False: a single writer, and no "-lock" side file next to the dataset.
        self._env = lmdb.open(str(self.path), subdir=False, map_size=MAP_SIZE, lock=False)
        self._txn = self._env.begin(write=True)
        self.count = 0

    def add(self, data: Data | bytes) -> None:
        """Append one entry (a ``Data``, or bytes already pickled by :func:`pickle_data`)."""
        raw = data if isinstance(data, bytes) else pickle_data(data)
        self._txn.put(str(self.count).encode("ascii"), raw)
        self.count += 1
        if self.count % COMMIT_EVERY == 0:
            self._txn.commit()
            self._txn = self._env.begin(write=True)

    def close(self) -> None:
        """Write the ``length`` key, commit and close."""
        if self._env is None:
            return
        self._txn.put(b"length", pickle.dumps(self.count, protocol=pickle.HIGHEST_PROTOCOL))
        self._txn.commit()
        self._env.sync()
        self._env.close()
        self._env = None

    def __enter__(self) -> LmdbWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None and self._env is not None:
            self._txn.abort()
            self._env.close()
            self._env = None
            return
        self.close()


def pickle_data(data: Data) -> bytes:
    """Serialise one entry as fairchem's writers do (plain pickle of a PyG ``Data``)."""
    return pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)


def shard_paths(output: str | Path, num_shards: int) -> list[Path]:
    """Files to write: ``output`` itself when it ends in ``.lmdb`` (one shard), else ``output/data.NNNN.lmdb``."""
    output = Path(output)
    if num_shards < 1:
        raise ValueError(f"--num-shards must be at least 1, got {num_shards}")
    if output.suffix == ".lmdb":
        if num_shards != 1:
            raise ValueError(f"{output}: a single .lmdb file holds one shard; give a directory for {num_shards} shards")
        return [output]
    return [output / f"data.{k:04d}.lmdb" for k in range(num_shards)]


#: An entry to write: a ``Data``, bytes from :func:`pickle_data`, or such bytes with the entry's atom count.
Entry = Union[Data, bytes, tuple[bytes, int]]


def write_lmdb_shards(
    entries: Iterable[Entry],
    total: int,
    output: str | Path,
    num_shards: int = 1,
    progress: bool = True,
    metadata: bool = False,
) -> list[Path]:
    """Write ``total`` entries into ``num_shards`` contiguous shards; returns the shard paths.

    Shard ``k`` holds entries ``[k*total//S, (k+1)*total//S)``, each shard keyed from 0.
    The files appear only when every entry was written (staged under a temporary name,
    then renamed). ``metadata=True`` also writes the atom counts (``metadata.npz``, see
    :mod:`escn_train.data.metadata`); it needs entries whose atom count is known
    (``Data`` or ``(bytes, natoms)``).
    """
    paths = shard_paths(output, num_shards)
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        natoms = _write_staged(entries, total, [staging / p.name for p in paths], output.name, progress)
        _move_into_place(staging, output, paths, natoms if metadata else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def _write_staged(entries: Iterable[Entry], total: int, paths: list[Path], name: str, progress: bool) -> np.ndarray | None:
    """Write the shards at ``paths``; the atom counts of the entries (None where one was plain bytes)."""
    bounds = [k * total // len(paths) for k in range(len(paths) + 1)]
    natoms = np.zeros(total, dtype=np.int32)
    known = True
    iterator = iter(entries)
    with tqdm(total=total, desc=f"writing {name}", unit="structure", disable=not progress) as bar:
        for shard, path in enumerate(paths):
            with LmdbWriter(path) as writer:
                for _ in range(bounds[shard + 1] - bounds[shard]):
                    try:
                        entry = next(iterator)
                    except StopIteration:
                        raise ValueError(f"expected {total} entries, got {writer.count + bounds[shard]}") from None
                    if isinstance(entry, tuple):
                        entry, natoms[bounds[shard] + writer.count] = entry
                    elif isinstance(entry, Data):
                        natoms[bounds[shard] + writer.count] = entry.natoms
                    else:
                        known = False
                    writer.add(entry)
                    bar.update()
    return natoms if known else None


def _move_into_place(staging: Path, output: Path, paths: list[Path], natoms: np.ndarray | None) -> None:
    """Rename the staged shards (and metadata for ``natoms``) to their final names."""
    if output.suffix == ".lmdb":
        os.replace(staging / output.name, output)
        if natoms is not None:
            write_metadata(metadata_target(output), natoms)
        return
    if not output.exists():  # a new shard directory appears in one rename
        if natoms is not None:
            write_metadata(staging / METADATA_NAME, natoms)
        os.rename(staging, output)
        return
    for path in paths:
        os.replace(staging / path.name, path)
    if natoms is None:
        return
    others = sorted(p.name for p in output.glob("*.lmdb") if p.is_file() and p not in paths)
    if others:
        warnings.warn(
            f"{output} also holds {', '.join(others)}: no {METADATA_NAME} written for the new shards alone "
            f"(build one for the whole directory with: escn-index {output} --force)",
            stacklevel=3,
        )
        return
    write_metadata(output / METADATA_NAME, natoms)


# ------------------------------------------------------------------------------------- reading inputs
@dataclass
class _Item:
    atoms: Any
    sid: int | str
    fid: int
    source: str


def read_structures(inputs: Sequence[str | Path], index: str = ":", sid_per_file: bool = False) -> list[_Item]:
    """Read every structure of every input with ASE, with its sid/fid and a name for errors."""
    import ase.io

    items: list[_Item] = []
    for file_number, name in enumerate(inputs):
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        try:
            frames = ase.io.read(str(path), index=index)
        except Exception as exc:
            raise ConversionError(f"cannot read {path} with ASE: {type(exc).__name__}: {exc}") from exc
        if not isinstance(frames, list):
            frames = [frames]
        if not frames:
            raise ConversionError(f"{path} holds no structures (index {index!r})")
        for frame, atoms in enumerate(frames):
            sid = _info_value(atoms, "sid")
            fid = _info_value(atoms, "fid")
            default_sid = file_number if sid_per_file else len(items)
            items.append(
                _Item(atoms, default_sid if sid is None else sid, frame if fid is None else int(fid), f"{path}, frame {frame}")
            )
    return items


_WORKER_OPTIONS: dict[str, Any] = {}


def _convert_item(item: _Item) -> tuple[bytes, int]:
    data = atoms_to_data(item.atoms, item.sid, item.fid, item.source, **_WORKER_OPTIONS)
    return pickle_data(data), data.natoms


def _init_worker(options: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    _WORKER_OPTIONS.clear()
    _WORKER_OPTIONS.update(options)


def check_tag_convention(items: Sequence[_Item], tags: str) -> None:
    """Validate ``tags``; under ``keep``, warn once when tags look like ``ase.build`` layer numbers."""
    if tags not in TAG_MODES:
        raise ValueError(f"--tags: unknown mode {tags!r}; choose from {', '.join(TAG_MODES)}")
    if tags == "keep":
        layered = [item.source for item in items if looks_like_ase_layer_tags(item.atoms)]
        if layered:
            warnings.warn(layer_tag_warning(len(layered), len(items), layered[0]), TagWarning, stacklevel=3)


def convert_structures(
    items: Sequence[_Item],
    output: str | Path,
    num_shards: int = 1,
    workers: int = 0,
    cutoff: float | None = None,
    max_neighbors: int | None = None,
    label_keys: LabelKeys = LabelKeys(),
    progress: bool = True,
    tags: str = "keep",
) -> list[Path]:
    """Convert already-read structures and write them; ``workers > 0`` converts in a process pool.

    ``tags``: see :mod:`escn_train.data.tags`; with ``keep`` a :class:`TagWarning` says how many
    structures carry tags that look like ``ase.build`` layer numbers."""
    if (cutoff is None) != (max_neighbors is None):
        raise ValueError("--cutoff and --max-neighbors must be given together")
    check_tag_convention(items, tags)
    options = {"cutoff": cutoff, "max_neighbors": max_neighbors, "label_keys": label_keys, "tags": tags}
    if workers <= 0:
        converted: Iterator[Data] = (atoms_to_data(it.atoms, it.sid, it.fid, it.source, **options) for it in items)
        return write_lmdb_shards(converted, len(items), output, num_shards, progress, metadata=True)
    context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(options,)) as pool:
        converted = pool.imap(_convert_item, items, chunksize=max(1, min(64, len(items) // (4 * workers) or 1)))
        return write_lmdb_shards(converted, len(items), output, num_shards, progress, metadata=True)


def convert_files(
    inputs: Sequence[str | Path],
    output: str | Path,
    num_shards: int = 1,
    workers: int = 0,
    cutoff: float | None = None,
    max_neighbors: int | None = None,
    index: str = ":",
    sid_per_file: bool = False,
    label_keys: LabelKeys = LabelKeys(),
    progress: bool = True,
    tags: str = "keep",
) -> list[Path]:
    """Read ``inputs`` with ASE and write them as OC20-style LMDB shards; returns the written files."""
    items = read_structures(inputs, index=index, sid_per_file=sid_per_file)
    return convert_structures(items, output, num_shards, workers, cutoff, max_neighbors, label_keys, progress, tags)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="escn-convert",
        description="Convert ASE-readable structures (extxyz, .traj, ASE db, ...) into OC20-style LMDBs.",
    )
    parser.add_argument("inputs", nargs="+", help="structure files readable by ase.io.read")
    parser.add_argument("-o", "--output", required=True, help="an .lmdb file (one shard) or a directory for shards")
    parser.add_argument("--num-shards", type=int, default=1, help="number of .lmdb shards (default 1)")
    parser.add_argument("--workers", type=int, default=0, help="conversion processes (default 0: in this process)")
    parser.add_argument("--cutoff", type=float, default=None, help="precompute a radius graph with this cutoff (Å)")
    parser.add_argument("--max-neighbors", type=int, default=None, help="neighbours kept per atom in that graph")
    parser.add_argument("--index", default=":", help="ASE index of the frames to read from each file (default ':')")
    parser.add_argument("--sid-per-file", action="store_true", help="default sid = input file number, not structure number")
    parser.add_argument("--energy-key", default="energy", help="atoms.info key used when there is no calculator energy")
    parser.add_argument("--forces-key", default="forces", help="atoms.arrays key used when there are no calculator forces")
    parser.add_argument(
        "--tags", choices=TAG_MODES, default="keep",
        help="keep: copy ASE's tags (warns when they look like ase.build layer numbers); oc20: derive OC20 tags "
        "(0 sub-surface = FixAtoms, 1 surface, 2 adsorbate) per structure (default keep)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``escn-convert``, ``python -m escn_train.data.convert``)."""
    args = build_parser().parse_args(argv)

    def show(message: Warning | str, *_: Any, **__: Any) -> None:
        print(f"escn-convert: warning: {message}", file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", TagWarning)
            warnings.showwarning = show
            paths = convert_files(
                args.inputs,
                args.output,
                num_shards=args.num_shards,
                workers=args.workers,
                cutoff=args.cutoff,
                max_neighbors=args.max_neighbors,
                index=args.index,
                sid_per_file=args.sid_per_file,
                label_keys=LabelKeys(args.energy_key, args.forces_key),
                progress=not args.no_progress,
                tags=args.tags,
            )
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"escn-convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} shard(s): {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
