"""The two-phase cascade at inference time: locate → crop → segment → paste back → post-process.

``CascadePredictor`` composes two ``nnUNetPredictor``s (one per model folder) and reuses nnU-Net's
preprocessing, sliding window and label handling. Its steps are public so that the same code also serves the
composed path ``samflare locate`` → stock ``nnUNetv2_predict`` → ``samflare uncrop`` → ``samflare postprocess``;
both paths therefore give identical label maps.

How a case flows (arrays in SimpleITK (z, y, x) order unless said otherwise):

1. the locator's own nnU-Net preprocessing (coarse grid) and sliding window → binary foreground;
2. components under 36 cm³ removed (METHOD §5.3, as a physical volume), the box of what remains mapped back to
   the original voxel grid and grown by a margin in mm;
3. the ROI of the original image is resampled to the segmenter's spacing with the segmenter configuration's own
   resampling function. This is the image ``samflare locate`` writes, so stock nnU-Net sees exactly this array,
   and nnU-Net's preprocessing then has nothing left to resample;
4. segmenter sliding window on the device, argmax on the device (the reference also works on its 1.5×1.5×2 mm
   grid, METHOD §5.6–5.7). Only the uint8 label map leaves the device: no full-resolution probabilities exist
   unless they are asked for;
5. labels brought to the ROI's original resolution by nearest-neighbour interpolation and pasted into the full
   image; then the FLARE post-processing (per-organ largest component, isolated-tumour removal).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_samflare.errors import InputError
from nnunet_samflare.inference.postprocessing import postprocess_flare
from nnunet_samflare.inference.roi import (
    MIN_LOCATOR_COMPONENT_MM3,
    Box,
    bounding_box,
    crop_to_roi,
    expand_box_mm,
    paste_roi,
    remove_small_components,
)
from nnunet_samflare.training.names import (  # the configuration names stay importable from here
    DEFAULT_PLANS_NAME,
    LOCATOR_CONFIGURATION,  # noqa: F401
    LOCATOR_TRAINER,
    SEGMENTER_CONFIGURATION,  # noqa: F401
    SEGMENTER_TRAINER,
)
from nnunet_samflare.training.plans import transposed

#: Margin (mm) added around the locator's box on every side. The reference uses none (METHOD §7 #19); a margin
#: absorbs a locator that stops a little short of an organ's edge, at the cost of a few more segmenter tiles.
#: The segmenter trainer draws its training margin from 0–20 mm, which brackets this value.
DEFAULT_ROI_MARGIN_MM = 10.0

DEFAULT_PLANS = DEFAULT_PLANS_NAME
DEFAULT_LOCATOR_TRAINER = LOCATOR_TRAINER
DEFAULT_SEGMENTER_TRAINER = SEGMENTER_TRAINER


def model_folder(dataset: str | int, trainer: str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``, as nnUNetv2_predict finds it."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_results:
        raise InputError(None, "nnUNet_results is not set: give --locator and --segmenter model folders explicitly")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise FileNotFoundError(f"dataset {dataset}: {' '.join(str(e).split())}") from None
    return Path(nnUNet_results) / name / f"{trainer}__{plans}__{configuration}"


def available_folds(folder: Path, checkpoint_name: str) -> list[int | str]:
    """Cross-validation folds holding the checkpoint; ``["all"]`` for a model trained on fold ``all`` only."""
    numeric = sorted(
        int(p.name[5:]) for p in folder.glob("fold_*") if p.name[5:].isdigit() and (p / checkpoint_name).is_file()
    )
    if numeric:
        return numeric
    return ["all"] if (folder / "fold_all" / checkpoint_name).is_file() else []


def load_predictor(
    folder: str | os.PathLike,
    folds: Sequence[int | str] | None,
    checkpoint_name: str,
    device: torch.device,
    tile_step_size: float,
    use_gaussian: bool,
    use_mirroring: bool,
    tile_batch_size: int = 1,
):
    """An initialised ``nnUNetPredictor`` for one model folder; a clear one-line error if it is not usable."""
    from nnunet_samflare.inference.tiling import TileBatchingPredictor

    folder = Path(folder)
    for required in ("plans.json", "dataset.json"):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"{folder}: not a trained model folder ({required} missing)")
    if folds is None:
        folds = available_folds(folder, checkpoint_name)
        if not folds:
            raise FileNotFoundError(f"{folder}: no fold_* folder holds {checkpoint_name}")
    for fold in folds:
        checkpoint = folder / f"fold_{fold}" / checkpoint_name
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: checkpoint missing")
    # nnU-Net narrates device choice and trainer lookup on stdout; a prediction tool's stdout should stay quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = TileBatchingPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=use_gaussian,
            use_mirroring=use_mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(str(folder), list(folds), checkpoint_name)
    predictor.tile_batch_size = tile_batch_size
    if len(predictor.list_of_parameters) == 1:
        # One set of weights: load it once here instead of once per case.
        predictor.network.load_state_dict(predictor.list_of_parameters[0])
    predictor.network.to(device).eval()
    return predictor


@torch.inference_mode()
def sliding_window_logits(predictor, data: torch.Tensor) -> torch.Tensor:
    """Sliding-window logits of a preprocessed (c, z, y, x) array, averaged over the predictor's folds and
    left on its device (nnU-Net's ``predict_logits_from_preprocessed_data`` moves them to the host).

    Like nnU-Net, CPU threads are capped at ``nnUNet_def_n_proc``: besides matching its speed, the same thread
    count gives bit-identical float results to stock ``nnUNetv2_predict`` on a CPU.
    """
    from nnunetv2.configuration import default_num_processes

    threads = torch.get_num_threads()
    torch.set_num_threads(min(default_num_processes, threads))
    try:
        parameters = predictor.list_of_parameters
        if len(parameters) == 1:
            return predictor.predict_sliding_window_return_logits(data)
        total = None
        for weights in parameters:
            predictor.network.load_state_dict(weights)
            logits = predictor.predict_sliding_window_return_logits(data).float()
            total = logits if total is None else total + logits
        return total / len(parameters)
    finally:
        torch.set_num_threads(threads)


def preprocessed_to_original_box(box: Box, properties: dict, transpose_backward: Sequence[int]) -> Box:
    """Map a ``[lo, hi)`` box on nnU-Net's preprocessed grid back to the original image's voxel grid.

    nnU-Net transposes, crops to the nonzero region, then resizes; the box is scaled by the resize factor
    (rounded outward, so it never shrinks), shifted by the crop and transposed back.
    """
    crop = properties["bbox_used_for_cropping"]
    cropped_shape = properties["shape_after_cropping_and_before_resampling"]
    grid_shape = properties["grid_shape"]
    mapped = []
    for (lo, hi), (crop_lo, crop_hi), n_cropped, n_grid in zip(box, crop, cropped_shape, grid_shape):
        scale = n_cropped / n_grid
        mapped.append([
            max(crop_lo, crop_lo + math.floor(lo * scale)),
            min(crop_hi, crop_lo + math.ceil(hi * scale)),
        ])
    return transposed(mapped, transpose_backward)


def resample_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> list[int]:
    """nnU-Net's ``compute_new_shape``, but never an empty axis (a thin ROI on a coarser grid)."""
    return [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing)]


@dataclass
class SegmenterInput:
    """The ROI as the segmenter sees it: resampled to its spacing, with SimpleITK-style geometry.

    ``data`` is (c, z, y, x) float32; ``properties`` follow nnU-Net's SimpleITKIO format, so the ROI can be
    written as an image (``samflare locate``) and read back by stock nnU-Net unchanged.
    """

    data: np.ndarray
    properties: dict[str, Any]


@dataclass
class CasePrediction:
    """Result of one case: full-size label map (z, y, x) in the input's geometry, and where the time went."""

    segmentation: np.ndarray
    properties: dict[str, Any]
    box: Box | None
    timings: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None


class CascadePredictor:
    """Locator + segmenter, loaded once, applied to any number of cases.

    Defaults follow METHOD §11.5: no mirroring TTA, tile step 0.5, uniform tile blending, mixed precision on
    CUDA (nnU-Net's). ``use_mirroring`` and ``use_gaussian`` switch on nnU-Net's TTA and Gaussian blending.
    ``tile_batch_size`` segmenter tiles go through the network at once (default: 2 on CUDA, 1 elsewhere, where
    batching gains nothing and 1 keeps results bit-identical to stock nnUNetv2_predict).
    """

    def __init__(
        self,
        locator_folder: str | os.PathLike,
        segmenter_folder: str | os.PathLike,
        *,
        folds: Sequence[int | str] | None = None,
        checkpoint_name: str = "checkpoint_final.pth",
        device: str | torch.device = "cuda",
        tile_step_size: float = 0.5,
        use_gaussian: bool = False,
        use_mirroring: bool = False,
        roi_margin_mm: float = DEFAULT_ROI_MARGIN_MM,
        min_component_mm3: float = MIN_LOCATOR_COMPONENT_MM3,
        postprocess: bool = True,
        tile_batch_size: int | None = None,
    ):
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        settings = dict(
            checkpoint_name=checkpoint_name,
            device=self.device,
            tile_step_size=tile_step_size,
            use_gaussian=use_gaussian,
            use_mirroring=use_mirroring,
        )
        if tile_batch_size is None:
            tile_batch_size = 2 if self.device.type == "cuda" else 1
        self.locator = load_predictor(locator_folder, folds, **settings)
        self.segmenter = load_predictor(segmenter_folder, folds, tile_batch_size=tile_batch_size, **settings)
        self.roi_margin_mm = roi_margin_mm
        self.min_component_mm3 = min_component_mm3
        self.postprocess = postprocess

    @property
    def num_input_channels(self) -> int:
        return len(self.segmenter.dataset_json["channel_names"])

    # -- phase 1 ---------------------------------------------------------------------------------------------

    def _preprocess(self, predictor, data: np.ndarray, properties: dict) -> tuple[torch.Tensor, dict]:
        configuration = predictor.configuration_manager
        preprocessor = configuration.preprocessor_class(verbose=False)
        preprocessed, _, properties = preprocessor.run_case_npy(
            data, None, copy.deepcopy(properties), predictor.plans_manager, configuration, predictor.dataset_json
        )
        return torch.from_numpy(np.ascontiguousarray(preprocessed)), properties

    def locate(self, data: np.ndarray, properties: dict, timings: dict | None = None) -> Box | None:
        """The ROI box of a case in its original voxel grid, or None if the locator finds no foreground."""
        timings = {} if timings is None else timings
        with _timed(timings, "preprocess", self.device):
            preprocessed, grid_properties = self._preprocess(self.locator, data, properties)
        with _timed(timings, "locator", self.device):
            logits = sliding_window_logits(self.locator, preprocessed)
            foreground = (self.locator.label_manager.convert_logits_to_segmentation(logits) > 0).cpu().numpy()
        spacing = self.locator.configuration_manager.spacing
        foreground = remove_small_components(foreground, spacing, self.min_component_mm3)
        box = bounding_box(foreground)
        if box is None:
            return None
        grid_properties["grid_shape"] = foreground.shape
        box = preprocessed_to_original_box(box, grid_properties, self.locator.plans_manager.transpose_backward)
        return expand_box_mm(box, properties["spacing"], self.roi_margin_mm, data.shape[1:])

    # -- phase 2 ---------------------------------------------------------------------------------------------

    def segmenter_input(self, data: np.ndarray, properties: dict, box: Box) -> SegmenterInput:
        """Crop ``data`` to ``box`` and resample it to the segmenter's spacing (step 3 of the module docstring)."""
        plans_manager = self.segmenter.plans_manager
        configuration = self.segmenter.configuration_manager
        spacing = list(properties["spacing"])
        target = transposed(configuration.spacing, plans_manager.transpose_backward)
        roi = np.ascontiguousarray(crop_to_roi(data, box))
        shape = resample_shape(roi.shape[1:], spacing, target)
        if list(roi.shape[1:]) != shape:
            roi = configuration.resampling_fn_data(roi, shape, spacing, target).astype(np.float32, copy=False)
        # World position of the resampled grid: nnU-Net's resize maps new voxel centre j to old continuous index
        # (j + 0.5) * old/new - 0.5, counted from the box corner.
        geometry = properties["sitk_stuff"]
        direction = np.asarray(geometry["direction"], dtype=float).reshape(3, 3)
        first_index_zyx = [lo + 0.5 * (hi - lo) / n - 0.5 for (lo, hi), n in zip(box, shape)]
        origin = np.asarray(geometry["origin"]) + direction @ (
            np.asarray(first_index_zyx[::-1]) * np.asarray(geometry["spacing"])
        )
        roi_properties = {
            "sitk_stuff": {
                "spacing": tuple(float(s) for s in target[::-1]),
                "origin": tuple(float(o) for o in origin),
                "direction": tuple(geometry["direction"]),
            },
            "spacing": [float(s) for s in target],
        }
        return SegmenterInput(roi, roi_properties)

    @torch.inference_mode()
    def segment(self, roi: SegmenterInput, timings: dict | None = None, return_probabilities: bool = False):
        """Label map of the resampled ROI (uint8 tensor on the device, (z, y, x) in original axis order), and its
        class probabilities on the same grid if asked for."""
        timings = {} if timings is None else timings
        plans_manager = self.segmenter.plans_manager
        with _timed(timings, "preprocess", self.device):
            preprocessed, grid_properties = self._preprocess(self.segmenter, roi.data, roi.properties)
        with _timed(timings, "segmenter", self.device):
            logits = sliding_window_logits(self.segmenter, preprocessed)
            label_manager = self.segmenter.label_manager
            labels = label_manager.convert_logits_to_segmentation(logits).to(torch.uint8)
            # Undo nnU-Net's crop to the nonzero region and its transpose, as its exporter does.
            full = torch.zeros(grid_properties["shape_before_cropping"], dtype=torch.uint8, device=labels.device)
            full[tuple(slice(lo, hi) for lo, hi in grid_properties["bbox_used_for_cropping"])] = labels
            labels = full.permute(*plans_manager.transpose_backward)
            probabilities = None
            if return_probabilities:
                probabilities = label_manager.apply_inference_nonlin(logits)
                probabilities = label_manager.revert_cropping_on_probabilities(
                    probabilities.cpu(),
                    grid_properties["bbox_used_for_cropping"],
                    grid_properties["shape_before_cropping"],
                ).permute(0, *[a + 1 for a in plans_manager.transpose_backward])
        return labels, probabilities

    # -- whole case ------------------------------------------------------------------------------------------

    def predict_case(
        self, data: np.ndarray, properties: dict, return_probabilities: bool = False
    ) -> CasePrediction:
        """Run the cascade on one case (``data`` (c, z, y, x) float32, ``properties`` as from ``read_case``)."""
        timings: dict[str, float] = {}
        full_shape = data.shape[1:]
        box = self.locate(data, properties, timings)
        if box is None:
            warnings.warn("the locator found no foreground: writing an all-background label map", stacklevel=2)
            segmentation = np.zeros(full_shape, dtype=np.uint8)
            probabilities = None
            if return_probabilities:
                probabilities = self._background_probabilities(full_shape)
            return CasePrediction(segmentation, properties, None, timings, probabilities)
        with _timed(timings, "preprocess", self.device):
            roi = self.segmenter_input(data, properties, box)
        labels, probabilities = self.segment(roi, timings, return_probabilities)
        with _timed(timings, "postprocess", self.device):
            box_shape = [hi - lo for lo, hi in box]
            segmentation = paste_roi(resize_nearest(labels, box_shape).cpu().numpy(), box, full_shape)
            if self.postprocess:
                segmentation = postprocess_flare(segmentation)
            if probabilities is not None:
                full_probabilities = self._background_probabilities(full_shape)  # outside the ROI
                full_probabilities[(slice(None), *(slice(lo, hi) for lo, hi in box))] = resize_nearest(
                    probabilities, box_shape
                ).numpy()
                probabilities = full_probabilities
        return CasePrediction(segmentation, properties, box, timings, probabilities)

    def _background_probabilities(self, shape: Sequence[int]) -> np.ndarray:
        label_manager = self.segmenter.label_manager
        probabilities = np.zeros((label_manager.num_segmentation_heads, *shape), dtype=np.float32)
        if not label_manager.has_regions:
            probabilities[0] = 1
        return probabilities


def resize_nearest(array: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (z, y, x) or (c, z, y, x) tensor to spatial ``shape`` on its own device.

    ``nearest-exact`` takes source index floor((j + 0.5) · in / out), the centre-aligned mapping nnU-Net's own
    resize uses, so a label never drifts by half a voxel.
    """
    shape = [int(s) for s in shape]
    if list(array.shape[-3:]) == shape:
        return array
    batched = array[None, None] if array.ndim == 3 else array[None]
    resized = F.interpolate(batched, size=shape, mode="nearest-exact")
    return resized[0, 0] if array.ndim == 3 else resized[0]


@contextmanager
def _timed(timings: dict[str, float], stage: str, device: torch.device):
    """Add the wall time of the block to ``timings[stage]``; waits for queued GPU work so that it is counted."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
