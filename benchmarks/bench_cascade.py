"""One 512×512×215 CT through ``samflare predict`` and through stock ``nnUNetv2_predict`` 3d_fullres, same run.

What it does (everything under ``--workdir``, a temporary folder by default; nothing is written into the repo):

1. **Data.** The real CT ``--case`` (default TSEX_0001 of the package's example dataset ``nnunet_samflare/example_data/flare_like``, 122×101×112 at
   3 mm) is resampled with SimpleITK to ``--size`` (default 512×512×215, x×y×z) over the same physical extent
   (spacing = extent / size; voxel centres re-aligned), linear interpolation for the image (int16 HU), nearest
   neighbour for the labels. A second case (``--second-case``, default TSEX_0002, a 30-slice crop of the same
   scan) is resampled to the same spacing, so that nnU-Net's fingerprint and plans see two labelled cases. They
   form the raw dataset ``Dataset<ID>_SamflareBench``; the benchmark input is the resampled ``--case``.
2. **Plans.** Stock ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` (nnU-Net's default planner and network), then
   ``samflare plan`` (paper settings unless overridden: segmenter 2.0/1.5/1.5 mm, 96³ patches; locator 128³) and
   ``nnUNetv2_preprocess`` of ``3d_locator``/``3d_segmenter``: only what the trainers' ``initialize()`` needs.
3. **Models, untrained.** The real trainer classes (``nnUNetTrainer`` for 3d_fullres,
   ``nnUNetTrainer_SAMFlareLocator``/``_SAMFlareSegmenter``) are instantiated in-process, ``initialize()``\\d,
   their mirroring axes set as ``on_train_start`` does, and ``save_checkpoint(fold_0/checkpoint_final.pth)``
   written beside ``plans.json``/``dataset.json``/``dataset_fingerprint.json``: nnU-Net's own model-folder
   format, fold 0. Untrained weights cost the same time as trained ones **except for the locator**, whose output
   decides the ROI and so the segmenter's work: random weights find nothing (the segmenter would never run) or
   noise. ``--locator fit`` (default) therefore fits the locator for ``--locator-fit-steps`` AdamW steps to the
   benchmark case's own foreground (all labels > 0) on its preprocessed coarse grid, so that the ROI is the
   size a trained locator gives; ``--locator all`` makes it call everything foreground (ROI = whole scan: the
   cascade's worst case). The report prints the ROI next to the ground-truth box.
4. **Runs** (each in its own process; memory sampled every 0.1 s over the process tree, GPU through NVML or
   nvidia-smi, by ``nnunet_samflare.evaluation.profile.run_and_sample``, the sampler of ``samflare profile``):

   * ``samflare-inprocess``: ``build_predictor`` once, then ``predict_case_to_files`` (``--warmup`` untimed +
     ``--repeats`` timed cases): per-stage seconds read / preprocess / locator / segmenter / postprocess / write.
   * ``samflare-cli``: ``python -m nnunet_samflare.cli predict -d ID -f 0`` wall time (start-up, imports, model
     loading, one case).
   * ``nnunet-cli-notta`` / ``nnunet-cli-tta``: stock ``nnUNetv2_predict -c 3d_fullres -f 0`` with
     ``--disable_tta`` / with its defaults (mirroring TTA on). On CPU with ``-npp 0 -nps 0`` by default
     (nnU-Net's sequential path: no worker pools, the fastest on 2 cores); ``--nnunet-workers default`` keeps
     its pools. On CUDA its defaults.
   * ``nnunet-inprocess-notta`` (and ``-tta``, off by default): the same steps as
     ``nnUNetPredictor.predict_from_files_sequential`` one by one: read, preprocess, sliding window, export
     (resample logits + argmax), write.

Ratios are stock / samflare (> 1: samflare is faster or smaller). A run that was skipped, timed out or failed
shows "not run (reason)" or "failed"; no number is made up.

CPU threads: nnU-Net's sliding window and the cascade cap torch threads at ``nnUNet_def_n_proc``. The
preparation runs with 1 (as the test-suite does); the prediction runs get ``--threads`` (default: all cores on
CPU) so that neither pipeline is held to one core. On CUDA nnU-Net's defaults are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _benchlib as lib

RUNS = (
    "samflare-inprocess",
    "samflare-cli",
    "nnunet-cli-notta",
    "nnunet-inprocess-notta",
    "nnunet-cli-tta",
    "nnunet-inprocess-tta",
)
DEFAULT_RUNS = [r for r in RUNS if r != "nnunet-inprocess-tta"]
CASE_ID = "BENCH_0001"
SECOND_ID = "BENCH_0002"
PLANS = "samflarePlans"
NNUNET_TRAINER = "nnUNetTrainer"
LOCATOR_TRAINER = "nnUNetTrainer_SAMFlareLocator"
SEGMENTER_TRAINER = "nnUNetTrainer_SAMFlareSegmenter"


# ================================================================================================================
# 1. data
# ================================================================================================================


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


# ================================================================================================================
# 2.-3. plans, preprocessing, untrained model folders
# ================================================================================================================


def prepare(args, workdir: Path) -> dict[str, Any]:
    """Steps 1-3 of the module docstring; idempotent with ``--reuse`` (a matching ``prepared.json``)."""
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
                "nnUNetv2_plan_and_preprocess", "-d", dataset, "-c", "3d_fullres", "-npfp", workers, "-np", workers,
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
                "nnUNetv2_preprocess", "-d", dataset, "-plans_name", PLANS, "-c", "3d_locator", "3d_segmenter",
                "-np", workers, workers,
            ),
            env,
            log=log,
        ),
    )
    models_file = workdir / "logs" / "models.json"
    payload = json.dumps({**config, "fit_device": args.device})
    step(
        "untrained model folders",
        lambda: lib.run_checked(
            [sys.executable, str(Path(__file__).resolve()), "--_worker", "make-models", payload, str(models_file)],
            env,
            log=log,
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


def make_models_worker(config: dict, out_file: Path) -> None:
    """In a process whose environment points nnU-Net at the workdir: write the three model folders."""
    import shutil as _shutil

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_samflare.training.trainers import nnUNetTrainer_SAMFlareLocator, nnUNetTrainer_SAMFlareSegmenter

    torch.manual_seed(12345)
    name = dataset_name(config["dataset_id"])
    preprocessed = Path(nnUNet_preprocessed) / name
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    models = {}
    for key, trainer_class, plans_name, configuration in (
        ("nnunet", nnUNetTrainer, "nnUNetPlans", "3d_fullres"),
        ("locator", nnUNetTrainer_SAMFlareLocator, PLANS, "3d_locator"),
        ("segmenter", nnUNetTrainer_SAMFlareSegmenter, PLANS, "3d_segmenter"),
    ):
        plans = load_json(str(preprocessed / f"{plans_name}.json"))
        plans["continue_training"] = False  # nnUNetTrainer.__init__ pops this key (NNUNET.md §6.9)
        trainer = trainer_class(plans, configuration, 0, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
        # on_train_start -> get_dataloaders sets the mirroring axes that the checkpoint hands to the predictor.
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        info: dict[str, Any] = {}
        if key == "locator":
            info = calibrate_locator(trainer, config)
        base = Path(trainer.output_folder_base)
        Path(trainer.output_folder).mkdir(parents=True, exist_ok=True)
        save_json(trainer.plans_manager.plans, str(base / "plans.json"), sort_keys=False)
        save_json(trainer.dataset_json, str(base / "dataset.json"), sort_keys=False)
        _shutil.copyfile(preprocessed / "dataset_fingerprint.json", base / "dataset_fingerprint.json")
        trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
        cm = trainer.configuration_manager
        models[key] = {
            "folder": str(base),
            "trainer": trainer_class.__name__,
            "plans": plans_name,
            "configuration": configuration,
            "network": cm.network_arch_class_name,
            "patch_size": list(cm.patch_size),
            "spacing": list(cm.spacing),
            "transpose_forward": list(trainer.plans_manager.transpose_forward),
            "batch_size": cm.batch_size,
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
            **info,
        }
    out_file.write_text(json.dumps(models, indent=2, default=list), encoding="utf-8")


def calibrate_locator(trainer, config: dict) -> dict[str, Any]:
    """Give the untrained locator a realistic output (see the module docstring, step 3)."""
    import numpy as np
    import torch

    network = trainer.network
    head = network.decoder.seg_layers[0]
    if config["locator"] == "all":
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(10.0)
        return {"locator_weights": "untrained, head set to call every voxel foreground (ROI = whole scan)"}

    steps = int(config["locator_fit_steps"])
    device = torch.device(config.get("fit_device", "cpu"))
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, identifiers=[CASE_ID])
    data, seg, _, _ = dataset.load_case(CASE_ID)
    data = torch.from_numpy(np.ascontiguousarray(data[:])).float()[None]
    target = (torch.from_numpy(np.ascontiguousarray(seg[:])) > 0).float()[None]
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    pad = []
    for size, p in zip(reversed(data.shape[2:]), reversed(patch)):
        missing = max(0, p - size)
        pad += [missing // 2, missing - missing // 2]
    data = torch.nn.functional.pad(data, pad)
    target = torch.nn.functional.pad(target, pad)
    data, target = data.to(device), target.to(device)
    generator = np.random.default_rng(0)
    network.to(device)  # moves the parameters in place: the trainer's optimizer still refers to them
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-5)
    network.train()
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        corner = [int(generator.integers(0, s - p + 1)) for s, p in zip(data.shape[2:], patch)]
        window = (slice(None), slice(None), *(slice(c, c + p) for c, p in zip(corner, patch)))
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss(network(data[window]), target[window])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    network.eval()
    network.to("cpu")  # the checkpoint is written from the CPU trainer, as the other two
    return {
        "locator_weights": f"fitted for {steps} AdamW steps (lr 1e-3) to {CASE_ID}'s foreground, "
        f"{patch} crops of its {list(data.shape[2:])} preprocessed grid, on {device.type}",
        "locator_fit_s": round(time.perf_counter() - start, 1),
        "locator_fit_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
    }


# ================================================================================================================
# 4. measurement workers (each runs in its own process)
# ================================================================================================================


def _cuda_peaks(device) -> dict[str, float]:
    import torch

    if device.type != "cuda":
        return {}
    return {
        "torch_max_allocated_MB": torch.cuda.max_memory_allocated(device) / lib.MIB,
        "torch_max_reserved_MB": torch.cuda.max_memory_reserved(device) / lib.MIB,
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiles(shape, patch, step: float = 0.5) -> int:
    """Number of sliding-window tiles nnU-Net's predictor uses for a (transposed) preprocessed shape."""
    import math

    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    padded = [max(int(s), int(p)) for s, p in zip(shape, patch)]
    return math.prod(len(s) for s in compute_steps_for_sliding_window(padded, list(patch), step))


def samflare_worker(spec: dict, out_file: Path) -> None:
    import torch

    from nnunet_samflare.inference.api import build_predictor, predict_case_to_files
    from nnunet_samflare.inference.cascade import resample_shape
    from nnunet_samflare.inference.io import find_cases

    device = torch.device(spec["device"])
    start = time.perf_counter()
    predictor = build_predictor(
        locator=spec["locator"], segmenter=spec["segmenter"], folds=[0], device=spec["device"], tta=False
    )
    _sync(device)
    load_s = time.perf_counter() - start
    case = find_cases(spec["input"])[0]
    runs = []
    prediction = None
    for i in range(spec["warmup"] + spec["repeats"]):
        target = Path(spec["output"]) / f"run{i}" / case.output_name
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        prediction = predict_case_to_files(predictor, case, target)
        _sync(device)
        total = time.perf_counter() - start
        runs.append({"warmup": i < spec["warmup"], "total_s": total, "stages_s": dict(prediction.timings)})
    result: dict[str, Any] = {"load_s": load_s, "runs": runs, "peak_rss_MB": lib.peak_rss_mb(), **_cuda_peaks(device)}
    if prediction is not None and prediction.box is not None:
        segmenter = predictor.segmenter
        cm, pm = segmenter.configuration_manager, segmenter.plans_manager
        box_shape = [hi - lo for lo, hi in prediction.box]
        spacing = list(prediction.properties["spacing"])
        target_spacing = [cm.spacing[i] for i in pm.transpose_backward]
        roi_shape = resample_shape(box_shape, spacing, target_spacing)
        transposed = [roi_shape[i] for i in pm.transpose_forward]
        result.update(
            box_zyx=[list(b) for b in prediction.box],
            box_shape_zyx=box_shape,
            box_mm_zyx=[round(n * s, 1) for n, s in zip(box_shape, spacing)],
            roi_shape_at_segmenter_spacing_zyx=roi_shape,
            segmenter_tiles=tiles(transposed, cm.patch_size, 0.5),
            segmenter_patch=list(cm.patch_size),
            foreground_labels=sorted(int(v) for v in __import__("numpy").unique(prediction.segmentation)),
        )
    elif prediction is not None:
        result["box_zyx"] = None
        result["warning"] = "the locator found no foreground: the segmenter did not run"
    Path(out_file).write_text(json.dumps(result, default=list), encoding="utf-8")


def nnunet_worker(spec: dict, out_file: Path) -> None:
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device(spec["device"])
    start = time.perf_counter()
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=spec["tta"],
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(spec["folder"], (0,), "checkpoint_final.pth")
    _sync(device)
    load_s = time.perf_counter() - start
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    label_manager = pm.get_label_manager(predictor.dataset_json)
    rw = pm.image_reader_writer_class()
    runs = []
    shape = None
    for i in range(spec["warmup"] + spec["repeats"]):
        stages: dict[str, float] = {}
        out = Path(spec["output"]) / f"run{i}" / f"{CASE_ID}{predictor.dataset_json['file_ending']}"
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        data, properties = rw.read_images([spec["input"]])
        t1 = time.perf_counter()
        preprocessor = cm.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case_npy(data, None, properties, pm, cm, predictor.dataset_json)
        shape = list(data.shape[1:])
        t2 = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        t3 = time.perf_counter()
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, pm, cm, label_manager, properties, return_probabilities=False
        )
        del logits
        t4 = time.perf_counter()
        rw.write_seg(segmentation, str(out), properties)
        t5 = time.perf_counter()
        stages.update(read=t1 - t0, preprocess=t2 - t1, sliding_window=t3 - t2, export=t4 - t3, write=t5 - t4)
        runs.append({"warmup": i < spec["warmup"], "total_s": t5 - t0, "stages_s": stages})
    mirrors = 2 ** len(predictor.allowed_mirroring_axes or ()) if spec["tta"] else 1
    n_tiles = tiles(shape, cm.patch_size, 0.5) if shape else None
    result = {
        "load_s": load_s,
        "runs": runs,
        "peak_rss_MB": lib.peak_rss_mb(),
        "preprocessed_shape": shape,
        "patch_size": list(cm.patch_size),
        "tiles": n_tiles,
        "mirrors": mirrors,
        "forward_passes": None if n_tiles is None else n_tiles * mirrors,
        **_cuda_peaks(device),
    }
    Path(out_file).write_text(json.dumps(result, default=list), encoding="utf-8")


# ================================================================================================================
# 4. running and sampling
# ================================================================================================================


def sampled_run(name: str, command: list[str], env: dict, workdir: Path, timeout: float | None) -> dict[str, Any]:
    """Run a command to the end in its own session with ``samflare profile``'s sampler (every 0.1 s): wall time
    ``time_s``, host memory of its process tree (``MaxRAM_MB``: summed PSS; ``MaxRSS_sum_MB``;
    ``MaxRSS_process_MB``), GPU memory through NVML or nvidia-smi (``MaxGPU_MB``, ``GPU_baseline_MB``, ...)."""
    from nnunet_samflare.evaluation.profile import open_gpu_sampler, run_and_sample

    gpu, gpu_note = open_gpu_sampler(env)
    log = workdir / "logs" / f"{name}.log"
    print(f"[run] {name} ...", flush=True)
    load_before = list(os.getloadavg())
    try:
        record = run_and_sample(command, env=env, log_file=log, timeout_s=timeout, gpu=gpu)
    finally:
        if gpu is not None:
            gpu.close()
    del record["samples"]  # the 0.1 s series; n_samples stays
    gpu_info = gpu.description if gpu is not None else {}
    peak, baseline = record["MaxGPU_MB"], record["GPU_baseline_MB"]
    record.update(
        log=str(log),
        load_average_before=load_before,
        gpu=gpu_info.get("name"),
        gpu_memory_source=gpu_info.get("source"),
        gpu_note=gpu_note,
        gpu_peak_above_baseline_MB=None if peak is None or baseline is None else round(peak - baseline, 1),
    )
    if record["error"] is None and record["exit_code"] != 0:
        record["error"] = f"exit code {record['exit_code']}"
    print(f"[run] {name}: {record['time_s']:.1f} s ({record['error'] or 'ok'})", flush=True)
    return record


def run_worker(name: str, kind: str, spec: dict, env: dict, workdir: Path, timeout: float | None) -> dict[str, Any]:
    result_file = workdir / "logs" / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    shutil.rmtree(spec["output"], ignore_errors=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, json.dumps(spec), str(result_file)]
    record = sampled_run(name, command, env, workdir, timeout)
    if record.get("exit_code") == 0 and result_file.is_file():
        record["result"] = json.loads(result_file.read_text(encoding="utf-8"))
    return record


def run_all(args, workdir: Path, prepared: dict) -> dict[str, dict]:
    models = prepared["models"]
    device = args.device
    threads = args.threads or (os.cpu_count() if device == "cpu" else None)
    env = lib.nnunet_env(workdir, n_proc=threads)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # keep stray CUDA initialisations off the books on CPU runs
    outputs = workdir / "outputs"
    input_file = prepared["input"]
    input_dir = str(Path(input_file).parent)
    dataset = str(args.dataset_id)
    warmup = args.warmup if args.warmup is not None else (1 if device == "cuda" else 0)
    sequential = args.nnunet_workers == "sequential" or (args.nnunet_workers == "auto" and device == "cpu")
    worker_flags = ["-npp", "0", "-nps", "0"] if sequential else []
    runs: dict[str, dict] = {}
    selected = [r for r in args.runs if not (args.skip_tta and r.endswith("-tta"))]
    for name in RUNS:
        if name not in args.runs:
            runs[name] = {"not_run": "not selected"}
            continue
        if name not in selected:
            runs[name] = {"not_run": "--skip-tta"}
            continue
        out = outputs / name
        if name == "samflare-inprocess":
            spec = {
                "device": device, "locator": models["locator"]["folder"], "segmenter": models["segmenter"]["folder"],
                "input": input_file, "output": str(out), "warmup": warmup, "repeats": args.repeats,
            }
            runs[name] = run_worker(name, "samflare", spec, env, workdir, args.timeout)
        elif name == "samflare-cli":
            shutil.rmtree(out, ignore_errors=True)
            command = lib.samflare_command("predict", "-i", input_dir, "-o", out, "-d", dataset, "-f", "0",
                                           "-device", device)
            runs[name] = sampled_run(name, command, env, workdir, args.timeout)
        elif name.startswith("nnunet-cli"):
            shutil.rmtree(out, ignore_errors=True)
            tta_flags = [] if name.endswith("-tta") else ["--disable_tta"]
            command = lib.nnunet_command(
                "nnUNetv2_predict", "-i", input_dir, "-o", out, "-d", dataset, "-c", "3d_fullres", "-f", "0",
                "-device", device, *tta_flags, *worker_flags,
            )
            runs[name] = sampled_run(name, command, env, workdir, args.timeout)
        else:
            spec = {
                "device": device, "folder": models["nnunet"]["folder"], "input": input_file, "output": str(out),
                "tta": name.endswith("-tta"), "warmup": warmup, "repeats": args.repeats,
            }
            runs[name] = run_worker(name, "nnunet", spec, env, workdir, args.timeout)
    return runs


# ================================================================================================================
# 5. report
# ================================================================================================================

SAMFLARE_STAGES = ("read", "preprocess", "locator", "segmenter", "postprocess", "write")


def _status(record: dict) -> str | None:
    """None if the run succeeded, else the text its table cells show."""
    if "not_run" in record:
        return f"not run ({record['not_run']})"
    if record.get("timed_out"):
        return f"not run (timed out after {record['time_s']:.0f} s)"
    if record.get("exit_code") != 0:
        return f"failed (exit code {record.get('exit_code')}, see {Path(record['log']).name})"
    return None


def _timed_runs(record: dict) -> list[dict]:
    result = record.get("result") or {}
    return [r for r in result.get("runs", []) if not r["warmup"]]


def _stage(record: dict, stage: str) -> float | None:
    return lib.median(r["stages_s"].get(stage) for r in _timed_runs(record)) if _timed_runs(record) else None


def summarize(runs: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per pipeline column: stage seconds, totals and memory (None where not measured)."""
    columns: dict[str, dict[str, Any]] = {}
    sam_in, sam_cli = runs["samflare-inprocess"], runs["samflare-cli"]
    sam: dict[str, Any] = {"status_inprocess": _status(sam_in), "status_cli": _status(sam_cli)}
    for stage in SAMFLARE_STAGES:
        sam[stage] = _stage(sam_in, stage)
    sam["network"] = (
        None if sam["locator"] is None else sam["locator"] + (sam["segmenter"] or 0.0)
    )
    sam["total"] = lib.median(r["total_s"] for r in _timed_runs(sam_in)) if _timed_runs(sam_in) else None
    sam["load"] = (sam_in.get("result") or {}).get("load_s")
    sam["cli"] = sam_cli.get("time_s") if sam["status_cli"] is None else None
    _memory(sam, sam_in, sam_cli)
    columns["samflare"] = sam
    for tta in ("notta", "tta"):
        inproc, cli = runs[f"nnunet-inprocess-{tta}"], runs[f"nnunet-cli-{tta}"]
        col: dict[str, Any] = {"status_inprocess": _status(inproc), "status_cli": _status(cli)}
        col["read"] = _stage(inproc, "read")
        col["preprocess"] = _stage(inproc, "preprocess")
        col["locator"] = None
        col["segmenter"] = _stage(inproc, "sliding_window")
        col["network"] = col["segmenter"]
        col["postprocess"] = _stage(inproc, "export")
        col["write"] = _stage(inproc, "write")
        col["total"] = lib.median(r["total_s"] for r in _timed_runs(inproc)) if _timed_runs(inproc) else None
        col["load"] = (inproc.get("result") or {}).get("load_s")
        col["cli"] = cli.get("time_s") if col["status_cli"] is None else None
        _memory(col, inproc, cli)
        columns[f"nnunet-{tta}"] = col
    return columns


def _memory(column: dict, inprocess: dict, cli: dict) -> None:
    ok_in, ok_cli = _status(inprocess) is None, _status(cli) is None
    column["ram_inprocess"] = inprocess.get("MaxRAM_MB") if ok_in else None
    column["ram_cli"] = cli.get("MaxRAM_MB") if ok_cli else None
    column["rss_max_cli"] = cli.get("MaxRSS_process_MB") if ok_cli else None
    column["gpu_torch"] = (inprocess.get("result") or {}).get("torch_max_allocated_MB") if ok_in else None
    column["gpu_nvml_inprocess"] = inprocess.get("gpu_peak_above_baseline_MB") if ok_in else None
    column["gpu_nvml_cli"] = cli.get("gpu_peak_above_baseline_MB") if ok_cli else None


#: (key, label); keys ending in "_cli" come from the CLI run, the others from the in-process run.
ROWS = (
    ("read", "read"),
    ("preprocess", "preprocess (samflare: both phases + ROI crop/resample)"),
    ("locator", "locator network (coarse grid)"),
    ("segmenter", "segmenter / nnU-Net sliding window"),
    ("network", "all network work"),
    ("postprocess", "post-process / nnU-Net export (resample + argmax)"),
    ("write", "write label map"),
    ("total", "total per case, models loaded"),
    ("load", "model loading"),
    ("cli", "CLI end to end (start-up, loading, 1 case)"),
    ("ram_inprocess", "peak host RAM, in-process (MB)"),
    ("ram_cli", "peak host RAM, CLI (MB)"),
    ("rss_max_cli", "largest process RSS, CLI (MB)"),
    ("gpu_torch", "peak GPU torch allocated, in-process (MB)"),
    ("gpu_nvml_inprocess", "peak GPU device-wide, in-process (MB)"),
    ("gpu_nvml_cli", "peak GPU device-wide, CLI (MB)"),
)
CLI_KEYS = ("cli", "ram_cli", "rss_max_cli", "gpu_nvml_cli")


def report(columns: dict[str, dict], runs: dict, prepared: dict, args) -> str:
    sam, notta, tta = columns["samflare"], columns["nnunet-notta"], columns["nnunet-tta"]
    workers = "-npp 0 -nps 0" if (args.nnunet_workers == "sequential" or (
        args.nnunet_workers == "auto" and args.device == "cpu")) else "default workers"
    headers = [
        "stage",
        "samflare",
        "nnU-Net no TTA",
        "nnU-Net TTA (default)",
        "stock/samflare no TTA",
        "stock/samflare TTA",
    ]
    rows = []
    for key, label in ROWS:
        if key.startswith("gpu") and args.device != "cuda":
            continue

        def cell(column, key=key):
            value = column.get(key)
            if value is not None:
                return lib.fmt(value)
            if key == "locator" and column is not sam:
                return "—"
            status = column["status_cli"] if key in CLI_KEYS else column["status_inprocess"]
            return status or "—"

        rows.append(
            [
                label,
                cell(sam),
                cell(notta),
                cell(tta),
                lib.fmt_ratio(lib.ratio(notta.get(key), sam.get(key))),
                lib.fmt_ratio(lib.ratio(tta.get(key), sam.get(key))),
            ]
        )
    lines = [lib.markdown_table(headers, rows), ""]
    models = prepared["models"]
    sam_result = runs["samflare-inprocess"].get("result") or {}
    case = prepared["data"]["cases"][CASE_ID]
    warmups = sum(1 for r in sam_result.get("runs", []) if r["warmup"])
    lines.append(
        f"Case: {case['from']} resampled to {'×'.join(map(str, case['size_xyz']))} (x×y×z) at "
        f"{'×'.join(map(str, case['spacing_xyz']))} mm. Device: {args.device}. nnU-Net CLI: {workers}. "
        f"In-process: median of {args.repeats} timed case(s) after {warmups} warm-up case(s). Settings: each "
        "tool's defaults (samflare: no TTA, uniform tile blending; nnU-Net: Gaussian blending), tile step 0.5, "
        "fold 0, untrained weights."
    )
    nnunet = models["nnunet"]
    expected = expected_nnunet_tiles(case, nnunet)
    mirrors = 2 ** len(nnunet["inference_allowed_mirroring_axes"] or ())
    lines.append(
        f"nnU-Net 3d_fullres: {nnunet['network'].rsplit('.', 1)[-1]}, {nnunet['parameters'] / 1e6:.1f} M params, "
        f"patch {nnunet['patch_size']} at {[round(s, 3) for s in nnunet['spacing']]} mm (plans axis order); "
        + (f"preprocessed {expected[0]} → {expected[1]} tiles, ×{mirrors} forward passes with TTA." if expected else "")
    )
    segmenter = models["segmenter"]
    if sam_result.get("box_zyx"):
        locator = models["locator"]
        lines.append(
            f"samflare: locator {locator['parameters'] / 1e6:.2f} M params at "
            f"{[round(s, 3) for s in locator['spacing']]} mm (plans axis order). "
            f"ROI box (z,y,x) {sam_result['box_shape_zyx']} voxels "
            f"= {sam_result['box_mm_zyx']} mm (ground-truth foreground box: {prepared.get('gt_box_mm_zyx')} mm, "
            f"before the cascade's margin) → {sam_result['roi_shape_at_segmenter_spacing_zyx']} voxels at "
            f"{segmenter['spacing']} mm → {sam_result['segmenter_tiles']} segmenter tiles of "
            f"{segmenter['patch_size']}. Labels in the output: {sam_result.get('foreground_labels')}."
        )
    elif sam_result.get("warning"):
        lines.append(f"samflare: WARNING {sam_result['warning']}")
    lines.append(f"Locator weights: {models['locator'].get('locator_weights')}.")
    lines.append(
        "Times in s. Host RAM: peak of the process tree's summed PSS, sampled every 0.1 s (shared pages counted "
        "once); largest process RSS: the kernel's ru_maxrss (or the largest sample)."
        + (" GPU device-wide: NVML (or nvidia-smi), above the level before the run." if args.device == "cuda" else "")
    )
    notes = {r.get("gpu_note") for r in runs.values() if r.get("gpu_note")}
    if args.device == "cuda" and notes:
        lines.append(f"GPU memory: {'; '.join(sorted(notes))}.")
    lines.append("Ratios: stock ÷ samflare (> 1: samflare is faster / smaller).")
    return "\n".join(lines)


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


# ================================================================================================================
# main
# ================================================================================================================


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=lib.DEFAULT_DATASET,
                   help="raw nnU-Net dataset holding the CTs (default: %(default)s)")
    p.add_argument("--case", default="TSEX_0001", help="the benchmark CT (default: %(default)s)")
    p.add_argument("--second-case", default="TSEX_0002", help="second case for planning (default: %(default)s)")
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 215], metavar=("X", "Y", "Z"))
    p.add_argument("--dataset-id", type=int, default=990)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--segmenter-patch", type=int, nargs=3, metavar=("Z", "Y", "X"), help="default: 96 96 96")
    p.add_argument("--segmenter-spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="default: 2 1.5 1.5")
    p.add_argument("--locator-patch", type=int, nargs=3, metavar=("Z", "Y", "X"), help="default: 128 128 128")
    p.add_argument("--locator", choices=("fit", "all"), default="fit",
                   help="fit: fit the untrained locator to the case (realistic ROI); all: ROI = whole scan")
    p.add_argument("--locator-fit-steps", type=int, default=100)
    p.add_argument("--runs", nargs="+", choices=RUNS, default=DEFAULT_RUNS, help="default: all but "
                   "nnunet-inprocess-tta")
    p.add_argument("--skip-tta", action="store_true", help="skip the stock TTA runs (hours on a 2-core CPU)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per run (default: %(default)s)")
    p.add_argument("--nnunet-workers", choices=("auto", "sequential", "default"), default="auto",
                   help="auto: -npp 0 -nps 0 on CPU, nnU-Net's default pools on CUDA")
    p.add_argument("--threads", type=int, help="CPU threads for prediction (nnUNet_def_n_proc); default: all cores")
    p.add_argument("--repeats", type=int, default=1, help="timed cases per in-process run")
    p.add_argument("--warmup", type=int, help="untimed cases first, in-process (default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--workdir", type=Path, help="working folder (kept); default: a temporary one (removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    p.add_argument("--reuse", action="store_true", help="reuse data and models already prepared in --workdir")
    p.add_argument("--json", type=Path, help="write all numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="samflare-bench-cascade-")) if owned else args.workdir.resolve()
    if workdir == lib.REPO or lib.REPO in workdir.parents:
        raise SystemExit(f"--workdir {workdir} is inside the repository; choose a folder outside it")
    workdir.mkdir(parents=True, exist_ok=True)
    # Set before anything imports nnunetv2 (nnunetv2.paths reads them once).
    os.environ.update({k: v for k, v in lib.nnunet_env(workdir).items() if k.startswith("nnUNet_")})
    start = time.perf_counter()
    busy = lib.busy_warning()
    if busy:
        print(busy, flush=True)
    try:
        prepared = prepare(args, workdir)
        prepared["gt_box_mm_zyx"] = ground_truth_box_mm(prepared["label"])
        runs = run_all(args, workdir, prepared)
        columns = summarize(runs)
        table = report(columns, runs, prepared, args) + (f"\n{busy}" if busy else "")
        info = lib.environment_info(args.device)  # after the runs: CUDA is never initialised in this process before
        print()
        print(lib.describe_environment(info))
        print(table)
        if args.json:
            lib.write_json(
                args.json,
                {
                    "benchmark": "bench_cascade",
                    "environment": info,
                    "settings": vars(args),
                    "prepared": prepared,
                    "runs": runs,
                    "columns": columns,
                    "table": table,
                    "wall_s": time.perf_counter() - start,
                },
            )
            print(f"\nwritten: {args.json}")
        failed = [n for n, r in runs.items() if "not_run" not in r and not r.get("timed_out") and r["exit_code"] != 0]
        return 1 if failed else 0
    finally:
        if owned and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif owned:
            print(f"working folder kept: {workdir}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_worker":
        kind, payload, out = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
        if kind == "make-models":
            make_models_worker(payload, out)
        elif kind == "samflare":
            samflare_worker(payload, out)
        elif kind == "nnunet":
            nnunet_worker(payload, out)
        else:
            raise SystemExit(f"unknown worker {kind!r}")
        sys.exit(0)
    sys.exit(main())
