"""Writing outputs so that a killed or failed run never leaves a half-written file under a real name.

Every output is written to a hidden temporary name beside its target (:data:`TEMP_PREFIX`), flushed and renamed
into place (:func:`atomic_output`). :func:`check_output_folder` runs before any work: it refuses an output folder
that cannot be written or that is (inside) the input folder, so no prediction is wasted and no input is touched.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from nnunet_samflare.errors import InputError

# Temporaries start with a dot (hidden, skipped by every folder listing here) and a fixed tag, so that a resumed
# run can recognise and delete what a killed run left behind (see remove_stale_temporaries).
TEMP_PREFIX = ".samflare-tmp-"


def temporary_path(path: str | os.PathLike) -> Path:
    """A unique temporary name beside ``path`` that ends with ``path``'s own name, so its extension (which
    SimpleITK uses to pick the file format) is kept: ``out/.samflare-tmp-1a2b3c4d-case.nii.gz``."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


def _temporary_target(temporary: Path) -> str:
    """The output name a :func:`temporary_path` name stands for."""
    return temporary.name[len(TEMP_PREFIX) :].split("-", 1)[-1]


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is flushed to disk and renamed to ``path`` (atomic on
    one file system), on any error it is deleted and ``path`` is left as it was. The error raised is always the
    original one: a clean-up that fails too (e.g. in a folder that became unwritable) is only noted on it."""
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
    except BaseException as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError as cleanup_error:
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"(the temporary file {tmp} could not be removed either: {cleanup_error})")
        raise


def check_output_folder(folder: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Create ``folder`` if needed and make sure a file can be created in it, before any work.

    Refuses (:class:`InputError`) a folder that is an input folder or lies inside one, and the folder of an input
    file: outputs would land among the scans. Returns the folder.
    """
    folder = Path(folder)
    resolved = folder.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if source.is_file() and resolved == source.parent:
            raise InputError(folder, f"output folder is the folder of the input {source.name}; choose another one")
        if source.is_dir() and (resolved == source or source in resolved.parents):
            where = "the input folder" if resolved == source else f"inside the input folder {source}"
            raise InputError(folder, f"output folder is {where}; choose a folder outside it")
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "output folder is an existing file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(folder, f"output folder cannot be created ({e.strerror or e})") from None
    probe = temporary_path(folder / "write-test")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(folder, f"output folder cannot be written ({e.strerror or e})") from None
    return folder


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """``sitk.WriteImage`` to a temporary name beside ``path``, then rename it to ``path``."""
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def seg_to_image(seg: np.ndarray, properties: dict[str, Any]) -> sitk.Image:
    """A label map ``(z, y, x)`` as an in-memory ``sitk.Image`` with the geometry of ``properties['sitk_stuff']``.

    nnU-Net's ``SimpleITKIO.write_seg`` builds the same image but can only write it to a file; this is its
    in-memory twin for the Python API (same pixel type rule: uint8, uint16 from label 255 up). A test holds the
    two equal. Files are written by nnU-Net's writer itself (:func:`write_seg_atomic`).
    """
    if seg.ndim != 3:
        raise ValueError(f"segmentation must be 3-D (z, y, x), got shape {seg.shape}")
    geometry = properties["sitk_stuff"]
    if len(geometry["spacing"]) == 2:  # a 2-D case carried as (1, y, x), as in nnU-Net
        seg = seg[0]
    image = sitk.GetImageFromArray(seg.astype(np.uint8 if np.max(seg) < 255 else np.uint16, copy=False))
    image.SetSpacing(tuple(geometry["spacing"]))
    image.SetOrigin(tuple(geometry["origin"]))
    image.SetDirection(tuple(geometry["direction"]))
    return image


def write_seg_atomic(seg: np.ndarray, properties: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a ``(z, y, x)`` label map with the input's geometry (``properties`` as from ``read_case``) through
    nnU-Net's ``SimpleITKIO.write_seg``, atomically; the format follows ``path``'s ending."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    with atomic_output(path) as tmp:
        SimpleITKIO().write_seg(seg, str(tmp), properties)


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    """``json.dump`` to a temporary name beside ``path``, then rename it to ``path``."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, sort_keys=False)
            f.write("\n")


def remove_stale_temporaries(folder: str | os.PathLike, targets: Collection[str] | None = None) -> list[Path]:
    """Delete the temporaries a killed run left in ``folder`` (names starting with :data:`TEMP_PREFIX`) and
    return them: all of them, or only those of the output names in ``targets``. Call it before resuming, never
    while another run writes the same outputs; runs that share the folder but not their outputs (the parts of
    one prediction) each give their own ``targets``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(
        p
        for p in folder.iterdir()
        if p.name.startswith(TEMP_PREFIX) and p.is_file() and (targets is None or _temporary_target(p) in targets)
    )
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
