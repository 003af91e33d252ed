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

The sampling loop is :func:`run_and_sample`; the benchmarks (``benchmarks/``) use it too.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from nnunet_samflare.evaluation.evaluate import LABEL_FILE_ENDINGS
from nnunet_samflare.io import write_json_atomic

SAMPLE_INTERVAL_S = 0.1
MIB = 1024 * 1024
#: The per-case figures, in the order of the CSV and the summary.
FIGURES = ("time_s", "MaxGPU_MB", "AUC_GPU_Time_MBs", "MaxGPU_own_MB", "MaxRAM_MB", "MaxRSS_process_MB")
CSV_COLUMNS = ("case", "exit_code", *FIGURES, "timed_out")
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
# The module the per-case command runs; the predict sub-command is looked up there.
CLI_MODULE = "nnunet_samflare.cli"
_POSIX = os.name == "posix"

CommandBuilder = Callable[[Path, Path, str | None, Sequence[str]], list[str]]


def predict_command(
    case_file: Path, output_dir: Path, dataset: str | None = None, extra_args: Sequence[str] = ()
) -> list[str]:
    """The command that segments one case in a fresh interpreter (the only place it is built).

    ``dataset`` None leaves out ``-d``: the models then come from ``--locator DIR --segmenter DIR`` in
    ``extra_args``.
    """
    dataset_args = [] if dataset is None else ["-d", str(dataset)]
    return [sys.executable, "-m", CLI_MODULE, "predict", "-i", str(case_file), "-o", str(output_dir),
            *dataset_args, *extra_args]


# -- GPU memory ------------------------------------------------------------------------------------------------


class GpuSampler(Protocol):
    """What the sampling loop needs from a GPU: MB used device-wide and by a set of processes (None: unknown).

    The samplers here also have ``description`` (a dict: device, name, total_MB, source) and ``close()``.
    """

    def sample(self, pids: set[int]) -> tuple[float, float | None]: ...


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


class NvmlSampler:
    """Memory of one GPU through NVML (pynvml from nvidia-ml-py): device-wide and per process."""

    def __init__(self, handle: Any, description: dict[str, Any]):
        self.handle = handle
        self.description = description

    @classmethod
    def open(cls, device: int | str) -> tuple[NvmlSampler | None, str | None]:
        """A sampler for ``device`` (NVML index or UUID), or (None, why not). Never raises."""
        try:
            import pynvml
        except ImportError:
            return None, "pynvml (nvidia-ml-py) is not installed"
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError, including a driver library that cannot be loaded
            return None, f"NVML is not available ({e})"
        try:
            if isinstance(device, int):
                handle = pynvml.nvmlDeviceGetHandleByIndex(device)
            else:
                handle = pynvml.nvmlDeviceGetHandleByUUID(device)
            name = pynvml.nvmlDeviceGetName(handle)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total / MIB
        except Exception as e:
            pynvml.nvmlShutdown()
            return None, f"GPU {device!r} not found through NVML ({e})"
        name = name.decode() if isinstance(name, bytes) else name
        return cls(handle, {"device": device, "name": name, "total_MB": round(total, 1), "source": "NVML"}), None

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


class SmiSampler:
    """Device-wide memory of one GPU from ``nvidia-smi --query-gpu=memory.used -lms``: the fallback without pynvml.

    Starting nvidia-smi for every sample would take longer than the 0.1 s interval, so one ``nvidia-smi -lms``
    process streams a CSV line (``<MiB>``) per interval for the sampler's lifetime and a reader thread keeps the
    latest value; :meth:`sample` returns it (at most about one interval old). There is no per-process figure.
    A stream that ended or went silent for :attr:`stale_s` seconds makes :meth:`sample` raise.
    """

    stale_s = 5.0

    def __init__(self, executable: str, device: int | str, description: dict[str, Any],
                 interval_s: float = SAMPLE_INTERVAL_S):
        self.description = description
        self._latest: tuple[float, float] | None = None  # (MiB, time.monotonic())
        self._message = ""  # the last line that was not a number (nvidia-smi's error, if any)
        self._first = threading.Event()
        period_ms = max(1, round(interval_s * 1000))
        self._stream = subprocess.Popen(
            [executable, "-i", str(device), "--query-gpu=memory.used", "--format=csv,noheader,nounits",
             "-lms", str(period_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        )
        self._reader = threading.Thread(target=self._read, name="nvidia-smi reader", daemon=True)
        self._reader.start()

    @classmethod
    def open(cls, device: int | str, *, interval_s: float = SAMPLE_INTERVAL_S, executable: str = "nvidia-smi",
             timeout_s: float = 30.0) -> tuple[SmiSampler | None, str | None]:
        """A streaming sampler for ``device`` (index or UUID, as ``nvidia-smi -i`` takes them) once its first
        reading arrived, or (None, why not). Never raises."""
        path = shutil.which(executable)
        if path is None:
            return None, f"{executable} is not on PATH"
        try:
            info = subprocess.run([path, "-i", str(device), "--query-gpu=name,memory.total",
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                  timeout=timeout_s, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"nvidia-smi failed ({e})"
        lines = info.stdout.strip().splitlines()
        if info.returncode != 0 or not lines:
            why = (info.stdout.strip() or info.stderr.strip() or "no output").splitlines()[-1]
            return None, f"nvidia-smi -i {device} failed (exit code {info.returncode}: {why})"
        name, _, total = lines[0].rpartition(",")
        try:
            total_mb: float | None = round(float(total), 1)
        except ValueError:
            total_mb = None
        description = {"device": device, "name": name.strip() or total.strip(), "total_MB": total_mb,
                       "source": "nvidia-smi"}
        try:
            sampler = cls(path, device, description, interval_s)
        except OSError as e:
            return None, f"nvidia-smi failed ({e})"
        if not sampler._first.wait(timeout_s) or sampler._latest is None:
            why = sampler._message or "no output"
            sampler.close()
            return None, f"nvidia-smi gave no memory reading ({why})"
        return sampler, None

    def _read(self) -> None:
        for line in self._stream.stdout:
            text = line.strip()
            try:
                value = float(text.split(",")[0])
            except ValueError:
                if text:
                    self._message = text
                continue
            self._latest = (value, time.monotonic())
            self._first.set()
        self._first.set()  # the stream ended: wake a waiting open()

    def sample(self, pids: set[int]) -> tuple[float, float | None]:
        latest = self._latest
        if self._stream.poll() is not None:
            raise RuntimeError(f"nvidia-smi stopped (exit code {self._stream.returncode}: {self._message})")
        if latest is None or time.monotonic() - latest[1] > self.stale_s:
            raise RuntimeError(f"no nvidia-smi reading for {self.stale_s} s")
        return latest[0], None

    def close(self) -> None:
        if self._stream.poll() is None:
            self._stream.terminate()
            try:
                self._stream.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._stream.kill()
                self._stream.wait()
        self._reader.join(timeout=5)
        self._stream.stdout.close()


def open_gpu_sampler(
    env: Mapping[str, str] | None = None, *, interval: float = SAMPLE_INTERVAL_S
) -> tuple[NvmlSampler | SmiSampler | None, str | None]:
    """A sampler for the GPU a child with ``env`` would use, and a note on what is missing. Never raises.

    NVML first: (sampler, None). Without it, nvidia-smi: (sampler, why there is no own-process figure). Without
    both, or with no visible GPU: (None, why GPU figures will be absent).
    """
    device, reason = visible_gpu(env)
    if device is None:
        return None, reason
    sampler, nvml_reason = NvmlSampler.open(device)
    if sampler is not None:
        return sampler, None
    fallback, smi_reason = SmiSampler.open(device, interval_s=interval)
    if fallback is not None:
        return fallback, f"{nvml_reason}: device-wide GPU memory from nvidia-smi, no own-process GPU figure"
    return None, f"{nvml_reason}; {smi_reason}"


# -- host memory -----------------------------------------------------------------------------------------------


def process_memory_mb(pid: int) -> tuple[float, float | None] | None:
    """(RSS, PSS) of one process in MiB; PSS is None where it cannot be read; None if the process is gone.

    Both come from ``/proc/<pid>/smaps_rollup`` (one read); without it RSS comes from psutil.
    """
    rss = pss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) / 1024  # kB
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    if rss is not None and pss is not None:
        return rss, pss
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / MIB, None
    except psutil.Error:  # exited between listing and reading
        return None


def _process_tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class _HostMemory:
    """Peaks of the process tree's host memory over the samples."""

    def __init__(self):
        self.ram = self.rss_sum = self.rss_process = None
        self.pss_reads = self.rss_fallbacks = 0

    def sample(self, pids: Sequence[int]) -> float:
        """Sample the processes; returns the tree's RAM (summed PSS, RSS where PSS is unreadable) in MiB."""
        ram = rss_sum = rss_max = 0.0
        for pid in pids:
            memory = process_memory_mb(pid)
            if memory is None:
                continue
            rss, pss = memory
            if pss is None:
                self.rss_fallbacks += 1
            else:
                self.pss_reads += 1
            ram += rss if pss is None else pss
            rss_sum += rss
            rss_max = max(rss_max, rss)
        self.ram = _max(self.ram, ram)
        self.rss_sum = _max(self.rss_sum, rss_sum)
        self.rss_process = _max(self.rss_process, rss_max)
        return ram

    def measure(self) -> str | None:
        if not self.rss_fallbacks:
            return "PSS" if self.pss_reads else None
        return "RSS" if not self.pss_reads else "PSS, RSS where PSS was unreadable"


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


# -- running a command -----------------------------------------------------------------------------------------


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

    tree = _process_tree(process.pid)
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
    record: dict[str, Any] = {"command": [str(c) for c in command], "exit_code": None, "timed_out": False,
                              "error": None}
    memory = _HostMemory()
    # Device-wide memory before the start: other processes' share of every sample.
    baseline = _sample_gpu(gpu, set(), record)[0] if gpu is not None else None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "wb") if log_file is not None else subprocess.DEVNULL
    start = time.perf_counter()
    try:
        try:
            process = subprocess.Popen(record["command"], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=None if env is None else dict(env),
                                       start_new_session=_POSIX)
        except OSError as e:
            record["error"] = f"cannot start: {e}"
            record["time_s"] = round(time.perf_counter() - start, 3)
            return _finish(record, samples, interval, baseline, gpu, memory)
        reaper = _Reaper(process)
        try:
            next_tick = 0.0
            while True:
                now = time.perf_counter() - start
                tree = _process_tree(process.pid)
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


def _finish(record: dict, samples: dict, interval: float, baseline: float | None, gpu: GpuSampler | None,
            memory: _HostMemory) -> dict:
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
            **{key: stats(key) for key in FIGURES}}


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
    dataset: str | None = None,
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
    :func:`predict_command`; ``dataset`` None: no ``-d``, the models then come from ``extra_args``). ``gpu``:
    ``"auto"`` (:func:`open_gpu_sampler` on the GPU the child will see: NVML, else nvidia-smi), None (no GPU
    figures) or a sampler. ``profile.json`` is rewritten after every case, so finished cases survive an
    interruption; its ``settings`` say what each figure means (:data:`FIGURE_DEFINITIONS`).
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
        gpu, gpu_note = open_gpu_sampler(env, interval=interval)
        owned_sampler = gpu
    elif gpu is None:
        gpu_note = "GPU sampling disabled"
    if gpu is None:
        gpu_note = f"GPU figures absent: {gpu_note}"
    result: dict[str, Any] = {
        "settings": {
            "interval_s": interval, "images": str(images), "output_dir": str(output_dir),
            "dataset": None if dataset is None else str(dataset), "extra_args": list(extra_args),
            "timeout_s": timeout_s, "gpu": getattr(gpu, "description", None) if gpu is not None else None,
            "gpu_note": gpu_note, "MB": "MiB (2**20 bytes)", "figures": FIGURE_DEFINITIONS,
        },
        "cases": [],
    }
    try:
        for case, image in cases.items():
            command = command_builder(image, output_dir, None if dataset is None else str(dataset),
                                      list(extra_args))
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
            f"RAM {_fmt(record['MaxRAM_MB'])} MB (largest process {_fmt(record.get('MaxRSS_process_MB'))} MB), "
            f"{status}")


def format_profile_table(result: Mapping[str, Any]) -> str:
    """Per-case Table-4 figures, then the note on the GPU figures (absent, or device-wide only) if any."""
    header = f"{'case':<20} {'time (s)':>9} {'MaxGPU (MB)':>12} {'AUC_GPU_Time (MB·s)':>20} " \
             f"{'own GPU (MB)':>13} {'MaxRAM (MB)':>12} {'max proc (MB)':>14} {'exit':>5}"
    lines = [header]
    for r in result["cases"]:
        lines.append(f"{r['case']:<20} {_fmt(r['time_s'], '.2f'):>9} {_fmt(r['MaxGPU_MB']):>12} "
                     f"{_fmt(r['AUC_GPU_Time_MBs']):>20} {_fmt(r['MaxGPU_own_MB']):>13} "
                     f"{_fmt(r['MaxRAM_MB']):>12} {_fmt(r.get('MaxRSS_process_MB')):>14} {r['exit_code']!s:>5}")
    note = result["settings"].get("gpu_note")
    if note:
        lines.append(note)
    return "\n".join(lines)
