"""Which graph a structure carries into the model: precomputed, built in the loader, or none.

The model (``forward_trainable``) uses ``batch.edge_index`` + ``batch.cell_offsets`` when
both are present and builds the radius graph itself otherwise. This module decides, per
sample, which of those it gets:

* precomputed edges from the file are kept only when allowed (``use_precomputed_edges``)
  and consistent with the stored positions (checked against a stored ``distances`` field);
* otherwise they are stripped, and, when ``cutoff``/``max_neighbors`` are given, the graph
  is built here with :func:`escn_train.graph.radius_graph_pbc`, so DataLoader workers can
  build graphs while the main process trains.
"""

from __future__ import annotations

import torch
from torch_geometric.data import Data

from escn_train.graph import edge_vectors, radius_graph_pbc

#: Fields that describe a precomputed graph; removed together when edges are not used.
EDGE_FIELDS = ("edge_index", "cell_offsets", "distances", "edge_distance_vec", "nedges", "neighbors")

#: Largest disagreement (Å) between a stored ``distances`` value and the one recomputed from
#: ``pos``, ``cell`` and ``cell_offsets`` that still counts as the same edge (float32 files).
EDGE_DISTANCE_TOLERANCE = 1e-3


def has_edges(data: Data) -> bool:
    """True when ``data`` carries a usable graph (``edge_index`` and ``cell_offsets``)."""
    return "edge_index" in data and "cell_offsets" in data


def strip_edges(data: Data) -> Data:
    """Remove every precomputed-graph field from ``data`` (in place) and return it."""
    for name in EDGE_FIELDS:
        if name in data:
            del data[name]
    return data


def edge_distance_error(data: Data) -> tuple[int, float]:
    """(edges whose stored ``distances`` disagree with the positions, largest disagreement in Å).

    Some published files carry ``cell_offsets`` computed for differently wrapped positions
    than the stored ``pos``; using them would feed the model edges of the wrong length.
    Returns ``(0, 0.0)`` when there is nothing to compare against.
    """
    if not has_edges(data) or "distances" not in data or data.edge_index.shape[1] == 0:
        return 0, 0.0
    batch = torch.zeros(data.pos.shape[0], dtype=torch.long)
    distance, _ = edge_vectors(data.pos, data.cell, batch, data.edge_index, data.cell_offsets)
    error = (distance - data.distances).abs()
    bad = error > EDGE_DISTANCE_TOLERANCE
    return int(bad.sum()), float(error.max())


def build_graph(data: Data, cutoff: float, max_neighbors: int) -> Data:
    """Add ``edge_index`` and ``cell_offsets`` of the radius graph of one structure (in place)."""
    pbc = data.pbc if "pbc" in data else None
    graph = radius_graph_pbc(
        data.pos, data.cell, torch.tensor([data.pos.shape[0]]), cutoff, max_neighbors, pbc=pbc
    )
    data.edge_index = graph.edge_index
    data.cell_offsets = graph.cell_offsets
    return data


class GraphSelection:
    """Per-sample transform applying the graph policy described in the module docstring.

    Args:
        use_precomputed_edges: keep edges stored in the file (when present and consistent).
        cutoff: when set (with ``max_neighbors``), build the graph for samples left without one.
        max_neighbors: neighbours kept per atom by the graph built here.
    """

    def __init__(
        self, use_precomputed_edges: bool = False, cutoff: float | None = None, max_neighbors: int | None = None
    ) -> None:
        if (cutoff is None) != (max_neighbors is None):
            raise ValueError(
                f"graph_cutoff ({cutoff}) and graph_max_neighbors ({max_neighbors}) must be set together"
            )
        self.use_precomputed_edges = use_precomputed_edges
        self.cutoff = cutoff
        self.max_neighbors = max_neighbors

    def __call__(self, data: Data) -> Data:
        if not (self.use_precomputed_edges and has_edges(data)):
            strip_edges(data)
            if self.cutoff is not None:
                build_graph(data, self.cutoff, int(self.max_neighbors))
        return data

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(use_precomputed_edges={self.use_precomputed_edges}, "
            f"cutoff={self.cutoff}, max_neighbors={self.max_neighbors})"
        )
