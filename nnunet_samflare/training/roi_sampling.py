"""Training the segmenter on what the cascade will give it: the foreground box plus a margin.

At inference the segmenter only sees the locator's ROI (docs/method.md §5.4), zero-padded by nnU-Net's sliding window
where it is smaller than a patch. The reference trains on the ground-truth label box with no margin
(docs/method.md §6.3 step 4, §7 #19); here each training draw adds an independent random margin per side, so the network
also sees the slightly larger or offset boxes a real locator produces (docs/method.md §11.6). Validation uses the
cascade's own margin, :data:`DEFAULT_ROI_MARGIN_MM`, on every side.

Boxes are ``[lo, hi)`` per spatial axis (acvl_utils / nnU-Net convention). Millimetres become voxels by
rounding up, as the cascade does (``inference.roi.expand_box_mm``), so a box grows by at least the margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset

#: Margin (mm) the cascade adds around the locator's box on every side. The reference uses none (docs/method.md §7 #19);
#: a margin absorbs a locator that stops a little short of an organ's edge, at the cost of a few more segmenter
#: tiles. It lives here, below ``inference``, because the segmenter's training draws its margins around it and
#: its validation uses it; ``inference.cascade`` re-exports it.
DEFAULT_ROI_MARGIN_MM = 10.0

#: Random margin (mm) per side while training the segmenter: it brackets :data:`DEFAULT_ROI_MARGIN_MM`.
TRAINING_ROI_MARGIN_MM: tuple[float, float] = (0.0, 2 * DEFAULT_ROI_MARGIN_MM)

Box = list[list[int]]


def foreground_box(seg: np.ndarray) -> Box | None:
    """``[lo, hi)`` box of all voxels > 0 of a ``(1, z, y, x)`` or ``(z, y, x)`` segmentation; None if there
    are none."""
    seg = np.asarray(seg)
    foreground = (seg[0] if seg.ndim == 4 else seg) > 0
    if not foreground.any():
        return None
    return [[int(lo), int(hi)] for lo, hi in get_bbox_from_mask(foreground)]


def margin_voxels(margin_mm: float, spacing: float) -> int:
    """Whole voxels that cover ``margin_mm`` on an axis of ``spacing`` mm (rounded up, float noise forgiven)."""
    return math.ceil(margin_mm / spacing * (1 - 1e-9))


def grow_box(
    box: Sequence[Sequence[int]],
    margin_mm_low: Sequence[float],
    margin_mm_high: Sequence[float],
    spacing: Sequence[float],
    shape: Sequence[int],
) -> Box:
    """``box`` grown by a margin in mm on each side of each axis (``low`` before, ``high`` after), clipped to
    ``shape``."""
    grown = []
    for (lo, hi), m_lo, m_hi, s, size in zip(box, margin_mm_low, margin_mm_high, spacing, shape):
        grown.append([max(0, int(lo) - margin_voxels(m_lo, s)), min(int(size), int(hi) + margin_voxels(m_hi, s))])
    return grown


def cascade_roi(seg: np.ndarray, spacing: Sequence[float], margin_mm: float = DEFAULT_ROI_MARGIN_MM) -> Box | None:
    """The region the cascade gives the segmenter when its locator is perfect: the ground-truth foreground box
    plus ``margin_mm`` on every side; None for a case without foreground."""
    box = foreground_box(seg)
    if box is None:
        return None
    n = len(box)
    return grow_box(box, [margin_mm] * n, [margin_mm] * n, spacing, np.asarray(seg).shape[-n:])


class ForegroundBoxDataset:
    """Wraps an nnU-Net dataset; ``load_case`` returns the case cropped to its foreground box + a margin.

    The margin (mm) is drawn uniformly from ``margin_mm = (low, high)``, independently per side and per draw;
    ``low == high`` gives a fixed box (validation). ``class_locations`` (used for foreground oversampling) are
    shifted into the crop; locations outside it (only background ones exist there, for datasets with an ignore
    label) are dropped. Cases without foreground are returned whole.
    """

    def __init__(self, dataset: nnUNetBaseDataset, spacing: Sequence[float], margin_mm: tuple[float, float]):
        self._dataset = dataset
        self._spacing = [float(s) for s in spacing]
        self._margin_mm = margin_mm
        self._boxes: dict[str, Box | None] = {}

    @property
    def identifiers(self) -> list[str]:
        return self._dataset.identifiers

    def load_case(self, identifier: str) -> tuple[ArrayLike, ArrayLike, ArrayLike | None, dict]:
        data, seg, seg_prev, properties = self._dataset.load_case(identifier)
        if identifier not in self._boxes:
            self._boxes[identifier] = foreground_box(seg)
        box = self._boxes[identifier]
        if box is None:
            return data, seg, seg_prev, properties
        shape = data.shape[1:]
        low, high = np.random.uniform(*self._margin_mm, size=(2, len(shape)))
        box = grow_box(box, low, high, self._spacing, shape)
        crop = (slice(None),) + tuple(slice(a, b) for a, b in box)
        offset = np.array([0] + [a for a, _ in box])
        crop_shape = np.array([b - a for a, b in box])
        properties = dict(properties)
        properties["class_locations"] = {
            key: _shift_into_crop(locations, offset, crop_shape)
            for key, locations in properties["class_locations"].items()
        }
        seg_prev = None if seg_prev is None else seg_prev[crop[1:]]
        return data[crop], seg[crop], seg_prev, properties


def _shift_into_crop(locations: np.ndarray, offset: np.ndarray, crop_shape: np.ndarray) -> np.ndarray:
    if len(locations) == 0:
        return locations
    shifted = np.asarray(locations) - offset
    inside = np.all((shifted[:, 1:] >= 0) & (shifted[:, 1:] < crop_shape), axis=1)
    return shifted[inside]
