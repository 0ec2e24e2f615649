"""Time the S2-grid operator with the fused CPU kernel against PyTorch's operations.

For each configuration the operator's inputs have the configuration's grid shapes (coefficients
x points, from a built model) and channel count, on ``--edges`` edge slots (the bench batch
fills 7,600). Forward (``escn_train::grid_silu``, no rotation back) and backward
(``grid_silu_backward``) run in the operator's cache-sized blocks. The two paths alternate
within one process, round after round; each round's figure is the median of ``--repeats`` calls.
Reported: the median and range over rounds of 1-thread-equivalent CPU time (``process_time``)
and of wall time, and the kernel/PyTorch ratio of the medians.

    python bench/bench_grid_kernel.py --configs tiny l3m1 l3m3 large --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import CONFIGS  # noqa: E402


def _median_call(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "l3m1"], choices=sorted(CONFIGS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--edges", type=int, default=7600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    from escn_train.models.escn import eSCN
    from escn_train.models.fast import cpu_kernel

    if cpu_kernel.library() is None:
        print(f"the CPU grid kernel is not used here: {cpu_kernel.unsupported_reason() or 'its build failed'}")
        return 1
    kernel_applies = cpu_kernel.applies
    print("config threads  K  P   C | path     forward CPU ms (range)     backward CPU ms (range)    wall fwd/bwd ms")
    for name in args.configs:
        block = eSCN(export=True, **CONFIGS[name]).layer_blocks[0].message_block
        to_grid, from_grid = block.grid_to, block.grid_from
        points, coeffs = to_grid.shape
        channels = CONFIGS[name]["sphere_channels"]
        gen = torch.Generator().manual_seed(0)
        y = torch.randn(args.edges, coeffs, channels, generator=gen)
        grad = torch.randn(args.edges, coeffs, channels, generator=gen)
        forward = lambda: torch.ops.escn_train.grid_silu(y, to_grid, from_grid, None, None, 0, 1)  # noqa: E731
        backward = lambda: torch.ops.escn_train.grid_silu_backward(  # noqa: E731
            grad, y, to_grid, from_grid, None, None, 1, False)
        for threads in args.threads:
            torch.set_num_threads(threads)
            results: dict[str, list[tuple[float, float, float, float]]] = {"kernel": [], "pytorch": []}
            for _ in range(args.rounds):
                for path in results:
                    cpu_kernel.applies = kernel_applies if path == "kernel" else (lambda *tensors: False)
                    forward(), backward()  # warm-up (buffers, caches)
                    fwd_wall, fwd_cpu = _median_call(forward, args.repeats)
                    bwd_wall, bwd_cpu = _median_call(backward, args.repeats)
                    results[path].append((fwd_cpu, bwd_cpu, fwd_wall, bwd_wall))
            cpu_kernel.applies = kernel_applies
            medians = {}
            for path, rounds in results.items():
                columns = list(zip(*rounds))
                medians[path] = [statistics.median(c) * 1e3 for c in columns]
                ranges = [(min(c) * 1e3, max(c) * 1e3) for c in columns]
                print(f"{name:6s} {threads:7d} {coeffs:2d} {points:2d} {channels:3d} | {path:8s} "
                      f"{medians[path][0]:7.2f} ({ranges[0][0]:.2f}-{ranges[0][1]:.2f})    "
                      f"{medians[path][1]:7.2f} ({ranges[1][0]:.2f}-{ranges[1][1]:.2f})    "
                      f"{medians[path][2]:.2f}/{medians[path][3]:.2f}")
            ratio = [k / p for k, p in zip(medians["kernel"], medians["pytorch"])]
            print(f"{'':27s}| kernel/pytorch: forward CPU {ratio[0]:.2f}, backward CPU {ratio[1]:.2f}, "
                  f"wall {ratio[2]:.2f}/{ratio[3]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
