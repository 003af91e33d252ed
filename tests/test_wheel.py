"""The package as a user gets it: build the wheel, install it into a fresh virtual environment that cannot see this
source tree, and run ``samflare demo --quick`` there from a folder outside the repository; then share the demo's
models with ``samflare export`` / ``samflare install`` and check that ``samflare predict`` gives the same labels from
the installed copy as from the original folders, with nothing set up but ``$nnUNet_results``.

How the fresh environment gets its dependencies in seconds rather than a 6 GB install: the venv is created without
pip and without system site-packages; this environment's pip installs the wheel into it (``--python``, ``--no-deps``,
``--no-index``); a ``.pth`` file then appends this environment's site-packages directory to its ``sys.path``. Python
processes ``.pth`` files only in site directories, not in directories a ``.pth`` line adds, so this environment's
editable-install hook (which would map ``nnunet_samflare`` to the source tree) never runs there, and the fresh
site-packages comes first on ``sys.path``, so ``nnunet_samflare`` and its data are those of the wheel. The test
checks both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
#: Not part of a build: environments, caches, earlier build outputs, demo runs.
_NOT_SOURCE = (
    ".venv",
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "samflare-demo",
    ".bench",
    ".whl",
)


def run(args: list, *, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def clean_environment(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that points Python or nnU-Net somewhere."""
    drop = (
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
        "nnUNet_raw",
        "nnUNet_preprocessed",
        "nnUNet_results",
        "nnUNet_extTrainer",
        "SAMFLARE_NO_AUTOREGISTER",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONUNBUFFERED="1", nnUNet_compile="f", **extra)
    return env


def build_fresh_environment(tmp: Path) -> Path:
    """A venv in ``tmp`` holding only the wheel of this tree (plus this environment's dependencies); its bin/."""
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))  # builds never write into the repo
    env = clean_environment()
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            tmp / "dist",
            source,
        ],
        cwd=tmp,
        env=env,
    )
    (wheel,) = (tmp / "dist").glob("nnunet_samflare-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        cwd=tmp,
        env=env,
    )
    fresh_site = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp, env=env
        ).stdout.strip()
    )
    (fresh_site / "zz_dependencies_of_the_test_environment.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8"
    )
    return venv / "bin"


def read_labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_wheel_demo_and_shared_cascade_in_a_fresh_environment(tmp_path):
    bin_dir = build_fresh_environment(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = clean_environment()

    # The fresh environment imports the wheel's package, and nothing of the source tree is on its path.
    probe = run(
        [
            bin_dir / "python",
            "-c",
            "import sys, nnunet_samflare.example_data as e, nnunet_samflare.workflows; "
            "print(e.FLARE_LIKE); print('\\n'.join(sys.path))",
        ],
        cwd=outside,
        env=env,
    ).stdout.splitlines()
    assert Path(probe[0]).is_relative_to(tmp_path / "venv")
    dependencies = Path(sysconfig.get_paths()["purelib"]).resolve()  # may lie inside the checkout (.venv/)
    in_source_tree = [
        p for p in probe[1:] if p and Path(p).resolve().is_relative_to(REPO) and Path(p).resolve() != dependencies
    ]
    assert not in_source_tree

    work = tmp_path / "demo"
    demo = run(
        [bin_dir / "samflare", "demo", "--quick", "--keep", "--work", work, "-device", "cpu"], cwd=outside, env=env
    )
    out = demo.stdout
    for stage in range(1, 8):
        assert f"[{stage}/7]" in out
    assert "trained and evaluated on the same scan" in out
    assert str(tmp_path / "venv") in out.splitlines()[1]  # the example data came from the installed wheel
    report = work / "report"
    for name in (
        "README.txt",
        "metrics.md",
        "metrics.json",
        "metrics.png",
        "timings.json",
        "TSEX_0001_preview.png",
        "locator_progress.png",
        "segmenter_progress.png",
    ):
        assert (report / name).is_file(), name
    assert "| liver" in (report / "metrics.md").read_text(encoding="utf-8")
    assert not list(REPO.glob("samflare-demo*"))  # nothing written into the source tree

    # Share the demo's cascade and predict with it "on another machine": only nnUNet_results is set there.
    results = work / "nnUNet_results"
    archive = tmp_path / "cascade.zip"
    run(
        [bin_dir / "samflare", "export", "-d", "501", "-o", archive],
        cwd=outside,
        env=clean_environment(nnUNet_results=str(results)),
    )
    other_results = tmp_path / "other_machine_results"
    installed = run(
        [bin_dir / "samflare", "install", archive],
        cwd=outside,
        env=clean_environment(nnUNet_results=str(other_results)),
    ).stdout
    assert "predict with: samflare predict -i IMAGES -o OUTPUT -d 501" in installed
    image = work / "nnUNet_raw" / "Dataset501_FlareLike" / "imagesTr" / "TSEX_0002_0000.nii.gz"
    run(
        [
            bin_dir / "samflare",
            "predict",
            "-i",
            image,
            "-o",
            tmp_path / "installed.nii.gz",
            "-d",
            "501",
            "-device",
            "cpu",
        ],
        cwd=outside,
        env=clean_environment(nnUNet_results=str(other_results)),
    )
    dataset_results = results / "Dataset501_FlareLike"
    run(
        [
            bin_dir / "samflare",
            "predict",
            "-i",
            image,
            "-o",
            tmp_path / "original.nii.gz",
            "-device",
            "cpu",
            "--locator",
            dataset_results / "nnUNetTrainer_SAMFlareLocator__samflarePlans__3d_locator",
            "--segmenter",
            dataset_results / "nnUNetTrainer_SAMFlareSegmenter__samflarePlans__3d_segmenter",
        ],
        cwd=outside,
        env=env,
    )
    original = read_labels(tmp_path / "original.nii.gz")
    assert original.shape == read_labels(image).shape
    np.testing.assert_array_equal(read_labels(tmp_path / "installed.nii.gz"), original)
