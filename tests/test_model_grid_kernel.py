"""The fused CPU kernel of the S2-grid stage (escn_train.models.fast.cpu_kernel) against
the plain expressions in float64, and its build: cache, failure, switch."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from escn_train.models.fast import cpu_kernel, grid

# (coefficients, grid points) of real configurations: tiny, L3 M1, L3 M3, L4 M2, L6 M2.
SHAPES = [(7, 18), (10, 24), (16, 72), (19, 50), (29, 70)]


@pytest.fixture
def kernel():
    if cpu_kernel.library() is None:
        pytest.skip(f"the CPU grid kernel is not used here: {cpu_kernel.unsupported_reason() or 'its build failed'}")
    return cpu_kernel


def _inputs(edges, coeffs, points, channels, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(edges, coeffs, channels, generator=gen) * scale
    to_grid = torch.randn(points, coeffs, generator=gen) / coeffs**0.5
    from_grid = torch.randn(coeffs, points, generator=gen) / points**0.5
    grad = torch.randn(edges, coeffs, channels, generator=gen)
    return y, to_grid, from_grid, grad


def _expected(y, to_grid, from_grid, grad):
    """Value and y-gradient of from_grid @ SiLU(to_grid @ y), by autograd in float64."""
    y64 = y.double().requires_grad_()
    value = torch.matmul(from_grid.double(), torch.nn.functional.silu(torch.matmul(to_grid.double(), y64)))
    (value * grad.double()).sum().backward()
    return value.detach(), y64.grad


@pytest.mark.parametrize("coeffs,points", SHAPES)
@pytest.mark.parametrize("edges,channels", [(1, 16), (5, 48), (300, 128)])
def test_kernel_equals_the_expressions_in_float64(kernel, coeffs, points, edges, channels):
    y, to_grid, from_grid, grad = _inputs(edges, coeffs, points, channels, seed=coeffs + edges)
    value, grad_y = _expected(y, to_grid, from_grid, grad)
    out, out_grad = torch.empty_like(y), torch.empty_like(y)
    assert kernel.grid_forward(y, to_grid, from_grid, out)
    assert kernel.grid_backward(grad, y, to_grid, from_grid, out_grad)
    assert value.abs().max() > 0.1 and grad_y.abs().max() > 0.1
    torch.testing.assert_close(out.double(), value, rtol=2e-6, atol=2e-6 * value.abs().max().item())
    torch.testing.assert_close(out_grad.double(), grad_y, rtol=2e-6, atol=2e-6 * grad_y.abs().max().item())


def test_kernel_saturates_like_silu_for_large_grid_values(kernel):
    """Grid values of ±1e4 (far beyond the clamp of its exp): SiLU is x above, 0 below."""
    y, to_grid, from_grid, grad = _inputs(40, 10, 24, 32, seed=3, scale=1e4)
    value, grad_y = _expected(y, to_grid, from_grid, grad)
    out, out_grad = torch.empty_like(y), torch.empty_like(y)
    kernel.grid_forward(y, to_grid, from_grid, out)
    kernel.grid_backward(grad, y, to_grid, from_grid, out_grad)
    assert torch.isfinite(out).all() and torch.isfinite(out_grad).all()
    torch.testing.assert_close(out.double(), value, rtol=1e-5, atol=1e-5 * value.abs().max().item())
    torch.testing.assert_close(out_grad.double(), grad_y, rtol=1e-5, atol=1e-5 * grad_y.abs().max().item())


def test_kernel_results_do_not_depend_on_the_thread_count(kernel):
    y, to_grid, from_grid, grad = _inputs(301, 16, 72, 64, seed=4)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            out, out_grad = torch.empty_like(y), torch.empty_like(y)
            kernel.grid_forward(y, to_grid, from_grid, out)
            kernel.grid_backward(grad, y, to_grid, from_grid, out_grad)
            results.append((out, out_grad))
    finally:
        torch.set_num_threads(threads)
    for out, out_grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(out_grad, results[0][1])


def test_kernel_declines_what_it_does_not_compute(kernel):
    y, to_grid, from_grid, _ = _inputs(4, 7, 18, 16)
    out = torch.full_like(y, 7.0)
    for args in [(y[:, :, :8], to_grid, from_grid, out[:, :, :8].contiguous()),  # 8 channels
                 (y.double(), to_grid.double(), from_grid.double(), out.double()),  # float64
                 (y.transpose(0, 1).contiguous().transpose(0, 1), to_grid, from_grid, out)]:  # strided
        assert not kernel.grid_forward(*args)
    assert (out == 7.0).all()


def _edge_groups(groups: int, size: int, group_atom: torch.Tensor | None):
    from escn_train.models.fast.slots import EdgeGroups

    one_per_atom = group_atom is None
    return EdgeGroups(torch.empty(0), torch.arange(groups) if one_per_atom else group_atom, size, groups, one_per_atom)


@pytest.mark.parametrize("split", [False, True], ids=["one-group-per-atom", "split-groups"])
def test_grid_stage_with_rotation_back_equals_pytorch_operations(kernel, split, monkeypatch):
    """The whole operator (blocks, rotation back, per-atom sums, gradients for y and the
    rotation rows) with the kernel against the same operator on PyTorch's operations."""
    gen = torch.Generator().manual_seed(5)
    size, groups, coeffs, points, channels, slots = 4, 6, 10, 24, 32, 9
    group_atom = torch.tensor([0, 0, 1, 2, 2, 3]) if split else None
    num_atoms = 4 if split else groups
    y = torch.randn(groups * size, coeffs, channels, generator=gen, requires_grad=True)
    rows = torch.randn(groups, size * coeffs, slots, generator=gen, requires_grad=True)
    to_grid, from_grid = torch.randn(points, coeffs, generator=gen), torch.randn(coeffs, points, generator=gen)
    back = grid.RotationBack(rows, _edge_groups(groups, size, group_atom), num_atoms)
    grad_out = torch.randn(num_atoms, slots, channels, generator=gen)
    monkeypatch.setattr(grid, "_block_floats", lambda: 2 * size * points * channels)  # blocks of 2 groups

    def run():
        y.grad = rows.grad = None
        out = grid.grid_silu(y, to_grid, from_grid, back)
        (out * grad_out).sum().backward()
        return out.detach(), y.grad, rows.grad

    fused = run()
    monkeypatch.setattr(cpu_kernel, "applies", lambda *tensors: False)
    plain = run()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.fixture
def fresh_kernel_state(tmp_path, monkeypatch):
    """An empty kernel cache and no loaded kernel; restored afterwards."""
    monkeypatch.setenv("ESCN_TRAIN_CACHE", str(tmp_path))
    cpu_kernel.reset()
    yield tmp_path
    monkeypatch.undo()
    cpu_kernel.reset()


def test_kernel_is_built_once_into_the_cache(kernel, fresh_kernel_state):
    assert cpu_kernel.library() is not None
    built = list((fresh_kernel_state / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("grid_kernel-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    cpu_kernel.reset()
    assert cpu_kernel.library() is not None
    assert list((fresh_kernel_state / "kernels").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_kernel_is_built_in_the_temporary_directory_when_the_cache_cannot_be_created(kernel, fresh_kernel_state,
                                                                                     monkeypatch):
    blocker = fresh_kernel_state / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("ESCN_TRAIN_CACHE", str(blocker))
    monkeypatch.setattr(cpu_kernel.tempfile, "gettempdir", lambda: str(fresh_kernel_state / "tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernel.library() is not None
    built = list((fresh_kernel_state / "tmp" / f"escn_train-kernels-{os.getuid()}").iterdir())
    assert len(built) == 1 and built[0].name.startswith("grid_kernel-")


def test_failed_build_warns_once_and_runs_pytorch_operations(fresh_kernel_state, monkeypatch):
    if cpu_kernel.unsupported_reason() is not None:
        pytest.skip(cpu_kernel.unsupported_reason())
    monkeypatch.setenv("CC", "escn-no-such-compiler")
    y, to_grid, from_grid, _ = _inputs(6, 7, 18, 32)
    with pytest.warns(RuntimeWarning) as caught:
        out = grid.grid_silu(y, to_grid, from_grid)
        grid.grid_silu(y, to_grid, from_grid)
    messages = [str(w.message) for w in caught if "grid kernel" in str(w.message)]
    assert messages == [
        "escn_train: could not build the CPU grid kernel grid_kernel.c (no C compiler 'escn-no-such-compiler' on "
        "PATH (set CC)); the S2-grid stage runs PyTorch operations instead (about 2x slower); "
        "set ESCN_TRAIN_GRID_KERNEL=0 to skip the build"
    ]
    expected = torch.matmul(from_grid, torch.nn.functional.silu(torch.matmul(to_grid, y)))
    torch.testing.assert_close(out, expected)
    assert not (fresh_kernel_state / "kernels").exists() or not any((fresh_kernel_state / "kernels").iterdir())


def test_switch_turns_the_kernel_off_without_a_build(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("ESCN_TRAIN_GRID_KERNEL", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernel.library() is None
    assert cpu_kernel.unsupported_reason() == "ESCN_TRAIN_GRID_KERNEL=0"
    assert not os.path.exists(fresh_kernel_state / "kernels")


# ------------------------------------------------------------------ the C++ operator (native_grid)
@pytest.fixture(scope="module")
def native_op():
    from escn_train.models.fast import native_grid

    if cpu_kernel.unsupported_reason() is not None:
        pytest.skip(f"the C++ grid operator is not used here: {cpu_kernel.unsupported_reason()}")
    native_grid.load()
    return torch.ops.escn_native.grid_silu


@pytest.mark.parametrize("form", ["no rows", "one group per atom", "groups of atoms"])
def test_native_operator_equals_the_plain_expressions(native_op, form):
    """escn_native::grid_silu (standalone packages) against grid_silu_unblocked in float64,
    with blocks of a few edges so that the block loop and its group boundaries are crossed."""
    size, groups, rows_per_slot, out_rows = 5, 12, 10, 9
    y, to_grid, from_grid, _ = _inputs(size * groups, 10, 24, 32, seed=3)
    gen = torch.Generator().manual_seed(4)
    rows = None if form == "no rows" else torch.randn(groups, size * rows_per_slot, out_rows, generator=gen)
    group_atom = torch.tensor([0, 2, 2, 5, 1, 1, 0, 3, 4, 4, 2, 6]) if form == "groups of atoms" else None
    num_atoms = 7 if group_atom is not None else groups
    expected = grid.grid_silu_unblocked(
        y.double(), to_grid.double(), from_grid.double(), None if rows is None else rows.double(), group_atom,
        num_atoms, size,
    )
    floats_per_thread = 2 * size * 24 * 32  # two groups of edges per thread's share
    got = native_op(y, to_grid, from_grid, rows, group_atom, num_atoms, size, floats_per_thread, 1)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_native_operator_refuses_what_the_kernel_does_not_take(native_op):
    y, to_grid, from_grid, _ = _inputs(4, 10, 24, 8)
    with pytest.raises(RuntimeError, match=r"escn_native::grid_silu takes float32 CPU features \[edges, coefficients, "
                       r"channels\] with a multiple of 16 channels; got Float on cpu with shape \[4, 10, 8\]"):
        native_op(y, to_grid, from_grid, None, None, 0, 1, 2**18, 16)


def test_native_operator_cuts_the_blocks_the_python_operator_cuts(native_op):
    """The two implementations of the stage agree on the block size (grid.py's formula is
    repeated in grid_native.cpp), for every thread count up to past the cap."""
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3, 16, 17):
            torch.set_num_threads(count)
            for points, channels, size in ((18, 32, 50), (24, 64, 50), (128, 128, 50), (7, 16, 1), (4000, 512, 3)):
                y, to_grid = torch.empty(0, 1, channels), torch.empty(points, 1)
                expected = grid._block_edges(to_grid, y, size)
                assert torch.ops.escn_native.block_edges(
                    points, channels, size, torch.get_num_threads(), grid.GRID_BLOCK_FLOATS_PER_THREAD,
                    grid.GRID_BLOCK_MAX_THREADS,
                ) == expected
    finally:
        torch.set_num_threads(threads)
