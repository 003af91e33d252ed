"""One 512×512×215 CT through ``samflare predict`` and through stock ``nnUNetv2_predict`` 3d_fullres, same run.

What it does (everything under ``--workdir``, a temporary folder by default; nothing is written into the repo):

1. **Data.** The real CT ``--case`` (default TSEX_0001 of the package's example dataset
   ``nnunet_samflare/example_data/flare_like``, 122×101×112 at 3 mm) is resampled with SimpleITK to ``--size``
   (default 512×512×215, x×y×z) over the same physical extent (spacing = extent / size; voxel centres
   re-aligned), linear interpolation for the image (int16 HU), nearest neighbour for the labels. A second case
   (``--second-case``, default TSEX_0002, a 30-slice crop of the same scan) is resampled to the same spacing, so
   that nnU-Net's fingerprint and plans see two labelled cases. They form the raw dataset
   ``Dataset<ID>_SamflareBench``; the benchmark input is the resampled ``--case``.
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

Files: ``_cascade_case.py`` (steps 1-2 and the options of the case), ``_cascade_models.py`` (step 3),
``_cascade_workers.py`` (the measuring processes), ``_cascade_runs.py`` (step 4); this file: the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import _benchlib as lib
from _cascade_case import (
    CASE_ID,
    add_case_arguments,
    case_workdir,
    expected_nnunet_tiles,
    ground_truth_box_mm,
    prepare,
)
from _cascade_runs import DEFAULT_RUNS, RUNS, run_all

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
    sam["network"] = None if sam["locator"] is None else sam["locator"] + (sam["segmenter"] or 0.0)
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
    workers = (
        "-npp 0 -nps 0"
        if (args.nnunet_workers == "sequential" or (args.nnunet_workers == "auto" and args.device == "cpu"))
        else "default workers"
    )
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
        + (" samflare with --fast (segmenter channels-last, bfloat16 on a CPU that has it)." if args.fast else "")
        + (" samflare with the fast layers on." if args.fast_layers == "on" else "")
        + (f" samflare from the source tree {args.source}." if args.source else "")
        + f" Memory sampled every {args.sample_interval:g} s."
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_case_arguments(p)
    p.add_argument(
        "--runs", nargs="+", choices=RUNS, default=DEFAULT_RUNS, help="default: all but nnunet-inprocess-tta"
    )
    p.add_argument("--skip-tta", action="store_true", help="skip the stock TTA runs (hours on a 2-core CPU)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per run (default: %(default)s)")
    p.add_argument(
        "--nnunet-workers",
        choices=("auto", "sequential", "default"),
        default="auto",
        help="auto: -npp 0 -nps 0 on CPU, nnU-Net's default pools on CUDA",
    )
    p.add_argument(
        "--source",
        type=Path,
        help="run the samflare side from this source tree (e.g. a baseline checkout) instead of this repository",
    )
    p.add_argument(
        "--sample-interval",
        type=float,
        default=0.1,
        help="seconds between memory samples (default 0.1; sampling costs CPU: use e.g. 5 for timings)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="samflare runs with --fast (the segmenter in channels-last memory format, CPU bfloat16 autocast)",
    )
    p.add_argument(
        "--fast-layers",
        choices=("on", "off"),
        default="off",
        help="samflare in-process: the segmenter's fast layers (networks.fast_paths; default: off, the package's)",
    )
    p.add_argument("--threads", type=int, help="CPU threads for prediction (nnUNet_def_n_proc); default: all cores")
    p.add_argument("--repeats", type=int, default=1, help="timed cases per in-process run")
    p.add_argument("--warmup", type=int, help="untimed cases first, in-process (default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--json", type=Path, help="write all numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    busy = lib.announce_busy()
    with case_workdir(args) as workdir:
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


if __name__ == "__main__":
    sys.exit(main())
