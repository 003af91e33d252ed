"""``samflare profile``: the FLARE efficiency protocol, one fresh process running ``predict`` per case.

Every option this command does not know is a ``samflare predict`` option, e.g.
``samflare profile -i imagesTs -o out -d 501 -device cuda -f 0``, or, without a dataset,
``samflare profile -i imagesTs -o out --locator LOC_DIR --segmenter SEG_DIR``. They are parsed by the predict
sub-command's own parser here, before any case runs, and handed to the library as keyword arguments.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="time, GPU memory (every 0.1 s) and RAM of predict, one fresh process per case (FLARE)",
        description="Run `samflare predict` on every case of IMAGES in its own process (so start-up, imports, "
        "model loading and I/O count, as in FLARE) and sample device-wide and own GPU memory through NVML "
        "(nvidia-smi, device-wide only, where pynvml is missing) and host RAM (summed PSS of the process tree) "
        "every 0.1 s. Reports per case the time (s), MaxGPU (MB), AUC_GPU_Time (MB·s), own-process GPU peak, "
        "RAM peak, largest single-process RSS and exit code in profile.json, profile.csv and a memory-time PNG. "
        "All other options are predict's (e.g. -d DATASET, -f, -device, --locator DIR --segmenter DIR).",
        allow_abbrev=False,  # an abbreviation could swallow a predict option
    )
    parser.add_argument(
        "-i", dest="images", required=True, metavar="IMAGES", help="folder of <case>_0000 images (or one image file)"
    )
    parser.add_argument("-o", dest="output_dir", required=True, metavar="OUT", help="prediction folder")
    parser.add_argument(
        "--report-dir", metavar="DIR", help="where profile.json, profile.csv, the PNGs and logs go (default: OUT)"
    )
    parser.add_argument(
        "--sample-interval", type=float, default=0.1, metavar="S", help="sampling interval in seconds (FLARE: 0.1)"
    )
    parser.add_argument(
        "--case-timeout", type=float, metavar="S", help="kill a case after this many seconds (reported as failed)"
    )
    parser.add_argument("--no-gpu", action="store_true", help="do not sample GPU memory")
    # The CLI hands the options it does not know to this command (extra_args) instead of refusing them.
    parser.set_defaults(func=run, pass_through=True, extra_args=[])


def predict_options_from(extra_args: list[str], images: str, output_dir: str) -> dict:
    """``extra_args`` parsed as ``samflare predict`` options (its own parser: unknown flags are refused here)."""
    from nnunet_samflare.cli import build_parser
    from nnunet_samflare.cli.predict import predict_kwargs

    parser = build_parser()
    try:
        args = parser.parse_args(["predict", "-i", images, "-o", output_dir, *extra_args])
    except SystemExit as exit_:  # argparse printed why
        from nnunet_samflare.errors import InputError

        raise InputError(None, f"invalid predict options {' '.join(extra_args)!r}") from exit_
    return predict_kwargs(args)


def run(args: argparse.Namespace) -> int:
    from nnunet_samflare.errors import InputError
    from nnunet_samflare.evaluation.profile import format_profile_table, profile_cases

    if args.sample_interval <= 0:
        raise InputError(None, f"--sample-interval must be positive, not {args.sample_interval}")
    options = predict_options_from(args.extra_args, args.images, args.output_dir)
    if options.get("dataset") is None and not (options.get("locator") and options.get("segmenter")):
        raise InputError(None, "give a dataset (-d) or both model folders (--locator DIR --segmenter DIR)")
    result = profile_cases(
        args.images,
        args.output_dir,
        options,
        report_dir=args.report_dir,
        interval=args.sample_interval,
        timeout_s=args.case_timeout,
        gpu=None if args.no_gpu else "auto",
        progress=print,
        extra_args=args.extra_args,
    )
    print(format_profile_table(result))
    report_dir = args.report_dir or args.output_dir
    print(f"profile written to {report_dir}/profile.json and profile.csv")
    failed = result["summary"]["failed_cases"]
    if failed:
        print(f"samflare profile: {len(failed)} case(s) failed: {', '.join(failed)} (see their logs)", file=sys.stderr)
        return 1
    return 0
