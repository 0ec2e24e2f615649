"""Batched relaxation with TorchSim vs ASE one structure at a time, same eSCN model, for bench/RESULTS.md.

``--structures`` (default 64) slab + adsorbate start structures from the demo dataset's
generator (:func:`escn_train.data.demo.build_system`: 3-layer fcc(111)/(100) Cu, Ag, Au, Ni,
Pd, Pt or Al slabs with H, O, C, N, CO or OH, 13-20 atoms) are relaxed to ``--fmax`` with FIRE:

* **ASE**: ``ase.optimize.FIRE`` on each structure in turn, forces from ``ESCNCalculator``;
* **TorchSim**: ``ts.optimize`` with TorchSim's batched FIRE (``md_flavor="ase_fire"``, ASE's
  update rule) and an ``InFlightAutoBatcher`` (``--batch-atoms`` atoms per batch; converged
  systems are swapped out every ``--swap-every`` steps).

Both see the same model, the same structures and the same convergence rule (max |F| over
all atoms < fmax; TorchSim 0.3 has no constraints, so the ASE runs drop the FixAtoms of the
bottom layer too) and stop at ``--max-steps``. The two methods are timed alternately in
the same process after a warm-up; throughput = structures / wall time.

Model: ``--checkpoint`` (any file load_predictor opens), or by default the escn_tiny
architecture fitted for ``--fit-steps`` Adam steps to the EMT labels of ``data/demo/train.lmdb``
(512 structures; a minute or two on an idle machine), so that relaxations behave like those
of a trained model (``--save-model`` keeps it for later runs).

Usage: ``python bench/bench_torchsim.py [--structures 64] [--repeats 2] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    max_neighbors=20, cutoff=6.0, max_num_elements=100, num_layers=2, lmax=2, mmax=1, sphere_channels=16,
    hidden_channels=32, edge_channels=16, num_sphere_samples=32, distance_function="gaussian",
    basis_width_scalar=2.0, distance_resolution=0.02,
)


def fit_demo_model(path: Path, steps: int, seed: int = 0) -> Path:
    """escn_tiny fitted to the demo EMT labels (forces L2-MAE + 0.1 · energy MSE, normalised)."""
    from escn_train.data import LmdbDataset, ensure_demo_dataset
    from escn_train.data.collate import collate_structures
    from escn_train.inference.reference_checkpoint import potential_checkpoint
    from escn_train.models.escn import eSCN
    from escn_train.models.potential import ESCNPotential

    ensure_demo_dataset(ROOT / "data" / "demo")
    dataset = LmdbDataset(ROOT / "data" / "demo" / "train.lmdb")
    rng = np.random.default_rng(seed)
    samples = dataset.get_many(sorted(rng.choice(len(dataset), min(512, len(dataset)), replace=False).tolist()))
    energies = torch.tensor([float(d.energy) for d in samples])
    per_atom = energies / torch.tensor([len(d.pos) for d in samples])
    forces = torch.cat([d.forces for d in samples])
    torch.manual_seed(seed)
    potential = ESCNPotential(eSCN(**TINY), 0.0, float(energies.std()), float(forces.pow(2).mean().sqrt()))
    # per-atom reference energy of each element: the mean energy per atom (a crude start)
    potential.element_references.fill_(float(per_atom.mean()))
    optimizer = torch.optim.Adam(potential.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = collate_structures([samples[i] for i in rng.choice(len(samples), 16, replace=False)])
        out = potential.model.forward_trainable(batch)
        energy, target = potential.normalize_targets(batch.energy, batch.forces, batch.atomic_numbers, batch.batch)
        loss = (out["forces"] - target).norm(dim=-1).mean() + 0.1 * (out["energy"] - energy).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(potential_checkpoint(potential.eval(), TINY), path)
    return path


def start_structures(count: int):
    from escn_train.data.demo import build_system

    structures = []
    for sid in range(count):
        atoms, rng = build_system(sid, seed=7)
        atoms.set_constraint()  # TorchSim 0.3 has no constraints: every atom relaxes in both runs
        atoms.calc = None
        atoms.rattle(0.05, seed=sid)
        structures.append(atoms)
    return structures


def relax_ase(structures, predictor, fmax: float, max_steps: int) -> dict:
    from ase.optimize import FIRE

    from escn_train.ase import ESCNCalculator

    calculator = ESCNCalculator(predictor)
    steps, converged = [], 0
    started = time.perf_counter()
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calculator
        optimizer = FIRE(atoms, logfile=None)
        converged += bool(optimizer.run(fmax=fmax, steps=max_steps))
        steps.append(optimizer.nsteps)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "converged": converged, "steps": int(sum(steps))}


def relax_torchsim(structures, model, fmax: float, max_steps: int, batch_atoms: int, swap_every: int) -> dict:
    import torch_sim as ts

    started = time.perf_counter()
    state = ts.io.atoms_to_state(structures, model.device, model.dtype)
    batcher = ts.InFlightAutoBatcher(model, max_memory_scaler=batch_atoms, memory_scales_with="n_atoms")
    relaxed = ts.optimize(
        state, model, optimizer=ts.optimizers.fire, autobatcher=batcher, max_steps=max_steps,
        steps_between_swaps=swap_every,
        convergence_fn=ts.generate_force_convergence_fn(fmax, include_cell_forces=False),
    )
    wall = time.perf_counter() - started
    final = model(relaxed)
    per_system = torch.zeros(relaxed.n_systems).index_reduce_(
        0, relaxed.system_idx, final["forces"].norm(dim=-1).float(), "amax", include_self=False)
    return {"wall_s": wall, "converged": int((per_system < fmax).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=64)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--save-model", default=None, help="keep the fitted checkpoint here (reuse with --checkpoint)")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-atoms", type=int, default=2048, help="InFlightAutoBatcher max_memory_scaler (atoms)")
    parser.add_argument("--swap-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from escn_train.inference.loading import load_predictor
    from escn_train.integrations.torchsim import ESCNTorchSimModel

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            fit_started = time.perf_counter()
            checkpoint = fit_demo_model(Path(args.save_model or Path(tmp) / "demo_fit.ckpt"), args.fit_steps)
            print(f"fitted escn_tiny to the demo EMT labels ({args.fit_steps} steps, "
                  f"{time.perf_counter() - fit_started:.0f} s)")
        predictor = load_predictor(checkpoint, "cpu")
    model = ESCNTorchSimModel(predictor, device="cpu", dtype=torch.float64)
    structures = start_structures(args.structures)
    print(f"{len(structures)} structures, {sum(len(a) for a in structures)} atoms; fmax {args.fmax} eV/Å, "
          f"max {args.max_steps} steps; {args.threads} threads")

    relax_ase(structures[:2], predictor, args.fmax, 5)  # warm-up (buffers, first-call costs)
    relax_torchsim(structures[:4], model, args.fmax, 5, args.batch_atoms, args.swap_every)
    runs: dict[str, list[dict]] = {"ase": [], "torchsim": []}
    for repeat in range(args.repeats):
        for name in (("ase", "torchsim") if repeat % 2 == 0 else ("torchsim", "ase")):
            cpu = time.process_time()
            if name == "ase":
                result = relax_ase(structures, predictor, args.fmax, args.max_steps)
            else:
                result = relax_torchsim(structures, model, args.fmax, args.max_steps, args.batch_atoms, args.swap_every)
            result["cpu_s"] = time.process_time() - cpu
            result["structures_per_s"] = len(structures) / result["wall_s"]
            runs[name].append(result)
            print(f"{name:9s} repeat {repeat}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
                  f"{result['structures_per_s']:.2f} structures/s, {result['converged']}/{len(structures)} converged"
                  + (f", {result['steps']} FIRE steps in all" if "steps" in result else ""))
    ratios = [t["structures_per_s"] / a["structures_per_s"] for a, t in zip(runs["ase"], runs["torchsim"])]
    summary = {
        name: {stat: fn([r["structures_per_s"] for r in results]) for stat, fn in
               (("min", min), ("median", statistics.median), ("max", max))}
        for name, results in runs.items()
    }
    print(json.dumps({"structures_per_s": summary, "same_run_ratios": [round(r, 2) for r in ratios]}, indent=1))
    print(f"TorchSim / ASE throughput, per repeat: {', '.join(f'{r:.2f}x' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f}x)")
    if args.json:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        Path(args.json).write_text(json.dumps({"runs": runs, "ratios": ratios, "summary": summary, "commit": commit,
                                               "machine": platform.platform(), "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
