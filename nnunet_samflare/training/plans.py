"""``samflare plan``: derive the plug-in's plans file from a dataset's nnU-Net plans.

The result is a copy of the source plans (``nnUNetPlans`` or a ResEnc plans file) with ``plans_name`` set to
the file stem (nnU-Net names result folders after ``plans_name``, docs/nnunet.md §3) and two extra configurations,
``3d_locator`` and ``3d_segmenter``, taken from ``plans/samflare_configurations.json``. Both inherit from
``3d_fullres`` (normalisation, resampling) and get their own ``data_identifier`` so that preprocessing one
never deletes another's data.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from nnunet_samflare.errors import InputError
from nnunet_samflare.training.names import (
    BASE_CONFIGURATION,
    DEFAULT_PLANS_NAME,
    DEFAULT_SOURCE_PLANS_NAME,
    LOCATOR_CONFIGURATION,
    SEGMENTER_CONFIGURATION,
)

LOCATOR = LOCATOR_CONFIGURATION
SEGMENTER = SEGMENTER_CONFIGURATION


def load_configuration_templates() -> dict:
    """The plug-in configurations as shipped in ``plans/samflare_configurations.json``."""
    text = resources.files("nnunet_samflare.plans").joinpath("samflare_configurations.json").read_text(encoding="utf-8")
    return json.loads(text)["configurations"]


def _network_class(class_path: str):
    import pydoc

    cls = pydoc.locate(class_path)
    if cls is None:
        raise ValueError(f"network class {class_path!r} cannot be imported")
    return cls


def _check_patch_size(name: str, configuration: dict) -> None:
    architecture = configuration["architecture"]
    divisor = _network_class(architecture["network_class_name"]).input_divisor(**architecture["arch_kwargs"])
    bad = [s for s in configuration["patch_size"] if s % divisor]
    if bad:
        raise InputError(
            None,
            f"{name}: patch size {configuration['patch_size']} must be divisible by {divisor} on every axis "
            f"({architecture['network_class_name'].rsplit('.', 1)[-1]} downsamples by {divisor})",
        )


def locator_spacing(source_plans: dict, patch_size_zyx: Sequence[int]) -> list[float]:
    """Coarse whole-scan grid of the locator, in the plans' (transposed) axis order.

    The paper resizes every scan to 128³ (docs/method.md §2.1). A fixed spacing chosen so that the dataset's median
    scan fills about one 128³ patch gives the same view of a typical scan while keeping physical scale
    constant across cases, and it works with stock ``nnUNetv2_preprocess``/``nnUNetv2_predict`` (docs/nnunet.md
    §3 option a). Larger scans are covered by nnU-Net's sliding window. The grid is never finer than the
    data's own median spacing: upsampling would add cost and no information.
    """
    spacing = np.asarray(source_plans["original_median_spacing_after_transp"], dtype=float)
    shape = np.asarray(source_plans["original_median_shape_after_transp"], dtype=float)
    patch = np.asarray(transposed(patch_size_zyx, source_plans["transpose_forward"]), dtype=float)
    return [round(float(v), 4) for v in np.maximum(spacing * shape / patch, spacing)]


def transposed(values: Sequence, order: Sequence[int]) -> list:
    """``values`` permuted by nnU-Net's ``transpose_forward`` (SimpleITK (z, y, x) order -> the plans' order) or
    ``transpose_backward`` (the plans' order -> (z, y, x)): ``[values[axis] for axis in order]``."""
    return [values[axis] for axis in order]


def derive_samflare_plans(
    source_plans: dict,
    plans_name: str = DEFAULT_PLANS_NAME,
    *,
    locator_patch_size: Sequence[int] | None = None,
    locator_spacing_zyx: Sequence[float] | None = None,
    segmenter_patch_size: Sequence[int] | None = None,
    segmenter_spacing_zyx: Sequence[float] | None = None,
    batch_size: int | None = None,
) -> dict:
    """Return a new plans dict: ``source_plans`` plus ``3d_locator`` and ``3d_segmenter``.

    The optional arguments override the templates (e.g. a smaller segmenter patch for a smaller GPU); spacings
    and patch sizes are given in SimpleITK (z, y, x) order.
    """
    if BASE_CONFIGURATION not in source_plans["configurations"]:
        raise InputError(
            None,
            f"plans {source_plans.get('plans_name')!r} have no {BASE_CONFIGURATION!r} configuration to inherit from",
        )
    plans = copy.deepcopy(source_plans)
    plans["plans_name"] = plans_name
    templates = load_configuration_templates()
    overrides = {
        LOCATOR: (locator_patch_size, locator_spacing_zyx),
        SEGMENTER: (segmenter_patch_size, segmenter_spacing_zyx),
    }
    median_extent_mm = np.asarray(plans["original_median_spacing_after_transp"], dtype=float) * np.asarray(
        plans["original_median_shape_after_transp"], dtype=float
    )
    forward = plans["transpose_forward"]
    for name, template in templates.items():
        patch_override, spacing_override = overrides[name]
        configuration = copy.deepcopy(template)
        patch_zyx = list(patch_override) if patch_override is not None else configuration["patch_size"]
        configuration["patch_size"] = [int(v) for v in transposed(patch_zyx, forward)]
        if spacing_override is not None:
            configuration["spacing"] = [float(v) for v in transposed(spacing_override, forward)]
        elif configuration["spacing"] is None:
            configuration["spacing"] = locator_spacing(plans, patch_zyx)
        else:
            configuration["spacing"] = [float(v) for v in transposed(configuration["spacing"], forward)]
        architecture = configuration["architecture"]
        if "arch_kwargs" not in architecture:  # the network class holds the only copy of its defaults
            architecture["arch_kwargs"] = _network_class(architecture["network_class_name"]).default_arch_kwargs()
        if batch_size is not None:
            configuration["batch_size"] = int(batch_size)
        configuration["data_identifier"] = f"{plans_name}_{name}"
        configuration["median_image_size_in_voxels"] = [
            round(float(e / s), 1) for e, s in zip(median_extent_mm, configuration["spacing"])
        ]
        _check_patch_size(name, configuration)
        plans["configurations"][name] = configuration
    return plans


def write_samflare_plans(
    dataset_name_or_id: str | int,
    source_plans_name: str = DEFAULT_SOURCE_PLANS_NAME,
    plans_name: str = DEFAULT_PLANS_NAME,
    **overrides,
) -> Path:
    """Write ``$nnUNet_preprocessed/<dataset>/<plans_name>.json`` derived from ``<source_plans_name>.json``."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed:
        raise InputError(None, "nnUNet_preprocessed is not set; run nnUNetv2_plan_and_preprocess first")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError as e:  # nnU-Net's way of saying that no such dataset exists
        raise InputError(None, f"dataset {dataset_name_or_id}: {e}") from None
    folder = Path(nnUNet_preprocessed) / dataset_name
    source = folder / f"{source_plans_name}.json"
    if not source.is_file():
        hint = f"run nnUNetv2_plan_and_preprocess -d {dataset_name_or_id}"
        raise FileNotFoundError(f"{source}: no such plans file ({hint})")
    try:
        source_plans = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(source, f"not valid JSON ({e})") from None
    plans = derive_samflare_plans(source_plans, plans_name, **overrides)
    target = folder / f"{plans_name}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{plans_name}.", suffix=".json.tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(plans, f, indent=4, sort_keys=False)
    os.replace(tmp, target)
    return target


def describe_configuration(plans: dict, name: str) -> str:
    """One line for the console: spacing, patch size, network and the median scan's tile count."""
    configuration = plans["configurations"][name]
    median = configuration["median_image_size_in_voxels"]
    tiles = math.prod(max(1, math.ceil(m / p)) for m, p in zip(median, configuration["patch_size"]))
    network = configuration["architecture"]["network_class_name"].rsplit(".", 1)[-1]
    return (
        f"{name}: {network}, spacing {configuration['spacing']} mm, patch {configuration['patch_size']}, "
        f"batch {configuration['batch_size']}, median scan {median} voxels (~{tiles} patch(es))"
    )
