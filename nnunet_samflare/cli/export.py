"""``samflare export`` and ``samflare install``: share a trained cascade as one zip."""

import argparse

from nnunet_samflare.training.names import DEFAULT_PLANS_NAME, LOCATOR_TRAINER, SEGMENTER_TRAINER


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser(
        "export",
        help="pack both phases' model folders (checkpoints, plans, dataset.json) into one zip",
        description="Write the locator's and the segmenter's model folders of a dataset, as samflare predict finds "
        "them under $nnUNet_results, into one zip for samflare install on another machine. The zip keeps nnU-Net's "
        "layout, so nnUNetv2_install_pretrained_model_from_zip can install it as well.",
    )
    e.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    e.add_argument("-o", dest="output", required=True, metavar="ZIP", help="the zip file to write")
    e.add_argument("-p", dest="plans", default=DEFAULT_PLANS_NAME, help="plans identifier (default: %(default)s)")
    e.add_argument("--locator_trainer", default=LOCATOR_TRAINER, help="default: %(default)s")
    e.add_argument("--segmenter_trainer", default=SEGMENTER_TRAINER, help="default: %(default)s")
    e.add_argument(
        "-f",
        dest="folds",
        nargs="+",
        help="folds to pack, e.g. 0 1 2 3 4 or all (default: every fold that holds the checkpoint, per phase)",
    )
    e.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth", help="default: %(default)s")
    e.set_defaults(func=_export)

    i = subparsers.add_parser(
        "install",
        help="install a cascade zip written by samflare export under $nnUNet_results",
        description="Check the zip (CRC, manifest, checksums), extract it into a temporary folder and move both model "
        "folders into $nnUNet_results. A corrupt or foreign zip installs nothing.",
    )
    i.add_argument("zip", metavar="ZIP", help="a zip written by samflare export")
    i.add_argument("--results", metavar="DIR", help="where to install (default: $nnUNet_results)")
    i.add_argument("--overwrite", action="store_true", help="replace model folders that exist with other files")
    i.set_defaults(func=_install)


def _export(args: argparse.Namespace) -> int:
    from nnunet_samflare.workflows.sharing import export_cascade

    folds = None if not args.folds else [f if f == "all" else int(f) for f in args.folds]
    path = export_cascade(
        args.dataset,
        args.output,
        plans=args.plans,
        locator_trainer=args.locator_trainer,
        segmenter_trainer=args.segmenter_trainer,
        folds=folds,
        checkpoint_name=args.checkpoint,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); install it with: samflare install {path.name}")
    return 0


def _install(args: argparse.Namespace) -> int:
    from nnunet_samflare.workflows.sharing import PHASES, install_cascade, predict_command

    manifest = install_cascade(args.zip, results=args.results, overwrite=args.overwrite)
    for phase in PHASES:
        state = "already installed" if phase in manifest["already_installed"] else "installed"
        print(f"{phase}: {state} at {manifest['installed'][phase]} (folds {manifest[phase]['folds']})")
    print(f"predict with: {predict_command(manifest)}")
    return 0
