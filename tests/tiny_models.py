"""Model folders with the plug-in's own networks at toy size and fixed random weights, written directly in nnU-Net's
model-folder format (plans.json, dataset.json, fold_all/checkpoint_final.pth with our trainers' names).

No training: what these models predict is noise, which is what the property, validation and determinism tests
want (geometry, labels in the label set, file handling), at a fraction of a second per case on a CPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from nnunet_samflare.networks import PConvLocator, SAMHybridUNet
from nnunet_samflare.training.names import (
    DEFAULT_PLANS_NAME,
    LOCATOR_CONFIGURATION,
    LOCATOR_TRAINER,
    SEGMENTER_CONFIGURATION,
    SEGMENTER_TRAINER,
)
from nnunet_samflare.training.trainers import binary_foreground_dataset_json

LOCATOR_ARCH = {
    "embed_dim": 8,
    "depths": [1, 1],
    "mlp_ratio": 1.0,
    "n_div": 4,
    "decoder_dim": 8,
    "drop_path_rate": 0.0,
    "patch_size": 2,
}  # input divisor 4
SEGMENTER_ARCH = {
    "embed_dims": [12, 24],
    "depths": [1, 1],
    "sam_heads": [3, 3],
    "msa_heads": [0, 2],
    "mlp_ratios": [1.0, 1.0],
    "qkv_bias": True,
    "expand_ratio": 1,
    "decoder_feature_size": 8,
    "drop_path_rate": 0.0,
    "deep_supervision_heads": False,
}  # input divisor 4

LABELS = {
    "background": 0,
    "liver": 1,
    "right kidney": 2,
    "spleen": 3,
    "pancreas": 4,
    "aorta": 5,
    "inferior vena cava": 6,
    "right adrenal gland": 7,
    "left adrenal gland": 8,
    "gallbladder": 9,
    "esophagus": 10,
    "stomach": 11,
    "duodenum": 12,
    "left kidney": 13,
    "tumor": 14,
}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 2, "file_ending": ".nii.gz"}

_RESAMPLING = {
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
}


def _configuration(name: str, spacing: list[float], network: type, arch: dict) -> dict:
    return {
        "data_identifier": f"{DEFAULT_PLANS_NAME}_{name}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [16, 16, 16],
        "median_image_size_in_voxels": [32.0, 32.0, 32.0],
        "spacing": spacing,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        **copy.deepcopy(_RESAMPLING),
        "architecture": {
            "network_class_name": f"nnunet_samflare.networks.{network.__name__}",
            "arch_kwargs": dict(arch),
            "_kw_requires_import": [],
        },
        "batch_dice": True,
    }


def plans() -> dict:
    return {
        "dataset_name": "Dataset999_Tiny",
        "plans_name": DEFAULT_PLANS_NAME,
        "original_median_spacing_after_transp": [3.0, 3.0, 3.0],
        "original_median_shape_after_transp": [32, 32, 32],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1200.0,
                "mean": 40.0,
                "median": 40.0,
                "min": -1000.0,
                "percentile_00_5": -400.0,
                "percentile_99_5": 300.0,
                "std": 70.0,
            }
        },
        "configurations": {
            LOCATOR_CONFIGURATION: _configuration(LOCATOR_CONFIGURATION, [8.0, 8.0, 8.0], PConvLocator, LOCATOR_ARCH),
            SEGMENTER_CONFIGURATION: _configuration(
                SEGMENTER_CONFIGURATION, [4.0, 4.0, 4.0], SAMHybridUNet, SEGMENTER_ARCH
            ),
        },
    }


def _write_model(folder: Path, configuration: str, trainer: str, dataset_json: dict, network) -> Path:
    (folder / "fold_all").mkdir(parents=True)
    plan = plans()
    (folder / "plans.json").write_text(json.dumps(plan, indent=2), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    checkpoint = {
        "network_weights": network.state_dict(),
        "trainer_name": trainer,
        "init_args": {
            "plans": plan,
            "configuration": configuration,
            "fold": "all",
            "dataset_json": dataset_json,
            "device": "cpu",
        },
        "current_epoch": 0,
        "inference_allowed_mirroring_axes": (0, 1),
    }
    torch.save(checkpoint, folder / "fold_all" / "checkpoint_final.pth")
    return folder


def make_tiny_models(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """``(locator_folder, segmenter_folder)`` under ``root``, named as nnU-Net names result folders."""
    torch.manual_seed(seed)
    locator_json = binary_foreground_dataset_json(DATASET_JSON)
    locator = PConvLocator(1, 1, False, **LOCATOR_ARCH)  # one region head, as nnU-Net builds it for regions
    # A bias towards foreground: the random locator then finds a box in most scans, so the segmenter runs.
    with torch.no_grad():
        locator.decoder.seg_layers[0].bias.fill_(2.0)
    segmenter = SAMHybridUNet(1, len(LABELS), False, **SEGMENTER_ARCH)
    name = f"__{DEFAULT_PLANS_NAME}__"
    return (
        _write_model(
            root / f"{LOCATOR_TRAINER}{name}{LOCATOR_CONFIGURATION}",
            LOCATOR_CONFIGURATION,
            LOCATOR_TRAINER,
            locator_json,
            locator.eval(),
        ),
        _write_model(
            root / f"{SEGMENTER_TRAINER}{name}{SEGMENTER_CONFIGURATION}",
            SEGMENTER_CONFIGURATION,
            SEGMENTER_TRAINER,
            DATASET_JSON,
            segmenter.eval(),
        ),
    )
