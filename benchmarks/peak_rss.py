"""Peak resident memory of one forward+backward, measured in a fresh process.

Usage: python benchmarks/peak_rss.py NAME BETA BATCH CLASSES H W
Prints JSON: inputs_bytes, stack_bytes and extra_bytes (peak RSS growth during the loss).
"""

from __future__ import annotations

import json
import sys

import torch
from baselines import make_inputs
from implementations import IMPLEMENTATIONS


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Make the peak RSS start from the current RSS (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def peak_rss_bytes() -> int:
    # VmHWM belongs to this process's memory map; getrusage's ru_maxrss would also carry the
    # parent's peak across fork+exec, hiding any growth below it.
    return _status_kib("VmHWM") * 1024


def main(argv: list[str]) -> None:
    name, beta, batch, classes, height, width = argv[0], *map(int, argv[1:6])
    fn = IMPLEMENTATIONS[name]
    # Warm up on a tiny problem so code pages and thread pools are not counted as loss memory.
    fn(*make_inputs(2, 1, classes, (8, 8))).backward()
    logits, target, stack = make_inputs(beta, batch, classes, (height, width))
    reset_peak()
    before = peak_rss_bytes()
    fn(logits, target, stack).backward()
    extra = peak_rss_bytes() - before
    inputs = sum(t.numel() * t.element_size() for t in (logits, target, stack))
    print(json.dumps({"name": name, "inputs_bytes": inputs,
                      "stack_bytes": stack.numel() * stack.element_size(),
                      "extra_bytes": extra, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(sys.argv[1:])
