"""Shared fixtures: ``device`` runs a device-generic test on the CPU and, when present, on CUDA."""

from __future__ import annotations

import pytest
import torch
from devices import DEVICES


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """``cpu``, and ``cuda`` on a machine with a GPU (the test id names it)."""
    return torch.device(request.param)
