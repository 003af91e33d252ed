"""Cleaning pseudo labels before they are trained on.

1. The paper's post-processing, unchanged (:func:`nnunet_samflare.inference.postprocessing.postprocess_flare`:
   largest component per organ, then removal of tumors touching no organ; docs/method.md §5.6).
2. What the paper lists as future work: every voxel whose winning probability (the largest class probability of
   the voted ``<case>.npz``) is below ``confidence`` becomes nnU-Net's ignore label, so that the next round's
   loss skips it instead of learning noise (docs/nnunet.md §6.2). The ignore label is max label + 1 (15 for
   FLARE), which nnU-Net requires.

The ignored voxels are counted per label they had after step 1 and written to ``<case>_filter.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nnunet_samflare.errors import InputError
from nnunet_samflare.inference.postprocessing import postprocess_flare
from nnunet_samflare.io import check_output_folder, read_header, strip_image_ending
from nnunet_samflare.pseudolabel.labelmaps import (
    counts_by_label,
    label_files,
    load_label_map,
    save_label_map,
    write_sidecar,
)
from nnunet_samflare.pseudolabel.probabilities import ProbabilityReader


def winning_probability(reader: ProbabilityReader) -> np.ndarray:
    """The largest class probability per voxel, (z, y, x) float32, streamed one class at a time."""
    best = None
    for channel in reader.channels():
        if best is None:
            best = channel.copy()
        else:
            np.maximum(best, channel, out=best)
    return best


def filter_pseudo_label(
    segmentation: np.ndarray,
    winning: np.ndarray | None = None,
    confidence: float | None = None,
    ignore_label: int | None = None,
    postprocess: bool = True,
) -> tuple[np.ndarray, dict[str, int]]:
    """Steps 1 and 2 of the module docstring on one (z, y, x) label map. Returns the filtered map and the
    ignored voxels per label (``{label: count}``, labels as strings). Without ``confidence`` only step 1 runs."""
    result = postprocess_flare(segmentation) if postprocess else segmentation.copy()
    if confidence is None:
        return result, {}
    if winning is None or ignore_label is None:
        raise ValueError("confidence filtering needs the winning probabilities and an ignore label")
    if winning.shape != segmentation.shape:
        raise ValueError(f"probabilities {winning.shape} do not fit the label map {segmentation.shape}")
    low = winning < confidence
    ignored = counts_by_label(result[low])
    result[low] = ignore_label
    return result, ignored


def check_confidence(confidence: float | None) -> None:
    if confidence is not None and not 0 < confidence <= 1:
        raise InputError(None, f"--confidence must be in (0, 1], not {confidence}")


def check_ignore_label(ignore_label: int | None) -> None:
    # Label maps are written as uint8, and 0 is background.
    if ignore_label is not None and not 1 <= ignore_label <= 255:
        raise InputError(None, f"--ignore_label must be in 1..255 (label maps are uint8), not {ignore_label}")


def _check_below_ignore_label(labels: np.ndarray, ignore_label: int, label_map: str | os.PathLike) -> None:
    if labels.size and int(labels.max()) >= ignore_label:
        raise InputError(label_map, f"label {int(labels.max())} is not below the ignore label {ignore_label}")


def filter_case(
    label_map: str | os.PathLike,
    probabilities: str | os.PathLike | None,
    output: str | os.PathLike,
    confidence: float | None = None,
    ignore_label: int | None = None,
    postprocess: bool = True,
    record_dir: str | os.PathLike | None = None,
) -> dict:
    """Filter one label map file (and its ``.npz`` when ``confidence`` is given) into ``output``; returns the
    ``_filter.json`` record (``ignored`` voxels per label, ``labels`` voxels per label after filtering), which
    ``record_dir`` also gets as ``<case>_filter.json``, before the label map is written."""
    seg = load_label_map(label_map)
    winning = None
    if confidence is not None:
        reader = ProbabilityReader(probabilities)
        _check_fits(reader, seg.array.shape, label_map)
        if ignore_label is None:
            ignore_label = reader.num_classes
        winning = winning_probability(reader)
    if ignore_label is not None:
        _check_below_ignore_label(seg.array, ignore_label, label_map)
    result, ignored = filter_pseudo_label(seg.array, winning, confidence, ignore_label, postprocess)
    record = {
        "confidence": confidence,
        "ignore_label": ignore_label if confidence is not None else None,
        "postprocessed": postprocess,
        "ignored": ignored,
        "labels": counts_by_label(result),
    }
    if record_dir is not None:
        write_sidecar(Path(record_dir), strip_image_ending(output), "filter", record)
    save_label_map(result, seg.image, output)
    return record


def _check_fits(reader: ProbabilityReader, shape: tuple[int, ...], label_map: str | os.PathLike) -> None:
    if reader.spatial_shape != tuple(shape):
        raise InputError(
            reader.path, f"probabilities of spatial shape {reader.spatial_shape} do not fit {label_map} {tuple(shape)}"
        )


def filter_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    confidence: float | None = None,
    ignore_label: int | None = None,
    postprocess: bool = True,
) -> dict[str, dict]:
    """``samflare pseudolabel filter``: every label map of ``input_dir`` (with its ``<case>.npz`` when
    ``confidence`` is given). The ignore label defaults to the number of probability classes (= max label + 1).
    Everything is checked before anything is written; outputs keep the input's name and geometry, with a
    ``<case>_filter.json`` each."""
    check_confidence(confidence)
    check_ignore_label(ignore_label)
    input_dir = Path(input_dir)
    files = label_files(input_dir)
    if not files:
        raise InputError(input_dir, "no label maps found (.nii.gz, .nii, .mha or .nrrd)")
    for case, path in files.items():
        limit = ignore_label
        if confidence is not None:
            reader = ProbabilityReader(input_dir / f"{case}.npz")
            _check_fits(reader, read_header(path).shape_zyx, path)
            limit = reader.num_classes if ignore_label is None else ignore_label
        if limit is not None:  # needs the voxels, but label maps are small next to their probabilities
            _check_below_ignore_label(load_label_map(path).array, limit, path)
    output_dir = check_output_folder(output_dir, [input_dir])
    records = {}
    for case, path in files.items():
        records[case] = filter_case(
            path,
            input_dir / f"{case}.npz",
            output_dir / path.name,
            confidence,
            ignore_label,
            postprocess,
            record_dir=output_dir,
        )
    return records
