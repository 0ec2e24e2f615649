"""One training run from a plain configuration dict: build, fit, test, write ``metrics.json``.

``train.py`` (Hydra) resolves the configuration into plain containers and calls
:func:`run_training`; nothing here depends on OmegaConf. Components with a ``_target_``
(datamodule, loggers, callbacks) are built with ``hydra.utils.instantiate``.
"""

from __future__ import annotations

import json
import warnings
import math
import os
import pickle
import time
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException

from escn_train.data.datamodule import is_absent_split
from escn_train.training.checkpoint import (
    CheckpointMismatchError,
    init_from_settings,
    init_module_from_checkpoint,
    model_differences,
    read_checkpoint,
)
from escn_train.training.config_checks import ConfigError, check_config
from escn_train.training.lightning_logging import configure_lightning_logging
from escn_train.training.module import PotentialModule
from escn_train.training.reliability import (
    AtomicCheckpointIO,
    EarlySignals,
    GracefulShutdown,
    NonFiniteGuard,
    cluster_plugins,
    remove_stale_temporaries,
    slurm_requeue,
)

WANDB_ID_FILE = "wandb_id.txt"
# The EMA copy is kept in eval mode on purpose; Lightning warns about eval-mode modules.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
METRICS_FILE = "metrics.json"
# Mid-epoch resume is exact: the datamodule saves and restores its batch sampler's position.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


# ---------------------------------------------------------------------------------- pieces
def build_datamodule(data: Mapping[str, Any]) -> L.LightningDataModule:
    """The datamodule of ``data`` (generating the demo files first when ``generate_demo`` is set)."""
    data = dict(data)
    demo_root = data.pop("generate_demo", None)
    if demo_root:
        from escn_train.data import ensure_demo_dataset

        ensure_demo_dataset(demo_root)
    if "_target_" not in data:
        raise ConfigError("data._target_: missing (e.g. escn_train.data.LmdbDataModule)")
    return instantiate(data, _convert_="all")


def build_module(cfg: Mapping[str, Any]) -> PotentialModule:
    """The LightningModule from the model/loss/optimizer/scheduler/normalizer/ema settings."""
    return PotentialModule(
        model=dict(cfg["model"]),
        loss=cfg.get("loss"),
        optimizer=cfg.get("optimizer"),
        scheduler=cfg.get("scheduler"),
        normalizer=cfg.get("normalizer"),
        ema=cfg.get("ema"),
        metrics_on_free_atoms=cfg.get("metrics_on_free_atoms", True),
        train_metrics=cfg.get("train_metrics", True),
    )


def resolve_ckpt_path(cfg: Mapping[str, Any], run_dir: Path) -> str | None:
    """The checkpoint to resume from: ``ckpt_path``, or with ``resume=auto`` the newest of the run's
    ``checkpoints/last.ckpt`` and ``hpc_ckpt_*.ckpt`` (SLURM requeue)."""
    path = cfg.get("ckpt_path")
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"ckpt_path: no such checkpoint file: {path}")
        return str(path)
    if cfg.get("resume", "never") == "auto":
        # last.ckpt, or a newer checkpoint Lightning's SLURM requeue handler wrote (hpc_ckpt_N.ckpt)
        candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
        candidates = [path for path in candidates if path.is_file()]
        if candidates:
            return str(max(candidates, key=lambda path: path.stat().st_mtime_ns))
    return None


def check_resume_model(ckpt_path: str, model: Mapping[str, Any], option: str) -> None:
    """Refuse, before any data is read, a checkpoint to resume whose network differs from ``model``.

    Lightning would only find out after the data set-up, with a list of missing and
    unexpected state-dict keys; this names each differing eSCN argument in one line.
    """
    try:
        checkpoint = read_checkpoint(ckpt_path, mmap=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        raise ConfigError(f"{option}: cannot resume from {ckpt_path}: {err}") from None
    differences = model_differences(checkpoint["hyper_parameters"]["model"], model)
    if differences:
        raise ConfigError(
            f"{option}: {ckpt_path} holds a different model: {'; '.join(differences)} "
            "(resume with the checkpoint's model settings)"
        )


def with_init_from_settings(cfg: Mapping[str, Any], explicit_keys: Collection[str] = ()) -> dict[str, Any]:
    """``cfg`` with the model arguments and normaliser settings of its ``init_from`` checkpoint,
    except the keys set explicitly (see :func:`~escn_train.training.checkpoint.init_from_settings`).
    ``data.neighbor_cutoff`` follows a changed ``model.cutoff`` unless set explicitly."""
    cfg = dict(cfg)
    try:
        model, normalizer, notes = init_from_settings(
            cfg["init_from"], cfg["model"], cfg.get("normalizer") or {}, explicit_keys
        )
    except CheckpointMismatchError as err:
        raise ConfigError(str(err)) from None
    data = dict(cfg["data"])
    old_cutoff = cfg["model"].get("cutoff")
    if data.get("neighbor_cutoff") == old_cutoff and "data.neighbor_cutoff" not in explicit_keys:
        data["neighbor_cutoff"] = model.get("cutoff", old_cutoff)
    cfg.update(model=model, normalizer=normalizer, data=data)
    check_config(cfg)
    if notes and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        print(f"init_from={cfg['init_from']}: " + "; ".join(notes), flush=True)
    return cfg


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_run_id(run_dir: Path, resume_from: str | None) -> str:
    """The wandb id of this run: from the resumed checkpoint, the run dir, or a new one (saved)."""
    run_id = None
    if resume_from:
        run_id = (read_checkpoint(resume_from).get("run_info") or {}).get("wandb_id")
    id_file = run_dir / WANDB_ID_FILE
    if run_id is None and id_file.is_file():
        run_id = id_file.read_text().strip() or None
    run_id = run_id or uuid.uuid4().hex[:12]
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    return run_id


def build_loggers(
    loggers: Mapping[str, Any] | None, run_dir: Path, resume_from: str | None, run_info: dict[str, Any]
) -> list[Any]:
    """Instantiate the named loggers; wandb gets a stable id and offline mode without a key."""
    out = []
    for name, spec in (loggers or {}).items():
        if spec is None:
            continue
        spec = dict(spec)
        if "WandbLogger" in str(spec.get("_target_", "")):
            run_id = wandb_run_id(run_dir, resume_from)
            run_info["wandb_id"] = run_id
            spec["id"] = run_id
            spec.setdefault("resume", "allow")
            if spec.get("offline") is None:
                spec["offline"] = not _wandb_has_credentials() and "WANDB_MODE" not in os.environ
        try:
            out.append(instantiate(spec, _convert_="all"))
        except Exception as err:  # instantiate wraps errors; name the logger
            raise ConfigError(f"logger.{name}: could not be created: {err}") from err
    return out


def build_callbacks(callbacks: Mapping[str, Any] | None, enable_progress_bar: bool = True) -> list[L.Callback]:
    """Instantiate the named callbacks (``None`` entries are switched off).

    With ``enable_progress_bar=False`` (``trainer.enable_progress_bar=false``) progress-bar
    callbacks are left out: Lightning refuses a progress bar it was told not to show.
    """
    from lightning.pytorch.callbacks import ProgressBar

    out = []
    for name, spec in (callbacks or {}).items():
        if spec is None:
            continue
        try:
            callback = instantiate(dict(spec), _convert_="all")
        except Exception as err:
            raise ConfigError(f"callbacks.{name}: could not be created: {err}") from err
        if isinstance(callback, ProgressBar) and not enable_progress_bar:
            continue
        out.append(callback)
    return out


def _check_reliability(reliability: Mapping[str, Any] | None) -> dict[str, Any]:
    reliability = dict(reliability or {})
    unknown = set(reliability) - {"max_consecutive_nonfinite", "handle_signals", "atomic_checkpoints"}
    if unknown:
        raise ConfigError(
            f"reliability: unknown keys {sorted(unknown)}; known: max_consecutive_nonfinite, handle_signals, "
            "atomic_checkpoints"
        )
    return reliability


def build_reliability(
    reliability: Mapping[str, Any] | None, early: EarlySignals | None = None
) -> tuple[list[L.Callback], list[Any]]:
    """Callbacks and Trainer plugins of the ``reliability`` section (see :mod:`~escn_train.training.reliability`).

    ``early``: the signals caught before training (handed to :class:`GracefulShutdown`).
    """
    reliability = _check_reliability(reliability)
    callbacks: list[L.Callback] = []
    plugins: list[Any] = []
    limit = reliability.get("max_consecutive_nonfinite", 5)
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"reliability.max_consecutive_nonfinite: expected a positive integer or null, got {limit!r}")
        callbacks.append(NonFiniteGuard(limit))
    if reliability.get("handle_signals", True):
        slurm = cluster_plugins()
        plugins.extend(slurm)
        callbacks.append(GracefulShutdown(early=early, slurm=bool(slurm)))
    if reliability.get("atomic_checkpoints", True):
        plugins.append(AtomicCheckpointIO())
    return callbacks, plugins


def _checkpoint_callback(trainer: L.Trainer) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor:
            return callback
    return None


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def format_summary(metrics: Mapping[str, float]) -> str:
    """A short human-readable comparison of the test errors with the zero-force baseline."""
    lines = []
    fmae, base = metrics.get("test/forces_mae"), metrics.get("test/forces_mae_zero_baseline")
    if fmae is not None and base:
        lines.append(f"test forces MAE {fmae:.4f} eV/Å vs zero-force baseline {base:.4f} eV/Å (ratio {fmae / base:.3f})")
    if "test/energy_mae" in metrics:
        lines.append(f"test energy MAE {metrics['test/energy_mae']:.4f} eV, EFwT {metrics.get('test/efwt', math.nan):.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main
def run_training(
    cfg: Mapping[str, Any], run_dir: str | os.PathLike, explicit_keys: Collection[str] = ()
) -> dict[str, Any]:
    """Fit (and test) according to ``cfg``; returns the metrics written to ``metrics.json``.

    ``explicit_keys``: dotted keys the user set explicitly (``train.py`` passes its command-line
    ``key=value`` overrides); with ``init_from`` they win over the checkpoint's settings.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    configure_lightning_logging()
    check_config(cfg)
    if cfg.get("init_from"):
        cfg = with_init_from_settings(cfg, explicit_keys)
    # SIGTERM / SIGUSR1 from here on are remembered, not fatal (README "Reliability", Signals).
    early = EarlySignals().install() if _check_reliability(cfg.get("reliability")).get("handle_signals", True) else None
    try:
        return _run_training(cfg, run_dir, started, early, explicit_keys)
    finally:
        if early is not None:
            early.uninstall()


def _stopped_before_training(early: EarlySignals, ckpt_path: str | None, run_dir: Path, started: float) -> dict[str, Any]:
    """A signal arrived while the run was being prepared: stop now (nothing was trained)."""
    name = early.received
    rank_zero = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
    lines = [f"{name} received before training started (while preparing the data and model): nothing was trained "
             "in this run and no checkpoint was written; stopping."]
    results: dict[str, Any] = {"interrupted": name, "checkpoint": None, "global_step": 0,
                               "wall_time_s": time.perf_counter() - started}
    if name == "SIGUSR1" and cluster_plugins() and rank_zero:
        results["requeue"] = slurm_requeue()
        lines.append(results["requeue"])
    if results.get("requeue", "").startswith("requeued"):
        lines.append("The requeued job runs the same command again" + (f" (resume=auto continues from {ckpt_path})."
                                                                          if ckpt_path else "."))
    elif ckpt_path:
        lines.append(f"Run the same command again to continue from {ckpt_path}.")
    else:
        lines.append(f"Run the same command again to start over (with resume=auto and hydra.run.dir={run_dir} "
                     "a later stop leaves a checkpoint there to continue from).")
    if rank_zero:
        print("\n".join(lines), flush=True)
    return results


def _run_training(
    cfg: Mapping[str, Any], run_dir: Path, started: float, early: EarlySignals | None, explicit_keys: Collection[str] = ()
) -> dict[str, Any]:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    L.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)

    ckpt_path = resolve_ckpt_path(cfg, run_dir)
    if ckpt_path:
        check_resume_model(ckpt_path, cfg["model"], "ckpt_path" if cfg.get("ckpt_path") else "resume=auto")
    datamodule = build_datamodule(cfg["data"])
    module = build_module(cfg)
    if cfg.get("init_from"):
        try:
            init_module_from_checkpoint(module, cfg["init_from"], explicit=explicit_keys)
        except CheckpointMismatchError as err:
            raise ConfigError(str(err)) from None
    run_info: dict[str, Any] = {"run_dir": str(run_dir)}
    loggers = build_loggers(cfg.get("logger"), run_dir, ckpt_path, run_info)
    module.run_info.update(run_info)
    module.run_config = dict(cfg)  # stored in checkpoints as "config"
    trainer_kwargs = dict(cfg.get("trainer") or {})
    callbacks = build_callbacks(cfg.get("callbacks"), bool(trainer_kwargs.get("enable_progress_bar", True)))
    reliability_callbacks, plugins = build_reliability(cfg.get("reliability"), early)
    plugins = list(trainer_kwargs.pop("plugins", None) or []) + plugins
    trainer = L.Trainer(
        **trainer_kwargs,
        logger=loggers if loggers else False,
        callbacks=callbacks + reliability_callbacks,
        plugins=plugins or None,
        default_root_dir=str(run_dir),
    )
    if trainer.is_global_zero:
        print(f"run directory: {run_dir}" + (f"  (resuming from {ckpt_path})" if ckpt_path else ""))
        for stale in remove_stale_temporaries(run_dir / "checkpoints"):
            print(f"removed {stale} (left by a save that was killed)")
    if early is not None and early.received:
        return _stopped_before_training(early, ckpt_path, run_dir, started)
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        finally:
            if early is not None:  # testing after fit: signals as Lightning handles them
                early.uninstall()
    except SIGTERMException as stop:  # GracefulStop, or SIGTERM outside a training batch
        shutdown = next((c for c in reliability_callbacks if isinstance(c, GracefulShutdown)), None)
        if shutdown is None or shutdown.saved_path is None:
            raise
        signal_name = getattr(stop, "signal_name", "SIGTERM")
        results = {
            "interrupted": signal_name,
            "checkpoint": shutdown.saved_path,
            "global_step": trainer.global_step,
            "wall_time_s": time.perf_counter() - started,
        }
        if trainer.is_global_zero:
            print(f"training stopped by {signal_name} at step {trainer.global_step}; resume with "
                  f"ckpt_path={shutdown.saved_path} (or resume=auto)", flush=True)
        return results

    results: dict[str, Any] = {}
    results.update(_plain_metrics(trainer.callback_metrics))
    checkpoint_cb = _checkpoint_callback(trainer)
    best_path = checkpoint_cb.best_model_path if checkpoint_cb is not None else ""
    if checkpoint_cb is not None and checkpoint_cb.best_model_score is not None:
        results[f"best/{checkpoint_cb.monitor}"] = float(checkpoint_cb.best_model_score)
    if cfg.get("test_after_fit", True) and not is_absent_split(cfg["data"].get("test")):
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=True)
        for entry in tested:
            results.update(_plain_metrics(entry))
    results.update(
        {
            "best_checkpoint": best_path or None,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "num_parameters": sum(p.numel() for p in module.potential.parameters() if p.requires_grad),
            "wall_time_s": time.perf_counter() - started,
        }
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS_FILE).write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")
        summary = format_summary(results)
        if summary:
            print(summary)
        print(f"metrics written to {run_dir / METRICS_FILE} (wall time {results['wall_time_s']:.0f} s)")
    return results
