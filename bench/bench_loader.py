"""Data loader throughput on the demo dataset (samples/s), for bench/RESULTS.md.

Measures full passes over ``data/demo/train.lmdb`` through :class:`LmdbDataModule`'s
train DataLoader (batch size 16, shuffled) for num_workers 0 and 2, in three graph modes:

* ``none``: no graph in the loader (the model builds it on the fly);
* ``precomputed``: edges stored in the LMDB (a copy of the demo split written with the
  converter's writer and a radius graph, cutoff/max-neighbours as below);
* ``workers``: the graph built per sample in the loader (``graph_cutoff``).

Each configuration runs one warm-up epoch (persistent workers), then ``--repeats`` timed
epochs; the median is reported.

Usage: ``python bench/bench_loader.py [--repeats 5] [--cutoff 6] [--max-neighbors 20]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from escn_train.data import LmdbDataModule, LmdbDataset, ensure_demo_dataset
from escn_train.data.convert import write_lmdb_shards
from escn_train.data.graph_selection import build_graph

ROOT = Path(__file__).resolve().parents[1]


def with_precomputed_edges(source: Path, target: Path, cutoff: float, max_neighbors: int) -> Path:
    """A copy of ``source`` whose entries carry a precomputed radius graph."""
    dataset = LmdbDataset(source)
    entries = [build_graph(d, cutoff, max_neighbors) for d in dataset.get_many(range(len(dataset)))]
    write_lmdb_shards(entries, len(entries), target, progress=False)
    return target


def epoch_rate(module: LmdbDataModule, repeats: int) -> list[float]:
    loader = module.train_dataloader()
    rates = []
    for epoch in range(repeats + 1):
        loader.batch_sampler.sampler.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(int(batch.natoms.numel()) for batch in loader)
        elapsed = time.perf_counter() - start
        if epoch:  # epoch 0 warms up workers and the page cache
            rates.append(count / elapsed)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cutoff", type=float, default=6.0)
    parser.add_argument("--max-neighbors", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    demo = ensure_demo_dataset(ROOT / "data" / "demo")
    with tempfile.TemporaryDirectory() as tmp:
        edges = with_precomputed_edges(demo / "train.lmdb", Path(tmp) / "train_edges.lmdb", args.cutoff, args.max_neighbors)
        modes = {
            "none": dict(train=demo / "train.lmdb"),
            "precomputed": dict(train=edges, use_precomputed_edges=True),
            "workers": dict(train=demo / "train.lmdb", graph_cutoff=args.cutoff, graph_max_neighbors=args.max_neighbors),
        }
        print(f"| graph in loader | num_workers | samples/s (median of {args.repeats}) | min | max |")
        print("| --- | --- | --- | --- | --- |")
        for name, kwargs in modes.items():
            for workers in (0, 2):
                module = LmdbDataModule(
                    batch_size=args.batch_size, num_workers=workers, persistent_workers=workers > 0,
                    progress=False, **kwargs,
                )
                rates = epoch_rate(module, args.repeats)
                print(f"| {name} | {workers} | {statistics.median(rates):.0f} | {min(rates):.0f} | {max(rates):.0f} |", flush=True)


if __name__ == "__main__":
    main()
