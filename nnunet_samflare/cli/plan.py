"""``samflare plan``: add the plug-in configurations to a dataset's nnU-Net plans."""

import argparse

from nnunet_samflare.training.names import (
    DEFAULT_PLANS_NAME,
    DEFAULT_SOURCE_PLANS_NAME,
    LOCATOR_CONFIGURATION,
    SEGMENTER_CONFIGURATION,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help=f"write {DEFAULT_PLANS_NAME}.json ({LOCATOR_CONFIGURATION} + {SEGMENTER_CONFIGURATION}) next to the "
        "dataset's nnU-Net plans",
        description="Derive <plans_name>.json from the dataset's nnU-Net plans (run nnUNetv2_plan_and_preprocess "
        "first). Spacings and patch sizes are given in (z, y, x) order.",
    )
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument(
        "-p",
        dest="source_plans",
        default=DEFAULT_SOURCE_PLANS_NAME,
        help="source plans identifier, e.g. nnUNetPlans or nnUNetResEncUNetMPlans (default: %(default)s)",
    )
    p.add_argument(
        "-o", "--plans_name", default=DEFAULT_PLANS_NAME, help="output plans identifier (default: %(default)s)"
    )
    p.add_argument("--locator_patch", type=int, nargs=3, metavar=("Z", "Y", "X"), help="default 128 128 128")
    p.add_argument(
        "--locator_spacing",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="default: median physical extent / patch, never finer than the median spacing",
    )
    p.add_argument("--segmenter_patch", type=int, nargs=3, metavar=("Z", "Y", "X"), help="default 96 96 96")
    p.add_argument("--segmenter_spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="default 2.0 1.5 1.5")
    p.add_argument("--batch_size", type=int, help="batch size of both configurations (default 2)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from nnunet_samflare.training.plans import describe_configuration, write_samflare_plans

    path = write_samflare_plans(
        args.dataset,
        args.source_plans,
        args.plans_name,
        locator_patch_size=args.locator_patch,
        locator_spacing_zyx=args.locator_spacing,
        segmenter_patch_size=args.segmenter_patch,
        segmenter_spacing_zyx=args.segmenter_spacing,
        batch_size=args.batch_size,
    )
    plans = json.loads(path.read_text(encoding="utf-8"))
    print(f"wrote {path}")
    for name in (LOCATOR_CONFIGURATION, SEGMENTER_CONFIGURATION):
        print("  " + describe_configuration(plans, name))
    configurations = f"{LOCATOR_CONFIGURATION} {SEGMENTER_CONFIGURATION}"
    print(f"next: nnUNetv2_preprocess -d {args.dataset} -plans_name {args.plans_name} -c {configurations}")
    return 0
