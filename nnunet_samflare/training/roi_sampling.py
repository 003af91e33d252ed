"""Training the segmenter on what the cascade will give it: the foreground box plus a margin.

At inference the segmenter only sees the locator's ROI (METHOD §5.4), zero-padded by nnU-Net's sliding window
where it is smaller than a patch. The reference trains on the ground-truth label box with no margin
(METHOD §6.3 step 4, §7 #19); here each draw adds an independent random margin per side, so the network also
sees the slightly larger or offset boxes a real locator produces (METHOD §11.6).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def foreground_box(seg: np.ndarray) -> list[tuple[int, int]] | None:
    """Half-open box of all voxels > 0 of a (1, z, y, x) segmentation; None if there are none."""
    foreground = np.asarray(seg[0]) > 0
    if not foreground.any():
        return None
    box = []
    for axis in range(foreground.ndim):
        present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(foreground.ndim) if a != axis)))
        box.append((int(present[0]), int(present[-1]) + 1))
    return box


class ForegroundBoxDataset:
    """Wraps an nnU-Net dataset; ``load_case`` returns the case cropped to its foreground box + a random margin.

    ``class_locations`` (used for foreground oversampling) are shifted into the crop; locations outside it
    (only background ones exist there, for datasets with an ignore label) are dropped. Cases without
    foreground are returned whole.
    """

    def __init__(self, dataset, spacing: Sequence[float], margin_mm: tuple[float, float]):
        self._dataset = dataset
        self._spacing = np.asarray(spacing, dtype=float)
        self._margin_mm = margin_mm
        self._boxes: dict[str, list[tuple[int, int]] | None] = {}

    @property
    def identifiers(self) -> list[str]:
        return self._dataset.identifiers

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self._dataset.load_case(identifier)
        if identifier not in self._boxes:
            self._boxes[identifier] = foreground_box(seg)
        box = self._boxes[identifier]
        if box is None:
            return data, seg, seg_prev, properties
        shape = data.shape[1:]
        low, high = np.random.uniform(*self._margin_mm, size=(2, len(shape))) / self._spacing
        starts = [max(0, lo - int(round(m))) for (lo, _), m in zip(box, low)]
        stops = [min(s, hi + int(round(m))) for (_, hi), m, s in zip(box, high, shape)]
        crop = (slice(None),) + tuple(slice(a, b) for a, b in zip(starts, stops))
        offset = np.array([0] + starts)
        crop_shape = np.array([b - a for a, b in zip(starts, stops)])
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
