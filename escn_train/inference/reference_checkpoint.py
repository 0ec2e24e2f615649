"""Convert fairchem/OCP eSCN checkpoints into escn-train checkpoints.

Input (a ``torch.save`` dict, see ``shared/spec/OC20_FORMATS.md``): ``state_dict`` with any
number of ``module.`` prefixes; ``config`` whose model is ``escn`` or ``escn_export``
(``config["model"] = {"name": ..., **kwargs}``, or the trainer's ``config["model"] = name``
with ``config["model_attributes"]``); ``normalizers`` in the old (``target``/``grad_target``
with ``mean``/``std``) or new (``energy``/``forces`` with ``mean``/``rmsd``) layout;
optionally ``ema`` (fairchem's EMA state: ``shadow_params`` aligned with the model's
trainable parameters in registration order) and ``elementrefs``.

Output: a Lightning-style checkpoint that :func:`escn_train.training.checkpoint.load_potential`,
``escn-predict``, ``escn-export``, :class:`escn_train.ase.ESCNCalculator` and
``python train.py init_from=...`` read: ``hyper_parameters.model`` (every eSCN argument),
``state_dict`` with ``potential.*`` (the raw weights and the normalisers) and, when the
reference kept an EMA and ``use_ema``, ``ema.module.*`` (the averaged weights, used by
default), ``normalizers``, and ``converted_from`` recording what was kept and what was not.

    physical energy = model energy · std + mean + Σ element references;  forces = model forces · std

Example::

    escn-convert-checkpoint escn_l6_m3_lay20_all_md_s2ef.pt -o escn_l6m3.ckpt
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from escn_train.models.escn import eSCN
from escn_train.models.potential import ESCNPotential

REFERENCE_MODEL_NAMES = ("escn", "escn_export")

#: Defaults of the reference ``escn`` class (``escn_export`` has this project's eSCN defaults).
_ESCN_MAIN_DEFAULTS: dict[str, Any] = {
    "max_neighbors": 40,
    "cutoff": 8.0,
    "max_num_elements": 90,
    "num_layers": 8,
    "lmax": 6,
    "mmax": 2,
    "sphere_channels": 128,
    "hidden_channels": 256,
    "edge_channels": 128,
    "num_sphere_samples": 128,
    "distance_function": "gaussian",
    "basis_width_scalar": 1.0,
    "distance_resolution": 0.02,
}

#: Reference kwargs that do not change the weights or the network: dropped (and reported).
_DROPPED_KWARGS = {
    "use_pbc": "periodicity is taken from each structure (pbc)",
    "use_pbc_single": "graph-construction detail",
    "otf_graph": "the graph is always built on the fly",
    "show_timing_info": "logging only",
    "compile": "a deployment choice",
    "export": "both calling conventions are always available",
    "use_grid": "unused by the reference eSCN",
}
#: Reference kwargs accepted only with the value this implementation computes.
_REQUIRED_VALUES = {
    "regress_forces": True,  # without it the reference has no force head
    "enforce_max_neighbors_strictly": True,  # this project's graph always truncates strictly
}

_LIGHTNING_KEYS = ("epoch", "global_step")

#: Why fairchem's two prediction routes disagree on a checkpoint with an EMA (fairchem 1.x).
FAIRCHEM_EMA_NOTE = (
    "fairchem itself predicts with different weights depending on the route: OCPCalculator(checkpoint_path=...) "
    "loads the checkpoint with inference_only=True, which never builds the EMA, so it uses the raw weights; "
    "the trainer's predict mode (main.py --mode predict, with optim.ema_decay set) swaps the EMA weights in. "
    "Compare with OCPCalculator using --no-ema, and with predict mode using the default EMA weights."
)


class ReferenceCheckpointError(ValueError):
    """The file is not a convertible fairchem/OCP eSCN checkpoint; the message says why."""


def is_reference_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """A fairchem/OCP checkpoint: ``state_dict`` and ``config``, no Lightning ``hyper_parameters``."""
    return "state_dict" in checkpoint and "config" in checkpoint and "hyper_parameters" not in checkpoint


def read_reference_checkpoint(path: str | Path, unsafe_load: bool = False) -> dict[str, Any]:
    """Load the file (tensors and plain containers only unless ``unsafe_load``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except Exception as exc:
        hint = "" if unsafe_load else " If you trust the file, retry with --unsafe-load (full unpickling)."
        raise ReferenceCheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {exc}).{hint}") from exc
    if not isinstance(checkpoint, Mapping) or not is_reference_checkpoint(checkpoint):
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ReferenceCheckpointError(
            f"{path}: unknown checkpoint layout (found keys {keys}); expected a fairchem/OCP checkpoint "
            "with 'state_dict' and 'config'"
        )
    return dict(checkpoint)


# ---------------------------------------------------------------------------------------- pieces
def _model_section(config: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(model name, reference kwargs) from either config layout."""
    model = config.get("model")
    if isinstance(model, Mapping):
        kwargs = dict(model)
        name = kwargs.pop("name", None)
    elif isinstance(model, str):
        name, kwargs = model, dict(config.get("model_attributes") or {})
    else:
        raise ReferenceCheckpointError(
            f"{source}: config has no model section (config keys: {sorted(config)})"
        )
    if not isinstance(name, str) or name.lower() not in REFERENCE_MODEL_NAMES:
        raise ReferenceCheckpointError(
            f"{source}: model name {name!r} is not supported; expected one of {list(REFERENCE_MODEL_NAMES)}"
        )
    return name.lower(), kwargs


def reference_model_kwargs(name: str, kwargs: Mapping[str, Any], source: str = "checkpoint") -> tuple[dict, dict]:
    """Translate reference kwargs into this project's eSCN arguments.

    Returns ``(escn_kwargs with every argument filled, dropped {key: reason})``. Old
    ``lmax_list``/``mmax_list`` become ``lmax``/``mmax``; kwargs that only steer graph
    construction or logging are dropped; anything that would change the architecture and is
    not supported raises :class:`ReferenceCheckpointError` naming it.
    """
    kwargs = dict(kwargs)
    dropped: dict[str, str] = {}
    for key, old in (("lmax", "lmax_list"), ("mmax", "mmax_list")):
        if old in kwargs:
            values = kwargs.pop(old)
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if len(values) != 1:
                raise ReferenceCheckpointError(
                    f"{source}: model.{old}={values}: several resolutions are not supported (one value only)"
                )
            if key in kwargs and int(kwargs[key]) != int(values[0]):
                raise ReferenceCheckpointError(f"{source}: model.{old}={values} contradicts model.{key}={kwargs[key]}")
            kwargs[key] = int(values[0])
            dropped[old] = f"translated to {key}={kwargs[key]}"
    for key, required in _REQUIRED_VALUES.items():
        if key in kwargs:
            value = kwargs.pop(key)
            if value != required:
                raise ReferenceCheckpointError(
                    f"{source}: model.{key}={value!r} is not supported (only {required!r})"
                )
            dropped[key] = f"{value!r} is what this implementation does"
    for key, reason in _DROPPED_KWARGS.items():
        if key in kwargs:
            value = kwargs.pop(key)
            dropped[key] = f"{value!r} ignored: {reason}"
    accepted = [p for p in inspect.signature(eSCN).parameters if p not in ("compile", "export", "random_frames")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ReferenceCheckpointError(
            f"{source}: model arguments {unknown} are not supported by this eSCN (it takes {accepted}); "
            "they may change the architecture, so the checkpoint is not converted"
        )
    defaults = {p.name: p.default for p in inspect.signature(eSCN).parameters.values()}
    if name == "escn":
        defaults.update(_ESCN_MAIN_DEFAULTS)
    full = {**defaults, **kwargs, "compile": False, "export": False, "random_frames": False}
    return full, dropped


def _strip_module_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove every leading ``module.`` (DataParallel / DDP wrappers, any depth)."""
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def _scalar(value: Any, where: str) -> float:
    tensor = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if tensor.numel() != 1:
        raise ReferenceCheckpointError(f"{where}: expected one number, got shape {tuple(tensor.shape)}")
    return float(tensor[0])


def reference_normalizers(checkpoint: Mapping[str, Any], source: str) -> tuple[dict[str, float], str]:
    """``({energy_mean, energy_std, force_std}, description)`` from either normaliser layout.

    A missing normaliser means the reference did not rescale that target (mean 0, scale 1).
    """
    norms = checkpoint.get("normalizers") or {}
    if not isinstance(norms, Mapping):
        raise ReferenceCheckpointError(f"{source}: 'normalizers' is a {type(norms).__name__}, expected a dict")
    unknown = sorted(set(norms) - {"target", "grad_target", "energy", "forces"})
    if unknown:
        raise ReferenceCheckpointError(
            f"{source}: normalizers for {unknown} are not supported (known: target, grad_target, energy, forces)"
        )

    def pick(new: str, old: str) -> tuple[float, float, str] | None:
        found = []
        for key in (new, old):
            if key in norms and norms[key] is not None:
                entry = norms[key]
                scale_key = "rmsd" if "rmsd" in entry else "std"
                if scale_key not in entry or "mean" not in entry:
                    raise ReferenceCheckpointError(
                        f"{source}: normalizers['{key}'] has keys {sorted(entry)}; expected 'mean' and 'std' or 'rmsd'"
                    )
                found.append((_scalar(entry["mean"], f"{source}: normalizers['{key}']['mean']"),
                              _scalar(entry[scale_key], f"{source}: normalizers['{key}']['{scale_key}']"),
                              f"{key}.mean/{scale_key}"))
        if len(found) == 2 and found[0][:2] != found[1][:2]:
            raise ReferenceCheckpointError(f"{source}: normalizers '{new}' and '{old}' disagree: {found}")
        return found[0] if found else None

    energy, forces = pick("energy", "target"), pick("forces", "grad_target")
    described = []
    values = {"energy_mean": 0.0, "energy_std": 1.0, "force_std": 1.0}
    if energy is not None:
        values["energy_mean"], values["energy_std"] = energy[0], energy[1]
        described.append(f"energy from {energy[2]}")
    else:
        described.append("no energy normaliser (mean 0, std 1)")
    if forces is not None:
        if abs(forces[0]) > 1e-12:
            raise ReferenceCheckpointError(
                f"{source}: force normaliser mean is {forces[0]} ({forces[2]}); only a zero force mean is supported"
            )
        values["force_std"] = forces[1]
        described.append(f"forces from {forces[2]}")
    else:
        described.append("no force normaliser (std 1)")
    for key in ("energy_std", "force_std"):
        if values[key] <= 0:
            raise ReferenceCheckpointError(f"{source}: normaliser scale {key}={values[key]} must be positive")
    return values, "; ".join(described)


def reference_element_refs(checkpoint: Mapping[str, Any], source: str) -> list[float] | None:
    """Per-element energy references (indexed by atomic number) from ``elementrefs``, if any."""
    refs = checkpoint.get("elementrefs")
    if not refs:
        return None
    if isinstance(refs, Mapping):
        extra = sorted(set(refs) - {"energy"})
        if extra:
            raise ReferenceCheckpointError(f"{source}: elementrefs for {extra} are not supported (energy only)")
        refs = refs.get("energy")
        if isinstance(refs, Mapping):
            if "element_references" not in refs:
                raise ReferenceCheckpointError(
                    f"{source}: elementrefs['energy'] has keys {sorted(refs)}; expected 'element_references'"
                )
            refs = refs["element_references"]
    if refs is None:
        return None
    return torch.as_tensor(refs, dtype=torch.float64).flatten().tolist()


def _ema_weights(
    checkpoint: Mapping[str, Any], reference_keys: Sequence[str], model: eSCN, source: str
) -> dict[str, torch.Tensor] | None:
    """Map fairchem's ``ema.shadow_params`` (a list) onto parameter names.

    The list follows the reference model's trainable parameters in registration order, which
    is the order of those parameters among the checkpoint's ``state_dict`` keys; each pairing
    is checked against this eSCN's parameter shapes.
    """
    ema = checkpoint.get("ema")
    if not ema:
        return None
    if not isinstance(ema, Mapping) or "shadow_params" not in ema:
        keys = sorted(ema) if isinstance(ema, Mapping) else type(ema).__name__
        raise ReferenceCheckpointError(f"{source}: 'ema' has {keys}; expected fairchem's EMA state with 'shadow_params'")
    shadow = list(ema["shadow_params"])
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    order = [k for k in reference_keys if k in trainable]
    if set(order) != set(trainable) or len(shadow) != len(order):
        raise ReferenceCheckpointError(
            f"{source}: ema.shadow_params has {len(shadow)} tensors but the model has {len(trainable)} trainable "
            f"parameters ({len(order)} found in the state_dict); cannot pair them"
        )
    out = {}
    for i, (name, tensor) in enumerate(zip(order, shadow)):
        if tuple(tensor.shape) != tuple(trainable[name].shape):
            raise ReferenceCheckpointError(
                f"{source}: ema.shadow_params[{i}] has shape {tuple(tensor.shape)} but parameter {name} "
                f"(position {i} among trainable parameters) has {tuple(trainable[name].shape)}"
            )
        out[name] = tensor.detach().to(torch.float32)
    return out


def _plain(value: Any) -> Any:
    """Config values as types ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


# ---------------------------------------------------------------------------------------- conversion
def convert_checkpoint(checkpoint: Mapping[str, Any], source: str = "checkpoint", use_ema: bool = True) -> dict[str, Any]:
    """An escn-train checkpoint dict from a fairchem/OCP eSCN checkpoint dict (see module docstring)."""
    if not is_reference_checkpoint(checkpoint):
        raise ReferenceCheckpointError(
            f"{source}: unknown checkpoint layout (found keys {sorted(checkpoint)}); expected 'state_dict' and 'config'"
        )
    name, reference_kwargs = _model_section(checkpoint["config"], source)
    model_kwargs, dropped_kwargs = reference_model_kwargs(name, reference_kwargs, source)
    normalizers, normalizer_note = reference_normalizers(checkpoint, source)
    element_refs = reference_element_refs(checkpoint, source)

    model = eSCN(**model_kwargs)
    state = _strip_module_prefixes(checkpoint["state_dict"])
    reference_keys = ["sphharm_weights" if k == "sphharm_weights.0" else k for k in state]
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ReferenceCheckpointError(
            f"{source}: the state_dict does not fit an eSCN with {reference_kwargs}: {exc}"
        ) from exc
    potential = ESCNPotential(model, element_references=element_refs, **normalizers)

    ema_weights = _ema_weights(checkpoint, reference_keys, model, source)
    averaged = None
    if ema_weights is not None and use_ema:
        averaged = copy.deepcopy(potential)
        averaged.model.load_state_dict(ema_weights, strict=False)
        ema_note = (
            "EMA weights kept and used by default (escn-predict, escn-export, ESCNCalculator, train.py init_from=); "
            "--no-ema / use_ema=False for the raw weights"
        )
    elif ema_weights is None:
        ema_note = "no EMA in the checkpoint: the raw weights, as every fairchem route uses"
    else:
        ema_note = "EMA present but not kept (--no-ema): the raw weights"
    ema_state = checkpoint.get("ema") or {}
    carried = {"state_dict", "config", "normalizers", "ema", "elementrefs", "epoch", "step"}
    not_carried = sorted(k for k in checkpoint if k not in carried and checkpoint[k] is not None)
    converted = potential_checkpoint(
        potential,
        model_kwargs,
        ema_potential=averaged,
        ema_decay=float(ema_state.get("decay") or 0.999),
        ema_updates=int(ema_state.get("num_updates") or 0),
        element_references=element_refs is not None,
        epoch=int(checkpoint.get("epoch") or 0),
        global_step=int(checkpoint.get("step") or 0),
    )
    converted["converted_from"] = {
        "source": str(source),
        "model_name": name,
        "reference_kwargs": _plain(reference_kwargs),
        "dropped_kwargs": dropped_kwargs,
        "normalizers": normalizer_note,
        "element_references": "from elementrefs" if element_refs is not None else "none",
        "ema": ema_note,
        "has_ema": ema_weights is not None,
        "not_carried": not_carried,
    }
    converted["reference_config"] = _plain(checkpoint["config"])
    return converted


def potential_checkpoint(
    potential: ESCNPotential,
    model_kwargs: Mapping[str, Any],
    ema_potential: ESCNPotential | None = None,
    ema_decay: float = 0.999,
    ema_updates: int = 0,
    element_references: bool = True,
    epoch: int = 0,
    global_step: int = 0,
) -> dict[str, Any]:
    """An escn-train checkpoint dict for a potential (and optionally its EMA copy).

    The layout is the one training writes (``hyper_parameters``, ``state_dict`` with
    ``potential.*``/``ema.module.*``, ``normalizers``), so ``load_potential``, the inference
    tools and ``train.py init_from=...`` read it. ``model_kwargs`` are the eSCN arguments.
    """
    normalizers = {
        "energy_mean": float(potential.energy_mean),
        "energy_std": float(potential.energy_std),
        "force_std": float(potential.force_std),
    }
    refs = potential.element_references.tolist() if element_references else None
    state_dict = {f"potential.{k}": v.detach().cpu().clone() for k, v in potential.state_dict().items()}
    ema_hparams = None
    if ema_potential is not None:
        state_dict.update({f"ema.module.{k}": v.detach().cpu().clone() for k, v in ema_potential.state_dict().items()})
        state_dict["ema.num_updates"] = torch.tensor(int(ema_updates))
        ema_hparams = {"decay": float(ema_decay), "warmup": False}
    return {
        "epoch": int(epoch),
        "global_step": int(global_step),
        "pytorch-lightning_version": _lightning_version(),
        "hyper_parameters": {
            "model": dict(model_kwargs),
            "normalizer": {**normalizers, "element_references": refs if refs is not None else False},
            "ema": ema_hparams,
        },
        "state_dict": state_dict,
        "normalizers": {**normalizers, "element_references": refs},
    }


def _lightning_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning")
    except PackageNotFoundError:  # pragma: no cover - lightning is a dependency
        return "0.0.0"


def convert_file(
    source: str | Path, output: str | Path, use_ema: bool = True, unsafe_load: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Convert ``source`` and write ``output``; returns the written checkpoint dict."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists (use --force to overwrite)")
    converted = convert_checkpoint(read_reference_checkpoint(source, unsafe_load), str(source), use_ema)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, output)
    return converted


def summary(converted: Mapping[str, Any]) -> str:
    """Human-readable account of a conversion."""
    info = converted["converted_from"]
    model = converted["hyper_parameters"]["model"]
    norms = converted["normalizers"]
    lines = [
        f"model: {info['model_name']} -> eSCN(lmax={model['lmax']}, mmax={model['mmax']}, "
        f"layers={model['num_layers']}, C={model['sphere_channels']}, cutoff={model['cutoff']}, "
        f"max_neighbors={model['max_neighbors']})",
        f"normalizers: energy mean {norms['energy_mean']:.6g}, std {norms['energy_std']:.6g}; "
        f"force std {norms['force_std']:.6g} ({info['normalizers']})",
        f"element references: {info['element_references']}",
        f"EMA: {info['ema']}",
    ]
    if info.get("has_ema"):
        lines.append(FAIRCHEM_EMA_NOTE)
    for key, reason in info["dropped_kwargs"].items():
        lines.append(f"model.{key}: {reason}")
    if info["not_carried"]:
        lines.append(f"not carried over (training state): {', '.join(info['not_carried'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="escn-convert-checkpoint",
        description="Convert a fairchem/OCP eSCN checkpoint (escn or escn_export) into an escn-train checkpoint.",
    )
    parser.add_argument("checkpoint", help="fairchem/OCP checkpoint (.pt)")
    parser.add_argument("-o", "--output", required=True, help="escn-train checkpoint to write (.ckpt)")
    parser.add_argument("--no-ema", action="store_true", help="keep only the raw weights, not the EMA weights")
    parser.add_argument(
        "--unsafe-load", action="store_true", help="unpickle the input fully (only for files you trust)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``escn-convert-checkpoint``)."""
    args = build_parser().parse_args(argv)
    try:
        converted = convert_file(args.checkpoint, args.output, not args.no_ema, args.unsafe_load, args.force)
    except (ReferenceCheckpointError, FileNotFoundError, FileExistsError) as exc:
        print(f"escn-convert-checkpoint: error: {exc}", file=sys.stderr)
        return 2
    print(summary(converted))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
