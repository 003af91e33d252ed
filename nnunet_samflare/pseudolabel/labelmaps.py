"""Label-map files of the pseudo-label steps: read with their geometry, checked against each other, written
atomically as uint8 (nnU-Net's own pixel type for fewer than 255 labels)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_samflare.errors import InputError
from nnunet_samflare.io import (
    Geometry,
    list_image_files,
    read_label_map,
    strip_image_ending,
    write_image_atomic,
    write_json_atomic,
)

#: Sidecar files of the pseudo-label steps sit beside the label maps as ``<case>_<step>.json``.
SIDECAR = "{case}_{step}.json"


@dataclass
class LabelMap:
    """A label map as a (z, y, x) array plus the image it came from (for its geometry)."""

    array: np.ndarray
    image: sitk.Image
    path: Path | None = None


def load_label_map(path: str | os.PathLike) -> LabelMap:
    image = read_label_map(path)
    return LabelMap(sitk.GetArrayFromImage(image), image, Path(path))


def save_label_map(array: np.ndarray, like: sitk.Image, path: str | os.PathLike) -> None:
    """Write ``array`` with the geometry of ``like`` (spacing, origin, direction), atomically."""
    if array.size and int(array.max()) > 255:
        raise ValueError(f"label {int(array.max())} does not fit uint8")
    image = sitk.GetImageFromArray(array.astype(np.uint8, copy=False))
    image.CopyInformation(like)
    write_image_atomic(image, path)


def check_same_grid(
    reference: sitk.Image | Geometry,
    other: sitk.Image | Geometry,
    other_name: str | os.PathLike,
    reference_name: str | os.PathLike,
) -> None:
    """Refuse ``other`` unless it has the voxel grid and world placement of ``reference`` (images, or headers from
    :func:`~nnunet_samflare.io.read_header` to check before any voxel is read)."""
    reference, other = (g if isinstance(g, Geometry) else Geometry.of(g) for g in (reference, other))
    if other.size != reference.size:
        raise InputError(other_name, f"size {other.size} differs from {reference_name} {reference.size}")
    for what, a, b, tolerance in (
        ("spacing", other.spacing, reference.spacing, 1e-5),
        ("origin", other.origin, reference.origin, 1e-3),
        ("direction", other.direction, reference.direction, 1e-5),
    ):
        if not np.allclose(a, b, atol=tolerance, rtol=0):
            raise InputError(
                other_name,
                f"{what} {tuple(round(v, 4) for v in a)} differs from {reference_name} {tuple(round(v, 4) for v in b)}",
            )


def label_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{case: file}`` of the label maps directly in ``folder`` (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "no such folder")
    files: dict[str, Path] = {}
    for path in list_image_files(folder):
        case = strip_image_ending(path)
        if case in files:
            raise InputError(path, f"case {case} has two label maps ({files[case].name}, {path.name})")
        files[case] = path
    return files


def write_sidecar(folder: Path, case: str, step: str, record: dict) -> None:
    write_json_atomic(record, folder / SIDECAR.format(case=case, step=step))


def read_sidecar(folder: Path, case: str, step: str) -> dict | None:
    path = folder / SIDECAR.format(case=case, step=step)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def counts_by_label(values: np.ndarray, minlength: int = 0) -> dict[str, int]:
    """Non-zero voxel counts per label value, keyed by the label as a string (JSON keys)."""
    counts = np.bincount(values.ravel(), minlength=minlength)
    return {str(label): int(n) for label, n in enumerate(counts) if n}
