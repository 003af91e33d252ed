"""The two-phase cascade at inference time: locate → crop → segment → paste back → post-process.

``CascadePredictor`` composes two ``nnUNetPredictor``s (one per model folder) and reuses nnU-Net's
preprocessing, sliding window and label handling. Its steps are public so that the same code also serves the
composed path ``samflare locate`` → stock ``nnUNetv2_predict`` → ``samflare uncrop`` → ``samflare postprocess``;
both paths therefore give identical label maps.

How a case flows (arrays in SimpleITK (z, y, x) order unless said otherwise):

1. the locator's own nnU-Net preprocessing (coarse grid) and sliding window → binary foreground;
2. components under 36 cm³ removed (docs/method.md §5.3, as a physical volume), the box of what remains mapped back to
   the original voxel grid and grown by a margin in mm;
3. the ROI of the original image is resampled to the segmenter's spacing with the segmenter configuration's own
   resampling function. This is the image ``samflare locate`` writes, so stock nnU-Net sees exactly this array,
   and nnU-Net's preprocessing then has nothing left to resample;
4. segmenter sliding window on the device, argmax on the device (the reference also works on its 1.5×1.5×2 mm
   grid, docs/method.md §5.6–5.7). Only the uint8 label map leaves the device: no full-resolution probabilities exist
   unless they are asked for, and then nnU-Net's own exporter resamples them (``export_probabilities``);
5. labels brought to the ROI's original resolution by nearest-neighbour interpolation and pasted into the full
   image; then the FLARE post-processing (per-organ largest component, isolated-tumour removal) on the ROI.

Preprocessing (steps 1 and 3, and nnU-Net's normalisation before step 4) is nnU-Net's, computed slab by slab
and one axis at a time by :mod:`nnunet_samflare.inference.preprocessing`: the same numbers to float32
rounding, without the float64 copies of the whole scan that make it the slowest and largest step on a CPU.
Memory therefore grows with the ROI, not with the scan: besides the float32 scan that reading makes (as
nnU-Net's reader does), the largest arrays are the uint8 label map and the ROI on the segmenter's grid.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_samflare.errors import InputError
from nnunet_samflare.inference.memory import release_free_memory
from nnunet_samflare.inference.postprocessing import postprocess_flare
from nnunet_samflare.inference.preprocessing import preprocess_image, resample_with_configuration
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
    plugin_trainer_names,
)
from nnunet_samflare.training.plans import transposed
from nnunet_samflare.training.roi_sampling import DEFAULT_ROI_MARGIN_MM as _DEFAULT_ROI_MARGIN_MM

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

#: Margin (mm) added around the locator's box on every side. Defined in ``training.roi_sampling`` (the segmenter
#: trains around it and is validated with it) and re-exported here.
DEFAULT_ROI_MARGIN_MM = _DEFAULT_ROI_MARGIN_MM

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
    fast_layers: bool = False,
    channels_last: bool = False,
    cpu_bf16: bool = False,
) -> nnUNetPredictor:
    """An initialised ``nnUNetPredictor`` for one model folder; a clear one-line error if it is not usable.
    ``fast_layers`` swaps layers with slow kernels for identical faster forms (``networks.fast_paths``);
    ``channels_last`` runs the network in ``torch.channels_last_3d`` memory format and ``cpu_bf16`` under bfloat16
    autocast on a CPU that has native bfloat16 (see :class:`CascadePredictor`)."""
    from nnunet_samflare.inference.tiling import TileBatchingPredictor, cpu_has_native_bf16
    from nnunet_samflare.networks.fast_paths import use_channels_last, use_fast_paths, use_float32_class_heads

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
        initialize_from_model_folder(predictor, folder, folds, checkpoint_name)
    predictor.tile_batch_size = tile_batch_size
    if cpu_bf16 and device.type == "cpu" and cpu_has_native_bf16():
        predictor.cpu_autocast_dtype = torch.bfloat16
        use_float32_class_heads(predictor.network)  # logits not rounded to bfloat16 (networks.fast_paths)
    if fast_layers:
        use_fast_paths(predictor.network)
    predictor.network.to(device).eval()
    if channels_last:
        use_channels_last(predictor.network)
    if len(predictor.list_of_parameters) == 1:
        # Initialisation already loaded the one set of weights into the network (nnU-Net's and ours alike): share
        # its tensors, so that no second copy is kept and nnU-Net's per-case reload brings nothing new.
        predictor.list_of_parameters = [predictor.network.state_dict()]
    return predictor


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # a torn or foreign file
        raise InputError(path, f"not a readable PyTorch checkpoint ({' '.join(str(e).split())[:200]})") from None


def initialize_from_model_folder(
    predictor: nnUNetPredictor, folder: Path, folds: Sequence[int | str], checkpoint_name: str
) -> None:
    """``predictor.initialize_from_trained_model_folder``, without nnU-Net's trainer lookup for the plug-in's own
    trainers.

    At inference nnU-Net needs the trainer class only for its ``build_network_architecture``. To find the class by
    name it imports every module of its own trainer package, then the plug-in's, and with them nnUNetTrainer's
    logging and plotting stack: 3.8 s of the 6.6 s that loading both models took on the 2-core CPU. None of the
    plug-in's trainers overrides that method (``tests/test_trainers.py``), so their networks are built here as
    nnUNetTrainer builds them, from the plans, and handed to nnU-Net's ``manual_initialization``; any other trainer
    goes through nnU-Net's own path. Checkpoints are memory-mapped: the optimizer state they also hold is never read.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoints = [_load_checkpoint(folder / f"fold_{fold}" / checkpoint_name) for fold in folds]
    trainer_name = checkpoints[0]["trainer_name"]
    if trainer_name not in plugin_trainer_names():
        del checkpoints
        predictor.initialize_from_trained_model_folder(str(folder), list(folds), checkpoint_name)
        return
    plans_manager = PlansManager(load_json(str(folder / "plans.json")))
    dataset_json = load_json(str(folder / "dataset.json"))
    configuration = plans_manager.get_configuration(checkpoints[0]["init_args"]["configuration"])
    network = get_network_from_plans(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        allow_init=True,
        deep_supervision=False,
    )
    parameters = [checkpoint["network_weights"] for checkpoint in checkpoints]
    network.load_state_dict(parameters[0])
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration,
        parameters,
        dataset_json,
        trainer_name,
        checkpoints[0].get("inference_allowed_mirroring_axes"),
    )


@torch.inference_mode()
def sliding_window_logits(predictor: nnUNetPredictor, data: torch.Tensor) -> torch.Tensor:
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
        mapped.append(
            [
                max(crop_lo, crop_lo + math.floor(lo * scale)),
                min(crop_hi, crop_lo + math.ceil(hi * scale)),
            ]
        )
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

    Defaults follow docs/method.md §11.5: no mirroring TTA, tile step 0.5, uniform tile blending, mixed precision on
    CUDA (nnU-Net's). ``use_mirroring`` and ``use_gaussian`` switch on nnU-Net's TTA and Gaussian blending, and
    ``tile_step_size`` sets the step, for the segmenter: the locator always runs with nnU-Net's plain settings.
    ``tile_batch_size`` segmenter tiles go through the network at once (default: 2 on CUDA, 1 elsewhere, where
    batching gains nothing and 1 keeps results bit-identical to stock nnUNetv2_predict). ``fast_layers`` evaluates
    the segmenter's grouped 1×1×1 convolutions as matrix products (the same function, ``networks.fast_paths``);
    opt-in: it measured no faster on a CPU and is unmeasured on a GPU (``benchmarks/gpu_check.sh`` compares).
    ``channels_last`` runs the segmenter in ``torch.channels_last_3d`` memory format, its instance norms as group
    norms that keep that format (``networks.fast_paths``): the same function (outputs equal to float rounding),
    and on a CPU oneDNN's channels-last convolutions plus token reshapes that become views made the segmenter
    1.7× faster (``BENCHMARKS.md``). ``cpu_bf16`` runs the segmenter under bfloat16 autocast on a CPU with native
    bfloat16 instructions (ignored elsewhere, and on CUDA, where nnU-Net's own fp16 autocast applies): another ~2×
    on the 2-core VM, at the cost of bfloat16 rounding inside the network (its class head computes in float32, so
    the logits themselves are not rounded; labels against the float32 default in ``BENCHMARKS.md``). Both are off
    by default because their rounding differs from stock ``nnUNetv2_predict``'s, which would break the
    bit-identity of the composed path (``samflare locate`` → ``nnUNetv2_predict`` → ``samflare uncrop``);
    ``samflare predict --fast`` turns both on.
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
        fast_layers: bool = False,
        channels_last: bool = False,
        cpu_bf16: bool = False,
    ):
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        settings = dict(checkpoint_name=checkpoint_name, device=self.device, fast_layers=fast_layers)
        if tile_batch_size is None:
            tile_batch_size = 2 if self.device.type == "cuda" else 1
        # The sliding-window settings are the segmenter's. The locator keeps nnU-Net's plain ones whatever they are,
        # so that its box is the same as `samflare locate` finds (which has no such flags) for the composed path.
        self.locator = load_predictor(
            locator_folder, folds, tile_step_size=0.5, use_gaussian=False, use_mirroring=False, **settings
        )
        self.segmenter = load_predictor(
            segmenter_folder,
            folds,
            tile_step_size=tile_step_size,
            use_gaussian=use_gaussian,
            use_mirroring=use_mirroring,
            tile_batch_size=tile_batch_size,
            channels_last=channels_last,
            cpu_bf16=cpu_bf16,
            **settings,
        )
        self.roi_margin_mm = roi_margin_mm
        self.min_component_mm3 = min_component_mm3
        self.postprocess = postprocess

    @property
    def num_input_channels(self) -> int:
        return len(self.segmenter.dataset_json["channel_names"])

    # -- phase 1 ---------------------------------------------------------------------------------------------

    def _preprocess(self, predictor: nnUNetPredictor, data: np.ndarray, properties: dict) -> tuple[torch.Tensor, dict]:
        """nnU-Net's preprocessing of ``data`` for ``predictor``'s configuration (slab-wise, see the module
        docstring) and nnU-Net's properties of the result."""
        preprocessed, properties = preprocess_image(
            data, properties, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
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
        roi = crop_to_roi(data, box)  # a view: resampled slab by slab, never copied whole
        shape = resample_shape(roi.shape[1:], spacing, target)
        if list(roi.shape[1:]) != shape:
            roi = resample_with_configuration(configuration, roi, shape, spacing, target)
        else:
            roi = np.ascontiguousarray(roi)
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
    def segment(
        self, roi: SegmenterInput, timings: dict | None = None, return_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, dict]:
        """Label map of the resampled ROI (uint8 tensor on the device, (z, y, x) in original axis order); with
        ``return_logits`` also the segmenter's logits on the host (float32, nnU-Net's axis order, cropped to the
        nonzero box) and nnU-Net's properties of that grid, as :meth:`export_probabilities` takes them."""
        timings = {} if timings is None else timings
        plans_manager = self.segmenter.plans_manager
        with _timed(timings, "preprocess", self.device):
            preprocessed, grid_properties = self._preprocess(self.segmenter, roi.data, roi.properties)
        with _timed(timings, "segmenter", self.device):
            logits = sliding_window_logits(self.segmenter, preprocessed)
            labels = self.segmenter.label_manager.convert_logits_to_segmentation(logits).to(torch.uint8)
            # Undo nnU-Net's crop to the nonzero region and its transpose, as its exporter does.
            full = torch.zeros(grid_properties["shape_before_cropping"], dtype=torch.uint8, device=labels.device)
            full[tuple(slice(lo, hi) for lo, hi in grid_properties["bbox_used_for_cropping"])] = labels
            labels = full.permute(*plans_manager.transpose_backward)
        if not return_logits:
            return labels
        return labels, logits.float().cpu(), grid_properties

    def export_probabilities(
        self, logits: torch.Tensor, grid_properties: dict, box: Box, full_shape: Sequence[int], spacing: Sequence[float]
    ) -> np.ndarray:
        """Full-size class probabilities ``(classes, z, y, x)`` from the segmenter's ROI logits, by nnU-Net's own
        exporter: ``resampling_fn_probabilities`` to the ROI's original resolution, softmax (or sigmoid for
        regions), then pasted into the image with background outside. Only its properties are ours: the crop
        nnU-Net reverts is the ROI box, the image it pastes into the whole scan."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        segmenter = self.segmenter
        forward = segmenter.plans_manager.transpose_forward
        label_manager = segmenter.label_manager
        crop = grid_properties["bbox_used_for_cropping"]
        if list(logits.shape[1:]) != list(grid_properties["shape_before_cropping"]):
            # The ROI had zero-valued faces that nnU-Net cropped off: give them back as certain background, which
            # is what its exporter puts outside any crop, before resampling the whole ROI grid.
            padded = torch.full((logits.shape[0], *grid_properties["shape_before_cropping"]), -1e4)
            if not label_manager.has_regions:
                padded[0] = 0
            padded[(slice(None), *(slice(lo, hi) for lo, hi in crop))] = logits
            logits = padded
        export_properties = {
            "spacing": list(spacing),
            "shape_before_cropping": [int(full_shape[axis]) for axis in forward],
            "bbox_used_for_cropping": [list(box[axis]) for axis in forward],
            "shape_after_cropping_and_before_resampling": [box[axis][1] - box[axis][0] for axis in forward],
        }
        _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits,
            segmenter.plans_manager,
            segmenter.configuration_manager,
            label_manager,
            export_properties,
            return_probabilities=True,
        )
        return np.asarray(probabilities, dtype=np.float32)

    # -- whole case ------------------------------------------------------------------------------------------

    def predict_case(self, data: np.ndarray, properties: dict, return_probabilities: bool = False) -> CasePrediction:
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
        result = self.segment(roi, timings, return_logits=return_probabilities)
        labels = result[0] if return_probabilities else result
        del roi
        with _timed(timings, "postprocess", self.device):
            box_shape = [hi - lo for lo, hi in box]
            segmentation = paste_roi(resize_nearest(labels, box_shape).cpu().numpy(), box, full_shape)
            if self.postprocess:
                postprocess_in_box(segmentation, box)
        probabilities = None
        if return_probabilities:
            with _timed(timings, "export_probabilities", self.device):
                probabilities = self.export_probabilities(result[1], result[2], box, full_shape, properties["spacing"])
        return CasePrediction(segmentation, properties, box, timings, probabilities)

    def _background_probabilities(self, shape: Sequence[int]) -> np.ndarray:
        label_manager = self.segmenter.label_manager
        probabilities = np.zeros((label_manager.num_segmentation_heads, *shape), dtype=np.float32)
        if not label_manager.has_regions:
            probabilities[0] = 1
        return probabilities


def postprocess_in_box(segmentation: np.ndarray, box: Box) -> np.ndarray:
    """:func:`postprocess_flare` of a label map that is background outside ``box``, in place, looking only at the
    box grown by one voxel: everything the post-processing sees lies there (components inside the box, the
    one-voxel dilation around tumours in the ring), so the result is that of the whole scan, at the ROI's cost."""
    grown = [[max(lo - 1, 0), min(hi + 1, n)] for (lo, hi), n in zip(box, segmentation.shape)]
    region = crop_to_roi(segmentation, grown)
    region[...] = postprocess_flare(region)
    return segmentation


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
        release_free_memory()  # the stage's freed buffers, outside its timing: see inference/memory.py
