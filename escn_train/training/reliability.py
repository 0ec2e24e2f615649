"""Surviving killed, pre-empted and badly-fed runs (issue 7).

* :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file in the target
  directory, flushed and fsync'ed, then moved over the target with ``os.replace``; a kill
  during a save leaves the previous file intact. A failed write (disk full, quota) removes
  the temporary and raises :class:`CheckpointWriteError`, one line naming the file.
* :class:`NonFiniteGuard`: a training step whose loss or gradients are not finite is
  skipped (decided on the device for fused optimizers, read at logging intervals), counted
  and logged as ``train/skipped_steps``; after ``max_consecutive`` skipped steps in a row
  training stops with :class:`NonFiniteLossError` naming the batch's structure ids.
* :class:`GracefulShutdown`: on SIGTERM or SIGUSR1 the current step is finished, ``last.ckpt``
  is written (under SLURM, SIGUSR1: ``hpc_ckpt_N.ckpt`` and ``scontrol requeue``) and
  :class:`GracefulStop` ends ``fit``; ``train.py`` then exits with status 0. All ranks agree
  on the stop before the (collective) save.
* :class:`EarlySignals`: SIGTERM / SIGUSR1 arriving before the training loop runs (data and
  model setup, statistics) are remembered instead of killing the process, and honoured at the
  first safe point (see :class:`EarlySignals`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
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
class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous file is intact."""


def _os_error_in_chain(err: BaseException) -> OSError | None:
    """The first ``OSError`` among ``err`` and the exceptions it was raised from or during.

    A failed write inside ``torch.save`` surfaces as torch's zip-writer ``RuntimeError``
    raised while handling the ``OSError`` (e.g. ENOSPC) that caused it.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a fsync'ed temporary file and ``os.replace``.

    A failed write raises :class:`CheckpointWriteError` (one line: the file, the reason and
    whether an earlier version of it is kept) instead of torch's chained errors.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = _os_error_in_chain(err) if isinstance(err, (OSError, RuntimeError)) else None
        if cause is None:
            raise
        kept = f"previous {path.name} kept" if path.exists() else "nothing was written"
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {cause.strerror or cause} ({kept})") from None
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
    """Under SLURM: ``SLURMEnvironment(auto_requeue=False)``; else nothing.

    Lightning's own requeue handler would save the checkpoint inside the signal handler, at
    whatever point the main thread is (possibly mid optimizer step, and with a barrier that
    can mismatch the other ranks' collectives); :class:`GracefulShutdown` handles SIGUSR1
    instead, at the end of a training batch (see :func:`slurm_requeue`).
    """
    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_requeue() -> str:
    """Run ``scontrol requeue <job id>``; returns a line saying what happened (never raises)."""
    job = slurm_job_id()
    if not job or not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        return f"not requeued: no usable SLURM job id (SLURM_JOB_ID={job!r})"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        return f"not requeued: scontrol requeue {job} failed: {err}"
    if done.returncode != 0:
        return f"not requeued: scontrol requeue {job} exited with {done.returncode}: {done.stderr.strip()[-500:]}"
    return f"requeued SLURM job {job} (scontrol requeue {job})"


def hpc_checkpoint_path(root: str | os.PathLike) -> str:
    """``<root>/hpc_ckpt_<N+1>.ckpt`` (Lightning's naming, so its SLURM auto-resume finds it too)."""
    numbers = [int(m.group(1)) for p in Path(root).glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return os.path.join(root, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


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


@dataclass
class _GuardedStep:
    """What the guard keeps of one optimizer step until its flags are read on the host."""

    global_step: int
    epoch: int
    batch_idx: int
    batch: Any
    values: torch.Tensor  # [1 + world size]: the loss, then each rank's code (1: loss, 2: gradients)


def nonfinite_code(loss: torch.Tensor | None, grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-dim float tensor on ``device``: 1 if ``loss`` is not finite, plus 2 if a gradient is not.

    Uses the mixed-precision kernel that checks many tensors in one pass (one launch per
    device and dtype, no host sync); its unscale factor is 1, so the gradients are unchanged.
    """
    found = torch.zeros(1, device=device)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    for (grad_device, _), tensors in groups.items():
        flag = torch.zeros(1, device=grad_device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, torch.ones(1, device=grad_device))
        found = torch.maximum(found, flag.to(device, non_blocking=True))
    code = 2.0 * found[0]
    if loss is not None:
        code = code + (~torch.isfinite(loss.detach()).all()).to(code.dtype).to(device, non_blocking=True)
    return code


def skips_on_device(trainer: Any, optimizer: Any) -> bool:
    """Whether ``optimizer`` can skip a step from a device flag (fused Adam/AdamW/SGD take ``found_inf``).

    Not with a gradient scaler (16-bit mixed precision), which sets that flag itself.
    """
    precision = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    if getattr(precision, "scaler", None) is not None:
        return False
    groups = getattr(optimizer, "param_groups", [])
    return bool(groups) and all(g.get("fused") for g in groups)


def rewind_step_schedules(trainer: Any, steps: int) -> None:
    """Take ``steps`` skipped optimizer steps back out of the per-step LR schedules (``LambdaLR``).

    Lightning steps the schedules after every optimizer step, skipped or not; taking the
    skipped ones back when their flags are read (for a step skipped on the device, at the
    next read) makes warm-up and decay count applied steps only. Other schedule kinds
    (epoch interval, ``frequency`` > 1, not a ``LambdaLR``) are left alone.
    """
    for config in getattr(trainer, "lr_scheduler_configs", []):
        scheduler = config.scheduler
        if config.interval != "step" or config.frequency != 1:
            continue
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            continue
        scheduler.last_epoch -= steps
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps with a non-finite loss or gradient; fail after ``max_consecutive``.

    The check runs in ``on_before_optimizer_step`` (after backward and the DDP gradient
    all-reduce, before clipping and ``optimizer.step``), so it works with automatic and
    manual optimization and with gradient clipping.

    With a fused optimizer (what :func:`~escn_train.training.optim.build_optimizer` builds)
    the decision stays on the device: the flag goes to the optimizer as ``found_inf`` (the
    fused kernels then leave weights, moments and step counts alone, as under a gradient
    scaler), and to the module as ``step_applied`` (the EMA skips the step). The flags are
    read on the host every ``trainer.log_every_n_steps`` batches, at the end of the epoch and
    when a checkpoint is written: only then are the warnings printed, ``train/skipped_steps``
    logged, per-step LR schedules moved back by the skipped steps, and
    :class:`NonFiniteLossError` raised for a streak of ``max_consecutive`` (naming the step
    where the streak reached it). Other optimizers are checked on the host at every step
    (one sync) and a skipped step drops every gradient (``grad = None``).
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"reliability.max_consecutive_nonfinite: must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.consecutive = 0
        self._batch: Any = None
        self._batch_idx = -1
        self._pending: list[_GuardedStep] = []
        self._deferred_optimizers: list[Any] = []
        self._streak_at = ""
        self._trainer: Any = None  # the trainer of the pending steps (for reads from state_dict)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx
        pl_module.step_skipped = False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        loss = getattr(pl_module, "last_train_loss", None)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else loss.device if loss is not None else trainer.strategy.root_device
        code = nonfinite_code(loss, grads, device)
        codes = code.view(1)
        if trainer.world_size > 1:
            # Agree across ranks: one rank must never skip while another steps (the counters and
            # the NonFiniteLossError stay identical on every rank). A per-rank code, summed.
            flags = torch.zeros(trainer.world_size, device=trainer.strategy.root_device)
            flags[trainer.global_rank] = code.to(flags.device)
            codes = trainer.strategy.reduce(flags, reduce_op="sum").to(device)
        if loss is not None:
            loss_value = loss.detach().float().reshape(-1)[:1].to(device)
        else:
            loss_value = torch.zeros(1, device=device)
        self._trainer = trainer
        on_device = bool(grads) and skips_on_device(trainer, optimizer)
        self._pending.append(_GuardedStep(trainer.global_step, trainer.current_epoch, self._batch_idx, self._batch,
                                          torch.cat([loss_value, codes.float()])))
        if on_device:
            bad = codes.sum() > 0
            optimizer.found_inf = bad.float()
            self._deferred_optimizers.append(optimizer)
            pl_module.step_applied = ~bad
            return
        if self._read(trainer, raise_error=False):  # host path: this step's flags now, one sync
            optimizer.zero_grad(set_to_none=True)
            pl_module.step_skipped = True
        self._raise_on_streak()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        for optimizer in self._deferred_optimizers:  # the flag belongs to the step just taken
            optimizer.__dict__.pop("found_inf", None)
        self._deferred_optimizers = []
        if (batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0:
            self._read(trainer)
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer)
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=False, on_epoch=True, batch_size=1,
                      reduce_fx="max")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._read(trainer, raise_error=False)  # report what was skipped before the run stopped

    def _read(self, trainer: Any, raise_error: bool = True) -> bool:
        """Read the pending steps' flags (one host sync) and report the skipped ones.

        Returns whether the last step read was skipped. With ``raise_error``, a streak of
        ``max_consecutive`` raises :class:`NonFiniteLossError` at the step that reached it.
        """
        if not self._pending:
            return False
        pending, self._pending = self._pending, []
        rows = torch.stack([step.values for step in pending]).tolist()
        skipped = 0
        bad: list[str] = []
        for step, row in zip(pending, rows):
            loss_value, codes = row[0], [int(c) for c in row[1:]]
            rank = trainer.global_rank if len(codes) > 1 else 0
            bad = [f"loss={loss_value}"] if codes[rank] & 1 else []
            others = [r for r, c in enumerate(codes) if c & 1 and r != rank]
            if others:
                bad.append(f"non-finite loss on rank {', '.join(map(str, others))}")
            if any(c & 2 for c in codes):
                bad.append("non-finite gradients")
            if not bad:
                self.consecutive = 0
                continue
            self.skipped += 1
            self.consecutive += 1
            skipped += 1
            where = f"epoch {step.epoch}, batch {step.batch_idx}, {_batch_ids(step.batch)}"
            self._streak_at = f"{where} ({' and '.join(bad)})"
            message = f"skipped training step {step.global_step} ({' and '.join(bad)}) at {where}"
            log.warning(message)
            if trainer.is_global_zero:
                print(f"WARNING: {message}", flush=True)
            if raise_error and self.consecutive >= self.max_consecutive:
                break  # the streak reached the limit here; the error names this step
        if skipped:
            rewind_step_schedules(trainer, skipped)
        if raise_error:
            self._raise_on_streak()
        return bool(bad)

    def _raise_on_streak(self) -> None:
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive training steps with a non-finite loss or gradient "
                f"(reliability.max_consecutive_nonfinite={self.max_consecutive}); the last at {self._streak_at}"
            )

    def state_dict(self) -> dict[str, Any]:
        """The counters, after reading the pending flags (a checkpoint holds the true counts)."""
        if self._pending:
            self._read(self._trainer)
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


# ------------------------------------------------------------------------ signals
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


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


def install_handlers(names: tuple[str, ...] | list[str], handler: Any) -> dict[int, Any]:
    """Point the signals ``names`` (those this platform has) at ``handler``; returns the
    handlers they had. Outside the main thread nothing changes (Python allows no handler there)."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for name in names:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    return previous


def restore_handlers(previous: dict[int, Any], only_replacing: Any = None) -> None:
    """Put back the handlers :func:`install_handlers` returned (with ``only_replacing``: only
    where that handler is still the one in place)."""
    for sig, handler in previous.items():
        try:
            if only_replacing is None or signal.getsignal(sig) == only_replacing:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        except ValueError:  # not the main thread
            pass


class EarlySignals:
    """Remember SIGTERM / SIGUSR1 that arrive before the training loop starts.

    Installed by ``run_training`` before the data and model are built; until then (and
    until Lightning and :class:`GracefulShutdown` install their own handlers) the default
    action would kill the process without a checkpoint (exit 143 / 138). The handler only
    records the first signal (nothing is printed or saved inside a signal handler).
    ``run_training`` checks :attr:`received` just before ``trainer.fit`` (stop right there:
    nothing was trained); a signal during Lightning's setup (statistics, DDP start, checkpoint
    restore, data loaders) is handed to :class:`GracefulShutdown` at ``on_train_start``, which
    stops after the first training batch like any stop request.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.active = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.active and self.received is None:
            self.received = signal.Signals(signum).name

    def install(self) -> "EarlySignals":
        self._previous = install_handlers(STOP_SIGNALS, self._handler)
        self.active = bool(self._previous)
        return self

    def uninstall(self) -> None:
        """Put back the handlers found at :meth:`install` (where this one is still in place)."""
        self.active = False
        restore_handlers(self._previous, only_replacing=self._handler)
        self._previous = {}

    def take(self) -> str | None:
        """Hand over: stop recording and return the signal received so far (if any)."""
        self.active = False
        return self.received


class GracefulShutdown(L.Callback):
    """SIGTERM / SIGUSR1: finish the step, write a checkpoint, stop (see module docstring).

    Single process: SIGTERM is read from Lightning's own handler (``trainer.received_sigterm``),
    which also stops validation early. Under DDP, SIGTERM gets a flag-setting handler here
    instead: Lightning's handler issues a broadcast from inside the signal handler, at
    whatever point each rank is, which can pair with another collective on the other rank and
    hang the job. SIGUSR1 always gets a flag-setting handler here. The stop is agreed at the
    end of a training batch or of a validation run (all ranks reach both). Under SLURM
    (``slurm=True``) SIGUSR1 writes ``<run dir>/hpc_ckpt_N.ckpt`` and requeues the job with
    ``scontrol requeue`` (global rank 0) before stopping. ``early``: signals remembered before
    training started, honoured after the first training batch.
    """

    def __init__(self, early: EarlySignals | None = None, slurm: bool = False) -> None:
        self.received: set[str] = set()
        self.saved_path: str | None = None
        self.requeue_note: str | None = None
        self.early = early
        self.slurm = slurm
        self._early_signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received.add(signal.Signals(signum).name)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous = install_handlers(["SIGUSR1"] + (["SIGTERM"] if trainer.world_size > 1 else []), self._on_signal)
        if self.early is not None:
            self._early_signal = self.early.take()
            if self._early_signal is not None:
                self.received.add(self._early_signal)
                if trainer.is_global_zero:
                    print(f"{self._early_signal} received during setup (before training started); stopping after "
                          "the first training batch", flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        restore_handlers(self._previous)
        self._previous = {}

    def _stop_requested(self, trainer: L.Trainer) -> str | None:
        """The signal to stop for, agreed by all ranks (saving has collectives, so all must stop).

        SIGUSR1 (requeue) wins over SIGTERM when ranks saw different signals.
        """
        code = 2 if "SIGUSR1" in self.received else 1 if trainer.received_sigterm or "SIGTERM" in self.received else 0
        if trainer.world_size > 1:
            flag = torch.tensor([float(code)], device=trainer.strategy.root_device)
            code = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        return {0: None, 1: "SIGTERM", 2: "SIGUSR1"}[code]

    def _save(self, trainer: L.Trainer, name: str) -> None:
        requeue = name == "SIGUSR1" and self.slurm
        path = hpc_checkpoint_path(trainer.default_root_dir) if requeue else last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        if trainer.is_global_zero:
            when = " during setup" if self._early_signal else ""
            print(f"{name} received{when}: wrote {path} at step {trainer.global_step}; stopping", flush=True)
            if requeue:
                self.requeue_note = slurm_requeue()
                print(self.requeue_note, flush=True)

    def _maybe_stop(self, trainer: L.Trainer) -> None:
        name = self._stop_requested(trainer)
        if name is None:
            return
        self._save(trainer, name)
        self._restore()
        raise GracefulStop(name, self.saved_path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._maybe_stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal during validation (under DDP, or SIGUSR1): stop here, not after the next batch.
        if trainer.state.fn == "fit":
            self._maybe_stop(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # SIGTERM seen by Lightning outside a training batch (validation, epoch end): save there.
        if isinstance(exception, SIGTERMException) and not isinstance(exception, GracefulStop) and self.saved_path is None:
            try:
                self._save(trainer, "SIGTERM")
            except Exception as err:  # never mask the original exception
                log.error("could not write the stop checkpoint: %s", err)
        self._restore()
