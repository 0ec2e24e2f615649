"""Write the demo dataset: data/demo/{train,val,test}.lmdb (slab + adsorbate, EMT labels).

Deterministic: the same files on every run (all randomness is seeded by ``--seed`` and the
system id). The generator lives in :mod:`escn_train.data.demo` (so installed packages can
rebuild it via ``ensure_demo_dataset``); its docstring and ``data/README.md`` describe the
structures, the OC20 tags, the split by system id and the filtering rule: frames where any
atom's force exceeds 10 eV/Å are dropped.

Usage: ``python data/make_demo_dataset.py [--out data/demo] [--seed 0] [--force]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from escn_train.data.demo import DEMO_FILES, generate_demo_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    existing = [args.out / name for name in DEMO_FILES if (args.out / name).exists()]
    if existing and not args.force:
        print(f"refusing to overwrite {', '.join(map(str, existing))} (use --force)", file=sys.stderr)
        return 1
    for path in existing:
        path.unlink()
    generate_demo_dataset(args.out, seed=args.seed)
    for name in DEMO_FILES:
        print(f"{args.out / name}: {(args.out / name).stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
