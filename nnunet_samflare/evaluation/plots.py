"""Figures for evaluation and profiling results.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never through pyplot:
no display is needed and no global figure state leaks between calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nnunet_samflare.io import atomic_output
from nnunet_samflare.labels import FLARE_LABELS

#: File endings the Agg canvas writes (matplotlib's ``FigureCanvasAgg.get_supported_filetypes()`` less the
#: PostScript ones), checked before any scoring.
PLOT_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg", "tif", "tiff", "webp")

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _new_figure(width: float, height: float, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    return figure, axes


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:  # the temporary keeps the name's ending, which picks the format
        figure.savefig(tmp, dpi=120)
    return path


def plot_metrics(result: Mapping, path: str | Path) -> Path:
    """Per-label box plots of DSC (top) and NSD (bottom) over the scored cases of an evaluation result."""
    cases = result["cases"]
    labels = [str(lb) for lb in result["summary"]["settings"]["labels"]]
    names = [FLARE_LABELS.get(int(lb), lb) for lb in labels]
    figure, axes = _new_figure(max(6.0, 0.6 * len(labels) + 2), 7.0, rows=2)
    for ax, metric in zip(axes, ("DSC", "NSD")):
        values = [[c[lb][metric] for c in cases.values() if c.get(lb) is not None] for lb in labels]
        ax.boxplot(values, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), names, rotation=45, ha="right")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    settings = result["summary"]["settings"]
    axes[0].set_title(
        f"{len(cases)} case(s); NSD cut-off {settings['nsd_cutoff']}, "
        f"slab quirk {'on' if settings['official_slab_quirk'] else 'off'}"
    )
    return _save(figure, path)


def plot_memory_curve(
    time_s: Sequence[float],
    ram_mb: Sequence[float],
    path: str | Path,
    *,
    gpu_mb: Sequence[float] | None = None,
    gpu_own_mb: Sequence[float | None] | None = None,
    title: str = "",
) -> Path:
    """GPU memory (device-wide and the process tree's own) and host RAM of one run against time."""
    rows = 2 if gpu_mb is not None else 1
    figure, axes = _new_figure(7.0, 2.6 * rows + 0.6, rows=rows)
    if gpu_mb is not None:
        ax = axes[0]
        ax.plot(time_s, gpu_mb, label="GPU, device-wide")
        if gpu_own_mb is not None and any(v is not None for v in gpu_own_mb):
            ax.plot(time_s, [float("nan") if v is None else v for v in gpu_own_mb], label="GPU, own processes")
        ax.set_ylabel("GPU memory (MB)")
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    else:
        title = f"{title} (no GPU figures: no NVML or nvidia-smi)".strip()
    axes[-1].plot(time_s, ram_mb, color="tab:green", label="host RAM (PSS of the process tree)")
    axes[-1].set_ylabel("RAM (MB)")
    axes[-1].set_xlabel("time (s)")
    axes[-1].legend(loc="upper left", fontsize="small")
    axes[-1].grid(alpha=0.3)
    axes[0].set_title(title)
    return _save(figure, path)
