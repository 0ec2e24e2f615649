"""The SO(2) convolutions of a message block, computed per atom and per edge group.

A message block's SO(2) stage, for the source and the target block, is: rotate the atom's
features into the edge frame, first layer (a linear map per order m), gate by the edge,
second layer, sum the two blocks. Rotation and first layer are both linear, on different
axes, so the first layer runs once per atom (:func:`first_layer_projections`) and only a
contraction with the edge's Wigner rows remains per edge (:mod:`.slots`).

The stage is a list of *terms*, each a (block, order m, part) triple: m = 0 has one part;
m > 0 has a real and an imaginary part. A term's output is

    (rows_e @ projection[atom(e)]) * gate_e  @  second_weightᵀ

summed over the terms of each order. The imaginary part enters the output rows swapped
and negated, (+m, -m) <- (-i[-m], +i[+m]); that is folded into its Wigner rows, so every
term is a plain sum.

Edge-sized tensors live in the target-slot layout (:mod:`.geometry`).

In eager training, :class:`_GroupedSO2` keeps only the edge features and the per-atom projections
for backward and recomputes the gates and the first-layer outputs there (a small GEMM and
the grouped products), instead of storing several [E, hidden] tensors per term. Those
intermediates, in forward and backward, are buffers kept between calls
(:mod:`escn_train.models.workspace`): fresh ones would cost a page fault per 4 KB.

Code compiled by ``torch.compile`` calls the same computation, forward and recomputing
backward, as one custom operator (``torch.ops.escn_train.so2_stage``), so that
Inductor has no kernels to generate for it. Exported inference programs keep the in-place
products (in fresh buffers); mixed precision runs the same expressions as plain
differentiable operations under autocast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from escn_train.models.fast.geometry import MessageGeometry, _tracing
from escn_train.models.workspace import Workspace
from escn_train.precision import autocast_off, float32


@dataclass(frozen=True)
class Term:
    """One (block, m, part) of the SO(2) stage: which groups and rows it reads, which
    slice of the gates it uses, and which output order it adds to."""

    side: int  # 0 = source block (edges grouped by source), 1 = target block
    order: int
    rows_key: str  # "plain" or "swapped" (imaginary part of m > 0)
    gate_start: int  # first gate column in the stage's gate matrix
    width: int

    @property
    def gate_columns(self) -> slice:
        """This term's rows of the stage's gate weights (columns of its gate matrix)."""
        return slice(self.gate_start, self.gate_start + self.width)


class TermParameters(NamedTuple):
    """A term's weights: first layer [H, degrees l >= m, C], second layer [K_m, H], and its
    rows of the edge-gate map ([H, edge channels], [H])."""

    first: torch.Tensor
    second: torch.Tensor
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor


def so2_terms(hidden_channels: int, mmax: int) -> list[Term]:
    """The terms in the order of the concatenated gate weights: per block, fc1_dist0 (m = 0)
    then each SO2Conv's fc1_dist (real half, imaginary half)."""
    terms, start = [], 0
    for side in range(2):
        terms.append(Term(side, 0, "plain", start, hidden_channels))
        start += hidden_channels
        for m in range(1, mmax + 1):
            terms.append(Term(side, m, "plain", start, hidden_channels))
            terms.append(Term(side, m, "swapped", start + hidden_channels, hidden_channels))
            start += 2 * hidden_channels
    return terms


def select_terms(terms: list[Term], orders: tuple[int, ...]) -> list[Term]:
    """The terms of some orders, their gate columns renumbered for a gate matrix holding
    only their rows (in this order)."""
    selected, start = [], 0
    for term in terms:
        if term.order in orders:
            selected.append(replace(term, gate_start=start))
            start += term.width
    return selected


class _ZeroGradients(torch.autograd.Function):
    """Identity on ``x`` that gives ``params`` an exact zero gradient."""

    @staticmethod
    def forward(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.params = [(p.shape, p.dtype, p.device) for p in inputs[1:]]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.params))


def with_zero_gradients(x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """``x``, with ``params`` in its autograd graph receiving exact zeros: parameters whose
    contribution is skipped because it is exactly zero still get their (zero) gradient, as
    DDP and the optimizers expect."""
    return _ZeroGradients.apply(x, *params) if params else x


def _degree_weights(
    first_weights: Sequence[torch.Tensor], orders: Sequence[int], l: int
) -> tuple[list[int], torch.Tensor]:
    """The terms that read degree ``l`` (order m <= l) and their maps of that degree stacked,
    [sum of their H, C]: one GEMM serves them all."""
    active = [t for t, m in enumerate(orders) if m <= l]
    return active, torch.cat([first_weights[t][:, l - orders[t]] for t in active])


def first_layer_projections(x: torch.Tensor, first_weights: list[torch.Tensor], orders: list[int]) -> list[torch.Tensor]:
    """Each term's first layer applied per atom: [N, (lmax+1)^2, C] -> [N, K_m, H] per term.

    ``first_weights[t]`` is [H, degrees l >= m, C]; the map of degree l acts on all 2l+1
    coefficients of that degree. One GEMM per degree serves every term.
    """
    lmax = int(round(x.shape[1] ** 0.5)) - 1
    pieces: list[list[torch.Tensor]] = [[] for _ in first_weights]
    for l in range(lmax + 1):
        active, stacked = _degree_weights(first_weights, orders, l)
        coefficients = x[:, l * l : (l + 1) ** 2].reshape(-1, x.shape[2])  # one GEMM, not a batch
        per_degree = torch.mm(coefficients, stacked.t()).view(x.shape[0], 2 * l + 1, stacked.shape[0])
        for t, piece in zip(active, per_degree.split([first_weights[t].shape[0] for t in active], dim=-1)):
            pieces[t].append(piece)
    return [p[0] if len(p) == 1 else torch.cat(p, dim=1) for p in pieces]


def _first_layer_backward(
    grads: Sequence[torch.Tensor], x: torch.Tensor, first_weights: Sequence[torch.Tensor], orders: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Gradients of :func:`first_layer_projections` for ``x`` and each first weight, given
    each term's output gradient [N, K_m, H], one GEMM pair per degree as in the forward."""
    lmax = int(round(x.shape[1] ** 0.5)) - 1
    grad_x = torch.empty_like(x)
    grad_weights = [torch.empty_like(w) for w in first_weights]
    for l in range(lmax + 1):
        active, stacked = _degree_weights(first_weights, orders, l)
        # Degree l's rows in term t's output start after its degrees m..l-1: l^2 - m^2.
        grad_degree = torch.cat(
            [grads[t][:, l * l - orders[t] ** 2 : (l + 1) ** 2 - orders[t] ** 2] for t in active], dim=-1
        ).reshape(-1, stacked.shape[0])
        coefficients = x[:, l * l : (l + 1) ** 2].reshape(-1, x.shape[2])
        grad_x[:, l * l : (l + 1) ** 2] = torch.mm(grad_degree, stacked).view(x.shape[0], 2 * l + 1, x.shape[2])
        grad_stacked = torch.mm(grad_degree.t(), coefficients)
        for t, piece in zip(active, grad_stacked.split([first_weights[t].shape[0] for t in active])):
            grad_weights[t][:, l - orders[t]] = piece
    return grad_x, grad_weights


@torch.library.custom_op("escn_train::first_layer", mutates_args=())
def _first_layer_operator(x: torch.Tensor, first_weights: list[torch.Tensor], orders: list[int]) -> list[torch.Tensor]:
    """:func:`first_layer_projections` as one operator (each output its own tensor)."""
    return [p.contiguous() for p in first_layer_projections(x, first_weights, orders)]


def first_layer_unblocked(x: torch.Tensor, first_weights: list[torch.Tensor], orders: list[int]) -> list[torch.Tensor]:
    """The first-layer operator as plain expressions (:mod:`.operators`)."""
    return first_layer_projections(x, first_weights, orders)


@_first_layer_operator.register_fake
def _(x, first_weights, orders):
    return [x.new_empty(x.shape[0], x.shape[1] - m * m, w.shape[0]) for w, m in zip(first_weights, orders)]


@torch.library.custom_op("escn_train::first_layer_backward", mutates_args=())
def _first_layer_backward_operator(
    grads: list[torch.Tensor], x: torch.Tensor, first_weights: list[torch.Tensor], orders: list[int]
) -> list[torch.Tensor]:
    """:func:`_first_layer_backward`: [x, *first weights] gradients."""
    grad_x, grad_weights = _first_layer_backward(grads, x, first_weights, orders)
    return [grad_x, *grad_weights]


@_first_layer_backward_operator.register_fake
def _(grads, x, first_weights, orders):
    return [torch.empty_like(x), *(torch.empty_like(w) for w in first_weights)]


def _first_layer_setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
    x, first_weights, orders = inputs
    ctx.orders = orders
    ctx.save_for_backward(x, *first_weights)


def _first_layer_operator_backward(ctx: Any, grads: list[torch.Tensor]) -> tuple:
    x, *first_weights = ctx.saved_tensors
    grads = [g if g is not None else x.new_zeros(x.shape[0], x.shape[1] - m * m, w.shape[0])
             for g, w, m in zip(grads, first_weights, ctx.orders)]
    out = torch.ops.escn_train.first_layer_backward([g.contiguous() for g in grads], x, first_weights, ctx.orders)
    return out[0], list(out[1:]), None


_first_layer_operator.register_autograd(_first_layer_operator_backward, setup_context=_first_layer_setup_context)


def _calls_operators(like: torch.Tensor) -> bool:
    """Code traced by ``torch.compile`` or ``torch.export`` in full precision: it calls this
    module's stages as operators (under autocast they stay plain expressions)."""
    return _tracing() and not torch.is_autocast_enabled(like.device.type)


def first_layer(x: torch.Tensor, first_weights: list[torch.Tensor], orders: list[int]) -> list[torch.Tensor]:
    """:func:`first_layer_projections`; full-precision code compiled by ``torch.compile``
    calls it as one operator (Inductor would generate a dozen kernels for its weight
    concatenations and splits, forward and backward)."""
    if _calls_operators(x):
        return list(torch.ops.escn_train.first_layer(x, list(first_weights), list(orders)))
    return first_layer_projections(x, first_weights, orders)


def _terms_rows(geometry: MessageGeometry, terms: list[Term]) -> list[torch.Tensor]:
    """Each term's padded Wigner rows."""
    return [geometry.rows[term.side][term.rows_key][term.order] for term in terms]


def order_row_offsets(lmax: int, mmax: int) -> list[list[int]]:
    """First output row of each order's row signs in the m-major reduced layout:
    m = 0 -> [0]; m > 0 -> [first +m row, first -m row]; then [number of rows]."""
    offsets, start = [[0]], lmax + 1
    for m in range(1, mmax + 1):
        offsets.append([start, start + lmax - m + 1])
        start += 2 * (lmax - m + 1)
    return offsets + [[start]]


def _output_rows(y: torch.Tensor, term: Term, offsets: list[list[int]], sign: int, width: int) -> torch.Tensor:
    """The [E, rows x C] view of y [E, R, C] that a term's sign (+m or -m) writes."""
    start = offsets[term.order][sign]
    return y[:, start : start + width // y.shape[2]].flatten(1)


def so2_stage(
    terms: list[Term], offsets: list[list[int]], channels: int, x_edge: torch.Tensor, gate_weight: torch.Tensor,
    gate_bias: torch.Tensor, hidden: Callable[[int], torch.Tensor], second_weights: Sequence[torch.Tensor],
    in_place: bool, out: torch.Tensor | None = None, gate_buffer: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gate each term's first-layer output ``hidden(t)`` ([E, rows, H]) by the edge, apply its
    second layer and sum per order -> [E, R, C] (m-major rows).

    ``in_place`` (no autograd, no autocast): every product writes into its rows of one
    output buffer (``out`` when given); otherwise plain expressions.
    """
    num_edges = x_edge.shape[0]
    if in_place:
        y = out if out is not None else x_edge.new_empty(num_edges, offsets[-1][0], channels)
        written: set[tuple[int, int]] = set()
    else:
        pieces: dict[tuple[int, int], torch.Tensor] = {}
    for t, (term, second) in enumerate(zip(terms, second_weights)):
        gate = _term_gate(term, x_edge, gate_weight, gate_bias, gate_buffer).unsqueeze(1)
        mixed = hidden(t).mul_(gate) if in_place else hidden(t) * gate
        for sign in range(mixed.shape[1]):
            key = (term.order, sign)
            if in_place:
                rows = _output_rows(y, term, offsets, sign, second.shape[0])
                if key in written:
                    rows.addmm_(mixed[:, sign], second.t())
                else:
                    torch.mm(mixed[:, sign], second.t(), out=rows)
                    written.add(key)
            else:
                product = torch.matmul(mixed[:, sign], second.t())
                pieces[key] = pieces[key] + product if key in pieces else product
    # Orders without terms (skipped because their input is zero) give zero rows.
    done = written if in_place else pieces
    missing = [(m, sign) for m in range(len(offsets) - 1) for sign in range(len(offsets[m])) if (m, sign) not in done]
    for m, sign in missing:
        rows = (offsets[m + 1][0] - offsets[m][0]) // len(offsets[m])
        if in_place:
            y[:, offsets[m][sign] : offsets[m][sign] + rows] = 0
        else:
            pieces[(m, sign)] = x_edge.new_zeros(num_edges, rows * channels)
    if in_place:
        return y
    ordered = [pieces[key].view(num_edges, pieces[key].shape[1] // channels, channels) for key in sorted(pieces)]
    return torch.cat(ordered, dim=1)


def _forward(
    geometry: MessageGeometry, terms: list[Term], offsets: list[list[int]], rows: Sequence[torch.Tensor],
    x_edge: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, projections: Sequence[torch.Tensor],
    second_weights: Sequence[torch.Tensor], channels: int, in_place: bool, output: str = "fresh",
) -> torch.Tensor:
    """:func:`so2_stage` with the first-layer outputs as grouped products of the per-atom
    projections (``rows[t]``: term t's padded Wigner rows). ``in_place`` (nothing records
    autograd): the intermediates are workspace buffers. ``output``: where the output lives
    with ``in_place``: "fresh" memory, a "scratch" buffer (valid until the next layer's), or
    an "unshared" one (:meth:`.Workspace.unshared`: the autograd graph may keep it)."""

    def hidden(t: int) -> torch.Tensor:
        # Rotations stay in float32 under autocast (as everywhere in the model).
        with autocast_off(x_edge):
            return geometry.hidden(terms[t].side, rows[t], float32(projections[t]), in_place)

    out = gate_buffer = None
    if in_place:
        gate_buffer = lambda width: geometry.scratch("gate", (x_edge.shape[0], width), x_edge)  # noqa: E731
        shape = (x_edge.shape[0], offsets[-1][0], channels)
        if output == "scratch":
            out = geometry.scratch("so2_out", shape, x_edge)
        elif output == "unshared":
            out = geometry.workspace.unshared("so2_out", shape, x_edge)
    return so2_stage(
        terms, offsets, channels, x_edge, gate_weight, gate_bias, hidden, second_weights, in_place, out, gate_buffer
    )


def _term_gate(
    term: Term, x_edge: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
    buffer: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """SiLU of a term's gate pre-activations, [E, H] (term by term: no [E, all gates]
    buffer); computed in ``buffer(H)`` when given."""
    columns = term.gate_columns
    if buffer is None:
        return nn.functional.silu(nn.functional.linear(x_edge, gate_weight[columns], gate_bias[columns]))
    pre = torch.addmm(gate_bias[columns], x_edge, gate_weight[columns].t(), out=buffer(term.width))
    return nn.functional.silu(pre, inplace=True)


def _backward(
    geometry: MessageGeometry, terms: list[Term], offsets: list[list[int]], rows: Sequence[torch.Tensor],
    grad_y: torch.Tensor, x_edge: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
    projections: Sequence[torch.Tensor], second_weights: Sequence[torch.Tensor], x_edge_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of :func:`_forward` for x_edge (None unless ``x_edge_grad``), the gate
    weights and biases, the projections and the second-layer weights, recomputing the gates
    and the first-layer outputs. Every intermediate is a workspace buffer: fresh ones would
    cost page faults."""
    grad_x_edge = torch.zeros_like(x_edge) if x_edge_grad else None
    grad_gate_weight = torch.empty_like(gate_weight)
    grad_gate_bias = torch.empty_like(gate_bias)
    grad_projections, grad_seconds = [], []

    def buffer(name: str, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return geometry.scratch(name, tuple(shape), x_edge)

    for term, term_rows, projection, second in zip(terms, rows, projections, second_weights):
        hidden = geometry.hidden(term.side, term_rows, projection, reuse=True)
        columns = term.gate_columns
        gate_shape = (x_edge.shape[0], term.width)
        pre = torch.addmm(gate_bias[columns], x_edge, gate_weight[columns].t(), out=buffer("gate_pre", gate_shape))
        gate = torch.ops.aten.silu.out(pre, out=buffer("gate", gate_shape)).unsqueeze(1)
        mixed = torch.mul(hidden, gate, out=buffer("mixed", hidden.shape))
        grad_second = second.new_zeros(second.shape)
        grad_mixed = buffer("grad_mixed", hidden.shape)
        for sign in range(hidden.shape[1]):
            grad_rows = _output_rows(grad_y, term, offsets, sign, second.shape[0])
            grad_second.addmm_(grad_rows.t(), mixed[:, sign])
            torch.mm(grad_rows, second, out=grad_mixed[:, sign])
        grad_seconds.append(grad_second)
        hidden.mul_(grad_mixed)
        if hidden.shape[1] == 1:
            grad_gate = hidden[:, 0]
        else:
            grad_gate = torch.sum(hidden, 1, out=buffer("grad_gate", gate_shape))
        grad_pre = torch.ops.aten.silu_backward.grad_input(grad_gate, pre, grad_input=buffer("grad_pre", gate_shape))
        if grad_x_edge is not None:
            grad_x_edge.addmm_(grad_pre, gate_weight[columns])
        torch.mm(grad_pre.t(), x_edge, out=grad_gate_weight[columns])
        torch.sum(grad_pre, 0, out=grad_gate_bias[columns])
        values = grad_mixed.mul_(gate)
        grad_projections.append(geometry.sum_to_atoms(term.side, term_rows, values, projection.shape[0], reuse=True))
    return grad_x_edge, grad_gate_weight, grad_gate_bias, grad_projections, grad_seconds


class _GroupedSO2(torch.autograd.Function):
    """:func:`_forward` whose backward (:func:`_backward`) recomputes the gates and the
    first-layer outputs (eager training). As in the plain expressions' graph, the Wigner
    rows get no gradient: they do not depend on any parameter."""

    @staticmethod
    def forward(geometry, terms, offsets, channels, x_edge, gate_weight, gate_bias, *tensors):  # type: ignore[override]
        half = len(tensors) // 2
        rows = _terms_rows(geometry, terms)
        # The grid stage saves the output for backward: an unshared buffer, whose pages the
        # next step reuses (fresh ones fault on first touch: ~4500 per L3 M1 step).
        return _forward(geometry, terms, offsets, rows, x_edge, gate_weight, gate_bias, tensors[:half],
                        tensors[half:], channels, in_place=True, output="unshared")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        geometry, terms, offsets, channels, *tensors = inputs
        ctx.geometry, ctx.terms, ctx.offsets = geometry, terms, offsets
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple:
        x_edge, gate_weight, gate_bias, *tensors = ctx.saved_tensors
        half = len(tensors) // 2
        geometry, terms = ctx.geometry, ctx.terms
        rows = _terms_rows(geometry, terms)
        grad_x_edge, grad_gate_weight, grad_gate_bias, grad_projections, grad_seconds = _backward(
            geometry, terms, ctx.offsets, rows, grad_y, x_edge, gate_weight, gate_bias, tensors[:half],
            tensors[half:], ctx.needs_input_grad[4],
        )
        if not ctx.needs_input_grad[5]:
            grad_gate_weight = None
        if not ctx.needs_input_grad[6]:
            grad_gate_bias = None
        return (None, None, None, None, grad_x_edge, grad_gate_weight, grad_gate_bias, *grad_projections, *grad_seconds)


# ---- The stage as one operator, for torch.compile ------------------------------------------
# Traced as plain expressions, the stage is about half of the kernels Inductor generates and
# compiles for a layer (its gates, concatenations and splits), each a g++ run of 1-2 s. As
# one opaque operator, compiled code runs the stage exactly as eager training does, with
# its recomputing backward, and the compile time of the first call drops accordingly.

#: The operators this module registers.
SO2_OPERATORS = ("escn_train::first_layer", "escn_train::first_layer_backward", "escn_train::so2_stage",
                 "escn_train::so2_stage_backward")
#: The operators' intermediates (their outputs are always fresh tensors).
_OPERATOR_WORKSPACE = Workspace()


def _term_layout(terms: list[Term], offsets: list[list[int]]) -> tuple[list[int], list[int]]:
    """``terms`` and ``offsets`` as the operators' integer lists."""
    layout = [v for t in terms for v in (t.side, t.order, int(t.rows_key == "swapped"), t.gate_start, t.width)]
    return layout, [v for row in offsets for v in row]


def _unpack_layout(layout: list[int], flat_offsets: list[int]) -> tuple[list[Term], list[list[int]]]:
    """The inverse of :func:`_term_layout`."""
    terms = [
        Term(side, order, "swapped" if swapped else "plain", gate_start, width)
        for side, order, swapped, gate_start, width in zip(*[iter(layout)] * 5)
    ]
    mmax = (len(flat_offsets) - 2) // 2
    offsets = [flat_offsets[:1]] + [flat_offsets[2 * m - 1 : 2 * m + 1] for m in range(1, mmax + 1)]
    return terms, offsets + [flat_offsets[-1:]]


def _operator_geometry(geometry_tensors: list[torch.Tensor], group_sizes: list[int],
                       target_one_per_atom: bool) -> MessageGeometry:
    """The geometry of the operators' arguments (:meth:`MessageGeometry.tensors`), with the
    operators' workspace."""
    return MessageGeometry.from_tensors(geometry_tensors, (group_sizes[0], group_sizes[1]), target_one_per_atom,
                                        _OPERATOR_WORKSPACE)


def _stage_of_operator_arguments(
    x_edge: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, projections: list[torch.Tensor],
    second_weights: list[torch.Tensor], geometry_tensors: list[torch.Tensor], layout: list[int], offsets: list[int],
    channels: int, group_sizes: list[int], target_one_per_atom: bool, in_place: bool,
) -> torch.Tensor:
    """:func:`_forward` of the stage operator's arguments (``in_place``: intermediates in the
    operators' workspace; otherwise plain expressions)."""
    geometry = _operator_geometry(geometry_tensors, group_sizes, target_one_per_atom)
    terms, row_offsets = _unpack_layout(layout, offsets)
    return _forward(geometry, terms, row_offsets, _terms_rows(geometry, terms), x_edge, gate_weight, gate_bias,
                    projections, second_weights, channels, in_place)


@torch.library.custom_op("escn_train::so2_stage", mutates_args=())
def _so2_stage_operator(
    x_edge: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, projections: list[torch.Tensor],
    second_weights: list[torch.Tensor], geometry_tensors: list[torch.Tensor], layout: list[int], offsets: list[int],
    channels: int, group_sizes: list[int], target_one_per_atom: bool,
) -> torch.Tensor:
    """:func:`_forward` (``geometry_tensors``: :meth:`MessageGeometry.tensors`; ``layout``,
    ``offsets``: :func:`_term_layout`; ``group_sizes``: the source and target group sizes)."""
    return _stage_of_operator_arguments(x_edge, gate_weight, gate_bias, projections, second_weights,
                                        geometry_tensors, layout, offsets, channels, group_sizes,
                                        target_one_per_atom, in_place=True)


#: The stage operator as plain expressions (:mod:`.operators`).
so2_stage_unblocked = functools.partial(_stage_of_operator_arguments, in_place=False)


@_so2_stage_operator.register_fake
def _(x_edge, gate_weight, gate_bias, projections, second_weights, geometry_tensors, layout, offsets, channels,
      group_sizes, target_one_per_atom):
    return x_edge.new_empty(x_edge.shape[0], offsets[-1], channels)


@torch.library.custom_op("escn_train::so2_stage_backward", mutates_args=())
def _so2_stage_backward_operator(
    grad_y: torch.Tensor, x_edge: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
    projections: list[torch.Tensor], second_weights: list[torch.Tensor], geometry_tensors: list[torch.Tensor],
    layout: list[int], offsets: list[int], group_sizes: list[int], target_one_per_atom: bool,
) -> list[torch.Tensor]:
    """:func:`_backward`: [x_edge, gate weight, gate bias, *projections, *second weights] gradients."""
    geometry = _operator_geometry(geometry_tensors, group_sizes, target_one_per_atom)
    terms, row_offsets = _unpack_layout(layout, offsets)
    grad_x_edge, grad_gate_weight, grad_gate_bias, grad_projections, grad_seconds = _backward(
        geometry, terms, row_offsets, _terms_rows(geometry, terms), grad_y, x_edge, gate_weight, gate_bias,
        projections, second_weights, True,
    )
    return [grad_x_edge, grad_gate_weight, grad_gate_bias, *grad_projections, *grad_seconds]


@_so2_stage_backward_operator.register_fake
def _(grad_y, x_edge, gate_weight, gate_bias, projections, second_weights, geometry_tensors, layout, offsets,
      group_sizes, target_one_per_atom):
    return [torch.empty_like(t) for t in (x_edge, gate_weight, gate_bias, *projections, *second_weights)]


def _operator_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x_edge, gate_weight, gate_bias, projections, second_weights, geometry_tensors, layout, offsets, _, group_sizes, \
        one_per_atom = inputs
    ctx.counts = (len(projections), len(geometry_tensors))
    ctx.constants = (layout, offsets, group_sizes, one_per_atom)
    ctx.save_for_backward(x_edge, gate_weight, gate_bias, *projections, *second_weights, *geometry_tensors)


def _operator_backward(ctx: Any, grad_y: torch.Tensor) -> tuple:
    num_terms, num_geometry = ctx.counts
    x_edge, gate_weight, gate_bias, *rest = ctx.saved_tensors
    projections, second_weights = rest[:num_terms], rest[num_terms : 2 * num_terms]
    geometry_tensors = rest[2 * num_terms :]
    grads = torch.ops.escn_train.so2_stage_backward(
        grad_y.contiguous(), x_edge, gate_weight, gate_bias, list(projections), list(second_weights),
        list(geometry_tensors), *ctx.constants,
    )
    grad_projections, grad_seconds = grads[3 : 3 + num_terms], grads[3 + num_terms :]
    # The geometry (Wigner rows included) gets no gradient, as in eager training (:class:`_GroupedSO2`).
    return (grads[0], grads[1], grads[2], grad_projections, grad_seconds, [None] * num_geometry) + (None,) * 5


_so2_stage_operator.register_autograd(_operator_backward, setup_context=_operator_setup_context)


def _so2_operator_call(
    geometry: MessageGeometry, terms: list[Term], offsets: list[list[int]], channels: int, x_edge: torch.Tensor,
    gate_weight: torch.Tensor, gate_bias: torch.Tensor, projections: list[torch.Tensor],
    second_weights: list[torch.Tensor],
) -> torch.Tensor:
    """The stage through ``torch.ops.escn_train.so2_stage``."""
    source, target = geometry.groups
    layout, flat_offsets = _term_layout(terms, offsets)
    return torch.ops.escn_train.so2_stage(
        x_edge, gate_weight, gate_bias, list(projections), list(second_weights), geometry.tensors(), layout,
        flat_offsets, channels, [source.size, target.size], target.one_per_atom,
    )


def grouped_so2(
    geometry: MessageGeometry,
    terms: list[Term],
    offsets: list[list[int]],
    channels: int,
    x_edge: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    projections: list[torch.Tensor],
    second_weights: list[torch.Tensor],
) -> torch.Tensor:
    """Output of the SO(2) stage in the target-slot layout, [slots, reduced coefficients, C],
    m-major rows.

    ``offsets``: :func:`order_row_offsets`; ``projections``: :func:`first_layer_projections`;
    ``second_weights[t]``: [K_m, H]. Eager full-precision training uses the recomputing
    autograd function, and full-precision code traced by ``torch.compile`` or
    ``torch.export`` the same computation as one operator; otherwise (eager inference,
    mixed precision) the same expressions run under autograd as they are.
    """
    if _calls_operators(x_edge):
        return _so2_operator_call(
            geometry, terms, offsets, channels, x_edge, gate_weight, gate_bias, projections, second_weights
        )
    grad, autocast = torch.is_grad_enabled(), torch.is_autocast_enabled(x_edge.device.type)
    if grad and not autocast:
        return _GroupedSO2.apply(
            geometry, terms, offsets, channels, x_edge, gate_weight, gate_bias, *projections, *second_weights
        )
    # Eager inference writes its products in place; under autocast (traced or not) the plain
    # expressions run under autograd, and Inductor fuses them.
    in_place = not (grad or autocast)
    rows = _terms_rows(geometry, terms)
    return _forward(geometry, terms, offsets, rows, x_edge, gate_weight, gate_bias, projections, second_weights,
                    channels, in_place, output="fresh" if grad else "scratch")
