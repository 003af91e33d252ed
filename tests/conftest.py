"""Shared fixtures: the real CT of the example dataset run through the stock nnU-Net workflow once per session.

The session fixtures below do what a user does (README "Workflow"), with the console scripts of this
interpreter's environment and settings that keep nnU-Net affordable on a 2-core CPU (docs/nnunet.md §7):
one worker process, no DA workers for training, no torch.compile, a 3 mm / 64³ segmenter configuration (the
real network, smaller patches) and the 1-epoch debug trainers. Subprocesses run **without**
``nnUNet_extTrainer`` so that every nnU-Net command also exercises the zero-configuration trainer discovery.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from nnunet_samflare.example_data import FLARE_LIKE

#: Reduced real CT that only the tests need (partially labelled and tumor cases; see data/README.md).
TEST_DATA = Path(__file__).resolve().parent / "data"
_DATASETS = {
    "flare_like": FLARE_LIKE,
    "partial": TEST_DATA / "partial",
    "tumor_pseudohu": TEST_DATA / "tumor_pseudohu",
}
BIN = Path(sys.executable).parent
DATASET_ID = 501
DATASET_NAME = "Dataset501_FlareLike"
PLANS = "samflarePlans"
LOCATOR_TRAINER = "nnUNetTrainer_SAMFlareLocatorDebug"
SEGMENTER_TRAINER = "nnUNetTrainer_SAMFlareSegmenterDebug"
# The paper's segmenter at 2.0/1.5/1.5 mm with 96³ patches costs minutes per case on 2 CPU cores; the same
# network at the data's native 3 mm with 64³ patches keeps the suite inside its budget.
SEGMENTER_TEST_PLAN = ["--segmenter_spacing", "3", "3", "3", "--segmenter_patch", "64", "64", "64"]


def command(name: str) -> str:
    """A console script installed beside this interpreter (the README's venv need not be activated)."""
    return str(BIN / name)


@dataclass
class NnUNetFolders:
    raw: Path
    preprocessed: Path
    results: Path

    def env(self, *, training: bool = False, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "SAMFLARE_NO_AUTOREGISTER")}
        env.update(
            nnUNet_raw=str(self.raw),
            nnUNet_preprocessed=str(self.preprocessed),
            nnUNet_results=str(self.results),
            nnUNet_def_n_proc="1",
            nnUNet_compile="f",
            PYTHONUNBUFFERED="1",
        )
        if training:
            env["nnUNet_n_proc_DA"] = "0"  # only for training: planning crashes with it (docs/nnunet.md §10.10)
        env.update(extra)
        return env

    def run(self, args: list[str], *, training: bool = False, timeout: float = 900, **extra: str):
        result = subprocess.run(
            args,
            env=self.env(training=training, **extra),
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def model_folder(self, trainer: str, configuration: str) -> Path:
        return self.results / DATASET_NAME / f"{trainer}__{PLANS}__{configuration}"


def dataset(name: str) -> Path:
    """A real-CT dataset carried by the repository; a missing one is an error, never a silent skip."""
    folder = _DATASETS[name]
    if not (folder / "dataset.json").is_file():
        raise FileNotFoundError(f"test data {name!r} not found at {folder}: the checkout is incomplete")
    return folder


def data_file(name: str, kind: str, case: str) -> Path:
    """``imagesTr/<case>_0000.nii.gz`` (kind ``image``) or ``labelsTr/<case>.nii.gz`` (kind ``label``)."""
    folder = dataset(name)
    path = folder / "imagesTr" / f"{case}_0000.nii.gz" if kind == "image" else folder / "labelsTr" / f"{case}.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"test data file {path} is missing")
    return path


@pytest.fixture(scope="session", autouse=True)
def remove_checkpoints_at_session_end(tmp_path_factory):
    """nnU-Net checkpoints are most of what the suite writes (~0.9 GB a run, with optimizer state): delete every
    ``*.pth`` under this session's temporary folder when it ends. What remains is small, and pytest keeps it for
    the last runs only (``tmp_path_retention_*`` in pyproject.toml)."""
    yield
    for checkpoint in tmp_path_factory.getbasetemp().rglob("*.pth"):
        checkpoint.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def nnunet_folders(tmp_path_factory) -> NnUNetFolders:
    root = tmp_path_factory.mktemp("nnunet")
    folders = NnUNetFolders(root / "raw", root / "preprocessed", root / "results")
    for folder in (folders.raw, folders.preprocessed, folders.results):
        folder.mkdir()
    shutil.copytree(dataset("flare_like"), folders.raw / DATASET_NAME)
    return folders


@pytest.fixture(scope="session")
def planned_dataset(nnunet_folders: NnUNetFolders) -> NnUNetFolders:
    """nnUNetv2_plan_and_preprocess → samflare plan → nnUNetv2_preprocess of both plug-in configurations."""
    f = nnunet_folders
    f.run(
        [
            command("nnUNetv2_plan_and_preprocess"),
            "-d",
            str(DATASET_ID),
            "-c",
            "3d_fullres",
            "-npfp",
            "1",
            "-np",
            "1",
            "--no_pbar",
        ]
    )
    f.run([command("samflare"), "plan", "-d", str(DATASET_ID), *SEGMENTER_TEST_PLAN])
    f.run(
        [
            command("nnUNetv2_preprocess"),
            "-d",
            str(DATASET_ID),
            "-plans_name",
            PLANS,
            "-c",
            "3d_locator",
            "3d_segmenter",
            "-np",
            "1",
            "1",
        ]
    )
    return f


@pytest.fixture(scope="session")
def trained_models(planned_dataset: NnUNetFolders) -> NnUNetFolders:
    """Both phases trained with stock ``nnUNetv2_train`` (debug length, final validation included)."""
    f = planned_dataset
    for configuration, trainer in (("3d_locator", LOCATOR_TRAINER), ("3d_segmenter", SEGMENTER_TRAINER)):
        f.run(
            [
                command("nnUNetv2_train"),
                str(DATASET_ID),
                configuration,
                "all",
                "-tr",
                trainer,
                "-p",
                PLANS,
                "-device",
                "cpu",
            ],
            training=True,
        )
    return f


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
