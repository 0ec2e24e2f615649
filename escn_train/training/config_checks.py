"""Early validation of a run configuration (a plain dict), with errors that name the key.

Runs before any data is read, so a typo such as ``loss.forces.type=l3`` or
``model.mmax=5``, or ``trainer=ddp trainer.devices=8`` on a machine without GPUs, fails in
a second with a message pointing at the setting, instead of after the dataset scan or deep
inside a constructor.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from escn_train.data.datamodule import is_absent_split
from escn_train.models.escn import eSCN
from escn_train.models.smearing import DISTANCE_FUNCTIONS
from escn_train.training.losses import EnergyForceLoss, LossConfigError
from escn_train.training.optim import OptimConfigError, build_optimizer, build_scheduler

RESUME_MODES = ("never", "auto")
PRECISIONS = (
    "32-true", "32", 32, "64-true", "64", 64, "bf16-mixed", "16-mixed", "bf16-true", "16-true", "transformer-engine",
)


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the key."""


def _int(model: Mapping[str, Any], key: str, minimum: int) -> int:
    value = model.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_model(model: Mapping[str, Any]) -> None:
    """eSCN arguments: known names, sizes in range, a known distance basis."""
    if not isinstance(model, Mapping):
        raise ConfigError(f"model: expected a mapping of eSCN arguments, got {model!r}")
    known = set(inspect.signature(eSCN.__init__).parameters) - {"self"}
    unknown = set(model) - known
    if unknown:
        raise ConfigError(f"model: unknown eSCN arguments {sorted(unknown)}; known: {sorted(known)}")
    for key in ("num_layers", "sphere_channels", "hidden_channels", "edge_channels", "num_sphere_samples",
                "max_neighbors", "max_num_elements"):
        if key in model:
            _int(model, key, 1)
    lmax = _int(model, "lmax", 1) if "lmax" in model else 4
    if "mmax" in model:
        mmax = _int(model, "mmax", 0)
        if mmax > lmax:
            raise ConfigError(f"model.mmax: must be <= model.lmax={lmax}, got {mmax}")
    for key in ("cutoff", "basis_width_scalar", "distance_resolution"):
        value = model.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"model.{key}: expected a positive number, got {value!r}")
    function = model.get("distance_function", "gaussian")
    if function not in DISTANCE_FUNCTIONS:
        raise ConfigError(f"model.distance_function: {function!r} is not one of {sorted(DISTANCE_FUNCTIONS)}")
    resolution = model.get("resolution")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise ConfigError(f"model.resolution: expected null or a positive integer, got {resolution!r}")
    if model.get("export"):
        raise ConfigError("model.export: must be false for training (export is for the deployed model)")


def _requested_devices(devices: Any) -> tuple[int, int] | None:
    """(count, highest index + 1) that ``trainer.devices`` asks for; None for "auto" / -1 (all)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None
        if "," in text:
            devices = [int(part) for part in text.split(",") if part.strip()]
        elif text.lstrip("-").isdigit():
            devices = int(text)
        else:
            raise ConfigError(f"trainer.devices: expected a count, a list of indices or auto, got {devices!r}")
    if isinstance(devices, bool):
        raise ConfigError(f"trainer.devices: expected a count, a list of indices or auto, got {devices!r}")
    if isinstance(devices, int):
        return None if devices == -1 else (devices, devices)
    if isinstance(devices, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in devices):
        return len(devices), max(devices, default=-1) + 1
    raise ConfigError(f"trainer.devices: expected a count, a list of indices or auto, got {devices!r}")


def check_devices(trainer: Mapping[str, Any]) -> None:
    """``trainer.accelerator`` / ``trainer.devices`` against the GPUs of this machine (before any data is read)."""
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    devices = trainer.get("devices", "auto")
    if accelerator not in ("gpu", "cuda"):
        return  # cpu: processes, not devices; auto: Lightning picks what is there
    available = torch.cuda.device_count()
    if available == 0 and accelerator == "gpu" and torch.backends.mps.is_available():
        available = 1  # Lightning's "gpu" is the Apple GPU there
    if available == 0:
        raise ConfigError(
            f"trainer.accelerator: {trainer.get('accelerator')!r} (with trainer.devices={devices}) needs a GPU, but "
            f"this machine has none (torch.cuda.device_count() = 0; {os.cpu_count()} CPU cores); use "
            "trainer.accelerator=cpu, e.g. trainer=ddp trainer.accelerator=cpu trainer.devices=2"
        )
    requested = _requested_devices(devices)
    if requested is not None and (requested[0] > available or requested[1] > available):
        raise ConfigError(
            f"trainer.devices: {devices!r} asks for GPU(s) this machine does not have: it has {available} "
            f"(indices 0..{available - 1}); set trainer.devices={available} or fewer"
        )


def check_config(cfg: Mapping[str, Any]) -> None:
    """Validate a resolved run configuration; raises :class:`ConfigError` naming the key."""
    check_model(cfg.get("model", {}))
    try:
        EnergyForceLoss(cfg.get("loss"))
        dummy = build_optimizer(nn.Linear(1, 1), cfg.get("optimizer") or {})
        build_scheduler(dummy, cfg.get("scheduler"), 100)
    except (LossConfigError, OptimConfigError) as err:
        raise ConfigError(str(err)) from None
    resume = cfg.get("resume", "never")
    if resume not in RESUME_MODES:
        raise ConfigError(f"resume: expected one of {', '.join(RESUME_MODES)}, got {resume!r}")
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ConfigError("init_from: cannot be combined with ckpt_path (resume continues a run; init_from starts a new one)")
    ema = cfg.get("ema") or {}
    decay = ema.get("decay")
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1):
        raise ConfigError(f"ema.decay: expected null or a number in [0, 1), got {decay!r}")
    trainer = cfg.get("trainer") or {}
    precision = trainer.get("precision", "32-true")
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision: {precision!r} is not one of {', '.join(map(str, PRECISIONS))}")
    if trainer.get("accelerator") == "cpu" and precision in ("16-mixed", "16-true"):
        raise ConfigError(f"trainer.precision: {precision} needs a GPU; use bf16-mixed or 32-true on CPU")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        raise ConfigError(f"trainer.gradient_clip_val: expected null or a number >= 0, got {clip!r}")
    check_devices(trainer)
    data = cfg.get("data") or {}
    for split in ("train", "val"):
        if is_absent_split(data.get(split)):
            raise ConfigError(f"data.{split}: a {split} split is required for training")
    normalizer = cfg.get("normalizer") or {}
    for key in ("energy_std", "force_std"):
        value = normalizer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"normalizer.{key}: expected null or a positive number, got {value!r}")
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads: expected null or a positive integer, got {threads!r}")
