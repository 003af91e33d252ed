"""The FLARE23 authors' own inference pipeline (docs/method.md §5), end to end, for their published weights.

``samflare predict --reference_pipeline`` (and :class:`ReferencePipeline`) reproduce the authors' MONAI inference
script without MONAI: the networks are ours (:class:`~nnunet_samflare.networks.PConvLocator`,
:class:`~nnunet_samflare.networks.SAMHybridUNet`, equal to theirs to float tolerance), the weights are theirs
(a raw checkpoint, converted on the fly, or the output of ``samflare convert-weights``: :func:`load_weights`).
Use it for the authors' checkpoints only. Models trained with this plug-in were trained on nnU-Net's
preprocessing (CT normalisation, plans spacing, ROI margin) and belong to the default ``samflare predict``.

The steps, numbered as in docs/method.md §5 (the arrays are in the reference's voxel order (x, y, z), i.e. the
SimpleITK array transposed, so that the networks see the volumes the authors' weights were trained on):

1. the image as stored, no reorientation;
2. 5th/95th percentiles over the whole volume mapped to 0 and 255, clipped (:func:`scale_intensity_percentiles`);
3. crop to the box of voxels > 0, margin 0 (:func:`~nnunet_samflare.inference.roi.bounding_box`);
4. resample to 1.5 × 1.5 × 2.0 mm (x, y, z), linear, border padding (:func:`resample_linear`);
5. nonzero z-score (:func:`normalize_nonzero`); 6. resize to 128³, trilinear, align_corners False;
7. locator (fp16 autocast on CUDA); 8. softmax, argmax; 9. nearest resize back to the step-4 grid;
10. 6-connected components under 8,000 voxels removed (:func:`~nnunet_samflare.inference.roi.remove_small_components`
    with 36,000 mm³ on the 4.5 mm³ grid, i.e. exactly 8,000 voxels); 11. nothing left: an all-zero label map;
12. ROI = tight box of all that is left, margin 0;
13. the step-4 image cropped to the ROI (already z-scored, see below); 14. nonzero z-score of the ROI alone;
15. constant-0 padding at the end of every axis shorter than 96;
16. 96³ sliding window, overlap 0.5, uniform blending of logits (:func:`sliding_window_logits`), fp16 autocast
    on CUDA, stitched in float32 on the CPU; 17. no TTA;
18. softmax, argmax; 19.–20. largest 26-connected component per organ, then the isolated-tumour filter
    (:func:`~nnunet_samflare.inference.postprocessing.postprocess_flare`), on the padded 1.5 × 1.5 × 2 mm ROI,
    as the reference does (it inverts the padding afterwards);
21. padding removed, ROI pasted into the step-4 grid (zeros elsewhere);
22. nearest resampling to the original spacing (:func:`resample_nearest`), pasted into the original extent;
23. uint8, the input's geometry and format.

MONAI semantics reproduced where the spec states them:

* percentiles: ``np.percentile`` (linear) on volumes of more than 10⁶ voxels, ``torch.quantile`` otherwise, as
  MONAI's ``percentile`` does; scaling in float32 as ``(x - p5) / (p95 - p5) * 255``, then clipped. If
  p5 == p95 MONAI only subtracts p5 (no scaling, no clipping), and so do we;
* ``Spacing``: an axis within 1e-3 mm of the target keeps its spacing; output size ``round((n - 1) · s / t + 1)``
  per axis (numpy's round, half to even); first output voxel on the first input voxel, output voxel j read at
  input index ``j · t / s``; ``grid_sample`` (trilinear, border padding, align_corners False) in float64 on the
  coordinates MONAI's affine algebra gives (:func:`grid_coordinates`), the result cast to float32; no resampling
  at all when MONAI's shortcut applies (same size, affines within 1e-3);
* ``NormalizeIntensity(nonzero=True)``: mean and population std (``unbiased=False``) of the voxels != 0 in
  float32; those voxels become ``(x - mean) / std`` (std 0 counts as 1), zeros stay 0;
* ``Resize``: ``F.interpolate`` in float32 (trilinear, ``align_corners=None``); its inverse (``Invertd`` with
  ``nearest_interp``) is ``F.interpolate(mode="nearest")``, i.e. source index ``floor(j · in / out)``;
* ``sliding_window_inference``: scan interval ``int(96 · (1 - 0.5)) = 48`` (96 for an axis of exactly 96), window
  starts ``0, 48, 96, …`` up to the first window that reaches the end, each start clipped to ``n - 96``; windows
  visited with the first axis slowest; logits summed in float32 and divided by the per-voxel window count;
* the inverse of ``Spacing`` (``Invertd`` with ``nearest_interp``): ``grid_sample`` nearest on the same kind of
  coordinates, i.e. output voxel j takes input voxel ``round(j · s / t)`` clamped to the grid (border padding).

Checked against MONAI 1.2.0 itself (the authors' version, run outside the test suite): both resamplings give
bit-identical volumes and label maps over 3 in-plane × 11 slice spacings (0.625–5 mm, exact half-voxel ties,
spacings within 1e-3 mm of the target) × 4 sizes, and the whole pipeline gives the same label maps as the authors'
MONAI transform chain on the example CT scans (3 mm, both percentile paths) with random weights.

Choices where the spec is silent (or where MONAI leaves the outcome to rounding noise):

* Ties. Where ``j · s / t`` is exactly a half-integer (3 mm slices resampled to 2 mm and back, 1 mm, 2.5 mm, 5 mm
  …), the exact value does not decide which slice nearest interpolation takes: MONAI's float64 affine algebra
  does, and :func:`grid_coordinates` reproduces it. Where ``(n - 1) · s / t + 1`` is a half-integer, numpy's
  round (half to even) decides, as in MONAI. Two equally large components of one organ: the one met first in
  raster order is kept (MONAI's numpy ``argsort`` leaves this to the sort implementation).
* Spacing and direction come from the image header as SimpleITK reads it (MONAI's nibabel reader derives the
  voxel size from the affine's column norms); directions are not used, as the resampling keeps them.
* Step 13 crops the step-5 (z-scored) volume, not the 0–255 one: MONAI's ``NormalizeIntensity`` works in place,
  so the authors' script hands phase 2 the step-4 image already z-scored over the whole volume, and step 14
  z-scores it again. A z-score is invariant under the positive affine map of the first one, so this equals
  docs/method.md §5.4 up to float rounding; we follow the script so that the rounding is the authors' too.
* An image with no voxel above its 5th percentile (blank image), or a locator that finds nothing: an all-zero
  label map and a warning.
* Multi-channel images are refused (the reference reads one channel); ``return_probabilities`` is refused.
* Devices: CUDA runs both networks under fp16 autocast like the reference; CPU and MPS run them in float32. All
  pre- and post-processing runs on the CPU, like the reference's MONAI transforms.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_samflare.errors import InputError
from nnunet_samflare.inference.cascade import CasePrediction
from nnunet_samflare.inference.postprocessing import postprocess_flare
from nnunet_samflare.inference.roi import MIN_LOCATOR_COMPONENT_MM3, Box, bounding_box, remove_small_components
from nnunet_samflare.interop import PHASES, convert_reference_state_dict, load_reference_checkpoint

__all__ = [
    "LOCATOR_INPUT_SIZE",
    "SEGMENTER_PATCH",
    "TARGET_SPACING_XYZ",
    "ReferencePipeline",
    "load_weights",
    "normalize_nonzero",
    "grid_coordinates",
    "resample_linear",
    "resample_nearest",
    "resampled_grid",
    "scale_intensity_percentiles",
    "sliding_window_logits",
    "window_starts",
]

#: Target spacing of the reference, mm, in its (x, y, z) voxel order (docs/method.md §5.1 step 4).
TARGET_SPACING_XYZ = (1.5, 1.5, 2.0)
LOCATOR_INPUT_SIZE = (128, 128, 128)
SEGMENTER_PATCH = (96, 96, 96)
WINDOW_OVERLAP = 0.5
PERCENTILES = (5.0, 95.0)
#: MONAI's ``percentile`` switches from torch.quantile to np.percentile above this many elements.
_NUMPY_PERCENTILE_ABOVE = 1_000_000


# ----------------------------------------------------------------------------------------------------------------
# Weights


def _network(phase: str) -> nn.Module:
    from nnunet_samflare.networks import PConvLocator, SAMHybridUNet

    return PConvLocator() if phase == "locator" else SAMHybridUNet()


def load_weights(path: str | os.PathLike, phase: str) -> dict[str, torch.Tensor]:
    """The state dict of the default ``PConvLocator()`` (``phase="locator"``) or ``SAMHybridUNet()``
    (``"segmenter"``) from ``path``: the authors' checkpoint (raw or nested, converted here) or one already
    converted by ``samflare convert-weights``. Raises a one-line :class:`InputError` naming the file."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{phase} weights not found")
    try:
        state_dict = load_reference_checkpoint(path)
    except ValueError as e:
        raise InputError(path, str(e).removeprefix(f"{path}: ")) from None
    with torch.device("meta"):
        expected = {k: v.shape for k, v in _network(phase).state_dict().items()}
    if set(state_dict) == set(expected):  # already in our names (samflare convert-weights)
        for key, shape in expected.items():
            if state_dict[key].shape != shape:
                hint = ""
                if phase == "locator" and key.startswith("decoder.seg_layers.0."):
                    hint = " (a 1-logit head from convert-weights --single-logit? convert without it)"
                raise InputError(
                    path, f"{key} has shape {tuple(state_dict[key].shape)}, the {phase} needs {tuple(shape)}{hint}"
                )
        return {k: state_dict[k] for k in expected}
    try:
        return convert_reference_state_dict(state_dict, phase)
    except ValueError as e:
        raise InputError(path, f"not the authors' {phase} weights: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# MONAI-equivalent transforms (float32 torch tensors, (x, y, z), on the CPU)


def scale_intensity_percentiles(image: torch.Tensor) -> torch.Tensor:
    """Step 2: [p5, p95] of the whole volume -> [0, 255], clipped (MONAI ``ScaleIntensityRangePercentiles``)."""
    image = image.to(torch.float32)
    if image.numel() > _NUMPY_PERCENTILE_ABOVE:
        array = image.numpy()
        low, high = (torch.as_tensor(np.percentile(array, q), dtype=torch.float32) for q in PERCENTILES)
    else:
        q = torch.tensor([p / 100.0 for p in PERCENTILES], dtype=torch.float32)
        low, high = torch.quantile(image, q)
    if high - low == 0:
        return image - low
    scaled = (image - low) / (high - low) * 255
    return torch.clamp(scaled, 0, 255)


def normalize_nonzero(image: torch.Tensor) -> torch.Tensor:
    """Steps 5 and 14: MONAI ``NormalizeIntensity(nonzero=True)`` on a copy of ``image`` (float32)."""
    image = image.to(torch.float32).clone()
    nonzero = image != 0
    if not nonzero.any():
        return image
    values = image[nonzero]
    mean = torch.mean(values).item()
    std = torch.std(values, unbiased=False).item()
    image[nonzero] = (values - mean) / (std if std != 0.0 else 1.0)
    return image


#: MONAI's ``AFFINE_TOL``: spacings (and index maps) this close count as equal.
_AFFINE_TOL = 1e-3


def resampled_grid(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] = TARGET_SPACING_XYZ
) -> tuple[list[float], list[int], bool]:
    """Step 4's output grid as MONAI ``Spacing`` chooses it: ``(grid spacing, size, unchanged)``.

    An axis whose spacing is within 1e-3 mm of the target keeps its own spacing. The size per axis is
    ``round((n - 1) · s / t + 1)`` (numpy's round, half to even; at least 1). ``unchanged`` is MONAI's
    no-resampling shortcut: same size, and spacings (or the index map) equal to within ``atol=1e-3``."""
    grid = [float(s) if abs(s - t) <= _AFFINE_TOL else float(t) for s, t in zip(spacing, target)]
    size = [max(1, int(np.round((n - 1) * (s / t) + 1.0))) for n, s, t in zip(shape, spacing, grid)]
    close_spacing = all(abs(s - t) <= _AFFINE_TOL + 1e-5 * abs(t) for s, t in zip(spacing, grid))
    close_map = all(abs(t / s - 1.0) <= _AFFINE_TOL + 1e-5 for s, t in zip(spacing, grid))
    unchanged = list(size) == list(shape) and (close_spacing or close_map)
    return grid, size, unchanged


def grid_coordinates(in_shape: Sequence[int], out_shape: Sequence[int], ratios: Sequence[float]) -> list[torch.Tensor]:
    """Per axis, the normalised sampling coordinates (``grid_sample``'s [-1, 1] convention, align_corners False)
    of an output grid of ``out_shape`` whose voxel j sits at input index ``j · ratio`` (ratio = output spacing /
    input spacing), with the same float64 arithmetic as MONAI's ``SpatialResample``: the index-to-index matrix
    is wrapped in the normalising matrices of both grids (``src_norm @ xform @ inverse(dst_norm)``) and applied
    to ``affine_grid``'s base coordinates. At exact half-voxel ties this arithmetic, not the exact value, decides
    which voxel nearest interpolation takes, so it is reproduced rather than simplified."""

    def normalising(shape: Sequence[int]) -> torch.Tensor:
        size = torch.tensor([float(n) for n in shape], dtype=torch.float64)
        matrix = torch.diag(torch.cat((2.0 / size, torch.ones(1, dtype=torch.float64))))
        matrix[:-1, -1] = 1.0 / size - 1.0
        return matrix[None]

    xform = torch.diag(torch.tensor([float(r) for r in ratios] + [1.0], dtype=torch.float64))[None]
    theta = normalising(in_shape) @ xform @ torch.inverse(normalising(out_shape))
    coordinates = []
    for axis, n in enumerate(out_shape):
        base = torch.zeros(1, dtype=torch.float64)
        if n > 1:  # affine_grid's base grid for align_corners=False
            base = torch.linspace(-1, 1, n, dtype=torch.float64) * (n - 1) / n
        coordinates.append(base * theta[0, axis, axis] + theta[0, axis, 3])
    return coordinates


#: Output rows resampled per ``grid_sample`` call: bounds the sampling grid's memory, not the result.
_ROWS_PER_CALL = 8


def _grid_resample(volume: torch.Tensor, out_shape: Sequence[int], ratios: Sequence[float], mode: str) -> torch.Tensor:
    """``volume`` (float64 (X, Y, Z)) sampled by ``grid_sample`` (border padding, align_corners False) on the grid
    of :func:`grid_coordinates`, a few output rows at a time (each output voxel is computed on its own, so the
    result is that of one call over the whole grid)."""
    gx, gy, gz = grid_coordinates(volume.shape, out_shape, ratios)
    source = volume[None, None].contiguous()
    out = torch.empty(tuple(out_shape), dtype=volume.dtype)
    for start in range(0, out_shape[0], _ROWS_PER_CALL):
        rows = gx[start : start + _ROWS_PER_CALL]
        # grid_sample's last grid component indexes the first array axis (MONAI's reverse_indexing).
        grid = torch.stack(torch.broadcast_tensors(gz[None, None, :], gy[None, :, None], rows[:, None, None]), dim=-1)
        sampled = F.grid_sample(source, grid[None], mode=mode, padding_mode="border", align_corners=False)
        out[start : start + len(rows)] = sampled[0, 0]
    return out


def resample_linear(
    volume: torch.Tensor, spacing: Sequence[float], target: Sequence[float] = TARGET_SPACING_XYZ
) -> tuple[torch.Tensor, list[float]]:
    """Step 4 (MONAI ``Spacing``, mode bilinear): ``volume`` (spacing ``spacing``) on the grid of
    :func:`resampled_grid`, which starts on its first voxel; trilinear, border padding, computed in float64,
    returned as float32 with the grid's spacing. An unchanged grid returns ``volume`` itself, as MONAI does."""
    grid, shape, unchanged = resampled_grid(volume.shape, spacing, target)
    if unchanged:
        return volume.to(torch.float32), [float(s) for s in spacing]
    ratios = [t / float(s) for s, t in zip(spacing, grid)]
    return _grid_resample(volume.to(torch.float64), shape, ratios, "bilinear").to(torch.float32), grid


def resample_nearest(
    labels: torch.Tensor, spacing: Sequence[float], target: Sequence[float], shape: Sequence[int]
) -> torch.Tensor:
    """Step 22: labels on spacing ``spacing`` brought to the grid of spacing ``target`` and size ``shape`` that
    starts on the same first voxel; output voxel j takes input voxel ``round(j · target / spacing)`` (half to
    even, on MONAI's float64 coordinates: see :func:`grid_coordinates`), clamped to the grid (MONAI's
    ``Spacing`` inverse with nearest interpolation). Returns ``labels``' dtype."""
    ratios = [float(t) / float(s) for s, t in zip(spacing, target)]
    return _grid_resample(labels.to(torch.float64), shape, ratios, "nearest").to(labels.dtype)


def window_starts(size: int, patch: int, overlap: float = WINDOW_OVERLAP) -> list[int]:
    """Window starts along one axis of size >= ``patch``, as MONAI's ``sliding_window_inference`` places them."""
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the window {patch}; pad it first")
    interval = patch if size == patch else max(int(patch * (1 - overlap)), 1)
    count = next(d for d in range(math.ceil(size / interval)) if d * interval + patch >= size) + 1
    return [min(d * interval, size - patch) for d in range(count)]


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.inference_mode()
def sliding_window_logits(
    network: nn.Module,
    volume: torch.Tensor,
    device: torch.device,
    patch: Sequence[int] = SEGMENTER_PATCH,
    overlap: float = WINDOW_OVERLAP,
) -> torch.Tensor:
    """Step 16: ``(classes, X, Y, Z)`` float32 CPU logits of a CPU ``(X, Y, Z)`` volume whose axes are all >=
    ``patch``: windows one at a time on ``device`` (fp16 autocast on CUDA), summed in float32 on the CPU and
    divided by the number of windows covering each voxel."""
    starts = [window_starts(n, p, overlap) for n, p in zip(volume.shape, patch)]
    total: torch.Tensor | None = None
    count = torch.zeros(volume.shape, dtype=torch.float32)
    for corner in itertools.product(*starts):
        region = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        window = volume[region].contiguous()[None, None].to(device)
        with _autocast(device):
            logits = network(window)[0].to("cpu")
        if total is None:
            total = torch.zeros((logits.shape[0], *volume.shape), dtype=torch.float32)
        total[(slice(None), *region)] += logits
        count[region] += 1
    return total / count


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


def _crop(volume: torch.Tensor, box: Box) -> torch.Tensor:
    return volume[tuple(slice(lo, hi) for lo, hi in box)]


def _paste(roi: torch.Tensor, box: Box, shape: Sequence[int]) -> torch.Tensor:
    full = torch.zeros(tuple(shape), dtype=roi.dtype)
    full[tuple(slice(lo, hi) for lo, hi in box)] = roi
    return full


class ReferencePipeline:
    """The authors' two-phase inference (module docstring) with given networks, applied case by case.

    ``locator`` maps ``(1, 1, 128, 128, 128)`` to 2-class logits, ``segmenter`` ``(1, 1, 96, 96, 96)`` to 15-class
    logits; :meth:`from_weights` builds the paper's networks from the authors' weight files. It has the interface
    of :class:`~nnunet_samflare.inference.cascade.CascadePredictor` that ``nnunet_samflare.predict`` uses.
    """

    num_input_channels = 1

    def __init__(self, locator: nn.Module, segmenter: nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.locator = locator.to(self.device).eval()
        self.segmenter = segmenter.to(self.device).eval()

    @classmethod
    def from_weights(
        cls,
        locator_weights: str | os.PathLike,
        segmenter_weights: str | os.PathLike,
        device: str | torch.device = "cpu",
    ) -> ReferencePipeline:
        """The paper's ``PConvLocator()`` and ``SAMHybridUNet()`` with weights from :func:`load_weights`."""
        networks = []
        for phase, path in (("locator", locator_weights), ("segmenter", segmenter_weights)):
            if path is None:
                raise InputError(None, f"the reference pipeline needs the {phase} weights (--{phase}_weights FILE)")
            state_dict = load_weights(path, phase)
            network = _network(phase)
            network.load_state_dict(state_dict)
            networks.append(network)
        return cls(*networks, device=device)

    # -- phase 1 -------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def locate(self, normalized: torch.Tensor) -> Box | None:
        """Steps 6–12: the ROI box on the step-4 grid (``normalized``: the step-5 volume, (x, y, z)), or None."""
        resized = F.interpolate(normalized[None, None], size=LOCATOR_INPUT_SIZE, mode="trilinear")
        with _autocast(self.device):
            logits = self.locator(resized.to(self.device))[0].to("cpu")
        foreground = torch.argmax(torch.softmax(logits, dim=0), dim=0)
        foreground = F.interpolate(foreground[None, None].float(), size=tuple(normalized.shape), mode="nearest")[0, 0]
        kept = remove_small_components(foreground.numpy() > 0, TARGET_SPACING_XYZ, MIN_LOCATOR_COMPONENT_MM3)
        return bounding_box(kept)

    # -- phase 2 -------------------------------------------------------------------------------------------------

    def segment(self, normalized: torch.Tensor, box: Box) -> torch.Tensor:
        """Steps 13–21: the post-processed uint8 label map of the step-4 grid (zeros outside ``box``).
        ``normalized`` is the step-5 volume (see the module docstring on step 13)."""
        roi = normalize_nonzero(_crop(normalized, box))
        padding = []
        for n, p in zip(reversed(roi.shape), reversed(SEGMENTER_PATCH)):  # F.pad lists the last axis first
            padding += [0, max(p - n, 0)]
        padded = F.pad(roi, padding, mode="constant", value=0.0)
        logits = sliding_window_logits(self.segmenter, padded, self.device)
        labels = torch.argmax(torch.softmax(logits, dim=0), dim=0).to(torch.uint8)
        del logits
        labels = torch.from_numpy(postprocess_flare(labels.numpy()))
        labels = labels[tuple(slice(0, n) for n in roi.shape)]
        return _paste(labels, box, normalized.shape)

    # -- whole case ----------------------------------------------------------------------------------------------

    def predict_volume(
        self, image_xyz: np.ndarray | torch.Tensor, spacing_xyz: Sequence[float], timings: dict | None = None
    ) -> tuple[np.ndarray, Box | None]:
        """The label map (uint8, (x, y, z), same shape) of one CT volume in the reference's voxel order, and the
        ROI box in that volume's voxel grid (None if nothing was found)."""
        timings = {} if timings is None else timings
        spacing = [float(s) for s in spacing_xyz]
        start = time.perf_counter()
        # Contiguous (x, y, z), as MONAI holds it: reductions (percentiles, mean, std) then see the same order.
        image = torch.as_tensor(np.ascontiguousarray(image_xyz, dtype=np.float32))
        scaled = scale_intensity_percentiles(image)
        crop_box = bounding_box(scaled.numpy() > 0)
        if crop_box is None:
            warnings.warn("no voxel above the 5th percentile: writing an all-background label map", stacklevel=2)
            return np.zeros(image.shape, dtype=np.uint8), None
        cropped = _crop(scaled, crop_box)
        resampled, grid_spacing = resample_linear(cropped, spacing)
        normalized = normalize_nonzero(resampled)
        del resampled
        _lap(timings, "preprocess", start, self.device)
        start = time.perf_counter()
        roi_box = self.locate(normalized)
        _lap(timings, "locator", start, self.device)
        if roi_box is None:
            warnings.warn("the locator found no foreground: writing an all-background label map", stacklevel=2)
            return np.zeros(image.shape, dtype=np.uint8), None
        start = time.perf_counter()
        labels = self.segment(normalized, roi_box)
        _lap(timings, "segmenter", start, self.device)
        start = time.perf_counter()
        labels = resample_nearest(labels, grid_spacing, spacing, cropped.shape)
        labels = _paste(labels, crop_box, image.shape)
        _lap(timings, "postprocess", start, self.device)
        return labels.numpy(), _original_box(roi_box, crop_box, spacing, grid_spacing, cropped.shape)

    def predict_case(self, data: np.ndarray, properties: dict, return_probabilities: bool = False) -> CasePrediction:
        """One case as ``nnunet_samflare.io.read_case`` gives it: ``data`` (1, z, y, x) float32. The label map comes
        back in (z, y, x) with the input's geometry; the box is in the input's (z, y, x) voxel grid."""
        if return_probabilities:
            raise ValueError("the reference pipeline gives label maps only (no --save_probabilities)")
        if data.shape[0] != 1:
            raise InputError(None, f"the reference pipeline reads one image channel, got {data.shape[0]}")
        timings: dict[str, float] = {}
        spacing_xyz = properties["sitk_stuff"]["spacing"]
        labels, box = self.predict_volume(data[0].transpose(2, 1, 0), spacing_xyz, timings)
        box_zyx = None if box is None else box[::-1]
        return CasePrediction(np.ascontiguousarray(labels.transpose(2, 1, 0)), properties, box_zyx, timings)


def _original_box(
    roi_box: Box, crop_box: Box, spacing: Sequence[float], grid_spacing: Sequence[float], cropped_shape: Sequence[int]
) -> Box:
    """The ROI (step-4 grid) as voxel ranges of the input image, rounded outward (for reports only)."""
    box = []
    for (lo, hi), (crop_lo, _), s, t, n in zip(roi_box, crop_box, spacing, grid_spacing, cropped_shape):
        first = math.floor(lo * t / s)
        last = min(n, math.ceil((hi - 1) * t / s) + 1)
        box.append([crop_lo + first, crop_lo + max(last, first + 1)])
    return box


def _lap(timings: dict[str, float], stage: str, start: float, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
