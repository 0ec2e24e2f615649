"""Spherical-harmonic bookkeeping: coefficient layouts, S2 grids and Wigner matrices.

Layouts follow ESCN_MATH section 2: the full layout holds (l, m) at l^2 + l + m; the
reduced layout keeps |m| <= mmax in the same order; the m-major order groups equal |m|.
Every derived constant is a non-persistent buffer: it follows ``.to()`` but is rebuilt from
the configuration instead of being read from checkpoints.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from escn_train.precision import autocast_off


def _as_int(value: int | list[int] | tuple[int, ...]) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"only one resolution is supported, got {list(value)}")
        return int(value[0])
    return int(value)


def coefficient_idx(lmax: int, mmax: int) -> torch.Tensor:
    """Full-layout indices of the coefficients with l <= lmax and |m| <= mmax, ascending."""
    return torch.tensor(
        [l * l + l + m for l in range(lmax + 1) for m in range(-min(l, mmax), min(l, mmax) + 1)],
        dtype=torch.long,
    )


class CoefficientMapping(nn.Module):
    """Degree/order bookkeeping for the reduced layout of (lmax, mmax).

    Accepts ints or the reference's one-element lists. ``to_m_index`` is the gather that
    puts the reduced layout in m-major order (the reference's 0/1 matrix ``to_m``);
    ``from_m_index`` undoes it.
    """

    def __init__(self, lmax_list: int | list[int], mmax_list: int | list[int]) -> None:
        super().__init__()
        self.lmax = _as_int(lmax_list)
        self.mmax = _as_int(mmax_list)
        self.lmax_list = [self.lmax]
        self.mmax_list = [self.mmax]

        pairs = [(l, m) for l in range(self.lmax + 1) for m in range(-min(l, self.mmax), min(l, self.mmax) + 1)]
        l_harmonic = torch.tensor([l for l, _ in pairs], dtype=torch.long)
        m_complex = torch.tensor([m for _, m in pairs], dtype=torch.long)
        self.res_size = [len(pairs)]

        # m-major order: all m = 0 (l ascending), then for each m >= 1 the +m entries
        # followed by the -m entries, both l ascending.
        position = {pair: i for i, pair in enumerate(pairs)}
        order = [position[(l, 0)] for l in range(self.lmax + 1)]
        self.m_size = [self.lmax + 1]
        for m in range(1, self.mmax + 1):
            order += [position[(l, m)] for l in range(m, self.lmax + 1)]
            order += [position[(l, -m)] for l in range(m, self.lmax + 1)]
            self.m_size.append(self.lmax - m + 1)
        to_m_index = torch.tensor(order, dtype=torch.long)

        self.register_buffer("l_harmonic", l_harmonic, persistent=False)
        self.register_buffer("m_complex", m_complex, persistent=False)
        self.register_buffer("m_harmonic", m_complex.abs(), persistent=False)
        self.register_buffer("to_m_index", to_m_index, persistent=False)
        self.register_buffer("from_m_index", torch.argsort(to_m_index), persistent=False)

    def coefficient_idx(self, lmax: int, mmax: int) -> torch.Tensor:
        """Indices into this layout of the entries with l <= lmax and |m| <= mmax."""
        mask = (self.l_harmonic <= lmax) & (self.m_harmonic <= mmax)
        return mask.nonzero(as_tuple=True)[0]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(lmax={self.lmax}, mmax={self.mmax})"


class SO3_Grid(nn.Module):  # noqa: N801 - the reference's public name
    """Linear maps between (lmax, mmax) coefficients and values on a lat x long S2 grid."""

    def __init__(
        self,
        lmax: int,
        mmax: int,
        normalization: str = "integral",
        resolution: int | None = None,
        rescale: bool = False,
    ) -> None:
        super().__init__()
        self.lmax = lmax
        self.mmax = mmax
        self.lat_resolution = 2 * (lmax + 1)
        self.long_resolution = 2 * (mmax + 1) + 1 if lmax == mmax else 2 * mmax + 1
        if resolution is not None:
            self.lat_resolution = resolution
            self.long_resolution = resolution
        self.mapping = CoefficientMapping(lmax, lmax)

        res = (self.lat_resolution, self.long_resolution)
        to_grid = o3.ToS2Grid(lmax, res, normalization=normalization, dtype=torch.float64)
        from_grid = o3.FromS2Grid(res, lmax, normalization=normalization, dtype=torch.float64)
        to_grid_mat = torch.einsum("mbi,am->bai", to_grid.shb, to_grid.sha)
        from_grid_mat = torch.einsum("am,mbi->bai", from_grid.sha, from_grid.shb)
        if rescale and lmax != mmax:
            scale = torch.ones((lmax + 1) ** 2, dtype=torch.float64)
            for l in range(mmax + 1, lmax + 1):
                scale[l * l : (l + 1) ** 2] = math.sqrt((2 * l + 1) / (2 * mmax + 1))
            to_grid_mat = to_grid_mat * scale
            from_grid_mat = from_grid_mat * scale
        keep = coefficient_idx(lmax, mmax)
        dtype = torch.get_default_dtype()
        self.register_buffer("to_grid_mat", to_grid_mat[:, :, keep].to(dtype).contiguous(), persistent=False)
        self.register_buffer("from_grid_mat", from_grid_mat[:, :, keep].to(dtype).contiguous(), persistent=False)

    @property
    def num_points(self) -> int:
        return self.lat_resolution * self.long_resolution

    def get_to_grid_mat(self, device: torch.device | None = None) -> torch.Tensor:
        return self.to_grid_mat

    def get_from_grid_mat(self, device: torch.device | None = None) -> torch.Tensor:
        return self.from_grid_mat

    def to_grid(self, embedding: torch.Tensor, lmax: int, mmax: int) -> torch.Tensor:
        """[Z, coeffs, C] -> [Z, lat, long, C]."""
        mat = self.to_grid_mat[:, :, self.mapping.coefficient_idx(lmax, mmax)]
        return torch.einsum("bai,zic->zbac", mat, embedding)

    def from_grid(self, grid: torch.Tensor, lmax: int, mmax: int) -> torch.Tensor:
        """[Z, lat, long, C] -> [Z, coeffs, C]."""
        mat = self.from_grid_mat[:, :, self.mapping.coefficient_idx(lmax, mmax)]
        return torch.einsum("bai,zbac->zic", mat, grid)

    def to_grid_flat(self, embedding: torch.Tensor) -> torch.Tensor:
        """All this grid's coefficients [Z, coeffs, C] -> [Z, lat * long, C]."""
        return torch.matmul(self.to_grid_mat.flatten(0, 1), embedding)

    def from_grid_flat(self, grid: torch.Tensor) -> torch.Tensor:
        """[Z, lat * long, C] -> [Z, coeffs, C] for all this grid's coefficients."""
        return torch.matmul(self.from_grid_mat.flatten(0, 1).t(), grid)


# ---------------------------------------------------------------------------------------
# Edge frames and Wigner matrices
# ---------------------------------------------------------------------------------------


def edge_frames(edge_distance_vec: torch.Tensor, random_frames: bool = False) -> torch.Tensor:
    """Per-edge rotations with rows (ẑ', x̂, -ŷ') that map the edge direction onto +y.

    The helper vector u that fixes the rotation about the edge is, by default, the
    coordinate axis least aligned with the edge: a fixed function of the direction, never
    parallel to it, so identical inputs give bitwise identical outputs. ``random_frames``
    draws u at random as the reference does.
    """
    length = torch.sqrt(torch.sum(edge_distance_vec**2, dim=1, keepdim=True))
    norm_x = edge_distance_vec / length
    if random_frames:
        u = torch.rand_like(edge_distance_vec) - 0.5
        u = u / torch.sqrt(torch.sum(u**2, dim=1, keepdim=True))
        u_b = torch.stack([-u[:, 1], u[:, 0], u[:, 2]], dim=1)
        u_c = torch.stack([u[:, 0], -u[:, 2], u[:, 1]], dim=1)
        dot = torch.abs(torch.sum(u * norm_x, dim=1, keepdim=True))
        dot_b = torch.abs(torch.sum(u_b * norm_x, dim=1, keepdim=True))
        u = torch.where(dot > dot_b, u_b, u)
        dot = torch.abs(torch.sum(u * norm_x, dim=1, keepdim=True))
        dot_c = torch.abs(torch.sum(u_c * norm_x, dim=1, keepdim=True))
        u = torch.where(dot > dot_c, u_c, u)
    else:
        axis = torch.argmin(norm_x.abs(), dim=1)
        # A comparison, not one_hot (which reads the indices' range back to the host).
        u = (axis.unsqueeze(1) == torch.arange(3, device=axis.device)).to(norm_x.dtype)
    norm_z = torch.cross(norm_x, u, dim=1)
    norm_z = norm_z / torch.sqrt(torch.sum(norm_z**2, dim=1, keepdim=True))
    norm_y = torch.cross(norm_x, norm_z, dim=1)
    norm_y = norm_y / torch.sqrt(torch.sum(norm_y**2, dim=1, keepdim=True))
    return torch.stack([norm_z, norm_x, -norm_y], dim=1).detach()


def wigner_j_matrices(lmax: int) -> list[torch.Tensor]:
    """J_l = (-1)^l D_l(π/2, π/2, π/2), in float64 (the reference's ``Jd`` constants)."""
    half_pi = torch.tensor(math.pi / 2, dtype=torch.float64)
    return [(-1) ** l * o3.wigner_D(l, half_pi, half_pi, half_pi) for l in range(lmax + 1)]


def _euler_angles(rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e3nn's Y-X-Y Euler angles of rotations [E, 3, 3]: α, β of the second column (as
    ``o3.xyz_to_angles``) and γ, the angle left once R_y(α) R_x(β) is undone. Only the first
    row of (R_y(α) R_x(β))ᵀ R is needed for γ, and that row is (cos α, 0, -sin α) R."""
    direction = rotation[:, :, 1]
    direction = direction / torch.sqrt((direction * direction).sum(dim=1, keepdim=True))
    alpha = torch.atan2(direction[:, 0], direction[:, 2])
    beta = torch.acos(direction[:, 1].clamp(-1.0, 1.0))
    cos_a, sin_a = torch.cos(alpha), torch.sin(alpha)
    first_row = cos_a.unsqueeze(1) * rotation[:, 0] - sin_a.unsqueeze(1) * rotation[:, 2]
    return alpha, beta, torch.atan2(first_row[:, 2], first_row[:, 0])


class WignerCalculator(nn.Module):
    """Block-diagonal Wigner matrices D_0 ... D_lmax of per-edge rotation matrices.

    D_l = Z(α) J Z(β) J Z(γ) (ESCN_MATH section 4). Z(θ) is sparse, so it is applied as
    elementwise products with an index flip instead of matrix products, and all degrees
    are handled at once in the full (lmax+1)^2 layout.
    """

    def __init__(self, lmax: int) -> None:
        super().__init__()
        self.lmax = lmax
        size = (lmax + 1) ** 2
        j_full = torch.zeros(size, size, dtype=torch.float64)
        for l, j in enumerate(wigner_j_matrices(lmax)):
            j_full[l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] = j
        degree = torch.cat([torch.full((2 * l + 1,), l) for l in range(lmax + 1)])
        order = torch.cat([torch.arange(-l, l + 1) for l in range(lmax + 1)])
        # Z(θ)[k, k] = cos(f θ), Z(θ)[k, mirror(k)] = sin(f θ) with f = -m.
        mirror = degree * degree + degree - order
        dtype = torch.get_default_dtype()
        self.register_buffer("j_full", j_full.to(dtype), persistent=False)
        self.register_buffer("j_mirrored", j_full[:, mirror].to(dtype), persistent=False)
        self.register_buffer("frequency", (-order).to(dtype), persistent=False)
        self.register_buffer("mirror", mirror, persistent=False)

    def forward(self, edge_rot_mat: torch.Tensor) -> torch.Tensor:
        """[E, 3, 3] rotations -> [E, (lmax+1)^2, (lmax+1)^2] block-diagonal Wigner (no grad),
        always in the input's precision (autocast off: a bf16 product here would put bf16
        rounding into every rotation)."""
        with autocast_off(edge_rot_mat):
            return self._matrices(edge_rot_mat.detach())

    def _matrices(self, edge_rot_mat: torch.Tensor) -> torch.Tensor:
        """Z(α) J Z(β) J Z(γ) for every degree at once, in the rotations' precision."""
        alpha, beta, gamma = _euler_angles(edge_rot_mat)

        f = self.frequency.to(edge_rot_mat.dtype)
        mirror = self.mirror
        j_full = self.j_full.to(edge_rot_mat.dtype)
        j_mirrored = self.j_mirrored.to(edge_rot_mat.dtype)

        def phases(angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            arg = angle.unsqueeze(-1) * f
            return torch.cos(arg), torch.sin(arg)

        cos_g, sin_g = phases(gamma)
        cos_b, sin_b = phases(beta)
        cos_a, sin_a = phases(alpha)
        # J Z(γ): column j mixes J[:, j] and J[:, mirror(j)].
        out = (j_full * cos_g.unsqueeze(1)).addcmul_(j_mirrored, sin_g[:, mirror].unsqueeze(1))
        # Z(β) (...): row k mixes rows k and mirror(k). In place: a few passes over [E, S, S].
        out = out.index_select(1, mirror).mul_(sin_b.unsqueeze(-1)).addcmul_(out, cos_b.unsqueeze(-1))
        out = torch.matmul(j_full, out)
        out = out.index_select(1, mirror).mul_(sin_a.unsqueeze(-1)).addcmul_(out, cos_a.unsqueeze(-1))
        return out.detach()
