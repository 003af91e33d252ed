"""Do the labels change? The current tree's ``samflare predict`` (default and ``--fast``) against a baseline
source tree's, same models, same case, per-label Dice; and against the case's ground truth for scale.

The case and models are ``bench_cascade.py``'s (prepared in ``--workdir``, or here). A segmenter with untrained
weights gives noise whose argmax flips at the smallest change, so the segmenter is first fitted to the case's
own labels (``--fit-steps`` AdamW steps on crops, ``_cascade_models.fit_segmenter_worker``): a quickly fitted
stand-in until a trained model is at hand (``--segmenter DIR`` uses that instead). Both trees then predict the
case in their own process with their own default settings (``--baseline-src``: a checkout of the reference
state, e.g. ``git archive <commit> | tar -x -C DIR``, first on ``PYTHONPATH`` for this tree's measuring worker).

The current tree runs twice, with its defaults and with ``--fast`` (``api.FAST_OPTIONS``: the segmenter in
channels-last memory format, under bfloat16 autocast on a CPU with native bfloat16). The table gives, per label,
the Dice of each against the baseline and of the baseline and the default against the ground truth; the tolerance
of the speed work is Dice ≥ 0.99 per label against the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import _benchlib as lib
from _cascade_case import CASE_ID, add_case_arguments, add_run_arguments, case_workdir, prepare, run_threads
from _cascade_runs import run_worker
from _cascade_workers import worker_command


def segmenter_voxel_volume(segmenter: Path, scan_spacing) -> float:
    """How many voxels of the scan one voxel of the segmenter's grid covers: a label flip on that grid shows up
    as about this many differing voxels in the full-resolution map."""
    import math

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration = segmenter.name.split("__")[-1]  # Trainer__Plans__configuration
    spacing = PlansManager(load_json(str(segmenter / "plans.json"))).get_configuration(configuration).spacing
    return math.prod(spacing) / math.prod(scan_spacing)


def per_label_dice(maps: dict[str, Path], truth: Path, segmenter: Path) -> list[dict]:
    """Per label present in any map: voxels of the baseline, Dice of every other map against the baseline, the
    voxels where ``--fast`` differs from it (also in segmenter-grid voxels), and the Dice of the baseline and the
    default against the ground truth."""
    import numpy as np

    from nnunet_samflare.evaluation.metrics import dice, read_label_array

    arrays = {name: read_label_array(path)[0] for name, path in maps.items()}
    reference, spacing = read_label_array(truth)
    coarse = segmenter_voxel_volume(segmenter, spacing)

    def both(x, y):  # Dice is undefined for two empty masks
        return dice(x, y) if x.any() or y.any() else None

    labels = sorted(set().union(*(np.unique(a).tolist() for a in arrays.values())) - {0})
    rows = []
    for label in labels:
        masks = {name: array == label for name, array in arrays.items()}
        row = {"label": int(label), "voxels_baseline": int(masks["baseline"].sum())}
        for name, mask in masks.items():
            if name != "baseline":
                row[f"dice_{name}_vs_baseline"] = both(mask, masks["baseline"])
        flipped = int((masks["fast"] != masks["baseline"]).sum())
        row["fast_differs_voxels"] = flipped
        row["fast_differs_segmenter_voxels"] = round(flipped / coarse, 1)
        row["dice_baseline_vs_truth"] = both(reference == label, masks["baseline"])
        row["dice_default_vs_truth"] = both(reference == label, masks["default"])
        rows.append(row)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_case_arguments(p)
    p.add_argument("--baseline-src", type=Path, required=True, help="source tree of the reference state")
    p.add_argument("--segmenter", type=Path, help="a trained segmenter model folder (default: fit one here)")
    p.add_argument("--fit-steps", type=int, default=150, help="segmenter fit steps (default: %(default)s)")
    p.add_argument("--fit-patch", type=int, nargs=3, default=[64, 64, 64], metavar=("Z", "Y", "X"))
    p.add_argument(
        "--no-postprocessing",
        action="store_true",
        help="compare the raw label maps (the post-processing can turn a one-voxel change of a noisy "
        "map into a different largest component)",
    )
    p.add_argument("--tolerance", type=float, default=0.99, help="Dice per label vs the baseline (default: 0.99)")
    add_run_arguments(p, timeout=3600)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from nnunet_samflare.inference.api import FAST_OPTIONS

    args = parse_args(argv)
    start = time.perf_counter()
    busy = lib.announce_busy()
    load_before = list(os.getloadavg())
    with case_workdir(args) as workdir:
        prepared = prepare(args, workdir)
        models = prepared["models"]
        threads = run_threads(args)
        env = lib.nnunet_env(workdir, n_proc=threads)
        fit = None
        segmenter = args.segmenter
        if segmenter is None:
            source = Path(models["segmenter"]["folder"])
            target = workdir / "fitted" / source.name
            spec = {
                "source": str(source),
                "target": str(target),
                "steps": args.fit_steps,
                "patch": args.fit_patch,
                "device": args.device,
                "output": str(workdir / "fitted" / "log"),
            }
            fit = run_worker("fit-segmenter", "fit-segmenter", spec, env, workdir, args.timeout)
            if fit.get("exit_code") != 0:
                raise SystemExit(f"fitting the segmenter failed: see {fit['log']}")
            segmenter = target
            print(
                f"segmenter: {fit['result']['segmenter_weights']} ({fit['result']['fit_s']} s, loss "
                f"{fit['result']['loss_first_last']})",
                flush=True,
            )
        outputs = {}
        runs = (
            ("default", lib.REPO, {}),
            ("fast", lib.REPO, FAST_OPTIONS),
            ("baseline", args.baseline_src.resolve(), {}),
        )
        for name, source, options in runs:
            out = workdir / "outputs" / f"accuracy-{name}"
            shutil.rmtree(out, ignore_errors=True)
            spec = {
                "device": args.device,
                "locator": models["locator"]["folder"],
                "segmenter": str(segmenter),
                "input": prepared["input"],
                "output": str(out),
                "warmup": 0,
                "repeats": 1,
                "predictor_options": {**options, "postprocess": not args.no_postprocessing},
            }
            # Each tree with its own package and trainer shim first; the editable install's start-up hook would
            # otherwise add this tree's shim to the baseline's processes.
            paths = [str(source), env.get("PYTHONPATH", "")]
            run_env = dict(
                env,
                PYTHONPATH=os.pathsep.join(paths),
                nnUNet_extTrainer=str(source / "trainers"),
                SAMFLARE_NO_AUTOREGISTER="1",
            )
            result_file = workdir / "logs" / f"accuracy-{name}.result.json"
            log = workdir / "logs" / f"accuracy-{name}.log"
            lib.run_checked(worker_command("samflare", spec, result_file), run_env, log=log, timeout=args.timeout)
            outputs[name] = {
                "file": out / "run0" / f"{CASE_ID}.nii.gz",
                "result": json.loads(result_file.read_text(encoding="utf-8")),
            }
        rows = per_label_dice({k: v["file"] for k, v in outputs.items()}, Path(prepared["label"]), Path(segmenter))
        columns = [
            ("label", "label"),
            ("voxels_baseline", "voxels, baseline"),
            ("dice_default_vs_baseline", "Dice default vs baseline"),
            ("dice_fast_vs_baseline", "Dice --fast vs baseline"),
            ("fast_differs_voxels", "--fast differs, voxels"),
            ("fast_differs_segmenter_voxels", "the same in segmenter-grid voxels"),
            ("dice_baseline_vs_truth", "Dice baseline vs truth"),
            ("dice_default_vs_truth", "Dice default vs truth"),
        ]
        table = lib.markdown_table([c[1] for c in columns], [[r[c[0]] for c in columns] for r in rows])
        worst = {
            v: min((r[f"dice_{v}_vs_baseline"] for r in rows if r[f"dice_{v}_vs_baseline"] is not None), default=None)
            for v in ("default", "fast")
        }
        boxes = {k: v["result"].get("box_zyx") for k, v in outputs.items()}
        table += (
            f"\n\nLowest Dice vs baseline: default {lib.fmt(worst['default'], 4)}, --fast {lib.fmt(worst['fast'], 4)} "
            f"(tolerance {args.tolerance}). ROI boxes: {boxes}. Segmenter: "
            + (fit["result"]["segmenter_weights"] if fit else f"{segmenter}")
            + (". Raw label maps (no post-processing)." if args.no_postprocessing else ".")
        ) + (f"\n{busy}" if busy else "")
        info = lib.environment_info(args.device)
        print()
        print(lib.describe_environment(info))
        print(table)
        if args.json:
            lib.write_json(
                args.json,
                {
                    "benchmark": "bench_cascade_accuracy",
                    "environment": info,
                    "settings": vars(args),
                    "load_average_before": load_before,
                    "fit": fit,
                    "outputs": outputs,
                    "labels": rows,
                    "table": table,
                    "wall_s": time.perf_counter() - start,
                },
            )
            print(f"\nwritten: {args.json}")
    return 0 if all(w is None or w >= args.tolerance for w in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
