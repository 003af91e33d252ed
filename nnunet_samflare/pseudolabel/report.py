"""The per-round report of a pseudo-label run: ``report.json``, a printed table and ``report.png``.

* voxels changed per label against the previous round's training labels (gained / lost), over the cases that
  had labels in both rounds; cases labelled for the first time are counted apart;
* agreement between the fold models on the scans every fold predicted: DSC per label, pooled over cases and
  fold pairs (2 · voxels both give the label / voxels each gives it);
* voxels set to the ignore label per label (confidence filtering);
* cases per label provenance (ground truth, ground truth + pseudo labels, pseudo labels only);
* wall time of each of the round's steps.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_samflare.io import atomic_output, write_json_atomic
from nnunet_samflare.pseudolabel.labelmaps import load_label_map


def label_changes(pairs: Iterable[tuple[str | os.PathLike | None, str | os.PathLike]]) -> dict[str, Any]:
    """Voxels gained and lost per label between (previous, new) label map files; previous None = new case."""
    gained: dict[str, int] = {}
    lost: dict[str, int] = {}
    compared = new = 0
    for previous, current in pairs:
        if previous is None:
            new += 1
            continue
        before = load_label_map(previous).array
        after = load_label_map(current).array
        if before.shape != after.shape:
            raise ValueError(f"{previous} and {current} differ in shape")
        changed = before != after
        for counts, values in ((gained, after[changed]), (lost, before[changed])):
            for label, n in enumerate(np.bincount(values.ravel())):
                if n:
                    counts[str(label)] = counts.get(str(label), 0) + int(n)
        compared += 1
    return {"cases_compared": compared, "new_cases": new, "gained": gained, "lost": lost}


def pooled_agreement(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Fold-agreement DSC per label from the vote records (``agreement``: label -> [both, either])."""
    both: dict[str, int] = {}
    either: dict[str, int] = {}
    for record in records:
        for label, (b, e) in (record.get("agreement") or {}).items():
            both[label] = both.get(label, 0) + b
            either[label] = either.get(label, 0) + e
    return {label: round(2 * both[label] / either[label], 4) for label in sorted(either, key=int) if either[label]}


def summed(records: Iterable[Mapping[str, Any]], key: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for record in records:
        for label, n in (record.get(key) or {}).items():
            total[label] = total.get(label, 0) + int(n)
    return dict(sorted(total.items(), key=lambda item: int(item[0])))


def build_report(
    round_index: int,
    dataset: str,
    changes: Mapping[str, Any],
    vote_records: Iterable[Mapping[str, Any]],
    filter_records: Iterable[Mapping[str, Any]],
    provenance: Mapping[str, str],
    wall_times: Mapping[str, float],
    label_names: Mapping[int, str],
) -> dict[str, Any]:
    cases: dict[str, int] = {}
    for value in provenance.values():
        cases[value] = cases.get(value, 0) + 1
    return {
        "round": round_index,
        "dataset": dataset,
        "label_names": {str(k): v for k, v in sorted(label_names.items())},
        "changed_voxels": dict(changes),
        "fold_agreement_dsc": pooled_agreement(vote_records),
        "ignored_voxels": summed(filter_records, "ignored"),
        "cases_per_provenance": dict(sorted(cases.items())),
        "wall_time_s": {step: round(float(t), 1) for step, t in wall_times.items()},
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The printed table: one row per label, then provenance counts and wall times."""
    names = report["label_names"]
    changes = report["changed_voxels"]
    agreement = report["fold_agreement_dsc"]
    ignored = report["ignored_voxels"]
    labels = sorted({*changes.get("gained", {}), *changes.get("lost", {}), *agreement, *ignored} - {"0"}, key=int)
    lines = [
        f"round {report['round']} -> {report['dataset']}: {changes.get('cases_compared', 0)} case(s) compared with "
        f"the previous round, {changes.get('new_cases', 0)} labelled for the first time",
        f"{'label':<22} {'gained':>10} {'lost':>10} {'fold DSC':>9} {'ignored':>10}",
    ]
    for label in labels:
        dsc = agreement.get(label)
        lines.append(
            f"{label + ' ' + names.get(label, ''):<22.22} {changes.get('gained', {}).get(label, 0):>10} "
            f"{changes.get('lost', {}).get(label, 0):>10} {'-' if dsc is None else f'{dsc:.4f}':>9} "
            f"{ignored.get(label, 0):>10}"
        )
    lines.append("cases: " + ", ".join(f"{k} {v}" for k, v in report["cases_per_provenance"].items()))
    lines.append("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["wall_time_s"].items()))
    return "\n".join(lines)


def save_report(report: Mapping[str, Any], folder: str | os.PathLike) -> tuple[Path, Path]:
    """``report.json`` and ``report.png`` (changed, fold DSC and ignored voxels per label) into ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    json_path = folder / "report.json"
    write_json_atomic(dict(report), json_path)
    names = report["label_names"]
    changes = report["changed_voxels"]
    panels = [
        (
            "voxels changed vs previous round",
            {k: changes.get("gained", {}).get(k, 0) + changes.get("lost", {}).get(k, 0) for k in names if k != "0"},
        ),
        ("fold agreement (DSC)", {k: report["fold_agreement_dsc"].get(k, 0.0) for k in names if k != "0"}),
        ("voxels ignored (low confidence)", {k: report["ignored_voxels"].get(k, 0) for k in names if k != "0"}),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (title, values) in zip(axes, panels):
        keys = list(values)
        axis.bar(range(len(keys)), [values[k] for k in keys], color="tab:blue")
        axis.set_xticks(range(len(keys)), [names[k] for k in keys], rotation=75, fontsize=7)
        axis.set_title(title, fontsize=10)
    figure.suptitle(f"pseudo-label round {report['round']} -> {report['dataset']}")
    figure.tight_layout()
    png_path = folder / "report.png"
    with atomic_output(png_path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return json_path, png_path
