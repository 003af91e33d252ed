"""``samflare pseudolabel run`` end to end on real CT, killed and re-run; ``--num_parts``; partial-label training
through nnU-Net's data loading.

The source dataset is flare_like (fully labelled) + partial (liver only, aorta only) + two tumor_pseudohu cases
(tumor only), plus two unlabelled copies of images: the fewest cases that give every provenance and a merge long
enough to be killed in the middle. Settings are CI-sized: the 1-epoch debug trainers, a 3 mm segmenter with 32³
patches and a narrow SAMHybridUNet (the same class, fewer channels and blocks), the session's debug locator for
the rounds' predictions. The run is SIGKILLed during a training and during the merge, and once stops to wait for
its ``--num_parts`` prediction jobs; every re-run must continue, redo nothing finished, and leave exactly the
files an uninterrupted computation from the same predictions gives. The rounds' trainings skip nnU-Net's final
validation, as the run always has them do. The run's refusals of bad input need no training: test_pseudolabel.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_samflare.cli import main as samflare_main
from nnunet_samflare.pseudolabel.filtering import filter_case
from nnunet_samflare.pseudolabel.merge import merge_case
from nnunet_samflare.pseudolabel.run import EXIT_WAITING_FOR_PARTS, KILL_HOOK_ENV
from nnunet_samflare.pseudolabel.vote import vote_case

from conftest import (
    LOCATOR_TRAINER,
    SEGMENTER_TRAINER,
    NnUNetFolders,
    command,
    data_file,
    dataset,
    read_json,
)

SOURCE_ID = 530
SOURCE = "Dataset530_PLSource"
FIRST_ID = 630
NAMES = [f"Dataset{FIRST_ID + i}_PLSourcePL{i}" for i in range(3)]
PLANS = "samflarePlans"
ROUND_TRAINER = "nnUNetTrainer_SAMFlareSegmenterPartialDebug"
ROUND_LOCATOR_TRAINER = "nnUNetTrainer_SAMFlareLocatorDebug"
CONFIDENCE = 0.1
#: the paper's network, narrowed so that a CI training step takes about a second
TINY_SEGMENTER = {
    "embed_dims": [12, 24, 48, 96],
    "depths": [1, 1, 1, 1],
    "msa_heads": [0, 0, 4, 4],
    "decoder_feature_size": 12,
}
UNLABELLED = {"UNL_0001": ("flare_like", "TSEX_0002"), "UNL_0002": ("tumor_pseudohu", "DLPS_0002")}
#: the labelled cases of the source: all of flare_like and partial, two of tumor_pseudohu's six
TUMOR_CASES = ("DLPS_0001", "DLPS_0003")
LABELLED = 6


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> NnUNetFolders:
    """A planned (not preprocessed) source dataset and a folder of unlabelled scans."""
    root = tmp_path_factory.mktemp("pseudolabel")
    folders = NnUNetFolders(root / "raw", root / "preprocessed", root / "results")
    raw = folders.raw / SOURCE
    partial_labels = {}
    for name in ("flare_like", "partial", "tumor_pseudohu"):
        for kind in ("imagesTr", "labelsTr"):
            shutil.copytree(dataset(name) / kind, raw / kind, dirs_exist_ok=True)
        partial_labels.update(read_json(dataset(name) / "dataset.json").get("partial_labels", {}))
    for case in read_json(dataset("tumor_pseudohu") / "dataset.json")["partial_labels"]:
        if case not in TUMOR_CASES:
            (raw / "imagesTr" / f"{case}_0000.nii.gz").unlink()
            (raw / "labelsTr" / f"{case}.nii.gz").unlink()
            del partial_labels[case]
    data = read_json(dataset("partial") / "dataset.json")
    data.update(name="PLSource", numTraining=len(list((raw / "labelsTr").iterdir())), partial_labels=partial_labels)
    (raw / "dataset.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    folders.preprocessed.mkdir()
    folders.results.mkdir()
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    for case, (name, original) in UNLABELLED.items():
        shutil.copy(data_file(name, "image", original), unlabelled / f"{case}_0000.nii.gz")
    folders.run(
        [
            command("nnUNetv2_plan_and_preprocess"),
            "-d",
            str(SOURCE_ID),
            "-c",
            "3d_fullres",
            "-npfp",
            "1",
            "-np",
            "1",
            "--no_pp",
            "--no_pbar",
        ]
    )
    # DCMQI_0001 has 3 slices of 1 mm: the locator grid keeps 3 mm in z so that it stays one slice thick
    folders.run(
        [
            command("samflare"),
            "plan",
            "-d",
            str(SOURCE_ID),
            "--segmenter_spacing",
            "3",
            "3",
            "3",
            "--segmenter_patch",
            "32",
            "32",
            "32",
            "--locator_spacing",
            "3",
            "6",
            "6",
            "--locator_patch",
            "32",
            "64",
            "64",
        ]
    )
    plans_file = folders.preprocessed / SOURCE / f"{PLANS}.json"
    plans = read_json(plans_file)
    plans["configurations"]["3d_segmenter"]["architecture"]["arch_kwargs"].update(TINY_SEGMENTER)
    plans_file.write_text(json.dumps(plans, indent=1), encoding="utf-8")
    folders.unlabelled = unlabelled
    return folders


@pytest.fixture
def nnunet_paths(source, monkeypatch):
    """The source's nnU-Net folders for code running in this process (nnU-Net 2.8 reads its paths from the
    environment whenever it needs them)."""
    for key, value in source.env(training=True).items():
        monkeypatch.setenv(key, value)
    return source


def run_command(source: NnUNetFolders, locator: Path, work: Path, *extra: str) -> list[str]:
    return [
        command("samflare"),
        "pseudolabel",
        "run",
        "-d",
        str(SOURCE_ID),
        "--unlabeled",
        str(source.unlabelled),
        "--rounds",
        "2",
        "--folds",
        "2",
        "--confidence",
        str(CONFIDENCE),
        "--segmenter_trainer",
        ROUND_TRAINER,
        "--locator_trainer",
        ROUND_LOCATOR_TRAINER,
        "--locator",
        str(locator),
        "--first_id",
        str(FIRST_ID),
        "-device",
        "cpu",
        "--keep_probabilities",
        "-np",
        "1",
        "-o",
        str(work),
        *extra,
    ]


def segmenter_folder(source: NnUNetFolders, index: int, trainer: str = ROUND_TRAINER) -> Path:
    return source.results / NAMES[index] / f"{trainer}__{PLANS}__3d_segmenter"


def files_equal(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


@pytest.fixture(scope="module")
def interrupted_run(source, trained_models, tmp_path_factory):
    """The run, killed during round 1's second training, stopped for its prediction parts, killed in the middle of
    round 1's merge, then finished. Returns what the test needs to know about each stage."""
    locator = trained_models.model_folder(LOCATOR_TRAINER, "3d_locator")
    work = tmp_path_factory.mktemp("work")
    env = source.env(training=True)
    fold_1 = segmenter_folder(source, 0) / "fold_1"

    # 1: SIGKILL (the whole process group, as a batch system or Ctrl-\ would) while fold 1 trains
    process = subprocess.Popen(
        run_command(source, locator, work),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not list(fold_1.glob("training_log_*.txt")):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "fold 1 never started training"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()
    state_1 = read_json(work / "state.json")
    fold_0_checkpoint = segmenter_folder(source, 0) / "fold_0" / "checkpoint_final.pth"
    mtime_fold_0 = fold_0_checkpoint.stat().st_mtime_ns

    # 2: --num_parts 2 (a setting a re-run may change): trains fold 1, writes the part commands and waits
    second = subprocess.run(
        run_command(source, locator, work, "--num_parts", "2"), env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == EXIT_WAITING_FOR_PARTS, second.stdout + second.stderr
    lines = (work / "round_1" / "predict_parts.sh").read_text(encoding="utf-8").splitlines()
    # each line is one job: every fold's predict command for that part
    for line in lines:
        for part in line.split(" && "):
            args = shlex.split(part)
            assert args[:2] == ["samflare", "predict"]
            assert samflare_main(args[1:]) == 0

    # 3: the same command picks the parts up, votes, filters, and is killed by the test hook after 3 merged cases
    third = subprocess.run(
        run_command(source, locator, work, "--num_parts", "2"),
        env={**env, KILL_HOOK_ENV: "r1.merge:3"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert third.returncode == -signal.SIGKILL, third.stdout + third.stderr
    labels_1 = source.raw / NAMES[1] / "labelsTr"
    merged_before = {p.name: p.stat().st_mtime_ns for p in labels_1.glob("*.nii.gz")}
    voted_before = {p.name: p.stat().st_mtime_ns for p in (work / "round_1" / "voted").iterdir()}

    # 4: finishes
    last = subprocess.run(run_command(source, locator, work), env=env, capture_output=True, text=True, timeout=900)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    return {
        "work": work,
        "locator": locator,
        "state_1": state_1,
        "parts_lines": lines,
        "second": second.stdout,
        "mtime_fold_0": mtime_fold_0,
        "fold_0_checkpoint": fold_0_checkpoint,
        "merged_before": merged_before,
        "voted_before": voted_before,
        "stdout": last.stdout,
    }


def test_killed_run_finishes_without_redoing_finished_steps(source, interrupted_run):
    work = interrupted_run["work"]
    state = read_json(work / "state.json")
    steps = state["steps"]
    assert len(state["invocations"]) == 4
    expected = [
        "prepare",
        "r1.preprocess",
        "r1.train.0",
        "r1.train.1",
        "r1.predict",
        "r1.vote",
        "r1.filter",
        "r1.merge",
        "r1.dataset",
        "r1.report",
        "r1.cleanup",
        "r2.preprocess",
        "r2.train.0",
        "r2.train.1",
        "r2.predict",
        "r2.vote",
        "r2.filter",
        "r2.merge",
        "r2.dataset",
        "r2.report",
        "r2.cleanup",
        "final.preprocess",
        "final.train.locator",
        "final.train.segmenter",
    ]
    assert list(steps) == expected
    # what the first invocation finished was never redone
    for name in interrupted_run["state_1"]["steps"]:
        assert steps[name]["invocation"] == 1
    assert {"prepare", "r1.preprocess", "r1.train.0"} <= set(interrupted_run["state_1"]["steps"])
    assert "r1.train.1" not in interrupted_run["state_1"]["steps"]
    assert interrupted_run["fold_0_checkpoint"].stat().st_mtime_ns == interrupted_run["mtime_fold_0"]
    assert steps["r1.train.1"]["invocation"] == 2
    assert [steps[s]["invocation"] for s in ("r1.predict", "r1.vote", "r1.filter")] == [3, 3, 3]
    assert steps["r1.merge"]["invocation"] == 4 and steps["final.train.segmenter"]["invocation"] == 4
    # the three cases merged before the kill were kept, the vote was not redone
    assert len(interrupted_run["merged_before"]) == 3
    labels_1 = source.raw / NAMES[1] / "labelsTr"
    for name, mtime in interrupted_run["merged_before"].items():
        assert (labels_1 / name).stat().st_mtime_ns == mtime
    for name, mtime in interrupted_run["voted_before"].items():
        assert (work / "round_1" / "voted" / name).stat().st_mtime_ns == mtime
    assert "[r1.train.0] done (invocation 1), skipped" in interrupted_run["stdout"]
    assert "waiting" in interrupted_run["second"] and len(interrupted_run["parts_lines"]) == 2


def test_outputs_equal_an_uninterrupted_computation_from_the_same_predictions(source, interrupted_run, tmp_path):
    work = interrupted_run["work"]
    raw = read_json(source.raw / SOURCE / "dataset.json")
    partial = raw["partial_labels"]
    for r in (1, 2):
        round_dir = work / f"round_{r}"
        folds = sorted((round_dir / "predictions").glob("fold_*"))
        cases = sorted({p.name[:-4] for fold in folds for p in fold.glob("*.npz")})
        assert set(cases) == set(partial) | set(UNLABELLED)
        for case in cases:
            inputs = [fold / f"{case}.npz" for fold in folds if (fold / f"{case}.npz").is_file()]
            assert len(inputs) == (2 if case in UNLABELLED else 1)  # held-out fold only, or every fold
            vote_case(inputs, tmp_path / f"voted{r}", case, ".nii.gz")
            for name in (f"{case}.nii.gz", f"{case}.npz", f"{case}.pkl"):
                assert files_equal(tmp_path / f"voted{r}" / name, round_dir / "voted" / name), (r, name)
            filter_case(
                tmp_path / f"voted{r}" / f"{case}.nii.gz",
                tmp_path / f"voted{r}" / f"{case}.npz",
                tmp_path / f"filtered{r}" / f"{case}.nii.gz",
                CONFIDENCE,
                15,
            )
            assert files_equal(tmp_path / f"filtered{r}" / f"{case}.nii.gz", round_dir / "filtered" / f"{case}.nii.gz")
            ground_truth = source.raw / SOURCE / "labelsTr" / f"{case}.nii.gz"
            merge_case(
                ground_truth if case in partial else None,
                tmp_path / f"filtered{r}" / f"{case}.nii.gz",
                partial.get(case),
                tmp_path / f"merged{r}" / f"{case}.nii.gz",
            )
            assert files_equal(
                tmp_path / f"merged{r}" / f"{case}.nii.gz", source.raw / NAMES[r] / "labelsTr" / f"{case}.nii.gz"
            )


def test_every_round_writes_a_proper_nnunet_dataset_and_a_report(source, interrupted_run):
    work = interrupted_run["work"]
    source_json = read_json(source.raw / SOURCE / "dataset.json")
    for r in (1, 2):
        folder = source.raw / NAMES[r]
        data = read_json(folder / "dataset.json")
        assert data["name"] == NAMES[r] and data["numTraining"] == LABELLED + len(UNLABELLED)
        assert data["labels"]["ignore"] == 15 and "partial_labels" not in data
        provenance = data["samflare_pseudolabel"]["label_provenance"]
        assert provenance == {
            **{c: "ground_truth" for c in ("TSEX_0001", "TSEX_0002")},
            **{c: "ground_truth+pseudo" for c in source_json["partial_labels"]},
            **{c: "pseudo" for c in UNLABELLED},
        }
        assert read_json(source.preprocessed / NAMES[r] / "dataset.json") == data
        for case in provenance:
            label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
            image = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
            assert label.GetSize() == image.GetSize()
            values = sitk.GetArrayFromImage(label)
            assert values.max() <= 15
            if case in source_json["partial_labels"]:  # ground truth wins
                gt = sitk.GetArrayFromImage(sitk.ReadImage(str(source.raw / SOURCE / "labelsTr" / f"{case}.nii.gz")))
                annotated = np.isin(gt, source_json["partial_labels"][case])
                assert np.array_equal(values[annotated], gt[annotated])
                assert not np.isin(values[~annotated], source_json["partial_labels"][case]).any()
        report = read_json(work / f"round_{r}" / "report.json")
        assert report["dataset"] == NAMES[r]
        assert report["cases_per_provenance"] == {"ground_truth": 2, "ground_truth+pseudo": 4, "pseudo": 2}
        assert set(report["wall_time_s"]) >= {"train.0", "train.1", "predict", "vote", "filter", "merge"}
        ignored = sum(
            read_json(p)["ignored"].get(k, 0)
            for p in (work / f"round_{r}" / "filtered").glob("*.json")
            for k in map(str, range(15))
        )
        assert sum(report["ignored_voxels"].values()) == ignored
        assert report["changed_voxels"]["cases_compared"] == (LABELLED if r == 1 else LABELLED + len(UNLABELLED))
        assert (work / f"round_{r}" / "report.png").stat().st_size > 10_000
        assert f"round {r} -> {NAMES[r]}" in interrupted_run["stdout"] or r == 1
        # nnU-Net's final validation is skipped for the rounds' trainings
        assert not (segmenter_folder(source, r - 1) / "fold_0" / "validation").exists()
    # D_0 keeps the source's partial labels for the partial-label trainer of round 1
    assert read_json(source.raw / NAMES[0] / "dataset.json")["partial_labels"] == source_json["partial_labels"]
    # after the last round: the locator and the final segmenter on the last round's labels
    for configuration, trainer in (("3d_locator", ROUND_LOCATOR_TRAINER), ("3d_segmenter", ROUND_TRAINER)):
        assert (
            source.results / NAMES[2] / f"{trainer}__{PLANS}__{configuration}" / "fold_all" / "checkpoint_final.pth"
        ).is_file()


def test_partial_labels_reach_the_loss_through_nnunet_data_loading(
    nnunet_paths, interrupted_run, monkeypatch, tmp_path
):
    """Round 1's trainer on D_0 (which keeps partial_labels): a real batch from nnU-Net's data loader carries its
    cases' keys, and the loss sees exactly their annotation sets."""
    from nnunet_samflare.training.partial_labels import nnUNetTrainer_SAMFlareSegmenterPartialDebug

    monkeypatch.setenv("nnUNet_results", str(tmp_path))  # its log, not the run's model folder

    preprocessed = nnunet_paths.preprocessed / NAMES[0]
    plans = read_json(preprocessed / f"{PLANS}.json")
    plans["continue_training"] = False  # nnUNetTrainer.__init__ pops it (run_training sets it)
    trainer = nnUNetTrainer_SAMFlareSegmenterPartialDebug(
        plans, "3d_segmenter", 0, read_json(preprocessed / "dataset.json"), torch.device("cpu")
    )
    trainer.initialize()
    loader, _ = trainer.get_dataloaders()
    seen = []
    forward = type(trainer._marginal_loss).forward

    def spy(loss, logits, target):
        seen.append(loss.annotated.clone())
        return forward(loss, logits, target)

    monkeypatch.setattr(type(trainer._marginal_loss), "forward", spy)
    partial = read_json(preprocessed / "dataset.json")["partial_labels"]
    for _ in range(3):
        batch = next(loader)
        trainer.train_step(batch)
        mask = seen[-1]
        for row, key in enumerate(batch["keys"]):
            expected = [0, *sorted(partial[key])] if key in partial else list(range(15))
            assert mask[row].nonzero().flatten().tolist() == expected


def test_prediction_parts_cover_every_case_once_and_equal_a_single_run(trained_models, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name, case in (("flare_like", "TSEX_0002"), ("partial", "DCMQI_0001"), ("tumor_pseudohu", "DLPS_0004")):
        shutil.copy(data_file(name, "image", case), images / f"{case}_0000.nii.gz")
    models = [
        "--locator",
        str(trained_models.model_folder(LOCATOR_TRAINER, "3d_locator")),
        "--segmenter",
        str(trained_models.model_folder(SEGMENTER_TRAINER, "3d_segmenter")),
        "-device",
        "cpu",
    ]
    assert (
        samflare_main(["predict", "-i", str(images), "-o", str(tmp_path / "single"), "--save_probabilities", *models])
        == 0
    )
    for part in (0, 1):
        assert (
            samflare_main(
                [
                    "predict",
                    "-i",
                    str(images),
                    "-o",
                    str(tmp_path / "parts"),
                    "--save_probabilities",
                    "--num_parts",
                    "2",
                    "--part_id",
                    str(part),
                    *models,
                ]
            )
            == 0
        )
    written = {p.name for p in (tmp_path / "parts").glob("*.nii.gz")}
    # nnUNetv2_predict's split: sorted cases, every num_parts-th from part_id
    assert written == {"DCMQI_0001.nii.gz", "DLPS_0004.nii.gz", "TSEX_0002.nii.gz"}
    for case in ("DCMQI_0001", "DLPS_0004", "TSEX_0002"):
        single = np.load(tmp_path / "single" / f"{case}.npz")["probabilities"]
        assert np.array_equal(np.load(tmp_path / "parts" / f"{case}.npz")["probabilities"], single)
        assert files_equal(tmp_path / "parts" / f"{case}.nii.gz", tmp_path / "single" / f"{case}.nii.gz")
    capsys.readouterr()
    assert (
        samflare_main(
            ["predict", "-i", str(images), "-o", str(tmp_path / "x"), "--num_parts", "2", "--part_id", "2", *models]
        )
        == 2
    )
    assert "--part_id must be between 0 and num_parts - 1 = 1" in capsys.readouterr().err
