"""Optimizer parameter groups and learning-rate schedules, from plain config dicts.

* Parameter groups: weight decay applies to weight matrices only; biases, embedding tables
  and other 1-D parameters get none, and frozen parameters (the eSCN sphere samples) are
  left out of the optimizer.
* Schedules (per optimizer step unless noted), all multiplying the base ``lr``:

  - ``cosine``: linear warmup from ``warmup_factor`` to 1 over ``warmup_steps``, then a
    cosine decay to ``min_lr_ratio`` at the last training step;
  - ``step``: the same warmup, then ``× gamma`` at each of ``milestones`` (steps; a float
    below 1 is a fraction of the total steps). The published eSCN recipe is warmup 100
    steps from 0.2, ``gamma`` 0.3;
  - ``plateau``: ``ReduceLROnPlateau`` on a validation metric, checked every validation;
  - ``constant``: the warmup only.

The LR multipliers are small callable objects rather than closures so that the scheduler
state in a checkpoint is plain numbers (loadable with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adam")
SCHEDULERS = ("cosine", "step", "plateau", "constant")


class OptimConfigError(ValueError):
    """An optimizer or scheduler setting is invalid; the message names the config key."""


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weight matrices, and undecayed biases/embeddings/1-D tensors."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, mod in module.named_modules():
        for name, param in mod.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(mod, nn.Embedding) or name == "bias" or param.ndim <= 1:
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [{"params": decay, "weight_decay": float(weight_decay), "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def _number(config: Mapping[str, Any], key: str, prefix: str, default: Any, minimum: float | None = None) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptimConfigError(f"{prefix}.{key}: expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise OptimConfigError(f"{prefix}.{key}: must be >= {minimum}, got {value!r}")
    return float(value)


def build_optimizer(module: nn.Module, config: Mapping[str, Any], fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW/Adam over :func:`parameter_groups` of ``module``.

    Keys: ``name`` (adamw, adam), ``lr``, ``weight_decay``, ``amsgrad``, ``betas``, ``eps``.
    ``fused``: the one-kernel step (None: where the parameters' device allows it).
    """
    config = dict(config)
    allowed = {"name", "lr", "weight_decay", "amsgrad", "betas", "eps"}
    unknown = set(config) - allowed
    if unknown:
        raise OptimConfigError(f"optimizer: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    name = config.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise OptimConfigError(f"optimizer.name: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    lr = _number(config, "lr", "optimizer", 1e-3, 0.0)
    weight_decay = _number(config, "weight_decay", "optimizer", 0.0, 0.0)
    eps = _number(config, "eps", "optimizer", 1e-8, 0.0)
    betas = tuple(config.get("betas", (0.9, 0.999)))
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise OptimConfigError(f"optimizer.betas: expected two numbers in [0, 1), got {config.get('betas')!r}")
    amsgrad = config.get("amsgrad", False)
    if not isinstance(amsgrad, bool):
        raise OptimConfigError(f"optimizer.amsgrad: expected true/false, got {amsgrad!r}")
    groups = parameter_groups(module, weight_decay)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    if name == "adam" and weight_decay:
        raise OptimConfigError("optimizer.weight_decay: Adam couples decay with the gradient; use name=adamw")
    fused = _fused_supported(groups) if fused is None else fused
    return cls(groups, lr=lr, betas=betas, eps=eps, amsgrad=amsgrad, fused=fused)


def _fused_supported(groups: list[dict[str, Any]]) -> bool:
    """Fused kernels (one per step) for floating-point CUDA/CPU parameters.

    Besides being faster, a fused step can be skipped from a device flag (``found_inf``), which
    the non-finite guard uses to avoid a host sync every step.
    """
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params)


class WarmupCosine:
    """LR multiplier: linear warmup, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""

    def __init__(self, warmup_steps: int, warmup_factor: float, total_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.total_steps = int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            return self.warmup_factor * (1.0 - alpha) + alpha
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupMultiStep:
    """LR multiplier: linear warmup, then ``gamma ** (milestones passed)``."""

    def __init__(self, warmup_steps: int, warmup_factor: float, milestones: Sequence[int], gamma: float) -> None:
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            return self.warmup_factor * (1.0 - alpha) + alpha
        return self.gamma ** bisect.bisect_right(self.milestones, step)


def _milestones(values: Any, total_steps: int) -> list[int]:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise OptimConfigError(f"scheduler.milestones: expected a list of steps, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise OptimConfigError(f"scheduler.milestones: entries must be positive steps or fractions, got {value!r}")
        out.append(int(round(value * total_steps)) if isinstance(value, float) and value < 1 else int(value))
    return sorted(out)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Mapping[str, Any] | None, total_steps: int
) -> dict[str, Any] | None:
    """A Lightning ``lr_scheduler`` config dict for ``config`` (None for no schedule).

    Keys: ``name`` and, per schedule, ``warmup_steps``, ``warmup_factor``, ``min_lr_ratio``
    (cosine), ``milestones``, ``gamma`` (step), ``monitor``, ``mode``, ``factor``,
    ``patience``, ``threshold``, ``min_lr`` (plateau).
    """
    if config is None:
        return None
    config = dict(config)
    name = config.get("name", "constant")
    if name not in SCHEDULERS:
        raise OptimConfigError(f"scheduler.name: unknown schedule {name!r}; choose from {', '.join(SCHEDULERS)}")
    allowed = {
        "cosine": {"warmup_steps", "warmup_factor", "min_lr_ratio"},
        "step": {"warmup_steps", "warmup_factor", "milestones", "gamma"},
        "plateau": {"monitor", "mode", "factor", "patience", "threshold", "min_lr"},
        "constant": {"warmup_steps", "warmup_factor"},
    }[name] | {"name"}
    unknown = set(config) - allowed
    if unknown:
        raise OptimConfigError(
            f"scheduler: keys {sorted(unknown)} do not apply to scheduler.name={name}; allowed: {sorted(allowed)}"
        )
    if name == "plateau":
        mode = config.get("mode", "min")
        if mode not in ("min", "max"):
            raise OptimConfigError(f"scheduler.mode: expected min or max, got {mode!r}")
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode=mode,
            factor=_number(config, "factor", "scheduler", 0.5, 0.0),
            patience=int(_number(config, "patience", "scheduler", 3, 0)),
            threshold=_number(config, "threshold", "scheduler", 1e-4, 0.0),
            min_lr=_number(config, "min_lr", "scheduler", 0.0, 0.0),
        )
        return {
            "scheduler": scheduler,
            "interval": "epoch",
            "monitor": config.get("monitor", "val/forces_mae"),
            "strict": True,
            "name": "lr",
        }
    warmup_steps = int(_number(config, "warmup_steps", "scheduler", 0, 0))
    warmup_factor = _number(config, "warmup_factor", "scheduler", 1.0, 0.0)
    if name == "cosine":
        min_ratio = _number(config, "min_lr_ratio", "scheduler", 0.0, 0.0)
        multiplier: Any = WarmupCosine(warmup_steps, warmup_factor, total_steps, min_ratio)
    elif name == "step":
        gamma = _number(config, "gamma", "scheduler", 0.3, 0.0)
        multiplier = WarmupMultiStep(
            warmup_steps, warmup_factor, _milestones(config.get("milestones", []), total_steps), gamma
        )
    else:
        multiplier = WarmupMultiStep(warmup_steps, warmup_factor, [], 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}
