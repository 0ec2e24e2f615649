"""Hydra callback that tabulates the final metrics of every job of a multirun.

After the sweep it reads ``<sweep dir>/<job>/metrics.json`` and the job's overrides
(``.hydra/overrides.yaml``) and writes ``multirun_summary.csv`` and ``multirun_summary.md``
into the sweep directory, one row per job (jobs that failed or wrote no metrics are listed
with their status). It reads files rather than return values, so it works with any launcher.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

#: Columns shown first (when present); other numeric metrics follow alphabetically in the CSV.
KEY_METRICS = (
    "test/forces_mae",
    "test/energy_mae",
    "test/forces_cosine",
    "test/efwt",
    "test/forces_mae_zero_baseline",
    "best/val/forces_mae",
    "val/forces_mae",
    "val/energy_mae",
    "wall_time_s",
)


def _overrides(job_dir: Path) -> str:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    items = [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]
    return " ".join(item for item in items if not item.startswith("hydra."))


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One dict per job folder (``job``, ``overrides``, ``status``, metrics)."""
    rows = []
    job_dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()), key=lambda p: (len(p.name), p.name))
    for job_dir in job_dirs:
        row: dict[str, Any] = {"job": job_dir.name, "overrides": _overrides(job_dir)}
        metrics_file = job_dir / "metrics.json"
        if metrics_file.is_file():
            try:
                metrics = json.loads(metrics_file.read_text())
                row["status"] = "ok"
                row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            except json.JSONDecodeError:
                row["status"] = "unreadable metrics.json"
        else:
            row["status"] = "no metrics (failed or running)"
        rows.append(row)
    return rows


def write_summary(sweep_dir: str | Path) -> tuple[Path, Path] | None:
    """Write ``multirun_summary.csv`` / ``.md`` for ``sweep_dir``; None when it has no jobs."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return None
    rows = collect_rows(sweep_dir)
    if not rows:
        return None
    metric_names = sorted({k for row in rows for k in row} - {"job", "overrides", "status"})
    ordered = [m for m in KEY_METRICS if m in metric_names] + [m for m in metric_names if m not in KEY_METRICS]
    csv_path = sweep_dir / "multirun_summary.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["job", "overrides", "status", *ordered])
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    shown = [m for m in KEY_METRICS if m in metric_names]
    lines = [
        f"# Multirun summary: {sweep_dir}",
        "",
        "| job | overrides | status | " + " | ".join(shown) + " |",
        "|" + "---|" * (3 + len(shown)),
    ]
    for row in rows:
        cells = [_fmt(row.get(m)) for m in shown]
        lines.append(f"| {row['job']} | `{row['overrides']}` | {row['status']} | " + " | ".join(cells) + " |")
    md_path = sweep_dir / "multirun_summary.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.5g}"
    return str(value)


class MultirunSummary(Callback):
    """Writes the sweep's summary table when a multirun ends (single runs are untouched)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        paths = write_summary(config.hydra.sweep.dir)
        if paths:
            print(f"multirun summary: {paths[1]}")
