"""Loading reference (fairchem) eSCN state dicts into :class:`escn_train.models.escn.eSCN`.

The reference saves derived constant buffers that this model rebuilds from its
configuration, and stores its sphere harmonics under another key; the pre-hook here
makes those state dicts load as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Keys of the reference's derived constant buffers; rebuilt here from the configuration.
REFERENCE_CONSTANT_MARKERS = ("SO3_grid.", "mappingReduced.", "Jd_", "SO3_edge_rot.", ".mapping.")


def accept_reference_layout(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """Let reference checkpoints load: drop their derived constants, rename ``sphharm_weights.0``."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        local = key[len(prefix) :]
        if local == "sphharm_weights.0":
            state_dict[prefix + "sphharm_weights"] = state_dict.pop(key)
        elif any(marker in local for marker in REFERENCE_CONSTANT_MARKERS):
            del state_dict[key]
