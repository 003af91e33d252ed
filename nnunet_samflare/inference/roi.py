"""Region-of-interest helpers of the cascade (docs/method.md §5.3, §5.7): clean the locator's mask, box it, add a
margin in millimetres, crop, and paste the segmenter's ROI result back into the full image.

Boxes follow acvl_utils / nnU-Net: one ``[lo, hi)`` pair (half open, python slicing) per spatial axis, in
array order (z, y, x). Arrays may carry leading non-spatial axes (``(c, z, y, x)``); a box always refers to the
trailing axes.

``samflare locate`` writes an ROI record per case (:func:`make_roi_record`) so that ``samflare uncrop`` can put
a prediction made on the cropped image back into the original geometry, also after stock ``nnUNetv2_predict``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import SimpleITK as sitk
from acvl_utils.cropping_and_padding.bounding_boxes import (
    bounding_box_to_slice,
    get_bbox_from_mask,
    insert_crop_into_image,
    pad_bbox,
)

from nnunet_samflare.inference.io import InputError, write_json_atomic

Box = list[list[int]]

# docs/method.md §11.7: the reference drops locator components under 8,000 voxels on its 1.5 x 1.5 x 2 mm grid
# (4.5 mm^3 per voxel). Kept as a physical volume so that the rule means the same on any grid.
MIN_LOCATOR_COMPONENT_MM3 = 36_000.0

ROI_RECORD_FORMAT = "samflare-roi"
ROI_RECORD_VERSION = 1
_RECORD_KEYS = {"format", "version", "box_zyx", "shape_zyx", "size_xyz", "spacing_xyz", "origin_xyz", "direction"}


def remove_small_components(
    mask: np.ndarray,
    spacing_zyx: Sequence[float],
    min_volume_mm3: float = MIN_LOCATOR_COMPONENT_MM3,
    connectivity: int = 6,
) -> np.ndarray:
    """Boolean copy of ``mask`` without the connected components whose volume is below ``min_volume_mm3``.

    The volume is voxel count times the voxel volume from ``spacing_zyx``, so the same physical object survives
    or not whatever the grid. A component of exactly the threshold volume is kept (the reference removes
    "fewer than 8,000 voxels"). ``connectivity`` is 6 (faces, as the reference), 18 or 26.
    """
    if mask.ndim != 3 or len(spacing_zyx) != 3:
        raise ValueError(f"need a 3-D mask and 3 spacings, got shape {mask.shape} and spacing {spacing_zyx}")
    voxel_mm3 = float(np.prod(np.asarray(spacing_zyx, dtype=np.float64)))
    if voxel_mm3 <= 0:
        raise ValueError(f"spacing must be positive, got {spacing_zyx}")
    # Minimum whole number of voxels whose volume reaches the threshold; the small relative slack keeps a
    # component of exactly the threshold volume from being lost to float rounding (36000 / 4.5 = 8000).
    min_voxels = math.ceil(min_volume_mm3 / voxel_mm3 * (1 - 1e-9))
    binary = np.ascontiguousarray(mask, dtype=bool)
    if min_voxels <= 1:
        return binary.copy()
    # uint8, not bool: cc3d 4.x mislabels some thin boolean volumes (see postprocessing._as_uint8).
    kept = cc3d.dust(binary.view(np.uint8), threshold=min_voxels, connectivity=connectivity, in_place=False)
    return kept.astype(bool, copy=False)


def bounding_box(mask: np.ndarray) -> Box | None:
    """Tight ``[lo, hi)`` box of the nonzero voxels of ``mask`` per axis, or None if the mask is empty."""
    if not np.any(mask):
        return None
    if mask.ndim == 3:
        box = get_bbox_from_mask(mask)  # acvl_utils: scans slabs, cheap for the large masks of a locator
    else:
        nonzero = np.nonzero(mask)
        box = [[idx.min(), idx.max() + 1] for idx in nonzero]
    return [[int(lo), int(hi)] for lo, hi in box]


def expand_box_mm(
    box: Sequence[Sequence[int]],
    spacing_zyx: Sequence[float],
    margin_mm: float | Sequence[float],
    shape: Sequence[int],
) -> Box:
    """Grow ``box`` by ``margin_mm`` on both sides of every axis, clipped to an image of spatial ``shape``.

    The margin is converted to voxels per axis with that axis' spacing and rounded up, so the box grows by at
    least ``margin_mm`` wherever the image allows. ``margin_mm`` is one value or one per axis (z, y, x).
    """
    n = len(box)
    margins = [float(margin_mm)] * n if np.isscalar(margin_mm) else [float(m) for m in margin_mm]
    if len(margins) != n or len(spacing_zyx) != n or len(shape) != n:
        raise ValueError(f"box {box}, spacing {spacing_zyx}, margin {margin_mm} and shape {shape} disagree in length")
    if any(m < 0 for m in margins):
        raise ValueError(f"margin must be >= 0 mm, got {margin_mm}")
    pad_voxels = [math.ceil(m / float(s) * (1 - 1e-9)) for m, s in zip(margins, spacing_zyx)]
    padded = pad_bbox([[int(lo), int(hi)] for lo, hi in box], pad_voxels, tuple(int(s) for s in shape))
    return [[int(lo), int(hi)] for lo, hi in padded]


def _check_box(box: Sequence[Sequence[int]], spatial_shape: Sequence[int]) -> None:
    if len(box) != len(spatial_shape):
        raise ValueError(f"box {box} has {len(box)} axes, the array's trailing shape is {tuple(spatial_shape)}")
    for (lo, hi), size in zip(box, spatial_shape):
        if not 0 <= lo < hi <= size:
            raise ValueError(f"box {box} is empty or outside an image of shape {tuple(spatial_shape)}")


def crop_to_roi(array: np.ndarray, box: Sequence[Sequence[int]]) -> np.ndarray:
    """``array[..., z0:z1, y0:y1, x0:x1]`` for a ``(z, y, x)`` or ``(c, z, y, x)`` array (a view, no copy)."""
    _check_box(box, array.shape[-len(box) :])
    return array[(Ellipsis, *bounding_box_to_slice([list(b) for b in box]))]


def paste_roi(
    roi_array: np.ndarray, box: Sequence[Sequence[int]], full_shape: Sequence[int], fill: float = 0
) -> np.ndarray:
    """Inverse of :func:`crop_to_roi`: a new array of ``full_shape`` filled with ``fill``, with ``roi_array``
    placed at ``box``. ``full_shape`` is either the whole shape or only the spatial one (leading axes such as
    channels are then taken from ``roi_array``)."""
    full_shape = tuple(int(s) for s in full_shape)
    if len(full_shape) == len(box) and roi_array.ndim > len(box):
        full_shape = roi_array.shape[: roi_array.ndim - len(box)] + full_shape
    if len(full_shape) != roi_array.ndim:
        raise ValueError(f"full_shape {full_shape} does not fit an ROI array of shape {roi_array.shape}")
    _check_box(box, full_shape[-len(box) :])
    box_shape = tuple(hi - lo for lo, hi in box)
    if roi_array.shape[-len(box) :] != box_shape:
        raise ValueError(f"ROI array shape {roi_array.shape} does not match box {box} (size {box_shape})")
    full = np.full(full_shape, fill, dtype=roi_array.dtype)
    return insert_crop_into_image(full, roi_array, [list(b) for b in box])


# ----------------------------------------------------------------------------------------------------------------
# ROI record: box plus the original geometry, for `samflare locate` -> nnUNetv2_predict -> `samflare uncrop`


def make_roi_record(
    box: Sequence[Sequence[int]] | None,
    shape_zyx: Sequence[int],
    spacing_xyz: Sequence[float],
    origin_xyz: Sequence[float],
    direction: Sequence[float],
    **extra: Any,
) -> dict[str, Any]:
    """A JSON-serialisable record of one case's ROI.

    ``box`` is the ``[lo, hi)`` box in array order (z, y, x), or None when the locator found nothing. The original
    geometry is stored in SimpleITK's (x, y, z) order, as in nnU-Net's ``properties['sitk_stuff']``::

        {"format": "samflare-roi", "version": 1, "box_zyx": [[z0, z1], [y0, y1], [x0, x1]] | null,
         "shape_zyx": [..], "size_xyz": [..], "spacing_xyz": [..], "origin_xyz": [..], "direction": [9 floats],
         ...extra}
    """
    shape_zyx = [int(s) for s in shape_zyx]
    if box is not None:
        box = [[int(lo), int(hi)] for lo, hi in box]
        _check_box(box, shape_zyx)
    direction = [float(d) for d in direction]
    if len(shape_zyx) != 3 or len(spacing_xyz) != 3 or len(origin_xyz) != 3 or len(direction) != 9:
        raise ValueError("an ROI record needs 3-D geometry (3 sizes, spacings, origins and 9 direction values)")
    return {
        "format": ROI_RECORD_FORMAT,
        "version": ROI_RECORD_VERSION,
        "box_zyx": box,
        "shape_zyx": shape_zyx,
        "size_xyz": shape_zyx[::-1],
        "spacing_xyz": [float(s) for s in spacing_xyz],
        "origin_xyz": [float(o) for o in origin_xyz],
        "direction": direction,
        **extra,
    }


def roi_record_from_image(box: Sequence[Sequence[int]] | None, image: sitk.Image, **extra: Any) -> dict[str, Any]:
    """:func:`make_roi_record` with the geometry of ``image`` (the original, uncropped scan)."""
    return make_roi_record(
        box, image.GetSize()[::-1], image.GetSpacing(), image.GetOrigin(), image.GetDirection(), **extra
    )


def roi_record_from_properties(
    box: Sequence[Sequence[int]] | None, shape_zyx: Sequence[int], properties: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """:func:`make_roi_record` from nnU-Net properties (as returned by ``read_case``) and the array shape."""
    geometry = properties["sitk_stuff"]
    return make_roi_record(box, shape_zyx, geometry["spacing"], geometry["origin"], geometry["direction"], **extra)


def properties_from_roi_record(record: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net properties (``SimpleITKIO`` format) of the original image, e.g. for ``write_seg_atomic`` of the
    pasted-back label map."""
    spacing = tuple(float(s) for s in record["spacing_xyz"])
    return {
        "sitk_stuff": {
            "spacing": spacing,
            "origin": tuple(float(o) for o in record["origin_xyz"]),
            "direction": tuple(float(d) for d in record["direction"]),
        },
        "spacing": [abs(s) for s in spacing[::-1]],
    }


def save_roi_record(record: dict[str, Any], path: str | os.PathLike) -> None:
    """Write an ROI record as JSON, atomically."""
    write_json_atomic(record, path)


def load_roi_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check an ROI record written by :func:`save_roi_record`."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot read ROI record: {e}") from None
    if not isinstance(record, dict) or record.get("format") != ROI_RECORD_FORMAT:
        raise InputError(path, 'not a samflare ROI record (missing "format": "samflare-roi")')
    if record.get("version") != ROI_RECORD_VERSION:
        raise InputError(path, f"unsupported ROI record version {record.get('version')}")
    try:
        return make_roi_record(
            record["box_zyx"],
            record["shape_zyx"],
            record["spacing_xyz"],
            record["origin_xyz"],
            record["direction"],
            **{k: v for k, v in record.items() if k not in _RECORD_KEYS},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(path, f"invalid ROI record: {e}") from None


def crop_image(image: sitk.Image, box: Sequence[Sequence[int]]) -> sitk.Image:
    """Crop a ``sitk.Image`` to a (z, y, x) box; the result keeps its place in the world (origin moved to the
    box corner, spacing and direction unchanged), so nnU-Net reads it like any other scan."""
    size_xyz = image.GetSize()
    _check_box(box, size_xyz[::-1])
    index_xyz = [int(lo) for lo, _ in box][::-1]
    extent_xyz = [int(hi - lo) for lo, hi in box][::-1]
    return sitk.RegionOfInterest(image, extent_xyz, index_xyz)


def paste_into_original(roi_seg: np.ndarray | None, record: dict[str, Any]) -> np.ndarray:
    """A label map predicted on the cropped image, pasted into a zero volume of the original shape (all
    background, uint8 unless ``roi_seg`` says otherwise, when the record has no box)."""
    shape = tuple(record["shape_zyx"])
    if record["box_zyx"] is None:
        return np.zeros(shape, dtype=np.uint8 if roi_seg is None else roi_seg.dtype)
    return paste_roi(roi_seg, record["box_zyx"], shape, fill=0)
