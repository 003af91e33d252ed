"""``samflare evaluate``: DSC and NSD of a prediction folder with the official FLARE23 semantics."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="DSC/NSD per case and label as the official FLARE23 evaluator computes them",
        description="Score every label map of REF_DIR against the file of the same case in PRED_DIR (docs/method.md "
        "§10). Partially labelled references (partial_labels in dataset.json) are scored on their annotated "
        "labels only. A missing prediction scores 0, as in FLARE.",
    )
    parser.add_argument("ref_dir", metavar="REF_DIR", help="reference label maps (<case>.nii.gz, ...)")
    parser.add_argument("pred_dir", metavar="PRED_DIR", help="predicted label maps with the same case names")
    parser.add_argument(
        "-o", "--output", metavar="JSON", help="where to write the metrics (default: PRED_DIR/metrics.json)"
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        default=["1..14"],
        metavar="L",
        help="label ids: a list (1 2 5), ranges (1..14 or 1-14) or both (default: 1..14)",
    )
    parser.add_argument(
        "--nsd-cutoff",
        type=float,
        default=0.2,
        metavar="DSC",
        help="NSD is 0 where the DSC is below this (default 0.2, the evaluator today; FLARE23 used 0.1)",
    )
    parser.add_argument(
        "--no-slab-quirk",
        action="store_true",
        help="keep the top-most labelled slice in the aorta/IVC/esophagus slab (the official evaluator leaves it out)",
    )
    parser.add_argument(
        "--dataset-json",
        metavar="FILE",
        help="dataset.json with partial_labels (default: dataset.json in REF_DIR or its parent, if any)",
    )
    parser.add_argument("--plot", metavar="PNG", help="also save a per-organ DSC/NSD box plot")
    parser.add_argument(
        "--on-missing",
        choices=("zero", "error"),
        default="zero",
        help="a reference case without prediction: score 0 (FLARE, default) or stop",
    )
    parser.add_argument(
        "-np", "--num-processes", type=int, default=1, metavar="N", help="cases scored in parallel (default 1)"
    )
    parser.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first bad file (default: score the other cases, list the failures, exit 2)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings
    from pathlib import Path

    from nnunet_samflare.errors import InputError
    from nnunet_samflare.evaluation.evaluate import evaluate_folders, format_table, parse_label_spec
    from nnunet_samflare.io import check_output_folder

    output = Path(args.output) if args.output else Path(args.pred_dir) / "metrics.json"
    # Before the scoring: a wrong name must neither cost the scoring nor overwrite a label map.
    if output.suffix.lower() != ".json":
        raise InputError(output, "-o names the metrics file, which must end with .json")
    if args.plot:
        from nnunet_samflare.evaluation.plots import PLOT_FORMATS

        if Path(args.plot).suffix.lower().lstrip(".") not in PLOT_FORMATS:
            raise InputError(args.plot, f"--plot must end with one of .{', .'.join(PLOT_FORMATS)}")
        check_output_folder(Path(args.plot).parent)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_folders(
            args.ref_dir,
            args.pred_dir,
            labels=parse_label_spec(args.labels),
            nsd_cutoff=args.nsd_cutoff,
            official_slab_quirk=not args.no_slab_quirk,
            dataset_json=args.dataset_json,
            output_file=output,
            on_missing=args.on_missing,
            num_processes=args.num_processes,
            fail_fast=args.fail_fast,
        )
    for warning in caught:
        print(f"samflare evaluate: warning: {warning.message}", file=sys.stderr)
    print(format_table(result))
    print(f"metrics written to {output}")
    if args.plot:
        from nnunet_samflare.evaluation.plots import plot_metrics

        print(f"plot written to {plot_metrics(result, args.plot)}")
    failed = result["summary"]["failed_cases"]
    for case, why in failed.items():
        print(f"samflare evaluate: error: {case}: {why}", file=sys.stderr)
    if failed:
        print(
            f"samflare evaluate: error: {len(failed)} of {len(failed) + len(result['cases'])} case(s) could not "
            "be scored",
            file=sys.stderr,
        )
        from nnunet_samflare.errors import EXIT_BAD_INPUT, EXIT_OUT_OF_MEMORY

        return EXIT_OUT_OF_MEMORY if result["summary"]["failed_out_of_memory"] else EXIT_BAD_INPUT
    return 0
