"""``samflare pseudolabel {run,merge,vote,filter}``: the paper's pseudo-label training on partially labelled and
unlabelled scans, and its three building blocks on their own (docs/method.md §6.4)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pseudolabel",
        help="self-training rounds on partially labelled + unlabelled scans; merge, vote and filter on their own",
        description="Pseudo labels as the paper made them: per round, fold models predict the scans they did not "
        "train on, their probabilities are soft-voted, cleaned and merged with the ground truth (which always "
        "wins), and the next round trains on the result. `run` does it all and can be killed and re-run.",
    )
    commands = parser.add_subparsers(dest="pseudolabel_command", required=True, metavar="STEP")
    _register_run(commands)
    _register_merge(commands)
    _register_vote(commands)
    _register_filter(commands)


def _register_run(commands: argparse._SubParsersAction) -> None:
    from nnunet_samflare.training.names import DEFAULT_PLANS_NAME, LOCATOR_TRAINER

    p = commands.add_parser(
        "run",
        help="all rounds, then the final locator and segmenter; re-run the same command to continue",
        description="Round r trains the segmenter per fold on dataset <first_id + r - 1> (stock nnUNetv2_train), "
        "predicts every partially labelled case with the fold model that did not train on it and every unlabelled "
        "scan with all fold models, soft-votes, filters and merges with the ground truth into the nnU-Net raw "
        "dataset <first_id + r>; after the last round the locator and the final segmenter are trained on it. "
        "State, logs and per-round reports (report.json, report.png) go to the work folder. Needs nnUNet_raw, "
        "nnUNet_preprocessed, nnUNet_results, and the dataset planned with nnUNetv2_plan_and_preprocess + "
        "samflare plan. Exit code 75: prediction parts (--num_parts) are still missing.",
    )
    p.add_argument("-d", dest="dataset", required=True, help="the labelled (partially labelled) dataset, name or id")
    p.add_argument(
        "--unlabeled",
        metavar="DIR",
        help="folder of unlabelled scans (<case>_0000<ending> or <case><ending>, the dataset's ending)",
    )
    p.add_argument("--rounds", type=int, default=3, help="pseudo-label rounds (default: %(default)s, as the paper)")
    p.add_argument("--folds", type=int, default=2, help="fold models per round (default: %(default)s, as the paper)")
    p.add_argument(
        "--confidence",
        type=float,
        help="voxels whose voted winning probability is below this become the ignore label "
        "(max label + 1); default: no confidence filtering",
    )
    p.add_argument(
        "--warm-start",
        "--warm_start",
        dest="warm_start",
        action="store_true",
        help="start round r+1's fold k (and the final segmenter) from round r's weights",
    )
    p.add_argument("-p", dest="plans", default=DEFAULT_PLANS_NAME, help="plans identifier (default: %(default)s)")
    p.add_argument(
        "--segmenter_trainer", help="trainer of the round segmenters (default: nnUNetTrainer_SAMFlareSegmenterPartial)"
    )
    p.add_argument("--final_segmenter_trainer", help="trainer of the final segmenter (default: --segmenter_trainer)")
    p.add_argument("--locator_trainer", default=LOCATOR_TRAINER, help="default: %(default)s")
    p.add_argument(
        "--locator",
        metavar="DIR",
        help="a trained locator model folder for the rounds' predictions (default: train one on the "
        "labelled data first)",
    )
    p.add_argument(
        "--first_id",
        type=int,
        help="dataset id of round 1's training data; the rounds use the next ids (default: the dataset's id + 100)",
    )
    p.add_argument(
        "-o",
        dest="work_dir",
        metavar="DIR",
        help="work folder (default: $nnUNet_results/<dataset>/samflare_pseudolabel)",
    )
    p.add_argument(
        "--no_postprocessing", action="store_true", help="do not apply the paper's post-processing to the pseudo labels"
    )
    p.add_argument("-device", dest="device", choices=("cuda", "cpu", "mps"), help="default: cuda if available")
    p.add_argument(
        "--num_parts",
        type=int,
        default=1,
        help="split each round's prediction into N jobs: the run writes their command lines "
        "(round_<r>/predict_parts.sh) and continues once all their outputs are there",
    )
    p.add_argument(
        "--keep_probabilities",
        action="store_true",
        help="keep the rounds' .npz probability files (large) instead of deleting them after the round",
    )
    p.add_argument(
        "-np",
        dest="num_processes",
        type=int,
        default=4,
        help="processes for nnUNetv2_preprocess (default: %(default)s)",
    )
    p.set_defaults(func=_run)


def _register_merge(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "merge",
        help="ground truth wins on the labels each case annotates; pseudo labels fill the rest",
        description="One merged label map per pseudo label map. Annotated labels (partial_labels in dataset.json; "
        "a case without an entry is fully annotated) keep their ground truth; an annotated label is never added "
        "where the ground truth says otherwise. Writes <case>_merge.json beside each map.",
    )
    p.add_argument("--gt", dest="ground_truth", required=True, metavar="LABELS", help="ground-truth label maps")
    p.add_argument("--pseudo", required=True, metavar="PRED", help="pseudo label maps")
    p.add_argument("-o", dest="output", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "--dataset-json",
        "--dataset_json",
        dest="dataset_json",
        help="where partial_labels come from (default: dataset.json in or above LABELS)",
    )
    p.set_defaults(func=_merge)


def _register_vote(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "vote",
        help="average the folds' probabilities (nnU-Net .npz/.pkl), then argmax",
        description="Soft vote of fold predictions made with --save_probabilities. Every case must be in every "
        "folder, with the same array shape and image geometry. Writes <case><ending>, the averaged <case>.npz, "
        "<case>.pkl and <case>_vote.json (fold agreement).",
    )
    p.add_argument("-i", dest="inputs", nargs="+", required=True, metavar="FOLD_PRED", help="one folder per fold")
    p.add_argument("-o", dest="output", required=True, metavar="OUT", help="output folder")
    p.set_defaults(func=_vote)


def _register_filter(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "filter",
        help="the paper's post-processing, plus low-confidence voxels -> ignore label",
        description="Largest component per organ and removal of tumours touching no organ (the paper's "
        "post-processing); with --confidence, voxels whose winning probability (<case>.npz) is below it become "
        "nnU-Net's ignore label. Writes <case>_filter.json (ignored voxels per label) beside each map.",
    )
    p.add_argument("-i", dest="input", required=True, metavar="PRED", help="label maps (+ <case>.npz)")
    p.add_argument("-o", dest="output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--confidence", type=float, help="winning-probability threshold, e.g. 0.9")
    p.add_argument("--ignore_label", type=int, help="default: the number of probability classes (max label + 1)")
    p.add_argument("--no_postprocessing", action="store_true", help="only the confidence step")
    p.set_defaults(func=_filter)


def _run(args: argparse.Namespace) -> int:
    from nnunet_samflare.pseudolabel.run import RunSettings, StepFailed, WaitingForParts, run_pseudolabel

    defaults = RunSettings(dataset=args.dataset)
    settings = RunSettings(
        dataset=args.dataset,
        unlabeled=args.unlabeled,
        rounds=args.rounds,
        folds=args.folds,
        confidence=args.confidence,
        warm_start=args.warm_start,
        plans=args.plans,
        segmenter_trainer=args.segmenter_trainer or defaults.segmenter_trainer,
        final_segmenter_trainer=args.final_segmenter_trainer,
        locator_trainer=args.locator_trainer,
        locator=args.locator,
        first_id=args.first_id,
        work_dir=args.work_dir,
        postprocess=not args.no_postprocessing,
        device=args.device,
        num_parts=args.num_parts,
        keep_probabilities=args.keep_probabilities,
        num_processes=args.num_processes,
    )
    try:
        run_pseudolabel(settings)
    except WaitingForParts as waiting:
        print(f"samflare pseudolabel run: waiting: {waiting}")
        return waiting.exit_code
    except StepFailed as failed:  # nnU-Net's own traceback is in the log the message names
        print(f"samflare pseudolabel run: error: {failed}", file=sys.stderr)
        return 1
    return 0


def _merge(args: argparse.Namespace) -> int:
    from nnunet_samflare.pseudolabel.merge import merge_folders

    records = merge_folders(args.ground_truth, args.pseudo, args.output, args.dataset_json)
    counts: dict[str, int] = {}
    for record in records.values():
        counts[record["provenance"]] = counts.get(record["provenance"], 0) + 1
    print(f"{len(records)} merged label map(s) in {args.output} ({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    return 0


def _vote(args: argparse.Namespace) -> int:
    from nnunet_samflare.pseudolabel.report import pooled_agreement
    from nnunet_samflare.pseudolabel.vote import vote_folders

    records = vote_folders(args.inputs, args.output)
    agreement = pooled_agreement(records.values())
    print(f"{len(records)} case(s) voted from {len(args.inputs)} fold(s) into {args.output}")
    if agreement:
        print("fold agreement (DSC): " + ", ".join(f"{k}: {v:.4f}" for k, v in agreement.items() if k != "0"))
    return 0


def _filter(args: argparse.Namespace) -> int:
    from nnunet_samflare.pseudolabel.filtering import filter_folder
    from nnunet_samflare.pseudolabel.report import summed

    records = filter_folder(args.input, args.output, args.confidence, args.ignore_label, not args.no_postprocessing)
    print(f"{len(records)} label map(s) filtered into {args.output}")
    if args.confidence is not None:
        ignored = summed(records.values(), "ignored")
        print("ignored voxels per label: " + (", ".join(f"{k}: {v}" for k, v in ignored.items()) or "none"))
    return 0
