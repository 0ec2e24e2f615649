"""Radial bases that expand an edge length into ``num_output`` features (ESCN_MATH section 3)."""

from __future__ import annotations

import math

import torch
from torch import nn


#: exp(-87) ≈ 1.6e-38 is still a normal float32; exp of anything lower is subnormal or 0.
_SMALLEST_NORMAL_EXPONENT = -87.0


class _FixedBasis(nn.Module):
    """Basis functions centred on ``num`` evenly spaced offsets between start and stop."""

    def __init__(self, start: float, stop: float, num: int, basis_width_scalar: float) -> None:
        super().__init__()
        self.num_output = num
        offset = torch.linspace(start, stop, num)
        self.spacing = float(offset[1] - offset[0])
        self.basis_width_scalar = basis_width_scalar
        # Persistent under this name so reference checkpoints load without remapping.
        self.register_buffer("offset", offset)

    def _shifted(self, dist: torch.Tensor) -> torch.Tensor:
        return dist.view(-1, 1) - self.offset.view(1, -1)


class GaussianSmearing(_FixedBasis):
    """exp(-0.5 / (w δ)^2 · (d - μ)^2)."""

    def __init__(
        self, start: float = -5.0, stop: float = 5.0, num_gaussians: int = 50, basis_width_scalar: float = 1.0
    ) -> None:
        super().__init__(start, stop, num_gaussians, basis_width_scalar)
        self.start = float(start)
        self.coeff = -0.5 / (basis_width_scalar * self.spacing) ** 2
        # Centres within this many spacings of the nearest one can give exp() >= exp(-87).
        self.band_half_width = math.ceil(math.sqrt(-_SMALLEST_NORMAL_EXPONENT / -self.coeff) / self.spacing) + 1

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        """[E] -> [E, num_gaussians].

        Without autograd, only the band of centres around each distance is evaluated and
        the far Gaussians are exactly 0 instead of a value below exp(-87) ≈ 1.6e-38 (a
        change below 2e-38): exp() of their large negative exponents takes a slow path on
        CPUs and returns subnormals, which slow down the next matrix product as well.
        """
        band = 2 * self.band_half_width + 1
        if dist.requires_grad or band >= self.num_output:
            shifted = self._shifted(dist)
            if shifted.requires_grad:
                return torch.exp(self.coeff * shifted * shifted)
            return self._clipped_exp(shifted)
        first = (self.nearest_centre(dist.view(-1)) - self.band_half_width).clamp_(0, self.num_output - band)
        columns = first.view(-1, 1) + torch.arange(band, device=dist.device)
        values = self.centre_values(dist.view(-1, 1), columns)
        return values.new_zeros(values.shape[0], self.num_output).scatter_(1, columns, values)

    def nearest_centre(self, dist: torch.Tensor) -> torch.Tensor:
        """Index of the centre nearest to each distance (outside [start, stop]: beyond the ends)."""
        return torch.round((dist - self.start) / self.spacing).to(torch.long)

    def centre_values(self, dist: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The Gaussians of centres ``columns`` at ``dist`` (broadcast together), exactly 0
        below exp(-87), as forward computes them without autograd."""
        return self._clipped_exp(dist - self.offset[columns])

    def _clipped_exp(self, shifted: torch.Tensor) -> torch.Tensor:
        """exp(coeff · shifted²), exactly 0 where the exponent is below -87."""
        arg = (shifted * self.coeff).mul_(shifted)
        far = arg < _SMALLEST_NORMAL_EXPONENT
        return arg.clamp_(min=_SMALLEST_NORMAL_EXPONENT).exp_().masked_fill_(far, 0.0)


class SigmoidSmearing(_FixedBasis):
    """sigmoid((w / δ) · (d - μ))."""

    def __init__(
        self, start: float = -5.0, stop: float = 5.0, num_sigmoid: int = 50, basis_width_scalar: float = 1.0
    ) -> None:
        super().__init__(start, stop, num_sigmoid, basis_width_scalar)
        self.coeff = basis_width_scalar / self.spacing

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.coeff * self._shifted(dist))


class LinearSigmoidSmearing(_FixedBasis):
    """sigmoid(t) + 0.001 · t with t = (w / δ) · (d - μ): a sigmoid that never saturates."""

    def __init__(
        self, start: float = -5.0, stop: float = 5.0, num_sigmoid: int = 50, basis_width_scalar: float = 1.0
    ) -> None:
        super().__init__(start, stop, num_sigmoid, basis_width_scalar)
        self.coeff = basis_width_scalar / self.spacing

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        t = self.coeff * self._shifted(dist)
        return torch.sigmoid(t) + 0.001 * t


class SiLUSmearing(nn.Module):
    """A learnable basis: SiLU(Linear(2, num)([d, 1]))."""

    def __init__(
        self, start: float = -5.0, stop: float = 5.0, num_output: int = 50, basis_width_scalar: float = 1.0
    ) -> None:
        super().__init__()
        self.num_output = num_output
        self.fc1 = nn.Linear(2, num_output)
        self.act = nn.SiLU()

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        dist = dist.view(-1, 1)
        features = torch.cat([dist, torch.ones_like(dist)], dim=1)
        return self.act(self.fc1(features))


DISTANCE_FUNCTIONS: dict[str, type[nn.Module]] = {
    "gaussian": GaussianSmearing,
    "sigmoid": SigmoidSmearing,
    "linearsigmoid": LinearSigmoidSmearing,
    "silu": SiLUSmearing,
}


def make_distance_expansion(
    distance_function: str, cutoff: float, num_basis: int, basis_width_scalar: float
) -> nn.Module:
    """The expansion named ``distance_function`` over [0, cutoff]."""
    if distance_function not in DISTANCE_FUNCTIONS:
        raise ValueError(
            f"distance_function={distance_function!r} is not one of {sorted(DISTANCE_FUNCTIONS)}"
        )
    return DISTANCE_FUNCTIONS[distance_function](0.0, cutoff, num_basis, basis_width_scalar)
