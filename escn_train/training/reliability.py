"""Surviving killed, pre-empted and badly-fed runs (issue 7).

* :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file in the target
  directory, flushed and fsync'ed, then moved over the target with ``os.replace``; a kill
  during a save leaves the previous file intact.
* :class:`NonFiniteGuard`: a training step whose loss or gradients are not finite is
  skipped (gradients dropped before clipping and the optimizer step), counted and logged
  as ``train/skipped_steps``; after ``max_consecutive`` skipped steps in a row training
  stops with :class:`NonFiniteLossError` naming the batch's structure ids.
* :class:`GracefulShutdown`: on SIGTERM (and SIGUSR1 outside SLURM) the current step is
  finished, ``last.ckpt`` is written and :class:`GracefulStop` ends ``fit``; ``train.py``
  then exits with status 0. Under SLURM, Lightning's ``SLURMEnvironment`` handles SIGUSR1
  (checkpoint + ``scontrol requeue``), see :func:`cluster_plugins`.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

LAST_NAME = "last.ckpt"


# ------------------------------------------------------------------------ atomic writes
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a fsync'ed temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete ``.*.ckpt.*.tmp`` files a killed save left in ``directory``; returns them."""
    directory = Path(directory)
    stale = sorted(directory.glob(".*.ckpt.*.tmp")) if directory.is_dir() else []
    for path in stale:
        try:
            path.unlink()
        except OSError:
            pass
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` whose local writes are atomic (remote paths: fsspec as before)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        fs = get_filesystem(path)
        if type(fs).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def cluster_plugins() -> list[Any]:
    """Under SLURM: ``SLURMEnvironment(auto_requeue=True, requeue_signal=SIGUSR1)``; else nothing."""
    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)]
    return []


# ------------------------------------------------------------------------ non-finite steps
class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps with a non-finite loss or gradient."""


def _batch_ids(batch: Any, limit: int = 20) -> str:
    sid = getattr(batch, "sid", None)
    if sid is None:
        return "sid unknown"
    values = sid.tolist() if isinstance(sid, torch.Tensor) else list(sid)
    more = f" … (+{len(values) - limit})" if len(values) > limit else ""
    return "sid " + ", ".join(str(v) for v in values[:limit]) + more


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps with a non-finite loss or gradient; fail after ``max_consecutive``.

    The check runs in ``on_before_optimizer_step`` (after backward and the DDP gradient
    all-reduce, before clipping and ``optimizer.step``), so it works with automatic and
    manual optimization and with gradient clipping. A skipped step drops every gradient
    (``grad = None``), so the optimizer leaves weights and moments alone, and the EMA is
    not updated for it.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"reliability.max_consecutive_nonfinite: must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.consecutive = 0
        self._batch: Any = None
        self._batch_idx = -1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx
        pl_module.step_skipped = False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        loss = getattr(pl_module, "last_train_loss", None)
        loss_bad = loss is not None and not bool(torch.isfinite(loss).all())
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads_bad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        code = int(loss_bad) + 2 * int(grads_bad)
        codes = [code]
        if trainer.world_size > 1:
            # Agree across ranks: one rank must never skip while another steps (the counters and
            # the NonFiniteLossError stay identical on every rank). A per-rank code, summed.
            flags = torch.zeros(trainer.world_size, device=trainer.strategy.root_device)
            flags[trainer.global_rank] = float(code)
            codes = [int(v) for v in trainer.strategy.reduce(flags, reduce_op="sum").tolist()]
        bad = []
        if loss_bad:
            bad.append(f"loss={float(loss)}")
        others = [rank for rank, c in enumerate(codes) if c & 1 and rank != trainer.global_rank]
        if others and len(codes) > 1:
            bad.append(f"non-finite loss on rank {', '.join(map(str, others))}")
        if any(c & 2 for c in codes):
            bad.append("non-finite gradients")
        if not bad:
            self.consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)
        pl_module.step_skipped = True
        self.skipped += 1
        self.consecutive += 1
        where = f"epoch {trainer.current_epoch}, batch {self._batch_idx}, {_batch_ids(self._batch)}"
        message = f"skipped training step {trainer.global_step} ({' and '.join(bad)}) at {where}"
        log.warning(message)
        if trainer.is_global_zero:
            print(f"WARNING: {message}", flush=True)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive training steps with a non-finite loss or gradient "
                f"(reliability.max_consecutive_nonfinite={self.max_consecutive}); the last at {where} ({' and '.join(bad)})"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


# ------------------------------------------------------------------------ signals
class GracefulStop(SIGTERMException):
    """Raised after the stop checkpoint is written; ``run_training`` turns it into a clean exit."""

    def __init__(self, signal_name: str, checkpoint: str | None) -> None:
        super().__init__(f"stopped by {signal_name}; checkpoint {checkpoint}")
        self.signal_name = signal_name
        self.checkpoint = checkpoint


def last_checkpoint_path(trainer: L.Trainer) -> str:
    """Where the stop checkpoint goes: the ``last`` ModelCheckpoint's file, else ``<root>/checkpoints/last.ckpt``."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and callback.filename == "last":
            return os.path.join(callback.dirpath, LAST_NAME)
    return os.path.join(trainer.default_root_dir, "checkpoints", LAST_NAME)


class GracefulShutdown(L.Callback):
    """SIGTERM / SIGUSR1: finish the step, write ``last.ckpt``, stop (see module docstring).

    SIGTERM is read from Lightning's own handler (``trainer.received_sigterm``); SIGUSR1 gets
    a flag-setting handler here unless Lightning's SLURM auto-requeue owns it.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self.saved_path: str | None = None
        self._previous_usr1: Any = None

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self.requested = self.requested or "SIGUSR1"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment
        slurm_owns_usr1 = isinstance(env, SLURMEnvironment) and env.auto_requeue
        if hasattr(signal, "SIGUSR1") and not slurm_owns_usr1:
            try:
                self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)
            except ValueError:  # not the main thread
                self._previous_usr1 = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous_usr1 is not None:
            try:
                signal.signal(signal.SIGUSR1, self._previous_usr1)
            except ValueError:
                pass
            self._previous_usr1 = None

    def _stop_requested(self, trainer: L.Trainer) -> str | None:
        """The signal to stop for, agreed by all ranks (saving has collectives, so all must stop)."""
        code = 1 if trainer.received_sigterm else 2 if self.requested else 0
        if trainer.world_size > 1:
            flag = torch.tensor([float(code)], device=trainer.strategy.root_device)
            code = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        return {0: None, 1: "SIGTERM", 2: "SIGUSR1"}[code]

    def _save(self, trainer: L.Trainer, name: str) -> None:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        if trainer.is_global_zero:
            print(f"{name} received: wrote {path} at step {trainer.global_step}; stopping", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        name = self._stop_requested(trainer)
        if name is None:
            return
        self._save(trainer, name)
        self._restore()
        raise GracefulStop(name, self.saved_path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # SIGTERM seen by Lightning outside a training batch (validation, epoch end): save there.
        if isinstance(exception, SIGTERMException) and not isinstance(exception, GracefulStop) and self.saved_path is None:
            try:
                self._save(trainer, "SIGTERM")
            except Exception as err:  # never mask the original exception
                log.error("could not write the stop checkpoint: %s", err)
        self._restore()

