"""The benchmark's thread-scaling figure, ``bench_threads.png``.

One panel per shape: the median training-step time (forward + backward) of
``darknet_bn standard`` and of the faster PyTorch variant (``native_batch_norm``
or its ``out=`` overload, whichever is faster at that thread count) against
the thread count, log time axis, the ratio written at each point. With the
"inside a PyTorch process" section, the same two peers measured right after a
PyTorch op are drawn dashed. (``bench.png``, the speedup bars, is
:func:`darknet_bn.bench.plot`.)
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from darknet_bn._bench_common import fmt_size, shape_label, time_unit
from darknet_bn._bench_targets import faster_torch

DN_COLOR = "#1f77b4"
TORCH_COLOR = "#d62728"


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _time_label(s: float, _pos: Any = None) -> str:
    value, unit = time_unit(s)
    return f"{value:g} {unit}"


def ratio_text(r: float) -> str:
    """``3.14159`` -> "3.14x", ``31.4`` -> "31x"."""
    return f"{r:.0f}x" if r >= 10 else f"{r:.2f}x"


def thread_series(cells: Sequence[Dict[str, Any]], shape: Sequence[int]) -> Dict[str, List[Tuple[int, float]]]:
    """(threads, median training-step seconds) of darknet_bn standard and the faster torch variant, for one shape."""
    series: Dict[str, List[Tuple[int, float]]] = {"darknet_bn": [], "torch": []}
    for c in sorted((c for c in cells if list(c["shape"]) == list(shape)), key=lambda c: c["threads"]):
        series["darknet_bn"].append((c["threads"], c["peers"]["darknet_bn_standard"]["train_step_s"]))
        fast = faster_torch(c["peers"], "train_step")
        if fast is not None:
            series["torch"].append((c["threads"], c["peers"][fast]["train_step_s"]))
    return series


def plot_threads(cells: Sequence[Dict[str, Any]], in_torch: Optional[Dict[str, Any]], path: str) -> Optional[str]:
    """Write ``bench_threads.png`` (module docstring); return its path, or None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    import matplotlib.ticker as ticker

    shapes: List[List[int]] = []
    for c in cells:
        if list(c["shape"]) not in shapes:
            shapes.append(list(c["shape"]))
    threads_all = sorted({c["threads"] for c in cells})
    ncols = min(3, len(shapes))
    nrows = math.ceil(len(shapes) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.7 * nrows + 0.9), squeeze=False)
    in_results = (in_torch or {}).get("results", [])
    for i, shape in enumerate(shapes):
        ax = axes[i // ncols][i % ncols]
        series = thread_series(cells, shape)
        lines = [("darknet_bn", DN_COLOR, "o", "darknet_bn standard"),
                 ("torch", TORCH_COLOR, "s", "PyTorch (faster of native / out=)")]
        for key, color, marker, label in lines:
            pts = series[key]
            if pts:
                ax.plot([t for t, _ in pts], [s for _, s in pts], color=color, marker=marker, linewidth=2,
                        label=label)
        rows = sorted((r for r in in_results if list(r["shape"]) == shape), key=lambda r: r["threads"])
        if rows:
            ax.plot([r["threads"] for r in rows], [r["peers"]["darknet_bn_standard"]["train_step_s"] for r in rows],
                    color=DN_COLOR, marker="o", markerfacecolor="white", linestyle="--", linewidth=1.3,
                    label="darknet_bn, right after a PyTorch op")
            ax.plot([r["threads"] for r in rows], [r["peers"][r["torch_peer"]]["train_step_s"] for r in rows],
                    color=TORCH_COLOR, marker="s", markerfacecolor="white", linestyle="--", linewidth=1.3,
                    label="PyTorch, right after a PyTorch op")
        if series["torch"]:
            for (t, d), (_, p) in zip(series["darknet_bn"], series["torch"]):
                below = d <= p  # the label goes on the far side of darknet_bn's point from torch's
                ax.annotate(ratio_text(p / d), (t, d), textcoords="offset points", xytext=(0, -16 if below else 10),
                            ha="center", fontsize=8, color=DN_COLOR, fontweight="bold", zorder=5,
                            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
        ax.set_yscale("log")
        values = [v for line in ax.get_lines() for v in line.get_ydata()]
        narrow = max(values) / min(values) < 4  # less than a factor 4: label more steps than 1, 2, 5
        subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0)
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
        ax.set_xscale("log", base=2)
        ax.set_xticks(threads_all)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_time_label))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(x=0.15, y=0.25)
        ax.grid(which="major", alpha=0.35)
        ax.grid(which="minor", axis="y", alpha=0.12)
        mb = shape[0] * shape[1] * shape[2] * shape[3] * 4 / 1e6
        ax.set_title(f"{shape_label(shape)} ({fmt_size(mb)})", fontsize=10)
        if i % ncols == 0:
            ax.set_ylabel("training step, median per call")
        if i // ncols == nrows - 1:
            ax.set_xlabel("threads")
    for j in range(len(shapes), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.suptitle("Batch-norm training step (forward + backward) vs threads; labels: PyTorch time / darknet_bn time",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06 if nrows > 1 else 0.1, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
