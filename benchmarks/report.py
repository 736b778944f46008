"""Turn benchmark rows into JSON and Markdown tables (time ratios and memory vs the stack)."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def table(rows: list[dict]) -> str:
    """Markdown: one line per (shape, implementation) with median time, its ratio to a copy of
    the stack (when the "stack copy" row was measured), speed-up over the official-code style
    and peak extra memory as a share of the stack."""
    lines = ["| shape | implementation | median fwd+bwd (ms) | × stack copy "
             "| speed-up vs official-style | peak extra memory (MiB) | extra / stack |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        official = next((r["median_s"] for r in group if r["impl"] == "official-style"), None)
        copy = next((r["median_s"] for r in group if r["impl"] == "stack copy"), None)
        for r in group:
            speedup = f"{official / r['median_s']:.1f}×" if official and "median_s" in r else "—"
            vs_copy = f"{r['median_s'] / copy:.2f}" if copy and "median_s" in r else "—"
            extra = r.get("extra_bytes")
            mem = f"{extra / 2**20:.1f}" if extra is not None else "—"
            share = f"{extra / r['stack_bytes']:.1%}" if extra is not None else "—"
            median = _fmt_ms(r["median_s"]) if "median_s" in r else "—"
            lines.append(f"| {shape} | {r['impl']} | {median} | {vs_copy} | {speedup} | {mem} "
                         f"| {share} |")
    return "\n".join(lines)


def _fmt_bandwidth(nbytes: float | None, seconds: float | None, copy: float | None) -> str:
    if not nbytes or not seconds:
        return "—"
    rate = nbytes / seconds
    share = f" ({rate / copy:.0%})" if copy else ""
    return f"{rate / 1e9:.0f}{share}"


def cuda_table(rows: list[dict]) -> str:
    """Markdown for the CUDA suite: forward and forward+backward medians, speed-up over the
    official-code style (forward+backward), effective bandwidth from counted bytes and its share
    of the measured device-to-device copy bandwidth, and peak extra memory."""
    copy = next((r["copy_bytes_per_s"] for r in rows if r.get("copy_bytes_per_s")), None)
    lines = []
    if copy:
        lines += [f"Device-to-device copy bandwidth (measured, 2 × bytes copied): "
                  f"{copy / 1e9:.0f} GB/s", ""]
    lines += ["| shape | implementation | fwd (ms) | fwd+bwd (ms) | fwd+bwd speed-up vs "
              "official-style | fwd GB/s (% of copy) | fwd+bwd GB/s (% of copy) "
              "| peak extra memory (MiB) | extra / stack |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        official = next((r.get("median_s") for r in group if r["impl"] == "official-style"),
                        None)
        for r in group:
            fwd, both = r.get("fwd_s"), r.get("median_s")
            speedup = f"{official / both:.1f}×" if official and both else "—"
            extra = r.get("extra_bytes")
            mem = f"{extra / 2**20:.0f}" if extra is not None else "—"
            share = f"{extra / r['stack_bytes']:.1%}" if extra is not None else "—"
            lines.append(
                f"| {shape} | {r['impl']} | {f'{fwd * 1e3:.2f}' if fwd else '—'} "
                f"| {f'{both * 1e3:.2f}' if both else '—'} | {speedup} "
                f"| {_fmt_bandwidth(r.get('fwd_bytes'), fwd, copy)} "
                f"| {_fmt_bandwidth(r.get('fwd_bwd_bytes'), both, copy)} | {mem} | {share} |")
    return "\n".join(lines)


def mc_table(rows: list[dict]) -> str:
    """Markdown for the Monte-Carlo suites: per pipeline and β, the median time of β passes plus
    the loss forward+backward, the peak extra memory of the passes and the loss forward (the
    Monte-Carlo memory) and that relative to the full-resolution accumulator's at the same β,
    the peak of the whole step, and the bytes the samples' container holds."""
    lines = ["| shape | pipeline | β | median passes+loss fwd+bwd (ms) "
             "| peak extra, passes+loss fwd (MiB) | vs accumulator "
             "| peak extra, whole step (MiB) | samples held (MiB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    acc = {(r["shape"], r["beta"]): r.get("extra_bytes") for r in rows
           if r["impl"] == "accumulator"}
    for r in rows:
        extra = r.get("extra_bytes")
        ref = acc.get((r["shape"], r["beta"]))
        mem = f"{extra / 2**20:.1f}" if extra is not None else "—"
        rel = f"{extra / ref:.3f}" if extra is not None and ref else "—"
        held = f"{r['held_bytes'] / 2**20:.1f}" if "held_bytes" in r else "—"
        median = _fmt_ms(r["median_s"]) if "median_s" in r else "—"
        step = f"{r['step_bytes'] / 2**20:.1f}" if "step_bytes" in r else "—"
        lines.append(f"| {r['shape']} | {r['impl']} | {r['beta']} | {median} | {mem} | {rel} "
                     f"| {step} | {held} |")
    return "\n".join(lines)


def step_table(rows: list[dict]) -> str:
    """Markdown for the training-step suite: per variant the median step time, its ratio to CE
    and to the official-code style, and the peak extra memory; then the sample passes alone."""
    steps = [r for r in rows if r.get("kind") != "passes"]
    passes = [r for r in rows if r.get("kind") == "passes"]
    by_name = {r["impl"]: r.get("median_s") for r in steps}
    ce, official = by_name.get("CE"), by_name.get("U-CE official-style")
    lines = ["| step | median (ms) | vs CE | vs official-style | peak extra memory (MiB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in steps:
        median = r.get("median_s")
        extra = r.get("extra_bytes")
        lines.append(
            f"| {r['impl']} | {_fmt_ms(median) if median else '—'} "
            f"| {f'{median / ce:.2f}×' if median and ce else '—'} "
            f"| {f'{median / official:.2f}×' if median and official else '—'} "
            f"| {f'{extra / 2**20:.0f}' if extra is not None else '—'} |")
    if passes:
        plain = next((r.get("median_s") for r in passes if "plain" in r["impl"]), None)
        lines += ["", "| sample passes | median (ms) | vs β plain passes |",
                  "| --- | ---: | ---: |"]
        for r in passes:
            median = r.get("median_s")
            lines.append(f"| {r['impl']} | {_fmt_ms(median) if median else '—'} "
                         f"| {f'{median / plain:.2f}×' if median and plain else '—'} |")
    return "\n".join(lines)


def sampler_table(rows: list[dict]) -> str:
    """Markdown for the sampler suite: per model the median time of the β passes each way and
    its ratio to β plain passes, with the levers the sampler found."""
    lines = ["| model | passes | median (ms) | vs β plain passes | levers found |",
             "| --- | --- | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['impl']} | {_fmt_ms(r['median_s'])} "
                     f"| {r['median_s'] / r['plain_s']:.2f}× "
                     f"| {r['levers'] if r['impl'] == 'MCSampler' else ''} |")
    return "\n".join(lines)


def write_suite(directory: Path, suite: str, rows: list[dict], machine: str) -> None:
    merged: dict[tuple, dict] = {}
    for r in rows:  # time and memory of one (shape, impl[, β]) may come from separate tests
        merged.setdefault((r["shape"], r.get("model"), r["impl"], r.get("beta")), {}).update(r)
    rows = list(merged.values())
    (directory / f"{suite}.json").write_text(json.dumps({"machine": machine, "rows": rows},
                                                        indent=2))
    if suite.startswith("mc-"):
        order = list(dict.fromkeys(r["impl"] for r in rows))
        rows.sort(key=lambda r: (r["shape"], order.index(r["impl"]), r["beta"]))
        body = mc_table(rows)
        from plot import plot_mc  # matplotlib is only needed for this plot

        png = plot_mc(directory / f"{suite}.json")
        if png is not None:
            body += f"\n\n![{suite}](docs/{png.name})"
    elif suite.startswith("sampler-"):
        body = f"Shape: {rows[0]['shape']}\n\n{sampler_table(rows)}" if rows else ""
    elif suite.startswith("step-"):
        body = f"Shape: {rows[0]['shape']}\n\n{step_table(rows)}" if rows else ""
        from plot import plot_steps

        png = plot_steps(directory / f"{suite}.json")
        if png is not None:
            body += f"\n\n![{suite}](docs/{png.name})"
    else:
        body = cuda_table(rows) if suite == "cuda" else table(rows)
    (directory / f"{suite}.md").write_text(f"Machine: {machine}\n\n{body}\n")
