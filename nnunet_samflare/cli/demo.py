"""``samflare demo``: the whole workflow on the example CT (or any nnU-Net raw dataset), sized for a CPU."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="plan, preprocess, train both phases, predict and evaluate on the example CT, in one command",
        description="Run the plug-in's whole nnU-Net workflow on the example CT shipped with the package (no "
        "network, no data of your own): nnU-Net planning, samflare plan with a CPU-sized plan, preprocessing, "
        "training of the locator and the segmenter (shortened), samflare predict, samflare evaluate, and a report "
        "folder. The models are trained and evaluated on the same scan: the run shows the workflow and that it "
        "learns, not accuracy on new patients.",
    )
    p.add_argument(
        "--work",
        metavar="DIR",
        help="work folder (default: ./samflare-demo); a previous demo run "
        "there is replaced, any other non-empty folder is refused",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="an nnU-Net raw dataset (dataset.json, imagesTr, labelsTr) to use "
        "instead of the example; post-processing and metric names assume FLARE23 label ids",
    )
    p.add_argument("--quick", action="store_true", help="a smoke-test size: every step, minimal training")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep checkpoints and preprocessed data (for samflare "
        "predict / export afterwards); by default they are deleted at the end",
    )
    p.add_argument(
        "-device", dest="device", choices=("cuda", "cpu", "mps"), help="default: cuda if available, else mps, else cpu"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from nnunet_samflare.workflows.demo import run_demo

    run_demo(args.work, data=args.data, quick=args.quick, device=args.device, keep=args.keep)
    return 0
