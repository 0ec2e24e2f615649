"""The devices the device-generic tests run on: the CPU, and CUDA when one is present."""

from __future__ import annotations

from typing import Any

import torch

DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor moved to ``device`` (tensors, dicts, lists, tuples, PyG ``Data``)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple, e.g. PeriodicGraph
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if hasattr(value, "to") and hasattr(value, "keys"):  # torch_geometric Data / Batch
        return value.to(device)
    return value
