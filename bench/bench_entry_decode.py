"""CPU time to unpickle one LMDB entry with safe_pickle, this tree against a git revision.

Loads ``escn_train/data/safe_pickle.py`` as it was at ``--baseline`` (``git show``) next to
the working tree's, and times ``safe_loads`` over every entry of the reference LMDBs in
interleaved rounds (1-thread CPU time, ``time.process_time``); prints min / median / max in
microseconds per entry and the same-run ratio of the medians. Also times the read path's
``read_entry`` wrapper against a bare ``txn.get``.

    python bench/bench_entry_decode.py --baseline 478af31 --rounds 12
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "reference" / "lmdb"


def module_at(revision: str, relative: str, name: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{relative}"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entries(path: Path) -> list[bytes]:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        raws = [value for key, value in txn.cursor() if key != b"length"]
    env.close()
    return raws


def per_entry_us(function, raws: list[bytes]) -> float:
    started = time.process_time()
    for raw in raws:
        function(raw, "bench")
    return (time.process_time() - started) / len(raws) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with (default HEAD)")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from escn_train.data import safe_pickle as current
    from escn_train.data.fatal_read import read_entry

    baseline = module_at(args.baseline, "escn_train/data/safe_pickle.py", "safe_pickle_baseline")
    for sample in sorted(SAMPLES.glob("*.lmdb")):
        raws = entries(sample)
        times = {"baseline": [], "current": []}
        for module in (baseline, current):  # warm-up
            per_entry_us(module.safe_loads, raws)
        for _ in range(args.rounds):
            times["baseline"].append(per_entry_us(baseline.safe_loads, raws))
            times["current"].append(per_entry_us(current.safe_loads, raws))
        print(f"{sample.name} ({len(raws)} entries, {sum(map(len, raws)) // len(raws)} B each)")
        for label, values in times.items():
            print(f"  {label:8s} min {min(values):7.1f}  median {statistics.median(values):7.1f}  "
                  f"max {max(values):7.1f} us/entry")
        ratio = statistics.median(times["current"]) / statistics.median(times["baseline"])
        print(f"  current / baseline (medians): {ratio:.2f}")
    env = lmdb.open(str(ROOT / "data" / "demo" / "train.lmdb"), subdir=False, readonly=True, lock=False)
    keys = [str(i).encode() for i in range(500)]
    plain, wrapped = [], []
    with env.begin() as txn:
        for _ in range(args.rounds):
            started = time.process_time()
            for key in keys:
                txn.get(key)
            plain.append((time.process_time() - started) / len(keys) * 1e6)
            started = time.process_time()
            for key in keys:
                read_entry(txn, "data/demo/train.lmdb", key)
            wrapped.append((time.process_time() - started) / len(keys) * 1e6)
    print(f"txn.get: median {statistics.median(plain):.2f} us; read_entry: median {statistics.median(wrapped):.2f} us "
          f"(+{statistics.median(wrapped) - statistics.median(plain):.2f} us per read)")


if __name__ == "__main__":
    main()
