"""The segmenter's final validation, measured where the cascade uses it (docs/method.md §11.6).

nnU-Net's ``perform_actual_validation`` runs a model over whole scans. The segmenter never sees a whole scan: the
cascade gives it the locator's box plus :data:`~nnunet_samflare.training.roi_sampling.DEFAULT_ROI_MARGIN_MM`.
Its whole-scan figures therefore describe a job nobody asks of it (false positives far from the abdomen, tiles it
never computes). Here, for each validation case:

1. **``validation/summary.json`` — the segmenter in the cascade's region.** The region is the ground-truth
   foreground box plus the cascade's margin on nnU-Net's preprocessed grid: what the cascade gives the segmenter
   when its locator is perfect. The segmenter predicts inside it with the cascade's inference defaults (tile step
   0.5, uniform blending, no mirroring; docs/method.md §11.5); everything outside is background. Export, metrics
   and file layout are nnU-Net's own, so ``nnUNetv2_find_best_configuration`` and friends read it as usual, and
   because the region holds all of the reference foreground the Dice over the whole scan *is* the Dice in the
   region. The file gets a ``"samflare"`` entry that says so.
2. **``validation/summary_cascade.json`` — the whole cascade** (same metrics, same format), when a trained
   locator exists for the same dataset, plans and fold: ``samflare predict`` (locator + this segmenter,
   post-processing included) on the validation cases' raw images, label maps in ``validation_cascade/``, plus
   each case's ROI recall (fraction of the reference foreground inside the locator's ROI).

The cascade lives in ``inference``, a layer above this one, so it runs as a subprocess of the ``samflare`` CLI,
exactly what a user runs; nothing here imports ``inference``. ``SAMFLARE_CASCADE_VALIDATION=0``/``1`` switches
step 2 off/on (default: the trainer's ``cascade_validation``), ``SAMFLARE_VALIDATION_LOCATOR=<model folder>``
names the locator instead of looking for one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from time import sleep
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nnunet_samflare.training.plans import LOCATOR
from nnunet_samflare.training.roi_sampling import Box, cascade_roi

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

#: The cascade's inference defaults (docs/method.md §11.5), used for the ROI validation.
VALIDATION_TILE_STEP = 0.5
CASCADE_VALIDATION_ENV = "SAMFLARE_CASCADE_VALIDATION"
VALIDATION_LOCATOR_ENV = "SAMFLARE_VALIDATION_LOCATOR"
#: Key added to nnU-Net's summary files.
SUMMARY_KEY = "samflare"
CASCADE_SUMMARY_NAME = "summary_cascade.json"
CASCADE_OUTPUT_FOLDER = "validation_cascade"
DEFAULT_LOCATOR_TRAINER = "nnUNetTrainer_SAMFlareLocator"
# Logit written outside the region: the softmax of (0, -30, ...) is background to 1e-12, finite in fp16.
_OUTSIDE_LOGIT = -30.0


def roi_logits(predictor: nnUNetPredictor, data: torch.Tensor, box: Box | None, has_regions: bool) -> torch.Tensor:
    """Logits of the whole preprocessed case ``(c, z, y, x)``: the sliding window inside ``box`` and background
    everywhere else (all of it when ``box`` is None)."""
    heads = predictor.label_manager.num_segmentation_heads
    logits = torch.full((heads, *data.shape[1:]), _OUTSIDE_LOGIT, dtype=torch.half)
    if not has_regions:
        logits[0] = 0  # softmax: background wins; regions (sigmoid): every region off
    if box is not None:
        region = (slice(None), *(slice(lo, hi) for lo, hi in box))
        logits[region] = predictor.predict_sliding_window_return_logits(data[region]).to("cpu", torch.half)
    return logits


def cascade_validation_enabled(default: bool) -> bool:
    value = os.environ.get(CASCADE_VALIDATION_ENV, "").strip().lower()
    if value in ("1", "true", "t", "yes"):
        return True
    if value in ("0", "false", "f", "no"):
        return False
    return default


def validate_segmenter_in_roi(trainer: nnUNetTrainer, save_probabilities: bool = False) -> None:
    """``perform_actual_validation`` of the segmenter, on the cascade's region (module docstring, step 1), then
    through the whole cascade where a locator exists (step 2)."""
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy
    from torch import distributed as dist

    if trainer.is_cascaded:
        raise NotImplementedError("ROI validation does not support nnU-Net cascades (a previous stage's segmentation)")
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(
        tile_step_size=VALIDATION_TILE_STEP,
        use_gaussian=False,
        use_mirroring=False,
        perform_everything_on_device=True,
        device=trainer.device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        trainer.network,
        trainer.plans_manager,
        trainer.configuration_manager,
        None,
        trainer.dataset_json,
        type(trainer).__name__,
        trainer.inference_allowed_mirroring_axes,
    )
    validation_folder = Path(trainer.output_folder) / "validation"
    validation_folder.mkdir(parents=True, exist_ok=True)
    _, all_val_keys = trainer.do_split()
    val_keys = all_val_keys[trainer.local_rank :: dist.get_world_size()] if trainer.is_ddp else all_val_keys
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys)
    spacing = trainer.configuration_manager.spacing
    margin = trainer.validation_roi_margin_mm
    has_regions = trainer.label_manager.has_regions

    with multiprocessing.get_context("spawn").Pool(default_num_processes) as pool:
        workers = list(pool._pool)
        results = []
        for key in dataset.identifiers:
            while check_workers_alive_and_busy(pool, workers, results, allowed_num_queued=2):
                sleep(0.1)
            data, seg, _, properties = dataset.load_case(key)
            box = cascade_roi(seg[:], spacing, margin)
            trainer.print_to_log_file(f"predicting {key} in the region {box} of {tuple(data.shape[1:])}")
            logits = roi_logits(predictor, torch.from_numpy(np.asarray(data[:])), box, has_regions)
            args = (
                logits,
                properties,
                trainer.configuration_manager,
                trainer.plans_manager,
                trainer.dataset_json,
                join(str(validation_folder), key),
                save_probabilities,
            )
            results.append(pool.starmap_async(export_prediction_from_logits, (args,)))
        for result in results:
            result.get()

    if trainer.is_ddp:
        dist.barrier()
    if trainer.local_rank == 0:
        labels = trainer.label_manager.foreground_regions if has_regions else trainer.label_manager.foreground_labels
        metric_args = (
            trainer.plans_manager.image_reader_writer_class(),
            trainer.dataset_json["file_ending"],
            labels,
            trainer.label_manager.ignore_label,
        )
        gt_folder = join(trainer.preprocessed_dataset_folder_base, "gt_segmentations")
        summary_file = validation_folder / "summary.json"
        metrics = compute_metrics_on_folder(
            gt_folder,
            str(validation_folder),
            str(summary_file),
            *metric_args,
            chill=True,
            num_processes=default_num_processes,
        )
        metrics = score_annotated_labels_only(trainer, summary_file, metrics)
        if cascade_validation_enabled(trainer.cascade_validation):
            cascade = validate_through_cascade(trainer, all_val_keys, gt_folder, metric_args)
        else:
            cascade = {"status": f"not run (switched off; {CASCADE_VALIDATION_ENV}=1 turns it on)"}
        _add_summary_entry(
            summary_file,
            {
                "evaluated": "segmenter alone, in the region the cascade gives it: ground-truth foreground box + "
                f"{margin:g} mm per side on the preprocessed grid; background outside",
                "roi_margin_mm": margin,
                "inference": {"tile_step_size": VALIDATION_TILE_STEP, "gaussian": False, "mirroring": False},
                "whole_cascade": cascade,
            },
        )
        for label, values in metrics["mean"].items():
            trainer.logger.log_summary(f"final_val/class_{label}_dice", values["Dice"])
        trainer.logger.log_summary("final_val/foreground_dice", metrics["foreground_mean"]["Dice"])
        mean_dice = metrics["foreground_mean"]["Dice"]
        trainer.print_to_log_file("Validation complete (segmenter in the cascade's region)", also_print_to_console=True)
        trainer.print_to_log_file("Mean Validation Dice: ", mean_dice, also_print_to_console=True)
        if "mean_dice" in cascade:
            trainer.print_to_log_file(
                "Mean Validation Dice of the whole cascade (locator + segmenter): ",
                cascade["mean_dice"],
                also_print_to_console=True,
            )
        else:
            trainer.print_to_log_file(f"Whole-cascade validation: {cascade['status']}", also_print_to_console=True)

    trainer.set_deep_supervision_enabled(True)
    compute_gaussian.cache_clear()


def find_validation_locator(trainer: nnUNetTrainer, checkpoint: str = "checkpoint_final.pth") -> Path | None:
    """A trained locator model folder for the trainer's dataset, plans and fold, or None.

    ``SAMFLARE_VALIDATION_LOCATOR`` wins. Otherwise, among the ``*__<plans>__3d_locator`` folders beside the
    segmenter's that hold ``fold_<fold>/<checkpoint>``: the trainer named like this one with ``Segmenter``
    replaced by ``Locator`` (``..._50epochs`` finds ``nnUNetTrainer_SAMFlareLocator_50epochs``), then
    ``nnUNetTrainer_SAMFlareLocator``, then any other, by name.
    """
    explicit = os.environ.get(VALIDATION_LOCATOR_ENV)
    fold = f"fold_{trainer.fold}"
    if explicit:
        return Path(explicit) if (Path(explicit) / fold / checkpoint).is_file() else None
    results = Path(trainer.output_folder_base).parent
    suffix = f"__{trainer.plans_manager.plans_name}__{LOCATOR}"
    own = type(trainer).__name__
    preferred = [own.replace("Segmenter", "Locator", 1), DEFAULT_LOCATOR_TRAINER]
    others = sorted(p.name[: -len(suffix)] for p in results.glob(f"*{suffix}"))
    for name in dict.fromkeys(preferred + others):
        folder = results / f"{name}{suffix}"
        if (folder / fold / checkpoint).is_file():
            return folder
    return None


def roi_recall(reference: np.ndarray, box: Sequence[Sequence[int]] | None) -> float | None:
    """Fraction of the reference foreground (> 0) inside ``box``; None for a reference without foreground."""
    foreground = reference > 0
    total = int(foreground.sum())
    if total == 0:
        return None
    if box is None:
        return 0.0
    inside = int(foreground[tuple(slice(lo, hi) for lo, hi in box)].sum())
    return inside / total


def validate_through_cascade(
    trainer: nnUNetTrainer, val_keys: Sequence[str], gt_folder: str, metric_args: tuple
) -> dict[str, Any]:
    """Step 2 of the module docstring. Returns what ``summary.json`` records about it (``status`` always)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder

    checkpoint = getattr(trainer, "validation_checkpoint_name", "checkpoint_final.pth")
    fold_folder = Path(trainer.output_folder)
    if not (fold_folder / checkpoint).is_file():
        return {"status": f"not run: {fold_folder / checkpoint} was not written"}
    locator = find_validation_locator(trainer, checkpoint)
    if locator is None:
        return {
            "status": f"not run: no trained locator ({LOCATOR}, {fold_folder.name}, {checkpoint}) beside this model"
        }
    ending = trainer.dataset_json["file_ending"]
    channels = len(trainer.dataset_json["channel_names"])
    if not os.environ.get("nnUNet_raw"):
        return {"status": "not run: nnUNet_raw is not set (the cascade reads the raw images)"}
    images_folder = Path(os.environ["nnUNet_raw"]) / trainer.plans_manager.dataset_name / "imagesTr"
    images = {k: [images_folder / f"{k}_{c:04d}{ending}" for c in range(channels)] for k in val_keys}
    missing = [str(p) for paths in images.values() for p in paths if not p.is_file()]
    if missing:
        return {"status": f"not run: raw image {missing[0]} not found (nnUNet_raw)"}

    output = fold_folder / CASCADE_OUTPUT_FOLDER
    shutil.rmtree(output, ignore_errors=True)  # a stale case must not be scored
    device = trainer.device.type
    with tempfile.TemporaryDirectory(prefix=".cascade_input_", dir=fold_folder) as tmp:
        for paths in images.values():
            for path in paths:
                os.symlink(path.resolve(), Path(tmp) / path.name)
        command = [
            sys.executable,
            "-m",
            "nnunet_samflare.cli",
            "predict",
            "-i",
            tmp,
            "-o",
            str(output),
            "--locator",
            str(locator),
            "--segmenter",
            str(trainer.output_folder_base),
            "-f",
            str(trainer.fold),
            "-chk",
            checkpoint,
            "-device",
            device,
            "--stats",
        ]
        trainer.print_to_log_file(f"whole-cascade validation: {' '.join(command)}")
        done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace")
    if done.returncode != 0:
        trainer.print_to_log_file(f"samflare predict failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return {"status": f"failed: samflare predict exited with {done.returncode} (see the training log)"}

    summary_file = Path(trainer.output_folder) / "validation" / CASCADE_SUMMARY_NAME
    metrics = compute_metrics_on_folder(
        gt_folder, str(output), str(summary_file), *metric_args, chill=True, num_processes=1
    )
    metrics = score_annotated_labels_only(trainer, summary_file, metrics)
    recall = {}
    for key in val_keys:
        stats = json.loads((output / f"{key}_stats.json").read_text(encoding="utf-8"))
        reference = _read_label_map(Path(gt_folder) / f"{key}{ending}")
        recall[key] = roi_recall(reference, stats.get("roi_box_zyx"))
    known = [v for v in recall.values() if v is not None]
    entry = {
        "status": "done",
        "evaluated": "whole scans through the cascade: locator ROI + this segmenter + post-processing "
        "(samflare predict defaults), label maps in " + CASCADE_OUTPUT_FOLDER,
        "locator": str(locator),
        "segmenter_checkpoint": checkpoint,
        "roi_recall_per_case": recall,
        "roi_recall_min": min(known) if known else None,
    }
    _add_summary_entry(summary_file, entry)
    return {**entry, "summary": CASCADE_SUMMARY_NAME, "mean_dice": metrics["foreground_mean"]["Dice"]}


def score_annotated_labels_only(trainer: nnUNetTrainer, summary_file: Path, metrics: dict) -> dict:
    """nnU-Net's ``summary.json`` (``metrics``, as ``compute_metrics_on_folder`` returns it) rescored for a trainer
    with partially labelled cases (``annotated_labels``, the partial-label trainer's): in such a case a label it
    does not annotate is background in its label map, so a correct prediction of it would be all false positives.
    Its metrics become NaN there and the per-label means leave them out, as ``samflare evaluate`` scores partial
    references. Other trainers' summaries are returned untouched."""
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json

    annotated = getattr(trainer, "annotated_labels", None) or {}
    ending = trainer.dataset_json["file_ending"]
    rescored = False
    for row in metrics["metric_per_case"]:
        labels = annotated.get(Path(row["reference_file"]).name[: -len(ending)])
        for label, values in row["metrics"].items():
            if labels is not None and label not in labels:
                row["metrics"][label] = dict.fromkeys(values, float("nan"))
                rescored = True
    if not rescored:
        return metrics
    rows = [row["metrics"] for row in metrics["metric_per_case"]]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a label that no case annotates: NaN, as nnU-Net gives
        for label, means in metrics["mean"].items():
            metrics["mean"][label] = {m: float(np.nanmean([row[label][m] for row in rows])) for m in means}
        metrics["foreground_mean"] = {
            m: float(np.mean([means[m] for label, means in metrics["mean"].items() if label != 0]))
            for m in metrics["foreground_mean"]
        }
    save_summary_json(metrics, str(summary_file))
    return metrics


def _read_label_map(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _add_summary_entry(path: Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` under :data:`SUMMARY_KEY` to an nnU-Net summary file (nnU-Net's readers ignore extra keys)."""
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary[SUMMARY_KEY] = entry
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=4), encoding="utf-8")
    os.replace(tmp, path)
