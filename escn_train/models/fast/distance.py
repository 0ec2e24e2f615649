"""Gaussian distance features kept as narrow bands, so that the edge block's first linear
layer skips the zeros of the dense expansion.

A Gaussian basis of G centres (:class:`GaussianSmearing`) gives each distance only about
``2 * band_half_width + 1`` non-zero values, the centres around it. The dense [E, G]
expansion times a [G, C] weight spends about 90% of its work (and of its weight-gradient
product in training) on zeros. :class:`DistanceBands` groups the edges by the block of
``CENTRES_PER_BLOCK`` consecutive centres their distance is nearest to, in chunks of at
most ``CHUNK_EDGES`` edges. All edges of a chunk share one window of
``CENTRES_PER_BLOCK + 2 * band_half_width`` consecutive centres that holds every non-zero
value of theirs, so the projection is one batched product
[chunks, chunk edges, window] x [chunks, window, C] with each chunk's rows of the weight.

Chunks do not simply take consecutive edges in distance order: where distances are sparse
(the few shortest bonds), such a chunk spans many centres, and a window common to all
chunks would be that wide (about 120 of 300 centres on the bench batch instead of 38).
Every shape follows from the number of distances: nothing is read back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from escn_train.models.smearing import GaussianSmearing

#: Edges per chunk, and centres per block (each block's window adds the band's reach on
#: both sides). Smaller values narrow the windows but pad more rows. Measured on the bench
#: batch (7,328 edges, 300 centres, 32 channels): 32..128 edges and 4..8 centres within ~5%
#: of each other; 256 edges or 16 centres ~5-15% slower. The chunk count is the static
#: bound blocks + ceil(E / CHUNK_EDGES), so small chunks also keep the spare ones cheap.
CHUNK_EDGES = 32
CENTRES_PER_BLOCK = 8


def expand_distances(expansion: nn.Module, dist: torch.Tensor) -> torch.Tensor | DistanceBands:
    """``expansion(dist)``: for a Gaussian basis without autograd through the distances, as
    :class:`DistanceBands` (the non-zero bands only, for a cheaper linear projection)."""
    if isinstance(expansion, GaussianSmearing) and not dist.requires_grad:
        return DistanceBands.build(dist, expansion)
    return expansion(dist)


@dataclass(frozen=True)
class DistanceBands:
    """A Gaussian expansion [E, G] as windows of consecutive centres.

    ``values[k, i, j]`` is the Gaussian of centre ``columns[k, j]`` at the distance of the
    edge in row i of chunk k (exactly 0 outside that edge's band, as in the dense no-grad
    expansion, and in rows without an edge); ``row[e]`` is edge e's row in the flattened
    [chunks * chunk edges] layout.
    """

    values: torch.Tensor
    columns: torch.Tensor
    row: torch.Tensor

    @staticmethod
    def build(dist: torch.Tensor, smearing: GaussianSmearing) -> DistanceBands:
        """The expansion of finite distances ``dist`` [E] (constants: no autograd through them)."""
        dist = dist.detach().reshape(-1)
        num_centres = smearing.num_output
        width = min(CENTRES_PER_BLOCK + 2 * smearing.band_half_width, num_centres)
        nearest = smearing.nearest_centre(dist).clamp_(0, num_centres - 1)
        block = torch.div(nearest, CENTRES_PER_BLOCK, rounding_mode="floor")
        num_blocks = (num_centres - 1) // CENTRES_PER_BLOCK + 1
        chunk_edges = CHUNK_EDGES
        counts = torch.zeros(num_blocks, dtype=block.dtype, device=dist.device).index_add_(0, block, torch.ones_like(block))
        chunks_per_block = torch.div(counts + chunk_edges - 1, chunk_edges, rounding_mode="floor")
        # Enough chunks for any distribution of the distances over the blocks.
        num_chunks = num_blocks + (dist.shape[0] + chunk_edges - 1) // chunk_edges

        # The edges in block order; the i-th of them goes to row i + shift[its block], the
        # rows of a block starting at a fresh chunk.
        order = torch.argsort(block)
        last_chunk = torch.cumsum(chunks_per_block, 0)
        first_row = (last_chunk - chunks_per_block) * chunk_edges
        first_edge = torch.cumsum(counts, 0) - counts
        shift = first_row - first_edge
        sorted_block = block.index_select(0, order)
        row = torch.empty_like(order).index_copy_(
            0, order, torch.arange(dist.shape[0], device=dist.device) + shift.index_select(0, sorted_block)
        )
        chunks = torch.arange(num_chunks, device=dist.device)
        chunk_block = torch.searchsorted(last_chunk, chunks, right=True).clamp_(max=num_blocks - 1)
        first = (chunk_block * CENTRES_PER_BLOCK - smearing.band_half_width).clamp_(0, num_centres - width)
        columns = first.view(-1, 1) + torch.arange(width, device=dist.device)
        # Rows without an edge hold an infinite distance, whose Gaussians are exactly 0.
        padded = dist.new_full((num_chunks, chunk_edges, 1), float("inf"))
        padded.view(-1).index_copy_(0, row, dist)
        values = smearing.centre_values(padded, columns.unsqueeze(1))
        return DistanceBands(values, columns, row)

    def project(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``expansion @ weight.T + bias`` [E, out] for ``weight`` [out, G], ``bias`` [out],
        differentiable with respect to both."""
        # An embedding lookup of the transposed weight made contiguous first: gathering its
        # strided rows is ~10x slower (bench batch windows, 32 channels, forward + backward
        # at 2 threads: 1.1-1.5 ms, against 1.7-2.0 ms). Advanced indexing's backward
        # (index_put with accumulate) gets slower with a second thread; index_select's view
        # back to [chunks, width, out] puts an unprovable divisibility guard into exports.
        window = nn.functional.embedding(self.columns, weight.t().contiguous())  # [chunks, width, out]
        if bias is None:
            out = torch.bmm(self.values, window)
        else:
            out = torch.baddbmm(bias.view(1, 1, -1), self.values, window)
        return out.flatten(0, 1).index_select(0, self.row)
