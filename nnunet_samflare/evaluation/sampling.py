"""Running one command while sampling the GPU and host memory of its process tree every 0.1 s (the FLARE
protocol's measurement; ``samflare profile`` and the benchmarks use it). The figures are defined in
:data:`FIGURE_DEFINITIONS`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nnunet_samflare.evaluation.gpu_memory import SAMPLE_INTERVAL_S, GpuSampler
from nnunet_samflare.evaluation.host_memory import HostMemoryPeaks, process_tree

#: The per-case figures, in the order of the CSV and the summary.
FIGURES = ("time_s", "MaxGPU_MB", "AUC_GPU_Time_MBs", "MaxGPU_own_MB", "MaxRAM_MB", "MaxRSS_process_MB")
#: What each figure of ``profile.json`` means (also written into its ``settings``).
FIGURE_DEFINITIONS = {
    "time_s": "wall time from just before the process is created to its exit (start-up included)",
    "MaxGPU_MB": "largest device-wide GPU memory sample (all processes on the GPU; Table 4's MaxGPU)",
    "AUC_GPU_Time_MBs": "sum of the device-wide GPU memory samples x the sampling interval (Table 4)",
    "MaxGPU_own_MB": "largest GPU memory NVML accounts to the process tree (None with nvidia-smi)",
    "GPU_baseline_MB": "device-wide GPU memory just before the start (other processes' share of each sample)",
    "MaxRAM_MB": "peak over the samples of the process tree's summed PSS (shared pages counted once); RSS for "
    "a process whose PSS is unreadable (see RAM_measure)",
    "MaxRSS_process_MB": "largest sampled RSS of a single process of the tree",
    "MaxRSS_sum_MB": "peak over the samples of the process tree's summed RSS (counts shared pages repeatedly)",
}
_POSIX = os.name == "posix"


class _Reaper:
    """Waits for the child in a thread, so that its exit is seen at once."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.exited = threading.Event()
        self.exit_time: float | None = None
        self._thread = threading.Thread(target=self._wait, name=f"reaper {process.pid}", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        try:
            self.process.wait()
        finally:
            self.exit_time = time.perf_counter()
            self.exited.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the process, its process group (its own session on POSIX) and every descendant still known."""
    import psutil

    tree = process_tree(process.pid)
    if _POSIX:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:  # the group is gone already
            pass
    for member in reversed(tree):
        try:
            member.kill()
        except psutil.Error:
            pass
    # Wait (briefly) until the descendants are dead. A zombie has freed its memory; whoever adopted it reaps it.
    deadline = time.monotonic() + 5.0
    for member in tree[1:]:
        while time.monotonic() < deadline:
            try:
                if member.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.Error:  # gone
                break
            time.sleep(0.01)


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
    """Run ``command`` to the end, sampling GPU and host memory of its process tree every ``interval`` seconds.

    The time runs from just before the process is created to its exit (so start-up counts). The first sample is
    taken right after the start. Output goes to ``log_file`` (or is discarded). On POSIX the command gets its own
    session. A command that cannot start, fails or times out is reported, never raised; after a timeout, and
    when this function is interrupted (Ctrl-C), the command's process group and process tree are killed.

    Returns ``command``, ``exit_code`` (negative: killed by that signal), ``timed_out``, ``error``, ``time_s``,
    the figures of :data:`FIGURE_DEFINITIONS`, ``RAM_measure``, ``n_samples`` and ``samples`` (lists
    ``time_s``, ``ram_mb``, and with a GPU ``gpu_mb``, ``gpu_own_mb``).
    """
    samples: dict[str, list] = {"time_s": [], "gpu_mb": [], "gpu_own_mb": [], "ram_mb": []}
    record: dict[str, Any] = {
        "command": [str(c) for c in command],
        "exit_code": None,
        "timed_out": False,
        "error": None,
    }
    memory = HostMemoryPeaks()
    # Device-wide memory before the start: other processes' share of every sample.
    baseline = _sample_gpu(gpu, set(), record)[0] if gpu is not None else None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "wb") if log_file is not None else subprocess.DEVNULL
    start = time.perf_counter()
    try:
        try:
            process = subprocess.Popen(
                record["command"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
                start_new_session=_POSIX,
            )
        except OSError as e:
            record["error"] = f"cannot start: {e}"
            record["time_s"] = round(time.perf_counter() - start, 3)
            return _finish(record, samples, interval, baseline, gpu, memory)
        reaper = _Reaper(process)
        try:
            next_tick = 0.0
            while True:
                now = time.perf_counter() - start
                tree = process_tree(process.pid)
                if tree:  # empty once the process has exited and been reaped
                    samples["time_s"].append(round(now, 3))
                    samples["ram_mb"].append(round(memory.sample([p.pid for p in tree]), 1))
                    if gpu is not None:
                        used, own = _sample_gpu(gpu, {p.pid for p in tree}, record)
                        samples["gpu_mb"].append(used)
                        samples["gpu_own_mb"].append(own)
                next_tick += interval
                wake = next_tick if timeout_s is None else min(next_tick, timeout_s)
                # Waiting (not sleeping) returns the moment the process exits, so the time stays exact.
                if reaper.exited.wait(max(0.0, wake - (time.perf_counter() - start))):
                    record["time_s"] = round(reaper.exit_time - start, 3)
                    break
                if timeout_s is not None and time.perf_counter() - start >= timeout_s:
                    _kill_tree(process)
                    reaper.join(timeout=60)
                    record["timed_out"] = True
                    record["error"] = f"timed out after {timeout_s:g} s"
                    record["time_s"] = round(time.perf_counter() - start, 3)
                    break
        except BaseException:  # interrupted: leave no orphaned processes behind
            _kill_tree(process)
            reaper.join(timeout=10)
            raise
        record["exit_code"] = process.returncode
    finally:
        if log is not subprocess.DEVNULL:
            log.close()
    return _finish(record, samples, interval, baseline, gpu, memory)


def _finish(
    record: dict,
    samples: dict,
    interval: float,
    baseline: float | None,
    gpu: GpuSampler | None,
    memory: HostMemoryPeaks,
) -> dict:
    has_gpu = gpu is not None

    def mb(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    record.update(
        MaxGPU_MB=_peak(samples["gpu_mb"]) if has_gpu else None,
        AUC_GPU_Time_MBs=round(_auc(samples["gpu_mb"], interval), 1) if has_gpu else None,
        MaxGPU_own_MB=_peak(samples["gpu_own_mb"]) if has_gpu else None,
        GPU_baseline_MB=baseline,
        MaxRAM_MB=mb(memory.ram),
        MaxRSS_process_MB=mb(memory.rss_process),
        MaxRSS_sum_MB=mb(memory.rss_sum),
        RAM_measure=memory.measure(),
        n_samples=len(samples["time_s"]),
        samples=samples if has_gpu else {k: v for k, v in samples.items() if not k.startswith("gpu")},
    )
    return record
