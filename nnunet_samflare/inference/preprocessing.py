"""nnU-Net's image preprocessing for inference, computed one axis and one slab at a time.

nnU-Net's ``resample_data_or_seg_to_shape`` (the ``resampling_fn_data`` of every default plan) resizes each
channel with ``skimage.transform.resize`` (``scipy.ndimage.zoom``: cubic B-spline, edge mode, no anti-aliasing,
output clipped to the input's range), or, for anisotropic spacings, in-plane per slice (clipped per slice) and
with ``order_z`` along the low-resolution axis. Both are a tensor product of one linear 1-D operator per axis
followed by a clip, so they can be applied axis by axis. :func:`resample_image` builds each 1-D operator once, as
a small dense matrix obtained by running scipy's own interpolation on an identity matrix, applies the in-plane
ones to slabs of slices with matrix products and the remaining axis to the (much smaller) intermediate result.
:func:`preprocess_image` is ``DefaultPreprocessor.run_case_npy`` without a label map built on it: transpose,
crop to the nonzero box, voxel-wise normalisation and resampling, all slab by slab.

Why: on a full-resolution scan nnU-Net makes float64 copies of the whole volume, fills the holes of its nonzero
mask and resamples that mask too (unused at inference), and evaluates 64 spline taps per output voxel; the
cascade's locator needs only a coarse grid of the whole scan and its segmenter a grid of the ROI. Axis by axis
the work is a few matrix products, and memory stays bounded by a slab plus the in-plane-reduced volume: no float
copy of the scan. The results equal nnU-Net's to float32 rounding (``tests/test_speed_paths.py``); anything the
fast path does not reproduce exactly (another resampling function, preprocessor or a normalisation that needs
whole-image statistics) goes through nnU-Net's own code.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, determine_do_sep_z_and_axis
from scipy import ndimage

if TYPE_CHECKING:
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

#: nnU-Net's ``resampling_fn_data`` that :func:`resample_image` reproduces; other functions are called as they are.
NNUNET_DEFAULT_RESAMPLING = "resample_data_or_seg_to_shape"

#: Voxels per slab read from the source at a time (float32: 32 MiB).
SLAB_VOXELS = 1 << 23

#: Operator weights below this magnitude are set to zero (:func:`_as_float32_operator`).
NEGLIGIBLE_WEIGHT = 1e-30


def _as_float32_operator(operator: np.ndarray) -> np.ndarray:
    """``operator`` in float32 without its negligible taps. A cubic spline's prefilter gives every input voxel a
    weight that decays geometrically with distance, so a long axis' matrix holds thousands of float32 subnormals
    (2,856 of the 65,536 weights for 512 → 128), and Intel cores multiply subnormals through a slow microcode
    assist: one in-plane product over a 32-slice slab of a 512×512 scan took 346 ms instead of 11 ms on the 2-core
    Xeon VM. Taps below :data:`NEGLIGIBLE_WEIGHT` add less than float32 can resolve to any voxel value of a CT
    (that product came out bit-identical)."""
    operator = operator.astype(np.float32)
    operator[np.abs(operator) < NEGLIGIBLE_WEIGHT] = 0.0
    return operator


@lru_cache(maxsize=64)
def zoom_operator(n_in: int, n_out: int, order: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of ``scipy.ndimage.zoom(..., order, mode="nearest", grid_mode=True)`` along one
    axis (what ``skimage.transform.resize(..., mode="edge", anti_aliasing=False)`` calls), read off by zooming
    the identity: column ``i`` is the response to a unit impulse at input voxel ``i``."""
    identity = np.eye(n_in, dtype=np.float64)
    operator = ndimage.zoom(identity, (n_out / n_in, 1.0), order=order, mode="nearest", grid_mode=True)
    if operator.shape != (n_out, n_in):
        raise AssertionError(f"zoom gave {operator.shape}, expected {(n_out, n_in)}")
    return _as_float32_operator(operator)


@lru_cache(maxsize=64)
def map_coordinates_operator(n_in: int, n_out: int, order: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of nnU-Net's out-of-plane step for anisotropic data: ``map_coordinates`` at
    ``(j + 0.5) * n_in / n_out - 0.5`` with ``order`` (``order_z``) and mode ``nearest``."""
    rows = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    coordinates = np.stack(np.meshgrid(rows, np.arange(n_in, dtype=np.float64), indexing="ij"))
    identity = np.eye(n_in, dtype=np.float64)
    return _as_float32_operator(ndimage.map_coordinates(identity, coordinates, order=order, mode="nearest"))


def _apply(array: torch.Tensor, operator: np.ndarray | None, axis: int) -> torch.Tensor:
    """``operator`` (n_out, n_in) applied along ``axis`` of a float32 tensor (None: unchanged)."""
    if operator is None:
        return array
    moved = array.movedim(axis, -1)
    result = torch.matmul(moved, torch.from_numpy(operator).T)
    return result.movedim(-1, axis)


def resample_image(
    source: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = False,
    separate_z_anisotropy_threshold: float = ANISO_THRESHOLD,
    is_seg: bool = False,
    transform: Callable[[int, np.ndarray], np.ndarray] | None = None,
    slab_voxels: int = SLAB_VOXELS,
) -> np.ndarray:
    """``resample_data_or_seg_to_shape(transform(source), new_shape, current_spacing, new_spacing, ...)`` as a
    float32 ``(c, *new_shape)`` array, without materialising ``transform(source)`` or any float copy of it.

    ``source`` is ``(c, a0, a1, a2)`` of any real dtype and may be a strided view (a crop of a larger scan):
    it is read in slabs along axis 0. ``transform(channel, slab)`` maps a float32 slab voxel-wise in place or
    returns a new one (e.g. nnU-Net's CT normalisation); it must not depend on the slab's extent. The keyword
    arguments are those of nnU-Net's ``resampling_fn_data_kwargs``.
    """
    if is_seg:
        raise ValueError("resample_image resamples images; label maps go through nnU-Net's resampling_fn_seg")
    if source.ndim != 4:
        raise ValueError(f"source must be (c, a0, a1, a2), got shape {source.shape}")
    in_shape = [int(n) for n in source.shape[1:]]
    new_shape = [int(n) for n in new_shape]
    do_separate_z, lowres_axis = determine_do_sep_z_and_axis(
        force_separate_z, current_spacing, new_spacing, separate_z_anisotropy_threshold
    )
    if in_shape == new_shape:  # nnU-Net returns the data as it is
        operators: list[np.ndarray | None] = [None, None, None]
    else:
        operators = []
        for axis, (n_in, n_out) in enumerate(zip(in_shape, new_shape)):
            if do_separate_z and axis == lowres_axis:
                operators.append(map_coordinates_operator(n_in, n_out, order_z) if n_in != n_out else None)
            else:
                operators.append(zoom_operator(n_in, n_out, order) if n_in != n_out else None)
    # skimage clips the spline's over- and undershoot to the input's range: per volume, or per slice of the
    # low-resolution axis when nnU-Net resizes slice by slice. Linear or nearest interpolation stays in range.
    clip = order > 1 and in_shape != new_shape
    clip_axis = lowres_axis if do_separate_z else None
    # In-plane operators come before the clip, the low-resolution axis' after it; axes 1 and 2 run per slab.
    slab_axes = [axis for axis in (2, 1) if axis != clip_axis]
    range_dims = (0, 1, 2) if clip_axis is None else tuple(a for a in range(3) if a != clip_axis)

    slab = max(1, slab_voxels // max(1, in_shape[1] * in_shape[2]))
    out = np.empty((source.shape[0], *new_shape), dtype=np.float32)
    for channel in range(source.shape[0]):
        reduced = None
        lows, highs = [], []
        for start in range(0, in_shape[0], slab):
            block = np.array(source[channel, start : start + slab], dtype=np.float32)
            if transform is not None:
                block = np.asarray(transform(channel, block), dtype=np.float32)
            tensor = torch.from_numpy(block)
            if clip:
                lows.append(tensor.amin(dim=range_dims))
                highs.append(tensor.amax(dim=range_dims))
            for axis in slab_axes:
                tensor = _apply(tensor, operators[axis], axis)
            if reduced is None:
                reduced = torch.empty((in_shape[0], *tensor.shape[1:]), dtype=torch.float32)
            reduced[start : start + tensor.shape[0]] = tensor
        if clip_axis != 0:
            reduced = _apply(reduced, operators[0], 0)
        if clip:
            if clip_axis is None:
                low, high = torch.stack(lows).min(), torch.stack(highs).max()
            else:
                combine = torch.cat if clip_axis == 0 else torch.stack
                low, high = combine(lows), combine(highs)
                if clip_axis != 0:
                    low, high = low.amin(0), high.amax(0)
                shape = [1, 1, 1]
                shape[clip_axis] = -1
                low, high = low.view(shape), high.view(shape)
            reduced = torch.maximum(torch.minimum(reduced, high), low)
        if clip_axis is not None:
            reduced = _apply(reduced, operators[clip_axis], clip_axis)
        out[channel] = reduced.numpy()
    return out


def resample_with_configuration(
    configuration_manager: ConfigurationManager,
    data: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    transform: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The configuration's ``resampling_fn_data`` applied to ``transform(data)``: :func:`resample_image` when it
    is nnU-Net's default function, else the configured function itself on a float32 copy."""
    name = configuration_manager.configuration["resampling_fn_data"]
    kwargs = configuration_manager.configuration["resampling_fn_data_kwargs"]
    if name == NNUNET_DEFAULT_RESAMPLING:
        return resample_image(data, new_shape, current_spacing, new_spacing, transform=transform, **kwargs)
    array = np.array(data, dtype=np.float32)
    if transform is not None:
        for channel in range(array.shape[0]):
            array[channel] = transform(channel, array[channel])
    return configuration_manager.resampling_fn_data(array, new_shape, current_spacing, new_spacing).astype(
        np.float32, copy=False
    )


def nonzero_box(data: np.ndarray, slab_voxels: int = SLAB_VOXELS) -> list[list[int]]:
    """``[lo, hi)`` per spatial axis of the voxels that are nonzero in any channel of ``(c, a0, a1, a2)``, read
    slab by slab; the whole extent of an axis without any (as acvl_utils' ``get_bbox_from_mask`` answers).

    This is the box nnU-Net crops to: it takes it from the nonzero mask after ``binary_fill_holes``, but filled
    holes are enclosed by nonzero voxels and never widen the box."""
    shape = data.shape[1:]
    hit = [np.zeros(n, dtype=bool) for n in shape]
    slab = max(1, slab_voxels // max(1, shape[1] * shape[2]))
    for start in range(0, shape[0], slab):
        mask = np.any(data[:, start : start + slab] != 0, axis=0)
        hit[0][start : start + mask.shape[0]] = mask.any(axis=(1, 2))
        hit[1] |= mask.any(axis=(0, 2))
        hit[2] |= mask.any(axis=(0, 1))
    box = []
    for present, n in zip(hit, shape):
        index = np.flatnonzero(present)
        box.append([int(index[0]), int(index[-1]) + 1] if index.size else [0, int(n)])
    return box


def _voxelwise_normalizers(configuration_manager: ConfigurationManager, plans_manager: PlansManager) -> list | None:
    """nnU-Net's normaliser of every channel if all of them map each voxel on its own (CT windowing, none);
    None if any needs whole-image statistics or a mask (z-score, rescaling), which only nnU-Net's code does."""
    import nnunetv2
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization, NoNormalization
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    normalizers = []
    intensities = plans_manager.foreground_intensity_properties_per_channel
    for channel, scheme in enumerate(configuration_manager.normalization_schemes):
        cls = recursive_find_python_class(
            join(nnunetv2.__path__[0], "preprocessing", "normalization"), scheme, "nnunetv2.preprocessing.normalization"
        )
        if cls not in (CTNormalization, NoNormalization):
            return None
        normalizers.append(
            cls(
                use_mask_for_norm=configuration_manager.use_mask_for_norm[channel],
                intensityproperties=intensities[str(channel)],
            )
        )
    return normalizers


def preprocess_image(
    data: np.ndarray,
    properties: dict[str, Any],
    plans_manager: PlansManager,
    configuration_manager: ConfigurationManager,
    dataset_json: dict,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``DefaultPreprocessor.run_case_npy(data, None, properties, ...)`` for the image alone: the preprocessed
    float32 ``(c, *grid)`` array in nnU-Net's (transposed) axis order and a copy of ``properties`` with
    ``shape_before_cropping``, ``bbox_used_for_cropping`` and ``shape_after_cropping_and_before_resampling``.

    ``data`` is ``(c, z, y, x)`` as :func:`~nnunet_samflare.io.read_case` returns it and is never modified or
    copied whole. Configurations the slab-wise path cannot reproduce go through nnU-Net's preprocessor."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    properties = copy.deepcopy(properties)
    preprocessor_class = configuration_manager.preprocessor_class
    normalizers = _voxelwise_normalizers(configuration_manager, plans_manager)
    if preprocessor_class is not DefaultPreprocessor or normalizers is None or len(configuration_manager.spacing) != 3:
        preprocessed, _, properties = preprocessor_class(verbose=False).run_case_npy(
            data, None, properties, plans_manager, configuration_manager, dataset_json
        )
        return preprocessed, properties

    forward, backward = plans_manager.transpose_forward, plans_manager.transpose_backward
    box = nonzero_box(data)
    cropped = data[(slice(None), *(slice(lo, hi) for lo, hi in box))]
    properties["shape_before_cropping"] = tuple(data.shape[1:][axis] for axis in forward)
    properties["bbox_used_for_cropping"] = [box[axis] for axis in forward]
    properties["shape_after_cropping_and_before_resampling"] = tuple(cropped.shape[1:][axis] for axis in forward)
    spacing = [properties["spacing"][axis] for axis in forward]
    new_shape = compute_new_shape(
        properties["shape_after_cropping_and_before_resampling"], spacing, configuration_manager.spacing
    )

    def normalize(channel: int, slab: np.ndarray) -> np.ndarray:
        return normalizers[channel].run(slab)

    # Resampling acts on each axis separately, so it runs in the image's own axis order and only the small
    # result is transposed.
    resampled = resample_with_configuration(
        configuration_manager,
        cropped,
        [new_shape[axis] for axis in backward],
        properties["spacing"],
        [configuration_manager.spacing[axis] for axis in backward],
        transform=normalize,
    )
    return np.ascontiguousarray(resampled.transpose(0, *[axis + 1 for axis in forward])), properties
