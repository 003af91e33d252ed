"""The README workflow with stock nnU-Net commands on real CT: plan, preprocess, train both phases, predict."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import (
    DATASET_ID,
    DATASET_NAME,
    LOCATOR_TRAINER,
    PLANS,
    SEGMENTER_TRAINER,
    command,
    data_file,
    read_json,
)


def test_samflare_plans_add_both_configurations(planned_dataset):
    folder = planned_dataset.preprocessed / DATASET_NAME
    plans = read_json(folder / f"{PLANS}.json")
    source = read_json(folder / "nnUNetPlans.json")
    assert plans["plans_name"] == PLANS
    assert set(source["configurations"]) < set(plans["configurations"])
    locator = plans["configurations"]["3d_locator"]
    segmenter = plans["configurations"]["3d_segmenter"]
    assert locator["data_identifier"] == f"{PLANS}_3d_locator"
    assert segmenter["data_identifier"] == f"{PLANS}_3d_segmenter"
    assert locator["architecture"]["network_class_name"] == "nnunet_samflare.networks.PConvLocator"
    assert segmenter["architecture"]["network_class_name"] == "nnunet_samflare.networks.SAMHybridUNet"
    assert locator["patch_size"] == [128, 128, 128]
    # flare_like is 3 mm isotropic and its median scan is smaller than 128³ at 3 mm: never finer than the data.
    assert locator["spacing"] == [3.0, 3.0, 3.0]
    assert segmenter["patch_size"] == [64, 64, 64] and segmenter["spacing"] == [3.0, 3.0, 3.0]
    for configuration in (locator, segmenter):
        data = sorted(p.name for p in (folder / configuration["data_identifier"]).glob("*.b2nd"))
        assert data == ["TSEX_0001.b2nd", "TSEX_0001_seg.b2nd", "TSEX_0002.b2nd", "TSEX_0002_seg.b2nd"]
    # the stock configuration's data is untouched by preprocessing the new ones
    assert len(list((folder / "nnUNetPlans_3d_fullres").glob("*.b2nd"))) == 4


@pytest.mark.parametrize(
    ("configuration", "trainer", "n_outputs", "n_parameters"),
    [
        # the locator learns one foreground region: the paper's 2-way softmax head becomes a 1-logit sigmoid head
        ("3d_locator", LOCATOR_TRAINER, 1, 1_383_746 - 65),
        ("3d_segmenter", SEGMENTER_TRAINER, 15, 35_844_525),
    ],
)
def test_training_writes_a_usable_model_folder(trained_models, configuration, trainer, n_outputs, n_parameters):
    folder = trained_models.model_folder(trainer, configuration)
    checkpoint = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer
    weights = checkpoint["network_weights"]
    assert sum(v.numel() for k, v in weights.items() if v.is_floating_point()) == n_parameters
    assert weights["decoder.seg_layers.0.weight"].shape[0] == n_outputs
    summary = read_json(folder / "fold_all" / "validation" / "summary.json")
    assert "foreground_mean" in summary
    assert (folder / "plans.json").is_file() and (folder / "dataset.json").is_file()


def test_locator_model_is_binary_over_all_labels(trained_models):
    dataset_json = read_json(trained_models.model_folder(LOCATOR_TRAINER, "3d_locator") / "dataset.json")
    assert dataset_json["labels"] == {"background": 0, "foreground": list(range(1, 15))}
    assert dataset_json["regions_class_order"] == [1]


@pytest.mark.parametrize(
    ("configuration", "trainer", "allowed_labels"),
    [("3d_locator", LOCATOR_TRAINER, {0, 1}), ("3d_segmenter", SEGMENTER_TRAINER, set(range(15)))],
)
def test_stock_nnunet_predict_writes_label_map_in_input_geometry(
    trained_models, tmp_path, configuration, trainer, allowed_labels
):
    source = data_file("flare_like", "image", "TSEX_0002")
    (tmp_path / "in").mkdir()
    shutil.copy(source, tmp_path / "in" / source.name)
    trained_models.run(
        [
            command("nnUNetv2_predict"),
            "-i",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out"),
            "-d",
            str(DATASET_ID),
            "-c",
            configuration,
            "-f",
            "all",
            "-tr",
            trainer,
            "-p",
            PLANS,
            "-device",
            "cpu",
            "--disable_tta",
            "-npp",
            "0",
            "-nps",
            "0",
        ]
    )
    image = sitk.ReadImage(str(source))
    prediction = sitk.ReadImage(str(tmp_path / "out" / "TSEX_0002.nii.gz"))
    assert prediction.GetSize() == image.GetSize()
    np.testing.assert_allclose(prediction.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(prediction.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(prediction.GetDirection(), image.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(prediction)).tolist()) <= allowed_labels


def test_plan_from_resenc_plans_builds_both_networks(planned_dataset):
    """samflare plan also derives from nnU-Net's residual-encoder plans; the trainers build from the result."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_samflare.training.trainers import nnUNetTrainer_SAMFlareSegmenter

    planned_dataset.run([command("nnUNetv2_plan_experiment"), "-d", str(DATASET_ID), "-pl", "nnUNetPlannerResEncM"])
    planned_dataset.run(
        [
            command("samflare"),
            "plan",
            "-d",
            str(DATASET_ID),
            "-p",
            "nnUNetResEncUNetMPlans",
            "-o",
            "samflareResEncMPlans",
        ]
    )
    folder = planned_dataset.preprocessed / DATASET_NAME
    plans = read_json(folder / "samflareResEncMPlans.json")
    source = read_json(folder / "nnUNetResEncUNetMPlans.json")
    assert plans["plans_name"] == "samflareResEncMPlans"
    assert plans["configurations"]["3d_fullres"] == source["configurations"]["3d_fullres"]
    manager = PlansManager(plans)
    for name, n_parameters in (("3d_locator", 1_383_746), ("3d_segmenter", 35_844_525)):
        configuration = manager.get_configuration(name)
        assert configuration.data_identifier == f"samflareResEncMPlans_{name}"
        assert configuration.normalization_schemes == ["CTNormalization"]  # inherited from 3d_fullres
        network = nnUNetTrainer_SAMFlareSegmenter.build_network_architecture(
            manager, configuration, 1, 2 if name == "3d_locator" else 15, False
        )
        assert sum(p.numel() for p in network.parameters()) == n_parameters
