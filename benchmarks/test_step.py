"""The whole U-CE training step, DeepLabV3+ R18 (full width, OS16): CE, the official code's U-CE
and U-CE with uce_fast, each sample-pass lever on and off (``steps.py``).

CPU: B=2, 256², β=10, fp32; CUDA (when present): B=4, 768², β=10, bf16 AMP. Time: the median
of whole steps (forward, β passes, loss, backward, SGD) over rounds in which every variant takes
its turn, so that drift of a noisy machine does not bias the ratios. Memory: peak
growth over the model and batch during one step in a fresh process (``step_peak.py``: peak RSS
on CPU, ``max_memory_allocated`` on CUDA). The sample passes are also timed alone: β plain
no-grad passes against the passes with every lever. Results: ``results/step-<device>.json`` /
``.md`` and a plot ``results/step-<device>.png``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from steps import CPU, CUDA, PASSES, VARIANTS, make_passes, make_problem, make_step

SETTINGS = [pytest.param(CPU, id="cpu"),
            pytest.param(CUDA, id="cuda", marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs CUDA"))]
ROUNDS = {"cpu": 7, "cuda": 10}


def _sync(setting) -> None:
    if setting.device == "cuda":
        torch.cuda.synchronize()


def _interleaved_medians(fns: dict, rounds: int, setting) -> dict[str, float]:
    """Median seconds of each callable over ``rounds`` rounds after one warm-up round, the
    callables taking turns within each round, so that a slow drift of the machine weighs on
    every variant alike (the ratios are what the suite reports)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            _sync(setting)
            start = time.perf_counter()
            fn()
            _sync(setting)
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@pytest.mark.parametrize("setting", SETTINGS)
def test_step_and_pass_times(record, setting):
    """Whole steps of every variant, and the sample passes alone, on one model and batch."""
    model, optimizer, images, labels = make_problem(setting)
    steps = {name: make_step(name, setting, model, optimizer, images, labels)
             for name in VARIANTS}
    losses = {name: step() for name, step in steps.items()}
    assert all(math.isfinite(v) for v in losses.values()), losses
    passes = {name: make_passes(name, setting, model, images) for name in PASSES}
    medians = _interleaved_medians({**steps, **passes}, ROUNDS[setting.device], setting)
    for name, median in medians.items():
        record(f"step-{setting.device}", shape=setting.label, impl=name, median_s=median,
               kind="passes" if name in PASSES else "step")


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_step_peak_memory(record, setting, name):
    script = Path(__file__).with_name("step_peak.py")
    # Large blocks straight from mmap and back on free, so RSS follows what is really in use.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(script), name, setting.device], check=True,
                         capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    record(f"step-{setting.device}", shape=setting.label, impl=name,
           extra_bytes=result["extra_bytes"], kind="step")
    assert result["extra_bytes"] > 0
