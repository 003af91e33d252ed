"""The benchmark case of the cascade benchmarks: a real CT resampled to a clinical grid, planned and preprocessed
by stock nnU-Net and ``samflare plan``, with the three model folders (``_cascade_models.py``).

Everything lives under a working folder; :func:`prepare` is idempotent with ``reuse`` (a matching
``prepared.json``), so that several benchmarks can share one preparation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _benchlib as lib

CASE_ID = "BENCH_0001"
SECOND_ID = "BENCH_0002"
PLANS = "samflarePlans"
NNUNET_TRAINER = "nnUNetTrainer"
LOCATOR_TRAINER = "nnUNetTrainer_SAMFlareLocator"
SEGMENTER_TRAINER = "nnUNetTrainer_SAMFlareSegmenter"


def add_case_arguments(p) -> None:
    """The options that define the case and its models (shared by the cascade benchmarks)."""
    p.add_argument(
        "--data",
        type=Path,
        default=lib.DEFAULT_DATASET,
        help="raw nnU-Net dataset holding the CTs (default: %(default)s)",
    )
    p.add_argument("--case", default="TSEX_0001", help="the benchmark CT (default: %(default)s)")
    p.add_argument("--second-case", default="TSEX_0002", help="second case for planning (default: %(default)s)")
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 215], metavar=("X", "Y", "Z"))
    p.add_argument("--dataset-id", type=int, default=990)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--segmenter-patch", type=int, nargs=3, metavar=("Z", "Y", "X"), help="default: 96 96 96")
    p.add_argument("--segmenter-spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="default: 2 1.5 1.5")
    p.add_argument("--locator-patch", type=int, nargs=3, metavar=("Z", "Y", "X"), help="default: 128 128 128")
    p.add_argument(
        "--locator",
        choices=("fit", "all"),
        default="fit",
        help="fit: fit the untrained locator to the case (realistic ROI); all: ROI = whole scan",
    )
    p.add_argument("--locator-fit-steps", type=int, default=100)
    p.add_argument("--workdir", type=Path, help="working folder (kept); default: a temporary one (removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    p.add_argument("--reuse", action="store_true", help="reuse data and models already prepared in --workdir")


def add_run_arguments(p, timeout: float) -> None:
    """The options every script on this case takes besides the case's own: per-run timeout, threads, JSON output."""
    p.add_argument("--timeout", type=float, default=timeout, help="seconds per run (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads (nnUNet_def_n_proc); default: all cores")
    p.add_argument("--json", type=Path, help="write all numbers here")


def run_threads(args) -> int | None:
    """``--threads``, else every core on a CPU; on a GPU nnU-Net's own default (None)."""
    return args.threads or (os.cpu_count() if args.device == "cpu" else None)


def resample_to(image, size=None, spacing=None, *, labels: bool = False):
    """``image`` over its own physical extent on a new grid of ``size`` (x, y, z) or ``spacing``.

    The new grid covers the same box (voxel edges at the same place): spacing = extent / size, and the first
    voxel centre moves by half the change of spacing.
    """
    import numpy as np
    import SimpleITK as sitk

    old_size = np.array(image.GetSize(), dtype=float)
    old_spacing = np.array(image.GetSpacing(), dtype=float)
    extent = old_size * old_spacing
    if size is not None:
        size = np.array(size, dtype=int)
        spacing = extent / size
    else:
        spacing = np.array(spacing, dtype=float)
        size = np.maximum(1, np.round(extent / spacing)).astype(int)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.array(image.GetOrigin(), dtype=float) + direction @ ((spacing - old_spacing) / 2)
    resampled = sitk.Resample(
        image,
        [int(s) for s in size],
        sitk.Transform(),
        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
        [float(o) for o in origin],
        [float(s) for s in spacing],
        image.GetDirection(),
        0 if labels else -1024,
        sitk.sitkUInt8 if labels else sitk.sitkInt16,
    )
    return resampled


def make_dataset(args, raw_root: Path) -> dict[str, Any]:
    """The two resampled cases as an nnU-Net raw dataset; returns a description of what was done."""
    import SimpleITK as sitk

    source = args.data
    dataset_json = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    folder = raw_root / dataset_name(args.dataset_id)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    description: dict[str, Any] = {"source": str(source), "cases": {}}
    spacing = None
    for new_id, old_id in ((CASE_ID, args.case), (SECOND_ID, args.second_case)):
        image = sitk.ReadImage(str(source / "imagesTr" / f"{old_id}_0000.nii.gz"))
        label = sitk.ReadImage(str(source / "labelsTr" / f"{old_id}.nii.gz"))
        if spacing is None:
            new_image = resample_to(image, size=args.size)
            spacing = new_image.GetSpacing()
        else:
            new_image = resample_to(image, spacing=spacing)
        new_label = resample_to(label, size=new_image.GetSize(), labels=True)
        sitk.WriteImage(new_image, str(folder / "imagesTr" / f"{new_id}_0000.nii.gz"))
        sitk.WriteImage(new_label, str(folder / "labelsTr" / f"{new_id}.nii.gz"))
        description["cases"][new_id] = {
            "from": old_id,
            "original_size_xyz": list(image.GetSize()),
            "original_spacing_xyz": [round(s, 4) for s in image.GetSpacing()],
            "size_xyz": list(new_image.GetSize()),
            "spacing_xyz": [round(s, 4) for s in new_image.GetSpacing()],
        }
    dataset_json["numTraining"] = 2
    dataset_json["name"] = "SamflareBench"
    dataset_json["description"] = (
        f"{args.case} and {args.second_case} of {source} resampled with SimpleITK (linear image, nearest labels) "
        f"to {'x'.join(map(str, args.size))} voxels over the same physical extent; for benchmarks only."
    )
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    return description


def dataset_name(dataset_id: int) -> str:
    return f"Dataset{dataset_id:03d}_SamflareBench"


@contextmanager
def case_workdir(args) -> Iterator[Path]:
    """``--workdir`` (kept) or a temporary folder (removed unless ``--keep``), outside the repository, with the
    ``nnUNet_*`` environment of this process pointing into it (set before anything imports nnunetv2, whose
    ``paths`` module reads them once)."""
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="samflare-bench-")) if owned else args.workdir.resolve()
    if workdir == lib.REPO or lib.REPO in workdir.parents:
        raise SystemExit(f"--workdir {workdir} is inside the repository; choose a folder outside it")
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update({k: v for k, v in lib.nnunet_env(workdir).items() if k.startswith("nnUNet_")})
    try:
        yield workdir
    finally:
        if owned and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif owned:
            print(f"working folder kept: {workdir}")


def prepare(args, workdir: Path) -> dict[str, Any]:
    """Data, plans, preprocessing and model folders of the case under ``workdir`` (``benchmarks/README.md``,
    ``bench_cascade.py`` steps 1-3); idempotent with ``--reuse`` (a matching ``prepared.json``)."""
    marker = workdir / "prepared.json"
    config = preparation_config(args)
    if args.reuse and marker.is_file():
        previous = json.loads(marker.read_text(encoding="utf-8"))
        if previous.get("config") == config:
            print(f"reusing the prepared dataset and models in {workdir}", flush=True)
            return previous
        print("--reuse: the prepared workdir was made with other settings; preparing again", flush=True)
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "input", "logs"):
        target = workdir / sub
        if target.exists():
            shutil.rmtree(target)
    marker.unlink(missing_ok=True)
    # Two cases: more than two planning/preprocessing workers cannot help; one on a small (2-core) machine.
    workers = "2" if (os.cpu_count() or 1) >= 4 else "1"
    env = lib.nnunet_env(workdir, n_proc=int(workers))
    log = workdir / "logs" / "prepare.log"
    timings: dict[str, float] = {}

    def step(name, function):
        print(f"[prepare] {name} ...", flush=True)
        start = time.perf_counter()
        result = function()
        timings[name] = round(time.perf_counter() - start, 2)
        print(f"[prepare] {name}: {timings[name]} s", flush=True)
        return result

    data = step("resample the CT", lambda: make_dataset(args, workdir / "nnUNet_raw"))
    input_dir = workdir / "input"
    input_dir.mkdir(parents=True, exist_ok=True)
    image = workdir / "nnUNet_raw" / dataset_name(args.dataset_id) / "imagesTr" / f"{CASE_ID}_0000.nii.gz"
    shutil.copyfile(image, input_dir / image.name)
    dataset = str(args.dataset_id)
    step(
        "nnUNetv2_plan_and_preprocess -c 3d_fullres",
        lambda: lib.run_checked(
            lib.nnunet_command(
                "nnUNetv2_plan_and_preprocess",
                "-d",
                dataset,
                "-c",
                "3d_fullres",
                "-npfp",
                workers,
                "-np",
                workers,
                "--no_pbar",
            ),
            env,
            log=log,
        ),
    )
    plan_args = ["plan", "-d", dataset]
    for flag, value in (
        ("--segmenter_patch", args.segmenter_patch),
        ("--segmenter_spacing", args.segmenter_spacing),
        ("--locator_patch", args.locator_patch),
    ):
        if value:
            plan_args += [flag, *map(str, value)]
    step("samflare plan", lambda: lib.run_checked(lib.samflare_command(*plan_args), env, log=log))
    step(
        "nnUNetv2_preprocess 3d_locator 3d_segmenter",
        lambda: lib.run_checked(
            lib.nnunet_command(
                "nnUNetv2_preprocess",
                "-d",
                dataset,
                "-plans_name",
                PLANS,
                "-c",
                "3d_locator",
                "3d_segmenter",
                "-np",
                workers,
                workers,
            ),
            env,
            log=log,
        ),
    )
    from _cascade_workers import worker_command  # the workers import this module

    models_file = workdir / "logs" / "models.json"
    step(
        "untrained model folders",
        lambda: lib.run_checked(
            worker_command("make-models", {**config, "fit_device": args.device}, models_file), env, log=log
        ),
    )
    prepared = {
        "config": config,
        "data": data,
        "input": str(input_dir / image.name),
        "label": str(image.parent.parent / "labelsTr" / f"{CASE_ID}.nii.gz"),
        "models": json.loads(models_file.read_text(encoding="utf-8")),
        "preparation_s": timings,
    }
    lib.write_json(marker, prepared)
    return prepared


def preparation_config(args) -> dict[str, Any]:
    return {
        "data": str(Path(args.data).resolve()),
        "case": args.case,
        "second_case": args.second_case,
        "size": list(args.size),
        "dataset_id": args.dataset_id,
        "segmenter_patch": args.segmenter_patch,
        "segmenter_spacing": args.segmenter_spacing,
        "locator_patch": args.locator_patch,
        "locator": args.locator,
        "locator_fit_steps": args.locator_fit_steps,
    }


def tiles(shape, patch, step: float = 0.5) -> int:
    """Number of sliding-window tiles nnU-Net's predictor uses for a (transposed) preprocessed shape."""
    import math

    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    padded = [max(int(s), int(p)) for s, p in zip(shape, patch)]
    return math.prod(len(s) for s in compute_steps_for_sliding_window(padded, list(patch), step))


def expected_nnunet_tiles(case: dict, nnunet: dict) -> tuple[list[int], int] | None:
    """Preprocessed shape and sliding-window tile count of the benchmark case for nnU-Net's 3d_fullres."""
    transpose = nnunet.get("transpose_forward")
    if not transpose:
        return None
    shape = [case["size_xyz"][::-1][i] for i in transpose]
    spacing = [case["spacing_xyz"][::-1][i] for i in transpose]
    new_shape = [int(round(n * s / t)) for n, s, t in zip(shape, spacing, nnunet["spacing"])]
    return new_shape, tiles(new_shape, nnunet["patch_size"], 0.5)


def ground_truth_box_mm(label_file: str) -> list[float] | None:
    """Physical size (z, y, x, mm) of the box around all labels > 0 of the benchmark case."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(label_file)
    array = sitk.GetArrayViewFromImage(image) > 0
    if not array.any():
        return None
    spacing = image.GetSpacing()[::-1]
    extent = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(array.any(axis=other))
        extent.append(round(float((present[-1] - present[0] + 1) * spacing[axis]), 1))
    return extent
