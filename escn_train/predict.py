"""escn-predict: energies and forces of many structures with a trained eSCN.

Model: an escn-train checkpoint (``.ckpt``; also a fairchem/OCP eSCN checkpoint), or a
``.pt2`` exported program / ``.aoti.pt2`` AOTInductor package from ``escn-export``.
Inputs: OC20-style LMDBs (a ``.lmdb`` file or a directory of shards; ``--key-mapping`` for
renamed fields) and/or ASE-readable files (extxyz, .traj, ASE db, ...). The graph is always
built from the positions with the model's cutoff and neighbour limit (precomputed LMDB
edges are ignored, since they may come from another cutoff).

Output: an ``.npz`` laid out like fairchem's S2EF prediction files (the ones
``make_submission_file.py`` combines for EvalAI)::

    ids        [B]     str    "sid_fid" when the structure has both, "sid" with only a sid,
                              else its running index over all inputs
    energy     [B]            eV
    forces     [M, 3]         eV/Å, all structures' atoms concatenated (M = Σ N, or Σ free
                              atoms with --forces free, as EvalAI expects for OC20)
    chunk_idx  [B - 1] int64  cumulative atom counts without the last: np.split(forces, chunk_idx)
                              gives one array per structure

Rows keep the input order (fairchem additionally sorts by id after gathering from several
GPUs). ``--extxyz`` also writes every structure with its predictions attached through a
``SinglePointCalculator``.

Example::

    escn-predict model.ckpt data/oc20/s2ef/all/val_id -o val_id_preds.npz --key-mapping y=energy,force=forces
    escn-predict deploy/escn.aoti.pt2 relax.traj -o preds.npz --extxyz preds.xyz --device cuda --trust-exported

Exported programs and AOTInductor packages are code, so they load only with
``--trust-exported``; checkpoints are data.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch_geometric.data import Data
from tqdm import tqdm

from escn_train.data.collate import collate_structures
from escn_train.data.convert import ConversionError, atoms_to_data
from escn_train.data.lmdb_dataset import LmdbDataset
from escn_train.inference.loading import Predictor, load_predictor


@dataclass
class Structure:
    """One input structure: the fields the model needs, its id, and (ASE inputs) its Atoms."""

    data: Data
    id: str
    atoms: Any = None


def parse_key_mapping(text: str | None) -> dict[str, str]:
    """``"y=energy,force=forces"`` or a JSON object -> ``{"y": "energy", "force": "forces"}``."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        mapping = json.loads(text)
    else:
        mapping = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            if "=" not in item:
                raise ValueError(f"--key-mapping: expected OLD=NEW pairs separated by commas, got {item!r}")
            old, new = (s.strip() for s in item.split("=", 1))
            mapping[old] = new
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"--key-mapping: names must be strings, got {mapping}")
    return mapping


def structure_id(sid: Any, fid: Any, index: int) -> str:
    """fairchem's naming: ``"sid_fid"``, ``"sid"`` or, without ids, the running index."""
    if sid is None:
        return str(index)
    return f"{sid}_{fid}" if fid is not None else f"{sid}"


def _model_fields(data: Data) -> Data:
    """Only what prediction needs, with the same fields for every structure (so any mix collates)."""
    natoms = int(data.natoms) if getattr(data, "natoms", None) is not None else data.pos.shape[0]
    pbc = getattr(data, "pbc", None)
    fixed = getattr(data, "fixed", None)
    return Data(
        pos=data.pos.float(),
        cell=data.cell.float().view(1, 3, 3),
        atomic_numbers=data.atomic_numbers.long().view(-1),
        natoms=natoms,
        pbc=torch.ones(1, 3, dtype=torch.bool) if pbc is None else pbc.bool().view(1, 3),
        fixed=torch.zeros(natoms, dtype=torch.long) if fixed is None else fixed.long().view(-1),
    )


def is_lmdb(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".lmdb"


def open_inputs(
    paths: Sequence[Path], key_mapping: dict[str, str] | None = None, index: str = ":"
) -> list[tuple[Path, Any]]:
    """``(path, LmdbDataset or list of Atoms)`` per input; ASE files are read here, once."""
    import ase.io

    sources: list[tuple[Path, Any]] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        if is_lmdb(path):
            sources.append((path, LmdbDataset(path, key_mapping=key_mapping)))
            continue
        try:
            frames = ase.io.read(str(path), index=index)
        except Exception as exc:
            raise ValueError(f"cannot read {path} with ASE: {type(exc).__name__}: {exc}") from exc
        frames = frames if isinstance(frames, list) else [frames]
        if not frames:
            raise ValueError(f"{path} holds no structures (index {index!r})")
        sources.append((path, frames))
    return sources


def iter_structures(sources: Sequence[tuple[Path, Any]], chunk: int = 64) -> Iterator[Structure]:
    """Every structure of every input (from :func:`open_inputs`), in order."""
    running = 0
    for path, source in sources:
        if isinstance(source, LmdbDataset):
            for start in range(0, len(source), chunk):
                for data in source.get_many(range(start, min(start + chunk, len(source)))):
                    yield Structure(_model_fields(data), structure_id(data.get("sid"), data.get("fid"), running))
                    running += 1
            continue
        for frame, atoms in enumerate(source):
            try:
                data = atoms_to_data(atoms, 0, 0, f"{path}, frame {frame}", require_labels=False, require_cell=False)
            except ConversionError as exc:
                raise ValueError(str(exc)) from exc
            yield Structure(_model_fields(data), structure_id(atoms.info.get("sid"), atoms.info.get("fid"), running), atoms)
            running += 1


def predict_batches(
    predictor: Predictor, structures: Iterator[Structure], batch_size: int
) -> Iterator[tuple[list[Structure], np.ndarray, list[np.ndarray]]]:
    """``(structures, energies [b], per-structure forces)`` per batch of ``batch_size`` structures."""
    pending: list[Structure] = []

    def run(group: list[Structure]):
        batch = collate_structures([s.data for s in group])
        energy, forces = predictor.predict(batch)
        split = torch.split(forces.cpu(), batch.natoms.tolist())
        return group, energy.cpu().numpy(), [f.numpy() for f in split]

    for structure in structures:
        pending.append(structure)
        if len(pending) == batch_size:
            yield run(pending)
            pending = []
    if pending:
        yield run(pending)


def write_npz(
    path: Path,
    ids: list[str],
    energies: list[float],
    forces: list[np.ndarray],
    fixed: list[np.ndarray],
    free_only: bool = False,
    dtype: str = "float32",
) -> None:
    """The S2EF-style prediction file (see module docstring)."""
    if free_only:
        forces = [f[m == 0] for f, m in zip(forces, fixed)]
    counts = np.array([len(f) for f in forces], dtype=np.int64)
    np.savez_compressed(
        path,
        ids=np.array(ids),
        energy=np.asarray(energies, dtype=dtype),
        forces=(np.concatenate(forces) if forces else np.zeros((0, 3))).astype(dtype),
        chunk_idx=np.cumsum(counts)[:-1],
    )


def structure_atoms(structure: Structure, energy: float, forces: np.ndarray):
    """ASE Atoms of a structure with its predictions attached (input Atoms kept when there are some)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    if structure.atoms is not None:
        atoms = structure.atoms.copy()
    else:
        d = structure.data
        atoms = Atoms(
            numbers=d.atomic_numbers.numpy(),
            positions=d.pos.double().numpy(),
            cell=d.cell.view(3, 3).double().numpy(),
            pbc=d.pbc.view(3).numpy(),
        )
        fixed = np.flatnonzero(d.fixed.numpy())
        if fixed.size:
            atoms.set_constraint(FixAtoms(indices=fixed))
        atoms.info["id"] = structure.id
    atoms.calc = SinglePointCalculator(atoms, energy=float(energy), forces=forces.astype(np.float64))
    return atoms


def predict_files(
    model: str | Path,
    inputs: Sequence[str | Path],
    output: str | Path,
    key_mapping: dict[str, str] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    use_ema: bool = True,
    extxyz: str | Path | None = None,
    index: str = ":",
    free_only: bool = False,
    dtype: str = "float32",
    progress: bool = True,
    trusted: bool = False,
) -> dict[str, Any]:
    """Predict every input structure and write the npz (and extxyz); returns a short summary."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    output = Path(output)
    if output.suffix != ".npz":
        output = output.with_name(output.name + ".npz")
    sources = open_inputs([Path(p) for p in inputs], key_mapping, index)
    total = sum(len(source) for _, source in sources)
    predictor = load_predictor(model, device, use_ema, trusted)
    ids: list[str] = []
    energies: list[float] = []
    forces: list[np.ndarray] = []
    fixed: list[np.ndarray] = []
    writer = None
    if extxyz is not None:
        import ase.io

        Path(extxyz).parent.mkdir(parents=True, exist_ok=True)
        writer = open(extxyz, "w")
    started = time.perf_counter()
    num_atoms = 0
    try:
        with tqdm(total=total, unit="structure", desc="predicting", disable=not progress) as bar:
            for group, energy, per_structure in predict_batches(
                predictor, iter_structures(sources), batch_size
            ):
                for structure, e, f in zip(group, energy, per_structure):
                    ids.append(structure.id)
                    energies.append(float(e))
                    forces.append(f)
                    fixed.append(structure.data.fixed.numpy())
                    num_atoms += f.shape[0]
                    if writer is not None:
                        ase.io.write(writer, structure_atoms(structure, e, f), format="extxyz")
                bar.update(len(group))
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    write_npz(output, ids, energies, forces, fixed, free_only, dtype)
    return {
        "structures": len(ids),
        "atoms": num_atoms,
        "seconds": elapsed,
        "output": str(output),
        "model": predictor.kind,
        "device": str(predictor.device),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="escn-predict",
        description="Predict energies (eV) and forces (eV/Å) with a trained eSCN; writes an S2EF-style npz.",
    )
    parser.add_argument("model", help="checkpoint (.ckpt), exported program (.pt2) or AOTInductor package (.aoti.pt2)")
    parser.add_argument("inputs", nargs="+", help="LMDB files/shard directories and/or ASE-readable structure files")
    parser.add_argument("-o", "--output", required=True, help="predictions file (.npz)")
    parser.add_argument("--key-mapping", default=None, help="LMDB field renames, e.g. y=energy,force=forces (or JSON)")
    parser.add_argument("--batch-size", type=int, default=16, help="structures per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")
    parser.add_argument("--no-ema", action="store_true", help="checkpoints: use the raw instead of the EMA weights")
    parser.add_argument("--extxyz", default=None, help="also write the structures with their predictions here")
    parser.add_argument("--index", default=":", help="ASE index of the frames to read from ASE files (default ':')")
    parser.add_argument(
        "--forces", choices=["all", "free"], default="all",
        help="forces of all atoms (default) or of free atoms only (fixed == 0), as OC20's EvalAI expects",
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "float64"], default="float32",
                        help="precision of energies/forces in the npz (fairchem's default is float16)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--trust-exported", action="store_true",
        help="allow loading a .pt2 exported program or AOTInductor package: these are code, so only for "
        "files from a source you trust (checkpoints are data and need no flag)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``escn-predict``, ``python -m escn_train.predict``)."""
    args = build_parser().parse_args(argv)
    try:
        result = predict_files(
            args.model,
            args.inputs,
            args.output,
            key_mapping=parse_key_mapping(args.key_mapping),
            batch_size=args.batch_size,
            device=args.device,
            use_ema=not args.no_ema,
            extxyz=args.extxyz,
            index=args.index,
            free_only=args.forces == "free",
            dtype=args.dtype,
            progress=not args.no_progress,
            trusted=args.trust_exported,
        )
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError, lmdb.Error) as exc:
        print(f"escn-predict: error: {exc}", file=sys.stderr)
        return 2
    rate = result["structures"] / max(result["seconds"], 1e-9)
    print(
        f"predicted {result['structures']} structures ({result['atoms']} atoms) with the {result['model']} on "
        f"{result['device']} in {result['seconds']:.1f} s ({rate:.1f} structures/s); wrote {result['output']}"
        + (f" and {args.extxyz}" if args.extxyz else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
