"""``samflare predict --reference_pipeline``: the authors' own inference with their weight files
(docs/method.md §5; ``nnunet_samflare.inference.reference_pipeline``)."""

from __future__ import annotations

import argparse

from nnunet_samflare.errors import InputError

# Flags of the nnU-Net cascade that mean nothing to the authors' fixed pipeline (-device, the outputs
# --continue_prediction/--stats/--preview and --num_parts/--part_id do apply).
_CASCADE_ONLY = (
    "dataset", "plans", "locator_trainer", "segmenter_trainer", "locator", "segmenter", "folds", "checkpoint",
    "step_size", "tta", "gaussian", "margin_mm", "tile_batch", "fast", "save_probabilities", "no_postprocessing",
)  # fmt: skip


def add_reference_arguments(p: argparse.ArgumentParser) -> None:
    """Call after every other argument of ``p`` is registered (it records their defaults)."""
    g = p.add_argument_group(
        "the authors' published pipeline (docs/method.md §5): for THEIR weights only; models trained with this "
        "plug-in use nnU-Net's preprocessing and the default path"
    )
    g.add_argument(
        "--reference_pipeline",
        action="store_true",
        help="run the authors' inference exactly (percentile scaling, 1.5x1.5x2 mm, locator at 128^3, "
        "ROI without margin, MONAI sliding window); needs --locator_weights and --segmenter_weights",
    )
    g.add_argument(
        "--locator_weights",
        metavar="FILE",
        help="phase-1 weights: the authors' checkpoint, or its samflare convert-weights output",
    )
    g.add_argument(
        "--segmenter_weights",
        metavar="FILE",
        help="phase-2 weights: the authors' checkpoint, or its samflare convert-weights output",
    )
    flags = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
    p.set_defaults(_cascade_defaults={dest: (flags[dest], p.get_default(dest)) for dest in _CASCADE_ONLY})


def reference_kwargs(args: argparse.Namespace) -> dict:
    """``{"predictor": <the authors' pipeline with their weights>}`` for ``nnunet_samflare.predict`` under
    ``--reference_pipeline`` (loaded here, so a bad weight file fails before anything is written); ``{}``
    without the flag."""
    if not args.reference_pipeline:
        if args.locator_weights or args.segmenter_weights:
            raise InputError(None, "--locator_weights/--segmenter_weights are for --reference_pipeline")
        return {}
    given = [flag for dest, (flag, default) in args._cascade_defaults.items() if getattr(args, dest) != default]
    if given:
        raise InputError(None, f"--reference_pipeline runs the authors' fixed pipeline; drop {', '.join(given)}")
    from nnunet_samflare.inference.api import build_predictor

    predictor = build_predictor(
        reference_pipeline=True,
        locator_weights=args.locator_weights,
        segmenter_weights=args.segmenter_weights,
        device=args.device,
    )
    return {"predictor": predictor}
