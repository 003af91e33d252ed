"""The cascade as separate steps around stock nnU-Net, for labs that script around ``nnUNetv2_predict``:

``samflare locate`` → ``nnUNetv2_predict -c 3d_segmenter`` on the ROI folder → ``samflare uncrop`` →
``samflare postprocess`` (or ``nnUNetv2_apply_postprocessing``). The steps call the same functions as
:class:`~nnunet_samflare.inference.cascade.CascadePredictor`, so the result equals ``samflare predict`` run with
the same tile settings as nnUNetv2_predict (``--gaussian``, and ``--tta`` unless ``--disable_tta`` is given to
both).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_samflare.errors import CaseFailures, run_cases
from nnunet_samflare.inference.cascade import CascadePredictor, resize_nearest
from nnunet_samflare.inference.roi import (
    load_roi_record,
    paste_into_original,
    properties_from_roi_record,
    roi_record_from_properties,
    save_roi_record,
)
from nnunet_samflare.inference.validation import CascadeGrids, validate_case, validate_loaded
from nnunet_samflare.io import (
    Case,
    Grid,
    InputError,
    check_grids_fit,
    check_output_folder,
    find_cases,
    list_image_files,
    read_case,
    read_label_map,
    remove_stale_temporaries,
    strip_image_ending,
    write_image_atomic,
    write_seg_atomic,
)


def locate_to_folder(
    predictor: CascadePredictor | Callable[[], CascadePredictor],
    input: str | os.PathLike,
    roi_dir: str | os.PathLike,
    continue_prediction: bool = False,
    fail_fast: bool = False,
    *,
    grids: CascadeGrids | None = None,
) -> list[Path]:
    """For every case: the ROI image(s) resampled to the segmenter's grid, named ``<case>_000C.nii.gz`` for
    nnUNetv2_predict, and ``<case>.json`` with the box and the original geometry (written last). A case with no
    foreground gets only its JSON (box null): ``uncrop`` then writes an all-background map.

    ``predictor`` is a loaded predictor, or a function that loads one: it is then called only once every case
    has been validated, with ``grids`` (from the model folders' plans) for the memory estimate. A bad case is
    set aside and the others go on (raised at the end as :class:`~nnunet_samflare.errors.CaseFailures`, or at
    once with ``fail_fast`` or a single case)."""
    cases = find_cases(input)
    roi_dir = check_output_folder(roi_dir, inputs=[input])
    if continue_prediction:
        remove_stale_temporaries(roi_dir)
    if grids is None:
        grids = CascadeGrids.from_predictor(predictor)
    fail_fast = fail_fast or len(cases) == 1
    todo = [c for c in cases if not (continue_prediction and (roi_dir / f"{c.case_id}.json").is_file())]
    failures: dict[str, BaseException] = {}
    valid = []
    for case in todo:  # one validation step per case, before any model work
        try:
            validate_case(case, grids)
            valid.append(case)
        except InputError as error:
            if fail_fast:
                raise
            failures[case.case_id] = error
    if valid and not isinstance(predictor, CascadePredictor):
        predictor = predictor()
    try:
        run_cases(
            valid,
            lambda case: _locate_case(predictor, case, roi_dir, grids),
            lambda case: case.case_id,
            fail_fast=fail_fast,
        )
    except CaseFailures as error:
        failures.update(error.failures)
    if failures:
        raise CaseFailures(failures, len(todo))
    return [roi_dir / f"{case.case_id}.json" for case in cases]


def _locate_case(predictor: CascadePredictor, case: Case, roi_dir: Path, grids: CascadeGrids) -> Path:
    record_path = roi_dir / f"{case.case_id}.json"
    data, properties = read_case(case)
    if case.is_dicom:
        validate_loaded(data, properties, case.source, grids)
    box = predictor.locate(data, properties)
    extra = {"case": case.case_id, "output_name": case.output_name, "margin_mm": predictor.roi_margin_mm}
    if box is None:
        warnings.warn(f"{case.source}: the locator found no foreground", stacklevel=2)
    else:
        roi = predictor.segmenter_input(data, properties, box)
        geometry = roi.properties["sitk_stuff"]
        for channel, array in enumerate(roi.data):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(geometry["spacing"])
            image.SetOrigin(geometry["origin"])
            image.SetDirection(geometry["direction"])
            write_image_atomic(image, roi_dir / f"{case.case_id}_{channel:04d}.nii.gz")
        extra["roi_shape_zyx"] = list(roi.data.shape[1:])
    save_roi_record(roi_record_from_properties(box, data.shape[1:], properties, **extra), record_path)
    return record_path


def uncrop_folder(
    prediction_dir: str | os.PathLike,
    roi_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    fail_fast: bool = False,
) -> list[Path]:
    """Paste every ROI label map of ``prediction_dir`` back into its original geometry (records from
    ``roi_dir``), by nearest-neighbour interpolation, as ``CascadePredictor`` does."""
    prediction_dir, roi_dir, output_dir = Path(prediction_dir), Path(roi_dir), Path(output_dir)
    if not roi_dir.is_dir():
        raise InputError(roi_dir, "no such ROI folder; run samflare locate first")
    record_files = sorted(p for p in roi_dir.glob("*.json") if not p.name.startswith("."))
    if not record_files:
        raise InputError(roi_dir, "no ROI records (<case>.json) found; run samflare locate first")
    files = list_image_files(prediction_dir) if prediction_dir.is_dir() else []
    predictions = {strip_image_ending(p): p for p in files}
    check_output_folder(output_dir, inputs=[prediction_dir, roi_dir])

    def one_case(record_file: Path) -> Path:
        record = load_roi_record(record_file)
        # the full-size map and its connected-component labels must fit, checked before either is allocated
        check_grids_fit([Grid("full-size label map", tuple(record["shape_zyx"]), 1 + 4)], [], record_file)
        case_id = record.get("case", record_file.stem)
        roi_seg = None  # no box: paste_into_original gives an all-background map
        if record["box_zyx"] is not None:
            if case_id not in predictions:
                raise InputError(prediction_dir, f"no prediction for case {case_id} (expected {case_id}.nii.gz)")
            roi_image = read_label_map(predictions[case_id])
            expected = record.get("roi_shape_zyx")
            roi_seg = sitk.GetArrayFromImage(roi_image)
            if expected is not None and list(roi_seg.shape) != list(expected):
                raise InputError(
                    predictions[case_id], f"prediction shape {roi_seg.shape} differs from the ROI's {tuple(expected)}"
                )
            box_shape = [hi - lo for lo, hi in record["box_zyx"]]
            roi_seg = resize_nearest(torch.from_numpy(roi_seg.astype(np.uint8)), box_shape).numpy()
        segmentation = paste_into_original(roi_seg, record)
        target = output_dir / record.get("output_name", f"{case_id}.nii.gz")
        write_seg_atomic(segmentation, properties_from_roi_record(record), target)
        return target

    return run_cases(record_files, one_case, lambda f: f.stem, fail_fast=fail_fast or len(record_files) == 1)
