"""Exponential moving average (EMA) of a module's weights.

The EMA is a full copy of the module (parameters frozen), updated after every optimizer step
with ``ema ← decay_t · ema + (1 - decay_t) · weights``. With ``warmup`` the effective decay
is ``decay_t = min(decay, (1 + t) / (10 + t))`` (t = updates so far), so the average is not
dominated by the random initial weights early in training. Buffers (e.g. the normalisers)
are copied, not averaged.

Being a submodule of the LightningModule, the copy is part of its ``state_dict``: it is
saved in every checkpoint and restored on resume without extra code, and validation, test
and export can use it directly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from escn_train.models.workspace import Workspace


class ExponentialMovingAverage(nn.Module):
    """EMA copy of ``module`` (``self.module``) and its update rule."""

    def __init__(self, module: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay: must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        # The model's kept inference buffers are caches that training and validation never
        # use at the same time: the copy shares them instead of holding a second set.
        shared = {id(w): w for w in (getattr(m, "workspace", None) for m in module.modules()) if isinstance(w, Workspace)}
        self.module = copy.deepcopy(module, memo=shared)
        self.module.requires_grad_(False)
        self.module.eval()
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def train(self, mode: bool = True) -> "ExponentialMovingAverage":
        """The averaged copy always stays in eval mode."""
        super().train(mode)
        self.module.eval()
        return self

    def current_decay(self) -> float:
        """The decay the next update uses (reads the update count on the host)."""
        return float(self._decay_tensor())

    def _decay_tensor(self) -> torch.Tensor:
        """The next update's decay as a 0-dim float64 tensor on the counter's device (no host sync)."""
        t = self.num_updates.to(torch.float64)
        if self.warmup:
            return torch.clamp((1.0 + t) / (10.0 + t), max=self.decay)
        return torch.full_like(t, self.decay)

    @torch.no_grad()
    def update(self, module: nn.Module, applied: torch.Tensor | None = None) -> None:
        """Blend ``module``'s trainable weights into the average; copy everything else.

        ``applied``: a 0-dim bool tensor; False leaves the average and the update count alone
        (a step skipped on the device), without a host sync.
        """
        weight = 1.0 - self._decay_tensor()
        if applied is not None:
            weight = weight * applied
        ema_params = dict(self.module.named_parameters())
        averaged, current = [], []
        for name, param in module.named_parameters():
            target = ema_params[name]
            if param.requires_grad and target.dtype.is_floating_point:
                averaged.append(target)
                current.append(param.detach().to(target.dtype))
            else:
                target.copy_(param.detach())
        for dtype in {t.dtype for t in averaged}:  # ema += w (param - ema), w a device scalar
            group = [i for i, t in enumerate(averaged) if t.dtype == dtype]
            delta = torch._foreach_sub([current[i] for i in group], [averaged[i] for i in group])
            torch._foreach_mul_(delta, weight.to(dtype))
            torch._foreach_add_([averaged[i] for i in group], delta)
        ema_buffers = dict(self.module.named_buffers())
        for name, buf in module.named_buffers():
            ema_buffers[name].copy_(buf)
        self.num_updates += 1 if applied is None else applied.to(self.num_updates.dtype)

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        """Reset the average to ``module``'s current weights and buffers (no update counted)."""
        self.module.load_state_dict(module.state_dict())
