"""The fast formulation of a message block: one entry point, :func:`message`.

Computes what :class:`escn_train.models.escn.MessageBlock`'s reference composition does
(rotate into the edge frame, SO(2) blocks of source and target, SiLU on the S2 grid,
rotate back, sum into the targets) as its stages:

1. :func:`escn_train.models.fast.so2.first_layer`: the first SO(2) layers per atom;
2. :func:`escn_train.models.fast.so2.grouped_so2`: per edge, the Wigner-row contraction,
   gates and second layers, in the target-slot layout (:mod:`.geometry`);
3. :func:`escn_train.models.fast.grid.grid_silu`: the S2-grid SiLU, rotated back and
   summed per target atom.

Eager mode, ``torch.compile`` and ``torch.export`` all run this computation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from escn_train.models.fast.distance import DistanceBands
from escn_train.models.fast.geometry import MessageGeometry, build_geometry, order_rows_index
from escn_train.models.fast.grid import RotationBack, grid_silu
from escn_train.models.fast.so2 import (
    Term,
    TermParameters,
    first_layer,
    grouped_so2,
    order_row_offsets,
    select_terms,
    so2_terms,
    with_zero_gradients,
)
from escn_train.models.workspace import Workspace
from escn_train.precision import autocast_off, float32

if TYPE_CHECKING:
    from escn_train.models.escn import MessageBlock


def add_constants(block: MessageBlock) -> None:
    """Register the fast formulation's constants on ``block`` (non-persistent buffers).

    Everything between the two rotations works in the m-major order of the reduced
    layout, so no permutation is ever applied: the rotation writes its rows in that order
    and the grid matrices read them in that order.
    """
    to_m = block.so2_block_source.mappingReduced.to_m_index
    block.register_buffer("rotation_rows", block.out_mask[to_m], persistent=False)
    grid = block.SO3_grid["lmax_mmax"]
    block.register_buffer("grid_to", grid.to_grid_mat.flatten(0, 1)[:, to_m].contiguous(), persistent=False)
    block.register_buffer("grid_from", grid.from_grid_mat.flatten(0, 1)[:, to_m].t().contiguous(), persistent=False)
    # Rows of order ±m of the Wigner matrices read by the grouped first layers.
    block.order_rows_shape = []
    for m, (index, shape) in enumerate(order_rows_index(block.lmax, block.mmax)):
        block.register_buffer(f"order_rows_index_{m}", index, persistent=False)
        block.order_rows_shape.append(shape)
    block.terms = so2_terms(block.hidden_channels, block.mmax)
    block.terms_degree_zero = select_terms(block.terms, orders=(0,))
    block.row_offsets = order_row_offsets(block.lmax, block.mmax)


def geometry(
    block: MessageBlock,
    wigner: torch.Tensor,
    edge_index: torch.Tensor,
    num_atoms: int,
    max_neighbors: int | None = None,
    workspace: Workspace | None = None,
) -> MessageGeometry:
    """The per-graph constants of the fast computation (the same for every layer)."""
    return build_geometry(
        wigner,
        edge_index,
        num_atoms,
        [getattr(block, f"order_rows_index_{m}") for m in range(block.mmax + 1)],
        block.order_rows_shape,
        block.rotation_rows,
        max_neighbors,
        workspace,
    )


def message(
    block: MessageBlock,
    x: torch.Tensor,
    atomic_numbers: torch.Tensor,
    edge_distance: torch.Tensor,
    edge_index: torch.Tensor,
    geometry: MessageGeometry,
    expanded_distance: torch.Tensor | DistanceBands | None = None,
    degree_zero_input: bool = False,
) -> torch.Tensor:
    """The messages summed per target atom, [N, (lmax+1)^2, C] (see
    :meth:`escn_train.models.escn.MessageBlock.forward` for the arguments)."""
    source, target = edge_index[0], edge_index[1]
    slot_edge = geometry.slot_edge
    x_edge = block.edge_block(
        edge_distance[slot_edge], atomic_numbers[source[slot_edge]], atomic_numbers[target[slot_edge]],
        expanded_distance=expanded_distance,
    )
    terms = block.terms_degree_zero if degree_zero_input else block.terms
    params = [_term_parameters(block, t) for t in terms]
    projections = first_layer(x, [p.first for p in params], [t.order for t in terms])
    if degree_zero_input and torch.is_grad_enabled():
        blocks = (block.so2_block_source, block.so2_block_target)
        skipped = [p for b in blocks for conv in b.so2_conv for p in conv.parameters() if p.requires_grad]
        projections[0] = with_zero_gradients(projections[0], skipped)
    y = grouped_so2(
        geometry, terms, block.row_offsets, block.sphere_channels, x_edge, torch.cat([p.gate_weight for p in params]),
        torch.cat([p.gate_bias for p in params]), projections, [p.second for p in params],
    )
    with autocast_off(y):
        back = RotationBack(geometry.back_rows, geometry.groups[1], x.shape[0])
        return grid_silu(float32(y), block.grid_to, block.grid_from, back)


def _term_parameters(block: MessageBlock, term: Term) -> TermParameters:
    """A term's weights; its gate rows are the real or imaginary half of an SO2Conv's fc1_dist."""
    so2_block = (block.so2_block_source, block.so2_block_target)[term.side]
    if term.order == 0:
        first, second, gate, rows = so2_block.fc1_m0, so2_block.fc2_m0, so2_block.fc1_dist0, slice(None)
    else:
        conv = so2_block.so2_conv[term.order - 1]
        imaginary = term.rows_key == "swapped"
        first, second = (conv.fc1_i, conv.fc2_i) if imaginary else (conv.fc1_r, conv.fc2_r)
        gate, rows = conv.fc1_dist, slice(term.width, 2 * term.width) if imaginary else slice(0, term.width)
    return TermParameters(
        first.weight.view(first.weight.shape[0], block.lmax - term.order + 1, block.sphere_channels),
        second.weight,
        gate.weight[rows],
        gate.bias[rows],
    )
