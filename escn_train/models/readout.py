"""The output heads of eSCN: energy and force MLPs applied at sample points on the sphere."""

from __future__ import annotations

import math

import torch
from torch import nn


def calc_sphere_points(num_points: int) -> torch.Tensor:
    """Golden-spiral points on the sphere, each scaled by its inverse local density."""
    golden_ratio = (1.0 + math.sqrt(5.0)) / 2.0
    i = torch.arange(num_points, dtype=torch.float64).view(-1, 1)
    theta = 2.0 * math.pi * i / golden_ratio
    phi = torch.arccos(1.0 - 2.0 * (i + 0.5) / num_points)
    points = torch.cat([torch.cos(theta) * torch.sin(phi), torch.sin(theta) * torch.sin(phi), torch.cos(phi)], dim=1)
    sq_dist = (points.view(1, -1, 3) - points.view(-1, 1, 3)).pow(2).sum(dim=2)
    density = torch.exp(-sq_dist / 0.15).sum(dim=1)
    scale = 1.0 / density
    scale = num_points * scale / scale.sum()
    return (points * scale.view(-1, 1)).to(torch.get_default_dtype())


class _SphereReadout(nn.Module):
    """An MLP applied at every sample point on the sphere."""

    def __init__(self, num_channels: int, num_sphere_samples: int, act: nn.Module) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.num_sphere_samples = num_sphere_samples
        self.act = act
        self.fc1 = nn.Linear(num_channels, num_channels)
        self.fc2 = nn.Linear(num_channels, num_channels)
        self.fc3 = nn.Linear(num_channels, 1, bias=False)

    def _per_point(self, x_pt: torch.Tensor) -> torch.Tensor:
        """[N, P, C] or [N * P, C] -> [N, P, 1]."""
        x_pt = x_pt.reshape(-1, self.num_sphere_samples, self.num_channels)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x_pt)))))


class EnergyBlock(_SphereReadout):
    """Per-atom energy: the readout averaged over the sphere samples."""

    def forward(self, x_pt: torch.Tensor) -> torch.Tensor:
        return self._per_point(x_pt).sum(dim=1).view(-1) / self.num_sphere_samples


class ForceBlock(_SphereReadout):
    """Per-atom force: the sample points weighted by the readout, averaged."""

    def forward(self, x_pt: torch.Tensor, sphere_points: torch.Tensor) -> torch.Tensor:
        weighted = self._per_point(x_pt) * sphere_points.view(1, self.num_sphere_samples, 3)
        return weighted.sum(dim=1) / self.num_sphere_samples
