"""Per-case cost of a pseudo-label round on one 512×512×215 CT (15 classes), beside plain nnU-Net.

The case and its untrained models are those of ``bench_cascade.py`` (``_cascade_case.prepare``: TSEX_0001
resampled to 512×512×215, the paper's segmenter plans, the locator fitted to the scan's foreground so that the ROI
is realistic); ``--workdir DIR --reuse`` takes them from an earlier cascade benchmark. Every step runs in its own
process, so that its peak memory (``VmHWM``) is its own:

* **pool prediction**: ``predict_case_to_files`` (what ``samflare predict`` runs per case) without and with
  ``--save_probabilities`` (full-size 15-class float32 ``.npz``: what every round writes per case and fold);
  with ``--nnunet-pool`` also stock nnU-Net (``3d_fullres``, ``predict_from_files_sequential``, no TTA, with
  probabilities), about 30 min on 2 cores, so off by default;
* **vote** of two folds: ``samflare pseudolabel vote``'s streaming vote against nnU-Net's own ensembling
  (``nnunetv2.ensembling.ensemble.merge_files``, which loads every fold's array whole), both writing the label map
  and the averaged probabilities. The second fold is the first one shifted by 3 voxels along x (so that the two
  differ where the organs' borders are), written at numpy's compression level like a real prediction;
* **filter**: the paper's post-processing + confidence 0.9 → ignore label, against nnU-Net's own post-processing
  (largest component of each organ label, ``remove_all_but_largest_component_from_segmentation``; nnU-Net has no
  confidence step);
* **merge** with the (resampled) ground truth as a liver + aorta partially labelled case; nnU-Net has no merge.

Usage::

    python benchmarks/bench_pseudolabel.py --workdir /tmp/samflare-bench --reuse --json pseudolabel_cpu.json

Ratios are nnU-Net / samflare (> 1: samflare is faster or smaller). "not run" cells are never estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _benchlib as lib
from _cascade_case import CASE_ID, add_case_arguments, case_workdir, preparation_config, prepare

CONFIDENCE = 0.9
SHIFT_VOXELS = 3


# -- workers (each in its own process) ---------------------------------------------------------------------------


def _worker_predict(config: dict) -> dict:
    import torch

    from nnunet_samflare.inference.api import build_predictor, predict_case_to_files
    from nnunet_samflare.io import find_cases

    torch.set_num_threads(config["threads"])
    start = time.perf_counter()
    predictor = build_predictor(
        locator=config["locator"], segmenter=config["segmenter"], device="cpu", postprocess=False
    )
    load_s = time.perf_counter() - start
    rss_before = lib.current_rss_mb()
    case = find_cases(config["input"])[0]
    target = Path(config["out_dir"]) / f"{CASE_ID}.nii.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prediction = predict_case_to_files(predictor, case, target, save_probabilities=config["save_probabilities"])
    total = time.perf_counter() - start
    npz = target.with_name(f"{CASE_ID}.npz")
    return {
        "time_s": total,
        "load_s": load_s,
        "stages_s": prediction.timings,
        "rss_before_MB": rss_before,
        "npz_MB": npz.stat().st_size / lib.MIB if npz.is_file() else None,
    }


def _worker_shift_fold(config: dict) -> dict:
    """Fold 1 = fold 0 shifted along x, written channel by channel at numpy's default zlib level (6)."""
    import shutil

    import numpy as np

    from nnunet_samflare.pseudolabel.probabilities import ProbabilityReader, write_probabilities

    source = Path(config["fold_0"])
    target = Path(config["fold_1"])
    target.parent.mkdir(parents=True, exist_ok=True)
    reader = ProbabilityReader(source)
    start = time.perf_counter()
    write_probabilities(
        target, reader.shape, (np.roll(c, SHIFT_VOXELS, axis=2) for c in reader.channels()), compress_level=6
    )
    shutil.copyfile(source.with_suffix(".pkl"), target.with_suffix(".pkl"))
    return {"time_s": time.perf_counter() - start, "rss_before_MB": 0.0}


def _worker_vote_samflare(config: dict) -> dict:
    from nnunet_samflare.pseudolabel.vote import vote_case

    rss_before = lib.current_rss_mb()
    start = time.perf_counter()
    vote_case(config["folds"], config["out_dir"], CASE_ID, ".nii.gz")
    return {"time_s": time.perf_counter() - start, "rss_before_MB": rss_before}


def _worker_vote_nnunet(config: dict) -> dict:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.ensembling.ensemble import merge_files
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model = Path(config["segmenter"])
    label_manager = PlansManager(load_json(str(model / "plans.json"))).get_label_manager(
        load_json(str(model / "dataset.json"))
    )
    Path(config["out_dir"]).mkdir(parents=True, exist_ok=True)
    rss_before = lib.current_rss_mb()
    start = time.perf_counter()
    merge_files(
        [str(f) for f in config["folds"]],
        str(Path(config["out_dir"]) / CASE_ID),
        ".nii.gz",
        SimpleITKIO(),
        label_manager,
        save_probabilities=True,
    )
    return {"time_s": time.perf_counter() - start, "rss_before_MB": rss_before}


def _worker_filter_samflare(config: dict) -> dict:
    from nnunet_samflare.pseudolabel.filtering import filter_case

    voted = Path(config["voted"])
    rss_before = lib.current_rss_mb()
    start = time.perf_counter()
    record = filter_case(
        voted / f"{CASE_ID}.nii.gz",
        voted / f"{CASE_ID}.npz",
        Path(config["out_dir"]) / f"{CASE_ID}.nii.gz",
        CONFIDENCE,
        15,
    )
    return {
        "time_s": time.perf_counter() - start,
        "rss_before_MB": rss_before,
        "ignored_voxels": sum(record["ignored"].values()),
    }


def _worker_postprocess_nnunet(config: dict) -> dict:
    import SimpleITK as sitk
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    from nnunet_samflare.labels import ORGAN_LABELS

    rss_before = lib.current_rss_mb()
    start = time.perf_counter()
    image = sitk.ReadImage(str(Path(config["voted"]) / f"{CASE_ID}.nii.gz"))
    seg = sitk.GetArrayFromImage(image)
    for label in ORGAN_LABELS:  # as nnU-Net's determine_postprocessing applies it: one label at a time
        seg = remove_all_but_largest_component_from_segmentation(seg, [label])
    result = sitk.GetImageFromArray(seg)
    result.CopyInformation(image)
    Path(config["out_dir"]).mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(result, str(Path(config["out_dir"]) / f"{CASE_ID}.nii.gz"))
    return {"time_s": time.perf_counter() - start, "rss_before_MB": rss_before}


def _worker_merge_samflare(config: dict) -> dict:
    from nnunet_samflare.pseudolabel.merge import merge_case

    rss_before = lib.current_rss_mb()
    start = time.perf_counter()
    record = merge_case(
        config["label"],
        Path(config["filtered"]) / f"{CASE_ID}.nii.gz",
        {1, 5},
        Path(config["out_dir"]) / f"{CASE_ID}.nii.gz",
    )
    return {"time_s": time.perf_counter() - start, "rss_before_MB": rss_before, "record": record}


def _worker_predict_nnunet(config: dict) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(config["threads"])
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(config["nnunet"], (0,), "checkpoint_final.pth")
    rss_before = lib.current_rss_mb()
    start = time.perf_counter()
    predictor.predict_from_files_sequential(
        [[config["input"]]],
        config["out_dir"],
        save_probabilities=True,
        overwrite=True,
        folder_with_segs_from_prev_stage=None,
    )
    return {"time_s": time.perf_counter() - start, "rss_before_MB": rss_before}


WORKERS = {
    "predict": _worker_predict,
    "shift-fold": _worker_shift_fold,
    "vote-samflare": _worker_vote_samflare,
    "vote-nnunet": _worker_vote_nnunet,
    "filter-samflare": _worker_filter_samflare,
    "postprocess-nnunet": _worker_postprocess_nnunet,
    "merge-samflare": _worker_merge_samflare,
    "predict-nnunet": _worker_predict_nnunet,
}


def run_worker(name: str, config: dict, env: dict, folder: Path) -> dict:
    """``name`` in a fresh process; adds its wall time and peak RSS (VmHWM)."""
    out = folder / "logs" / f"{name}-{config.get('tag', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    args = [sys.executable, str(Path(__file__).resolve()), "--_worker", name, json.dumps(config), str(out)]
    print(f"[run] {name} {config.get('tag', '')} ...", flush=True)
    start = time.perf_counter()
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0 or not out.is_file():
        print(result.stdout[-2000:], result.stderr[-3000:], file=sys.stderr)
        return {"failed": result.returncode, "wall_s": wall}
    record = json.loads(out.read_text(encoding="utf-8"))
    record["process_wall_s"] = wall
    print(f"[run] {name}: {record['time_s']:.1f} s, peak {record['peak_MB']:.0f} MB", flush=True)
    return record


def _worker_main(name: str, config_json: str, out: str) -> None:
    record = WORKERS[name](json.loads(config_json))
    record["peak_MB"] = lib.peak_rss_mb()
    lib.write_json(out, record)


# -- the table ---------------------------------------------------------------------------------------------------


def _cell(record: dict | None, key: str):
    if record is None:
        return "not run"
    if "failed" in record:
        return "failed"
    return record.get(key)


def report(runs: dict[str, dict | None]) -> str:
    rows = []
    for label, ours, theirs in (
        ("pool prediction, label map only", "predict", None),
        ("pool prediction with probabilities (.npz)", "predict-probabilities", "predict-nnunet"),
        ("vote of 2 folds (label map + averaged .npz)", "vote-samflare", "vote-nnunet"),
        (f"filter: post-processing + confidence {CONFIDENCE}", "filter-samflare", None),
        ("post-processing alone (nnU-Net: largest component per organ)", None, "postprocess-nnunet"),
        ("merge with partial ground truth (liver + aorta)", "merge-samflare", None),
    ):
        a = runs.get(ours) if ours else None
        b = runs.get(theirs) if theirs else None
        time_a, time_b = _cell(a, "time_s"), _cell(b, "time_s")
        peak_a, peak_b = _cell(a, "peak_MB"), _cell(b, "peak_MB")
        numbers = [isinstance(v, float) for v in (time_a, time_b, peak_a, peak_b)]
        rows.append(
            [
                label,
                time_a if ours else "—",
                peak_a if ours else "—",
                time_b if theirs else "no counterpart",
                peak_b if theirs else "—",
                lib.fmt_ratio(lib.ratio(time_b, time_a)) if numbers[0] and numbers[1] else "—",
                lib.fmt_ratio(lib.ratio(peak_b, peak_a)) if numbers[2] and numbers[3] else "—",
            ]
        )
    table = lib.markdown_table(
        [
            "per case, 512×512×215, 15 classes",
            "samflare s",
            "samflare peak MB",
            "nnU-Net s",
            "nnU-Net peak MB",
            "time nnU-Net ÷ samflare",
            "memory nnU-Net ÷ samflare",
        ],
        rows,
    )
    npz = (runs.get("predict-probabilities") or {}).get("npz_MB")
    return table + (f"\n\n.npz of one case and fold: {npz:.0f} MB" if npz else "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_arguments(p)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the prediction runs")
    p.add_argument(
        "--nnunet-pool",
        action="store_true",
        help="also stock nnU-Net's prediction with probabilities (3d_fullres, ~30 min on 2 cores)",
    )
    p.add_argument("--json", type=Path, help="write all figures here")
    p.add_argument("--out", type=Path, help="where the runs write (default: <workdir>/pseudolabel_bench)")
    p.add_argument(
        "--reuse-only",
        action="store_true",
        help="use the case and models prepared in --workdir as they are; never prepare (or re-prepare) "
        "them there, e.g. in another benchmark's working folder",
    )
    p.add_argument("--_worker", nargs=3, metavar=("NAME", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        _worker_main(*args._worker)
        return 0
    warning = lib.busy_warning()
    if warning:
        print(warning, flush=True)
    with case_workdir(args) as workdir:
        if args.reuse_only:
            marker = workdir / "prepared.json"
            if not marker.is_file() or json.loads(marker.read_text(encoding="utf-8")).get(
                "config"
            ) != preparation_config(args):
                raise SystemExit(f"--reuse-only: {marker} is missing or was prepared with other settings")
            args.reuse = True
        prepared = prepare(args, workdir)
        info = lib.environment_info("cpu")
        env = lib.nnunet_env(workdir, n_proc=args.threads)
        out = (args.out or workdir / "pseudolabel_bench").resolve()
        models = prepared["models"]
        base = {
            "locator": models["locator"]["folder"],
            "segmenter": models["segmenter"]["folder"],
            "input": prepared["input"],
            "threads": args.threads,
        }
        fold_0 = out / "fold_0" / f"{CASE_ID}.npz"
        fold_1 = out / "fold_1" / f"{CASE_ID}.npz"
        runs: dict[str, dict | None] = {}
        runs["predict"] = run_worker(
            "predict",
            {**base, "tag": "labels", "out_dir": str(out / "labels_only"), "save_probabilities": False},
            env,
            out,
        )
        runs["predict-probabilities"] = run_worker(
            "predict",
            {**base, "tag": "probabilities", "out_dir": str(fold_0.parent), "save_probabilities": True},
            env,
            out,
        )
        runs["shift-fold"] = run_worker("shift-fold", {"fold_0": str(fold_0), "fold_1": str(fold_1)}, env, out)
        folds = [str(fold_0), str(fold_1)]
        runs["vote-samflare"] = run_worker("vote-samflare", {"folds": folds, "out_dir": str(out / "voted")}, env, out)
        runs["vote-nnunet"] = run_worker(
            "vote-nnunet",
            {"folds": folds, "out_dir": str(out / "voted_nnunet"), "segmenter": base["segmenter"]},
            env,
            out,
        )
        runs["filter-samflare"] = run_worker(
            "filter-samflare", {"voted": str(out / "voted"), "out_dir": str(out / "filtered")}, env, out
        )
        runs["postprocess-nnunet"] = run_worker(
            "postprocess-nnunet", {"voted": str(out / "voted"), "out_dir": str(out / "pp_nnunet")}, env, out
        )
        runs["merge-samflare"] = run_worker(
            "merge-samflare",
            {"label": prepared["label"], "filtered": str(out / "filtered"), "out_dir": str(out / "merged")},
            env,
            out,
        )
        runs["predict-nnunet"] = None
        if args.nnunet_pool:
            runs["predict-nnunet"] = run_worker(
                "predict-nnunet",
                {**base, "nnunet": models["nnunet"]["folder"], "out_dir": str(out / "nnunet_pool")},
                env,
                out,
            )
        print()
        print(lib.describe_environment(info))
        print(report(runs))
        if args.json:
            lib.write_json(args.json, {"environment": info, "runs": runs, "preparation": prepared})
    return 0


if __name__ == "__main__":
    sys.exit(main())
