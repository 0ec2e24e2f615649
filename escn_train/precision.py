"""Full precision inside mixed-precision (autocast) runs.

Some steps lose accuracy or symmetry in bf16/fp16: periodic shifts (a bf16 product of cell
offsets and cell vectors is off by up to ~0.1 Å), Wigner rotations, S2-grid projections and
the readout's heavily cancelling sphere averages. Those run with autocast off, in float32.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``x``'s device while it is on (a no-op context otherwise)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if autocast made it bf16/fp16, unchanged otherwise."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
