"""Time eSCN training steps and inference on the bench batch, side by side with the reference.

Each measurement runs in a fresh subprocess, so peak memory belongs to one configuration:
ours in this interpreter's environment, the reference (fairchem-core 1.10 ``escn_export``)
by the interpreter of its own virtualenv (``../shared/tools/fairchem-reference/setup.sh``)
running this same file, so both are timed by identical code. Only that child process
imports the reference; the package never does.

A training step is forward + loss (mean |E| + mean |F|) + backward + AdamW step, as in the
reference's bench; inference is a no-grad forward. Reported: median seconds over the timed
runs (after one warm-up), FLOPs (torch FlopCounterMode), the FLOP rate as a fraction of a
2048^3 float32 matmul timed in the same process, peak RSS (CPU) or peak allocated memory
(GPU), and our/reference ratios of wall time and of CPU time (``--rounds``: alternated, median
and range of the per-round ratios). ``--precision fp32 bf16-mixed`` times ours in both, each
against the reference's fp32 step (the reference's own code fails under bf16 autocast).

    python bench/bench_model.py --configs tiny large --steps 5 --reference-python /tmp/fairchem-ref/bin/python
    python bench/bench_model.py --configs tiny l3m1 --modes train --rounds 5 --reference-python /tmp/fairchem-ref/bin/python
    python bench/bench_model.py --device cuda --precision fp32 bf16-mixed --reference-python /tmp/fairchem-ref/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BATCH = ROOT.parent / "shared" / "reference" / "bench" / "cu111_co_x4.pt"
COMMON = {"cutoff": 6.0, "max_neighbors": 50, "max_num_elements": 90}
CONFIGS = {
    "large": {"lmax": 4, "mmax": 2, "num_layers": 4, "sphere_channels": 128, "hidden_channels": 256,
              "edge_channels": 128, "num_sphere_samples": 128, **COMMON},
    "tiny": {"lmax": 2, "mmax": 1, "num_layers": 2, "sphere_channels": 32, "hidden_channels": 64,
             "edge_channels": 32, "num_sphere_samples": 64, **COMMON},
    # Not in the bench README: the published OC20 degree (lmax 6), and mmax = lmax.
    "l6m2": {"lmax": 6, "mmax": 2, "num_layers": 2, "sphere_channels": 128, "hidden_channels": 256,
             "edge_channels": 128, "num_sphere_samples": 128, **COMMON},
    "l3m1": {"lmax": 3, "mmax": 1, "num_layers": 3, "sphere_channels": 64, "hidden_channels": 128,
             "edge_channels": 64, "num_sphere_samples": 64, **COMMON},
    "l3m3": {"lmax": 3, "mmax": 3, "num_layers": 3, "sphere_channels": 64, "hidden_channels": 128,
             "edge_channels": 64, "num_sphere_samples": 64, **COMMON},
}
FORWARD_KEYS = ["pos", "batch_idx", "natoms", "atomic_numbers", "edge_index", "edge_distance", "edge_distance_vec"]


# --------------------------------------------------------------------------------------
# Child: one measurement of our model
# --------------------------------------------------------------------------------------


def measure(
    impl: str, batch_path: str, config: dict, mode: str, steps: int, threads: int, device: str, precision: str
) -> dict:
    """Time ``mode`` ('train' or 'infer') of ``impl`` ('ours' or 'reference'); run in a fresh process."""
    import resource
    import time

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if impl == "reference":
        from fairchem.core.models.escn.escn_exportable import eSCN
    else:
        from escn_train.models.escn import eSCN

    torch.set_num_threads(threads)
    dev = torch.device(device)
    batch = torch.load(batch_path, weights_only=True)
    args = [batch[k].to(dev) for k in FORWARD_KEYS]
    torch.manual_seed(0)
    model = eSCN(export=True, **config).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        with autocast:
            energy, forces = model(*args)
        loss = energy.float().abs().mean() + forces.float().norm(dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.no_grad(), autocast:
            model(*args)

    run = train_step if mode == "train" else infer
    with FlopCounterMode(display=False) as counter:
        run()
    flops = counter.get_total_flops()

    a = torch.randn(2048, 2048, device=dev)
    b = torch.randn(2048, 2048, device=dev)
    a @ b
    sync()
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    sync()
    matmul_rate = 5 * 2 * 2048**3 / (time.perf_counter() - t)
    del a, b

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run()  # warm-up
    times, cpu_times = [], []
    for _ in range(steps):
        sync()
        t, cpu = time.perf_counter(), time.process_time()
        run()
        sync()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - cpu)
    median = sorted(times)[len(times) // 2]
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"impl": impl, "mode": mode, "median_s": median, "times_s": times,
            "median_cpu_s": sorted(cpu_times)[len(cpu_times) // 2], "gflop": flops / 1e9,
            "matmul_gflops": matmul_rate / 1e9, "flop_rate_fraction_of_matmul": flops / median / matmul_rate,
            "peak_mb": peak, "peak_kind": "cuda_max_allocated" if dev.type == "cuda" else "rss"}


# --------------------------------------------------------------------------------------
# Parent: run children, compare, report
# --------------------------------------------------------------------------------------


def _child(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({' '.join(cmd[:3])} ...):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine(device: str) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}"
    if device.startswith("cuda"):
        import torch

        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "large"], choices=sorted(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--steps", type=int, default=5, help="timed runs after one warm-up (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16-mixed"],
                        help="one or both; every row is compared with the reference's fp32 step")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate ours and the reference this many times; report the median ratio (default 1)")
    parser.add_argument("--batch", default=str(DEFAULT_BATCH))
    parser.add_argument("--reference-python", default=None,
                        help="python of the fairchem reference venv (setup.sh); omit to skip the reference")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(**spec)))
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    results = []
    for name in args.configs:
        config = CONFIGS[name]
        for mode in args.modes:
            reference_fp32 = None
            for precision in args.precision:
                spec = {"impl": "ours", "batch_path": args.batch, "config": config, "mode": mode, "steps": args.steps,
                        "threads": args.threads, "device": args.device, "precision": precision}
                row = {"config": name, "mode": mode, "precision": precision, "rounds": []}
                # Rounds alternate ours and the reference in fresh processes, so that the
                # machine's drift falls on both; the ratios are per round.
                for _ in range(args.rounds):
                    ours = _child([sys.executable, __file__, "--child", json.dumps(spec)], env)
                    entry = {"ours": ours}
                    if args.reference_python:
                        # The reference runs in fp32 only: under bf16 autocast its own code fails
                        # (index_add_ of a bf16 source into a float32 tensor).
                        if reference_fp32 is None or args.rounds > 1:
                            ref_spec = json.dumps({**spec, "impl": "reference", "precision": "fp32"})
                            reference_fp32 = _child([args.reference_python, __file__, "--child", ref_spec], env)
                        entry["reference"] = reference_fp32
                        entry["speedup"] = reference_fp32["median_s"] / ours["median_s"]
                        entry["cpu_speedup"] = reference_fp32["median_cpu_s"] / ours["median_cpu_s"]
                    row["rounds"].append(entry)
                middle = sorted(row["rounds"], key=lambda e: e.get("speedup", e["ours"]["median_s"]))[args.rounds // 2]
                row.update(ours=middle["ours"])
                if args.reference_python:
                    speedups = sorted(e["speedup"] for e in row["rounds"])
                    row.update(reference=middle["reference"], speedup=middle["speedup"], speedup_range=[speedups[0], speedups[-1]],
                               cpu_speedup=sorted(e["cpu_speedup"] for e in row["rounds"])[args.rounds // 2],
                               memory_ratio=middle["ours"]["peak_mb"] / middle["reference"]["peak_mb"])
                results.append(row)
                print(_format_row(row), flush=True)

    report = {"date": datetime.date.today().isoformat(), "machine": _machine(args.device),
              "command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix()] + (argv or sys.argv[1:])),
              "threads": args.threads, "device": args.device, "precision": args.precision, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _format_row(row: dict) -> str:
    ours = row["ours"]
    text = (f"{row['config']:5s} {row['mode']:5s} {row['precision']:10s} ours {ours['median_s']:.3f} s, {ours['gflop']:.1f} GFLOP, "
            f"{ours['flop_rate_fraction_of_matmul']:.2f} of matmul rate, peak {ours['peak_mb']:.0f} MB")
    if "reference" in row:
        ref = row["reference"]
        text += (f" | reference (fp32) {ref['median_s']:.3f} s, {ref['gflop']:.1f} GFLOP, peak {ref['peak_mb']:.0f} MB"
                 f" | speedup {row['speedup']:.2f}x")
        if len(row["rounds"]) > 1:
            text += f" (median of {len(row['rounds'])} rounds, {row['speedup_range'][0]:.2f}-{row['speedup_range'][-1]:.2f}x)"
        text += f", CPU time {row['cpu_speedup']:.2f}x, memory {row['memory_ratio']:.2f}x"
    return text


if __name__ == "__main__":
    sys.exit(main())
