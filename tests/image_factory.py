"""Test images built from the real CT: bad inputs of every kind, DICOM series, oblique resampled scans."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from conftest import data_file

CT = data_file("flare_like", "image", "TSEX_0002")


def _write(image, path):
    path = Path(path)
    sitk.WriteImage(image, str(path))
    return path


def truncate(src, dst, fraction=0.5):
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def make_bad_input(kind, tmp_path):
    """A file (or folder) that predict must refuse with a one-line error naming it."""
    if kind == "2d":
        return _write(sitk.Image(8, 8, sitk.sitkInt16), tmp_path / "flat.nii.gz")
    if kind == "4d":
        return _write(sitk.Image([4, 4, 4, 2], sitk.sitkInt16), tmp_path / "timeseries.nii.gz")
    if kind == "vector":
        return _write(sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), tmp_path / "rgb.mha")
    if kind == "empty":
        path = tmp_path / "zero.nii.gz"
        path.write_bytes(b"")
        return path
    if kind == "truncated_nii_gz":
        return truncate(CT, tmp_path / "cut.nii.gz")  # ITK itself reads this without complaint
    if kind == "truncated_nii":
        sitk.WriteImage(sitk.ReadImage(str(CT)), str(tmp_path / "full.nii"))
        return truncate(tmp_path / "full.nii", tmp_path / "cut.nii", 0.9)
    if kind == "truncated_mha":
        sitk.WriteImage(sitk.ReadImage(str(CT)), str(tmp_path / "full.mha"))
        return truncate(tmp_path / "full.mha", tmp_path / "cut.mha")
    if kind == "garbage":
        path = tmp_path / "noise.nrrd"
        path.write_bytes(os.urandom(2048))
        return path
    if kind in ("nan", "inf", "nan_mha"):
        array = np.zeros((4, 5, 6), dtype=np.float32)
        array[1, 2, 3] = np.inf if kind == "inf" else np.nan
        ending = ".mha" if kind == "nan_mha" else ".nii.gz"  # NIfTI: ITK turns NaN into 0, so it needs its own check
        return _write(sitk.GetImageFromArray(array), tmp_path / f"has_{kind}{ending}")
    raise AssertionError(kind)


def write_dicom_series(image, folder, series_uid, series_number=1):
    """Write a 3-D int16 image as a CT series, one file per slice, with the tags that place it in space."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))  # row and column cosines
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1",
            "0020|000e": series_uid,
            "0020|0011": str(series_number),
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|1052": "0",  # rescale intercept: stored values are HU
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(plane)
    return folder


def oblique_anisotropic(image: sitk.Image, spacing_xyz=(2.0, 2.5, 4.0), degrees: float = 20.0) -> sitk.Image:
    """The same anatomy on a rotated (oblique) grid with anisotropic voxels, int16 HU like the original."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = np.asarray(image.GetDirection()).reshape(3, 3) @ rotation
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    size = [int(np.ceil(e / s)) for e, s in zip(extent, spacing_xyz)]
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    origin = np.asarray(centre) - direction @ ((np.asarray(size) - 1) / 2 * np.asarray(spacing_xyz))
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        origin.tolist(),
        spacing_xyz,
        direction.ravel().tolist(),
        -1000,
        sitk.sitkInt16,
    )
