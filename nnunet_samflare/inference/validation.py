"""The one validation step of a case, run before any model work by every entry point that predicts (``predict``,
``locate``, ``profile``, the Python API, the pseudo-label rounds): the case is readable, 3-D, one channel per
file as the model expects, with a plausible geometry, and every grid the cascade will create from it fits in
memory. Finite intensities are checked as the voxels are read (:func:`nnunet_samflare.io.read_case`).

The grids are estimated from the header and the models' plans only (no checkpoint is loaded, no voxel read):

* resident all along: the input as float32 (plus its stored type while it is read);
* locator stage: the scan resampled to the locator's grid, its logits;
* segmenter stage: at worst the whole scan resampled to the segmenter's grid (the ROI can be all of it), the
  logits of every class and nnU-Net's tile counts;
* output stage: the full-size label map, connected-component labels for the post-processing, and with
  ``--save_probabilities`` the full-size class probabilities.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk

from nnunet_samflare.errors import InputError
from nnunet_samflare.io import Case, Geometry, Grid, check_geometry, check_grids_fit, check_num_channels, read_header
from nnunet_samflare.training.names import LOCATOR_CONFIGURATION, SEGMENTER_CONFIGURATION
from nnunet_samflare.training.plans import transposed

if TYPE_CHECKING:
    import numpy as np
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_samflare.inference.cascade import CascadePredictor


@dataclass(frozen=True)
class CascadeGrids:
    """What the grid estimate needs to know about the two models (spacings in SimpleITK (z, y, x) order)."""

    locator_spacing_zyx: tuple[float, ...]
    segmenter_spacing_zyx: tuple[float, ...]
    locator_patch: tuple[int, ...]
    segmenter_patch: tuple[int, ...]
    locator_heads: int
    segmenter_heads: int
    num_input_channels: int

    @classmethod
    def from_model_folders(cls, locator: str | os.PathLike, segmenter: str | os.PathLike) -> CascadeGrids:
        """From the model folders' plans.json and dataset.json (cheap: no checkpoint is loaded)."""
        loc = _configuration_of(Path(locator), LOCATOR_CONFIGURATION)
        seg = _configuration_of(Path(segmenter), SEGMENTER_CONFIGURATION)
        return cls(
            locator_spacing_zyx=loc[0],
            segmenter_spacing_zyx=seg[0],
            locator_patch=loc[1],
            segmenter_patch=seg[1],
            locator_heads=loc[2],
            segmenter_heads=seg[2],
            num_input_channels=seg[3],
        )

    @classmethod
    def from_predictor(cls, predictor: CascadePredictor) -> CascadeGrids:
        """From a loaded :class:`~nnunet_samflare.inference.cascade.CascadePredictor`."""

        def describe(p: nnUNetPredictor) -> tuple[tuple[float, ...], tuple[int, ...], int]:
            backward = p.plans_manager.transpose_backward
            return (
                tuple(transposed(p.configuration_manager.spacing, backward)),
                tuple(transposed(p.configuration_manager.patch_size, backward)),
                p.label_manager.num_segmentation_heads,
            )

        loc, seg = describe(predictor.locator), describe(predictor.segmenter)
        return cls(loc[0], seg[0], loc[1], seg[1], loc[2], seg[2], predictor.num_input_channels)

    def check_extent(self, geometry: Geometry, name: str | os.PathLike) -> None:
        """Refuse a scan at most half a voxel of a model's grid thick on some axis: nnU-Net's resampling would
        give that axis no voxel at all."""
        shape, spacing = geometry.shape_zyx, geometry.spacing_zyx
        for model, target in (("locator", self.locator_spacing_zyx), ("segmenter", self.segmenter_spacing_zyx)):
            for axis, n, s, t in zip("zyx", shape, spacing, target):
                if round(s / t * n) == 0:  # nnU-Net's compute_new_shape: round half to even, so 0.5 gives 0 too
                    raise InputError(
                        name,
                        f"too thin for the {model}: {n * s:g} mm along {axis} ({n} voxel(s) of {s:g} mm), at most "
                        f"half a voxel of its {t:g} mm grid",
                    )

    def grids(self, geometry: Geometry, probabilities: bool = False) -> tuple[list[Grid], list[list[Grid]]]:
        """``(resident, stages)`` for :func:`nnunet_samflare.io.check_grids_fit`."""
        shape, spacing, c = geometry.shape_zyx, geometry.spacing_zyx, self.num_input_channels
        resident = [Grid("input", shape, 4 * c + 2, spacing)]
        locator = _padded(_resampled(shape, spacing, self.locator_spacing_zyx), self.locator_patch)
        segmenter = _padded(_resampled(shape, spacing, self.segmenter_spacing_zyx), self.segmenter_patch)
        output = 1 + 4 + 1 + (8 * self.segmenter_heads if probabilities else 0)
        stages = [
            [Grid("locator grid", locator, 8 * c + 8 * self.locator_heads + 2, self.locator_spacing_zyx)],
            [
                Grid(
                    "segmenter grid (whole scan as ROI)",
                    segmenter,
                    8 * c + 8 * self.segmenter_heads + 4,
                    self.segmenter_spacing_zyx,
                )
            ],
            [Grid("full-size outputs" + (" with probabilities" if probabilities else ""), shape, output, spacing)],
        ]
        return resident, stages


def _resampled(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    from nnunet_samflare.inference.cascade import resample_shape

    return tuple(resample_shape(shape, spacing, target))


def _padded(shape: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(n, p) for n, p in zip(shape, patch))  # nnU-Net pads a grid smaller than a patch


def _configuration_of(folder: Path, default: str) -> tuple[tuple[float, ...], tuple[int, ...], int, int]:
    """(spacing zyx, patch zyx, output heads, input channels) of a model folder: its configuration is the one its
    name ends with (``<trainer>__<plans>__<config>``), or ``default`` for a folder the user renamed (the model
    loader reads it from the checkpoint, which this cheap check does not open)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
        dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(folder, f"not a usable model folder ({e})") from None
    manager = PlansManager(plans)
    named = folder.name.rsplit("__", 1)[-1]
    available = plans.get("configurations", {})
    name = named if named in available else default
    if name not in available:
        raise InputError(
            folder / "plans.json", f"no configuration '{named}' nor '{default}' (it has {', '.join(available)})"
        )
    configuration = manager.get_configuration(name)
    backward = manager.transpose_backward
    return (
        tuple(float(s) for s in transposed(configuration.spacing, backward)),
        tuple(int(p) for p in transposed(configuration.patch_size, backward)),
        manager.get_label_manager(dataset_json).num_segmentation_heads,
        len(dataset_json["channel_names"]),
    )


def validate_case(
    case: Case | sitk.Image,
    grids: CascadeGrids | None = None,
    *,
    probabilities: bool = False,
    name: str | None = None,
) -> Geometry | None:
    """Everything that can be told about a case before reading its voxels or loading a model; raises
    :class:`~nnunet_samflare.errors.InputError` naming the file and the cause.

    ``case`` is a :class:`~nnunet_samflare.io.Case` or an in-memory image (``name`` is what messages call it).
    With ``grids`` the channel count and the memory of every grid are checked too. Returns the geometry, or None
    for a DICOM series, whose geometry is known only once it is read: call :func:`validate_loaded` then.
    """
    if isinstance(case, sitk.Image):
        geometry = Geometry.of(case)
        label = name or "<in-memory image>"
        check_geometry(geometry, label)
    else:
        label = case.source
        if grids is not None:
            check_num_channels(case, grids.num_input_channels)
        if case.is_dicom:
            return None
        geometries = [read_header(f) for f in case.files]
        geometry = geometries[0]
        for f, other in zip(case.files[1:], geometries[1:]):
            if other.size != geometry.size:
                raise InputError(f, f"channel size {other.size} differs from {case.files[0].name} {geometry.size}")
    if grids is not None:
        grids.check_extent(geometry, label)
        check_grids_fit(*grids.grids(geometry, probabilities), label)
    return geometry


def validate_loaded(
    data: np.ndarray,
    properties: dict,
    name: str | os.PathLike,
    grids: CascadeGrids | None = None,
    probabilities: bool = False,
) -> None:
    """The geometry and memory checks of :func:`validate_case` for a case already read (``data`` (c, z, y, x),
    ``properties`` as from ``read_case``): what is left to check for a DICOM series, before any model work."""
    sitk_stuff = properties["sitk_stuff"]
    geometry = Geometry(
        3,
        tuple(int(n) for n in data.shape[1:][::-1]),
        tuple(sitk_stuff["spacing"]),
        tuple(sitk_stuff["origin"]),
        tuple(sitk_stuff["direction"]),
    )
    check_geometry(geometry, name)
    if grids is not None:
        grids.check_extent(geometry, name)
        check_grids_fit(*grids.grids(geometry, probabilities), name)
