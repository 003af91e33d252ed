"""Does the cascade learn, how fast, and how does it compare with plain nnU-Net at equal wall-clock time?

One run, everything under ``--workdir`` (a temporary folder by default; nothing is written into the repository
except the results folder):

1. **Data.** ``--split example`` (default): the package's example dataset (TSEX_0001, whole abdomen at 3 mm, and
   TSEX_0002, slices 82–111 of the same scan), trained and evaluated on the same two scans. That measures whether,
   and how fast, the pipeline *learns*; it is not generalisation. ``--split holdout``: TSEX_0001 alone, cut along
   z into two training cases (slices below ``--holdout-slab`` and above it); the slab itself is never trained
   on. The models then predict the whole of TSEX_0001 and are scored on the slab (unseen slices, in their real
   context) and, separately, on the training slices. One patient either way: unseen slices of a seen patient,
   not unseen patients.
2. **Plans.** Stock ``nnUNetv2_plan_and_preprocess -c 3d_fullres``, ``samflare plan`` with the preset's segmenter
   spacing/patch (``--preset cpu``: 6 mm and 32³, the demo's plan, whose step costs ~1.1 s against ~2.7 s at 3 mm /
   48³ on 2 cores, so that 2.5× more iterations fit in the budget, while a 192 mm patch still holds most of the
   abdomen; BENCHMARKS.md "Learning" has runs of both plans; ``--preset gpu``: the paper's 2.0/1.5/1.5 mm and 96³),
   ``nnUNetv2_preprocess`` of both plug-in configurations. Not counted in the training budget; timed and reported.
3. **Training at equal wall-clock.** ``--minutes`` is the budget of the whole run. After preparation, what is
   left minus ``--reserve-minutes`` (prediction and evaluation) is split equally: the cascade (locator
   ``--locator-share`` of its half but at least ``--locator-min-minutes``, then the segmenter) and plain nnU-Net
   ``3d_fullres`` with its own plans.
   All three train through stock ``nnUNetv2_train`` with the benchmark-only time-budget trainers of
   ``benchmarks/time_budget/`` (found through ``nnUNet_extTrainer``): the real trainers, stopped at a deadline,
   with their learning-rate schedule laid over the epochs that fit. Epochs are ``--iterations`` training
   iterations (+ ``--val-iterations``; ``--nnunet-iterations`` for nnU-Net, whose iterations cost ~10x more on
   a CPU): the resolution of the learning curves and of the schedule.
4. **Prediction and evaluation, the same for both.** ``samflare predict --stats`` (the cascade, default settings)
   and ``nnUNetv2_predict --disable_tta`` (nnU-Net's default post-processing-free output), both scored by
   ``samflare evaluate`` (FLARE DSC/NSD). The locator's ROI recall (fraction of the reference foreground inside
   the ROI box that ``--stats`` records) is computed per case.
5. **Report.** Per-organ DSC/NSD side by side, ROI recall, iterations/s and iterations done by each trainer, the
   per-organ learning curves (nnU-Net's per-epoch pseudo Dice of every class, logged by the trainers themselves,
   against minutes since the start of training; the segmenter's is measured in the cascade's region) as a table
   and ``learning_curves.png``, and the targets of issue 12 with the shortfall where one is missed. Everything
   goes to ``--results`` (default ``benchmarks/results/learning-<device>-<date>/``): ``learning.json``,
   ``learning.md``, the PNG.

GPU (``--device cuda``, ``--preset gpu`` by default): the same, with the paper's segmenter configuration, for a
few minutes; see ``benchmarks/README.md``. Exercised on CPU with tiny settings, e.g.
``--device cpu --preset gpu --minutes 6 --segmenter-patch 32 32 32 --iterations 2 --val-iterations 1``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _benchlib as lib

DATASET_NAME = "FlareLearn"
PLANS = "samflarePlans"
TIME_BUDGET_FOLDER = Path(__file__).resolve().parent / "time_budget"
TRAINERS = {
    "locator": ("3d_locator", "nnUNetTrainer_SAMFlareLocatorTimeBudget", PLANS),
    "segmenter": ("3d_segmenter", "nnUNetTrainer_SAMFlareSegmenterTimeBudget", PLANS),
    "nnunet": ("3d_fullres", "nnUNetTrainerTimeBudget", "nnUNetPlans"),
}
# Settings per preset: segmenter spacing/patch (z, y, x), batch size, minutes, iterations and validation
# iterations per epoch, reserve for prediction + evaluation, the locator's minimum training time. CPU: the
# smaller organs appear only after a few hundred segmenter iterations, so the plan that fits the most iterations
# into the budget wins: at 3 mm / 48³ (the scans' own spacing) a 30-minute run made 225 iterations and learned
# the liver only; at 6 mm / 32³ it made 550 and learned most organs (BENCHMARKS.md, "Learning"). The locator's
# minimum: on the CPU, 25 locator iterations (49 s) found no abdomen at inference (the cascade then predicts
# nothing) where 50 (1.7 min) gave ROI recall 0.99.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        segmenter_spacing=[6.0, 6.0, 6.0],
        segmenter_patch=[32, 32, 32],
        batch_size=2,
        minutes=30.0,
        iterations=25,
        val_iterations=4,
        nnunet_iterations=5,
        nnunet_val_iterations=2,
        reserve_minutes=4.0,
        locator_min_minutes=2.0,
    ),
    "gpu": dict(
        segmenter_spacing=[2.0, 1.5, 1.5],
        segmenter_patch=[96, 96, 96],
        batch_size=2,
        minutes=8.0,
        iterations=50,
        val_iterations=10,
        nnunet_iterations=50,
        nnunet_val_iterations=10,
        reserve_minutes=1.5,
        locator_min_minutes=0.5,
    ),
}
ORGANS = {
    1: "liver",
    2: "right kidney",
    3: "spleen",
    4: "pancreas",
    5: "aorta",
    6: "IVC",
    7: "right adrenal",
    8: "left adrenal",
    9: "gallbladder",
    10: "esophagus",
    11: "stomach",
    12: "duodenum",
    13: "left kidney",
    14: "tumor",
}
#: Issue 12's targets on the training scans.
TARGET_DSC = 0.8
TARGET_DSC_LARGE = 0.9
LARGE_ORGANS = (1, 2, 3, 13)
TARGET_ROI_RECALL = 0.99


# ================================================================================================================
# data
# ================================================================================================================


def _crop_z(image, z0: int, z1: int):
    """``image`` restricted to slices [z0, z1) (SimpleITK keeps the geometry: the origin moves)."""
    return image[:, :, z0:z1]


def make_raw_dataset(args, raw: Path, dataset: str) -> dict[str, Any]:
    """Write the raw nnU-Net dataset; return what evaluation needs (reference folder, cases, score regions)."""
    import SimpleITK as sitk

    source = Path(args.data)
    folder = raw / dataset
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    dataset_json = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    if args.split == "example":
        cases = sorted(p.name[: -len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
        for case in cases:
            shutil.copy(source / "imagesTr" / f"{case}_0000.nii.gz", folder / "imagesTr")
            shutil.copy(source / "labelsTr" / f"{case}.nii.gz", folder / "labelsTr")
        evaluation = {
            "inputs": {c: folder / "imagesTr" / f"{c}_0000.nii.gz" for c in cases},
            "references": folder / "labelsTr",
            "regions": ["training scans"],
        }
    else:
        z0, z1 = args.holdout_slab
        image = sitk.ReadImage(str(source / "imagesTr" / "TSEX_0001_0000.nii.gz"))
        label = sitk.ReadImage(str(source / "labelsTr" / "TSEX_0001.nii.gz"))
        depth = image.GetSize()[2]
        if not 0 < z0 < z1 < depth:
            raise SystemExit(f"--holdout-slab {z0} {z1} must lie strictly inside the scan's 0..{depth} slices")
        cases = ["HOLD_0001", "HOLD_0002"]
        for case, (a, b) in zip(cases, ((0, z0), (z1, depth))):
            sitk.WriteImage(_crop_z(image, a, b), str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
            sitk.WriteImage(_crop_z(label, a, b), str(folder / "labelsTr" / f"{case}.nii.gz"))
        whole = raw.parent / "holdout_input"
        whole.mkdir(exist_ok=True)
        shutil.copy(source / "imagesTr" / "TSEX_0001_0000.nii.gz", whole / "TSEX_0001_0000.nii.gz")
        shutil.copy(source / "labelsTr" / "TSEX_0001.nii.gz", raw.parent / "TSEX_0001_reference.nii.gz")
        # Scored regions of the whole-scan prediction: the held-out slab, and the training slices.
        evaluation = {
            "inputs": {"TSEX_0001": whole / "TSEX_0001_0000.nii.gz"},
            "references": raw.parent / "TSEX_0001_reference.nii.gz",
            "regions": ["held-out slab", "training slices"],
            "slab": (z0, z1),
        }
    dataset_json["numTraining"] = len(cases)
    dataset_json.pop("partial_labels", None)
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    evaluation["cases"] = cases
    return evaluation


def prepare(args, workdir: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    dataset = f"Dataset{args.dataset_id:03d}_{DATASET_NAME}"
    raw = workdir / "nnUNet_raw"
    evaluation = make_raw_dataset(args, raw, dataset)
    prep_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # it crashes planning (docs/nnunet.md)
    i = str(args.dataset_id)
    lib.run_checked(
        lib.nnunet_command(
            "nnUNetv2_plan_and_preprocess", "-d", i, "-c", "3d_fullres", "-npfp", "1", "-np", "1", "--no_pbar"
        ),
        prep_env,
        log=log,
    )
    plan_args = [
        "plan",
        "-d",
        i,
        "--segmenter_spacing",
        *map(str, args.segmenter_spacing),
        "--segmenter_patch",
        *map(str, args.segmenter_patch),
        "--batch_size",
        str(args.batch_size),
    ]
    lib.run_checked(lib.samflare_command(*plan_args), prep_env, log=log)
    lib.run_checked(
        lib.nnunet_command(
            "nnUNetv2_preprocess", "-d", i, "-plans_name", PLANS, "-c", "3d_locator", "3d_segmenter", "-np", "1", "1"
        ),
        prep_env,
        log=log,
    )
    evaluation["dataset"] = dataset
    return evaluation


# ================================================================================================================
# training
# ================================================================================================================


def train(args, role: str, seconds: float, env: dict[str, str], log: Path) -> dict[str, Any]:
    """``nnUNetv2_train`` of one time-budget trainer with its training loop ending ``seconds`` after the start."""
    configuration, trainer, plans = TRAINERS[role]
    iterations, val_iterations = (
        (args.nnunet_iterations, args.nnunet_val_iterations)
        if role == "nnunet"
        else (args.iterations, args.val_iterations)
    )
    start = time.time()
    run_env = dict(
        env,
        SAMFLARE_BENCH_DEADLINE=str(start + seconds),
        SAMFLARE_BENCH_ITERATIONS=str(iterations),
        SAMFLARE_BENCH_VAL_ITERATIONS=str(val_iterations),
    )
    command = lib.nnunet_command(
        "nnUNetv2_train",
        str(args.dataset_id),
        configuration,
        "all",
        "-tr",
        trainer,
        "-p",
        plans,
        "-device",
        args.device,
    )
    lib.run_checked(command, run_env, log=log)
    wall = time.time() - start
    folder = Path(env["nnUNet_results"]) / f"Dataset{args.dataset_id:03d}_{DATASET_NAME}"
    fold = folder / f"{trainer}__{plans}__{configuration}" / "fold_all"
    stats = json.loads((fold / "time_budget.json").read_text(encoding="utf-8"))
    return {
        "role": role,
        "trainer": trainer,
        "configuration": configuration,
        "budget_s": round(seconds, 1),
        "wall_s": round(wall, 1),
        "started": start,
        **stats,
        "curve": learning_curve(fold, start),
    }


def learning_curve(fold: Path, start: float) -> list[dict[str, Any]]:
    """Per epoch: minutes since the process started, train loss, and the pseudo Dice of every class or region
    that the trainer logged (nnU-Net's ``dice_per_class_or_region``)."""
    import torch

    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logged = checkpoint["logging"]
    ends = logged["epoch_end_timestamps"]
    curve = []
    for epoch, end in enumerate(ends):
        dice = logged["dice_per_class_or_region"][epoch]
        curve.append(
            {
                "epoch": epoch,
                "minutes": round((end - start) / 60, 2),
                "train_loss": round(float(logged["train_losses"][epoch]), 4),
                "lr": float(logged["lrs"][epoch]),
                "pseudo_dice": [None if math.isnan(float(d)) else round(float(d), 4) for d in dice],
            }
        )
    return curve


# ================================================================================================================
# prediction and evaluation
# ================================================================================================================


def predict(args, role: str, inputs: Path, output: Path, env: dict[str, str], log: Path) -> float:
    start = time.time()
    if role == "cascade":
        command = lib.samflare_command(
            "predict",
            "-i",
            inputs,
            "-o",
            output,
            "-d",
            str(args.dataset_id),
            "-p",
            PLANS,
            "--locator_trainer",
            TRAINERS["locator"][1],
            "--segmenter_trainer",
            TRAINERS["segmenter"][1],
            "-f",
            "all",
            "-device",
            args.device,
            "--stats",
        )
    else:
        configuration, trainer, plans = TRAINERS["nnunet"]
        command = lib.nnunet_command(
            "nnUNetv2_predict",
            "-i",
            inputs,
            "-o",
            output,
            "-d",
            str(args.dataset_id),
            "-c",
            configuration,
            "-tr",
            trainer,
            "-p",
            plans,
            "-f",
            "all",
            "-device",
            args.device,
            "--disable_tta",
        )
        if args.device == "cpu":
            command += ["-npp", "0", "-nps", "0"]  # sequential: the fastest setting on 2 cores
    lib.run_checked(command, env, log=log)
    return round(time.time() - start, 1)


def _write_region(evaluation: dict, region: str, prediction_dir: Path, target: Path) -> tuple[Path, Path]:
    """Holdout split: the whole-scan reference and prediction restricted to one scored region.

    The held-out slab is cut out (its own geometry); the training slices are the whole scan with the slab set to
    background in both, so the slab's voxels agree and add nothing to either score (DSC is then the DSC over the
    training slices; NSD sees the same cut faces in both)."""
    import SimpleITK as sitk

    z0, z1 = evaluation["slab"]
    refs, preds = target / "references", target / "predictions"
    refs.mkdir(parents=True, exist_ok=True)
    preds.mkdir(parents=True, exist_ok=True)
    sources = ((Path(evaluation["references"]), refs), (prediction_dir / "TSEX_0001.nii.gz", preds))
    for source, folder in sources:
        image = sitk.ReadImage(str(source))
        if region == "held-out slab":
            part = _crop_z(image, z0, z1)
        else:
            array = sitk.GetArrayFromImage(image)
            array[z0:z1] = 0
            part = sitk.GetImageFromArray(array)
            part.CopyInformation(image)
        sitk.WriteImage(part, str(folder / "TSEX_0001.nii.gz"))
    return refs, preds


def evaluate(evaluation: dict, prediction_dir: Path, target: Path, env: dict[str, str], log: Path) -> dict:
    """``samflare evaluate`` of every scored region: ``{region: metrics}`` (the first is the headline)."""
    results = {}
    for region in evaluation["regions"]:
        folder = target / region.replace(" ", "-")
        refs, preds = evaluation["references"], prediction_dir
        if "slab" in evaluation:
            refs, preds = _write_region(evaluation, region, prediction_dir, folder)
        folder.mkdir(parents=True, exist_ok=True)
        output = folder / "metrics.json"
        lib.run_checked(lib.samflare_command("evaluate", refs, preds, "-o", output), env, log=log)
        results[region] = json.loads(output.read_text(encoding="utf-8"))
    return results


def roi_recall(evaluation: dict, prediction_dir: Path) -> dict[str, Any]:
    """Per case: fraction of the reference foreground inside the ROI box of ``samflare predict --stats``."""
    import SimpleITK as sitk

    from nnunet_samflare.training.roi_validation import roi_recall as recall_of

    recall: dict[str, Any] = {}
    for case in evaluation["inputs"]:
        stats = json.loads((prediction_dir / f"{case}_stats.json").read_text(encoding="utf-8"))
        reference_path = Path(evaluation["references"])
        if reference_path.is_dir():
            reference_path = reference_path / f"{case}.nii.gz"
        value = recall_of(sitk.GetArrayFromImage(sitk.ReadImage(str(reference_path))), stats.get("roi_box_zyx"))
        recall[case] = None if value is None else round(value, 5)
        recall[f"{case} box"] = stats.get("roi_box_zyx")
    return recall


# ================================================================================================================
# report
# ================================================================================================================


def per_organ(metrics: dict) -> dict[int, dict[str, float | None]]:
    """Per label present in some reference: mean DSC/NSD over the cases whose reference has it."""
    out = {}
    for key, entry in metrics["summary"]["per_label"].items():
        if entry["n_present"]:
            out[int(key)] = {"DSC": entry["DSC_mean_present"], "NSD": entry["NSD_mean_present"]}
    return out


def check_targets(result: dict) -> list[dict[str, Any]]:
    """Issue 12's targets; each with the measured value and the shortfall where missed."""
    checks = []
    cascade, nnunet = result["cascade"]["per_organ"], result["nnunet"]["per_organ"]
    for label, values in sorted(cascade.items()):
        target = TARGET_DSC_LARGE if label in LARGE_ORGANS else TARGET_DSC
        checks.append(
            {
                "target": f"{ORGANS[label]} DSC >= {target}",
                "value": values["DSC"],
                "met": values["DSC"] >= target,
                "short_by": round(max(0.0, target - values["DSC"]), 4),
            }
        )
    recalls = [v for k, v in result["cascade"]["roi_recall"].items() if not k.endswith(" box") and v is not None]
    worst = min(recalls) if recalls else None
    checks.append(
        {
            "target": f"ROI recall >= {TARGET_ROI_RECALL} (worst case)",
            "value": worst,
            "met": worst is not None and worst >= TARGET_ROI_RECALL,
            "short_by": None if worst is None else round(max(0.0, TARGET_ROI_RECALL - worst), 5),
        }
    )
    mean_c = _mean([v["DSC"] for v in cascade.values()])
    mean_n = _mean([nnunet.get(k, {"DSC": 0.0})["DSC"] for k in cascade])
    checks.append(
        {
            "target": "cascade mean organ DSC >= plain nnU-Net's (equal wall-clock)",
            "value": mean_c,
            "nnunet": mean_n,
            "met": mean_c >= mean_n,
            "short_by": round(max(0.0, mean_n - mean_c), 4),
        }
    )
    return checks


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def curve_table(run: dict, labels: list[int], every: int = 1) -> str:
    rows = []
    for point in run["curve"][::every]:
        dice = point["pseudo_dice"]
        cells = [dice[i] if i < len(dice) else None for i in range(len(labels))]
        rows.append(
            [
                point["epoch"],
                point["minutes"],
                (point["epoch"] + 1) * run["iterations_per_epoch"],
                point["train_loss"],
                *cells,
            ]
        )
    names = [ORGANS.get(label, str(label)) for label in labels]
    return lib.markdown_table(["epoch", "min", "iterations", "train loss", *names], rows)


def plot_curves(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = sorted(result["cascade"]["per_organ"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, role, offset in (
        (axes[0], "segmenter", result["training"]["locator"]["wall_s"] / 60),
        (axes[1], "nnunet", 0.0),
    ):
        run = result["training"][role]
        minutes = [p["minutes"] + offset for p in run["curve"]]
        colours = plt.get_cmap("tab20").colors  # 14 labels: the default cycle of 10 would repeat colours
        for label in present:
            values = [p["pseudo_dice"][label - 1] if label - 1 < len(p["pseudo_dice"]) else None for p in run["curve"]]
            ax.plot(
                minutes,
                [float("nan") if v is None else v for v in values],
                label=ORGANS[label],
                color=colours[(label - 1) % len(colours)],
                marker="o",
                markersize=3,
            )
        title = (
            "cascade segmenter (pseudo Dice in the cascade's region)"
            if role == "segmenter"
            else "plain nnU-Net 3d_fullres (pseudo Dice, whole-scan patches)"
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("minutes since the start of training")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation pseudo Dice per epoch")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_report(result: dict) -> str:
    lines = [
        f"## Learning benchmark — {result['settings']['split']} split, {result['environment']['device']}",
        "",
        lib.describe_environment(result["environment"]),
        "",
        "Command: `" + result["environment"]["command"] + "`",
        "",
    ]
    s = result["settings"]
    lines.append(
        f"Segmenter plan: spacing {s['segmenter_spacing']} mm, patch {s['segmenter_patch']}, batch "
        f"{s['batch_size']}; epochs of {s['iterations']} + {s['val_iterations']} validation iterations. "
        f"Run budget {s['minutes']} min; preparation took {result['preparation_s'] / 60:.1f} min."
    )
    lines.append("")
    t = result["training"]
    rows = []
    for role in ("locator", "segmenter", "nnunet"):
        r = t[role]
        patch = "×".join(map(str, r["patch_size"]))
        rows.append(
            [
                role,
                r["trainer"],
                patch,
                r["batch_size"],
                r["budget_s"] / 60,
                r["wall_s"] / 60,
                r["epochs"],
                r["iterations"],
                r["iterations_per_second"],
            ]
        )
    lines.append(
        lib.markdown_table(
            ["model", "trainer", "patch", "batch", "budget min", "wall min", "epochs", "iterations", "train it/s"], rows
        )
    )
    cascade_wall = t["locator"]["wall_s"] + t["segmenter"]["wall_s"]
    lines.append("")
    lines.append(
        f"Training wall-clock: cascade {cascade_wall / 60:.1f} min (locator + segmenter), plain nnU-Net "
        f"{t['nnunet']['wall_s'] / 60:.1f} min (ratio {t['nnunet']['wall_s'] / cascade_wall:.2f}). "
        f"Prediction: cascade {result['cascade']['predict_s']} s, nnU-Net {result['nnunet']['predict_s']} s."
    )
    lines.append("")
    where = (
        "on the training scans (fitting, not generalisation)"
        if s["split"] == "example"
        else f"on TSEX_0001's held-out slab, slices {s['holdout_slab']} never trained on "
        "(unseen slices of a seen patient)"
    )
    lines.append(f"Per-organ DSC / NSD {where}:")
    lines.append("")
    rows = []
    labels = sorted(set(result["cascade"]["per_organ"]) | set(result["nnunet"]["per_organ"]))
    for label in labels:
        c = result["cascade"]["per_organ"].get(label, {})
        n = result["nnunet"]["per_organ"].get(label, {})
        rows.append([ORGANS[label], c.get("DSC"), c.get("NSD"), n.get("DSC"), n.get("NSD")])
    rows.append(
        [
            "mean",
            _mean([r[1] for r in rows]),
            _mean([r[2] for r in rows]),
            _mean([r[3] or 0 for r in rows]),
            _mean([r[4] or 0 for r in rows]),
        ]
    )
    lines.append(lib.markdown_table(["organ", "cascade DSC", "cascade NSD", "nnU-Net DSC", "nnU-Net NSD"], rows))
    if result.get("by_region"):
        lines.append("")
        for region, values in list(result["by_region"].items())[1:]:  # the first is the table above
            rows = [
                [
                    ORGANS[label],
                    *(values[role].get(label, {}).get(m) for role in ("cascade", "nnunet") for m in ("DSC", "NSD")),
                ]
                for label in sorted(values["cascade"])
            ]
            lines.append(f"{region}:")
            lines.append("")
            lines.append(
                lib.markdown_table(["organ", "cascade DSC", "cascade NSD", "nnU-Net DSC", "nnU-Net NSD"], rows)
            )
            lines.append("")
    lines.append("")
    recall = {k: v for k, v in result["cascade"]["roi_recall"].items() if not k.endswith(" box")}
    lines.append(f"Locator ROI recall (fraction of reference foreground inside the ROI): {recall}")
    lines.append("")
    lines.append("Targets:")
    lines.append("")
    rows = [
        [c["target"], c["value"], "yes" if c["met"] else "NO", c["short_by"] if not c["met"] else ""]
        for c in result["targets"]
    ]
    lines.append(lib.markdown_table(["target", "measured", "met", "short by"], rows))
    lines.append("")
    present = sorted(result["cascade"]["per_organ"])
    every = max(1, len(t["segmenter"]["curve"]) // 12)
    lines.append(
        "Segmenter learning curve (pseudo Dice per class in the cascade's region, nnU-Net's online "
        "validation; minutes since the segmenter started):"
    )
    lines.append("")
    lines.append(curve_table(t["segmenter"], list(range(1, 15)), every))
    lines.append("")
    lines.append("Plain nnU-Net learning curve (pseudo Dice per class, whole-scan patches):")
    lines.append("")
    lines.append(curve_table(t["nnunet"], list(range(1, 15)), max(1, len(t["nnunet"]["curve"]) // 12)))
    lines.append("")
    lines.append(
        f"Organs present in the references: {[ORGANS[p] for p in present]}. Pseudo Dice is empty (—) "
        "for a class absent from an epoch's validation patches."
    )
    return "\n".join(lines) + "\n"


# ================================================================================================================
# main
# ================================================================================================================


def run(args) -> dict[str, Any]:
    run_start = time.time()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="samflare-learning-"))
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"{workdir}: not empty; give a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "logs" / "commands.log"
    # CPU: one worker process for planning and training (training sets torch's threads to all cores itself; no DA
    # workers), all cores for prediction (nnU-Net's sliding window and the cascade cap threads at nnUNet_def_n_proc).
    # CUDA: nnU-Net's defaults.
    cpu = args.device == "cpu"
    env = lib.nnunet_env(workdir, n_proc=1 if cpu else None, **({"nnUNet_n_proc_DA": "0"} if cpu else {}))
    env["nnUNet_extTrainer"] = os.pathsep.join([env["nnUNet_extTrainer"], str(TIME_BUDGET_FOLDER)])
    predict_env = dict(env)
    if cpu or args.threads:
        predict_env["nnUNet_def_n_proc"] = str(args.threads or os.cpu_count())
    print(f"workdir {workdir}", flush=True)
    if warning := lib.busy_warning():
        print(warning, flush=True)

    evaluation = prepare(args, workdir, env, log)
    preparation_s = time.time() - run_start
    left = args.minutes * 60 - preparation_s - args.reserve_minutes * 60
    if left < 60:
        raise SystemExit(
            f"--minutes {args.minutes} leaves {left:.0f} s for training after preparation "
            f"({preparation_s:.0f} s) and the reserve ({args.reserve_minutes} min)"
        )
    half = left / 2
    print(f"preparation {preparation_s:.0f} s; training {half / 60:.1f} min per pipeline", flush=True)

    training = {}
    locator_s = min(half / 2, max(half * args.locator_share, args.locator_min_minutes * 60))
    training["locator"] = train(args, "locator", locator_s, env, log)
    print(f"locator: {training['locator']['iterations']} iterations in {training['locator']['wall_s']} s", flush=True)
    training["segmenter"] = train(args, "segmenter", half - training["locator"]["wall_s"], env, log)
    print(
        f"segmenter: {training['segmenter']['iterations']} iterations in {training['segmenter']['wall_s']} s",
        flush=True,
    )
    cascade_wall = training["locator"]["wall_s"] + training["segmenter"]["wall_s"]
    # nnU-Net's deadline bounds its training loop; its start-up before and checkpointing after are of the same kind
    # as the segmenter's, so subtract the segmenter's overshoot beyond its own deadline to end at equal wall time.
    tail = max(0.0, training["segmenter"]["wall_s"] - training["segmenter"]["budget_s"])
    training["nnunet"] = train(args, "nnunet", cascade_wall - tail, env, log)
    print(f"nnU-Net: {training['nnunet']['iterations']} iterations in {training['nnunet']['wall_s']} s", flush=True)

    inputs = workdir / "predict_input"
    inputs.mkdir()
    for case, path in evaluation["inputs"].items():
        (inputs / f"{case}_0000.nii.gz").symlink_to(path)
    result: dict[str, Any] = {
        "environment": lib.environment_info(args.device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "preparation_s": round(preparation_s, 1),
        "training": training,
    }
    for role in ("cascade", "nnunet"):
        out = workdir / f"pred_{role}"
        seconds = predict(args, role, inputs, out, predict_env, log)
        metrics = evaluate(evaluation, out, workdir / f"eval_{role}", env, log)
        headline = metrics[evaluation["regions"][0]]
        result[role] = {
            "predict_s": seconds,
            "scored_on": evaluation["regions"][0],
            "per_organ": per_organ(headline),
            "metrics": headline["summary"],
        }
        if role == "cascade":
            result[role]["roi_recall"] = roi_recall(evaluation, out)
        if len(metrics) > 1:
            by_region = result.setdefault("by_region", {})
            for region, values in metrics.items():
                by_region.setdefault(region, {})[role] = per_organ(values)
    result["targets"] = check_targets(result)
    result["total_s"] = round(time.time() - run_start, 1)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: cpu on CPU, gpu on CUDA")
    p.add_argument("--minutes", type=float, help="wall-clock budget of the whole run (cpu 30, gpu 8)")
    p.add_argument("--reserve-minutes", type=float, help="kept for prediction and evaluation (cpu 4, gpu 1.5)")
    p.add_argument("--locator-share", type=float, default=0.15, help="locator's share of the cascade's time")
    p.add_argument(
        "--locator-min-minutes",
        type=float,
        help="the locator trains at least this long, up to half the cascade's time (cpu 2, gpu 0.5)",
    )
    p.add_argument("--segmenter-spacing", type=float, nargs=3, metavar=("Z", "Y", "X"))
    p.add_argument("--segmenter-patch", type=int, nargs=3, metavar=("Z", "Y", "X"))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--iterations", type=int, help="training iterations per epoch (cpu 25, gpu 50)")
    p.add_argument("--val-iterations", type=int, help="validation iterations per epoch (cpu 4, gpu 10)")
    p.add_argument(
        "--nnunet-iterations",
        type=int,
        help="the same for plain nnU-Net, whose iterations cost ~10x more on a CPU (cpu 5, gpu 50)",
    )
    p.add_argument("--nnunet-val-iterations", type=int, help="(cpu 2, gpu 10)")
    p.add_argument("--split", choices=("example", "holdout"), default="example")
    p.add_argument(
        "--holdout-slab",
        type=int,
        nargs=2,
        default=[86, 94],
        metavar=("Z0", "Z1"),
        help="TSEX_0001 slices [Z0, Z1) never trained on (default: %(default)s, 24 mm through liver, "
        "kidneys, spleen, pancreas, gallbladder, stomach, duodenum, aorta, IVC)",
    )
    p.add_argument("--data", type=Path, default=lib.DEFAULT_DATASET)
    p.add_argument("--dataset-id", type=int, default=991)
    p.add_argument("--threads", type=int, help="nnUNet_def_n_proc for prediction (default: all cores on CPU)")
    p.add_argument("--workdir", type=Path, help="working folder (must be new or empty; kept)")
    p.add_argument("--results", type=Path, help="default: benchmarks/results/learning-<device>-<date>-<split>")
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="re-write learning.md and the PNG from a learning.json of an earlier run (nothing is run)",
    )
    args = p.parse_args(argv)
    preset = PRESETS[args.preset or ("gpu" if args.device == "cuda" else "cpu")]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        result = json.loads(args.report_only.read_text(encoding="utf-8"))
        for role in ("cascade", "nnunet"):
            result[role]["per_organ"] = {int(k): v for k, v in result[role]["per_organ"].items()}
        for values in result.get("by_region", {}).values():
            for role in values:
                values[role] = {int(k): v for k, v in values[role].items()}
        results = args.report_only.parent
    else:
        result = run(args)
        date = dt.date.today().isoformat()
        results = args.results or lib.REPO / "benchmarks" / "results" / f"learning-{args.device}-{date}-{args.split}"
        results.mkdir(parents=True, exist_ok=True)
        lib.write_json(results / "learning.json", result)
    report = markdown_report(result)
    (results / "learning.md").write_text(report, encoding="utf-8")
    plot_curves(result, results / "learning_curves.png")
    print(report)
    print(f"results in {results}; total {result['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
