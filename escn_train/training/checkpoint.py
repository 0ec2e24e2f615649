"""Reading the project's training checkpoints without Lightning or Hydra.

A checkpoint is a Lightning checkpoint (``torch.save`` dict) with plain contents only, so
``torch.load(path, weights_only=True)`` reads it:

* ``hyper_parameters``: the :class:`~escn_train.training.module.PotentialModule` arguments
  (``model`` = eSCN kwargs, ``loss``, ``optimizer``, ``scheduler``, ``normalizer``, ``ema``);
* ``state_dict``: ``potential.*`` (trained weights and normaliser buffers),
  ``ema.module.*`` (the EMA copy, when enabled), metric states;
* ``normalizers``: energy mean/std (eV), force std, element references, ``energy_scale``
  (the ``potential.energy_std`` buffer holds ``energy_std · energy_scale``);
* ``config``: the resolved run configuration (plain dict), ``run_info`` (e.g. wandb id),
  ``rng_states``, plus Lightning's ``optimizer_states``, ``lr_schedulers``, ``loops``,
  ``callbacks``, ``epoch``, ``global_step``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch

from escn_train.models.escn import eSCN
from escn_train.models.potential import ESCNPotential

POTENTIAL_PREFIX = "potential."
EMA_PREFIX = "ema.module."
#: eSCN arguments that do not change the weights (how the model runs, not what it is).
RUNTIME_MODEL_KEYS = ("compile", "export")


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True``; errors name the file.

    ``mmap=True`` maps the tensors instead of reading them (for a quick look at the metadata).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{path}: not an escn-train checkpoint (expected 'state_dict' and 'hyper_parameters')")
    if "model" not in checkpoint["hyper_parameters"]:
        raise ValueError(f"{path}: hyper_parameters has no 'model' (eSCN arguments)")
    return checkpoint


def model_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``model.KEY is X here but Y in the checkpoint`` for each eSCN argument that differs.

    Arguments left out on either side count as eSCN's default; runtime switches
    (:data:`RUNTIME_MODEL_KEYS`) are ignored.
    """
    defaults = {
        name: p.default for name, p in inspect.signature(eSCN.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    out = []
    for key in sorted((set(saved) | set(current)) - set(RUNTIME_MODEL_KEYS)):
        here, there = current.get(key, defaults.get(key)), saved.get(key, defaults.get(key))
        if here != there:
            out.append(f"model.{key} is {here!r} here but {there!r} in the checkpoint")
    return out


def potential_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """``ESCNPotential`` state dict from a checkpoint: the EMA weights when present and asked for."""
    state = checkpoint["state_dict"]
    prefix = EMA_PREFIX if use_ema and any(k.startswith(EMA_PREFIX) for k in state) else POTENTIAL_PREFIX
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"checkpoint state_dict has no '{prefix}*' entries")
    return out


def load_potential(
    path: str | os.PathLike, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> ESCNPotential:
    """Rebuild the trained :class:`ESCNPotential` (eval mode) from a project checkpoint.

    The network is constructed from the eSCN arguments stored in the checkpoint and gets the
    EMA weights (``use_ema=True``, when the run kept an EMA) or the raw trained weights;
    normalisers come with the state dict, so predictions are in eV and eV/Å.
    """
    checkpoint = read_checkpoint(path, map_location)
    model_kwargs = dict(checkpoint["hyper_parameters"]["model"])
    model_kwargs.pop("compile", None)  # compiling is a deployment choice, not part of the weights
    potential = ESCNPotential(eSCN(**model_kwargs))
    potential.load_state_dict(potential_state_dict(checkpoint, use_ema), strict=True)
    return potential.eval()


def init_module_from_checkpoint(module: torch.nn.Module, path: str | os.PathLike, use_ema: bool = True) -> None:
    """Fine-tuning start: copy weights and normalisers of ``path`` into a fresh ``PotentialModule``.

    Only the potential is taken (EMA weights by default); optimizer, scheduler, step counter
    and the EMA history start anew. The architectures must match.
    """
    checkpoint = read_checkpoint(path)
    differences = model_differences(checkpoint["hyper_parameters"]["model"], module.hparams["model"])
    if differences:
        raise ValueError(f"init_from={path}: {'; '.join(differences)}")
    saved_scale = float((checkpoint.get("normalizers") or {}).get("energy_scale", 1.0))
    if saved_scale != module.energy_scale:
        raise ValueError(
            f"init_from={path}: normalizer.energy_scale is {module.energy_scale} here but {saved_scale} in the "
            "checkpoint; set normalizer.energy_scale to match"
        )
    state = potential_state_dict(checkpoint, use_ema)
    module.potential.load_state_dict(state, strict=True)
    if module.ema is not None:
        module.ema.copy_from(module.potential)
    module.normalizers_ready = True
