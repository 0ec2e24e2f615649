"""Scaling of the periodic radius graph and of eSCN inference with the number of atoms.

Every (kind, size) runs in a fresh subprocess, so its peak RSS belongs to that size alone.
Structures: ``bulk`` = rattled fcc Cu supercell (cubic cells), ``slab`` = rattled Cu(111)
slab, 6 layers, 15 Å vacuum, periodic in all three directions as in OC20, ``skewed`` =
rattled supercell of the primitive fcc cell (60° between cell vectors). Sizes are
approximate (whole unit cells).

    python bench/bench_graph.py graph --sizes 100 316 1000 3162 10000 31623 100000 --kinds bulk slab skewed
    python bench/bench_graph.py graph --sizes 864 2048 --oracle      # the all-pairs builder it replaced
    python bench/bench_graph.py model --model escn_tiny --sizes 100 1000 10000 100000
    python bench/bench_graph.py model --model escn_l4_m2 --sizes 100 1000 10000 --repeats 1

``graph``: :func:`escn_train.graph.radius_graph_pbc` (cutoff 6 Å, max_neighbors 50 by default).
``model``: a no-grad ``forward_trainable`` of a randomly initialised eSCN with
``conf/model/<model>.yaml`` (its cutoff and max_neighbors), graph included. Reported per
size: median / min / max wall seconds over ``--repeats`` timed calls after one warm-up on
a small structure, the median process CPU time (``time.process_time``, all threads), peak RSS,
its increase over the RSS before the timed calls, and (model) GB per 100,000 edges; then
the log-log slope of time and memory against atoms (least squares over the sizes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_structure(kind: str, size: int, seed: int = 0):
    """An ASE Atoms of about ``size`` atoms (see the module docstring)."""
    from ase.build import bulk, fcc111

    if kind == "bulk":
        unit = bulk("Cu", "fcc", a=3.61, cubic=True)  # 4 atoms
        per = 4
    elif kind == "skewed":
        unit = bulk("Cu", "fcc", a=3.61)  # 1 atom, 60° cell
        per = 1
    elif kind == "slab":
        side = max(1, round(math.sqrt(size / 6)))
        atoms = fcc111("Cu", size=(side, side, 6), a=3.61, vacuum=7.5, periodic=True)
        atoms.rattle(0.05, seed=seed)
        return atoms
    else:
        raise ValueError(f"unknown structure kind {kind!r}")
    cells = max(1, size / per)
    a = max(1, round(cells ** (1 / 3)))
    b = max(1, round(math.sqrt(cells / a)))
    c = max(1, round(cells / (a * b)))
    atoms = unit.repeat((a, b, c))
    atoms.rattle(0.05, seed=seed)
    return atoms


def _tensors(atoms):
    import torch

    pos = torch.tensor(atoms.positions, dtype=torch.float32)
    cell = torch.tensor(atoms.cell.array, dtype=torch.float32).unsqueeze(0)
    natoms = torch.tensor([len(atoms)])
    pbc = torch.tensor(atoms.pbc).view(1, 3)
    return pos, cell, natoms, pbc


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    import resource
    import statistics
    import time

    import torch

    torch.set_num_threads(spec["threads"])
    if spec.get("oracle"):  # the all-pairs builder that radius_graph_pbc replaced (tests/graph_oracle.py)
        sys.path.insert(0, str(ROOT / "tests"))
        from graph_oracle import radius_graph_pbc_all_pairs as radius_graph_pbc
    else:
        from escn_train.graph import radius_graph_pbc

    atoms = make_structure(spec["kind"], spec["size"])
    small = make_structure(spec["kind"], 100, seed=1)
    if spec["mode"] == "graph":
        cutoff, max_neighbors = spec["cutoff"], spec["max_neighbors"]

        def run(a):
            pos, cell, natoms, pbc = _tensors(a)
            return radius_graph_pbc(pos, cell, natoms, cutoff, max_neighbors, pbc).edge_index.shape[1]
    else:
        import yaml

        from escn_train.data.collate import collate_structures
        from escn_train.data.convert import atoms_to_data
        from escn_train.models.escn import eSCN

        config = yaml.safe_load((ROOT / "conf" / "model" / f"{spec['model']}.yaml").read_text())
        if spec.get("num_layers"):
            config["num_layers"] = spec["num_layers"]
        torch.manual_seed(0)
        model = eSCN(**config).eval()
        cutoff, max_neighbors = model.cutoff, model.max_neighbors

        def run(a):
            batch = collate_structures([atoms_to_data(a, 0, 0, "bench", require_labels=False, require_cell=False)])
            with torch.no_grad():
                out = model(batch)
            return int(out["forces"].shape[0])

    run(small)  # warm-up
    before = _rss_gb()
    walls, cpus = [], []
    for _ in range(spec["repeats"]):
        t0, c0 = time.perf_counter(), time.process_time()
        run(atoms)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    pos, cell, natoms, pbc = _tensors(atoms)
    edges = radius_graph_pbc(pos, cell, natoms, cutoff, max_neighbors, pbc).edge_index.shape[1]
    return {
        **spec, "atoms": len(atoms), "edges": edges, "median_s": statistics.median(walls), "min_s": min(walls),
        "max_s": max(walls), "cpu_s": statistics.median(cpus), "peak_rss_gb": peak,
        "rss_increase_gb": max(0.0, peak - before), "rss_before_gb": before,
        "gb_per_100k_edges": max(0.0, peak - before) / edges * 1e5 if edges else float("nan"),
    }


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["graph", "model", "_child"])
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 316, 1000, 3162, 10000, 31623, 100000])
    parser.add_argument("--kinds", nargs="+", default=["bulk"], choices=["bulk", "slab", "skewed"])
    parser.add_argument("--model", default="escn_tiny", help="conf/model/<name>.yaml (model mode)")
    parser.add_argument("--num-layers", type=int, help="model mode: override the config's layer count (inference "
                        "frees each layer's edge tensors before the next, so peak memory is one layer's)")
    parser.add_argument("--cutoff", type=float, default=6.0, help="graph mode")
    parser.add_argument("--max-neighbors", type=int, default=50, help="graph mode")
    parser.add_argument("--oracle", action="store_true", help="graph mode: time the all-pairs test oracle instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.mode == "_child":
        print(json.dumps(child(json.loads(args.spec))))
        return

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(args.threads)}
    print(f"# {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    header = "| kind | atoms | edges | median s | min s | max s | CPU s | peak RSS GB | RSS increase GB |"
    if args.mode == "model":
        header += " GB / 100k edges |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    rows = []
    for kind in args.kinds:
        for size in args.sizes:
            spec = {"mode": args.mode, "kind": kind, "size": size, "repeats": args.repeats, "threads": args.threads,
                    "cutoff": args.cutoff, "max_neighbors": args.max_neighbors, "model": args.model,
                    "num_layers": args.num_layers, "oracle": args.oracle}
            done = subprocess.run([sys.executable, __file__, "_child", json.dumps(spec)], env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {kind} | ~{size} | failed: {done.stderr.strip().splitlines()[-1:]} |", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(r)
            line = (f"| {kind} | {r['atoms']:,} | {r['edges']:,} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                    f"{r['max_s']:.3f} | {r['cpu_s']:.3f} | {r['peak_rss_gb']:.2f} | {r['rss_increase_gb']:.2f} |")
            if args.mode == "model":
                line += f" {r['gb_per_100k_edges']:.2f} |"
            print(line, flush=True)
        mine = [r for r in rows if r["kind"] == kind and r["atoms"] >= 1000]
        if len(mine) >= 2:
            atoms = [r["atoms"] for r in mine]
            print(f"\n{kind}: log-log slope over >= 1,000 atoms: time {slope(atoms, [r['median_s'] for r in mine]):.2f}, "
                  f"CPU time {slope(atoms, [r['cpu_s'] for r in mine]):.2f}, "
                  f"RSS increase {slope(atoms, [max(r['rss_increase_gb'], 1e-3) for r in mine]):.2f}\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
