"""Finding the cases of an input: a folder of images, one image file, or DICOM series.

One list of image endings (:data:`IMAGE_ENDINGS`) and one naming rule (nnU-Net's ``<case>_XXXX.<ext>`` channel
files, or plain ``<case>.<ext>``) serve every command that reads scans or label maps: ``predict``, ``locate``,
``uncrop``, ``postprocess``, ``evaluate`` and ``profile`` all see the same cases. Hidden files, and so the
temporaries of :mod:`nnunet_samflare.io.writing`, are never cases.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from nnunet_samflare.errors import InputError

# Longest first: ".nii.gz" must win over ".nii" (and ".gz" alone is no image format).
IMAGE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".nrrd")
DICOM_OUTPUT_ENDING = ".nii.gz"

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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
