"""The nnU-Net raw datasets a pseudo-label run reads and writes.

Each round trains on a proper nnU-Net raw dataset of its own (``$nnUNet_raw/DatasetNNN_<source>PL<r>``, where r
is the number of pseudo-label rounds its labels went through): images are symbolic links to the source's and the
unlabelled scans (copies where links are impossible), ``labelsTr`` holds the merged labels, and dataset.json says
where each case's labels came from (``samflare_pseudolabel.label_provenance``) and, once confidence filtering is
on, has nnU-Net's ignore label (max label + 1, docs/nnunet.md §6.2). dataset.json is written last: a dataset
without it is unfinished.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_samflare.errors import InputError
from nnunet_samflare.inference.validation import validate_case
from nnunet_samflare.io import Case, check_num_channels, find_cases, image_ending, read_header, write_json_atomic
from nnunet_samflare.pseudolabel.labelmaps import check_same_grid
from nnunet_samflare.training.partial_labels import annotated_labels_per_case, label_ids

#: The key of dataset.json under which a run records what it made (and recognises its own datasets by).
MARKER_KEY = "samflare_pseudolabel"
PROVENANCE_PARTIAL_GROUND_TRUTH = "partial_ground_truth"


def load_dataset_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "dataset.json not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict) or "labels" not in data or "channel_names" not in data:
        raise InputError(path, "not an nnU-Net dataset.json (needs 'labels' and 'channel_names')")
    return data


def nnunet_folders() -> tuple[Path, Path, Path]:
    """``$nnUNet_raw``, ``$nnUNet_preprocessed``, ``$nnUNet_results``; a clear error if one is not set."""
    folders = []
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(name)
        if not value:
            raise InputError(None, f"{name} is not set (nnU-Net's data folders are needed for pseudo-label rounds)")
        folders.append(Path(value))
    return tuple(folders)


def ignore_label_of(dataset_json: dict[str, Any]) -> int:
    """The dataset's ignore label, or the one nnU-Net would accept: max label + 1."""
    labels = dataset_json["labels"]
    return int(labels["ignore"]) if "ignore" in labels else max(label_ids(dataset_json)) + 1


@dataclass
class RawDataset:
    """A labelled nnU-Net raw dataset: per case its channel files and its label file."""

    name: str
    folder: Path
    dataset_json: dict[str, Any]
    images: dict[str, tuple[Path, ...]]
    labels: dict[str, Path]
    annotated: dict[str, frozenset[int]] = field(default_factory=dict)

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json["channel_names"])

    @property
    def partial_cases(self) -> list[str]:
        return sorted(self.annotated)

    @property
    def full_cases(self) -> list[str]:
        return sorted(set(self.labels) - set(self.annotated))


def dataset_name(dataset: str | int) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise InputError(None, f"dataset {dataset}: {' '.join(str(e).split())}") from None


def load_raw_dataset(dataset: str | int) -> RawDataset:
    """Read and check ``$nnUNet_raw/<dataset>``: its dataset.json, every case's image and label file, and its
    ``partial_labels`` (every case named must exist, every label id must be a label of the map)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    raw, _, _ = nnunet_folders()
    name = dataset_name(dataset)
    folder = raw / name
    dataset_json_path = folder / "dataset.json"
    dataset_json = load_dataset_json(dataset_json_path)
    if "file_ending" not in dataset_json:
        raise InputError(dataset_json_path, "no 'file_ending'")
    label_ids(dataset_json)  # integer labels only
    try:
        files = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    except (OSError, KeyError, ValueError) as e:
        raise InputError(folder, f"not an nnU-Net raw dataset ({' '.join(str(e).split())})") from None
    if not files:
        raise InputError(folder / "imagesTr", "no training images")
    images, labels, geometries = {}, {}, {}
    for case, entry in sorted(files.items()):
        images[case] = tuple(Path(f) for f in entry["images"])
        labels[case] = Path(entry["label"])
        for f in (*images[case], labels[case]):
            if not f.is_file():
                raise InputError(f, f"missing file of training case {case}")
        # headers only, now: a broken scan or label map would otherwise surface in a round's merge, hours later
        geometries[case] = validate_case(Case(case, images[case], case, channels=tuple(range(len(images[case])))))
        label_size = read_header(labels[case]).size
        if label_size != geometries[case].size:
            raise InputError(
                labels[case], f"label map size {label_size} differs from its image's {geometries[case].size}"
            )
    annotated = annotated_labels_per_case(dataset_json, str(dataset_json_path), list(labels))
    for case in annotated:
        # The merge lays a partial case's ground truth onto its pseudo label, which has the image's grid; nnU-Net
        # itself only warns about an origin or direction that differs, so fully labelled cases are left to it.
        check_same_grid(geometries[case], read_header(labels[case]), labels[case], images[case][0])
    return RawDataset(name, folder, dataset_json, images, labels, annotated)


def find_unlabelled(
    folder: str | os.PathLike, num_channels: int, file_ending: str, taken: set[str]
) -> dict[str, tuple[Path, ...]]:
    """The unlabelled scans of ``folder`` (nnU-Net naming ``<case>_0000<ending>`` or plain ``<case><ending>``),
    checked to fit the dataset: channel count, file ending, no case id that the dataset already uses."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "unlabelled-scan folder not found")
    cases: list[Case] = find_cases(folder)
    found = {}
    for case in cases:
        if case.is_dicom:
            raise InputError(case.source, "DICOM series are not accepted here: convert them with samflare convert")
        check_num_channels(case, num_channels)
        validate_case(case)
        if image_ending(case.files[0]) != file_ending:
            raise InputError(
                case.files[0], f"image ending {image_ending(case.files[0])} differs from the dataset's {file_ending}"
            )
        if case.case_id in taken:
            raise InputError(case.files[0], f"case id {case.case_id} is also a training case of the dataset")
        found[case.case_id] = case.files
    return found


def link_file(source: Path, target: Path) -> None:
    """``target`` as a symbolic link to ``source`` (a copy where links cannot be made); kept if it already is."""
    source = Path(source).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        if target.resolve() == source:
            return
        target.unlink()
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copyfile(source, target)


def link_images(images_dir: Path, case: str, files: tuple[Path, ...], file_ending: str) -> None:
    """``<images_dir>/<case>_XXXX<ending>`` linked to the channel ``files`` (nnU-Net's image naming)."""
    for channel, source in enumerate(files):
        link_file(source, images_dir / f"{case}_{channel:04d}{file_ending}")


def check_dataset_id_free(dataset_id: int, name: str, work_dir: Path) -> None:
    """Refuse a dataset id that another dataset uses, or that an earlier run with another work folder made."""
    prefix = f"Dataset{dataset_id:03d}_"
    for root in nnunet_folders():
        if not root.is_dir():
            continue
        for existing in root.iterdir():
            if existing.name.startswith(prefix) and existing.name != name:
                raise InputError(existing, f"dataset id {dataset_id} is taken; choose another --first_id")
    own = nnunet_folders()[0] / name / "dataset.json"
    if own.is_file():
        marker = load_dataset_json(own).get(MARKER_KEY) or {}
        if Path(marker.get("work_dir", "")).resolve() != work_dir.resolve():
            raise InputError(own, f"dataset {name} was not made by the run in {work_dir}; choose another --first_id")


def round_dataset_json(
    source: RawDataset,
    name: str,
    provenance: dict[str, str],
    work_dir: Path,
    labels_round: int,
    ignore_label: int | None,
    keep_partial_labels: bool,
) -> dict[str, Any]:
    """dataset.json of a round's dataset: the source's, with its own name, cases and label provenance."""
    data = copy.deepcopy(source.dataset_json)
    data["name"] = name
    data["numTraining"] = len(provenance)
    if ignore_label is not None:
        data["labels"]["ignore"] = ignore_label
    if keep_partial_labels:
        data["partial_labels"] = {case: sorted(labels) for case, labels in source.annotated.items()}
    else:
        data.pop("partial_labels", None)
    data["description"] = (
        f"Made by samflare pseudolabel run from {source.name}: labels after {labels_round} pseudo-label round(s). "
        "Images are links to the source's; see samflare_pseudolabel.label_provenance for where each label map "
        "comes from."
    )
    data[MARKER_KEY] = {
        "source_dataset": source.name,
        "labels_round": labels_round,
        "work_dir": str(work_dir.resolve()),
        "label_provenance": dict(sorted(provenance.items())),
    }
    return data


def write_dataset_json(dataset_json: dict[str, Any], raw_folder: Path, preprocessed_folder: Path) -> None:
    """dataset.json into the raw folder and (as nnU-Net's planning would copy it) the preprocessed folder."""
    preprocessed_folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(dataset_json, preprocessed_folder / "dataset.json")
    write_json_atomic(dataset_json, raw_folder / "dataset.json")


def copy_plans(source: str, target: str, plans: str) -> Path:
    """The source's plans (nnU-Net's own ``move_plans_between_datasets``) and fingerprint for the target dataset."""
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import (
        move_plans_between_datasets,
    )

    _, preprocessed, _ = nnunet_folders()
    plans_file = preprocessed / source / f"{plans}.json"
    if not plans_file.is_file():
        raise InputError(
            plans_file, f"plans not found: run nnUNetv2_plan_and_preprocess and samflare plan for {source} first"
        )
    (preprocessed / target).mkdir(parents=True, exist_ok=True)
    move_plans_between_datasets(source, target, plans, plans)
    # nnU-Net's training copies the fingerprint into the model folder; the images are the source's
    fingerprint = preprocessed / source / "dataset_fingerprint.json"
    if fingerprint.is_file():
        shutil.copyfile(fingerprint, preprocessed / target / "dataset_fingerprint.json")
    return preprocessed / target / f"{plans}.json"
