/* escn_native::grid_silu: the forward of the S2-grid stage (grid.py's escn_train::grid_silu)
 * as a C++ operator, for standalone AOTInductor packages on CPUs.
 *
 * Standalone packages run without Python, where escn_train::grid_silu (a Python operator)
 * does not exist. Without this operator they compile the stage's plain expressions, whose
 * grid values for every edge at once are hundreds of MB of fresh pages per call (bench
 * batch, L3 M1: 1.4x eager's time). This file registers the same blocked computation,
 * calling the kernel of grid_kernel.c on each block, so a host that loads the library
 * (escn-export writes it beside the package) runs the stage as eager code does.
 *
 * Built and loaded by native_grid.py; it takes what that kernel takes (float32 CPU
 * features whose channel count is a multiple of 16), and escn-export uses it only then.
 */
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "grid_kernel.c"

namespace {

/* out = from_grid @ silu(to_grid @ y) for one block y [B, K, C] (contiguous), into out [B, K, C]. */
void grid_values(const at::Tensor &y, const at::Tensor &to_grid, const at::Tensor &from_grid, at::Tensor &out) {
    int status = escn_grid_forward(y.data_ptr<float>(), y.size(0), static_cast<int>(y.size(1)), y.size(2),
                                   to_grid.data_ptr<float>(), from_grid.data_ptr<float>(),
                                   static_cast<int>(to_grid.size(0)), out.data_ptr<float>(), at::get_num_threads());
    TORCH_CHECK(status == 0, "escn_native::grid_silu: the grid kernel could not allocate its scratch rows (",
                to_grid.size(0), " points)");
}

/* Edges per block, as grid.py's _block_edges: floats_per_thread grid values per thread (at
 * most max_threads threads' shares), for `points` x `channels` values per edge, in whole
 * groups of `size` slots. An operator of its own, so that a test holds the two equal. */
int64_t block_edges(int64_t points, int64_t channels, int64_t size, int64_t threads, int64_t floats_per_thread,
                    int64_t max_threads) {
    const int64_t floats = floats_per_thread * std::min(threads, max_threads);
    const int64_t step = std::max<int64_t>(1, floats / std::max<int64_t>(1, points * channels));
    return std::max<int64_t>(1, step / size) * size;
}

/* grid.py's _grid_silu: the stage block by block, with blocks of floats_per_thread grid
 * values per thread (at most max_threads threads' shares), in whole groups of `size` slots;
 * with rows, each block's values are rotated back and summed per target atom. */
at::Tensor grid_silu(const at::Tensor &y_in, const at::Tensor &to_grid_in, const at::Tensor &from_grid_in,
                     const std::optional<at::Tensor> &rows, const std::optional<at::Tensor> &group_atom,
                     int64_t num_atoms, int64_t size, int64_t floats_per_thread, int64_t max_threads) {
    TORCH_CHECK(y_in.device().is_cpu() && y_in.scalar_type() == at::kFloat && y_in.dim() == 3 &&
                    y_in.size(2) % SLICE == 0,
                "escn_native::grid_silu takes float32 CPU features [edges, coefficients, channels] with a multiple "
                "of ", SLICE, " channels; got ", y_in.scalar_type(), " on ", y_in.device(), " with shape ",
                y_in.sizes());
    const at::Tensor y = y_in.contiguous(), to_grid = to_grid_in.contiguous(), from_grid = from_grid_in.contiguous();
    const int64_t edges = y.size(0), channels = y.size(2);
    at::Tensor out;
    if (!rows) {
        out = at::empty({edges, from_grid.size(0), channels}, y.options());
    } else if (!group_atom) {
        out = at::empty({num_atoms, rows->size(2), channels}, y.options());
    } else {
        out = at::zeros({num_atoms, rows->size(2), channels}, y.options());
    }
    const int64_t step =
        block_edges(to_grid.size(0), channels, size, at::get_num_threads(), floats_per_thread, max_threads);
    for (int64_t start = 0; start < edges; start += step) {
        const int64_t count = std::min(step, edges - start);
        const at::Tensor block = y.narrow(0, start, count);
        if (!rows) {
            at::Tensor target = out.narrow(0, start, count);
            grid_values(block, to_grid, from_grid, target);
            continue;
        }
        at::Tensor values = at::empty_like(block);
        grid_values(block, to_grid, from_grid, values);
        const int64_t first = start / size, groups = count / size;
        values = values.view({groups, rows->size(1), channels});
        const at::Tensor block_rows = rows->narrow(0, first, groups).transpose(1, 2);
        if (!group_atom) {
            at::Tensor target = out.narrow(0, first, groups);
            at::bmm_out(target, block_rows, values);
        } else {
            out.index_add_(0, group_atom->narrow(0, first, groups), at::bmm(block_rows, values));
        }
    }
    return out;
}

}  // namespace

TORCH_LIBRARY(escn_native, m) {
    m.def("grid_silu(Tensor y, Tensor to_grid, Tensor from_grid, Tensor? rows, Tensor? group_atom, SymInt num_atoms, "
          "SymInt size, int floats_per_thread, int max_threads) -> Tensor");
    m.def("block_edges(int points, int channels, int size, int threads, int floats_per_thread, int max_threads) -> int",
          &block_edges);
}

TORCH_LIBRARY_IMPL(escn_native, CPU, m) { m.impl("grid_silu", &grid_silu); }
