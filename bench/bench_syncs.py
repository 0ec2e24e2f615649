"""Host syncs per training step (Lightning ``fit`` on the demo data), in and outside the model.

Counted with :class:`escn_train.testing.SyncCounter` by
:func:`escn_train.testing.training_syncs.training_step_syncs`: two fits of ``L`` and ``2L``
steps (``log_every_n_steps = L``), difference divided by ``L``; data loading is left out.
The module is configured as ``train.py`` trains it (EMA, cosine schedule with warm-up,
AdamW, train metrics), with the non-finite guard, the throughput monitor and the progress
bar (redrawn every ``L`` steps).

    python bench/bench_syncs.py --log-every 4 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_layers=1, lmax=1, mmax=1, sphere_channels=8, hidden_channels=8, edge_channels=8,
            num_sphere_samples=8, max_neighbors=12, distance_resolution=0.1, cutoff=6.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-every", nargs="+", type=int, default=[4, 8], help="log_every_n_steps values")
    parser.add_argument("--data", default=str(ROOT / "data" / "demo" / "train.lmdb"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    import torch

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from escn_train.data import LmdbDataModule
    from escn_train.testing.training_syncs import training_step_syncs
    from escn_train.training.module import PotentialModule
    from escn_train.training.progress import LossProgressBar
    from escn_train.training.reliability import NonFiniteGuard
    from escn_train.training.throughput import ThroughputMonitor

    def module() -> PotentialModule:
        torch.manual_seed(0)
        return PotentialModule(model=TINY, ema={"decay": 0.99}, scheduler={"name": "cosine", "warmup_steps": 2},
                               normalizer={"energy_mean": 0.0, "energy_std": 1.0, "force_std": 1.0,
                                           "element_references": False})

    def data() -> LmdbDataModule:
        return LmdbDataModule(train={"src": args.data, "subset": 64}, batch_size=4, progress=False,
                              stats_cache_dir=tempfile.gettempdir())

    for every in args.log_every:
        def callbacks() -> list:
            return [NonFiniteGuard(5), ThroughputMonitor(), LossProgressBar(refresh_rate=every)]

        result = training_step_syncs(module, data, callbacks, every)
        print(f"log_every_n_steps={every}: {result}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
