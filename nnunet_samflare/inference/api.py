"""``nnunet_samflare.predict``: the cascade on files, folders, DICOM series or in-memory SimpleITK images.

Every output is written to a temporary name and renamed, extras first and the label map last, so a label map
on disk means a finished case: ``continue_prediction`` skips those and redoes anything half-written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_samflare.errors import CaseFailures, run_cases
from nnunet_samflare.inference.cascade import (
    DEFAULT_ROI_MARGIN_MM,
    CascadePredictor,
    CasePrediction,
    model_folder,
)
from nnunet_samflare.inference.parts import select_part
from nnunet_samflare.inference.pipeline import ReadAhead, WriteBehind
from nnunet_samflare.inference.reference_pipeline import ReferencePipeline
from nnunet_samflare.inference.reports import organ_stats, save_preview_png, save_stats_json
from nnunet_samflare.inference.validation import CascadeGrids, validate_case, validate_loaded
from nnunet_samflare.io import (
    IMAGE_ENDINGS,
    Case,
    InputError,
    atomic_output,
    check_num_channels,
    check_output_folder,
    find_cases,
    image_ending,
    read_case,
    remove_stale_temporaries,
    seg_to_image,
    strip_image_ending,
    write_json_atomic,
    write_seg_atomic,
)
from nnunet_samflare.training.names import (
    DEFAULT_PLANS_NAME,
    LOCATOR_CONFIGURATION,
    LOCATOR_TRAINER,
    SEGMENTER_CONFIGURATION,
    SEGMENTER_TRAINER,
)

#: What messages call an image passed as a ``SimpleITK.Image``.
IN_MEMORY = "<in-memory image>"
#: The :func:`build_predictor` options of ``samflare predict --fast``: the segmenter in channels-last memory format
#: and, on a CPU with native bfloat16, under bfloat16 autocast (see :class:`CascadePredictor`).
FAST_OPTIONS: dict[str, bool] = {"channels_last": True, "cpu_bf16": True}


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def model_folders(
    *,
    dataset: str | int | None = None,
    locator: str | os.PathLike | None = None,
    segmenter: str | os.PathLike | None = None,
    plans: str = DEFAULT_PLANS_NAME,
    locator_trainer: str = LOCATOR_TRAINER,
    segmenter_trainer: str = SEGMENTER_TRAINER,
    **_: Any,
) -> tuple[Path, Path]:
    """The locator and segmenter model folders: given, or found from the dataset like nnUNetv2_predict finds them
    (``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``). Other options are ignored."""
    if locator is None or segmenter is None:
        if dataset is None:
            raise InputError(None, "give a dataset (-d) or both model folders (--locator and --segmenter)")
        locator = locator or model_folder(dataset, locator_trainer, plans, LOCATOR_CONFIGURATION)
        segmenter = segmenter or model_folder(dataset, segmenter_trainer, plans, SEGMENTER_CONFIGURATION)
    for folder in (locator, segmenter):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: model folder not found (train it or pass --locator/--segmenter)")
    return Path(locator), Path(segmenter)


def build_predictor(
    *,
    dataset: str | int | None = None,
    locator: str | os.PathLike | None = None,
    segmenter: str | os.PathLike | None = None,
    plans: str = DEFAULT_PLANS_NAME,
    locator_trainer: str = LOCATOR_TRAINER,
    segmenter_trainer: str = SEGMENTER_TRAINER,
    folds: Sequence[int | str] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
    device: str | None = None,
    step_size: float = 0.5,
    tta: bool = False,
    gaussian: bool = False,
    margin_mm: float | None = None,
    postprocess: bool = True,
    tile_batch: int | None = None,
    fast_layers: bool = False,
    channels_last: bool = False,
    cpu_bf16: bool = False,
    reference_pipeline: bool = False,
    locator_weights: str | os.PathLike | None = None,
    segmenter_weights: str | os.PathLike | None = None,
) -> CascadePredictor | ReferencePipeline:
    """A :class:`CascadePredictor` whose model folders are given, or found from the dataset like nnUNetv2_predict
    finds them (``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``). With ``reference_pipeline``:
    the authors' own inference with their weight files (only ``device`` applies; docs/method.md §5)."""
    if reference_pipeline:
        return ReferencePipeline.from_weights(locator_weights, segmenter_weights, device=device or default_device())
    locator, segmenter = model_folders(
        dataset=dataset,
        locator=locator,
        segmenter=segmenter,
        plans=plans,
        locator_trainer=locator_trainer,
        segmenter_trainer=segmenter_trainer,
    )
    return CascadePredictor(
        locator,
        segmenter,
        folds=folds,
        checkpoint_name=checkpoint_name,
        device=device or default_device(),
        tile_step_size=step_size,
        use_gaussian=gaussian,
        use_mirroring=tta,
        roi_margin_mm=DEFAULT_ROI_MARGIN_MM if margin_mm is None else margin_mm,
        postprocess=postprocess,
        tile_batch_size=tile_batch,
        fast_layers=fast_layers,
        channels_last=channels_last,
        cpu_bf16=cpu_bf16,
    )


def predict(
    input: str | os.PathLike | sitk.Image,
    output: str | os.PathLike | None = None,
    *,
    predictor: CascadePredictor | None = None,
    save_probabilities: bool = False,
    continue_prediction: bool = False,
    stats: bool = False,
    preview: bool = False,
    progress: bool = True,
    num_parts: int = 1,
    part_id: int = 0,
    fail_fast: bool = False,
    num_processes_preprocessing: int = 0,
    num_processes_segmentation_export: int = 0,
    **predictor_options: Any,
) -> list[Path] | sitk.Image:
    """Segment abdominal CT with the cascade.

    ``input`` is a folder of images (``<case>_0000.nii.gz`` or ``<case>.nii.gz``; also ``.nii``, ``.mha``,
    ``.nrrd``), a single image file, a DICOM series folder, or a ``SimpleITK.Image``. ``output`` is a folder
    (or, for one image, a file name with an image ending); with a ``SimpleITK.Image`` and no ``output`` the label
    map is returned as a ``SimpleITK.Image`` in the input's geometry. Otherwise the written label maps are
    returned. ``predictor`` reuses loaded models; else ``predictor_options`` go to :func:`build_predictor`
    (``dataset``, ``locator``, ``segmenter``, ``device``, ``tta``, ``gaussian``, ``margin_mm``, ...).
    ``num_parts``/``part_id``: only this part of the cases, as ``nnUNetv2_predict -num_parts -part_id`` splits them.

    Every case is validated before any model work (:func:`nnunet_samflare.inference.validation.validate_case`).
    For a folder, a case that is bad input or runs out of memory is set aside and the others go on; at the end
    :class:`~nnunet_samflare.errors.CaseFailures` lists what failed (``fail_fast``: the first failure is raised
    at once). One case, or an in-memory image, raises its error directly.

    ``num_processes_preprocessing``/``num_processes_segmentation_export`` (``-npp``/``-nps``): cases read ahead
    and written behind in background threads while the models work (:mod:`nnunet_samflare.inference.pipeline`).
    """
    if isinstance(input, sitk.Image):
        grids = _cascade_grids(predictor, predictor_options)
        validate_case(input, grids, name=IN_MEMORY)  # geometry and memory, before any voxel is copied
        if grids is not None:
            check_num_channels(Case(IN_MEMORY, (Path(IN_MEMORY),), IN_MEMORY), grids.num_input_channels)
        if output is not None:
            output = Path(output)
            if image_ending(output) is None:
                endings = ", ".join(IMAGE_ENDINGS)
                raise InputError(output, f"an in-memory image is written to one file ending with {endings}")
            check_output_folder(output.parent)
        data, properties = read_case(input, IN_MEMORY)
        predictor = predictor or build_predictor(**predictor_options)
        prediction = predictor.predict_case(data, properties)
        if output is None:
            return seg_to_image(prediction.segmentation, properties)
        write_seg_atomic(prediction.segmentation, properties, output)
        return [output]
    if output is None:
        raise InputError(None, "an output folder or file is needed for file input")

    cases = select_part(find_cases(input), num_parts, part_id)
    output = Path(output)
    single_file_output = len(cases) == 1 and image_ending(output) is not None
    out_dir = output.parent if single_file_output else output
    # Before any work: writable, and not (inside) the input folder unless the user named the output file.
    check_output_folder(out_dir, inputs=[] if single_file_output else [input])
    targets = [output if single_file_output else out_dir / case.output_name for case in cases]
    inputs = {f.resolve() for case in cases for f in case.files}
    for target in targets:
        if target.resolve() in inputs:
            raise InputError(target, "output would overwrite the input; choose another output folder")
    if continue_prediction:
        # The parts of one prediction may run at once in the same folder: each clears only its own cases' leftovers.
        own = None if num_parts == 1 else {name for target in targets for name in _case_output_names(target)}
        remove_stale_temporaries(out_dir, own)
    todo = [
        (case, target)
        for case, target in zip(cases, targets)
        if not (continue_prediction and _is_done(target, save_probabilities, stats, preview))
    ]
    if not todo:
        return targets
    grids = _cascade_grids(predictor, predictor_options)  # from the plans only: no checkpoint is loaded yet

    # One validation step per case, before any model is loaded; a bad case is set aside, the others go on.
    failures: dict[str, BaseException] = {}
    valid = []
    for case, target in todo:
        try:
            validate_case(case, grids, probabilities=save_probabilities)
            valid.append((case, target))
        except InputError as error:
            if fail_fast or len(cases) == 1:
                raise
            failures[case.case_id] = error
    if valid:
        predictor = predictor or build_predictor(**predictor_options)
    from tqdm import tqdm

    written: list[Path] = []
    fail_fast = fail_fast or len(cases) == 1
    reads = ReadAhead(
        [case for case, _ in valid],
        lambda case: read_for_prediction(case, grids, save_probabilities),
        num_processes_preprocessing,
        key=lambda case: case.case_id,
    )
    writes = WriteBehind(num_processes_segmentation_export, fail_fast=fail_fast)

    def one_case(item: tuple[Case, Path]) -> Path:
        case, target = item

        def finished() -> None:
            if not written:
                _write_model_files(predictor, out_dir)
            written.append(target)

        predict_case_to_files(
            predictor,
            case,
            target,
            save_probabilities,
            stats,
            preview,
            grids=grids,
            loaded=reads.take(case),
            writer=writes,
            on_written=finished,
        )
        return target

    # disable=None: a bar only on a terminal, so logs and error messages stay clean when redirected
    with tqdm(valid, desc="samflare predict", unit="case", disable=None if progress else True) as bar:
        try:
            run_cases(bar, one_case, lambda item: item[0].case_id, fail_fast=fail_fast)
        except CaseFailures as error:
            failures.update(error.failures)
        finally:
            reads.close()
            failures.update(writes.close())
    if failures:
        raise CaseFailures(failures, len(todo), written)
    return targets


def read_for_prediction(
    case: Case, grids: CascadeGrids | None = None, save_probabilities: bool = False
) -> tuple[np.ndarray, dict, float]:
    """``read_case`` and its time in s; with ``grids``, a case whose geometry was not known before reading (a DICOM
    series) is checked once read, before the models see it."""
    start = time.perf_counter()
    data, properties = read_case(case)
    if case.is_dicom:
        validate_loaded(data, properties, case.source, grids, save_probabilities)
    return data, properties, time.perf_counter() - start


def predict_case_to_files(
    predictor: CascadePredictor,
    case: Case,
    target: Path,
    save_probabilities: bool = False,
    stats: bool = False,
    preview: bool = False,
    grids: CascadeGrids | None = None,
    loaded: tuple[np.ndarray, dict, float] | None = None,
    writer: WriteBehind | None = None,
    on_written: Callable[[], None] | None = None,
) -> CasePrediction:
    """Read (unless ``loaded`` by :func:`read_for_prediction`), predict and write one case; the label map is
    written last, then ``on_written`` is called. With a ``writer`` the writing is handed to it."""
    data, properties, read_time = read_for_prediction(case, grids, save_probabilities) if loaded is None else loaded
    prediction = predictor.predict_case(data, properties, return_probabilities=save_probabilities)
    prediction.timings["read"] = read_time

    def write() -> None:
        start = time.perf_counter()
        stem = strip_image_ending(target)
        if save_probabilities:
            with atomic_output(target.with_name(stem + ".npz")) as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, probabilities=prediction.probabilities)
            from batchgenerators.utilities.file_and_folder_operations import save_pickle

            with atomic_output(target.with_name(stem + ".pkl")) as tmp:
                save_pickle(properties, str(tmp))
        if stats:
            save_stats_json(
                organ_stats(prediction.segmentation, data[0], properties["spacing"]),
                target.with_name(stem + "_stats.json"),
                case=case.case_id,
                source=str(case.source),
                roi_box_zyx=prediction.box,
                timings_s={k: round(v, 4) for k, v in prediction.timings.items()},
            )
        if preview:
            save_preview_png(
                data[0],
                prediction.segmentation,
                target.with_name(stem + "_preview.png"),
                properties["spacing"],
                properties["sitk_stuff"]["direction"],
                title=case.case_id,
            )
        write_seg_atomic(prediction.segmentation, properties, target)
        prediction.timings["write"] = time.perf_counter() - start
        if on_written is not None:
            on_written()

    if writer is None:
        write()
    else:
        writer.submit(case.case_id, write)
    return prediction


def _case_output_names(target: Path) -> list[str]:
    """Every file a case may write beside ``target``: label map, probabilities, properties, stats, preview."""
    stem = strip_image_ending(target)
    return [target.name, *(stem + suffix for suffix in (".npz", ".pkl", "_stats.json", "_preview.png"))]


def _is_done(target: Path, save_probabilities: bool, stats: bool, preview: bool) -> bool:
    label_map, npz, pkl, stats_json, preview_png = (target.with_name(n) for n in _case_output_names(target))
    wanted = [label_map]
    if save_probabilities:
        wanted += [npz, pkl]
    if stats:
        wanted.append(stats_json)
    if preview:
        wanted.append(preview_png)
    return all(p.is_file() for p in wanted)


def _cascade_grids(predictor: CascadePredictor | None, predictor_options: dict) -> CascadeGrids | None:
    """The two models' grids from a loaded predictor, or from their folders' plans (no checkpoint loaded); None
    for a pipeline without nnU-Net model folders (its cases get the geometry checks only)."""
    if predictor is not None:
        return CascadeGrids.from_predictor(predictor) if isinstance(predictor, CascadePredictor) else None
    if predictor_options.get("reference_pipeline"):
        return None
    return CascadeGrids.from_model_folders(*model_folders(**predictor_options))


def _write_model_files(predictor: CascadePredictor | ReferencePipeline, out_dir: Path) -> None:
    if isinstance(predictor, ReferencePipeline):
        return  # no nnU-Net model folder behind it
    # nnUNetv2_apply_postprocessing and the ensembling tools expect these beside the predictions
    # (docs/nnunet.md §10.14).
    write_json_atomic(predictor.segmenter.dataset_json, out_dir / "dataset.json")
    write_json_atomic(predictor.segmenter.plans_manager.plans, out_dir / "plans.json")
