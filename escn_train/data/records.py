"""Turn the fields of one OC20-style entry into a ``Data`` with the project's names and dtypes.

Files in the wild differ in names (``y``/``energy``, ``force``/``forces``) and dtypes
(``atomic_numbers`` as uint8 or float, ``fixed`` as int32, energies as numpy scalars).
Everything downstream (collation, statistics, the model) sees one layout:

=================  ===================  =====================================
field              dtype                shape
=================  ===================  =====================================
``pos``            float32              [N, 3]
``cell``           float32              [1, 3, 3]
``atomic_numbers`` int64                [N]
``natoms``         Python int           scalar
``energy``         Python float         scalar (when present)
``forces``         float32              [N, 3] (when present)
``tags``/``fixed`` int64                [N] (when present)
``sid``/``fid``    Python int (or str)  scalar (when present)
``edge_index``     int64                [2, E] (when present)
``cell_offsets``   int64                [E, 3] (when present)
``distances``      float32              [E] (when present)
``pbc``            bool                 [1, 3] (when present)
=================  ===================  =====================================

Other fields are kept as they are (numpy arrays become tensors); nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Data

_PER_ATOM_FLOAT = {"pos": 3, "forces": 3}
_PER_ATOM_LONG = ("atomic_numbers", "tags", "fixed")
_SCALARS = ("natoms", "energy", "sid", "fid", "nedges")


def _to_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):
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
    fields = {k: _to_tensor(v) for k, v in fields.items() if v is not None}
    for required in ("pos", "atomic_numbers", "cell"):
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

    num_atoms = int(torch.as_tensor(fields["pos"]).reshape(-1, 3).shape[0])
    for name, width in _PER_ATOM_FLOAT.items():
        if name in fields:
            fields[name] = _per_atom(fields[name], name, num_atoms, source, torch.float32).reshape(num_atoms, width)
    for name in _PER_ATOM_LONG:
        if name in fields:
            fields[name] = _per_atom(fields[name], name, num_atoms, source, torch.long).reshape(num_atoms)
    natoms = int(fields.get("natoms", num_atoms))
    if natoms != num_atoms:
        raise ValueError(f"{source}: natoms={natoms} but pos has {num_atoms} rows")
    fields["natoms"] = natoms

    cell = torch.as_tensor(fields["cell"])
    if cell.numel() != 9:
        raise ValueError(f"{source}: field 'cell' should hold 3x3 values, got shape {tuple(cell.shape)}")
    fields["cell"] = cell.to(torch.float32).reshape(1, 3, 3)
    if "pbc" in fields:
        pbc = torch.as_tensor(fields["pbc"]).to(torch.bool).reshape(-1)
        fields["pbc"] = (pbc.expand(3) if pbc.numel() == 1 else pbc).reshape(1, 3)

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


def _per_atom(value: Any, name: str, num_atoms: int, source: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() == 0 or tensor.shape[0] != num_atoms:
        raise ValueError(
            f"{source}: field '{name}' has shape {tuple(tensor.shape)}, expected {num_atoms} rows (one per atom)"
        )
    if dtype == torch.long and tensor.is_floating_point():
        tensor = tensor.round()
    return tensor.to(dtype)
