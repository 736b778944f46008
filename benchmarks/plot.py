"""PNG plot of a Monte-Carlo suite's results: peak extra memory and time vs β per pipeline.

``python benchmarks/plot.py benchmarks/results/mc-cpu.json`` redraws it from the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); no PNG written")
        return None
    return plt


def _save(plt, fig, results: Path, data: dict, bottom: float) -> Path:
    """Stamps the machine line at the bottom, writes ``<results stem>.png``, returns its path."""
    fig.text(0.01, 0.01, data.get("machine", ""), fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    out = results.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_mc(results: Path) -> Path | None:
    """Writes ``<results stem>.png`` beside ``results``; None (with a note) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    data = json.loads(results.read_text())
    rows = data["rows"]
    names = list(dict.fromkeys(r["impl"] for r in rows))
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        group = sorted((r for r in rows if r["impl"] == name), key=lambda r: r["beta"])
        betas = [r["beta"] for r in group if "extra_bytes" in r]
        mem_ax.plot(betas, [r["extra_bytes"] / 2**20 for r in group if "extra_bytes" in r],
                    marker="o", label=name)
        betas = [r["beta"] for r in group if "median_s" in r]
        time_ax.plot(betas, [r["median_s"] * 1e3 for r in group if "median_s" in r],
                     marker="o", label=name)
    shape = rows[0]["shape"] if rows else ""
    mem_ax.set(xlabel="β (MC samples)", ylabel="peak extra memory (MiB)", yscale="log",
               title=f"memory, {shape}")
    time_ax.set(xlabel="β (MC samples)", ylabel="β passes + loss fwd+bwd, median (ms)",
                title="time")
    for ax in (mem_ax, time_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(sorted({r["beta"] for r in rows}))
    mem_ax.legend(fontsize=8)
    return _save(plt, fig, results, data, bottom=0.03)


def plot_steps(results: Path) -> Path | None:
    """Writes ``<results stem>.png``: a horizontal bar per training-step variant (median ms),
    labelled with its ratio to CE; None (with a note) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    data = json.loads(results.read_text())
    rows = [r for r in data["rows"] if "median_s" in r and r.get("kind") != "passes"]
    ce = next((r["median_s"] for r in rows if r["impl"] == "CE"), None)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    names = [r["impl"] for r in rows][::-1]
    values = [r["median_s"] * 1e3 for r in rows][::-1]
    bars = ax.barh(names, values, color=["#888" if n.startswith(("CE", "U-CE off")) else "#3a7"
                                         for n in names])
    if ce:
        for bar, value in zip(bars, values, strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {value / (ce * 1e3):.2f}× CE", va="center", fontsize=8)
    ax.set(xlabel="median ms per training step", title=rows[0]["shape"] if rows else "")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlim(0, max(values, default=1) * 1.25)
    return _save(plt, fig, results, data, bottom=0.04)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        path = Path(arg)
        print(plot_steps(path) if path.stem.startswith("step-") else plot_mc(path))
