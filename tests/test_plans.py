"""``samflare plan``: derivation of the plug-in plans from nnU-Net plans (dict level, no data needed)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nnunet_samflare.training.plans import derive_samflare_plans, load_configuration_templates


def source_plans(transpose_forward=(0, 1, 2), median_spacing=(2.5, 0.8, 0.8), median_shape=(120, 512, 512)):
    spacing = [median_spacing[a] for a in transpose_forward]
    shape = [median_shape[a] for a in transpose_forward]
    return {
        "dataset_name": "Dataset900_Test",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": shape,
        "transpose_forward": list(transpose_forward),
        "transpose_backward": [list(transpose_forward).index(i) for i in range(3)],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "spacing": spacing,
                "patch_size": [80, 160, 160],
                "batch_size": 2,
                "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []},
            },
        },
    }


def test_adds_both_configurations_and_keeps_the_source():
    source = source_plans()
    before = copy.deepcopy(source)
    plans = derive_samflare_plans(source)
    assert source == before
    assert plans["plans_name"] == "samflarePlans"
    assert plans["configurations"]["3d_fullres"] == source["configurations"]["3d_fullres"]
    locator, segmenter = plans["configurations"]["3d_locator"], plans["configurations"]["3d_segmenter"]
    assert locator["inherits_from"] == segmenter["inherits_from"] == "3d_fullres"
    assert locator["data_identifier"] == "samflarePlans_3d_locator"
    assert segmenter["data_identifier"] == "samflarePlans_3d_segmenter"
    assert segmenter["spacing"] == [2.0, 1.5, 1.5] and segmenter["patch_size"] == [96, 96, 96]
    # extent 300 x 409.6 x 409.6 mm over 128 voxels, never finer than the 2.5 / 0.8 mm data
    assert locator["spacing"] == [2.5, 3.2, 3.2]
    # The architectures the plans carry are the paper's networks (independent figure: the parameter counts).
    assert count_parameters(build(locator["architecture"], num_classes=2)) == 1_383_746
    assert count_parameters(build(segmenter["architecture"], num_classes=15)) == 35_844_525
    assert json.loads(json.dumps(plans)) == plans  # plain JSON, as nnU-Net reads it back


def build(architecture, num_classes):
    import pydoc

    cls = pydoc.locate(architecture["network_class_name"])
    with torch.device("meta"):
        return cls(1, num_classes, False, **architecture["arch_kwargs"])


def count_parameters(network):
    return sum(p.numel() for p in network.parameters())


def test_trainer_and_plan_names_are_the_ones_nnunet_finds():
    from nnunet_samflare.training import trainers
    from nnunet_samflare.training.names import LOCATOR_TRAINER, SEGMENTER_TRAINER

    assert trainers.nnUNetTrainer_SAMFlareLocator.__name__ == LOCATOR_TRAINER
    assert trainers.nnUNetTrainer_SAMFlareSegmenter.__name__ == SEGMENTER_TRAINER
    assert set(load_configuration_templates()) == {"3d_locator", "3d_segmenter"}


def test_spacings_follow_transpose_forward():
    # an in-plane-first dataset: nnU-Net stores spacings in the transposed order, samflare takes (z, y, x)
    plans = derive_samflare_plans(source_plans(transpose_forward=(2, 0, 1)), segmenter_spacing_zyx=[4.0, 2.0, 1.0])
    assert plans["configurations"]["3d_segmenter"]["spacing"] == [1.0, 4.0, 2.0]


def test_overrides_and_invalid_patch_sizes():
    plans = derive_samflare_plans(source_plans(), "myPlans", segmenter_patch_size=[64, 80, 96], batch_size=4)
    assert plans["plans_name"] == "myPlans"
    assert plans["configurations"]["3d_segmenter"]["patch_size"] == [64, 80, 96]
    assert plans["configurations"]["3d_segmenter"]["batch_size"] == 4
    assert plans["configurations"]["3d_segmenter"]["data_identifier"] == "myPlans_3d_segmenter"
    with pytest.raises(ValueError, match="divisible by 16"):
        derive_samflare_plans(source_plans(), segmenter_patch_size=[96, 96, 100])
    with pytest.raises(ValueError, match="divisible by 32"):
        derive_samflare_plans(source_plans(), locator_patch_size=[128, 128, 112])


def test_needs_a_3d_fullres_configuration():
    source = source_plans()
    source["configurations"] = {"2d": source["configurations"]["3d_fullres"]}
    with pytest.raises(ValueError, match="3d_fullres"):
        derive_samflare_plans(source)
