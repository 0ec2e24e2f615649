"""Turn the fields of one OC20-style entry into a ``Data`` with the project's names and dtypes.

Files in the wild differ in names (``y``/``energy``, ``force``/``forces``) and dtypes
(``atomic_numbers`` as uint8 or float, ``fixed`` as int32, energies as numpy scalars).
Everything downstream (collation, statistics, the model) sees one layout:

=================  ===================  =====================================
field              dtype                shape
=================  ===================  =====================================
``pos``            float32              [N, 3]
``cell``           float32              [1, 3, 3] (zeros when not stored)
``atomic_numbers`` int64                [N]
``natoms``         Python int           scalar
``energy``         Python float         scalar (when present)
``forces``         float32              [N, 3] (when present)
``tags``/``fixed`` int64                [N] (when present)
``sid``/``fid``    Python int (or str)  scalar (when present)
``edge_index``     int64                [2, E] (when present)
``cell_offsets``   int64                [E, 3] (when present)
``distances``      float32              [E] (when present)
``pbc``            bool                 [1, 3] (when present; false without a cell)
=================  ===================  =====================================

Other fields are kept as they are (numpy arrays become tensors); nothing is dropped.

Nothing is altered silently either: integer fields stored as floats must hold whole numbers
(29.0 is read as 29, 29.4 is an error), per-atom vectors must be [N, 3], numpy arrays must
be numeric, and a cell must span every periodic direction. An entry without a ``cell`` is a
non-periodic structure (a molecule): it gets a zero cell and ``pbc`` false, as ASE writes
them. A missing ``pbc`` means periodic in all three directions (the OC20 convention).
Errors name the entry (file and key), the field and what was expected, in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Data

_PER_ATOM_FLOAT = {"pos": 3, "forces": 3}
_PER_ATOM_LONG = ("atomic_numbers", "tags", "fixed")
_SCALARS = ("natoms", "energy", "sid", "fid", "nedges")


#: What each known field should hold, for error messages.
_EXPECTED = {
    "pos": "float [N, 3]", "forces": "float [N, 3]", "cell": "float [3, 3]", "atomic_numbers": "integers [N]",
    "tags": "integers [N]", "fixed": "integers [N]", "pbc": "booleans [3]", "edge_index": "integers [2, E]",
    "cell_offsets": "integers [E, 3]", "distances": "float [E]",
}
#: numpy kinds torch can hold: bool, signed/unsigned integers, floats, complex.
_NUMERIC_KINDS = frozenset("biufc")
#: Smallest volume (area, length) the cell may span along its periodic directions, in Å^k.
_MIN_PERIODIC_VOLUME = 1e-9


def _to_tensor(value: Any, name: str, source: str) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _NUMERIC_KINDS:
            what = "Python objects" if value.dtype.kind == "O" else "non-numbers"
            raise ValueError(
                f"{source}: field '{name}' is a numpy array of {what} (dtype {value.dtype}, shape {value.shape}); "
                f"expected a numeric array ({_EXPECTED.get(name, 'numbers')})"
            )
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def _to_scalar(value: Any, name: str, source: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return value.reshape(-1)[0].item()
        raise ValueError(f"{source}: field '{name}' should be a scalar, got shape {tuple(value.shape)}")
    if isinstance(value, np.generic):
        return value.item()
    return value


def apply_key_mapping(fields: dict[str, Any], key_mapping: Mapping[str, str] | None, source: str) -> dict[str, Any]:
    """Rename fields (``{"y": "energy", "force": "forces"}``); a clash with an existing field is an error."""
    if not key_mapping:
        return fields
    out = dict(fields)
    for old, new in key_mapping.items():
        if old == new or old not in out:
            continue
        if new in fields:
            raise ValueError(
                f"{source}: key_mapping renames '{old}' to '{new}', but the entry already has '{new}'"
            )
        out[new] = out.pop(old)
    return out


def fields_to_data(fields: dict[str, Any], source: str) -> Data:
    """Normalise names-already-mapped ``fields`` into a :class:`Data`; ``source`` names the entry in errors."""
    fields = {k: _to_tensor(v, k, source) for k, v in fields.items() if v is not None}
    for required in ("pos", "atomic_numbers"):
        if required not in fields:
            raise KeyError(
                f"{source}: entry has no '{required}' field (fields present: {sorted(fields)}); "
                "pass key_mapping if the file names it differently"
            )
    for name in _SCALARS:
        if name in fields:
            fields[name] = _to_scalar(fields[name], name, source)
    if "energy" in fields:
        fields["energy"] = float(fields["energy"])
    for name in ("sid", "fid"):
        if isinstance(fields.get(name), float) and float(fields[name]).is_integer():
            fields[name] = int(fields[name])

    pos = torch.as_tensor(fields["pos"])
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"{source}: field 'pos' has shape {tuple(pos.shape)}, expected (N, 3): one row per atom")
    num_atoms = int(pos.shape[0])
    for name, width in _PER_ATOM_FLOAT.items():
        if name in fields:
            fields[name] = _per_atom(fields[name], name, (num_atoms, width), source, torch.float32)
    for name in _PER_ATOM_LONG:
        if name in fields:
            fields[name] = _per_atom(fields[name], name, (num_atoms,), source, torch.long)
    natoms = int(fields.get("natoms", num_atoms))
    if natoms != num_atoms:
        raise ValueError(f"{source}: natoms={natoms} but pos has {num_atoms} rows")
    fields["natoms"] = natoms

    if "pbc" in fields:
        pbc = torch.as_tensor(fields["pbc"]).to(torch.bool).reshape(-1)
        if pbc.numel() not in (1, 3):
            raise ValueError(f"{source}: field 'pbc' has {pbc.numel()} values, expected 1 or 3 booleans")
        fields["pbc"] = (pbc.expand(3) if pbc.numel() == 1 else pbc).reshape(1, 3)
    if "cell" in fields:
        cell = torch.as_tensor(fields["cell"])
        if cell.numel() != 9:
            raise ValueError(f"{source}: field 'cell' should hold 3x3 values, got shape {tuple(cell.shape)}")
        fields["cell"] = cell.to(torch.float32).reshape(1, 3, 3)
        check_cell(fields["cell"], fields.get("pbc"), source)
    else:  # a molecule: no cell, not periodic
        if bool(fields.get("pbc", torch.zeros(1, dtype=torch.bool)).any()):
            raise ValueError(
                f"{source}: entry has no 'cell' field but pbc is {fields['pbc'].reshape(3).tolist()}; expected a "
                "3x3 'cell' for a periodic structure (or pbc false for a molecule)"
            )
        fields["cell"] = torch.zeros(1, 3, 3)
        fields["pbc"] = torch.zeros(1, 3, dtype=torch.bool)

    if "edge_index" in fields:
        edge_index = torch.as_tensor(fields["edge_index"]).to(torch.long)
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"{source}: field 'edge_index' should be [2, E], got {tuple(edge_index.shape)}")
        if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_atoms):
            raise ValueError(f"{source}: field 'edge_index' refers to atoms outside 0..{num_atoms - 1}")
        fields["edge_index"] = edge_index
        if "cell_offsets" in fields:
            offsets = torch.as_tensor(fields["cell_offsets"])
            offsets = offsets.round().to(torch.long) if offsets.is_floating_point() else offsets.to(torch.long)
            if offsets.shape != (edge_index.shape[1], 3):
                raise ValueError(
                    f"{source}: field 'cell_offsets' has shape {tuple(offsets.shape)}, "
                    f"expected ({edge_index.shape[1]}, 3) to match edge_index"
                )
            fields["cell_offsets"] = offsets
    if "distances" in fields:
        fields["distances"] = torch.as_tensor(fields["distances"]).to(torch.float32).reshape(-1)
    return Data(**fields)


def check_cell(cell: torch.Tensor, pbc: torch.Tensor | None, source: str) -> None:
    """Refuse a ``cell`` [1, 3, 3] whose vectors along the periodic directions do not span them.

    Periodic directions are those of ``pbc`` [1, 3] (``None``: all three). A molecule or slab
    may have zero vectors along its non-periodic directions; a periodic direction needs a
    cell vector independent of the other periodic ones (non-zero volume, area or length).
    """
    periodic = [True, True, True] if pbc is None else pbc.reshape(3).tolist()
    rows = cell.reshape(3, 3).tolist()  # Python floats: a 3x3 is cheaper here than tensor ops
    if _spanned_volume([row for row, p in zip(rows, periodic) if p]) >= _MIN_PERIODIC_VOLUME:
        return
    where = "not stored, so periodic in all three directions" if pbc is None else str(periodic)
    rows = [[round(x, 6) for x in row] for row in rows]
    raise ValueError(
        f"{source}: field 'cell' is singular ({rows}) but pbc is {where}; expected linearly independent cell "
        "vectors along the periodic directions (for a molecule store pbc false, or no cell)"
    )


def _spanned_volume(vectors: list[list[float]]) -> float:
    """Volume (3 vectors), area (2) or length (1) spanned by 3-vectors; inf for none."""
    if not vectors:
        return math.inf
    if len(vectors) == 1:
        return math.sqrt(sum(x * x for x in vectors[0]))
    (a1, a2, a3), (b1, b2, b3) = vectors[0], vectors[1]
    cross = (a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1)
    if len(vectors) == 2:
        return math.sqrt(sum(x * x for x in cross))
    return abs(sum(c * x for c, x in zip(cross, vectors[2])))


def _per_atom(value: Any, name: str, shape: tuple[int, ...], source: str, dtype: torch.dtype) -> torch.Tensor:
    """``value`` as a ``dtype`` tensor of exactly ``shape``; integers stored as floats must be whole numbers."""
    tensor = torch.as_tensor(value)
    if tuple(tensor.shape) != shape:
        rows = "one row per atom" if len(shape) == 2 else "one value per atom"
        raise ValueError(f"{source}: field '{name}' has shape {tuple(tensor.shape)}, expected {shape} ({rows})")
    if dtype == torch.long and tensor.is_floating_point():
        fractional = tensor != tensor.round()  # NaN counts as fractional
        if bool(fractional.any()):
            atom = int(fractional.nonzero()[0, 0])
            raise ValueError(
                f"{source}: field '{name}' holds {float(tensor[atom]):g} at atom {atom}; expected whole numbers "
                "(integers stored as floats, such as 29.0, are fine)"
            )
    return tensor.to(dtype)
