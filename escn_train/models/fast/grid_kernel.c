/* The S2-grid SiLU of a message block, fused per edge, for x86-64 CPUs with AVX2 and FMA.
 *
 * For each edge e (features y[e] of K coefficients x C channels) and each 16-channel slice:
 *
 *   forward:   values[e] = from_grid @ silu(to_grid @ y[e])
 *   backward:  grad_y[e] = to_grid^T @ (silu'(to_grid @ y[e]) * (from_grid^T @ grad[e]))
 *
 * The P grid values of a slice (P x 16 floats) stay in the core's L1 cache between the
 * projection, the SiLU and the projection back; PyTorch's batched matmuls with K, P of
 * 7..70 run each product and the SiLU as separate passes over the block. Built and
 * loaded by cpu_kernel.py; grid.py calls it for float32 CPU tensors whose channel count
 * is a multiple of 16, and runs PyTorch's operations otherwise.
 *
 * exp is the usual Cody-Waite reduction with a degree-6 minimax polynomial (about 1 ulp);
 * its argument is clamped to [-87, 87], where SiLU and its derivative are already at
 * their limits to float32 precision, so no result is a denormal.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>

#define SLICE 16 /* channels per slice: two AVX vectors */

/* The entry points keep C names when grid_native.cpp compiles this file as C++. */
#ifdef __cplusplus
#define ESCN_ENTRY extern "C"
#else
#define ESCN_ENTRY
#endif

static inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

static inline __m256 sigmoid_ps(__m256 h) {
    __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), h))));
}

enum epilogue { PLAIN, SILU, TIMES_SILU_DERIVATIVE };

/* What a row's sum becomes: itself, silu(v), or v * silu'(h) for the row's h in pre. */
static inline __m256 finish(__m256 v, enum epilogue kind, const float *pre) {
    if (kind == SILU) return _mm256_mul_ps(v, sigmoid_ps(v));
    if (kind == TIMES_SILU_DERIVATIVE) {
        __m256 one = _mm256_set1_ps(1.0f), h = _mm256_loadu_ps(pre), s = sigmoid_ps(h);
        return _mm256_mul_ps(v, _mm256_mul_ps(s, _mm256_fmadd_ps(h, _mm256_sub_ps(one, s), one)));
    }
    return v;
}

/* out[r] = finish(sum_s m[r, s] * x[s]) for r < rows, over 16-channel rows of x (row
 * stride x_stride) and out (out_stride); m is [rows, inner], pre is [rows, 16]. Four output
 * rows at a time, so each x row loaded feeds eight FMAs. */
static void matrix_rows(const float *m, int rows, int inner, const float *x, long x_stride, float *out,
                        long out_stride, enum epilogue kind, const float *pre) {
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        __m256 acc[4][2];
        for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        const float *w = m + (long)r * inner;
        for (int s = 0; s < inner; ++s) {
            __m256 lo = _mm256_loadu_ps(x + s * x_stride), hi = _mm256_loadu_ps(x + s * x_stride + 8);
            for (int i = 0; i < 4; ++i) {
                __m256 b = _mm256_broadcast_ss(w + i * inner + s);
                acc[i][0] = _mm256_fmadd_ps(b, lo, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(b, hi, acc[i][1]);
            }
        }
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 2; ++j)
                _mm256_storeu_ps(out + (r + i) * out_stride + 8 * j,
                                 finish(acc[i][j], kind, pre + (r + i) * SLICE + 8 * j));
    }
    for (; r < rows; ++r) {
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        const float *w = m + (long)r * inner;
        for (int s = 0; s < inner; ++s) {
            __m256 b = _mm256_broadcast_ss(w + s);
            lo = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + s * x_stride), lo);
            hi = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + s * x_stride + 8), hi);
        }
        _mm256_storeu_ps(out + r * out_stride, finish(lo, kind, pre + r * SLICE));
        _mm256_storeu_ps(out + r * out_stride + 8, finish(hi, kind, pre + r * SLICE + 8));
    }
}

/* Scratch rows for each thread of a parallel region: `per_thread` slices of P x 16 floats. */
static float *scratch(int threads, int per_thread, int points) {
    return (float *)aligned_alloc(32, sizeof(float) * SLICE * points * per_thread * threads);
}

/* values [edges, K, C] = from_grid [K, P] @ silu(to_grid [P, K] @ y [edges, K, C]).
 * Returns 0, or 1 when C is not a multiple of 16 or the scratch rows could not be allocated. */
ESCN_ENTRY int escn_grid_forward(const float *y, long edges, int k, long channels, const float *to_grid,
                      const float *from_grid, int points, float *values, int threads) {
    if (channels % SLICE || threads < 1) return 1;
    float *buffers = scratch(threads, 1, points);
    if (!buffers) return 1;
    long slices = channels / SLICE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long task = 0; task < edges * slices; ++task) {
        float *grid = buffers + (long)omp_get_thread_num() * SLICE * points;
        long offset = (task / slices) * k * channels + (task % slices) * SLICE;
        matrix_rows(to_grid, points, k, y + offset, channels, grid, SLICE, SILU, 0);
        matrix_rows(from_grid, k, points, grid, SLICE, values + offset, channels, PLAIN, 0);
    }
    free(buffers);
    return 0;
}

/* grad_y [edges, K, C] = to_grid^T @ (silu'(to_grid @ y) * (from_grid^T @ grad)), with the
 * transposes passed contiguous: from_grid_t [P, K], to_grid_t [K, P]. Returns as above. */
ESCN_ENTRY int escn_grid_backward(const float *grad, const float *y, long edges, int k, long channels, const float *to_grid,
                       const float *from_grid_t, const float *to_grid_t, int points, float *grad_y, int threads) {
    if (channels % SLICE || threads < 1) return 1;
    float *buffers = scratch(threads, 2, points);
    if (!buffers) return 1;
    long slices = channels / SLICE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long task = 0; task < edges * slices; ++task) {
        float *pre = buffers + (long)omp_get_thread_num() * 2 * SLICE * points, *grad_grid = pre + SLICE * points;
        long offset = (task / slices) * k * channels + (task % slices) * SLICE;
        matrix_rows(to_grid, points, k, y + offset, channels, pre, SLICE, PLAIN, 0);
        matrix_rows(from_grid_t, points, k, grad + offset, channels, grad_grid, SLICE, TIMES_SILU_DERIVATIVE, pre);
        matrix_rows(to_grid_t, k, points, grad_grid, SLICE, grad_y + offset, channels, PLAIN, 0);
    }
    free(buffers);
    return 0;
}
