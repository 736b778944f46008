"""Peak memory of one Monte-Carlo pipeline (β passes + U-CE forward+backward), fresh process.

Usage: python benchmarks/mc_peak.py PIPELINE BETA BATCH CLASSES H W [DEVICE]
Prints JSON: the peak growth over the inputs (peak RSS on CPU, the CUDA caching allocator's
max_memory_allocated on CUDA) during the β passes and the loss forward — the Monte-Carlo part,
``mc_bytes`` — and during the whole step including the backward, ``step_bytes`` (which adds the
logits gradient, the same for every pipeline).
"""

from __future__ import annotations

import json
import sys

import torch
from mc_pipelines import make_problem, run
from peak_rss import peak_rss_bytes, reset_peak


def main(argv: list[str]) -> None:
    name, beta, batch, classes, height, width = argv[0], *map(int, argv[1:6])
    device = torch.device(argv[6] if len(argv) > 6 else "cpu")
    # Warm up on a tiny problem so code pages, thread pools and kernels are not counted.
    run(name, *make_problem(1, classes, (16, 16), device), beta=2).backward()
    logits, target, base = make_problem(batch, classes, (height, width), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = run(name, logits, target, base, beta)
        torch.cuda.synchronize()
        mc = torch.cuda.max_memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        step = torch.cuda.max_memory_allocated() - before
    else:
        reset_peak()
        before = peak_rss_bytes()
        loss = run(name, logits, target, base, beta)
        mc = peak_rss_bytes() - before
        loss.backward()
        step = peak_rss_bytes() - before
    print(json.dumps({"name": name, "beta": beta, "mc_bytes": mc, "step_bytes": step}))


if __name__ == "__main__":
    main(sys.argv[1:])
