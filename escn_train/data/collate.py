"""Collate structures into one ``torch_geometric.data.Batch``.

A batch carries a graph only when every structure in it has one (``edge_index`` and
``cell_offsets``); otherwise the edge fields are removed from all of them and the model
builds the graph for the whole batch. Any other difference in fields between structures
is an error naming the fields, because PyG would otherwise collate them silently wrong.

Resulting shapes: ``pos [N, 3]``, ``cell [B, 3, 3]``, ``atomic_numbers [N]`` (long),
``natoms [B]`` (long), ``batch [N]``, ``energy [B]``, ``forces [N, 3]``, ``tags``/``fixed``
``[N]``, ``sid``/``fid`` ``[B]``, ``pbc [B, 3]`` (bool, when stored), ``edge_index [2, E]``
(offset per structure) and ``cell_offsets [E, 3]`` when present. When some structures
store ``pbc`` and others do not (molecules, which always get pbc false, next to OC20
crystals), those without it get the documented default, periodic in all three directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch_geometric.data import Batch, Data

from escn_train.data.checks import BadSample, SkippedBatch
from escn_train.data.graph_selection import has_edges, strip_edges


def collate_structures(data_list: Sequence[Data | BadSample]) -> Batch | SkippedBatch:
    """Batch normalised structures (see the module docstring).

    :class:`~escn_train.data.checks.BadSample` markers (``skip_bad_samples``) are dropped and
    listed in ``batch.skipped``; a batch of markers only becomes a
    :class:`~escn_train.data.checks.SkippedBatch` (the step contributes nothing).
    """
    if not data_list:
        raise ValueError("cannot collate an empty list of structures")
    skipped = [d.source for d in data_list if isinstance(d, BadSample)]
    if skipped:
        data_list = [d for d in data_list if not isinstance(d, BadSample)]
        if not data_list:
            return SkippedBatch(skipped)
        batch = collate_structures(data_list)
        batch.skipped = skipped
        return batch
    if not all(has_edges(d) for d in data_list):
        for data in data_list:
            strip_edges(data)
    if any("pbc" in d for d in data_list):
        for data in data_list:
            if "pbc" not in data:  # not stored: periodic in all three directions (the OC20 convention)
                data.pbc = torch.ones(1, 3, dtype=torch.bool)
    keys = set(data_list[0].keys())
    for data in data_list[1:]:
        other = set(data.keys())
        if other != keys:
            raise ValueError(
                "structures in one batch carry different fields: "
                f"sid={data_list[0].get('sid')} has {sorted(keys - other)} that sid={data.get('sid')} lacks, "
                f"which has {sorted(other - keys)} that the first lacks"
            )
    return Batch.from_data_list(list(data_list))
