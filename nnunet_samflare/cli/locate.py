"""``samflare locate``: phase 1 only, writing ROI images for stock ``nnUNetv2_predict``."""

import argparse

from nnunet_samflare.cli._models import add_fail_fast_argument, add_model_arguments, predictor_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "locate",
        help="find the abdomen and write the cropped images (+ <case>.json) for nnUNetv2_predict",
        description="Writes, per case, <case>_0000.nii.gz (the ROI resampled to the segmenter's spacing) and "
        "<case>.json (the box and the original geometry). Then: nnUNetv2_predict -i ROI_DIR -o PRED -c 3d_segmenter "
        "... ; samflare uncrop -i PRED -r ROI_DIR -o OUT ; samflare postprocess -i OUT -o FINAL.",
    )
    p.add_argument("-i", dest="input", required=True, help="input folder, file or DICOM series folder")
    p.add_argument("-o", dest="output", required=True, help="ROI folder")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases whose <case>.json exists")
    add_fail_fast_argument(p)
    add_model_arguments(p, segmenter_settings=False)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from nnunet_samflare.inference.api import build_predictor, model_folders
    from nnunet_samflare.inference.composition import locate_to_folder
    from nnunet_samflare.inference.validation import CascadeGrids

    options = predictor_options(args)
    grids = CascadeGrids.from_model_folders(*model_folders(**options))  # plans only: no checkpoint loaded yet
    records = locate_to_folder(
        lambda: build_predictor(**options),
        args.input,
        args.output,
        args.continue_prediction,
        args.fail_fast,
        grids=grids,
    )
    print(f"{len(records)} case(s) located in {args.output}")
    return 0
