"""Running the cascade benchmarks' measurements, each in its own process, with ``samflare profile``'s sampler.

:func:`sampled_run` runs any command and samples its process tree's host memory (and GPU memory) every 0.1 s;
:func:`run_worker` runs one of ``_cascade_workers.py``'s workers that way; :func:`run_all` runs the selected
pipelines of ``bench_cascade.py`` on the prepared case.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import _benchlib as lib
from _cascade_workers import worker_command

RUNS = (
    "samflare-inprocess",
    "samflare-cli",
    "nnunet-cli-notta",
    "nnunet-inprocess-notta",
    "nnunet-cli-tta",
    "nnunet-inprocess-tta",
)
DEFAULT_RUNS = [r for r in RUNS if r != "nnunet-inprocess-tta"]


def sampled_run(
    name: str, command: list[str], env: dict, workdir: Path, timeout: float | None, interval: float = 0.1
) -> dict[str, Any]:
    """Run a command to the end in its own session with ``samflare profile``'s sampler (every ``interval`` s):
    wall time ``time_s``, host memory of its process tree (``MaxRAM_MB``: summed PSS; ``MaxRSS_sum_MB``;
    ``MaxRSS_process_MB``), GPU memory through NVML or nvidia-smi (``MaxGPU_MB``, ``GPU_baseline_MB``, ...).

    Sampling is not free: reading a torch process's ``smaps_rollup`` ten times a second took ~40 % of a core here,
    which on 2 cores slows a 2-thread network by far more than 20 %. Time with a long ``interval`` (the wall time
    stays exact: the wait ends when the process does), measure memory with a short one."""
    from nnunet_samflare.evaluation.profile import open_gpu_sampler, run_and_sample

    gpu, gpu_note = open_gpu_sampler(env)
    log = workdir / "logs" / f"{name}.log"
    print(f"[run] {name} ...", flush=True)
    load_before = list(os.getloadavg())
    try:
        record = run_and_sample(command, env=env, log_file=log, timeout_s=timeout, gpu=gpu, interval=interval)
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


def run_worker(
    name: str, kind: str, spec: dict, env: dict, workdir: Path, timeout: float | None, interval: float = 0.1
) -> dict[str, Any]:
    result_file = workdir / "logs" / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    shutil.rmtree(spec["output"], ignore_errors=True)
    command = worker_command(kind, spec, result_file)
    record = sampled_run(name, command, env, workdir, timeout, interval)
    if record.get("exit_code") == 0 and result_file.is_file():
        record["result"] = json.loads(result_file.read_text(encoding="utf-8"))
    return record


def run_all(args, workdir: Path, prepared: dict) -> dict[str, dict]:
    from nnunet_samflare.inference.api import FAST_OPTIONS

    models = prepared["models"]
    device = args.device
    threads = args.threads or (os.cpu_count() if device == "cpu" else None)
    env = lib.nnunet_env(workdir, n_proc=threads)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # keep stray CUDA initialisations off the books on CPU runs
    interval = getattr(args, "sample_interval", 0.1)
    sam_env = env
    if getattr(args, "source", None):
        # The samflare side from another source tree (a baseline checkout), its package and trainer shim first;
        # the editable install's start-up hook would otherwise add this tree's shim.
        source = Path(args.source).resolve()
        sam_env = dict(
            env,
            PYTHONPATH=os.pathsep.join([str(source), env.get("PYTHONPATH", "")]),
            nnUNet_extTrainer=str(source / "trainers"),
            SAMFLARE_NO_AUTOREGISTER="1",
        )
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
                "device": device,
                "locator": models["locator"]["folder"],
                "segmenter": models["segmenter"]["folder"],
                "input": input_file,
                "output": str(out),
                "warmup": warmup,
                "repeats": args.repeats,
                "predictor_options": {
                    "fast_layers": args.fast_layers == "on",
                    **{option: args.fast for option in FAST_OPTIONS},
                },
            }
            runs[name] = run_worker(name, "samflare", spec, sam_env, workdir, args.timeout, interval)
        elif name == "samflare-cli":
            shutil.rmtree(out, ignore_errors=True)
            command = lib.samflare_command(
                "predict",
                "-i",
                input_dir,
                "-o",
                out,
                "-d",
                dataset,
                "-f",
                "0",
                "-device",
                device,
                *(["--fast"] if args.fast else []),
            )
            runs[name] = sampled_run(name, command, sam_env, workdir, args.timeout, interval)
        elif name.startswith("nnunet-cli"):
            shutil.rmtree(out, ignore_errors=True)
            tta_flags = [] if name.endswith("-tta") else ["--disable_tta"]
            # fmt: off
            command = lib.nnunet_command(
                "nnUNetv2_predict", "-i", input_dir, "-o", out, "-d", dataset, "-c", "3d_fullres", "-f", "0",
                "-device", device, *tta_flags, *worker_flags,
            )
            # fmt: on
            runs[name] = sampled_run(name, command, env, workdir, args.timeout, interval)
        else:
            spec = {
                "device": device,
                "folder": models["nnunet"]["folder"],
                "input": input_file,
                "output": str(out),
                "tta": name.endswith("-tta"),
                "warmup": warmup,
                "repeats": args.repeats,
            }
            runs[name] = run_worker(name, "nnunet", spec, env, workdir, args.timeout, interval)
    return runs
