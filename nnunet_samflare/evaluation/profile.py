"""Efficiency profiling with the FLARE protocol: one fresh process per case, memory sampled every 0.1 s.

FLARE23 ran each case in a new container, so its time includes start-up, imports, model loading, I/O and
pre/post-processing; GPU memory was read device-wide every 0.1 s. Per case we report, as the paper's Table 4
does, the wall time (``time_s``), ``MaxGPU_MB`` (the largest device-wide sample) and ``AUC_GPU_Time_MBs`` (the
sum of the device-wide samples × the nominal interval), and in addition:

* ``MaxGPU_own_MB``: the largest GPU memory of the process tree itself (NVML's per-process accounting);
* ``MaxRAM_MB``: the largest host RAM of the process tree, the peak over the samples of the tree's summed
  **PSS** (proportional set size: a page shared by n processes counts 1/n in each, so shared pages count once
  in the sum; summed RSS would count the copy-on-write pages of forked workers again, and nnU-Net forks). A
  process whose PSS cannot be read (no ``/proc/<pid>/smaps_rollup``: not Linux, a kernel before 4.14, another
  user's process) counts with its RSS; ``RAM_measure`` says which was used;
* ``MaxRSS_process_MB``: the largest sampled RSS of a single process of the tree (not the kernel's ``ru_maxrss``:
  Linux carries the parent's high-water mark into a forked-then-exec'ed child, so a large parent inflates it);
* ``MaxRSS_sum_MB``: the peak of the tree's summed RSS (what ``top`` adds up; an over-count, for comparison);
* the exit code.

MB means MiB, as in nvidia-smi. GPU memory comes from NVML through ``pynvml`` (nvidia-ml-py) or, where that is
not importable or cannot open the GPU, from a running ``nvidia-smi -lms`` stream (device-wide only, so
``MaxGPU_own_MB`` is then None). Without either, or without a visible GPU, the GPU figures are None and the
result carries a note saying why.

Each case runs ``nnunet_samflare.predict`` in a fresh interpreter (:func:`predict_command`). The parts live in
their own modules: :mod:`.gpu_memory` (NVML / nvidia-smi), :mod:`.host_memory` (PSS, process trees),
:mod:`.sampling` (:func:`run_and_sample`, which the benchmarks use too) and :mod:`.profile_report` (CSV, table,
plots); their public names are importable from here as well.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nnunet_samflare.errors import InputError
from nnunet_samflare.evaluation.gpu_memory import (  # noqa: F401  (public names, importable from here)
    MIB,
    SAMPLE_INTERVAL_S,
    GpuSampler,
    NvmlSampler,
    SmiSampler,
    open_gpu_sampler,
    visible_gpu,
)
from nnunet_samflare.evaluation.host_memory import process_memory_mb  # noqa: F401
from nnunet_samflare.evaluation.profile_report import (  # noqa: F401
    CSV_COLUMNS,
    format_case_line,
    format_profile_table,
    plot_case,
    summarize_records,
    write_profile_csv,
)
from nnunet_samflare.evaluation.sampling import FIGURE_DEFINITIONS, FIGURES, run_and_sample  # noqa: F401
from nnunet_samflare.io import Case, find_cases, read_header, write_json_atomic

#: What each fresh interpreter runs: the library's ``predict`` on one case, reporting errors as the CLI does
#: (one line and exit code 2 for bad input, 3 for out of memory, a traceback for a bug).
PREDICT_ONE_CASE = """
import json, sys
from nnunet_samflare.errors import report
from nnunet_samflare.inference.api import predict
spec = json.loads(sys.argv[1])
try:
    predict(spec["input"], spec["output"], progress=False, **spec["options"])
except Exception as error:
    code = report(error, "samflare profile (case)")
    if code is None:
        raise
    sys.exit(code)
"""

CommandBuilder = Callable[[Case, Path, Mapping[str, Any]], list[str]]


def predict_command(case: Case, output_dir: Path, predict_options: Mapping[str, Any] | None = None) -> list[str]:
    """The command that segments one case in a fresh interpreter (the only place it is built):
    ``nnunet_samflare.predict(<case>, output_dir, **predict_options)``."""
    spec = {"input": str(case_input(case)), "output": str(output_dir), "options": dict(predict_options or {})}
    return [sys.executable, "-c", PREDICT_ONE_CASE, json.dumps(spec)]


def case_input(case: Case) -> Path:
    """What to hand ``predict`` for one case: its image file, or its DICOM series folder."""
    return case.source


def profile_cases_of(images: str | Path) -> list[Case]:
    """The cases ``predict`` would find in ``images`` (same discovery), each runnable on its own: one image file
    or one DICOM series folder. Multi-channel cases and folders holding several series are refused."""
    cases = find_cases(images)
    for case in cases:
        if len(case.files) > 1 and not case.is_dicom:
            raise InputError(
                case.source,
                f"case {case.case_id} has several channel files; profile runs "
                "single-channel (CT) cases, one image file per process",
            )
        if case.is_dicom and sum(c.source == case.source for c in cases) > 1:
            raise InputError(
                case.source,
                "several DICOM series in one folder; profile runs one series per "
                "process: give each series its own folder",
            )
    return cases


def profile_cases(
    images: str | Path,
    output_dir: str | Path,
    predict_options: Mapping[str, Any] | None = None,
    *,
    report_dir: str | Path | None = None,
    interval: float = SAMPLE_INTERVAL_S,
    timeout_s: float | None = None,
    command_builder: CommandBuilder | None = None,
    gpu: GpuSampler | str | None = "auto",
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    extra_args: list[str] | None = None,
) -> dict[str, Any]:
    """Profile every case of ``images`` in its own process; write ``profile.json``, ``profile.csv``,
    ``profile_<case>.png`` and ``logs/<case>.log`` to ``report_dir`` (default ``output_dir``).

    ``predict_options`` are the keyword arguments of ``nnunet_samflare.predict`` (``dataset``, ``locator``,
    ``device``, ...). ``command_builder(case, output_dir, predict_options)`` makes each command (default:
    :func:`predict_command`). A case whose header already says it is bad input is not run: it is recorded with
    exit code 2 and the reason. ``gpu``: ``"auto"`` (:func:`open_gpu_sampler` on the GPU the child will see:
    NVML, else nvidia-smi), None (no GPU figures) or a sampler. ``profile.json`` is rewritten after every case, so
    finished cases survive an interruption; its ``settings`` say what each figure means
    (:data:`FIGURE_DEFINITIONS`). ``extra_args`` (the command line's pass-through flags) are only recorded.
    """
    from nnunet_samflare.errors import EXIT_BAD_INPUT, one_line

    cases = profile_cases_of(images)
    predict_options = dict(predict_options or {})
    command_builder = command_builder or predict_command
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report_dir = Path(report_dir) if report_dir is not None else output_dir
    (report_dir / "logs").mkdir(parents=True, exist_ok=True)
    gpu_note = None
    owned_sampler = None
    if gpu == "auto":
        gpu, gpu_note = open_gpu_sampler(env, interval=interval)
        owned_sampler = gpu
    elif gpu is None:
        gpu_note = "GPU sampling disabled"
    if gpu is None:
        gpu_note = f"GPU figures absent: {gpu_note}"
    dataset = predict_options.get("dataset")
    result: dict[str, Any] = {
        "settings": {
            "interval_s": interval,
            "images": str(images),
            "output_dir": str(output_dir),
            "dataset": None if dataset is None else str(dataset),
            "extra_args": list(extra_args or []),
            "predict_options": predict_options,
            "timeout_s": timeout_s,
            "gpu": getattr(gpu, "description", None) if gpu is not None else None,
            "gpu_note": gpu_note,
            "MB": "MiB (2**20 bytes)",
            "figures": FIGURE_DEFINITIONS,
        },
        "cases": [],
    }
    try:
        for case in cases:
            log = report_dir / "logs" / f"{case.case_id}.log"
            record: dict[str, Any] = {"case": case.case_id, "image": str(case_input(case))}
            try:
                if not case.is_dicom:
                    read_header(case.files[0])  # a scan that is bad input is refused without a process
            except InputError as error:
                record.update(_refused(one_line(error), EXIT_BAD_INPUT, log))
            else:
                command = command_builder(case, output_dir, predict_options)
                record.update(
                    run_and_sample(command, interval=interval, gpu=gpu, env=env, timeout_s=timeout_s, log_file=log)
                )
            record["log"] = str(log)
            plot = plot_case(record, report_dir / f"profile_{case.case_id}.png")
            record["plot"] = str(plot) if plot else None
            result["cases"].append(record)
            result["summary"] = summarize_records(result["cases"])
            write_json_atomic(result, report_dir / "profile.json")
            if progress is not None:
                progress(format_case_line(record))
    finally:
        if owned_sampler is not None:
            owned_sampler.close()
    write_profile_csv(result["cases"], report_dir / "profile.csv")
    return result


def _refused(message: str, exit_code: int, log: Path) -> dict[str, Any]:
    log.write_text(message + "\n", encoding="utf-8")
    figures = {figure: None for figure in FIGURES}
    return {
        **figures,
        "command": [],
        "exit_code": exit_code,
        "timed_out": False,
        "error": message,
        "samples": {"time_s": [], "ram_mb": []},
        "n_samples": 0,
    }
