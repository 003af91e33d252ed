"""The measuring processes of the cascade benchmarks: ``python _cascade_workers.py --_worker KIND PAYLOAD OUT``.

* ``samflare``: ``build_predictor`` once, then ``predict_case_to_files`` per case with per-stage timings;
* ``nnunet``: the steps of ``nnUNetPredictor.predict_from_files_sequential`` timed one by one;
* ``nnunet-preprocess``: nnU-Net's preprocessing of the case alone (the least memory stock ``nnUNetv2_predict``
  needs for it);
* ``make-models``, ``fit-segmenter``: the model folders (``_cascade_models.py``).

Each writes its result as JSON to OUT; the caller samples the process's memory from outside (``_cascade_runs``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import _benchlib as lib
from _cascade_case import CASE_ID, tiles


def worker_command(kind: str, payload: dict, out_file: Path) -> list[str]:
    """The command line that runs worker ``kind`` in a fresh interpreter."""
    return [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, json.dumps(payload), str(out_file)]


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


def _known_options(function, options: dict) -> dict:
    """``options`` that ``function`` accepts; the others must be off (a baseline tree may not know a new option)."""
    import inspect

    accepted = inspect.signature(function).parameters
    unknown = {k: v for k, v in options.items() if k not in accepted and v}
    if unknown:
        raise SystemExit(f"this source tree's build_predictor does not take {sorted(unknown)}")
    return {k: v for k, v in options.items() if k in accepted}


def samflare_worker(spec: dict, out_file: Path) -> None:
    import torch

    from nnunet_samflare.inference.api import build_predictor, predict_case_to_files
    from nnunet_samflare.inference.cascade import resample_shape

    # inference.io exists in every tree (it re-exports nnunet_samflare.io now); a baseline tree (--source) from
    # before nnunet_samflare.io would otherwise get this tree's Case class through the editable install's finder.
    from nnunet_samflare.inference.io import find_cases

    device = torch.device(spec["device"])
    start = time.perf_counter()
    predictor = build_predictor(
        locator=spec["locator"],
        segmenter=spec["segmenter"],
        folds=[0],
        device=spec["device"],
        tta=False,
        **_known_options(build_predictor, spec.get("predictor_options") or {}),
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


def nnunet_preprocess_worker(spec: dict, out_file: Path) -> None:
    """nnU-Net's reading and preprocessing of ``spec["input"]`` for the model folder ``spec["folder"]``, timed."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(spec["folder"])
    plans_manager = PlansManager(load_json(str(folder / "plans.json")))
    configuration = plans_manager.get_configuration(spec.get("configuration", "3d_fullres"))
    start = time.perf_counter()
    data, _, properties = configuration.preprocessor_class(verbose=False).run_case(
        [spec["input"]], None, plans_manager, configuration, load_json(str(folder / "dataset.json"))
    )
    result = {
        "preprocess_s": time.perf_counter() - start,
        "preprocessed_shape": list(data.shape),
        "peak_rss_MB": lib.peak_rss_mb(),
    }
    Path(out_file).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "--_worker":
        raise SystemExit(__doc__)
    kind, payload, out = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
    if kind == "make-models":
        from _cascade_models import make_models_worker

        make_models_worker(payload, out)
    elif kind == "fit-segmenter":
        from _cascade_models import fit_segmenter_worker

        fit_segmenter_worker(payload, out)
    elif kind == "nnunet-preprocess":
        nnunet_preprocess_worker(payload, out)
    elif kind == "samflare":
        samflare_worker(payload, out)
    elif kind == "nnunet":
        nnunet_worker(payload, out)
    else:
        raise SystemExit(f"unknown worker {kind!r}")
