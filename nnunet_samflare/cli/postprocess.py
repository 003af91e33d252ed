"""``samflare postprocess``: the FLARE23 post-processing (METHOD.md §5.6) on label maps that were predicted by
other means (e.g. stock ``nnUNetv2_predict`` on ROI crops, after ``samflare uncrop``)."""

from __future__ import annotations

import argparse


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
    parser.set_defaults(func=run, _parser=parser)


def _plan_outputs(input_path, output_path):
    """(input file, output file) pairs; refuses to write over the inputs."""
    from pathlib import Path

    from nnunet_samflare.inference.io import InputError, image_ending, list_image_files

    src, dst = Path(input_path), Path(output_path)
    if not src.exists():
        raise InputError(src, "no such file or folder")
    if src.is_file():
        if image_ending(src) is None:
            raise InputError(src, "unsupported file type (expected .nii.gz, .nii, .mha or .nrrd)")
        target = dst if image_ending(dst) is not None and not dst.is_dir() else dst / src.name
        pairs = [(src, target)]
    else:
        files = list_image_files(src)
        if not files:
            raise InputError(src, "no label maps found (.nii.gz, .nii, .mha or .nrrd)")
        if dst.exists() and not dst.is_dir():
            raise InputError(dst, "output must be a folder when the input is a folder")
        pairs = [(f, dst / f.name) for f in files]
    for f, out in pairs:
        if out.resolve() == f.resolve():
            raise InputError(f, "output would overwrite the input; choose another output folder")
    return pairs


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.input is None and args.output is None and args.write_nnunet_pkl is None:
        args._parser.error("give -i and -o, --write-nnunet-pkl, or both")
    if (args.input is None) != (args.output is None):
        args._parser.error("-i and -o go together")

    import SimpleITK as sitk
    from tqdm import tqdm

    from nnunet_samflare.inference.io import read_label_map, write_image_atomic
    from nnunet_samflare.inference.postprocessing import postprocess_flare, write_nnunet_postprocessing_pkl

    if args.write_nnunet_pkl is not None:
        pkl = write_nnunet_postprocessing_pkl(args.write_nnunet_pkl)
        print(f"wrote {pkl}")

    if args.input is None:
        return 0
    pairs = _plan_outputs(args.input, args.output)
    for src, dst in tqdm(pairs, desc="postprocess", unit="case", disable=None if len(pairs) > 1 else True):
        image = read_label_map(src)
        seg = sitk.GetArrayFromImage(image)
        result = sitk.GetImageFromArray(postprocess_flare(seg).astype(seg.dtype, copy=False))
        result.CopyInformation(image)  # spacing, origin, direction: exactly those of the input
        write_image_atomic(result, dst)
    print(f"post-processed {len(pairs)} label map(s) into {Path(args.output)}")
    return 0
