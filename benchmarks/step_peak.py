"""Peak memory of one training step of a variant (``steps.VARIANTS``), in a fresh process.

Usage: python benchmarks/step_peak.py VARIANT [cpu|cuda]
Prints JSON: ``extra_bytes``, the peak growth over the model, optimiser state and batch during
one step (after a first step that creates the optimiser's momentum buffers and warms up): peak
RSS on CPU, the CUDA caching allocator's ``max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import json
import sys

import torch
from peak_rss import peak_rss_bytes, reset_peak
from steps import CPU, CUDA, make_problem, make_step


def main(argv: list[str]) -> None:
    name = argv[0]
    setting = CUDA if len(argv) > 1 and argv[1] == "cuda" else CPU
    model, optimizer, images, labels = make_problem(setting)
    step = make_step(name, setting, model, optimizer, images, labels)
    step()  # momentum buffers, allocator pools, thread pools
    if setting.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        reset_peak()
        before = peak_rss_bytes()
        step()
        extra = peak_rss_bytes() - before
    print(json.dumps({"name": name, "extra_bytes": extra}))


if __name__ == "__main__":
    main(sys.argv[1:])
