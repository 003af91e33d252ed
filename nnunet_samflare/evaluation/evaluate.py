"""Folder-level FLARE23 evaluation: match cases by name, score them, aggregate, print and save.

The result (and ``metrics.json``) has three parts:

* ``cases``: ``{case: {label id: {"DSC": x, "NSD": y} or null}}``; null where a partially labelled reference
  does not annotate the label. Label ids are strings so that the dict equals the JSON read back.
* ``reference_labels``: ``{case: [label ids present in the reference]}``.
* ``summary``: per label (``per_label``) the mean and population std (ddof 0) over the scored cases, and the
  same over the cases whose reference contains the label (``*_present``); ``organ_DSC``/``organ_NSD`` (the
  mean of the organ means, as the official evaluator) and ``tumor_DSC``/``tumor_NSD``; ``settings``.

Like the official evaluator, per-label means are rounded to 4 decimals and the organ averages are taken
over those rounded means. Organs without any scored case (possible with partial labels; the official
evaluator would give NaN) are left out of the organ average; ``organ_labels_averaged`` lists those in it.

A reference without a prediction scores 0 for every annotated label (a case a FLARE submission failed
on scored 0); ``on_missing="error"`` refuses instead.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_samflare.errors import InputError, exit_code_for, is_out_of_memory, one_line
from nnunet_samflare.evaluation.metrics import (
    DECIMALS,
    DEFAULT_NSD_CUTOFF,
    NSD_TOLERANCE_MM,
    SLAB_LABELS,
    evaluate_case_files,
    read_label_array,
    round_metric,
)
from nnunet_samflare.io import (
    IMAGE_ENDINGS,
    check_output_folder,
    image_ending,
    list_image_files,
    strip_image_ending,
    write_json_atomic,
)
from nnunet_samflare.labels import ALL_FOREGROUND_LABELS, FLARE_LABELS, ORGAN_LABELS, TUMOR_LABEL

#: The endings of label map files: the same as the scans' (one list, in :mod:`nnunet_samflare.io.cases`).
LABEL_FILE_ENDINGS: tuple[str, ...] = IMAGE_ENDINGS
METRIC_NAMES = ("DSC", "NSD")


def case_name(path: Path, endings: Sequence[str] = IMAGE_ENDINGS) -> str | None:
    """The case id of a label file (its name without the ending), or None for files that are not label maps:
    other endings, and hidden files (which include the temporaries of an interrupted write)."""
    path = Path(path)
    ending = image_ending(path)
    if ending is None or ending not in endings or path.name.startswith("."):
        return None
    return strip_image_ending(path)


def find_label_files(folder: str | Path, endings: Sequence[str] = IMAGE_ENDINGS) -> dict[str, Path]:
    """``{case: file}`` for every label map in ``folder`` (not recursive) with one of ``endings``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    files: dict[str, Path] = {}
    for path in list_image_files(folder):
        name = case_name(path, endings)
        if name is None:
            continue
        if name in files:
            raise InputError(folder, f"case {name} has two label files ({files[name].name}, {path.name})")
        files[name] = path
    return files


def _label_range(part: str) -> list[int]:
    """``"5"`` -> [5]; ``"1..3"`` or ``"1-3"`` -> [1, 2, 3]."""
    if ".." in part:
        bounds = part.split("..")
    elif "-" in part[1:]:
        bounds = part.split("-")
    else:
        bounds = [part]
    try:
        values = [int(b) for b in bounds]
    except ValueError:
        raise InputError(None, f"bad label id or range {part!r} (expected e.g. 5, 1..14 or 1-14)") from None
    if len(values) == 1:
        return values
    if len(values) == 2 and values[0] <= values[1]:
        return list(range(values[0], values[1] + 1))
    raise InputError(None, f"bad label range {part!r}")


def parse_label_spec(tokens: str | int | Iterable[str | int]) -> tuple[int, ...]:
    """Label ids from ``"1..14"``, ``"1-14"``, ``"1,2,5"``, ``["1", "2"]`` or ints (any mix, order kept)."""
    if isinstance(tokens, (str, int)):
        tokens = [tokens]
    labels = [
        label for token in tokens for part in str(token).replace(",", " ").split() for label in _label_range(part)
    ]
    if not labels:
        raise InputError(None, "no label ids given")
    if any(label <= 0 for label in labels):
        raise InputError(None, f"label ids must be positive (0 is background): {labels}")
    return tuple(dict.fromkeys(labels))


def find_dataset_json(ref_dir: str | Path, dataset_json: str | Path | None = None) -> Path | None:
    """``dataset_json`` if given (it must exist), else ``dataset.json`` in REF_DIR or its parent, else None."""
    if dataset_json is not None:
        path = Path(dataset_json)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: dataset.json not found")
        return path
    ref_dir = Path(ref_dir).resolve()
    for candidate in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
        if candidate.is_file():
            return candidate
    return None


def load_partial_labels(dataset_json: Path | None) -> dict[str, list[int]]:
    """``partial_labels`` of a dataset.json as ``{case: [annotated label ids]}``; empty if there is none.

    Entries may be label ids or the label names of the file's ``labels`` map.
    """
    if dataset_json is None:
        return {}
    try:
        dataset = json.loads(Path(dataset_json).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(dataset_json, f"not valid JSON ({e})") from e
    partial = dataset.get("partial_labels") or {}
    if not isinstance(partial, dict) or not all(isinstance(v, list) for v in partial.values()):
        raise InputError(dataset_json, "partial_labels must map case ids to lists of label ids or names")
    names = {str(k): v for k, v in (dataset.get("labels") or {}).items()}
    result: dict[str, list[int]] = {}
    for case, entries in partial.items():
        ids = []
        for entry in entries:
            if isinstance(entry, str) and not entry.strip().isdigit():
                if entry not in names:
                    raise InputError(dataset_json, f"partial_labels of {case} names unknown label {entry!r}")
                entry = names[entry]
            ids.append(int(entry))
        result[str(case)] = ids
    return result


def _score_case(task: tuple[str, Path, Path | None, dict[str, Any]]) -> tuple[str, dict, list[int]]:
    """One case (a top-level function so that worker processes can run it)."""
    case, reference_file, prediction_file, options = task
    labels, annotated = options["labels"], options["annotated"]
    if prediction_file is None:
        present = [int(v) for v in np.unique(read_label_array(reference_file)[0]) if v != 0]
        metrics = {
            lb: (None if annotated is not None and lb not in annotated else {"DSC": 0.0, "NSD": 0.0}) for lb in labels
        }
    else:
        metrics, present = evaluate_case_files(
            reference_file,
            prediction_file,
            labels,
            annotated=annotated,
            nsd_cutoff=options["nsd_cutoff"],
            official_slab_quirk=options["official_slab_quirk"],
            tolerances_mm=options["tolerances_mm"],
        )
    return case, {str(lb): m for lb, m in metrics.items()}, present


def _score_case_or_failure(task: tuple[str, Path, Path | None, dict[str, Any]]) -> tuple | BaseException:
    """:func:`_score_case`, or the bad-input error that stopped it (bugs still raise)."""
    try:
        return _score_case(task)
    except Exception as error:
        if exit_code_for(error) is None:
            raise
        return error


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return round_metric(np.mean(values)), round_metric(np.std(values))


def summarize_label(cases: Mapping[str, Mapping], reference_labels: Mapping[str, Sequence[int]], label: int) -> dict:
    """Mean/std of one label over the scored cases, and over those whose reference contains the label."""
    key = str(label)
    scored = [c for c in cases if cases[c].get(key) is not None]
    present = [c for c in scored if label in reference_labels[c]]
    entry: dict[str, Any] = {"name": FLARE_LABELS.get(label, str(label)), "n": len(scored), "n_present": len(present)}
    for metric in METRIC_NAMES:
        entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([cases[c][key][metric] for c in scored])
        entry[f"{metric}_mean_present"], entry[f"{metric}_std_present"] = _mean_std(
            [cases[c][key][metric] for c in present]
        )
    return entry


def _average(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round_metric(np.mean(values)) if values else None


def summarize(
    cases: Mapping[str, Mapping], reference_labels: Mapping[str, Sequence[int]], labels: Sequence[int]
) -> dict:
    """The ``summary`` block (without settings) from per-case results."""
    per_label = {str(lb): summarize_label(cases, reference_labels, lb) for lb in labels}
    organs = [str(lb) for lb in labels if lb in ORGAN_LABELS and per_label[str(lb)]["n"] > 0]
    summary: dict[str, Any] = {"n_cases": len(cases), "per_label": per_label, "organ_labels_averaged": organs}
    for metric in METRIC_NAMES:
        summary[f"organ_{metric}"] = _average(per_label[o][f"{metric}_mean"] for o in organs)
        summary[f"organ_{metric}_present"] = _average(per_label[o][f"{metric}_mean_present"] for o in organs)
    tumor = per_label.get(str(TUMOR_LABEL))
    for metric in METRIC_NAMES:
        summary[f"tumor_{metric}"] = tumor[f"{metric}_mean"] if tumor else None
        summary[f"tumor_{metric}_present"] = tumor[f"{metric}_mean_present"] if tumor else None
    return summary


def _check_labels(labels: Sequence[int], tolerances: Mapping[int, float]) -> None:
    missing = [lb for lb in labels if lb not in tolerances]
    if missing:
        raise InputError(None, f"no NSD tolerance for label(s) {missing}: pass tolerances_mm for them")


def evaluate_folders(
    ref_dir: str | Path,
    pred_dir: str | Path,
    labels: Iterable[int] = ALL_FOREGROUND_LABELS,
    nsd_cutoff: float = DEFAULT_NSD_CUTOFF,
    *,
    official_slab_quirk: bool = True,
    dataset_json: str | Path | None = None,
    tolerances_mm: Mapping[int, float] | None = None,
    output_file: str | Path | None = None,
    on_missing: str = "zero",
    num_processes: int = 1,
    fail_fast: bool = False,
) -> dict:
    """Score every reference label map in ``ref_dir`` against the file of the same case in ``pred_dir``.

    ``dataset_json``: where ``partial_labels`` come from; if None, ``dataset.json`` in ``ref_dir`` or its
    parent is used when present. ``on_missing``: ``"zero"`` (FLARE: DSC = NSD = 0 for every annotated label,
    with a warning) or ``"error"`` (FileNotFoundError). Predictions without a reference are ignored with a
    warning. If ``output_file`` is given the result is written there as JSON (atomically); its folder is checked
    before any case is scored. A case whose reference or prediction is bad input is left out of the scores and
    listed in ``summary["failed_cases"]`` (``fail_fast``, or a single case: its error is raised).
    """
    if not 0.0 <= nsd_cutoff <= 1.0:
        raise InputError(None, f"the NSD cut-off is a DSC value in [0, 1], not {nsd_cutoff}")
    if on_missing not in ("zero", "error"):
        raise InputError(None, f"on_missing must be 'zero' or 'error', not {on_missing!r}")
    labels = tuple(int(lb) for lb in labels)
    tolerances = {**NSD_TOLERANCE_MM, **{int(k): float(v) for k, v in (tolerances_mm or {}).items()}}
    _check_labels(labels, tolerances)
    references = find_label_files(ref_dir)
    if not references:
        raise InputError(ref_dir, f"no label maps ({', '.join(LABEL_FILE_ENDINGS)})")
    # Only files in the references' own format(s) are predictions: samflare predict also writes *_preview.png.
    reference_endings = {path.name[len(case) :].lower() for case, path in references.items()}
    predictions = find_label_files(pred_dir, tuple(e for e in LABEL_FILE_ENDINGS if e in reference_endings))
    missing = [c for c in references if c not in predictions]
    if missing and on_missing == "error":
        raise FileNotFoundError(f"{pred_dir}: no prediction for {len(missing)} case(s): {', '.join(missing)}")
    if missing:
        warnings.warn(f"{pred_dir}: no prediction for {', '.join(missing)}; scored 0", stacklevel=2)
    extra = sorted(set(predictions) - set(references))
    if extra:
        warnings.warn(f"{pred_dir}: no reference for {', '.join(extra)}; not scored", stacklevel=2)
    dataset_file = find_dataset_json(ref_dir, dataset_json)
    partial = load_partial_labels(dataset_file)

    options = {
        "labels": labels,
        "nsd_cutoff": nsd_cutoff,
        "official_slab_quirk": official_slab_quirk,
        "tolerances_mm": tolerances,
    }
    tasks = [
        (case, ref, predictions.get(case), {**options, "annotated": partial.get(case)})
        for case, ref in references.items()
    ]
    if output_file is not None:
        check_output_folder(Path(output_file).parent)  # before the scoring, not after it
    if num_processes > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(num_processes, len(tasks))) as pool:
            outcomes = list(pool.map(_score_case_or_failure, tasks))
    else:
        outcomes = [_score_case_or_failure(task) for task in tasks]
    failures = {task[0]: outcome for task, outcome in zip(tasks, outcomes) if isinstance(outcome, BaseException)}
    if failures and (fail_fast or len(tasks) == 1):
        raise next(iter(failures.values()))
    scored = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]

    cases = {case: metrics for case, metrics, _ in scored}
    reference_labels = {case: present for case, _, present in scored}
    summary = summarize(cases, reference_labels, labels)
    summary["settings"] = {
        "nsd_cutoff": nsd_cutoff,
        "official_slab_quirk": official_slab_quirk,
        "slab_labels": list(SLAB_LABELS),
        "nsd_tolerance_mm": {str(lb): tolerances[lb] for lb in labels},
        "labels": list(labels),
        "decimals": DECIMALS,
        "std": "population (ddof=0)",
        "reference_dir": str(ref_dir),
        "prediction_dir": str(pred_dir),
        "dataset_json": str(dataset_file) if dataset_file else None,
        "partially_labelled_cases": sorted(c for c in partial if c in references),
        "missing_predictions": missing,
        "missing_prediction_score": 0.0,
    }
    # Cases that could not be scored (a bad reference or prediction file): left out of every mean, listed here.
    summary["failed_cases"] = {case: one_line(error) for case, error in failures.items()}
    summary["failed_out_of_memory"] = sorted(case for case, error in failures.items() if is_out_of_memory(error))
    result = {"cases": cases, "reference_labels": reference_labels, "summary": summary}
    if output_file is not None:
        write_json_atomic(result, output_file)
    return result


def _cell(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_table(result: Mapping) -> str:
    """The summary in the layout of the paper's Table 3: organs, organ average, tumor."""
    summary = result["summary"]
    settings = summary.get("settings", {})
    per_label = summary["per_label"]
    width = max([len("Organ average")] + [len(v["name"]) for v in per_label.values()])
    lines = [
        f"FLARE23 evaluation of {summary['n_cases']} case(s); NSD cut-off {settings.get('nsd_cutoff')}, "
        f"slab quirk {'on' if settings.get('official_slab_quirk') else 'off'}",
        f"{'':{width}}  {'n':>3}  {'DSC mean ± std':^17} | {'NSD mean ± std':^17}",
    ]

    def row(name: str, n: Any, dsc: str, nsd: str) -> str:
        return f"{name:{width}}  {n!s:>3}  {dsc:^17} | {nsd:^17}"

    def label_row(entry: Mapping, name: str | None = None) -> str:
        return row(
            name or entry["name"],
            entry["n"],
            _cell(entry["DSC_mean"], entry["DSC_std"]),
            _cell(entry["NSD_mean"], entry["NSD_std"]),
        )

    lines += [label_row(entry) for key, entry in per_label.items() if int(key) in ORGAN_LABELS]
    if summary["organ_labels_averaged"]:
        lines.append(row("Organ average", "", _cell(summary["organ_DSC"]), _cell(summary["organ_NSD"])))
    if str(TUMOR_LABEL) in per_label:
        lines.append(label_row(per_label[str(TUMOR_LABEL)], "Tumor"))
    # Labels beyond the FLARE ids (custom tolerances) come last.
    lines += [label_row(e) for k, e in per_label.items() if int(k) not in ORGAN_LABELS and int(k) != TUMOR_LABEL]
    missing = settings.get("missing_predictions")
    if missing:
        lines.append(f"missing predictions scored 0: {', '.join(missing)}")
    return "\n".join(lines)
