"""Stand-ins for nnU-Net objects in unit tests: a plans manager of a small 3-D CT configuration, and its
dataset.json, built in memory instead of by nnU-Net's planner."""

from __future__ import annotations

import numpy as np
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


def plans_manager(transpose_forward=(0, 1, 2), spacing=(2.0, 2.5, 3.0), normalization="CTNormalization"):
    backward = [int(i) for i in np.argsort(transpose_forward)]
    configuration = {
        "data_identifier": "test_3d",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [16, 16, 16],
        "median_image_size_in_voxels": [32, 32, 32],
        "spacing": list(spacing),
        "normalization_schemes": [normalization],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []},
        "batch_dice": True,
    }
    plans = {
        "dataset_name": "Dataset999_Test",
        "plans_name": "testPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [32, 32, 32],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose_forward),
        "transpose_backward": backward,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 30.0, "std": 80.0, "percentile_00_5": -950.0, "percentile_99_5": 900.0}
        },
        "configurations": {"3d": configuration},
    }
    manager = PlansManager(plans)
    return manager, manager.get_configuration("3d")


DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}
