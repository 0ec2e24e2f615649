"""Set-up cost on large LMDBs (first and second run to the first training step) and loader throughput.

Three sub-commands, for the "Large datasets" section of bench/RESULTS.md:

``make``: a synthetic OC20-like LMDB, written with the project's :class:`LmdbWriter` and
no metadata (as a user's own files would be): 80-atom structures (a 64-atom slab of four
layers and 16 adsorbate atoms, 10.2 x 10.2 x 30 Å cell, labels), as a directory of
shards, plus a small validation file::

    python bench/bench_setup.py make --n 100000 --out /tmp/syn100k

``run``: times ``python train.py data=lmdb ... trainer=ddp trainer.accelerator=cpu
trainer.devices=2`` for a few steps, twice (the first run builds the metadata and the
statistics, the second finds them). A callback records, per rank, the wall time since the
command started, the CPU time, the peak resident memory and the private (anonymous)
resident memory, which leaves out the LMDB pages mapped from the page cache, at the end of
the datamodule set-up, after the normalisers were fitted and at the first training step::

    python bench/bench_setup.py run --data /tmp/syn100k [--fresh] [--extra data.check_samples=false]

``loader``: structures/s of the train DataLoader (batch 32, 0 and 2 workers, the graph
built in the loader or left to the model), and the ``escn_l4_m2`` training step
(forward + backward) on one such batch with each graph placement::

    python bench/bench_setup.py loader --data /tmp/syn100k --batches 40
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
NATOMS = 80
SLAB_Z = (29, 46, 47, 78, 79, 28)
ADSORBATE_Z = (1, 6, 7, 8)


# ----------------------------------------------------------------------------- make
def synthetic_structure(index: int):
    """One 80-atom slab + adsorbate structure (deterministic in ``index``), no two atoms closer than ~1.9 Å."""
    from torch_geometric.data import Data

    rng = np.random.default_rng(index)
    a = 2.55
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(-1, 2) * a
    layers = [np.column_stack([grid + (layer % 2) * a / 2, np.full(16, 8.0 + 2.2 * layer)]) for layer in range(4)]
    adsorbate = np.column_stack([grid + a / 4, np.full(16, 8.0 + 2.2 * 3 + 2.0)])
    pos = np.concatenate([*layers, adsorbate]) + rng.uniform(-0.15, 0.15, size=(NATOMS, 3))
    z = np.concatenate([rng.choice(SLAB_Z, 64), rng.choice(ADSORBATE_Z, 16)])
    fixed = np.r_[np.ones(32), np.zeros(48)].astype(np.int64)
    tags = np.r_[np.zeros(32), np.ones(32), np.full(16, 2)].astype(np.int64)
    return Data(
        pos=torch.tensor(pos, dtype=torch.float32),
        cell=torch.tensor(np.diag([4 * a, 4 * a, 30.0]), dtype=torch.float32).view(1, 3, 3),
        atomic_numbers=torch.tensor(z, dtype=torch.long),
        natoms=NATOMS,
        energy=float(rng.normal(-0.75, 2.9)),
        forces=torch.tensor(rng.normal(0, 0.3, size=(NATOMS, 3)), dtype=torch.float32),
        tags=torch.tensor(tags),
        fixed=torch.tensor(fixed),
        sid=index,
        fid=0,
    )


def _write_shard(job: tuple[str, int, int]) -> int:
    from escn_train.data.convert import LmdbWriter

    path, start, stop = job
    torch.set_num_threads(1)
    with LmdbWriter(path) as writer:
        for index in range(start, stop):
            writer.add(synthetic_structure(index))
    return stop - start


def make(n: int, out: Path, shards: int, val: int, workers: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bounds = [k * n // shards for k in range(shards + 1)]
    jobs = [(str(out / "train" / f"data.{k:04d}.lmdb"), bounds[k], bounds[k + 1]) for k in range(shards)]
    jobs.append((str(out / "val.lmdb"), n, n + val))
    (out / "train").mkdir(exist_ok=True)
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        written = sum(pool.imap_unordered(_write_shard, jobs))
    print(f"wrote {written} structures ({n} train in {shards} shards, {val} val) to {out} "
          f"in {time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------- run
class SetupTimer:
    """Lightning callback (built by Hydra in the timed runs): one JSON line per rank and event."""

    def __new__(cls, log: str):
        import lightning as L

        class _Timer(L.Callback):
            def __init__(self) -> None:
                self.path = log
                self.seen_step = False

            def _write(self, trainer, event: str) -> None:
                status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
                anon = int(status["RssAnon"].split()[0]) * 1024  # private memory (not the LMDB's mapped pages)
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                with open(self.path, "a") as handle:
                    handle.write(json.dumps({"rank": trainer.global_rank, "event": event, "time": time.time(),
                                             "max_rss": rss, "rss_anon": anon, "cpu_s": time.process_time()}) + "\n")

            def setup(self, trainer, pl_module, stage):  # after the datamodule's set-up (index)
                self._write(trainer, "datamodule_ready")

            def on_fit_start(self, trainer, pl_module):  # after the module's set-up (statistics)
                self._write(trainer, "normalisers_ready")

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if not self.seen_step:
                    self.seen_step = True
                    self._write(trainer, "first_step_done")

        return _Timer()


def timed_run(data: Path, run_dir: Path, extra: list[str], steps: int) -> dict:
    log = run_dir / "events.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    cmd = [
        sys.executable, "train.py", "data=lmdb", f"data.train.src={data / 'train'}", f"data.val.src={data / 'val.lmdb'}",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "test_after_fit=false", "logger=none",
        "data.num_workers=2", "callbacks.model_checkpoint=null", "callbacks.parity_plot=null", "threads=1",
        f"+callbacks.setup_timer._target_=bench_setup.SetupTimer", f"+callbacks.setup_timer.log={log}",
        f"hydra.run.dir={run_dir}", *extra,
    ]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'bench'}")
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    total = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    out = {"command_s": total}
    bars = [part.strip() for part in proc.stderr.replace("\r", "\n").splitlines()]
    for bar in bars:  # the last state of each progress bar of the set-up (elapsed, rate)
        if bar.startswith(("indexing", "dataset statistics")):
            out[bar.split(":")[0] + " bar"] = bar
    for event in events:
        key = f"rank{event['rank']}_{event['event']}"
        out[key + "_s"] = round(event["time"] - start, 2)
        out[key + "_max_rss_mib"] = round(event["max_rss"] / 2**20, 1)
        out[key + "_rss_anon_mib"] = round(event["rss_anon"] / 2**20, 2)
        out[key + "_cpu_s"] = round(event["cpu_s"], 2)
    return out


def run(data: Path, fresh: bool, extra: list[str], steps: int, work: Path) -> None:
    if fresh:
        for pattern in ("metadata*", "stats.json", "*.stats.json", "val.lmdb.metadata*"):
            for file in [*data.glob(pattern), *(data / "train").glob(pattern)]:
                file.unlink()
    results = {}
    for name in ("first", "second"):
        results[name] = timed_run(data, work / name, extra, steps)
        print(name, json.dumps(results[name], indent=1), flush=True)
    shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- loader
def loader_rates(data: Path, batches: int, cutoff: float, max_neighbors: int, repeats: int, model_steps: int) -> None:
    from escn_train.data import LmdbDataModule
    from escn_train.data.collate import collate_structures

    torch.set_num_threads(1)
    # checks off: with stored verdicts (escn-index --check) a read costs the same (one dict lookup)
    common = dict(train=data / "train", batch_size=32, progress=False, check_samples=False)
    print("| graph | num_workers | structures/s (median) | min | max |")
    print("| --- | --- | --- | --- | --- |")
    for graph in ("model", "loader"):
        for workers in (0, 2):
            graph_args = dict(graph_cutoff=cutoff, graph_max_neighbors=max_neighbors) if graph == "loader" else {}
            module = LmdbDataModule(num_workers=workers, persistent_workers=workers > 0, max_atoms_per_batch=32 * NATOMS,
                                    **graph_args, **common)
            module.setup("fit")
            loader = module.train_dataloader()
            rates = []
            for epoch in range(repeats + 1):
                loader.batch_sampler.sampler.set_epoch(epoch)
                iterator = iter(loader)
                next(iterator)  # worker start-up is not throughput
                start, count = time.perf_counter(), 0
                for _, batch in zip(range(batches), iterator):
                    count += batch.num_graphs
                if epoch:
                    rates.append(count / (time.perf_counter() - start))
                del iterator
            print(f"| {graph} | {workers} | {statistics.median(rates):.0f} | {min(rates):.0f} | "
                  f"{max(rates):.0f} |", flush=True)
    # the model's training step on one batch, graph from the loader or built in the model
    from omegaconf import OmegaConf

    from escn_train.data import LmdbDataset
    from escn_train.data.graph_selection import GraphSelection
    from escn_train.models.escn import eSCN

    config = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "escn_l4_m2.yaml"))
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = eSCN(**config)
    for graph in ("model", "loader"):
        transform = GraphSelection(False, cutoff, max_neighbors) if graph == "loader" else None
        batch = collate_structures(LmdbDataset(data / "train", transform=transform).get_many(range(32)))
        times = []
        for step in range(model_steps + 1):
            start = time.perf_counter()
            out = model.forward_trainable(batch)
            (out["energy"].abs().mean() + out["forces"].norm(dim=-1).mean()).backward()
            model.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - start)
        print(f"escn_l4_m2 training step, graph in {graph}, {torch.get_num_threads()} threads: "
              f"{statistics.median(times):.2f} s per batch of 32 ({32 / statistics.median(times):.1f} structures/s; "
              f"times {[round(t, 2) for t in times]})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--val", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("run")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--fresh", action="store_true", help="delete metadata and statistics first")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/escn_bench_setup_runs"))
    p.add_argument("--extra", nargs="*", default=[], help="more train.py overrides")
    p = sub.add_parser("loader")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cutoff", type=float, default=12.0)
    p.add_argument("--max-neighbors", type=int, default=20)
    p.add_argument("--model-steps", type=int, default=2, help="timed escn_l4_m2 steps (after one warm-up)")
    args = parser.parse_args()
    if args.command == "make":
        make(args.n, args.out, args.shards, args.val, args.workers)
    elif args.command == "run":
        run(args.data, args.fresh, args.extra, args.steps, args.work)
    else:
        loader_rates(args.data, args.batches, args.cutoff, args.max_neighbors, args.repeats, args.model_steps)


if __name__ == "__main__":
    main()
