"""Sanity checks of single structures read from a dataset, and the skip-mode marker.

:class:`SampleChecker` raises :class:`BadSampleError` naming the entry (file and key) and
what was expected, for: missing labels (``energy``/``forces`` when training), unknown
elements (atomic number outside ``1..max_num_elements-1``), non-finite positions, cell or
labels, overlapping atoms (closer than ``min_distance``, periodic images included) and
structures without any neighbour inside ``neighbor_cutoff``.

With ``skip_bad_samples`` the dataset returns a :class:`BadSample` marker instead of
raising; collation drops markers and records them on the batch (``batch.skipped``), and
the training module counts and logs them. A batch whose structures were all bad becomes a
:class:`SkippedBatch` (not ``None``), so the training step still runs on every rank (see
:meth:`escn_train.training.module.PotentialModule.training_step`).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch
from torch_geometric.data import Data

from escn_train.graph import SELF_DISTANCE_SQ, neighbor_pairs, radius_graph_pbc

#: Radius (Å) of the one neighbour search that serves the overlap and no-neighbour checks.
CHECK_SEARCH_RADIUS = 3.0


class BadSampleError(ValueError):
    """A structure that cannot be trained on; the message names file, key and problem."""


_DATA_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_DATA_ERROR_TYPES = (BadSampleError, KeyError, ValueError, TypeError, IndexError, OSError, pickle.UnpicklingError)


def data_error_message(err: BaseException) -> str | None:
    """The plain message of an error about the input data, or None for any other error.

    Data errors are those raised by this package (``escn_train/data``: paths, file format,
    entries, checks), whose messages name the file, key and what was expected; also when a
    DataLoader worker raised them (the message is taken from its original traceback). Used
    by ``train.py`` to print them without a traceback.
    """
    import lmdb

    text = str(err.args[0]) if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    if isinstance(err, RuntimeError) and text.startswith("DataLoader worker (pid") and (
        "killed by signal" in text or "exited unexpectedly" in text
    ):  # e.g. SIGBUS on a corrupt shard: the worker's crash report (stderr above) names shard and key
        return (
            f"{text.strip().rstrip('.')}. If it was reading an LMDB shard, the 'Fatal Python error' report above names the "
            "shard and key; run escn-check-data on the data to list every corrupt entry."
        )
    if not isinstance(err, (*_DATA_ERROR_TYPES, lmdb.Error)):
        return None
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        if _DATA_PACKAGE not in text:
            return None
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        name, _, message = last.partition(": ")
        return message.strip() or last
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_DATA_PACKAGE):
        return None
    return text


@dataclass
class BadSample:
    """Placeholder for an entry skipped in ``skip_bad_samples`` mode."""

    source: str
    reason: str
    natoms: int = 0


class SkippedBatch:
    """What collation returns when every structure of a batch was bad (``skip_bad_samples``).

    It carries the skipped entries (``skipped``) and an empty ``natoms`` so code that counts
    atoms per batch sees zero; it holds no structures (``num_graphs == 0``).
    """

    num_graphs = 0

    def __init__(self, skipped: list[str]) -> None:
        self.skipped = list(skipped)
        self.natoms = torch.zeros(0, dtype=torch.long)

    def __repr__(self) -> str:
        return f"SkippedBatch({len(self.skipped)} bad structures)"


class SampleChecker:
    """Checks one decoded structure (see the module docstring).

    Args:
        require_labels: ``energy`` and ``forces`` must be present (training/evaluation).
        max_num_elements: atomic numbers must lie in ``1..max_num_elements-1``.
        min_distance: smallest allowed interatomic distance in Å (None: no check).
        neighbor_cutoff: every structure needs at least one pair within this radius
            (the model's cutoff; None: no check).
    """

    def __init__(
        self,
        require_labels: bool = True,
        max_num_elements: int | None = 100,
        min_distance: float | None = 0.1,
        neighbor_cutoff: float | None = None,
    ) -> None:
        self.require_labels = require_labels
        self.max_num_elements = max_num_elements
        self.min_distance = min_distance
        self.neighbor_cutoff = neighbor_cutoff

    def __call__(self, data: Data, source: str) -> None:
        """Raise :class:`BadSampleError` when ``data`` (read from ``source``) is unusable."""
        present = sorted(data.keys())
        if self.require_labels:
            for name in ("energy", "forces"):
                if name not in data:
                    raise BadSampleError(
                        f"{source}: entry has no '{name}' label (fields present: {present}); training and "
                        "evaluation need energy and forces (pass key_mapping if the file names them differently)"
                    )
        z = data.atomic_numbers
        if self.max_num_elements is not None and z.numel():
            bad = (z < 1) | (z >= self.max_num_elements)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise BadSampleError(
                    f"{source}: atom {i} has atomic number {int(z[i])}, outside 1..{self.max_num_elements - 1} "
                    f"(model/data max_num_elements={self.max_num_elements})"
                )
        for name in ("pos", "cell", "forces"):
            if name in data and not bool(torch.isfinite(data[name]).all()):
                raise BadSampleError(f"{source}: field '{name}' holds NaN or infinite values")
        if "energy" in data and not torch.isfinite(torch.as_tensor(float(data.energy))):
            raise BadSampleError(f"{source}: energy is {data.energy}")
        if data.natoms == 0:
            raise BadSampleError(f"{source}: structure has no atoms")
        self._check_geometry(data, source)

    def _check_geometry(self, data: Data, source: str) -> None:
        """Overlap and no-neighbour checks from the cell-list search: O(N), images included.

        One search at a few Å serves both checks: a cell list's cost grows with the number of
        its bins, (volume / radius^3), so searching at ``min_distance`` itself (0.1 Å) would cost
        ~20 ms for an 80-atom slab with vacuum. Only a structure with no pair within that radius
        is searched again at the full ``neighbor_cutoff`` (through the graph builder, exactly).
        """
        pbc = data.pbc.reshape(1, 3) if "pbc" in data else torch.ones(1, 3, dtype=torch.bool)
        natoms = torch.tensor([data.pos.shape[0]])
        if data.pos.shape[0] == 0 or (self.min_distance is None and self.neighbor_cutoff is None):
            return
        radius = min(CHECK_SEARCH_RADIUS, self.neighbor_cutoff or CHECK_SEARCH_RADIUS)
        radius = max(radius, self.min_distance or 0.0)
        try:
            pairs = neighbor_pairs(data.pos, data.cell, natoms, radius, pbc, with_distances=True)
            if self.min_distance is not None:
                self._check_overlap(pairs, source)
            if self.neighbor_cutoff is not None:
                distance = pairs[3]
                near = (distance * distance > SELF_DISTANCE_SQ) & (distance <= self.neighbor_cutoff)
                if not bool(near.any()):
                    graph = radius_graph_pbc(data.pos, data.cell, natoms, self.neighbor_cutoff, 1, pbc=pbc)
                    if graph.edge_index.shape[1] == 0:
                        raise BadSampleError(
                            f"{source}: no two atoms are within the cutoff of {self.neighbor_cutoff} Å "
                            "(the structure has no edges; the model cannot use it)"
                        )
        except BadSampleError:
            raise
        except ValueError as err:  # e.g. a singular cell that is marked periodic
            raise BadSampleError(f"{source}: {err}") from None

    def _check_overlap(self, pairs: tuple[torch.Tensor, ...], source: str) -> None:
        """Raise when two atoms, or an atom and a periodic image, are closer than ``min_distance``."""
        target, other, shift, distance = pairs
        close = distance < self.min_distance
        direct = close & (shift == 0).all(dim=-1)
        if bool(direct.any()):
            # The closest pair; among equally close ones the lowest (i, j) with i < j.
            pair = direct & (target < other)
            closest, i, j = min(zip(distance[pair].tolist(), target[pair].tolist(), other[pair].tolist()))
            raise BadSampleError(
                f"{source}: atoms {i} and {j} are {closest:.3f} Å apart "
                f"(overlapping; minimum {self.min_distance} Å)"
            )
        if bool(close.any()):
            # The lowest-numbered atom with a close image, and the atom of its nearest image.
            i, _, j = min(zip(target[close].tolist(), distance[close].tolist(), other[close].tolist()))
            raise BadSampleError(
                f"{source}: atom {i} is closer than {self.min_distance} Å to a periodic "
                f"image of atom {j} (overlapping atoms)"
            )
