"""What ``samflare profile`` writes and prints: the summary, ``profile.csv``, one console line per case, the
table and the per-case memory-time plots."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nnunet_samflare.evaluation.sampling import FIGURES

CSV_COLUMNS = ("case", "exit_code", *FIGURES, "timed_out")


def summarize_records(records: Sequence[dict]) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float | None]:
        values = [r[key] for r in records if r.get(key) is not None]
        if not values:
            return {"mean": None, "max": None}
        return {"mean": round(sum(values) / len(values), 3), "max": round(max(values), 3)}

    failed = [r["case"] for r in records if r["exit_code"] != 0]
    return {
        "n_cases": len(records),
        "n_failed": len(failed),
        "failed_cases": failed,
        **{key: stats(key) for key in FIGURES},
    }


def write_profile_csv(records: Sequence[dict], path: str | Path) -> Path:
    """One row per case with the Table-4 figures; absent values are empty cells."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for record in records:
            writer.writerow(["" if record.get(k) is None else record.get(k) for k in CSV_COLUMNS])
    os.replace(tmp, path)
    return path


def plot_case(record: dict, path: Path) -> Path | None:
    from nnunet_samflare.evaluation.plots import plot_memory_curve

    samples = record["samples"]
    if not samples["time_s"]:
        return None
    return plot_memory_curve(
        samples["time_s"],
        samples["ram_mb"],
        path,
        gpu_mb=samples.get("gpu_mb"),
        gpu_own_mb=samples.get("gpu_own_mb"),
        title=f"{record['case']}: {record['time_s']} s, exit code {record['exit_code']}",
    )


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_case_line(record: Mapping[str, Any]) -> str:
    """One console line per case."""
    status = "ok" if record["exit_code"] == 0 else f"FAILED (exit code {record['exit_code']})"
    if record.get("error"):
        status += f": {record['error']}"
    return (
        f"{record['case']}: {_fmt(record['time_s'], '.2f')} s, MaxGPU {_fmt(record['MaxGPU_MB'])} MB, "
        f"AUC_GPU_Time {_fmt(record['AUC_GPU_Time_MBs'])} MB·s, own GPU {_fmt(record['MaxGPU_own_MB'])} MB, "
        f"RAM {_fmt(record['MaxRAM_MB'])} MB (largest process {_fmt(record.get('MaxRSS_process_MB'))} MB), "
        f"{status}"
    )


def format_profile_table(result: Mapping[str, Any]) -> str:
    """Per-case Table-4 figures, then the note on the GPU figures (absent, or device-wide only) if any."""
    header = (
        f"{'case':<20} {'time (s)':>9} {'MaxGPU (MB)':>12} {'AUC_GPU_Time (MB·s)':>20} "
        f"{'own GPU (MB)':>13} {'MaxRAM (MB)':>12} {'max proc (MB)':>14} {'exit':>5}"
    )
    lines = [header]
    for r in result["cases"]:
        lines.append(
            f"{r['case']:<20} {_fmt(r['time_s'], '.2f'):>9} {_fmt(r['MaxGPU_MB']):>12} "
            f"{_fmt(r['AUC_GPU_Time_MBs']):>20} {_fmt(r['MaxGPU_own_MB']):>13} "
            f"{_fmt(r['MaxRAM_MB']):>12} {_fmt(r.get('MaxRSS_process_MB')):>14} {r['exit_code']!s:>5}"
        )
    note = result["settings"].get("gpu_note")
    if note:
        lines.append(note)
    return "\n".join(lines)
