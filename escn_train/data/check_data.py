"""escn-check-data: read every entry of every LMDB shard, in child processes, and name the bad ones.

A corrupt shard can kill the process that reads it (SIGBUS or SIGSEGV inside LMDB: no
Python exception, no message). Here each shard is read by a child process that says, in
shared memory, which key it is reading; when a child dies the parent names that shard and
key, and a new child carries on with the next key, so one run lists every bad entry::

    escn-check-data data/oc20/s2ef/train data/oc20/s2ef/val_id --key-mapping y=energy,force=forces

Each entry is decoded as training decodes it (allow-list unpickling, field checks, and the
per-structure sample checks unless ``--no-sample-checks``). Prints one line per bad entry
(``<shard>, key b'17': <what is wrong>``) and a summary; exits 1 when anything is bad, 2 on
usage errors, 0 otherwise. Shards are checked in parallel (``--jobs``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

#: Give up on a shard after this many crashed children (a shard of random bytes).
MAX_CRASHES_PER_SHARD = 50
_KEY_BYTES = 64


@dataclass
class ShardReport:
    """What checking one shard found."""

    path: Path
    entries: int = 0
    checked: int = 0
    bad: list[str] = field(default_factory=list)  # one line each, naming the shard and key


def _signal_name(exitcode: int) -> str:
    try:
        number = -exitcode
        return f"{signal.Signals(number).name} ({signal.strsignal(number)})"
    except (ValueError, TypeError):
        return f"exit code {exitcode}"


def _check_worker(path: str, start: int, options: dict[str, Any], index: Any, key: Any, conn: Any) -> None:
    """Child: read entries ``start..`` of one shard, reporting errors and progress on ``conn``."""
    from escn_train.data.checks import SampleChecker
    from escn_train.data.fatal_read import disable_crash_report
    from escn_train.data.lmdb_dataset import LmdbDataset

    disable_crash_report()  # the parent reports crashes itself, by key
    index.value = -1
    checker = None
    if options["check_samples"]:
        checker = SampleChecker(
            require_labels=options["require_labels"],
            max_num_elements=options["max_num_elements"],
            min_distance=options["min_distance"],
            neighbor_cutoff=options["cutoff"],
        )
    try:
        dataset = LmdbDataset(path, key_mapping=options["key_mapping"], checker=checker)
    except Exception as err:  # noqa: BLE001 - every failure to open is a finding
        conn.send(("fatal", f"{path}: {err}" if path not in str(err) else str(err)))
        return
    total = dataset.total_entries
    conn.send(("count", total))
    for i in range(start, total):
        _, entry_key = dataset._locate(i)
        key.value = entry_key[:_KEY_BYTES]
        index.value = i
        try:
            dataset[i]
        except Exception as err:  # noqa: BLE001 - every kind of bad entry is reported
            conn.send(("bad", str(err).replace("\n", " ")))
        if (i + 1 - start) % 64 == 0:
            conn.send(("progress", 64))
    conn.send(("progress", (total - start) % 64))
    conn.send(("done", total))


class Checker:
    """Runs the children (at most ``jobs`` at a time) and collects :class:`ShardReport` s."""

    def __init__(self, options: dict[str, Any], jobs: int, progress: bool) -> None:
        self.options = options
        self.jobs = max(1, jobs)
        self.context = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if self.context.get_start_method() == "forkserver":
            self.context.set_forkserver_preload(["escn_train.data.lmdb_dataset"])
        self.bar = tqdm(total=0, unit="entry", desc="checking", disable=not progress, file=sys.stderr)
        self.lock = threading.Lock()

    def _advance(self, total: int = 0, done: int = 0) -> None:
        with self.lock:
            if total:
                self.bar.total += total
                self.bar.refresh()
            if done:
                self.bar.update(done)

    def check_shard(self, path: Path) -> ShardReport:
        report = ShardReport(path)
        start, crashes, counted = 0, 0, False
        while True:
            index = self.context.Value("q", -1, lock=False)
            key = self.context.Array("c", _KEY_BYTES, lock=False)
            receiver, sender = self.context.Pipe(duplex=False)
            child = self.context.Process(
                target=_check_worker, args=(str(path), start, self.options, index, key, sender), daemon=True
            )
            child.start()
            sender.close()
            finished, progressed = False, 0
            while True:
                try:
                    kind, value = receiver.recv()
                except (EOFError, OSError):
                    break
                if kind == "count":
                    report.entries = value
                    if not counted:
                        self._advance(total=value)
                        counted = True
                elif kind == "bad":
                    report.bad.append(value)
                elif kind == "progress":
                    progressed += value
                    report.checked += value
                    self._advance(done=value)
                elif kind == "fatal":
                    report.bad.append(value)
                    finished = True
                elif kind == "done":
                    finished = True
            receiver.close()
            child.join()
            if finished and child.exitcode == 0:
                return report
            how = _signal_name(child.exitcode)
            at = index.value
            if at < 0:
                report.bad.append(
                    f"{path}: opening the shard (reading its index) killed the checking process with {how}: "
                    "the file is corrupt; copy or re-create it"
                )
                return report
            report.bad.append(
                f"{path}, key {bytes(key.value)!r}: reading this entry killed the checking process with {how}: "
                "the shard's pages are corrupt; copy or re-create the shard"
            )
            missing = at + 1 - start - progressed  # entries read by this child since its last report
            report.checked += missing
            self._advance(done=missing)
            crashes += 1
            start = at + 1
            if start >= report.entries:
                return report
            if crashes >= MAX_CRASHES_PER_SHARD:
                report.bad.append(
                    f"{path}: stopped after {crashes} crashes; {report.entries - start} entries from index {start} "
                    "on were not checked"
                )
                return report

    def run(self, shards: Sequence[Path]) -> list[ShardReport]:
        try:
            with ThreadPoolExecutor(max_workers=min(self.jobs, len(shards))) as pool:
                return list(pool.map(self.check_shard, shards))
        finally:
            self.bar.close()


def check_paths(
    paths: Sequence[str | os.PathLike],
    key_mapping: dict[str, str] | None = None,
    check_samples: bool = True,
    require_labels: bool = True,
    max_num_elements: int | None = 100,
    min_distance: float | None = 0.1,
    cutoff: float | None = None,
    jobs: int | None = None,
    progress: bool = True,
) -> list[ShardReport]:
    """Check every shard of every path (an ``.lmdb`` file or a directory of shards)."""
    from escn_train.data.lmdb_dataset import resolve_lmdb_paths

    shards = [shard for path in paths for shard in resolve_lmdb_paths(path)]
    options = {
        "key_mapping": dict(key_mapping or {}),
        "check_samples": check_samples,
        "require_labels": require_labels,
        "max_num_elements": max_num_elements,
        "min_distance": min_distance,
        "cutoff": cutoff,
    }
    jobs = jobs if jobs is not None else min(len(shards), os.cpu_count() or 1, 8)
    return Checker(options, jobs, progress).run(shards)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="escn-check-data",
        description="Read every entry of every LMDB shard in child processes (so corrupt pages that kill "
        "the reader are found too) and name each bad shard and key.",
    )
    parser.add_argument("paths", nargs="+", help=".lmdb files and/or directories of *.lmdb shards")
    parser.add_argument("--key-mapping", default=None, help="field renames, e.g. y=energy,force=forces (or JSON)")
    parser.add_argument("--no-sample-checks", action="store_true",
                        help="only decode the entries (skip the per-structure checks training runs)")
    parser.add_argument("--no-labels", action="store_true", help="do not require energy and forces (prediction data)")
    parser.add_argument("--max-num-elements", type=int, default=100, help="atomic numbers must be below this (default 100)")
    parser.add_argument("--min-distance", type=float, default=0.1, help="smallest allowed distance in Å (default 0.1)")
    parser.add_argument("--cutoff", type=float, default=None,
                        help="require a pair of atoms within this radius, as training does with the model's cutoff")
    parser.add_argument("--jobs", type=int, default=None, help="shards checked at the same time (default: CPUs, at most 8)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``escn-check-data``, ``python -m escn_train.data.check_data``)."""
    args = build_parser().parse_args(argv)
    from escn_train.predict import parse_key_mapping

    try:
        reports = check_paths(
            args.paths,
            key_mapping=parse_key_mapping(args.key_mapping),
            check_samples=not args.no_sample_checks,
            require_labels=not args.no_labels,
            max_num_elements=args.max_num_elements,
            min_distance=args.min_distance,
            cutoff=args.cutoff,
            jobs=args.jobs,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"escn-check-data: error: {exc}", file=sys.stderr)
        return 2
    for report in reports:
        for line in report.bad:
            print(line)
    entries = sum(r.entries for r in reports)
    bad = [r for r in reports if r.bad]
    if not bad:
        print(f"escn-check-data: all {entries} entries of {len(reports)} shard(s) are readable and pass the checks")
        return 0
    problems = sum(len(r.bad) for r in bad)
    print(
        f"escn-check-data: {problems} problem(s) in {len(bad)} of {len(reports)} shard(s) ({entries} entries): "
        + ", ".join(f"{r.path} ({len(r.bad)})" for r in bad)
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
