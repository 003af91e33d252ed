"""Reading, validating and atomically writing the scans and label maps of the cascade.

Inputs are found with :func:`find_cases` (a folder of images, one image file, or DICOM series) and read with
:func:`read_case` into nnU-Net's own layout: a float32 ``(c, z, y, x)`` array plus the properties dict that
``nnunetv2.imageio.simpleitk_reader_writer.SimpleITKIO.read_images`` returns, so both can go straight into
``nnUNetPredictor`` and back out through ``SimpleITKIO.write_seg`` (or :func:`write_seg_atomic`).

Every problem with an input is raised as :class:`InputError`, whose message is one line naming the file and the
cause; the ``samflare`` CLI prints it and exits with status 2. Outputs are written to a temporary name in the
target folder and renamed into place, so a killed run never leaves a half-written file under a real name.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import uuid
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

# Longest first: ".nii.gz" must win over ".nii" (and ".gz" alone is no image format).
IMAGE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".nrrd")
DICOM_OUTPUT_ENDING = ".nii.gz"
# Temporaries start with a dot (hidden, skipped by every folder listing here) and a fixed tag, so that a resumed
# run can recognise and delete what a killed run left behind (see remove_stale_temporaries).
TEMP_PREFIX = ".samflare-tmp-"

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class InputError(ValueError):
    """A bad input file or folder. The message is one line: ``<file>: <cause>``."""

    def __init__(self, path: str | os.PathLike | None, cause: str):
        self.path = None if path is None else str(path)
        self.cause = " ".join(str(cause).split())  # one line, whatever the cause text looked like
        super().__init__(self.cause if self.path is None else f"{self.path}: {self.cause}")

    def __reduce__(self):  # picklable across worker processes despite the two-argument constructor
        return type(self), (self.path, self.cause)


@dataclass(frozen=True)
class Case:
    """One scan to predict.

    ``files`` are the channel files ``_0000.._000N-1`` in channel order (one file for plain naming), or for a
    DICOM case the slice files of one series in the order GDCM sorts them. ``channels`` holds the channel index
    of each file (``(0,)`` for plain naming and DICOM), so that :func:`check_num_channels` can spot gaps.
    """

    case_id: str
    files: tuple[Path, ...]
    output_name: str
    is_dicom: bool = False
    dicom_series_uid: str | None = None
    channels: tuple[int, ...] = (0,)

    @property
    def source(self) -> Path:
        """What to name in messages: the image file, or the DICOM series folder."""
        return self.files[0].parent if self.is_dicom else self.files[0]


def image_ending(path: str | os.PathLike) -> str | None:
    """The supported image ending of ``path`` (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``), or None."""
    name = Path(path).name.lower()
    for ending in IMAGE_ENDINGS:
        if name.endswith(ending) and len(name) > len(ending):
            return ending
    return None


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder`` (supported endings), sorted, skipping hidden files and temporaries."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and image_ending(p) is not None
    )


def strip_image_ending(path: str | os.PathLike) -> str:
    """The file name without its image ending (``case.nii.gz`` -> ``case``); the plain name for other files."""
    path = Path(path)
    ending = image_ending(path)
    return path.name[: len(path.name) - len(ending)] if ending else path.name


def _cases_from_image_files(files: Sequence[Path]) -> list[Case]:
    """Group files into cases with nnU-Net's rule: ``<case>_0000.<ext>`` opens a case and every
    ``<case>_XXXX.<ext>`` with the same ending is one of its channels; any other file is a single-channel case
    named by its whole stem (``_0000`` is never part of a case id, so outputs are ``<case>.<ext>``)."""
    by_key: dict[tuple[str, str], dict[int, Path]] = {}
    for f in files:
        m = _CHANNEL_SUFFIX.match(strip_image_ending(f))
        if m is not None:
            by_key.setdefault((m["case"], image_ending(f)), {})[int(m["channel"])] = f

    claimed: set[Path] = set()
    cases: list[Case] = []
    for (case_id, ending), channels in by_key.items():
        if 0 not in channels:
            continue  # e.g. "liver_0007.nii.gz" with no "_0000" sibling: a plain name, handled below
        order = sorted(channels)
        claimed.update(channels.values())
        cases.append(
            Case(
                case_id=case_id,
                files=tuple(channels[c] for c in order),
                output_name=case_id + ending,
                channels=tuple(order),
            )
        )
    for f in files:
        if f not in claimed:
            case_id = strip_image_ending(f)
            cases.append(Case(case_id=case_id, files=(f,), output_name=case_id + image_ending(f)))
    return cases


def _dicom_series_uids(folder: Path) -> list[str]:
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return []


def _dicom_series_number(first_file: Path) -> str | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(first_file))
    try:
        reader.ReadImageInformation()
        number = reader.GetMetaData("0020|0011").strip() if reader.HasMetaDataKey("0020|0011") else ""
    except RuntimeError:
        return None
    return number or None


def _cases_from_dicom_folder(folder: Path, uids: Sequence[str]) -> list[Case]:
    """One case per series. A lone series is named after its folder; several are told apart by their
    SeriesNumber tag (falling back to their position) so that the names are stable and readable."""
    cases: list[Case] = []
    used: set[str] = set()
    for index, uid in enumerate(sorted(uids)):
        files = tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        if not files:
            raise InputError(folder, f"unreadable DICOM series {uid}: no slice files")
        case_id = folder.name
        if len(uids) > 1:
            number = _dicom_series_number(files[0])
            case_id = f"{folder.name}_series{number if number is not None else index}"
            if case_id in used:
                case_id = f"{case_id}_{index}"
        used.add(case_id)
        cases.append(
            Case(
                case_id=case_id,
                files=files,
                output_name=case_id + DICOM_OUTPUT_ENDING,
                is_dicom=True,
                dicom_series_uid=uid,
            )
        )
    _check_no_orphan_dicom_files(folder, {f.resolve() for case in cases for f in case.files})
    return cases


def _looks_like_dicom(path: Path) -> bool:
    """Part 10 DICOM files carry "DICM" after a 128-byte preamble; a truncated slice usually still does."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _check_no_orphan_dicom_files(folder: Path, in_series: set[Path]) -> None:
    """GDCM silently leaves out slice files it cannot parse, and the series reader then builds a volume with a
    slice missing. A DICOM file in the folder that belongs to no series is therefore an error, not a detail."""
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.upper() == "DICOMDIR" or f.resolve() in in_series:
            continue
        if f.suffix.lower() == ".dcm" or _looks_like_dicom(f):
            raise InputError(folder, f"unreadable DICOM: file {f.name} is damaged or belongs to no readable series")


def find_cases(input_path: str | os.PathLike) -> list[Case]:
    """The cases in ``input_path``, sorted by case id.

    * a folder with image files (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``): nnU-Net naming
      ``<case>_0000.<ext>`` (channels ``_0001``.. grouped in) or plain ``<case>.<ext>``;
    * a single image file;
    * a folder holding DICOM series (found by GDCM, one case per series), or a folder whose sub-folders each
      hold DICOM series (one level down) — used only when the folder has no image files.

    Output names keep the input's own ending; DICOM cases are written as ``<case>.nii.gz``.
    """
    path = Path(input_path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_file():
        if image_ending(path) is None:
            if path.suffix.lower() == ".dcm":
                raise InputError(path, "a single DICOM file is not a volume; pass the folder holding its series")
            raise InputError(path, f"unsupported file type (expected one of {', '.join(IMAGE_ENDINGS)} or DICOM)")
        return _cases_from_image_files([path])

    files = list_image_files(path)
    if files:
        cases = _cases_from_image_files(files)
    else:
        cases = []
        uids = _dicom_series_uids(path)
        if uids:
            cases = _cases_from_dicom_folder(path, uids)
        else:
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                sub_uids = _dicom_series_uids(sub)
                if sub_uids:
                    cases.extend(_cases_from_dicom_folder(sub, sub_uids))
        if not cases:
            has_files = any(p.is_file() and not p.name.startswith(".") for p in path.iterdir())
            raise InputError(
                path,
                "unreadable DICOM folder: no DICOM series found in its files"
                if has_files
                else f"no images found (expected {', '.join(IMAGE_ENDINGS)} files or a DICOM series)",
            )

    seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in seen:
            raise InputError(
                case.source, f"case id '{case.case_id}' also used by {seen[case.case_id].source.name}; rename one"
            )
        seen[case.case_id] = case
    return sorted(cases, key=lambda c: c.case_id)


def check_num_channels(case: Case, expected: int) -> None:
    """Raise InputError unless ``case`` has exactly the channel files ``_0000.._{expected-1:04d}``."""
    if tuple(case.channels) == tuple(range(expected)):
        return
    wanted = "_0000" if expected == 1 else f"_0000.._{expected - 1:04d}"
    found = ", ".join(f"_{c:04d}" for c in case.channels)
    raise InputError(
        case.source,
        f"wrong number of channels: the model expects {expected} channel file(s) ({wanted}) for case "
        f"'{case.case_id}', found {len(case.channels)} ({found})",
    )


# ----------------------------------------------------------------------------------------------------------------
# Reading


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


def _read_image_file(path: Path) -> sitk.Image:
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
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
    dim = image.GetDimension()
    if dim == 2:
        raise InputError(name, f"2-D image (size {image.GetSize()}); a 3-D CT volume is needed")
    if dim != 3:
        raise InputError(name, f"{dim}-D image (size {image.GetSize()}); a 3-D CT volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            name,
            f"vector image with {image.GetNumberOfComponentsPerPixel()} components per voxel "
            f"({image.GetPixelIDTypeAsString()}); a scalar 3-D CT volume is needed",
        )
    if min(image.GetSize()) < 1:
        raise InputError(name, f"empty image (size {image.GetSize()})")
    if not all(np.isfinite(image.GetSpacing())) or min(image.GetSpacing()) <= 0:
        raise InputError(name, f"invalid voxel spacing {image.GetSpacing()}")


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


# ----------------------------------------------------------------------------------------------------------------
# Atomic writing


def temporary_path(path: str | os.PathLike) -> Path:
    """A unique temporary name beside ``path`` that ends with ``path``'s own name, so its extension (which
    SimpleITK uses to pick the file format) is kept: ``out/.samflare-tmp-1a2b3c4d-case.nii.gz``."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is flushed to disk and renamed to ``path`` (atomic on
    one file system), on any error it is deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise RuntimeError(f"{tmp}: nothing was written")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not become visible before the data is on disk
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """``sitk.WriteImage`` to a temporary name beside ``path``, then rename it to ``path``."""
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def seg_to_image(seg: np.ndarray, properties: dict[str, Any]) -> sitk.Image:
    """A label map ``(z, y, x)`` as a ``sitk.Image`` with the geometry of ``properties['sitk_stuff']``; pixel
    type uint8 (uint16 from label 255 up), as nnU-Net's ``SimpleITKIO.write_seg`` does."""
    if seg.ndim != 3:
        raise ValueError(f"segmentation must be 3-D (z, y, x), got shape {seg.shape}")
    geometry = properties["sitk_stuff"]
    if len(geometry["spacing"]) == 2:  # a 2-D case carried as (1, y, x), as in nnU-Net
        seg = seg[0]
    dtype = np.uint8 if seg.size == 0 or seg.max() < 255 else np.uint16
    image = sitk.GetImageFromArray(seg.astype(dtype, copy=False))
    image.SetSpacing(tuple(geometry["spacing"]))
    image.SetOrigin(tuple(geometry["origin"]))
    image.SetDirection(tuple(geometry["direction"]))
    return image


def write_seg_atomic(seg: np.ndarray, properties: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a ``(z, y, x)`` label map with the input's geometry (``properties`` from :func:`read_case`),
    atomically; the format follows ``path``'s ending."""
    write_image_atomic(seg_to_image(seg, properties), path)


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    """``json.dump`` to a temporary name beside ``path``, then rename it to ``path``."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, sort_keys=False)
            f.write("\n")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries a killed run left in ``folder`` (names starting with :data:`TEMP_PREFIX`) and
    return them. Call it before resuming, never while another run writes to the same folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX) and p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
