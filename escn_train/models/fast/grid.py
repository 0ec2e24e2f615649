"""The S2-grid stage of a message block and the rotation back, edge block by edge block.

The pointwise SiLU on the S2 grid, from_grid @ SiLU(to_grid @ y), has the largest
activation of a message block: its grid values (slots x points x C). Memory traffic is
the cost of this stage on CPUs, so eager code computes them one cache-sized block of edges
at a time, rotates each block back and sums it per target atom while it is in cache, and
its backward recomputes the grid values from ``y`` instead of storing them
(:class:`_GridSiLU`). Traced code (``torch.export``, ``torch.compile``) runs the same
expressions unblocked, as plain operations (block loops over a dynamic edge count do not
trace). Results are bit for bit those of the unblocked expressions in eager mode.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from escn_train.models.fast.geometry import _tracing
from escn_train.models.fast.slots import EdgeGroups
from escn_train.models.workspace import Workspace


#: Grid values per block of the S2-grid stage: 512 KB, so each block's grid stays in a
#: core's L2 cache between the projection, the SiLU and the projection back (measured on
#: the bench batch: 2^16..2^17 best, 2^20 ~10% slower on the tiny configuration).
GRID_BLOCK_FLOATS = 2**17


def _edge_block_size(to_grid: torch.Tensor, y: torch.Tensor, back: RotationBack | None) -> int:
    """Edges per block for grid values of ``to_grid.shape[0]`` points x ``y.shape[2]`` channels
    (whole groups of ``back`` when given)."""
    step = max(1, GRID_BLOCK_FLOATS // max(1, to_grid.shape[0] * y.shape[2]))
    return step if back is None else max(1, step // back.groups.size) * back.groups.size


class RotationBack(NamedTuple):
    """The rotation back of edge values in the target-slot layout, summed per target atom:
    out[a] = Σ_{slots of a} rows_sᵀ @ values_s, with ``rows`` [groups, size * R, S] padded
    to the target ``groups`` (:attr:`MessageGeometry.back_rows`)."""

    rows: torch.Tensor
    groups: EdgeGroups
    num_atoms: int
    workspace: Workspace | None = None  # lends backward its gradient buffer

    def sum_block(self, values: torch.Tensor, start: int, out: torch.Tensor) -> None:
        """Add the sums of the slots from ``start`` on (whole groups), ``values`` [slots, R, C],
        to ``out`` ([groups, S, C] when each group is an atom, else [atoms, S, C])."""
        size = self.groups.size
        first, last = start // size, start // size + values.shape[0] // size
        values = values.view(last - first, self.rows.shape[1], values.shape[2])
        if self.groups.one_per_atom:
            torch.bmm(self.rows[first:last].transpose(1, 2), values, out=out[first:last])
        else:
            out.index_add_(0, self.groups.group_atom[first:last], torch.bmm(self.rows[first:last].transpose(1, 2), values))

    def block_gradient(self, grad_per_group: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The gradient of the slots start..stop (whole groups) given the per-group gradient
        of the sums, [slots, R, C]."""
        size = self.groups.size
        grad = torch.bmm(self.rows[start // size : stop // size], grad_per_group[start // size : stop // size])
        return grad.view(stop - start, self.rows.shape[1] // size, grad.shape[2])


class _GridSiLU(torch.autograd.Function):
    """from_grid @ SiLU(to_grid @ y), edge block by edge block, recomputed in backward;
    with a :class:`RotationBack`, rotated back and summed per atom block by block too.

    The grid values (E x points x C) are the largest activation of a message block. Here
    they exist one cache-sized block of edges at a time (memory traffic is the cost of
    this stage on CPUs), and backward recomputes them from ``y`` instead of storing them.
    Rotating each block back while it is in cache spares the [E, coeffs, C] result and its
    gradient. Results and gradients are bit for bit those of the unblocked expressions.
    """

    @staticmethod
    def forward(
        y: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, back: RotationBack | None = None
    ) -> torch.Tensor:
        if back is None:
            out = y.new_empty(y.shape[0], from_grid.shape[0], y.shape[2])
        elif back.groups.one_per_atom:
            out = y.new_empty(back.num_atoms, back.rows.shape[2], y.shape[2])
        else:
            out = y.new_zeros(back.num_atoms, back.rows.shape[2], y.shape[2])
        step = _edge_block_size(to_grid, y, back)
        for start in range(0, y.shape[0], step):
            grid = nn.functional.silu(torch.matmul(to_grid, y[start : start + step]), inplace=True)
            if back is None:
                torch.matmul(from_grid, grid, out=out[start : start + step])
            else:
                back.sum_block(torch.matmul(from_grid, grid), start, out)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.back = inputs[3] if len(inputs) > 3 else None
        ctx.save_for_backward(*inputs[:3])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        y, to_grid, from_grid = ctx.saved_tensors
        back = ctx.back
        if back is not None and back.workspace is not None:
            # Consumed by the SO(2) stage's backward before any other layer's grid backward.
            grad_y = back.workspace.get("grid_grad", y.shape, y)
        else:
            grad_y = torch.empty_like(y)
        if back is not None:
            grad = back.groups.per_group(grad)
        step = _edge_block_size(to_grid, y, back)
        for start in range(0, y.shape[0], step):
            stop = min(start + step, y.shape[0])
            grid = torch.matmul(to_grid, y[start:stop])
            grad_out = grad[start:stop] if back is None else back.block_gradient(grad, start, stop)
            # SiLU' is exactly 1 above 80 and below 1e-32 under -80; clamping keeps its
            # exp() off the slow path that saturated grid values would take on CPUs.
            grad_grid = torch.ops.aten.silu_backward(torch.matmul(from_grid.t(), grad_out), grid.clamp_(-80.0, 80.0))
            torch.matmul(to_grid.t(), grad_grid, out=grad_y[start:stop])
        return grad_y, None, None, None


def grid_silu(
    y: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, back: RotationBack | None = None
) -> torch.Tensor:
    """Pointwise SiLU on the S2 grid: from_grid @ SiLU(to_grid @ y) for y [E, coeffs, C]
    (see :class:`_GridSiLU`); with ``back``, the per-atom sums of its rotation back,
    [atoms, S, C] (y in the target-slot layout)."""
    if _tracing():
        grid = torch.matmul(from_grid, nn.functional.silu(torch.matmul(to_grid, y)))
        return grid if back is None else back.groups.sum_padded(back.rows, grid, back.num_atoms)
    if torch.is_grad_enabled() and y.requires_grad:
        return _GridSiLU.apply(y, to_grid, from_grid, back)
    return _GridSiLU.forward(y, to_grid, from_grid, back)
