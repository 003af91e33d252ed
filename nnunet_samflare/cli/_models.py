"""Arguments shared by the sub-commands that load the two models (``predict``, ``locate``, ``profile``)."""

import argparse
import math

from nnunet_samflare.errors import InputError
from nnunet_samflare.training.names import DEFAULT_PLANS_NAME, LOCATOR_TRAINER, SEGMENTER_TRAINER


def _margin_mm(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of mm >= 0, not {text}")
    return value


def _step_size(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:  # nnU-Net's sliding window asserts this, after the models are loaded
        raise argparse.ArgumentTypeError(f"must be in (0, 1], a fraction of the patch, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def add_model_arguments(p: argparse.ArgumentParser, segmenter_settings: bool = True) -> None:
    """Flags mirror nnUNetv2_predict where they mean the same thing. ``segmenter_settings`` False leaves out the
    flags that only the segmenter's sliding window and the paste-back use (``locate`` has no use for them)."""
    g = p.add_argument_group("models (found like nnUNetv2_predict finds them, or given as folders)")
    g.add_argument("-d", dest="dataset", help="dataset name or id")
    g.add_argument("-p", dest="plans", default=DEFAULT_PLANS_NAME, help="plans identifier (default: %(default)s)")
    g.add_argument("--locator_trainer", default=LOCATOR_TRAINER, help="default: %(default)s")
    g.add_argument("--segmenter_trainer", default=SEGMENTER_TRAINER, help="default: %(default)s")
    g.add_argument("--locator", metavar="DIR", help="locator model folder (overrides -d/-p/--locator_trainer)")
    g.add_argument("--segmenter", metavar="DIR", help="segmenter model folder (overrides -d/-p/--segmenter_trainer)")
    g.add_argument("-f", dest="folds", nargs="+", help="folds to use, e.g. 0 1 2 3 4 or all (default: all found)")
    g.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth", help="default: %(default)s")
    g.add_argument(
        "-device", dest="device", choices=("cuda", "cpu", "mps"), help="default: cuda if available, else mps, else cpu"
    )
    s = p.add_argument_group("inference settings (defaults follow the paper: docs/method.md §11.5)")
    s.add_argument("--margin_mm", type=_margin_mm, help="margin around the located box, mm (default: 10)")
    if not segmenter_settings:
        return
    s.add_argument("--step_size", type=_step_size, default=0.5, help="sliding-window step as a fraction of the patch")
    s.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (nnU-Net's; off by default)")
    s.add_argument(
        "--disable_tta",
        action="store_true",
        help="no mirroring TTA: already the default, accepted so nnUNetv2_predict command lines work",
    )
    s.add_argument("--gaussian", action="store_true", help="nnU-Net's Gaussian tile blending instead of uniform")
    s.add_argument(
        "--tile_batch", type=_positive_int, help="segmenter tiles per forward pass (default: 2 on cuda, else 1)"
    )
    s.add_argument(
        "--fast",
        action="store_true",
        help="segmenter in channels-last memory format and, on a CPU with native bfloat16 (AVX512-BF16, AMX), "
        "under bfloat16 autocast: ~2.8x faster segmenter on such a CPU; the rounding differs from stock "
        "nnUNetv2_predict's, so labels may differ at some boundary voxels (measured in BENCHMARKS.md)",
    )


def add_fail_fast_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fail-fast",
        dest="fail_fast",
        action="store_true",
        help="stop at the first bad case (default: go on with the others, list the failures at the end "
        "and exit with code 2, or 3 if one ran out of memory)",
    )


def predictor_options(args: argparse.Namespace) -> dict:
    """The :func:`nnunet_samflare.inference.api.build_predictor` options of these flags (the defaults for flags a
    command does not offer)."""
    from nnunet_samflare.inference.api import FAST_OPTIONS

    defaults = {
        "step_size": 0.5,
        "tta": False,
        "disable_tta": False,
        "gaussian": False,
        "tile_batch": None,
        "fast": False,
    }
    args = argparse.Namespace(**{**defaults, **vars(args)})
    if args.tta and args.disable_tta:
        raise InputError(None, "--tta and --disable_tta contradict each other")
    folds = None
    if args.folds:
        folds = [f if f == "all" else int(f) for f in args.folds]
    return dict(
        dataset=args.dataset,
        locator=args.locator,
        segmenter=args.segmenter,
        plans=args.plans,
        locator_trainer=args.locator_trainer,
        segmenter_trainer=args.segmenter_trainer,
        folds=folds,
        checkpoint_name=args.checkpoint,
        device=args.device,
        step_size=args.step_size,
        tta=args.tta,
        gaussian=args.gaussian,
        margin_mm=args.margin_mm,
        tile_batch=args.tile_batch,
        **{option: args.fast for option in FAST_OPTIONS},
    )
