"""The fast stages' custom operators in one place: the list that exported programs and
AOTInductor packages may call (importing this module registers them all), and their plain
expressions, which standalone AOTInductor packages compile instead (they run without Python,
where these operators do not exist)."""

from __future__ import annotations

import torch

from escn_train.models.fast import grid, so2

#: Every operator of the fast stages, as exported programs and packages name them.
OPERATORS = grid.GRID_OPERATORS + so2.SO2_OPERATORS


def inline_operators(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with the operators replaced by their plain expressions (for AOTInductor
    packages that must run without Python)."""
    return program.run_decompositions({
        torch.ops.escn_train.grid_silu.default: grid.grid_silu_unblocked,
        torch.ops.escn_train.so2_stage.default: so2.so2_stage_unblocked,
        torch.ops.escn_train.first_layer.default: so2.first_layer_unblocked,
    })
