"""Helpers shared by the benchmark scripts: paths, commands, environment, memory probes, tables and JSON.

Nothing here imports torch or nnunetv2 at module level: the scripts set the ``nnUNet_*`` environment first, and
``nnunetv2.paths`` reads it once, at import time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: ``<repo>/../shared/data``: the shared test data (never copied into the repository).
DEFAULT_DATA = REPO.parent / "shared" / "data"
MIB = 1024 * 1024


# -- commands -----------------------------------------------------------------------------------------------

#: nnU-Net console scripts as entry functions, so that they also work where ``pip --target`` left no scripts
#: (the GPU kit, ``../shared/device/README.md``).
NNUNET_ENTRY_POINTS = {
    "nnUNetv2_plan_and_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:"
    "plan_and_preprocess_entry",
    "nnUNetv2_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:preprocess_entry",
    "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point",
}


def nnunet_command(name: str, *args: str) -> list[str]:
    """``[python, -c, <call the entry point>, *args]``: the console script ``name`` without needing it installed."""
    module, function = NNUNET_ENTRY_POINTS[name].split(":")
    code = f"import sys; from {module} import {function} as f; sys.argv[0] = {name!r}; sys.exit(f())"
    return [sys.executable, "-c", code, *map(str, args)]


def samflare_command(*args: str) -> list[str]:
    """The ``samflare`` CLI through ``python -m`` (works without console scripts)."""
    return [sys.executable, "-m", "nnunet_samflare.cli", *map(str, args)]


def nnunet_env(
    workdir: Path, *, n_proc: int | None = None, base: Mapping[str, str] | None = None, **extra: str
) -> dict[str, str]:
    """Environment for nnU-Net subprocesses: folders inside ``workdir``, no torch.compile, ``n_proc`` workers,
    the repository importable and its trainer shim folder on ``nnUNet_extTrainer``."""
    env = dict(os.environ if base is None else base)
    env.update(
        nnUNet_raw=str(workdir / "nnUNet_raw"),
        nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
        nnUNet_results=str(workdir / "nnUNet_results"),
        nnUNet_compile="f",
        PYTHONUNBUFFERED="1",
    )
    # The repository on the path, so that ``-m nnunet_samflare.cli`` works from a plain source tree too (GPU kit).
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO)])
    # Without ``pip install`` (the GPU kit runs from PYTHONPATH) the plug-in's .pth hook is not active; nnU-Net then
    # finds the trainers only through nnUNet_extTrainer. Adding the shim folder is harmless where the hook runs.
    shim = REPO / "trainers"
    ext = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if shim.is_dir() and str(shim) not in ext:
        env["nnUNet_extTrainer"] = os.pathsep.join([*ext, str(shim)])
    if n_proc is not None:
        env["nnUNet_def_n_proc"] = str(n_proc)
    env.update(extra)
    return env


def run_checked(args: Sequence[str], env: Mapping[str, str], *, log: Path | None = None, timeout: float | None = None):
    """Run a preparation command; raise with the end of its output if it fails."""
    result = subprocess.run(
        list(args), env=dict(env), capture_output=True, encoding="utf-8", errors="replace", timeout=timeout
    )
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {shlex.join(args)}\n{result.stdout}\n{result.stderr}\n")
    if result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        raise RuntimeError(f"command failed ({result.returncode}): {shlex.join(args)}\n{output}")
    return result


# -- memory ---------------------------------------------------------------------------------------------------


def current_rss_mb() -> float:
    """Resident set size of this process now (MiB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / MIB


def peak_rss_mb() -> float:
    """Largest resident set size of this process so far (MiB): ``getrusage(RUSAGE_SELF).ru_maxrss``."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / MIB if sys.platform == "darwin" else value / 1024  # bytes on macOS, KiB on Linux


# -- running a command while sampling its memory ---------------------------------------------------------------


def _visible_gpu(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The first GPU a child process sees (index or UUID; "0" by default), or (None, why none)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "0", None
    first = visible.split(",")[0].strip()
    if not first or first.startswith("-"):
        return None, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    return first, None


class NvmlGpu:
    """Device-wide and per-process memory of the first visible NVIDIA GPU through NVML (``pynvml``), polled."""

    source = "NVML"

    def __init__(self, pynvml, handle, name: str):
        self._nvml, self._handle, self.name = pynvml, handle, name
        self._peak: float | None = None
        self._peak_own: float | None = None

    @classmethod
    def open(cls, env: Mapping[str, str]) -> tuple[NvmlGpu | None, str | None]:
        device, why = _visible_gpu(env)
        if device is None:
            return None, why
        try:
            import pynvml
        except ImportError:
            return None, "pynvml (nvidia-ml-py) is not installed"
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError and driver-library load failures
            return None, f"NVML unavailable ({e})"
        try:
            if device.isdigit():
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(device))
            else:
                handle = pynvml.nvmlDeviceGetHandleByUUID(device)
            name = pynvml.nvmlDeviceGetName(handle)
        except Exception as e:
            pynvml.nvmlShutdown()
            return None, f"GPU {device!r} not found through NVML ({e})"
        return cls(pynvml, handle, name.decode() if isinstance(name, bytes) else name), None

    def used_mb(self) -> float:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / MIB

    def begin(self) -> None:
        self._peak = self._peak_own = None

    def poll(self, pids: set[int]) -> None:
        try:
            used = self.used_mb()
        except Exception:
            return
        self._peak = used if self._peak is None else max(self._peak, used)
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:  # per-process accounting is not supported everywhere
            return
        own = 0.0
        for process in processes:
            if process.pid in pids:
                if process.usedGpuMemory is None:
                    return
                own += process.usedGpuMemory / MIB
        self._peak_own = own if self._peak_own is None else max(self._peak_own, own)

    def end(self) -> tuple[float | None, float | None]:
        return self._peak, self._peak_own

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


class SmiGpu:
    """Fallback without pynvml: device-wide memory from ``nvidia-smi -lms 100`` streaming during the run."""

    source = "nvidia-smi"

    def __init__(self, device: str, name: str):
        self.device, self.name = device, name
        self._stream: subprocess.Popen | None = None
        self._samples: list[float] = []
        self._reader = None

    def _query(self) -> list[str]:
        return ["nvidia-smi", "-i", self.device, "--query-gpu=memory.used", "--format=csv,noheader,nounits"]

    @classmethod
    def open(cls, env: Mapping[str, str]) -> tuple[SmiGpu | None, str | None]:
        import shutil

        device, why = _visible_gpu(env)
        if device is None:
            return None, why
        if shutil.which("nvidia-smi") is None:
            return None, "neither pynvml nor nvidia-smi is available"
        try:
            name = subprocess.run(
                ["nvidia-smi", "-i", device, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"nvidia-smi failed ({e})"
        return cls(device, name), None

    def used_mb(self) -> float:
        out = subprocess.run(self._query(), capture_output=True, text=True, timeout=30, check=True).stdout
        return float(out.split()[0])  # MiB

    def begin(self) -> None:
        import threading

        self._samples = []
        self._stream = subprocess.Popen([*self._query(), "-lms", "100"], stdout=subprocess.PIPE, text=True)

        def read(stream=self._stream):
            for line in stream.stdout:
                try:
                    self._samples.append(float(line.split()[0]))
                except (ValueError, IndexError):
                    pass

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def poll(self, pids: set[int]) -> None:
        pass

    def end(self) -> tuple[float | None, float | None]:
        if self._stream is not None:
            self._stream.terminate()
            self._stream.wait()
            self._reader.join(timeout=5)
            self._stream = None
        return (max(self._samples) if self._samples else None), None

    def close(self) -> None:
        if self._stream is not None:
            self.end()


def open_gpu(env: Mapping[str, str]):
    """A GPU memory sampler (NVML, else nvidia-smi) and a note on what is missing; never raises."""
    device, why = _visible_gpu(env)
    if device is None:
        return None, why
    gpu, why = NvmlGpu.open(env)
    if gpu is not None:
        return gpu, None
    fallback, why_not = SmiGpu.open(env)
    if fallback is not None:
        return fallback, f"{why}; device-wide memory from nvidia-smi, no per-process figure"
    return None, f"{why}; {why_not}"


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree = [pid]
    for member in tree:
        tree.extend(children.get(member, []))
    return tree


def rss_pss_mb(pid: int) -> tuple[float, float]:
    """RSS and PSS of one process (MiB) from ``/proc/<pid>/smaps_rollup``; (0, 0) if it is gone."""
    rss = pss = 0.0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return rss, pss


def run_sampled(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    log_file: Path,
    timeout: float | None = None,
    interval: float = 0.1,
    gpu=None,
) -> dict[str, Any]:
    """Run ``command`` (own session, output to ``log_file``) to the end, sampling memory every ``interval`` s.

    Host memory, three ways: the peak over samples of the process tree's summed **PSS** (shared pages counted
    once, split between the processes sharing them: the honest total when a tool forks or spawns workers), the
    same with RSS (what ``top`` adds up; forked children count their copy-on-write pages again), and the kernel's
    exact ``ru_maxrss`` of the largest single process in the tree (``wait4``). GPU (``gpu`` from
    :func:`open_gpu`): peak device-wide use above the level just before the start, and the peak NVML accounts
    to the tree. A run past ``timeout`` seconds has its process group killed and is reported as timed out.
    Linux only (``/proc``).
    """
    import signal

    record: dict[str, Any] = {"command": [str(c) for c in command], "exit_code": None, "timed_out": False}
    peaks = {"pss": 0.0, "rss": 0.0}
    gpu_baseline = None
    if gpu is not None:
        try:
            gpu_baseline = gpu.used_mb()
            gpu.begin()
        except Exception as e:
            record["gpu_error"] = str(e)
            gpu = None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    samples = 0
    with open(log_file, "wb") as log:
        start = time.perf_counter()
        process = subprocess.Popen(
            record["command"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                elapsed = time.perf_counter() - start
                if pid:
                    break
                if timeout is not None and elapsed > timeout:
                    os.killpg(process.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(process.pid, 0)
                    elapsed = time.perf_counter() - start
                    record["timed_out"] = True
                    break
                samples += 1
                tree = process_tree(process.pid)
                memory = [rss_pss_mb(p) for p in tree]
                peaks["rss"] = max(peaks["rss"], sum(m[0] for m in memory))
                peaks["pss"] = max(peaks["pss"], sum(m[1] for m in memory))
                if gpu is not None:
                    gpu.poll(set(tree))
                time.sleep(interval)
        except BaseException:  # interrupted: leave no orphaned process group behind
            try:
                os.killpg(process.pid, signal.SIGKILL)
                os.waitpid(process.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            raise
        finally:
            gpu_peak, gpu_own = gpu.end() if gpu is not None else (None, None)
    process.returncode = os.waitstatus_to_exitcode(status)
    record.update(
        exit_code=process.returncode,
        wall_s=elapsed,
        peak_pss_tree_MB=peaks["pss"] or None,
        peak_rss_tree_MB=peaks["rss"] or None,
        max_rss_single_process_MB=usage.ru_maxrss / 1024,
        gpu_memory_source=None if gpu is None else gpu.source,
        gpu_baseline_MB=gpu_baseline,
        gpu_peak_above_baseline_MB=None if gpu_peak is None else gpu_peak - gpu_baseline,
        gpu_peak_own_MB=gpu_own,
        samples=samples,
        log=str(log_file),
    )
    if record["timed_out"]:
        record["error"] = f"timed out after {timeout:g} s"
    elif record["exit_code"] != 0:
        record["error"] = f"exit code {record['exit_code']}"
    return record


# -- environment description ------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def environment_info(device: str) -> dict[str, Any]:
    """Where and when the numbers were taken: device, library versions, date, command line, git revision."""
    import importlib.metadata as metadata

    import torch

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "device": device,
        "device_name": _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nnunetv2": version("nnunetv2"),
        "dynamic_network_architectures": version("dynamic_network_architectures"),
        "nnunet_samflare": version("nnunet_samflare"),
        "git_revision": _git_revision(),
        "platform": platform.platform(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_memory_MB"] = round(torch.cuda.get_device_properties(0).total_memory / MIB)
    return info


def busy_warning(threshold: float = 0.5) -> str | None:
    """A warning if the machine is already busy (1-minute load average above ``threshold``), else None.

    On a 2-core machine any other CPU-bound job makes OpenMP threads wait for each other: small kernels then
    slow down by 10-100x and the numbers mean nothing.
    """
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load <= threshold:
        return None
    return (
        f"WARNING: 1-minute load average {load:.2f} on {os.cpu_count()} cores before the start: something else "
        "is running, so these numbers are not a measurement of this code"
    )


def describe_environment(info: Mapping[str, Any]) -> str:
    threads = f"{info['cpu_count']} CPU cores, torch threads {info['torch_threads']}"
    return (
        f"{info['date']} | {info['device']}: {info['device_name']} | {threads} | torch {info['torch']}, "
        f"nnunetv2 {info['nnunetv2']}, python {info['python']} | git {info['git_revision']}"
    )


# -- statistics, formatting -------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` significant digits (no scientific notation for normal magnitudes)."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    decimals = max(0, digits - 1 - int(f"{magnitude:e}".split("e")[1]))
    return f"{value:.{decimals}f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{fmt(value)}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown pipe table with aligned columns (paste-ready for BENCHMARKS.md)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_looks_numeric(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _looks_numeric(text: str) -> bool:
    text = text.replace(",", "").replace("×", "").strip()
    if text in ("—", ""):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
