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
import zipfile
from collections.abc import Collection, Mapping
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


class CheckpointMismatchError(ValueError):
    """A fine-tuning setting contradicts the ``init_from`` checkpoint; the message is one line."""


#: Normaliser values a fine-tune takes from its checkpoint (with the weights they belong to).
INIT_NORMALIZER_VALUES = ("energy_mean", "energy_std", "force_std", "element_references")
#: Model arguments that are deployment choices, not part of the weights.
_NOT_ARCHITECTURE = ("compile", "export")


def read_init_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint to fine-tune from: an escn-train checkpoint, or a fairchem/OCP eSCN
    checkpoint converted in memory (as ``escn-convert-checkpoint`` would, EMA weights kept).

    ``mmap=True`` maps the tensors instead of reading them, where the file's format allows
    (the settings need only the metadata; the weights are read once, when they are loaded).
    """
    if not os.path.isfile(path):
        raise CheckpointMismatchError(f"init_from={path}: no such checkpoint file")
    try:
        # torch maps only zip-format files (the legacy format is read whole)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointMismatchError(
            f"init_from={path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: {first_line}); "
            "if it is a fairchem checkpoint you trust, convert it first with escn-convert-checkpoint --unsafe-load"
        ) from exc
    if isinstance(checkpoint, Mapping):
        from escn_train.inference.reference_checkpoint import (
            ReferenceCheckpointError,
            convert_checkpoint,
            is_reference_checkpoint,
        )

        if is_reference_checkpoint(checkpoint):
            try:
                return convert_checkpoint(checkpoint, source=str(path))
            except ReferenceCheckpointError as exc:
                raise CheckpointMismatchError(f"init_from={exc}") from exc
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint or "model" not in checkpoint.get(
        "hyper_parameters", {}
    ):
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointMismatchError(
            f"init_from={path}: not an escn-train or fairchem eSCN checkpoint (found {keys}; expected 'state_dict' "
            "and 'hyper_parameters' with 'model', or fairchem's 'state_dict' and 'config')"
        )
    return dict(checkpoint)


def checkpoint_normalizer_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``energy_mean``, ``energy_std`` (eV, without the scale), ``force_std``, ``element_references``
    (list, or False) and ``energy_scale`` as a training configuration would give them."""
    saved = dict(checkpoint.get("normalizers") or {})
    if not saved:  # older checkpoints: the buffers hold them
        state = potential_state_dict(checkpoint, use_ema=False)
        scale = 1.0
        saved = {"energy_mean": float(state["energy_mean"]), "energy_std": float(state["energy_std"]),
                 "force_std": float(state["force_std"]), "element_references": state["element_references"].tolist()}
    else:
        scale = float(saved.get("energy_scale") or 1.0)
    refs = saved.get("element_references")
    return {
        "energy_mean": float(saved["energy_mean"]),
        "energy_std": float(saved["energy_std"]),
        "force_std": float(saved["force_std"]),
        "element_references": [float(r) for r in refs] if refs is not None else False,
        "energy_scale": scale,
    }


def init_from_settings(
    path: str | os.PathLike,
    model: Mapping[str, Any],
    normalizer: Mapping[str, Any],
    explicit: Collection[str] = (),
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``(model, normalizer, notes)`` for fine-tuning from ``path``.

    The eSCN arguments and the normaliser settings come from the checkpoint, because the
    weights only mean something with them; a setting named in ``explicit`` (dotted keys such
    as ``model.max_neighbors`` or ``normalizer.force_std``, typically the command line's
    ``key=value`` overrides) keeps the configured value. An explicit ``energy_scale`` other
    than the checkpoint's, or an explicit ``null`` normaliser (fit on the data) contradicts
    the weights and raises :class:`CheckpointMismatchError`; explicit model arguments are
    checked against the weights when they are loaded (:func:`init_module_from_checkpoint`).
    ``element_references: true/false`` only steers fitting, which a fine-tune does not do.
    ``notes`` says what was taken from the checkpoint where the configuration differed.
    """
    checkpoint = read_init_checkpoint(path, mmap=True)
    explicit = set(explicit)
    notes: list[str] = []
    saved_model = dict(checkpoint["hyper_parameters"]["model"])
    merged_model = dict(model)
    for key, value in saved_model.items():
        if key in _NOT_ARCHITECTURE or f"model.{key}" in explicit:
            continue
        if key in merged_model and merged_model[key] != value:
            notes.append(f"model.{key}={value!r} from the checkpoint (the configuration had {merged_model[key]!r})")
        merged_model[key] = value

    saved = checkpoint_normalizer_settings(checkpoint)
    merged_norm = dict(normalizer)
    scale = merged_norm.get("energy_scale")
    if "normalizer.energy_scale" in explicit and scale is not None and float(scale) != saved["energy_scale"]:
        raise CheckpointMismatchError(
            f"init_from={path}: normalizer.energy_scale={float(scale)} was set explicitly, but the checkpoint's energy "
            f"head was trained with energy_scale={saved['energy_scale']}; drop the override (a fine-tune takes it "
            "from the checkpoint)"
        )
    for key in ("energy_scale", *INIT_NORMALIZER_VALUES):
        given = merged_norm.get(key)
        if f"normalizer.{key}" in explicit:
            if given is None and key != "element_references":
                raise CheckpointMismatchError(
                    f"init_from={path}: normalizer.{key}=null asks to fit it on the data, but a fine-tune keeps the "
                    f"checkpoint's normalisers ({key}={saved[key]}) with its weights; give a number or drop the override"
                )
            if key != "element_references" or isinstance(given, (list, tuple)):
                if given != saved[key]:
                    notes.append(f"normalizer.{key}={given!r} as set (the checkpoint has {saved[key]!r})")
                continue
            notes.append(f"normalizer.element_references={given!r} only steers fitting; the checkpoint's references are kept")
        elif key == "energy_scale" and given is not None and float(given) != saved[key]:
            notes.append(f"normalizer.energy_scale={saved[key]} from the checkpoint (the configuration had {given})")
        merged_norm[key] = saved[key]
    return merged_model, merged_norm, notes


def _size_mismatch(error: RuntimeError) -> str:
    """The first ``size mismatch for ...`` line of a ``load_state_dict`` error."""
    for line in str(error).splitlines():
        line = line.strip()
        if line.startswith("size mismatch"):
            return line.rstrip(".")
    return str(error).splitlines()[0]


def init_module_from_checkpoint(
    module: torch.nn.Module, path: str | os.PathLike, use_ema: bool = True, explicit: Collection[str] = ()
) -> None:
    """Fine-tuning start: copy weights and normalisers of ``path`` into a fresh ``PotentialModule``.

    Only the potential is taken (EMA weights by default); optimizer, scheduler, step counter
    and the EMA history start anew. The module's model arguments must be the checkpoint's
    (see :func:`init_from_settings`), except those named in ``explicit`` whose values still
    fit the weights (e.g. ``model.max_neighbors``). Normaliser values the module was given
    explicitly replace the checkpoint's after loading.
    """
    checkpoint = read_init_checkpoint(path)
    saved = dict(checkpoint["hyper_parameters"]["model"])
    current = dict(module.hparams["model"])
    overridden = []
    for key in sorted(set(saved) | set(current)):
        if key in _NOT_ARCHITECTURE or saved.get(key) == current.get(key):
            continue
        if f"model.{key}" not in explicit:
            raise CheckpointMismatchError(
                f"init_from={path}: model.{key} is {current.get(key)!r} here but {saved.get(key)!r} in the checkpoint"
            )
        overridden.append(f"model.{key}={current.get(key)!r} (checkpoint: {saved.get(key)!r})")
    saved_scale = checkpoint_normalizer_settings(checkpoint)["energy_scale"]
    if saved_scale != module.energy_scale:
        raise CheckpointMismatchError(
            f"init_from={path}: normalizer.energy_scale is {module.energy_scale} here but {saved_scale} in the "
            "checkpoint; set normalizer.energy_scale to match"
        )
    state = potential_state_dict(checkpoint, use_ema)
    try:
        module.potential.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        if not overridden:
            raise
        raise CheckpointMismatchError(
            f"init_from={path}: {', '.join(overridden)} set explicitly does not fit the checkpoint's weights "
            f"({_size_mismatch(exc)}); drop the override"
        ) from None
    config = module.normalizer_config
    numbers = all(isinstance(config.get(k), (int, float)) for k in ("energy_mean", "energy_std", "force_std"))
    if numbers and config.get("element_references") is not True:
        module.set_normalizers(config)  # the checkpoint's values unless some were overridden
    if module.ema is not None:
        module.ema.copy_from(module.potential)
    module.normalizers_ready = True
