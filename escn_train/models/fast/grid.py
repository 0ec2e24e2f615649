"""The S2-grid stage of a message block and the rotation back, edge block by edge block.

The pointwise SiLU on the S2 grid, from_grid @ SiLU(to_grid @ y), has the largest
activation of a message block: its grid values (slots x points x C). Memory traffic is
the cost of this stage on CPUs, so it computes them one cache-sized block of edges at a
time, rotates each block back and sums it per target atom while it is in cache, and its
backward recomputes the grid values from ``y`` instead of storing them.

The stage is the custom operator ``torch.ops.escn_train.grid_silu`` (with its backward,
``grid_silu_backward``), so eager code, ``torch.compile`` and ``torch.export`` all run
this blocked kernel: a loop over a dynamic number of edge blocks does not trace, but an
operator with a registered shape function does. Exported programs therefore need it
registered before ``torch.export.load`` (``escn_train.inference.loading`` imports
:mod:`.operators`). AOTInductor packages call it through the dispatcher too; standalone
packages, which must run without Python, replace it by :func:`grid_silu_unblocked` (the
same expressions, fused by Inductor) before compiling (:func:`.operators.inline_operators`).

Within a block, float32 CPU tensors go through a fused C kernel (:mod:`.cpu_kernel`: the
grid values of an edge never leave L1); elsewhere the block runs PyTorch's operations.
Both equal the unblocked expressions to float32 round-off, not bit for bit: the kernel's exp
is its own, and batched matmuls of different batch sizes round differently on some CPUs
(AVX2 here; the AVX-512 VMs of earlier sessions gave identical bits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from escn_train.models.fast import cpu_kernel

if TYPE_CHECKING:  # loading an exported program imports this module: keep it light
    from escn_train.models.fast.slots import EdgeGroups

#: The operators this module registers, as exported programs and AOTI packages name them.
GRID_OPERATORS = ("escn_train::grid_silu", "escn_train::grid_silu_backward")

#: Grid values per thread in a block of the S2-grid stage: 1 MB, so each thread's share of
#: a block stays in its core's L2 cache between the projection, the SiLU and the projection
#: back. A block holds one share per thread: blocks sized for one thread leave the second
#: thread idle (bench batch, grid forward + backward at 2 threads, l3m1: 67 ms with blocks
#: of 2^17 values, 51 ms with 2^19; at 1 thread 2^17..2^19 are equal and 2^20 is ~30%
#: slower on the tiny configuration).
GRID_BLOCK_FLOATS_PER_THREAD = 2**18
#: At most this many threads' shares per block (a bound on the block's memory; more
#: threads than this were not measured).
GRID_BLOCK_MAX_THREADS = 16


class RotationBack(NamedTuple):
    """The rotation back of edge values in the target-slot layout, summed per target atom:
    out[a] = Σ_{slots of a} rows_sᵀ @ values_s, with ``rows`` [groups, size * R, S] padded
    to the target ``groups`` (:attr:`MessageGeometry.back_rows`)."""

    rows: torch.Tensor
    groups: EdgeGroups
    num_atoms: int


def grid_silu(
    y: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, back: RotationBack | None = None
) -> torch.Tensor:
    """Pointwise SiLU on the S2 grid: from_grid @ SiLU(to_grid @ y) for y [E, coeffs, C];
    with ``back``, the per-atom sums of its rotation back, [atoms, S, C] (y in the
    target-slot layout)."""
    if back is None:
        return torch.ops.escn_train.grid_silu(y, to_grid, from_grid, None, None, 0, 1)
    groups = back.groups
    group_atom = None if groups.one_per_atom else groups.group_atom
    return torch.ops.escn_train.grid_silu(y, to_grid, from_grid, back.rows, group_atom, back.num_atoms, groups.size)


def grid_silu_unblocked(
    y: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, rows: torch.Tensor | None,
    group_atom: torch.Tensor | None, num_atoms: int, size: int,
) -> torch.Tensor:
    """The operator's value as plain tensor expressions, for compilers that fuse them."""
    values = torch.matmul(from_grid, nn.functional.silu(torch.matmul(to_grid, y)))
    if rows is None:
        return values
    summed = torch.bmm(rows.transpose(1, 2), values.reshape(rows.shape[0], rows.shape[1], values.shape[2]))
    if group_atom is None:
        return summed
    return summed.new_zeros(num_atoms, *summed.shape[1:]).index_add(0, group_atom, summed)


def _block_floats() -> int:
    """Grid values per block: one share per torch thread (read at each call)."""
    return GRID_BLOCK_FLOATS_PER_THREAD * min(torch.get_num_threads(), GRID_BLOCK_MAX_THREADS)


def _block_edges(to_grid: torch.Tensor, y: torch.Tensor, size: int) -> int:
    """Edges per block for grid values of ``to_grid.shape[0]`` points x ``y.shape[2]``
    channels, in whole groups of ``size`` slots. ``grid_native.cpp`` computes the same
    (``escn_native::block_edges``; a test holds the two equal)."""
    step = max(1, _block_floats() // max(1, to_grid.shape[0] * y.shape[2]))
    return max(1, step // size) * size


def _grid_values(
    y: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """from_grid @ SiLU(to_grid @ y) for one block of edges, [B, coeffs, C]: the fused CPU
    kernel where it applies (:mod:`.cpu_kernel`), else PyTorch's operations."""
    if out is None:
        out = y.new_empty(y.shape)
    if cpu_kernel.grid_forward(y, to_grid, from_grid, out):
        return out
    return torch.matmul(from_grid, nn.functional.silu(torch.matmul(to_grid, y), inplace=True), out=out)


def _grid_values_backward(
    grad_values: torch.Tensor, y: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, out: torch.Tensor
) -> None:
    """Writes the gradient of :func:`_grid_values` for ``y`` into ``out``, recomputing the grid values."""
    if cpu_kernel.grid_backward(grad_values, y, to_grid, from_grid, out):
        return
    # SiLU' is exactly 1 above 80 and below 1e-32 under -80; clamping keeps its
    # exp() off the slow path that saturated grid values would take on CPUs.
    grid = torch.matmul(to_grid, y).clamp_(-80.0, 80.0)
    grad_grid = torch.ops.aten.silu_backward(torch.matmul(from_grid.t(), grad_values), grid)
    torch.matmul(to_grid.t(), grad_grid, out=out)


@torch.library.custom_op("escn_train::grid_silu", mutates_args=())
def _grid_silu(
    y: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, rows: torch.Tensor | None,
    group_atom: torch.Tensor | None, num_atoms: int, size: int,
) -> torch.Tensor:
    """:func:`grid_silu_unblocked`, computed per cache-sized block of edges; ``rows`` None:
    no rotation back; ``group_atom`` None: target group g is atom g."""
    if rows is None:
        out = y.new_empty(y.shape[0], from_grid.shape[0], y.shape[2])
    elif group_atom is None:
        out = y.new_empty(num_atoms, rows.shape[2], y.shape[2])
    else:
        out = y.new_zeros(num_atoms, rows.shape[2], y.shape[2])
    step = _block_edges(to_grid, y, size)
    for start in range(0, y.shape[0], step):
        if rows is None:
            _grid_values(y[start : start + step], to_grid, from_grid, out[start : start + step])
            continue
        values = _grid_values(y[start : start + step], to_grid, from_grid)
        first = start // size
        last = first + values.shape[0] // size
        values = values.view(last - first, rows.shape[1], values.shape[2])
        if group_atom is None:
            torch.bmm(rows[first:last].transpose(1, 2), values, out=out[first:last])
        else:
            out.index_add_(0, group_atom[first:last], torch.bmm(rows[first:last].transpose(1, 2), values))
    return out


@_grid_silu.register_fake
def _(y, to_grid, from_grid, rows, group_atom, num_atoms, size):
    if rows is None:
        return y.new_empty(y.shape[0], from_grid.shape[0], y.shape[2])
    return y.new_empty(num_atoms, rows.shape[2], y.shape[2])


@torch.library.custom_op("escn_train::grid_silu_backward", mutates_args=())
def _grid_silu_backward(
    grad: torch.Tensor, y: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor, rows: torch.Tensor | None,
    group_atom: torch.Tensor | None, size: int, rows_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_grid_silu` for ``y`` and (when ``rows_grad``, else an empty
    tensor) ``rows``, block by block, recomputing each block's grid values."""
    grad_y = torch.empty_like(y)
    grad_rows = torch.empty_like(rows) if rows_grad and rows is not None else y.new_empty(0)
    if rows is not None and group_atom is not None:
        grad = grad.index_select(0, group_atom)  # per target group
    step = _block_edges(to_grid, y, size)
    for start in range(0, y.shape[0], step):
        stop = min(start + step, y.shape[0])
        if rows is None:
            grad_values = grad[start:stop]
        else:
            block_rows, block_grad = rows[start // size : stop // size], grad[start // size : stop // size]
            if rows_grad:
                values = _grid_values(y[start:stop], to_grid, from_grid)
                torch.bmm(values.view(block_rows.shape[0], block_rows.shape[1], -1), block_grad.transpose(1, 2),
                          out=grad_rows[start // size : stop // size])
            grad_values = torch.bmm(block_rows, block_grad).view(stop - start, from_grid.shape[0], grad.shape[2])
        _grid_values_backward(grad_values, y[start:stop], to_grid, from_grid, grad_y[start:stop])
    return grad_y, grad_rows


@_grid_silu_backward.register_fake
def _(grad, y, to_grid, from_grid, rows, group_atom, size, rows_grad):
    grad_rows = torch.empty_like(rows) if rows_grad and rows is not None else y.new_empty(0)
    return torch.empty_like(y), grad_rows


def _setup_context(ctx, inputs, output) -> None:
    y, to_grid, from_grid, rows, group_atom, _num_atoms, size = inputs
    ctx.size = size
    ctx.rows_grad = rows is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(y, to_grid, from_grid, rows, group_atom)


def _backward(ctx, grad):
    y, to_grid, from_grid, rows, group_atom = ctx.saved_tensors
    grad_y, grad_rows = torch.ops.escn_train.grid_silu_backward(
        grad.contiguous(), y, to_grid, from_grid, rows, group_atom, ctx.size, ctx.rows_grad
    )
    return grad_y, None, None, grad_rows if ctx.rows_grad else None, None, None, None


_grid_silu.register_autograd(_backward, setup_context=_setup_context)
