"""nnU-Net's class-probability files, read and written one class channel at a time.

``--save_probabilities`` (stock ``nnUNetv2_predict`` and ``samflare predict``) writes ``<case>.npz`` holding one
array ``probabilities`` of shape ``(classes, z, y, x)`` in the image's own voxel grid, and ``<case>.pkl`` with the
properties nnU-Net read the image with (``sitk_stuff``: spacing, origin, direction). At FLARE's 512×512×215 with 15
classes one such array is 3.4 GB of float32, so nothing here loads a whole one: :class:`ProbabilityReader`
decompresses the ``.npy`` member of the zip stream channel by channel, and :func:`write_probabilities` writes one
the same way. Written files have fixed zip timestamps, so the same probabilities give the same bytes.
"""

from __future__ import annotations

import os
import pickle
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from nnunet_samflare.errors import InputError
from nnunet_samflare.io import atomic_output

PROBABILITIES_KEY = "probabilities"
_MEMBER = PROBABILITIES_KEY + ".npy"
#: zlib level of the files written here: level 1 is several times faster than numpy's default (6) and the
#: probabilities (mostly exact 0 and 1 outside the organs) compress almost as well.
COMPRESS_LEVEL = 1
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class ProbabilityReader:
    """One ``<case>.npz`` of class probabilities: its shape from the header, its channels one at a time.

    ``shape`` is ``(classes, z, y, x)``. :meth:`channels` yields each class as a float32 ``(z, y, x)`` array; only
    one channel is in memory at a time (arrays stored in Fortran order, which nnU-Net does not write, are loaded
    whole instead).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "no such file")
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = archive.namelist()
                if _MEMBER not in names:
                    raise InputError(
                        self.path,
                        f"no '{PROBABILITIES_KEY}' array (found {', '.join(names) or 'nothing'}); expected "
                        "nnU-Net's --save_probabilities output",
                    )
                with archive.open(_MEMBER) as stream:
                    self.shape, self.fortran_order, self.dtype = _read_npy_header(stream)
        except InputError:
            raise
        except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as e:
            raise InputError(self.path, f"cannot read probabilities ({' '.join(str(e).split())})") from None
        if len(self.shape) != 4 or self.dtype.kind != "f":
            raise InputError(
                self.path, f"probabilities must be a float (classes, z, y, x) array, found {self.dtype} {self.shape}"
            )

    @property
    def num_classes(self) -> int:
        return int(self.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.shape[1:])

    def channels(self) -> Iterator[np.ndarray]:
        """Each class channel in order, as float32 ``(z, y, x)``."""
        if self.fortran_order:
            array = np.load(self.path)[PROBABILITIES_KEY]
            for channel in array:
                yield np.ascontiguousarray(channel, dtype=np.float32)
            return
        count = int(np.prod(self.spatial_shape, dtype=np.int64))
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(_MEMBER) as stream:
                _read_npy_header(stream)
                for _ in range(self.num_classes):
                    channel = np.empty(count, dtype=self.dtype)
                    _read_exactly(stream, channel, self.path)
                    yield channel.reshape(self.spatial_shape).astype(np.float32, copy=False)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            # zlib.error: a corrupt deflate stream that the zip's CRC check did not reach first
            raise InputError(self.path, f"cannot read probabilities ({' '.join(str(e).split())})") from None


def _read_npy_header(stream: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy format version {version}")


def _read_exactly(stream: BinaryIO, out: np.ndarray, path: Path) -> None:
    view = memoryview(out).cast("B")
    filled = 0
    while filled < len(view):
        n = stream.readinto(view[filled:])
        if not n:
            raise InputError(path, "truncated probabilities: the file ends early")
        filled += n


def write_probabilities(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    channels: Iterable[np.ndarray],
    dtype: npt.DTypeLike = np.float32,
    compress_level: int = COMPRESS_LEVEL,
) -> Path:
    """Write ``<case>.npz`` as nnU-Net does (one ``probabilities`` array, ``np.load`` reads it), from ``channels``
    given one at a time; atomically, with fixed zip timestamps. Returns the path."""
    path = Path(path)
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    info = zipfile.ZipInfo(_MEMBER, date_time=_FIXED_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info._compresslevel = compress_level  # ZipInfo has no public setter; ZipFile.open(mode="w") reads it
    written = 0
    with atomic_output(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compress_level) as archive:
            with archive.open(info, "w", force_zip64=True) as stream:
                np.lib.format.write_array_header_1_0(stream, header)
                for channel in channels:
                    channel = np.ascontiguousarray(channel, dtype=dtype)
                    if channel.shape != tuple(shape[1:]):
                        raise ValueError(f"channel of shape {channel.shape} does not fit {tuple(shape)}")
                    stream.write(memoryview(channel).cast("B"))
                    written += 1
        if written != shape[0]:
            raise ValueError(f"{written} channels written, {shape[0]} expected")
    return path


def read_properties(path: str | os.PathLike) -> dict[str, Any]:
    """The ``<case>.pkl`` nnU-Net writes beside ``<case>.npz``: a dict with ``sitk_stuff`` (spacing, origin,
    direction in SimpleITK order) and ``spacing``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "missing (nnU-Net writes <case>.pkl beside <case>.npz with --save_probabilities)")
    try:
        with open(path, "rb") as f:
            properties = pickle.load(f)
    except Exception as e:  # a damaged pickle can raise almost anything
        raise InputError(path, f"cannot read properties ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(properties, dict) or not isinstance(properties.get("sitk_stuff"), dict):
        raise InputError(path, "not nnU-Net's properties (a dict with 'sitk_stuff') ")
    return properties


def same_geometry(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """None if two properties dicts describe the same image grid, else what differs (for a message)."""
    for key, tolerance in (("spacing", 1e-5), ("origin", 1e-3), ("direction", 1e-5)):
        first, second = a["sitk_stuff"].get(key), b["sitk_stuff"].get(key)
        if (
            first is None
            or second is None
            or len(first) != len(second)
            or not np.allclose(first, second, atol=tolerance, rtol=0)
        ):
            return (
                f"{key} {tuple(np.round(second, 4)) if second is not None else None} vs "
                f"{tuple(np.round(first, 4)) if first is not None else None}"
            )
    return None
