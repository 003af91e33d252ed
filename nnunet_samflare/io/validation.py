"""The checks that decide "bad input" for an image's geometry, and whether the grids made from it fit in memory.

Both work on a :class:`Geometry`, which comes from a file header (no voxels read) or an image in memory, so a
scan is refused with the numbers before anything large is allocated. The pipeline-specific part (which grids a
command will create) is described by the caller as a list of :class:`Grid`; :func:`check_grids_fit` compares
their peak with the memory there is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_samflare.errors import InputError

#: Voxel spacings outside this range (mm) are not a CT scan (0.01 mm: micro-CT; 50 mm: five times a coarse
#: scout's slice). A header that says 0 is refused too: ITK would silently read it as 1 mm.
PLAUSIBLE_SPACING_MM: tuple[float, float] = (0.01, 50.0)
#: Environment variable that caps the memory the grid check allows (GiB), e.g. to leave room for other jobs.
MEMORY_LIMIT_ENV = "SAMFLARE_MAX_MEMORY_GB"
GIB = 1024**3


@dataclass(frozen=True)
class Geometry:
    """What the header says: size, spacing, origin and direction in SimpleITK (x, y, z) order."""

    dimension: int
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1
    pixel_type: str = ""

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """From an image or from an ``ImageFileReader`` after ``ReadImageInformation`` (no voxels read)."""
        if isinstance(image, sitk.ImageFileReader):
            components = image.GetNumberOfComponents()
            pixel_type = sitk.GetPixelIDValueAsString(image.GetPixelID())
        else:
            components = image.GetNumberOfComponentsPerPixel()
            pixel_type = image.GetPixelIDTypeAsString()
        return cls(
            dimension=image.GetDimension(),
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
            components=int(components),
            pixel_type=pixel_type,
        )

    @property
    def shape_zyx(self) -> tuple[int, ...]:
        return self.size[::-1]

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        return self.spacing[::-1]


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def check_geometry(geometry: Geometry, name: str | os.PathLike) -> None:
    """Refuse what is not a plausible scalar 3-D scan: 2-D/4-D, vector voxels, an empty grid, a missing, zero,
    non-finite or implausible voxel spacing, and a direction matrix that is not a rotation (or reflection)."""
    size = geometry.size
    if geometry.dimension == 2:
        raise InputError(name, f"2-D image (size {size}); a 3-D CT volume is needed")
    if geometry.dimension != 3:
        raise InputError(name, f"{geometry.dimension}-D image (size {size}); a 3-D CT volume is needed")
    if geometry.components != 1:
        raise InputError(
            name,
            f"vector image with {geometry.components} components per voxel ({geometry.pixel_type}); a scalar 3-D "
            "CT volume is needed",
        )
    if min(size) < 1:
        raise InputError(name, f"empty image (size {size})")
    spacing = geometry.spacing
    if not all(math.isfinite(s) for s in spacing) or min(spacing) <= 0:
        raise InputError(name, f"invalid voxel spacing {_fmt(spacing)} mm: every spacing must be positive")
    low, high = PLAUSIBLE_SPACING_MM
    if min(spacing) < low or max(spacing) > high:
        raise InputError(
            name,
            f"implausible voxel spacing {_fmt(spacing)} mm (x, y, z) for a CT scan: expected {low:g} to {high:g} mm",
        )
    if not all(math.isfinite(o) for o in geometry.origin):
        raise InputError(name, f"invalid origin {_fmt(geometry.origin)}")
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise InputError(name, f"invalid direction matrix {_fmt(geometry.direction)}: not a rotation or reflection")


# ----------------------------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class Grid:
    """An array the pipeline will create: ``shape`` voxels of ``bytes_per_voxel`` (all channels together)."""

    name: str
    shape: tuple[int, ...]
    bytes_per_voxel: float
    spacing: tuple[float, ...] | None = None  # mm, for the message

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape) * self.bytes_per_voxel)

    def describe(self) -> str:
        at = f" at {_fmt(self.spacing)} mm" if self.spacing is not None else ""
        return f"{self.name} {'x'.join(str(s) for s in self.shape)}{at}: {self.nbytes / GIB:.3g} GiB"


def memory_limit_bytes() -> int:
    """The memory a case may use: what the system has available now, or ``$SAMFLARE_MAX_MEMORY_GB`` if smaller."""
    import psutil

    limit = int(psutil.virtual_memory().available)
    value = os.environ.get(MEMORY_LIMIT_ENV)
    if value:
        try:
            limit = min(limit, int(float(value) * GIB))
        except ValueError:
            raise InputError(None, f"{MEMORY_LIMIT_ENV}={value!r} is not a number of GiB") from None
    return limit


def check_grids_fit(
    resident: Sequence[Grid], stages: Sequence[Sequence[Grid]], name: str | os.PathLike, limit: int | None = None
) -> None:
    """Refuse, with the numbers, a case whose ``resident`` grids (alive all along, e.g. the input) plus its
    largest stage (the grids alive together during one step) exceed ``limit`` bytes (default:
    :func:`memory_limit_bytes`)."""
    limit = memory_limit_bytes() if limit is None else limit
    base = sum(g.nbytes for g in resident)
    worst = max(stages, key=lambda stage: sum(g.nbytes for g in stage), default=())
    peak = base + sum(g.nbytes for g in worst)
    if peak <= limit:
        return
    parts = "; ".join(g.describe() for g in (*resident, *worst))
    raise InputError(
        name,
        f"too large to process: would need about {peak / GIB:.3g} GiB ({parts}), more than the "
        f"{limit / GIB:.3g} GiB available (${MEMORY_LIMIT_ENV} or free RAM); check the voxel spacing and size",
    )


def raw_nifti_spacing(path: Path) -> tuple[float, ...] | None:
    """pixdim[1..3] exactly as stored in a NIfTI-1/2 header (ITK and nibabel both turn 0 into 1 when reading),
    or None if the file is not a NIfTI header they could parse."""
    import gzip
    import struct

    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError):
        return None
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            return struct.unpack(endian + "3f", head[80:92])
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            return struct.unpack(endian + "3d", head[112:136])
    return None
