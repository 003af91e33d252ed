"""The segmenter's final validation measures what the cascade does: the segmenter in the cascade's region
(summary.json) and, where a locator is trained, the whole cascade (summary_cascade.json)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_samflare.inference.roi import bounding_box, expand_box_mm
from nnunet_samflare.training import roi_validation
from nnunet_samflare.training.roi_sampling import DEFAULT_ROI_MARGIN_MM, cascade_roi
from nnunet_samflare.training.roi_validation import (
    CASCADE_SUMMARY_NAME,
    SUMMARY_KEY,
    VALIDATION_LOCATOR_ENV,
    find_validation_locator,
    roi_logits,
    roi_recall,
    validate_through_cascade,
)

from conftest import DATASET_NAME, LOCATOR_TRAINER, SEGMENTER_TRAINER, data_file, read_json


class _ConstantPredictor:
    """Stands in for nnUNetPredictor: records what it was asked to predict and answers with 5s."""

    def __init__(self, heads: int):
        self.label_manager = SimpleNamespace(num_segmentation_heads=heads)
        self.seen: list[tuple[int, ...]] = []

    def predict_sliding_window_return_logits(self, data: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(data.shape))
        return torch.full((self.label_manager.num_segmentation_heads, *data.shape[1:]), 5.0, dtype=torch.half)


def test_roi_logits_predict_only_inside_the_box():
    predictor = _ConstantPredictor(heads=3)
    data = torch.zeros(1, 10, 12, 14)
    box = [[2, 6], [0, 12], [5, 9]]
    logits = roi_logits(predictor, data, box, has_regions=False)
    assert predictor.seen == [(1, 4, 12, 4)]  # the network never sees the rest of the scan
    inside = np.zeros((10, 12, 14), dtype=bool)
    inside[2:6, :, 5:9] = True
    labels = logits.float().argmax(0).numpy()
    assert np.all(logits[:, inside].float().numpy() == 5)
    assert np.all(labels[~inside] == 0)  # background outside
    assert torch.softmax(logits[:, ~inside].float(), 0)[0].min() > 0.999
    # regions (sigmoid heads): nothing on outside; no foreground at all: nothing predicted, nothing on
    regions = roi_logits(_ConstantPredictor(heads=2), data, box, has_regions=True)
    assert torch.sigmoid(regions[:, ~inside].float()).max() < 1e-6
    empty = _ConstantPredictor(heads=3)
    assert roi_logits(empty, data, None, has_regions=False).float().argmax(0).max() == 0 and empty.seen == []


@pytest.mark.parametrize("seed", range(5))
def test_validation_region_is_the_cascades(seed):
    # The same box and margin rule as the cascade's inference.roi (ceil of mm / spacing, clipped to the image).
    rng = np.random.default_rng(seed)
    seg = np.zeros((30, 40, 50), dtype=np.uint8)
    lo = rng.integers(0, [25, 35, 45])
    hi = lo + rng.integers(1, 6, size=3)
    seg[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = rng.integers(1, 14)
    spacing = rng.uniform(0.6, 5.0, size=3)
    expected = expand_box_mm(bounding_box(seg), spacing, DEFAULT_ROI_MARGIN_MM, seg.shape)
    assert cascade_roi(seg[None], spacing) == expected
    assert cascade_roi(np.zeros((1, 4, 4, 4)), spacing) is None


def test_roi_recall():
    reference = np.zeros((10, 10, 10), dtype=np.uint8)
    reference[2:4, 2:4, 2:4] = 3
    assert roi_recall(reference, [[0, 10], [0, 10], [0, 10]]) == 1.0
    assert roi_recall(reference, [[0, 3], [0, 10], [0, 10]]) == 0.5
    assert roi_recall(reference, None) == 0.0
    assert roi_recall(np.zeros_like(reference), None) is None


def _fake_trainer(results, name="nnUNetTrainer_SAMFlareSegmenter_50epochs", fold=0, plans="samflarePlans"):
    cls = type(name, (), {})
    trainer = cls()
    trainer.fold = fold
    trainer.output_folder_base = str(results / f"{name}__{plans}__3d_segmenter")
    trainer.output_folder = f"{trainer.output_folder_base}/fold_{fold}"
    trainer.plans_manager = SimpleNamespace(plans_name=plans, dataset_name=DATASET_NAME)
    return trainer


def test_validation_locator_is_the_matching_one(tmp_path, monkeypatch):
    monkeypatch.delenv(VALIDATION_LOCATOR_ENV, raising=False)

    def locator(name, fold=0, plans="samflarePlans"):
        folder = tmp_path / f"{name}__{plans}__3d_locator"
        (folder / f"fold_{fold}").mkdir(parents=True)
        (folder / f"fold_{fold}" / "checkpoint_final.pth").touch()
        return folder

    trainer = _fake_trainer(tmp_path)
    assert find_validation_locator(trainer) is None
    other = locator("nnUNetTrainer_SAMFlareLocator_5epochs")
    locator("nnUNetTrainer_SAMFlareLocator_50epochs", fold=1)  # another fold: never used for fold 0
    locator("nnUNetTrainer_SAMFlareLocator", plans="otherPlans")  # other plans: never used
    assert find_validation_locator(trainer) == other  # the only one there is
    default = locator("nnUNetTrainer_SAMFlareLocator")
    assert find_validation_locator(trainer) == default
    matching = locator("nnUNetTrainer_SAMFlareLocator_50epochs")
    assert find_validation_locator(trainer) == matching
    monkeypatch.setenv(VALIDATION_LOCATOR_ENV, str(other))
    assert find_validation_locator(trainer) == other


def test_segmenter_final_validation_runs_in_the_cascade_region(trained_models):
    folder = trained_models.model_folder(SEGMENTER_TRAINER, "3d_segmenter") / "fold_all" / "validation"
    summary = read_json(folder / "summary.json")
    assert "foreground_mean" in summary and "metric_per_case" in summary  # still nnU-Net's summary
    entry = summary[SUMMARY_KEY]
    assert entry["roi_margin_mm"] == DEFAULT_ROI_MARGIN_MM
    assert "ground-truth foreground box" in entry["evaluated"]
    assert entry["whole_cascade"]["status"].startswith("not run")  # the Debug trainer keeps its validation cheap
    for case in ("TSEX_0001", "TSEX_0002"):
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(data_file("flare_like", "label", case))))
        # flare_like is 3 mm isotropic, the segmenter's grid here: one voxel of slack for nnU-Net's nonzero crop
        box = cascade_roi(reference, [3.0] * 3, DEFAULT_ROI_MARGIN_MM + 3.0)
        outside = np.ones(reference.shape, dtype=bool)
        outside[tuple(slice(lo, hi) for lo, hi in box)] = False
        assert prediction.any()  # the untrained network labels something ...
        assert not prediction[outside].any()  # ... but only where the cascade would have let it look


def test_whole_cascade_validation(trained_models, tmp_path, monkeypatch):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    # A copy of the session's segmenter folder (the checkpoint linked), so that nothing is written into it.
    source = trained_models.model_folder(SEGMENTER_TRAINER, "3d_segmenter")
    trainer = _fake_trainer(tmp_path / "results", name=SEGMENTER_TRAINER, fold="all")
    base = tmp_path / "results" / source.name
    (base / "fold_all").mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(source / name, base / name)
    (base / "fold_all" / "checkpoint_final.pth").symlink_to(source / "fold_all" / "checkpoint_final.pth")
    (base / "fold_all" / "validation").mkdir()
    trainer.output_folder_base, trainer.output_folder = str(base), str(base / "fold_all")
    trainer.dataset_json = read_json(base / "dataset.json")
    trainer.device = torch.device("cpu")
    trainer.validation_checkpoint_name = "checkpoint_final.pth"
    log = []
    trainer.print_to_log_file = lambda *args, **kwargs: log.append(" ".join(map(str, args)))
    locator = trained_models.model_folder(LOCATOR_TRAINER, "3d_locator")
    monkeypatch.setenv(VALIDATION_LOCATOR_ENV, str(locator))
    monkeypatch.setenv("nnUNet_raw", str(trained_models.raw))
    gt_folder = trained_models.preprocessed / DATASET_NAME / "gt_segmentations"
    labels = list(range(1, 15))

    result = validate_through_cascade(trainer, ["TSEX_0002"], str(gt_folder), (SimpleITKIO(), ".nii.gz", labels, None))

    assert result["status"] == "done", log
    assert result["locator"] == str(locator) and result["summary"] == CASCADE_SUMMARY_NAME
    summary = read_json(base / "fold_all" / "validation" / CASCADE_SUMMARY_NAME)
    assert [c["prediction_file"].rsplit("/", 1)[-1] for c in summary["metric_per_case"]] == ["TSEX_0002.nii.gz"]
    assert summary["foreground_mean"]["Dice"] == pytest.approx(result["mean_dice"], nan_ok=True)
    # the ROI recall is the fraction of the reference inside the box the cascade used (its --stats record)
    stats = read_json(base / "fold_all" / roi_validation.CASCADE_OUTPUT_FOLDER / "TSEX_0002_stats.json")
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_folder / "TSEX_0002.nii.gz")))
    expected = roi_recall(reference, stats["roi_box_zyx"])
    assert summary[SUMMARY_KEY]["roi_recall_per_case"] == {"TSEX_0002": pytest.approx(expected)}
    assert 0.0 <= expected <= 1.0
    # without a locator for the fold it says so and writes nothing
    monkeypatch.setenv(VALIDATION_LOCATOR_ENV, str(tmp_path / "nowhere"))
    assert validate_through_cascade(trainer, ["TSEX_0002"], str(gt_folder), ())["status"].startswith("not run")


def test_partial_cases_are_scored_on_the_labels_they_annotate(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, load_summary_json
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_samflare.training.roi_validation import score_annotated_labels_only

    truth = np.zeros((6, 6, 6), dtype=np.uint8)
    truth[:, :, :3] = 1  # liver
    truth[:2, :2, 4:] = 2  # right kidney
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for folder in (gt, pred):
        folder.mkdir()
    liver_only = np.where(truth == 2, 0, truth)  # A annotates the liver only: its kidney is background there
    for case, reference in (("A", liver_only), ("B", truth)):
        sitk.WriteImage(sitk.GetImageFromArray(reference), str(gt / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(truth), str(pred / f"{case}.nii.gz"))  # both predicted perfectly
    summary_file = tmp_path / "summary.json"
    metrics = compute_metrics_on_folder(
        str(gt), str(pred), str(summary_file), SimpleITKIO(), ".nii.gz", [1, 2], None, num_processes=1
    )
    assert metrics["mean"][2]["Dice"] == pytest.approx(0.5)  # nnU-Net: A's correct kidney is all false positives
    trainer = SimpleNamespace(annotated_labels={"A": frozenset({1})}, dataset_json={"file_ending": ".nii.gz"})

    rescored = score_annotated_labels_only(trainer, summary_file, metrics)

    assert rescored["mean"][1]["Dice"] == 1.0 and rescored["mean"][2]["Dice"] == 1.0
    assert rescored["foreground_mean"]["Dice"] == 1.0
    written = load_summary_json(str(summary_file))
    assert written["mean"][2]["Dice"] == 1.0 and np.isnan(written["metric_per_case"][0]["metrics"][2]["Dice"])
    # a trainer without partial cases: untouched
    assert score_annotated_labels_only(
        SimpleNamespace(dataset_json={"file_ending": ".nii.gz"}),
        summary_file,
        {"metric_per_case": [], "mean": {}, "foreground_mean": {}},
    ) == {"metric_per_case": [], "mean": {}, "foreground_mean": {}}
