"""``samflare postprocess``: the FLARE23 post-processing (docs/method.md §5.6) on label maps that were predicted by
other means (e.g. stock ``nnUNetv2_predict`` on ROI crops, after ``samflare uncrop``)."""

from __future__ import annotations

import argparse

from nnunet_samflare.cli._models import add_fail_fast_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "postprocess",
        help="largest component per organ + isolated-tumor removal on label maps",
        description=(
            "Apply the FLARE23 post-processing (largest 26-connected component per organ 1-13, then removal of "
            "tumors that touch no organ) to every label map in a folder, or to one file. Outputs keep the input's "
            "file name, format and geometry and are written atomically; inputs are never modified. "
            "--write-nnunet-pkl writes the same steps as a postprocessing.pkl for stock "
            "`nnUNetv2_apply_postprocessing -pp_pkl_file FILE`."
        ),
    )
    parser.add_argument("-i", dest="input", help="folder of label maps (.nii.gz, .nii, .mha, .nrrd) or one file")
    parser.add_argument("-o", dest="output", help="output folder (or output file when -i is a file)")
    parser.add_argument(
        "--write-nnunet-pkl",
        metavar="FILE",
        help="also write the postprocessing.pkl (pp_fns, pp_fn_kwargs) for nnUNetv2_apply_postprocessing",
    )
    add_fail_fast_argument(parser)
    parser.set_defaults(func=run, _parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.input is None and args.output is None and args.write_nnunet_pkl is None:
        args._parser.error("give -i and -o, --write-nnunet-pkl, or both")
    if (args.input is None) != (args.output is None):
        args._parser.error("-i and -o go together")

    from nnunet_samflare.inference.postprocessing import postprocess_label_maps, write_nnunet_postprocessing_pkl

    if args.write_nnunet_pkl is not None:
        print(f"wrote {write_nnunet_postprocessing_pkl(args.write_nnunet_pkl)}")
    if args.input is not None:
        written = postprocess_label_maps(args.input, args.output, args.fail_fast)
        print(f"post-processed {len(written)} label map(s) into {args.output}")
    return 0
