"""Ground truth wins: pseudo labels fill only what a partially labelled case does not annotate.

For a case that annotates the label set A (``partial_labels`` in dataset.json; docs/method.md §6.4):

* a voxel whose ground truth is a label of A keeps it, whatever the pseudo label says;
* a voxel whose ground truth is not in A (background, i.e. "none of A here") takes the pseudo label, except that
  a pseudo label of A becomes background: the annotator looked for that organ and did not find it here.

A case without a ``partial_labels`` entry is fully annotated: its ground truth is kept as it is. A case without
ground truth (an unlabelled scan) keeps its pseudo label. The ignore label of the filter step is a pseudo label like
any other (never in A), so it survives only where the ground truth has nothing to say.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import numpy as np

from nnunet_samflare.errors import InputError
from nnunet_samflare.evaluation.evaluate import find_dataset_json
from nnunet_samflare.io import check_output_folder, image_ending, read_header, strip_image_ending
from nnunet_samflare.pseudolabel.datasets import load_dataset_json
from nnunet_samflare.pseudolabel.labelmaps import (
    check_same_grid,
    label_files,
    load_label_map,
    save_label_map,
    write_sidecar,
)
from nnunet_samflare.training.partial_labels import annotated_labels_per_case

PROVENANCE_GROUND_TRUTH = "ground_truth"
PROVENANCE_PARTIAL = "ground_truth+pseudo"
PROVENANCE_PSEUDO = "pseudo"
PROVENANCES = (PROVENANCE_GROUND_TRUTH, PROVENANCE_PARTIAL, PROVENANCE_PSEUDO)


def merge_with_ground_truth(
    ground_truth: np.ndarray, pseudo: np.ndarray, annotated: Collection[int] | None
) -> np.ndarray:
    """The merged (z, y, x) label map of the module docstring. ``annotated`` is the case's annotated foreground
    labels, or None for a fully annotated case (the ground truth is returned)."""
    if ground_truth.shape != pseudo.shape:
        raise ValueError(f"ground truth {ground_truth.shape} and pseudo labels {pseudo.shape} differ in shape")
    if annotated is None:
        return ground_truth.copy()
    labels = sorted({int(label) for label in annotated} - {0})
    from_ground_truth = np.isin(ground_truth, labels)
    merged = np.where(np.isin(pseudo, labels), 0, pseudo).astype(pseudo.dtype, copy=False)
    merged[from_ground_truth] = ground_truth[from_ground_truth]
    return merged


def merge_case(
    ground_truth: str | os.PathLike | None,
    pseudo: str | os.PathLike | None,
    annotated: Collection[int] | None,
    output: str | os.PathLike,
    record_dir: str | os.PathLike | None = None,
) -> dict:
    """Merge one case's files into ``output`` (the ground truth's geometry) and return what it did:
    ``provenance`` and voxel counts (``from_ground_truth``; ``overruled``: annotated voxels whose pseudo label
    differed; ``removed``: pseudo voxels of an annotated label where the ground truth says otherwise). With
    ``record_dir`` the record is also written there as ``<case>_merge.json``, before the label map."""
    if ground_truth is None and pseudo is None:
        raise ValueError("merge_case needs ground truth, pseudo labels or both")
    gt = None if ground_truth is None else load_label_map(ground_truth)
    if gt is not None and annotated is None:
        merged, like = gt.array, gt.image
        record = {"provenance": PROVENANCE_GROUND_TRUTH, "from_ground_truth": int(gt.array.size)}
    else:
        pl = load_label_map(pseudo) if pseudo is not None else None
        if pl is None:
            raise InputError(ground_truth, "partially labelled case has no pseudo label map to fill it")
        if gt is None:
            merged, like = pl.array, pl.image
            record = {"provenance": PROVENANCE_PSEUDO, "from_ground_truth": 0}
        else:
            check_same_grid(gt.image, pl.image, pl.path, gt.path)
            merged, like = merge_with_ground_truth(gt.array, pl.array, annotated), gt.image
            labels = sorted(set(annotated) - {0})
            from_gt = np.isin(gt.array, labels)
            record = {
                "provenance": PROVENANCE_PARTIAL,
                "annotated": labels,
                "from_ground_truth": int(from_gt.sum()),
                "overruled": int((from_gt & (pl.array != gt.array)).sum()),
                "removed": int((~from_gt & np.isin(pl.array, labels)).sum()),
            }
    if record_dir is not None:
        write_sidecar(Path(record_dir), strip_image_ending(output), "merge", record)
    save_label_map(merged, like, output)
    return record


def merge_folders(
    ground_truth_dir: str | os.PathLike,
    pseudo_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dataset_json: str | os.PathLike | None = None,
) -> dict[str, dict]:
    """``samflare pseudolabel merge``: one merged map per pseudo label map of ``pseudo_dir``.

    ``partial_labels`` come from ``dataset_json`` (default: ``dataset.json`` in or above ``ground_truth_dir``,
    as nnU-Net's raw layout has it; none found: every case with ground truth is fully annotated). Every input is
    checked before anything is written. Returns ``{case: record}`` and writes ``<case>_merge.json`` beside each
    output.
    """
    ground_truth_dir, pseudo_dir, output_dir = Path(ground_truth_dir), Path(pseudo_dir), Path(output_dir)
    gt_files = label_files(ground_truth_dir)
    pseudo_files = label_files(pseudo_dir)
    if not pseudo_files:
        raise InputError(pseudo_dir, "no pseudo label maps found (.nii.gz, .nii, .mha or .nrrd)")
    dataset_file = find_dataset_json(ground_truth_dir, dataset_json)
    annotated = {}
    if dataset_file is not None:
        annotated = annotated_labels_per_case(load_dataset_json(dataset_file), str(dataset_file), list(gt_files))
    for case, path in pseudo_files.items():
        if case in annotated and case not in gt_files:
            raise InputError(path, f"case {case} is partially labelled but has no ground truth in {ground_truth_dir}")
        if case in annotated:  # headers only; merge_case reads the voxels
            check_same_grid(read_header(gt_files[case]), read_header(path), path, gt_files[case])
    check_output_folder(output_dir, [ground_truth_dir, pseudo_dir])
    records = {}
    for case, path in pseudo_files.items():
        target = output_dir / f"{case}{image_ending(gt_files.get(case, path))}"
        gt = gt_files.get(case)
        records[case] = merge_case(gt, path, annotated.get(case) if gt is not None else None, target, output_dir)
    return records
