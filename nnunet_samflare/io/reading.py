"""Reading scans and label maps with every check that decides "bad input" for a file.

:func:`read_case` returns nnU-Net's own layout: a float32 ``(c, z, y, x)`` array plus the properties dict that
``nnunetv2.imageio.simpleitk_reader_writer.SimpleITKIO.read_images`` returns, so both go straight into
``nnUNetPredictor``. :func:`read_header` reads only the header, so geometry and memory can be checked before any
voxel is read. Every problem is an :class:`~nnunet_samflare.errors.InputError` whose message is one line naming
the file and the cause. Nothing here ever writes.
"""

from __future__ import annotations

import gzip
import os
import re
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from nnunet_samflare.errors import InputError
from nnunet_samflare.io.cases import Case, find_cases, image_ending
from nnunet_samflare.io.validation import Geometry, check_geometry, raw_nifti_spacing


def _itk_reason(error: BaseException) -> str:
    """The informative part of a multi-line ITK exception, as one line (no source locations, no object ids)."""
    lines = []
    for raw in str(error).splitlines():
        line = raw.strip()
        if not line or line.startswith("Exception thrown in SimpleITK"):
            continue
        line = re.sub(r"^(sitk::ERROR|ITK ERROR):\s*", "", line)
        line = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", line)
        lines.append(line)
    reason = "; ".join(lines) or type(error).__name__
    return reason if len(reason) <= 240 else reason[:237] + "..."


def _gzip_stream_is_complete(path: Path) -> bool:
    """Decompress the whole gzip stream (without keeping it) and say whether it ends properly."""
    decompressor = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            decompressor.decompress(chunk, 0)
            while decompressor.eof and decompressor.unused_data:  # concatenated gzip members
                rest = decompressor.unused_data
                decompressor = zlib.decompressobj(wbits=31)
                decompressor.decompress(rest, 0)
    return decompressor.eof


def _check_nifti_file(path: Path) -> None:
    """Two things ITK's NIfTI reader hides, checked with nibabel (a dependency of nnunetv2):

    * a truncated ``.nii``/``.nii.gz`` is read without complaint, the missing voxels coming back as zeros; so the
      bytes the header promises are compared with what is there. For gzip the trailer's ISIZE (uncompressed size
      mod 2**32) is a free check; only when it disagrees (truncation, or an unusual but valid file) is the stream
      decompressed to be sure;
    * NaN voxels of a floating-point NIfTI come back as 0; so float files (not the usual int16 CT) are scanned.
    """
    import nibabel

    try:
        proxy = nibabel.load(str(path)).dataobj
        stored = np.dtype(proxy.dtype)
        expected = int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * stored.itemsize
    except Exception:
        return  # nibabel cannot parse it: leave the verdict to ITK
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
        if isize == expected % (1 << 32):
            actual = expected
        elif not _gzip_stream_is_complete(path):
            raise InputError(path, "truncated file: the compressed data ends early")
        else:
            with gzip.open(path, "rb") as g:
                actual = g.seek(0, os.SEEK_END)
    else:
        actual = path.stat().st_size
    if actual < expected:
        raise InputError(path, f"truncated file: {actual} bytes of image data, the header needs {expected}")
    if stored.kind == "f":
        data = np.asarray(proxy.get_unscaled())
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            raise InputError(
                path, f"image has non-finite voxels ({n_nan} NaN, {int(data.size - finite.sum()) - n_nan} inf)"
            )


def _check_file(path: Path) -> None:
    """What can be told without ITK: the file is there, is not empty, and a NIfTI header has a spacing."""
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    if image_ending(path) in (".nii", ".nii.gz"):
        spacing = raw_nifti_spacing(path)
        if spacing is not None and not all(s > 0 for s in spacing):
            raise InputError(
                path,
                f"invalid voxel spacing: the NIfTI header's pixdim[1..3] is {tuple(float(s) for s in spacing)}; "
                "every spacing must be positive (ITK would silently use 1 mm)",
            )


def read_header(path: str | os.PathLike) -> Geometry:
    """The geometry of an image file from its header (no voxels read), checked by :func:`check_geometry`."""
    path = Path(path)
    _check_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(path, f"cannot read image: {_itk_reason(e)}") from None
    geometry = Geometry.of(reader)
    check_geometry(geometry, path)
    return geometry


def _read_image_file(path: Path) -> sitk.Image:
    _check_file(path)
    if image_ending(path) in (".nii", ".nii.gz"):
        _check_nifti_file(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(path, f"cannot read image: {_itk_reason(e)}") from None


def _read_dicom_series(case: Case) -> sitk.Image:
    folder = case.source
    for f in case.files:
        if not f.is_file() or f.stat().st_size == 0:
            raise InputError(folder, f"unreadable DICOM series: slice file {f.name} is missing or empty")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in case.files])
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the slice position check below
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise InputError(folder, f"unreadable DICOM series: {_itk_reason(e)}") from None
    _check_dicom_slice_positions(reader, image, folder)
    return image


def _check_dicom_slice_positions(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path) -> None:
    """ITK stacks the slices on a uniform grid whatever their positions (it only prints a warning), so a missing
    slice would silently shift everything after it. Refuse series whose slice steps are not uniform."""
    n = len(reader.GetFileNames())
    if n < 3 or image.GetDimension() != 3:
        return
    try:
        positions = np.array(
            [[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)], dtype=np.float64
        )
    except (RuntimeError, ValueError):
        return  # no ImagePositionPatient: nothing to check against
    if positions.shape != (n, 3):
        return
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    steps = np.diff(positions @ normal)
    typical = float(np.median(np.abs(steps)))
    # 10 % of a slice: far above scanner round-off, far below the 100 % jump of a missing slice.
    if typical <= 0 or np.max(np.abs(np.abs(steps) - typical)) > 0.1 * typical:
        raise InputError(
            folder,
            f"unreadable DICOM series: slice positions are not evenly spaced (steps {np.min(np.abs(steps)):.3g} to "
            f"{np.max(np.abs(steps)):.3g} mm); a slice is missing, duplicated or damaged",
        )


def _validate_image(image: sitk.Image, name: str | Path) -> None:
    check_geometry(Geometry.of(image), name)


def nnunet_properties(image: sitk.Image) -> dict[str, Any]:
    """The properties dict of ``SimpleITKIO.read_images`` for a 3-D image: the sitk geometry (x, y, z order) plus
    nnU-Net's spacing in array (z, y, x) order."""
    spacing = tuple(float(s) for s in image.GetSpacing())
    return {
        "sitk_stuff": {
            "spacing": spacing,
            "origin": tuple(float(o) for o in image.GetOrigin()),
            "direction": tuple(float(d) for d in image.GetDirection()),
        },
        "spacing": [abs(s) for s in spacing[::-1]],
    }


def _check_same_grid(images: Sequence[sitk.Image], files: Sequence[Path]) -> None:
    ref = images[0]
    for image, f in zip(images[1:], files[1:]):
        if image.GetSize() != ref.GetSize():
            raise InputError(f, f"channel size {image.GetSize()} differs from {files[0].name} {ref.GetSize()}")
        if not np.allclose(image.GetSpacing(), ref.GetSpacing(), rtol=1e-5, atol=1e-6):
            raise InputError(f, f"channel spacing {image.GetSpacing()} differs from {files[0].name} {ref.GetSpacing()}")
        if not (
            np.allclose(image.GetOrigin(), ref.GetOrigin(), atol=1e-3)
            and np.allclose(image.GetDirection(), ref.GetDirection(), atol=1e-5)
        ):
            # nnU-Net only warns here too: the voxel grids line up, the world placement may be a header quirk.
            warnings.warn(f"{f}: origin/direction differ from {files[0].name}; using those of channel 0", stacklevel=3)


def read_case(
    source: Case | sitk.Image | str | os.PathLike, name: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read and validate one case.

    ``source`` is a :class:`Case`, an image file path, or an in-memory ``sitk.Image`` (``name`` is then what
    error messages call it). Returns ``(data, properties)``: ``data`` is float32 of shape ``(channels, z, y, x)``;
    ``properties`` is exactly what ``SimpleITKIO.read_images`` returns::

        {'sitk_stuff': {'spacing': (sx, sy, sz), 'origin': (ox, oy, oz), 'direction': (9 floats)},
         'spacing': [sz, sy, sx]}

    Raises :class:`InputError` for 2-D, 4-D or vector images, empty, truncated or unreadable files, unreadable
    DICOM series, NaN or infinite voxels, and channels on different grids. Nothing is ever written.
    """
    if isinstance(source, sitk.Image):
        label = name or "<in-memory image>"
        images, labels = [source], [label]
    else:
        case = source if isinstance(source, Case) else _single_file_case(Path(source))
        if case.is_dicom:
            images, labels = [_read_dicom_series(case)], [case.source]
        else:
            images = [_read_image_file(f) for f in case.files]
            labels = list(case.files)

    for image, label in zip(images, labels):
        _validate_image(image, label)
    if len(images) > 1:
        _check_same_grid(images, labels)

    # One float32 buffer filled channel by channel: no int16 stack plus float copy of the whole case.
    data = np.empty((len(images), *sitk.GetArrayViewFromImage(images[0]).shape), dtype=np.float32)
    for channel, (image, label) in enumerate(zip(images, labels)):
        array = sitk.GetArrayViewFromImage(image)
        if array.dtype.kind in "fc":
            finite = np.isfinite(array)
            if not finite.all():
                n_nan = int(np.isnan(array).sum())
                raise InputError(
                    label, f"image has non-finite voxels ({n_nan} NaN, {int(array.size - finite.sum()) - n_nan} inf)"
                )
        data[channel] = array
    return data, nnunet_properties(images[0])


def _single_file_case(path: Path) -> Case:
    if path.is_dir():
        cases = find_cases(path)
        if len(cases) != 1:
            raise InputError(path, f"expected one case, found {len(cases)}")
        return cases[0]
    return find_cases(path)[0]


def read_label_map(path: str | os.PathLike) -> sitk.Image:
    """Read a label map file and check it is a 3-D scalar image of whole non-negative numbers."""
    path = Path(path)
    image = _read_image_file(path)
    _validate_image(image, path)
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and np.array_equal(array, np.round(array))):
        raise InputError(path, "label map has non-integer or non-finite values")
    if array.size and array.min() < 0:
        raise InputError(path, f"label map has negative labels (min {array.min()})")
    return image
