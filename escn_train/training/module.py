"""The LightningModule that trains an :class:`~escn_train.models.potential.ESCNPotential`.

All constructor arguments are plain Python values (dicts, numbers, strings), stored as
hyper-parameters, so checkpoints load with ``torch.load(weights_only=True)`` and the model
can be rebuilt from them alone (:func:`escn_train.training.checkpoint.load_potential`).

Flow of one step: the network predicts normalised energy/forces; labels are mapped into
the same units with the potential's normalisers and the loss is taken there; metrics are
computed on physical predictions (eV, eV/Å). Validation and test use the EMA weights when
EMA is enabled. Normalisers are fitted on the train split at ``setup`` (unless given or
loaded from a checkpoint) and live in the potential's buffers.

Skipped data (``data.skip_bad_samples``): a training batch whose structures were all bad still
runs a step on its rank, on a zero loss that reaches every trainable parameter, so DDP's
gradient all-reduce happens on every rank; before the optimizer step the gradients are
rescaled to the mean over the micro-batches that held data (on all ranks), and a step
without any data on any rank is skipped like a non-finite one (no optimizer step, EMA
update or LR-schedule step).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric

from escn_train.models.escn import eSCN
from escn_train.models.inputs import MIN_EDGE_LENGTH
from escn_train.models.potential import ESCNPotential
from escn_train.training.ema import ExponentialMovingAverage
from escn_train.training.losses import EnergyForceLoss
from escn_train.training.metrics import EnergyForceMetrics
from escn_train.training.optim import build_optimizer, build_scheduler

NORMALIZER_KEYS = (
    "energy_mean", "energy_std", "force_std", "element_references", "force_std_free_atoms", "energy_scale",
)
SPLITS = ("train", "val", "test")
LOSS_NAMES = ("loss", "energy_loss", "forces_loss")


def normalizers_from_statistics(stats: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Normaliser values from dataset statistics; explicit numbers in ``config`` win.

    With ``element_references`` true the energy mean/std are those of the referenced
    energies (``E - Σ ref[Z]``); the force scale is the RMS force component (over free atoms
    with ``force_std_free_atoms``).
    """
    use_refs = bool(config.get("element_references", False))
    if use_refs:
        mean, std = stats["referenced_energy_mean"], stats["referenced_energy_std"]
    else:
        mean, std = stats["energy_mean"], stats["energy_std"]
    force = stats["force_rms"]
    if config.get("force_std_free_atoms", False) and stats.get("force_rms_free"):
        force = stats["force_rms_free"]
    out = {
        "energy_mean": mean if config.get("energy_mean") is None else config["energy_mean"],
        "energy_std": std if config.get("energy_std") is None else config["energy_std"],
        "force_std": force if config.get("force_std") is None else config["force_std"],
        "element_references": list(stats["element_references"]) if use_refs else None,
    }
    for key in ("energy_std", "force_std"):
        if not out[key] > 0:
            raise ValueError(f"normalizer.{key}: must be positive, got {out[key]!r} (from the train statistics)")
    return out


def _scale_gradients(optimizer: Any, scale: float | torch.Tensor) -> None:
    """Multiply every gradient the optimizer holds by ``scale`` (a number, or a 0-d tensor
    on the gradients' device, which is never read back)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, scale)


class PotentialModule(L.LightningModule):
    """Trains an eSCN potential on energies and forces.

    Args:
        model: ``eSCN`` keyword arguments.
        loss: see :class:`~escn_train.training.losses.EnergyForceLoss`.
        optimizer: see :func:`~escn_train.training.optim.build_optimizer`.
        scheduler: see :func:`~escn_train.training.optim.build_scheduler` (None: constant LR).
        normalizer: ``energy_mean``, ``energy_std``, ``force_std`` (numbers in eV, eV/Å, or
            None to fit them on the train split), ``element_references`` (bool: fit
            per-element linear reference energies, or an explicit list), ``force_std_free_atoms``
            (bool), ``energy_scale`` (see below).

    ``energy_scale`` s: the eSCN readout multiplies the summed atom energies by 0.001 (the
    reference's choice), so with s = 1 a normalised target of order 1 needs atom energies of
    order 1000 and the energy head learns very slowly. With s = 1000 the potential's
    ``energy_std`` buffer holds s·std (the network's energy unit), the atom energies are of
    order 1, and the energy loss is taken on ``s × network energy`` so it still measures
    errors in units of the data std (loss coefficients keep their meaning). Published
    recipes use s = 1.
        ema: ``{"decay": 0.999, "warmup": true}`` or None / ``{"decay": null}`` for no EMA.
        metrics_on_free_atoms: force metrics over free atoms only (``fixed == 0``).
        train_metrics: also track the metrics on training batches (cheap, physical units).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        normalizer: Mapping[str, Any] | None = None,
        ema: Mapping[str, Any] | None = None,
        metrics_on_free_atoms: bool = True,
        train_metrics: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.loss_fn = EnergyForceLoss(loss)
        normalizer = dict(normalizer or {})
        unknown = set(normalizer) - set(NORMALIZER_KEYS)
        if unknown:
            raise ValueError(f"normalizer: unknown keys {sorted(unknown)}; allowed: {list(NORMALIZER_KEYS)}")
        self.normalizer_config = normalizer
        self.energy_scale = float(normalizer.get("energy_scale") or 1.0)
        if self.energy_scale <= 0:
            raise ValueError(f"normalizer.energy_scale: must be positive, got {self.energy_scale}")
        self.optimizer_config = dict(optimizer or {"name": "adamw", "lr": 1e-3})
        self.scheduler_config = dict(scheduler) if scheduler else None
        self.potential = ESCNPotential(eSCN(**dict(model)))
        #: True once the normaliser buffers hold real values (fitted, given or loaded).
        self.normalizers_ready = False
        refs = normalizer.get("element_references")
        if refs is not None and not isinstance(refs, bool) and not isinstance(refs, (list, tuple)):
            raise ValueError(f"normalizer.element_references: expected true/false or a list of energies, got {refs!r}")
        given = all(normalizer.get(k) is not None for k in ("energy_mean", "energy_std", "force_std"))
        if isinstance(refs, (list, tuple)) and not given:
            raise ValueError(
                "normalizer.element_references: an explicit list needs energy_mean, energy_std and force_std too"
            )
        if given and refs is not True:
            self.set_normalizers(normalizer)
        ema = dict(ema or {})
        decay = ema.get("decay")
        self.ema = ExponentialMovingAverage(self.potential, decay, ema.get("warmup", True)) if decay else None
        self.metrics_on_free_atoms = metrics_on_free_atoms
        self.train_metrics = train_metrics
        self.metrics = torch.nn.ModuleDict({f"{split}_metrics": EnergyForceMetrics() for split in SPLITS})
        self.eval_loss_means = torch.nn.ModuleDict(
            {f"{split}_{name}": MeanMetric() for split in ("val", "test") for name in LOSS_NAMES}
        )
        self.run_info: dict[str, Any] = {}  # e.g. the wandb run id; saved with checkpoints
        #: Return physical predictions from val/test steps (set by the parity-plot callback).
        self.collect_predictions = False
        #: The resolved run configuration (plain dict), saved in checkpoints as ``config``.
        self.run_config: dict[str, Any] | None = None
        #: The last training loss (read by :class:`~escn_train.training.reliability.NonFiniteGuard`).
        self.last_train_loss: torch.Tensor | None = None
        #: Set by the guard when this batch's optimizer step was skipped (the EMA skips it too).
        self.step_skipped = False
        #: Set by the guard when it decides on the device: a 0-dim bool tensor, False for a skipped
        #: step (the EMA then leaves it out without a host sync); None when decided on the host.
        self.step_applied: torch.Tensor | None = None
        #: Bad samples dropped per split on this rank (``data.skip_bad_samples``); their sum over
        #: ranks is logged as data/skipped_samples_<split> at each epoch end.
        self.skipped_samples = {split: 0 for split in SPLITS}
        #: Training micro-batches since the last optimizer step: [all, with data].
        self._micro_batches = [0, 0]
        #: Training steps skipped because no rank had any data (all structures bad).
        self.empty_steps = 0
        #: Whether the current step is one of those (its LR-schedule step is left out).
        self._no_data_step = False
        #: The models' ``check_inputs`` values while :meth:`setup` has turned them off.
        self._saved_input_checks: list[bool] | None = None
        #: Whether training micro-batches can be empty (skip mode); set at train start.
        self._may_be_empty = True

    # ------------------------------------------------------------------ normalisers
    @torch.no_grad()
    def set_normalizers(self, values: Mapping[str, Any]) -> None:
        """Write normaliser values into the potential's (and the EMA copy's) buffers."""
        pot = self.potential
        pot.energy_mean.fill_(float(values["energy_mean"]))
        pot.energy_std.fill_(float(values["energy_std"]) * self.energy_scale)
        pot.force_std.fill_(float(values["force_std"]))
        pot.element_references.zero_()
        refs = values.get("element_references")
        if refs is not None and not isinstance(refs, bool):
            refs = torch.as_tensor(refs, dtype=torch.float32).flatten()
            size = pot.element_references.numel()
            if bool((refs[size:] != 0).any()):
                raise ValueError(
                    f"normalizer.element_references: non-zero entries beyond model.max_num_elements={size} "
                    "(the data holds elements the model cannot embed)"
                )
            refs = refs[:size]
            pot.element_references[: refs.numel()] = refs
        if getattr(self, "ema", None) is not None:
            for name, buf in pot.named_buffers():
                self.ema.module.get_buffer(name).copy_(buf)
        self.normalizers_ready = True

    def normalizer_values(self) -> dict[str, Any]:
        """The current normalisers as plain numbers (``energy_std`` in eV, without the scale)."""
        pot = self.potential
        return {
            "energy_mean": float(pot.energy_mean),
            "energy_std": float(pot.energy_std) / self.energy_scale,
            "energy_scale": self.energy_scale,
            "force_std": float(pot.force_std),
            "element_references": pot.element_references.tolist(),
        }

    # ------------------------------------------------------------------ input checks
    def _models(self) -> list[nn.Module]:
        models = [self.potential.model]
        if self.ema is not None:
            models.append(self.ema.module.model)
        return models

    def _samples_checked(self, datamodule: Any) -> bool:
        """Whether the datamodule's sample checker already tests what the model's eager input checks test.

        That is finite positions, atomic numbers the model can embed and no (near) zero-length
        edge: ``check_samples`` on, an element range within the model's and an overlap distance.
        Graphs from the files (``use_precomputed_edges``) or built in the loader with more
        neighbours than the model keeps may exceed its ``max_neighbors`` slots, which only the
        eager check reports, so the checks stay on for them.
        """
        if not getattr(datamodule, "check_samples", False):
            return False
        selection = getattr(datamodule, "graph_selection", None)
        if selection is not None and (
            selection.use_precomputed_edges
            or (selection.max_neighbors is not None and selection.max_neighbors > self.potential.model.max_neighbors)
        ):
            return False
        max_elements = getattr(datamodule, "max_num_elements", None)
        min_distance = getattr(datamodule, "min_distance", None)
        model = self.potential.model
        return (max_elements is not None and max_elements <= model.max_num_elements
                and min_distance is not None and min_distance >= MIN_EDGE_LENGTH)

    def _models_with_input_checks(self) -> list[nn.Module]:
        return [m for m in self._models() if getattr(m, "check_inputs", None) is not None]

    def teardown(self, stage: str) -> None:
        """Put the model's eager input checks back as they were before :meth:`setup`."""
        saved, self._saved_input_checks = self._saved_input_checks, None
        for model, enabled in zip(self._models_with_input_checks(), saved or []):
            model.check_inputs = enabled

    def setup(self, stage: str) -> None:
        """Fit the normalisers on the train split (rank 0 computes, the others receive).

        When the datamodule checks every structure as it is read (``data.check_samples``),
        the model's own eager input checks, which read flags on the host every step, are
        turned off until :meth:`teardown`.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if self._samples_checked(datamodule) and self._saved_input_checks is None:
            models = self._models_with_input_checks()
            self._saved_input_checks = [m.check_inputs for m in models]
            for model in models:
                model.check_inputs = False
        if self.normalizers_ready or stage != "fit":
            return
        if datamodule is None or not hasattr(datamodule, "statistics"):
            raise ValueError(
                "normalizer: energy_mean, energy_std and force_std must be given when the datamodule "
                "cannot compute train statistics"
            )
        stats = datamodule.statistics() if self.trainer.is_global_zero else None
        stats = self.trainer.strategy.broadcast(stats, src=0)
        values = normalizers_from_statistics(stats, self.normalizer_config)
        self.set_normalizers(values)
        # A fresh EMA starts from the current weights with the fitted normalisers.
        if self.ema is not None and int(self.ema.num_updates) == 0:
            self.ema.copy_from(self.potential)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Physical energies [B] (eV) and forces [N, 3] (eV/Å) with the evaluation weights."""
        return self.eval_potential.forward_trainable(batch)

    @property
    def eval_potential(self) -> ESCNPotential:
        """The weights used for validation/test/export: the EMA copy when enabled."""
        return self.ema.module if self.ema is not None else self.potential

    def _force_mask(self, batch: Any, for_metrics: bool) -> torch.Tensor | None:
        fixed = getattr(batch, "fixed", None)
        if for_metrics:
            return None if fixed is None or not self.metrics_on_free_atoms else fixed.view(-1) == 0
        return self.loss_fn.force_mask(fixed)

    @staticmethod
    def _batch_idx(batch: Any) -> torch.Tensor:
        idx = getattr(batch, "batch", None)
        return idx if idx is not None else torch.zeros_like(batch.atomic_numbers, dtype=torch.long)

    def _step(self, batch: Any, split: str) -> dict[str, Any]:
        potential = self.potential if split == "train" else self.eval_potential
        batch_idx = self._batch_idx(batch)
        z = batch.atomic_numbers.long()
        out = potential.model.forward_trainable(batch)
        e_pred, f_pred = out["energy"].float().view(-1), out["forces"].float()
        e_true, f_true = batch.energy.float().view(-1), batch.forces.float()
        e_norm, f_norm = potential.normalize_targets(e_true, f_true, z, batch_idx)
        s = self.energy_scale  # energy loss in units of the data std (see class docstring)
        losses = self.loss_fn(e_pred * s, e_norm * s, f_pred, f_norm, self._force_mask(batch, for_metrics=False))
        num_structures = e_true.shape[0]
        for name, value in losses.items():
            if split == "train":
                # no prog_bar: Lightning would read it on the host after every batch (the
                # progress bar reads it when it redraws, see escn_train.training.progress)
                self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=num_structures)
            else:  # a structure-weighted mean with summed states, exact over uneven DDP shards
                self.eval_loss_means[f"{split}_{name}"].update(value.detach(), weight=num_structures)
        result: dict[str, Any] = {"loss": losses["loss"]}
        include = None
        if split == "train":
            self.last_train_loss = losses["loss"].detach()
            if not self.train_metrics:
                return result
            # a non-finite step is skipped (NonFiniteGuard): the metrics leave it out, on the device
            include = torch.isfinite(self.last_train_loss)
        with torch.no_grad():
            e_phys, f_phys = potential.to_physical(e_pred.detach(), f_pred.detach(), z, batch_idx)
            mask = self._force_mask(batch, for_metrics=True)
            self.metrics[f"{split}_metrics"].update(e_phys, e_true, f_phys, f_true, batch_idx, mask, include)
        self._log_metric_states(split, num_structures)
        if split != "train" and self.collect_predictions:
            keep = mask if mask is not None else slice(None)
            result["predictions"] = {
                "energy": (e_phys.cpu(), e_true.cpu()),
                "forces": (f_phys[keep].cpu(), f_true[keep].cpu()),
            }
        return result

    def _log_metric_states(self, split: str, num_structures: int) -> None:
        """Log the split's metric objects (computed and, under DDP, synchronised at epoch end).

        Called for every batch, also for batches without data or with a non-finite loss (then
        without an update), so every rank logs the same metrics and the epoch-end
        synchronisation runs on all of them, even on a rank whose whole shard was skipped.
        """
        if split != "train":
            for name in LOSS_NAMES:
                self.log(f"{split}/{name}", self.eval_loss_means[f"{split}_{name}"], on_step=False, on_epoch=True,
                         prog_bar=name == "loss", batch_size=num_structures)
        elif not self.train_metrics:
            return
        for name, metric in self.metrics[f"{split}_metrics"].members().items():
            self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True,
                     prog_bar=split != "train" and name in ("energy_mae", "forces_mae"), batch_size=num_structures)

    def _has_data(self, batch: Any, split: str) -> bool:
        """Count and report samples dropped by ``skip_bad_samples``; False when none is left."""
        skipped = list(getattr(batch, "skipped", None) or [])
        if skipped:
            self.skipped_samples[split] += len(skipped)
            print(f"WARNING: {split}: skipped bad samples: {', '.join(skipped)}", flush=True)
        return batch is not None and getattr(batch, "num_graphs", 1) > 0

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss whose backward gives every trainable parameter a (zero) gradient."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.sum().float() for p in params]).sum() * 0.0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._micro_batches[0] += 1
        if not self._has_data(batch, "train"):
            # No structure left: still run backward (on a zero loss), so under DDP this rank joins
            # the gradient all-reduce; on_before_optimizer_step takes this micro-batch out of the mean.
            self.last_train_loss = None
            self._log_metric_states("train", 1)
            return self._zero_loss()
        self._micro_batches[1] += 1
        out = self._step(batch, "train")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return out["loss"]

    def _evaluation_step(self, batch: Any, split: str) -> dict[str, Any] | None:
        """A validation/test step; a batch without data still logs the metric states (DDP sync)."""
        if self._has_data(batch, split):
            return self._step(batch, split)
        self._log_metric_states(split, 1)
        return None

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any] | None:
        return self._evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any] | None:
        return self._evaluation_step(batch, "test")

    def on_train_start(self) -> None:
        self._micro_batches = [0, 0]
        datamodule = getattr(self.trainer, "datamodule", None)
        # Whether a micro-batch can be empty: then the ranks agree on it before each optimizer step.
        self._may_be_empty = bool(getattr(datamodule, "skip_bad_samples", True))

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Take micro-batches without data out of the gradient mean; skip a step without any data.

        Runs after backward and the DDP all-reduce (which averaged over all ranks and
        micro-batches, counting empty ones as zero) and before clipping: the gradients are
        multiplied by (all micro-batches) / (micro-batches with data), summed over ranks, so
        the update equals the mean over the structures' batches that were there.

        Under DDP with skip mode the two counts are summed across ranks on the device (one
        small all-reduce per step) and the scale is applied there, so nothing is read back
        while this rank has data: a step can only be empty everywhere if it is empty here.
        A rank without data reads the sum (one read), and all ranks with an empty step
        everywhere skip it together.
        """
        total, filled = self._micro_batches
        self._micro_batches = [0, 0]
        trainer = self.trainer
        if trainer.world_size > 1 and self._may_be_empty:
            counts = torch.empty(2, device=trainer.strategy.root_device)
            counts[0], counts[1] = float(total), float(filled)  # filled in on the device: no copy that waits
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            if filled == 0 and int(counts[1].item()) == 0:
                self._skip_empty_step(optimizer)
                return
            _scale_gradients(optimizer, counts[0] / counts[1].clamp_min(1.0))
            return
        if filled == total:
            return
        if filled == 0:
            self._skip_empty_step(optimizer)
            return
        _scale_gradients(optimizer, total / filled)

    def _skip_empty_step(self, optimizer: Any) -> None:
        """No structure on any rank: no update, no EMA update, no step of a step-interval schedule."""
        optimizer.zero_grad(set_to_none=True)
        self.step_skipped = self._no_data_step = True
        self.empty_steps += 1
        if self.trainer.is_global_zero:
            print(f"WARNING: skipped training step {self.trainer.global_step}: every structure of its batches was "
                  "bad (data.skip_bad_samples) on every rank", flush=True)

    def _epoch_end_skipped(self, split: str) -> None:
        """Log the skipped-sample count of ``split`` (cumulative), summed over ranks (all ranks run this hook)."""
        self.log(f"data/skipped_samples_{split}", float(self.skipped_samples[split]), on_step=False, on_epoch=True,
                 batch_size=1, sync_dist=True, reduce_fx="sum")

    def on_train_epoch_end(self) -> None:
        self._epoch_end_skipped("train")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end_skipped("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end_skipped("test")

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step-interval schedules do not advance on steps without data (the non-finite guard
        moves them back for the steps it skips, see :func:`~escn_train.training.reliability.rewind_step_schedules`)."""
        if self._no_data_step:
            interval = next((c.interval for c in self.trainer.lr_scheduler_configs if c.scheduler is scheduler), "step")
            if interval == "step":
                return
        super().lr_scheduler_step(scheduler, metric)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor] | None:
        if getattr(batch, "num_graphs", 1) == 0:  # every structure of the batch skipped (skip_bad_samples)
            return None
        return self(batch)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update (once per step, not per accumulated micro-batch).

        Updating here rather than in ``on_train_batch_end`` puts the EMA of step k into a
        checkpoint that callbacks write at the end of batch k (exact resume). Steps skipped
        by the non-finite guard leave the EMA alone.
        """
        self.step_skipped = self._no_data_step = False
        self.step_applied = None
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not self.step_skipped:
            self.ema.update(self.potential, applied=self.step_applied)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        precision = self.trainer.precision_plugin if self._trainer is not None else None
        scaler = getattr(precision, "scaler", None)
        # A gradient scaler (16-bit mixed precision) unscales inside a fused step, after
        # clipping would have run: no fused step then (the non-finite guard reads its flags
        # on the host at every step).
        optimizer = build_optimizer(self.potential, self.optimizer_config, fused=False if scaler is not None else None)
        if scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # This flag only tells a gradient scaler to hand the step its found_inf (the guard
            # does that itself); Lightning's mixed-precision plugin also reads it as "unscales
            # internally" and refuses gradient clipping, which without a scaler (bf16) is wrong.
            optimizer._step_supports_amp_scaling = False
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        scheduler = build_scheduler(optimizer, self.scheduler_config, max(1, total))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["normalizers"] = self.normalizer_values()
        checkpoint["run_info"] = dict(self.run_info)
        if self.run_config is not None:
            checkpoint["config"] = self.run_config
        checkpoint["rng_states"] = capture_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.normalizers_ready = True  # the state dict carries them
        self.run_info.update(checkpoint.get("run_info") or {})
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])


def capture_rng_states() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as plain values / tensors."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states` (missing entries are left alone)."""
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _to_plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value
