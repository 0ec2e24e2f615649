"""The fast stages' custom operators in one place: the list that exported programs and
AOTInductor packages may call (importing this module registers them all), and their plain
expressions, which standalone AOTInductor packages compile instead (they run without Python,
where these operators do not exist)."""

from __future__ import annotations

import torch

from escn_train.models.fast import grid, so2

#: Every operator of the fast stages, as exported programs and packages name them.
OPERATORS = grid.GRID_OPERATORS + so2.SO2_OPERATORS

#: Operators whose signature is the same as in the escn-train versions that recorded only the
#: names of the operators a file calls (2026-11; the SO(2) stage's changed since).
_UNCHANGED_SINCE_NAME_RECORDS = frozenset(grid.GRID_OPERATORS + ("escn_train::first_layer", "escn_train::first_layer_backward"))
_EXPORT_AGAIN = "export it again from its checkpoint with this version's escn-export"


def operator_schema(name: str) -> str:
    """The registered signature of ``name`` (``escn_train::so2_stage``), as the dispatcher prints it."""
    namespace, short = name.split("::")
    return str(getattr(getattr(torch.ops, namespace), short).default._schema)


def _operator_nodes(program: torch.export.ExportedProgram, namespaces: tuple[str, ...]) -> list[torch.fx.Node]:
    return [
        node for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace in namespaces
    ]


def called_operators(program: torch.export.ExportedProgram) -> dict[str, str]:
    """The fast-stage operators ``program`` calls (this package's and the C++ one of
    :mod:`.native_grid`), with their signatures (for the file's metadata)."""
    called = {node.target.name().removesuffix(".default") for node in _operator_nodes(program, ("escn_train", "escn_native"))}
    return {name: operator_schema(name) for name in sorted(called)}


def grid_operator_inputs(program: torch.export.ExportedProgram) -> list[torch.Tensor]:
    """The example features [edges, coefficients, channels] (fake tensors) of each S2-grid
    operator call in ``program``: what decides whether the C++ operator can take them."""
    return [node.args[0].meta["val"] for node in _operator_nodes(program, ("escn_train",))
            if node.target is torch.ops.escn_train.grid_silu.default]


def check_recorded_operators(recorded: dict[str, str] | list[str], path: object) -> None:
    """Refuse a file that calls operators this version does not provide, or provides with
    another signature (its compiled calls would pass the wrong arguments); ``recorded`` is the
    file's metadata entry: names and signatures, or, from older versions, names only."""
    if isinstance(recorded, list):  # names only: the signatures were not recorded
        changed = sorted(set(recorded) - _UNCHANGED_SINCE_NAME_RECORDS)
        if changed:
            raise ValueError(
                f"{path}: written by an earlier escn-train whose operators {', '.join(changed)} had other "
                f"signatures; {_EXPORT_AGAIN}"
            )
        return
    unknown = sorted(set(recorded) - set(OPERATORS))
    if unknown:
        raise ValueError(
            f"{path}: calls operators this escn-train does not provide: {', '.join(unknown)}; expected only "
            f"{', '.join(OPERATORS)} ({_EXPORT_AGAIN})"
        )
    for name, schema in sorted(recorded.items()):
        current = operator_schema(name)
        if schema != current:
            raise ValueError(
                f"{path}: calls {name} with the signature {schema!r}, but this escn-train's is {current!r}; {_EXPORT_AGAIN}"
            )


def inline_operators(program: torch.export.ExportedProgram, native_grid: bool = False) -> torch.export.ExportedProgram:
    """``program`` with the operators replaced by their plain expressions (for AOTInductor
    packages that must run without Python); ``native_grid``: the S2-grid stage by the C++
    operator of :mod:`.native_grid` instead (CPUs), which :func:`.native_grid.load` loads."""
    return program.run_decompositions({
        torch.ops.escn_train.grid_silu.default: _native_grid_silu if native_grid else grid.grid_silu_unblocked,
        torch.ops.escn_train.so2_stage.default: so2.so2_stage_unblocked,
        torch.ops.escn_train.first_layer.default: so2.first_layer_unblocked,
    })


def _native_grid_silu(y, to_grid, from_grid, rows, group_atom, num_atoms, size):
    return torch.ops.escn_native.grid_silu(
        y, to_grid, from_grid, rows, group_atom, num_atoms, size, grid.GRID_BLOCK_FLOATS_PER_THREAD,
        grid.GRID_BLOCK_MAX_THREADS,
    )
