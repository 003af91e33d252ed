"""Helpers shared by the benchmark scripts: paths, commands, environment, in-process memory probes, tables and JSON.

Running a command while sampling its memory is not here: the scripts use the package's own sampler,
:func:`nnunet_samflare.evaluation.profile.run_and_sample` (what ``samflare profile`` runs), so that both report
the same figures.

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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The example dataset that ships with the package (real CT, FLARE23 ids).
DEFAULT_DATASET = REPO / "nnunet_samflare" / "example_data" / "flare_like"
MIB = 1024 * 1024


# -- commands -----------------------------------------------------------------------------------------------

#: nnU-Net console scripts as entry functions, so that they also work where ``pip --target`` left no scripts
#: (the GPU kit, ``benchmarks/README.md``).
NNUNET_ENTRY_POINTS = {
    "nnUNetv2_plan_and_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:"
    "plan_and_preprocess_entry",
    "nnUNetv2_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:preprocess_entry",
    "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point",
    "nnUNetv2_train": "nnunetv2.run.run_training:run_training_entry",
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


# -- memory of this process -------------------------------------------------------------------------------------


def current_rss_mb() -> float:
    """Resident set size of this process now (MiB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / MIB


def peak_rss_mb() -> float:
    """Largest resident set size of this process so far (MiB).

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own memory map. Not
    ``getrusage().ru_maxrss``: Linux carries the parent's high-water mark into a forked-then-exec'ed child, so a
    measuring process started by a large parent would report the parent's size.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / MIB if sys.platform == "darwin" else value / 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> None:
    """Restart :func:`peak_rss_mb`'s high-water mark at the current RSS (Linux, ``/proc/self/clear_refs``), so that
    the peak of one call can be read after it."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")


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


def announce_busy() -> str | None:
    """:func:`busy_warning`, printed at once (before the minutes of work it warns about) and returned for the report."""
    busy = busy_warning()
    if busy:
        print(busy, flush=True)
    return busy


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
