"""GPU memory of one device, sampled for :func:`nnunet_samflare.evaluation.sampling.run_and_sample`.

NVML through ``pynvml`` (nvidia-ml-py) gives device-wide and per-process figures; where that is not importable or
cannot open the GPU, a running ``nvidia-smi -lms`` stream gives the device-wide figure only. MB means MiB, as in
nvidia-smi.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

SAMPLE_INTERVAL_S = 0.1
MIB = 1024 * 1024


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

    def __init__(
        self, executable: str, device: int | str, description: dict[str, Any], interval_s: float = SAMPLE_INTERVAL_S
    ):
        self.description = description
        self._latest: tuple[float, float] | None = None  # (MiB, time.monotonic())
        self._message = ""  # the last line that was not a number (nvidia-smi's error, if any)
        self._first = threading.Event()
        period_ms = max(1, round(interval_s * 1000))
        self._stream = subprocess.Popen(
            [
                executable,
                "-i",
                str(device),
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                str(period_ms),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="nvidia-smi reader", daemon=True)
        self._reader.start()

    @classmethod
    def open(
        cls,
        device: int | str,
        *,
        interval_s: float = SAMPLE_INTERVAL_S,
        executable: str = "nvidia-smi",
        timeout_s: float = 30.0,
    ) -> tuple[SmiSampler | None, str | None]:
        """A streaming sampler for ``device`` (index or UUID, as ``nvidia-smi -i`` takes them) once its first
        reading arrived, or (None, why not). Never raises."""
        path = shutil.which(executable)
        if path is None:
            return None, f"{executable} is not on PATH"
        try:
            info = subprocess.run(
                [path, "-i", str(device), "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                stdin=subprocess.DEVNULL,
            )
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
        description = {
            "device": device,
            "name": name.strip() or total.strip(),
            "total_MB": total_mb,
            "source": "nvidia-smi",
        }
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
