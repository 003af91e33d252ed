"""Per-case reports of a prediction: organ volumes and mean HU (``--stats``) and a PNG preview with axial and
coronal label overlays (``--preview``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_samflare.io import atomic_output, write_json_atomic
from nnunet_samflare.labels import FLARE_LABELS

# One fixed colour per FLARE label so that previews of different cases can be compared at a glance.
LABEL_COLOURS: dict[int, tuple[float, float, float]] = {
    1: (0.85, 0.33, 0.25),  # liver
    2: (0.20, 0.63, 0.17),  # right kidney
    3: (0.58, 0.40, 0.74),  # spleen
    4: (1.00, 0.85, 0.20),  # pancreas
    5: (0.90, 0.10, 0.12),  # aorta
    6: (0.12, 0.47, 0.85),  # inferior vena cava
    7: (1.00, 0.50, 0.00),  # right adrenal gland
    8: (0.99, 0.75, 0.44),  # left adrenal gland
    9: (0.40, 0.76, 0.65),  # gallbladder
    10: (0.65, 0.34, 0.16),  # esophagus
    11: (0.97, 0.51, 0.75),  # stomach
    12: (0.74, 0.74, 0.13),  # duodenum
    13: (0.55, 0.90, 0.38),  # left kidney
    14: (0.00, 1.00, 1.00),  # tumor
}
DEFAULT_WINDOW = (400.0, 40.0)  # (width, level) HU: the usual abdominal soft-tissue window


def _label_name(label: int, names: Mapping[int, str]) -> str:
    return names.get(label, f"label {label}")


def _spatial(array: np.ndarray, what: str) -> np.ndarray:
    """Accept (z, y, x) or nnU-Net's single-channel (1, z, y, x)."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{what} must be (z, y, x) or (1, z, y, x), got shape {array.shape}")
    return array


def organ_stats(
    seg: np.ndarray,
    image_hu: np.ndarray | None,
    spacing_zyx: Sequence[float],
    names: Mapping[int, str] = FLARE_LABELS,
) -> dict[int, dict[str, Any]]:
    """Per foreground label present in ``seg``: ``{"name", "voxels", "volume_ml", "mean_hu"}``.

    ``volume_ml`` is voxel count x voxel volume (from ``spacing_zyx``, mm) / 1000. ``mean_hu`` is the mean of
    ``image_hu`` over the label's voxels (None without an image). ``seg`` and ``image_hu`` are (z, y, x) or
    (1, z, y, x) on the same grid."""
    seg = _spatial(np.asarray(seg), "seg")
    if seg.dtype.kind == "f" and not np.array_equal(seg, np.round(seg)):
        raise ValueError("label map holds non-integer values")
    if seg.size and seg.min() < 0:
        raise ValueError("label maps must not contain negative labels")
    if image_hu is not None:
        image_hu = _spatial(np.asarray(image_hu), "image_hu")
        if image_hu.shape != seg.shape:
            raise ValueError(f"image shape {image_hu.shape} differs from label map shape {seg.shape}")
    voxel_ml = float(np.prod(np.asarray(spacing_zyx, dtype=np.float64))) / 1000.0
    # Work on the labelled voxels only: a full 512x512x215 map as int64 for bincount would cost ~450 MB.
    foreground = seg != 0
    labels = seg[foreground].astype(np.int64)
    counts = np.bincount(labels)
    sums = None
    if image_hu is not None:
        # float64 accumulation: a liver holds millions of voxels, float32 sums would drift.
        sums = np.bincount(labels, weights=image_hu[foreground].astype(np.float64), minlength=counts.size)
    stats: dict[int, dict[str, Any]] = {}
    for label in np.flatnonzero(counts):
        if label == 0:
            continue
        n = int(counts[label])
        stats[int(label)] = {
            "name": _label_name(int(label), names),
            "voxels": n,
            "volume_ml": n * voxel_ml,
            "mean_hu": None if sums is None else float(sums[label] / n),
        }
    return stats


def save_stats_json(stats: Mapping[int, Mapping[str, Any]], path: str | os.PathLike, **metadata: Any) -> None:
    """Write :func:`organ_stats` output as JSON, atomically: ``{**metadata, "units": {...}, "labels":
    {"<id>": {...}}}`` (JSON keys are strings)."""
    document = {
        **metadata,
        "units": {"volume_ml": "mL", "mean_hu": "HU"},
        "labels": {str(label): dict(values) for label, values in sorted(stats.items())},
    }
    write_json_atomic(document, path)


def _orient_for_display(
    arrays: Sequence[np.ndarray], spacing_zyx: Sequence[float], direction: Sequence[float] | None
) -> tuple[list[np.ndarray], tuple[float, float, float]]:
    """Permute and flip (z, y, x) arrays onto the nearest LPS-aligned grid: array axis 0 runs inferior->superior,
    1 anterior->posterior, 2 right->left. Axial slices then show anterior up and the patient's right on the
    image's left (radiological convention) whatever the scan's orientation. Oblique scans are snapped to the
    closest axes; good enough for a preview."""
    spacing = tuple(float(s) for s in spacing_zyx)
    if direction is None:
        return list(arrays), spacing
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)  # column a = world direction of index axis a
    order, flips = [], []
    for world_axis in (2, 1, 0):  # output array axes z, y, x <- world S, P, L
        index_axis = int(np.argmax(np.abs(matrix[world_axis, :])))
        order.append(2 - index_axis)  # sitk index axis a is numpy axis 2 - a
        flips.append(matrix[world_axis, index_axis] < 0)
    if sorted(order) != [0, 1, 2]:
        return list(arrays), spacing  # degenerate (near 45 degree) direction: show the array as stored
    oriented = []
    for array in arrays:
        a = np.transpose(array, order)
        for axis, flip in enumerate(flips):
            if flip:
                a = np.flip(a, axis)
        oriented.append(a)
    return oriented, tuple(spacing[o] for o in order)


def _window(image_hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    width, level = window
    return np.clip((image_hu.astype(np.float32) - (level - width / 2)) / width, 0.0, 1.0)


def _overlay(gray: np.ndarray, seg: np.ndarray, alpha: float) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for label in np.unique(seg):
        if label == 0:
            continue
        colour = np.asarray(LABEL_COLOURS.get(int(label), _fallback_colour(int(label))))
        where = seg == label
        rgb[where] = (1 - alpha) * rgb[where] + alpha * colour
    return rgb


def _fallback_colour(label: int) -> tuple[float, float, float]:
    from matplotlib import colormaps

    return tuple(colormaps["tab20"](label % 20)[:3])


def save_preview_png(
    image_hu: np.ndarray,
    seg: np.ndarray,
    path: str | os.PathLike,
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    direction: Sequence[float] | None = None,
    window: tuple[float, float] = DEFAULT_WINDOW,
    title: str | None = None,
    names: Mapping[int, str] = FLARE_LABELS,
    alpha: float = 0.5,
    dpi: int = 100,
) -> Path:
    """Write a PNG with an axial and a coronal slice through the centre of the labelled region (the image centre
    if nothing is labelled), CT windowed (``window`` = (width, level) HU), labels overlaid in colour, and a legend.

    ``image_hu`` and ``seg`` are (z, y, x) (or (1, z, y, x)) on one grid with ``spacing_zyx`` in mm; pixels are
    drawn with their physical aspect ratio, so anisotropic voxels are not squashed. With ``direction`` (the sitk
    9-tuple, e.g. ``properties['sitk_stuff']['direction']``) the slices are shown in radiological orientation.
    Rendered with matplotlib's Agg canvas (no display, no pyplot state). Written atomically; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image_hu = _spatial(np.asarray(image_hu), "image_hu")
    seg = _spatial(np.asarray(seg), "seg")
    if image_hu.shape != seg.shape:
        raise ValueError(f"image shape {image_hu.shape} differs from label map shape {seg.shape}")
    (image_hu, seg), (sz, sy, sx) = _orient_for_display([image_hu, seg], spacing_zyx, direction)

    # Centre of the labelled region's bounding box, from per-axis projections (no index arrays of every voxel).
    labelled = seg != 0
    centre = []
    for axis, size in enumerate(seg.shape):
        present = np.flatnonzero(np.any(labelled, axis=tuple(a for a in range(3) if a != axis)))
        centre.append(int((present[0] + present[-1]) // 2) if present.size else size // 2)
    cz, cy, _ = centre

    # Rows y (anterior up), columns x. Only the two slices are windowed, not the whole volume.
    axial = _overlay(_window(image_hu[cz], window), seg[cz], alpha)
    # Coronal rows are z; flip so that superior is up.
    coronal = _overlay(_window(image_hu[:, cy, :], window), seg[:, cy, :], alpha)[::-1]

    figure = Figure(figsize=(12, 6.5), dpi=dpi)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2)
    # aspect = physical height / physical width of one pixel: the row spacing over the column spacing.
    panels[0].imshow(axial, aspect=sy / sx, interpolation="nearest")
    panels[0].set_title(f"axial, slice {cz}")
    panels[1].imshow(coronal, aspect=sz / sx, interpolation="nearest")
    panels[1].set_title(f"coronal, row {cy}")
    for panel in panels:
        panel.set_axis_off()

    present = [int(label) for label in np.unique(seg) if label != 0]
    handles = [
        Patch(facecolor=LABEL_COLOURS.get(label, _fallback_colour(label)), label=f"{label} {_label_name(label, names)}")
        for label in present
    ]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=9, frameon=False)
    width, level = window
    figure.suptitle(f"{title + '  ' if title else ''}(W{width:g}/L{level:g})")
    figure.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.05 + 0.04 * ((len(handles) + 4) // 5))

    path = Path(path)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return path
