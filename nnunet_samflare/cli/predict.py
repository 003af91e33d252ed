"""``samflare predict``: the whole cascade on NIfTI/MHA/NRRD files or DICOM series."""

import argparse

from nnunet_samflare.cli._models import add_fail_fast_argument, add_model_arguments, predictor_options
from nnunet_samflare.cli._reference import add_reference_arguments, reference_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="locate → crop → segment → post-process → paste back, for a folder, a file or a DICOM series",
        description="Segment 13 abdominal organs and tumours. INPUT: a folder of <case>_0000.nii.gz or <case>.nii.gz "
        "(.nii, .mha, .nrrd too), one image file, or a DICOM series folder. Label maps keep the input's format and "
        "geometry (DICOM → .nii.gz).",
    )
    p.add_argument("-i", dest="input", required=True, help="input folder, file or DICOM series folder")
    p.add_argument("-o", dest="output", required=True, help="output folder (or a file name for a single input)")
    add_fail_fast_argument(p)
    add_model_arguments(p)
    o = p.add_argument_group("outputs")
    o.add_argument(
        "--save_probabilities",
        action="store_true",
        help="also <case>.npz (class probabilities, float32, full size) and <case>.pkl like nnU-Net",
    )
    o.add_argument(
        "--continue_prediction", action="store_true", help="skip cases whose outputs exist; redo half-written ones"
    )
    o.add_argument("--stats", action="store_true", help="also <case>_stats.json: per-label volume (mL) and mean HU")
    o.add_argument("--preview", action="store_true", help="also <case>_preview.png: axial + coronal overlay")
    o.add_argument(
        "--no_postprocessing", action="store_true", help="skip largest-component and isolated-tumour post-processing"
    )
    o.add_argument(
        "--num_parts",
        type=int,
        default=1,
        help="split the cases into this many parts, as nnUNetv2_predict does (one job per part)",
    )
    o.add_argument("--part_id", type=int, default=0, help="which part this job predicts, 0 .. num_parts - 1")
    w = p.add_argument_group("overlap of consecutive cases (nnUNetv2_predict's flags; background threads here)")
    w.add_argument(
        "-npp",
        dest="npp",
        type=int,
        default=0,
        help="cases read (and checked) ahead while the models work on the current one (default: 0)",
    )
    w.add_argument(
        "-nps", dest="nps", type=int, default=0, help="finished cases written in the background (default: 0)"
    )
    add_reference_arguments(p)
    p.set_defaults(func=_run)


def predict_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``nnunet_samflare.predict`` that these flags mean (also used by ``profile``)."""
    options = predictor_options(args)
    options["postprocess"] = not args.no_postprocessing
    return dict(
        save_probabilities=args.save_probabilities,
        continue_prediction=args.continue_prediction,
        stats=args.stats,
        preview=args.preview,
        fail_fast=args.fail_fast,
        num_parts=args.num_parts,
        part_id=args.part_id,
        num_processes_preprocessing=args.npp,
        num_processes_segmentation_export=args.nps,
        **options,
    )


def _run(args: argparse.Namespace) -> int:
    from nnunet_samflare.inference.api import predict

    written = predict(args.input, args.output, **predict_kwargs(args), **reference_kwargs(args))
    print(f"{len(written)} label map(s) in {args.output}")
    return 0
