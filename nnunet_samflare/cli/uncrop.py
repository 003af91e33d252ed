"""``samflare uncrop``: paste ROI predictions back into the original images' geometry."""

import argparse

from nnunet_samflare.cli._models import add_fail_fast_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "uncrop",
        help="paste nnUNetv2_predict's ROI label maps back into the original geometry",
        description="Reads the <case>.json records written by samflare locate.",
    )
    p.add_argument("-i", dest="input", required=True, help="folder of ROI label maps (nnUNetv2_predict output)")
    p.add_argument("-r", dest="roi_dir", required=True, help="the ROI folder written by samflare locate")
    p.add_argument("-o", dest="output", required=True, help="output folder")
    add_fail_fast_argument(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from nnunet_samflare.inference.composition import uncrop_folder

    written = uncrop_folder(args.input, args.roi_dir, args.output, args.fail_fast)
    print(f"{len(written)} label map(s) in {args.output}")
    return 0
