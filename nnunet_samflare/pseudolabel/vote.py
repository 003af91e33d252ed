"""Soft voting: the folds' class probabilities averaged, then the argmax (docs/method.md §6.4: each round's two
fold models are soft-vote ensembled to renew the pseudo labels).

Input per case: ``<case>.npz`` + ``<case>.pkl`` from every fold, as ``--save_probabilities`` writes them. All
headers and geometries are checked before anything is computed; a fold whose array shape or image geometry
differs from the first fold's is named. The vote streams: class c of every fold is read, summed and released
before class c+1, so at most two folds' channels of one class are in memory besides the running maximum and
label (about 5 channels' worth for two folds instead of two whole probability arrays).

Output per case: ``<case><ending>`` (the voted label map, written last), ``<case>.npz`` (the averaged
probabilities, nnU-Net's format), ``<case>.pkl`` (the first fold's properties) and ``<case>_vote.json`` with the
folds' agreement: per label, summed over fold pairs, the voxels both folds give it and the voxels either fold gives
it (each counted per fold), so that DSC = 2 · both / either can be pooled over cases.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_samflare.errors import InputError
from nnunet_samflare.io import atomic_output, check_output_folder, write_seg_atomic
from nnunet_samflare.pseudolabel.labelmaps import write_sidecar
from nnunet_samflare.pseudolabel.probabilities import (
    ProbabilityReader,
    read_properties,
    same_geometry,
    write_probabilities,
)


def check_vote_inputs(npz_files: Sequence[str | os.PathLike]) -> tuple[list[ProbabilityReader], dict]:
    """Open every fold's probabilities (headers only) and properties; refuse differing shapes or geometries.
    Returns the readers and the first fold's properties."""
    if not npz_files:
        raise ValueError("no probability files to vote")
    readers = [ProbabilityReader(f) for f in npz_files]
    properties = [read_properties(r.path.with_suffix(".pkl")) for r in readers]
    first = readers[0]
    for reader, props in zip(readers[1:], properties[1:]):
        if reader.shape != first.shape:
            raise InputError(
                reader.path, f"probabilities of shape {reader.shape} differ from {first.path} {first.shape}"
            )
        difference = same_geometry(properties[0], props)
        if difference is not None:
            raise InputError(
                reader.path.with_suffix(".pkl"),
                f"image geometry differs from {first.path.with_suffix('.pkl')}: {difference}",
            )
    return readers, properties[0]


class _Vote:
    """The streaming vote over one case's folds (see the module docstring)."""

    def __init__(self, readers: Sequence[ProbabilityReader]):
        self.readers = readers
        shape = readers[0].spatial_shape
        self.best = np.full(shape, -np.inf, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)
        many = len(readers) > 1
        self.fold_best = [np.full(shape, -np.inf, dtype=np.float32) for _ in readers] if many else []
        self.fold_label = [np.zeros(shape, dtype=np.uint8) for _ in readers] if many else []
        self._mask = np.empty(shape, dtype=bool)

    def _update(self, best: np.ndarray, label: np.ndarray, channel: np.ndarray, index: int) -> None:
        # strictly greater: ties go to the lower class, as np.argmax does
        np.greater(channel, best, out=self._mask)
        np.copyto(best, channel, where=self._mask)
        label[self._mask] = index

    def mean_channels(self):
        """Yield the averaged channel of each class, updating the vote as it goes."""
        streams = [reader.channels() for reader in self.readers]
        n = len(streams)
        for index in range(self.readers[0].num_classes):
            total = None
            for fold, stream in enumerate(streams):
                channel = next(stream)
                if self.fold_best:
                    self._update(self.fold_best[fold], self.fold_label[fold], channel, index)
                if total is None:
                    total = channel
                else:
                    total += channel
                del channel
            if n > 1:
                np.divide(total, n, out=total)
            self._update(self.best, self.label, total, index)
            yield total

    def agreement(self, num_classes: int) -> dict[str, list[int]]:
        """Per label: [voxels both folds of a pair give it, voxels each fold gives it], summed over fold pairs."""
        both = np.zeros(num_classes, dtype=np.int64)
        either = np.zeros(num_classes, dtype=np.int64)
        for a, b in itertools.combinations(self.fold_label, 2):
            same = a == b
            both += np.bincount(a[same], minlength=num_classes)
            either += np.bincount(a.ravel(), minlength=num_classes) + np.bincount(b.ravel(), minlength=num_classes)
        return {str(label): [int(both[label]), int(either[label])] for label in range(num_classes) if either[label]}


def vote_case(
    npz_files: Sequence[str | os.PathLike], output_dir: str | os.PathLike, case: str, file_ending: str
) -> dict:
    """Soft-vote one case into ``output_dir`` (outputs of the module docstring). Returns the ``_vote.json``
    record."""
    output_dir = Path(output_dir)
    readers, properties = check_vote_inputs(npz_files)
    vote = _Vote(readers)
    write_probabilities(output_dir / f"{case}.npz", readers[0].shape, vote.mean_channels())
    with atomic_output(output_dir / f"{case}.pkl") as tmp:
        shutil.copyfile(readers[0].path.with_suffix(".pkl"), tmp)
    record = {
        "folds": len(readers),
        "inputs": [str(r.path) for r in readers],
        "labels": {str(k): int(v) for k, v in enumerate(np.bincount(vote.label.ravel())) if v},
        "agreement": vote.agreement(readers[0].num_classes) if len(readers) > 1 else {},
    }
    write_sidecar(output_dir, case, "vote", record)
    write_seg_atomic(vote.label, properties, output_dir / f"{case}{file_ending}")
    return record


def vote_folders(inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> dict[str, dict]:
    """``samflare pseudolabel vote``: every case of the fold folders ``inputs`` (each holding ``<case>.npz`` and
    ``<case>.pkl``). Every case must be in every folder; all inputs are checked before anything is written. The
    label maps get the ``file_ending`` of a ``dataset.json`` in the first folder (``.nii.gz`` without one), which
    is copied to the output with ``plans.json``, as nnU-Net's ensembling does."""
    folders = [Path(f) for f in inputs]
    for folder in folders:
        if not folder.is_dir():
            raise InputError(folder, "no such folder")
    cases = sorted(p.name[: -len(".npz")] for p in folders[0].glob("*.npz") if not p.name.startswith("."))
    if not cases:
        raise InputError(folders[0], "no <case>.npz probabilities (predict with --save_probabilities)")
    for folder in folders[1:]:
        for case in cases:
            if not (folder / f"{case}.npz").is_file():
                raise InputError(folder / f"{case}.npz", f"missing: {folders[0]} has probabilities for {case}")
        extra = sorted(p.name for p in folder.glob("*.npz") if p.name[:-4] not in cases and not p.name.startswith("."))
        if extra:
            raise InputError(folder / extra[0], f"no such case in {folders[0]}")
    for case in cases:
        check_vote_inputs([folder / f"{case}.npz" for folder in folders])
    output_dir = check_output_folder(output_dir, folders)
    file_ending = ".nii.gz"
    dataset_json = folders[0] / "dataset.json"
    if dataset_json.is_file():
        from nnunet_samflare.pseudolabel.datasets import load_dataset_json

        file_ending = load_dataset_json(dataset_json).get("file_ending", file_ending)
    records = {
        case: vote_case([folder / f"{case}.npz" for folder in folders], output_dir, case, file_ending) for case in cases
    }
    for name in ("dataset.json", "plans.json"):
        if (folders[0] / name).is_file():
            with atomic_output(output_dir / name) as tmp:
                shutil.copyfile(folders[0] / name, tmp)
    return records
