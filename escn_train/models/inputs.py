"""Eager input checks of eSCN: errors that name the atom or edge at fault.

Each check reads its verdict back from the device (a host synchronisation), which is why
``eSCN(check_inputs=False)`` skips them for data validated beforehand; traced programs
(``torch.export``, ``torch.compile``) never run them.
"""

from __future__ import annotations

import torch

from escn_train.models.fast.slots import target_layout

#: Edges shorter than this (Å) have no direction: the frame and the physics break down.
MIN_EDGE_LENGTH = 1e-4


def check_positions(pos: torch.Tensor) -> None:
    """Refuse a non-finite position, naming the atom."""
    bad = ~torch.isfinite(pos).all(dim=-1)
    if bool(bad.any()):
        atom = int(bad.nonzero()[0, 0])
        raise ValueError(f"atom {atom} has a non-finite position {pos[atom].tolist()}")


def check_graph_inputs(
    pos: torch.Tensor,
    atomic_numbers: torch.Tensor,
    edge_index: torch.Tensor,
    edge_distance: torch.Tensor,
    edge_distance_vec: torch.Tensor,
    max_num_elements: int,
    max_neighbors: int,
) -> None:
    """Refuse what ``eSCN.forward`` cannot compute: a non-finite position, an atomic number
    outside 0..max_num_elements-1, more than ``max_neighbors`` edges into one atom (the
    model's slot layout holds that many), an edge that is non-finite or shorter than
    :data:`MIN_EDGE_LENGTH`."""
    check_positions(pos)
    bad = (atomic_numbers < 0) | (atomic_numbers >= max_num_elements)
    if bool(bad.any()):
        atom = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"atom {atom} has atomic number {int(atomic_numbers[atom])}, outside the model's "
            f"range 0..{max_num_elements - 1} (max_num_elements={max_num_elements})"
        )
    _, bounded = target_layout(max_neighbors)
    if bounded and edge_index.shape[1] > 0:
        degree = torch.bincount(edge_index[1], minlength=atomic_numbers.shape[0])
        atom = int(degree.argmax())
        if int(degree[atom]) > max_neighbors:
            raise ValueError(
                f"atom {atom} is the target of {int(degree[atom])} edges, more than the model's "
                f"max_neighbors={max_neighbors}; build the graph with at most max_neighbors "
                f"neighbours per atom"
            )
    length = torch.linalg.vector_norm(edge_distance_vec, dim=-1)
    bad = ~torch.isfinite(length) | (length < MIN_EDGE_LENGTH) | ~torch.isfinite(edge_distance)
    if bool(bad.any()):
        edge = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"edge {edge} (source atom {int(edge_index[0, edge])} -> target atom "
            f"{int(edge_index[1, edge])}) has length {float(length[edge]):.3g} Å; edges must be "
            f"finite and at least {MIN_EDGE_LENGTH} Å long (overlapping atoms?)"
        )
