"""Peak memory and time vs β of the Monte-Carlo pipelines: stack, accumulator, low-resolution.

β ∈ {2, 4, 10, 16, 32}, C=19, 768² with ×4 upsampling (the DeepLabV3+ head), float32 samples;
B=1 on CPU, B=4 on CUDA. Each row is β stochastic passes of a stand-in head plus the fused U-CE
forward+backward (``mc_pipelines.py``). Time: median of a few rounds in this process. Memory: the
peak growth over the inputs in a fresh process (``mc_peak.py``) during the passes and the loss
forward (the Monte-Carlo memory) and during the whole step (adds the logits gradient). Results go to
``results/mc-<device>.json``/``.md`` and the plot ``results/mc-<device>.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mc_pipelines import PIPELINES, held_bytes, make_problem, run

import uce_fast

BETAS = (2, 4, 10, 16, 32)
CLASSES, SIZE = 19, (768, 768)
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs CUDA"))]
BATCH = {"cpu": 1, "cuda": 4}
ROUNDS = {"cpu": 3, "cuda": 10}


def _shape(device: str) -> str:
    return f"B={BATCH[device]} C={CLASSES} {SIZE[0]}² ×4 fp32"


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name", list(PIPELINES))
def test_mc_time(record, device, beta, name):
    torch.manual_seed(0)
    logits, target, base = make_problem(BATCH[device], CLASSES, SIZE, device)
    times = []
    for i in range(ROUNDS[device] + 1):
        logits.grad = None
        _synchronize(device)
        start = time.perf_counter()
        run(name, logits, target, base, beta).backward()
        _synchronize(device)
        if i:  # the first round warms up
            times.append(time.perf_counter() - start)
    assert torch.isfinite(logits.grad).all()
    times.sort()
    record(f"mc-{device}", shape=_shape(device), impl=name, beta=beta,
           median_s=times[len(times) // 2],
           held_bytes=held_bytes(name, BATCH[device], CLASSES, SIZE, beta),
           backend=uce_fast.functional.resolve_backend("auto", logits.device, (logits.dtype,)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name", list(PIPELINES))
def test_mc_peak_memory(record, device, beta, name):
    script = Path(__file__).with_name("mc_peak.py")
    # Large blocks straight from mmap and back on free, so RSS follows what is really in use.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, str(script), name, str(beta), str(BATCH[device]), str(CLASSES),
         str(SIZE[0]), str(SIZE[1]), device],
        check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    record(f"mc-{device}", shape=_shape(device), impl=name, beta=beta,
           extra_bytes=result["mc_bytes"], step_bytes=result["step_bytes"])
    assert 0 < result["mc_bytes"] <= result["step_bytes"]
