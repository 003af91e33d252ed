"""Efficiency profiling with the FLARE protocol: one fresh process per case, memory sampled every 0.1 s.

FLARE23 ran each case in a new container, so its time includes start-up, imports, model loading, I/O and
pre/post-processing; GPU memory was read device-wide through NVML every 0.1 s. Per case we report, as the
paper's Table 4 does, the wall time (s), MaxGPU (MB, the largest device-wide sample) and AUC_GPU_Time (MB·s,
the sum of the samples × the nominal interval), and in addition the largest GPU memory of the process tree
itself (NVML's per-process accounting), the largest host RAM (sum of RSS over the process tree, so pages
shared between processes count once per process) and the exit code. MB means MiB, as in nvidia-smi.

Without NVML or a visible GPU the GPU figures are None and the result carries a note saying why.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from nnunet_samflare.evaluation.evaluate import LABEL_FILE_ENDINGS
from nnunet_samflare.inference.io import write_json_atomic

SAMPLE_INTERVAL_S = 0.1
MIB = 1024 * 1024
CSV_COLUMNS = (
    "case", "exit_code", "time_s", "MaxGPU_MB", "AUC_GPU_Time_MBs", "MaxGPU_own_MB", "MaxRAM_MB", "timed_out",
)
# The module the per-case command runs; the predict sub-command is looked up there.
CLI_MODULE = "nnunet_samflare.cli"

CommandBuilder = Callable[[Path, Path, str, Sequence[str]], list[str]]


def predict_command(case_file: Path, output_dir: Path, dataset: str, extra_args: Sequence[str] = ()) -> list[str]:
    """The command that segments one case in a fresh interpreter (the only place it is built)."""
    return [sys.executable, "-m", CLI_MODULE, "predict", "-i", str(case_file), "-o", str(output_dir),
            "-d", str(dataset), *extra_args]


class GpuSampler(Protocol):
    """What the sampling loop needs from a GPU: MB used device-wide and by a set of processes."""

    def sample(self, pids: set[int]) -> tuple[float, float | None]: ...


class NvmlSampler:
    """Memory of one GPU through NVML (pynvml from nvidia-ml-py)."""

    def __init__(self, handle: Any, description: dict[str, Any]):
        self.handle = handle
        self.description = description

    def sample(self, pids: set[int]) -> tuple[float, float | None]:
        import pynvml

        used = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / MIB
        try:
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except pynvml.NVMLError:  # per-process accounting is not supported everywhere
            return used, None
        own: float | None = 0.0
        for process in processes:
            if process.pid in pids:
                if process.usedGpuMemory is None:  # not reported (e.g. some virtualised set-ups)
                    own = None
                    break
                own += process.usedGpuMemory / MIB
        return used, own

    def close(self) -> None:
        import pynvml

        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def visible_gpu(env: Mapping[str, str] | None = None) -> tuple[int | str | None, str | None]:
    """The GPU a child process would use first: (NVML index or UUID, None) or (None, reason).

    Follows ``CUDA_VISIBLE_DEVICES`` when set: an integer is taken as the NVML index (exact when
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, NVML's order; CUDA's default order puts the fastest GPU first), a
    ``GPU-…``/``MIG-…`` UUID is looked up by UUID.
    """
    env = os.environ if env is None else env
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return 0, None
    first = value.split(",")[0].strip()
    if not first or first.startswith("-"):
        return None, f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU"
    return (int(first), None) if first.isdigit() else (first, None)


def open_gpu_sampler(env: Mapping[str, str] | None = None) -> tuple[NvmlSampler | None, str | None]:
    """An NVML sampler for the visible GPU, or (None, why GPU figures will be absent). Never raises."""
    device, reason = visible_gpu(env)
    if device is None:
        return None, reason
    try:
        import pynvml
    except ImportError:
        return None, "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return None, f"NVML is not available ({e}); no NVIDIA driver or GPU"
    try:
        if isinstance(device, int):
            handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(device)
        name = pynvml.nvmlDeviceGetName(handle)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total / MIB
    except pynvml.NVMLError as e:
        pynvml.nvmlShutdown()
        return None, f"GPU {device!r} not found through NVML ({e})"
    name = name.decode() if isinstance(name, bytes) else name
    return NvmlSampler(handle, {"device": device, "name": name, "total_MB": round(total, 1)}), None


def _process_tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _rss_mb(processes: Sequence) -> float:
    import psutil

    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total / MIB


def _kill_tree(process: subprocess.Popen) -> int:
    """Kill a process and its descendants; returns the process's exit status (negative: the signal)."""
    import psutil

    tree = _process_tree(process.pid)
    for member in reversed(tree):
        try:
            member.kill()
        except psutil.Error:
            pass
    # Reap the descendants with psutil but the root with Popen, which would otherwise lose its status.
    psutil.wait_procs(tree[1:], timeout=5)
    return process.wait()


def _sample_gpu(gpu: GpuSampler, pids: set[int], record: dict) -> tuple[float | None, float | None]:
    """One GPU sample rounded to 0.1 MB; a failing read is recorded and gives None, not a crash."""
    try:
        used, own = gpu.sample(pids)
    except Exception as e:  # profiling must survive a driver hiccup
        record["gpu_error"] = f"GPU sampling failed: {e}"
        return None, None
    return round(used, 1), None if own is None else round(own, 1)


def _auc(samples: Sequence[float | None], interval: float) -> float:
    return sum(v for v in samples if v is not None) * interval


def _peak(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(max(known), 1) if known else None


def run_and_sample(
    command: Sequence[str],
    *,
    interval: float = SAMPLE_INTERVAL_S,
    gpu: GpuSampler | None = None,
    log_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run ``command`` to the end, sampling GPU and RAM every ``interval`` seconds.

    The time runs from just before the process is created to its exit (so start-up counts). The first
    sample is taken right after the start. Output goes to ``log_file`` (or is discarded). A command that
    cannot start, fails or times out (its process tree is then killed) is reported, never raised.
    """
    samples: dict[str, list] = {"time_s": [], "gpu_mb": [], "gpu_own_mb": [], "ram_mb": []}
    record: dict[str, Any] = {"command": [str(c) for c in command], "exit_code": None, "timed_out": False,
                              "error": None}
    # Device-wide memory before the start: other processes' share of every sample.
    baseline = _sample_gpu(gpu, set(), record)[0] if gpu is not None else None
    log = open(log_file, "wb") if log_file is not None else subprocess.DEVNULL
    start = time.perf_counter()
    try:
        try:
            process = subprocess.Popen(record["command"], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=None if env is None else dict(env))
        except OSError as e:
            record["error"] = f"cannot start: {e}"
            record["time_s"] = round(time.perf_counter() - start, 3)
            return _finish(record, samples, interval, baseline, gpu)
        next_tick = 0.0
        while True:
            now = time.perf_counter() - start
            tree = _process_tree(process.pid)
            samples["time_s"].append(round(now, 3))
            samples["ram_mb"].append(round(_rss_mb(tree), 1))
            if gpu is not None:
                used, own = _sample_gpu(gpu, {p.pid for p in tree}, record)
                samples["gpu_mb"].append(used)
                samples["gpu_own_mb"].append(own)
            next_tick += interval
            wake = next_tick if timeout_s is None else min(next_tick, timeout_s)
            try:
                # Waiting (not sleeping) returns the moment the process exits, so the time stays exact.
                record["exit_code"] = process.wait(timeout=max(0.0, wake - (time.perf_counter() - start)))
                break
            except subprocess.TimeoutExpired:
                if timeout_s is not None and time.perf_counter() - start >= timeout_s:
                    record["exit_code"] = _kill_tree(process)
                    record["timed_out"] = True
                    record["error"] = f"timed out after {timeout_s} s"
                    break
        record["time_s"] = round(time.perf_counter() - start, 3)
    finally:
        if log is not subprocess.DEVNULL:
            log.close()
    return _finish(record, samples, interval, baseline, gpu)


def _finish(record: dict, samples: dict, interval: float, baseline: float | None, gpu: GpuSampler | None) -> dict:
    has_gpu = gpu is not None
    record.update(
        MaxGPU_MB=_peak(samples["gpu_mb"]) if has_gpu else None,
        AUC_GPU_Time_MBs=round(_auc(samples["gpu_mb"], interval), 1) if has_gpu else None,
        MaxGPU_own_MB=_peak(samples["gpu_own_mb"]) if has_gpu else None,
        GPU_baseline_MB=baseline,
        MaxRAM_MB=_peak(samples["ram_mb"]),
        n_samples=len(samples["time_s"]),
        samples=samples if has_gpu else {k: v for k, v in samples.items() if not k.startswith("gpu")},
    )
    return record


_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


def find_image_cases(images: str | Path) -> dict[str, Path]:
    """``{case: image file}`` for a folder of nnU-Net images (``<case>_0000<ending>``) or a single file.

    The predict command takes one file per case, so multi-channel cases are refused.
    """
    from nnunet_samflare.evaluation.evaluate import case_name

    images = Path(images)
    if images.is_file():
        files = [images]
    elif images.is_dir():
        files = sorted(p for p in images.iterdir() if p.is_file())
    else:
        raise FileNotFoundError(f"{images}: no such file or directory")
    cases: dict[str, list[Path]] = {}
    for path in files:
        stem = case_name(path)
        if stem is not None:
            cases.setdefault(_CHANNEL_SUFFIX.sub("", stem), []).append(path)
    if not cases:
        raise ValueError(f"{images}: no images ({', '.join(LABEL_FILE_ENDINGS)})")
    multi = [c for c, paths in cases.items() if len(paths) > 1]
    if multi:
        raise ValueError(f"{images}: case(s) {', '.join(multi)} have several channel files; profile runs "
                         "single-channel (CT) cases")
    return {case: paths[0] for case, paths in cases.items()}


def _summarize(records: Sequence[dict]) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float | None]:
        values = [r[key] for r in records if r.get(key) is not None]
        if not values:
            return {"mean": None, "max": None}
        return {"mean": round(sum(values) / len(values), 3), "max": round(max(values), 3)}

    failed = [r["case"] for r in records if r["exit_code"] != 0]
    return {"n_cases": len(records), "n_failed": len(failed), "failed_cases": failed,
            **{key: stats(key) for key in CSV_COLUMNS[2:7]}}


def write_profile_csv(records: Sequence[dict], path: str | Path) -> Path:
    """One row per case with the Table-4 figures; absent values are empty cells."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for record in records:
            writer.writerow(["" if record.get(k) is None else record.get(k) for k in CSV_COLUMNS])
    os.replace(tmp, path)
    return path


def _plot_case(record: dict, path: Path) -> Path | None:
    from nnunet_samflare.evaluation.plots import plot_memory_curve

    samples = record["samples"]
    if not samples["time_s"]:
        return None
    return plot_memory_curve(samples["time_s"], samples["ram_mb"], path, gpu_mb=samples.get("gpu_mb"),
                             gpu_own_mb=samples.get("gpu_own_mb"),
                             title=f"{record['case']}: {record['time_s']} s, exit code {record['exit_code']}")


def profile_cases(
    images: str | Path,
    output_dir: str | Path,
    dataset: str,
    extra_args: Sequence[str] = (),
    *,
    report_dir: str | Path | None = None,
    interval: float = SAMPLE_INTERVAL_S,
    timeout_s: float | None = None,
    command_builder: CommandBuilder | None = None,
    gpu: GpuSampler | str | None = "auto",
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Profile every case of ``images`` in its own process; write ``profile.json``, ``profile.csv``,
    ``profile_<case>.png`` and ``logs/<case>.log`` to ``report_dir`` (default ``output_dir``).

    ``command_builder(case_file, output_dir, dataset, extra_args)`` makes each command (default:
    :func:`predict_command`). ``gpu``: ``"auto"`` (NVML on the GPU the child will see), None (no GPU figures) or a
    sampler. ``profile.json`` is rewritten after every case, so finished cases survive an interruption.
    """
    cases = find_image_cases(images)
    command_builder = command_builder or predict_command
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report_dir = Path(report_dir) if report_dir is not None else output_dir
    (report_dir / "logs").mkdir(parents=True, exist_ok=True)
    gpu_note = None
    owned_sampler = None
    if gpu == "auto":
        gpu, gpu_note = open_gpu_sampler(env)
        owned_sampler = gpu
    elif gpu is None:
        gpu_note = "GPU sampling disabled"
    if gpu is None:
        gpu_note = f"GPU figures absent: {gpu_note}"
    result: dict[str, Any] = {
        "settings": {
            "interval_s": interval, "images": str(images), "output_dir": str(output_dir), "dataset": str(dataset),
            "extra_args": list(extra_args), "timeout_s": timeout_s,
            "gpu": getattr(gpu, "description", None) if gpu is not None else None, "gpu_note": gpu_note,
            "MB": "MiB (2**20 bytes)",
        },
        "cases": [],
    }
    try:
        for case, image in cases.items():
            command = command_builder(image, output_dir, str(dataset), list(extra_args))
            record = {"case": case, "image": str(image)}
            record.update(run_and_sample(command, interval=interval, gpu=gpu, env=env, timeout_s=timeout_s,
                                         log_file=report_dir / "logs" / f"{case}.log"))
            record["log"] = str(report_dir / "logs" / f"{case}.log")
            plot = _plot_case(record, report_dir / f"profile_{case}.png")
            record["plot"] = str(plot) if plot else None
            result["cases"].append(record)
            result["summary"] = _summarize(result["cases"])
            write_json_atomic(result, report_dir / "profile.json")
            if progress is not None:
                progress(format_case_line(record))
    finally:
        if owned_sampler is not None:
            owned_sampler.close()
    write_profile_csv(result["cases"], report_dir / "profile.csv")
    return result


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_case_line(record: Mapping[str, Any]) -> str:
    """One console line per case."""
    status = "ok" if record["exit_code"] == 0 else f"FAILED (exit code {record['exit_code']})"
    if record.get("error"):
        status += f": {record['error']}"
    return (f"{record['case']}: {_fmt(record['time_s'], '.2f')} s, MaxGPU {_fmt(record['MaxGPU_MB'])} MB, "
            f"AUC_GPU_Time {_fmt(record['AUC_GPU_Time_MBs'])} MB·s, own GPU {_fmt(record['MaxGPU_own_MB'])} MB, "
            f"RAM {_fmt(record['MaxRAM_MB'])} MB, {status}")


def format_profile_table(result: Mapping[str, Any]) -> str:
    """Per-case Table-4 figures, then the note on absent GPU figures if any."""
    header = f"{'case':<20} {'time (s)':>9} {'MaxGPU (MB)':>12} {'AUC_GPU_Time (MB·s)':>20} " \
             f"{'own GPU (MB)':>13} {'MaxRAM (MB)':>12} {'exit':>5}"
    lines = [header]
    for r in result["cases"]:
        lines.append(f"{r['case']:<20} {_fmt(r['time_s'], '.2f'):>9} {_fmt(r['MaxGPU_MB']):>12} "
                     f"{_fmt(r['AUC_GPU_Time_MBs']):>20} {_fmt(r['MaxGPU_own_MB']):>13} "
                     f"{_fmt(r['MaxRAM_MB']):>12} {r['exit_code']!s:>5}")
    note = result["settings"].get("gpu_note")
    if note:
        lines.append(note)
    return "\n".join(lines)
