"""CPU forward+backward of U-CE: fused kernel vs sigma-then-loss vs reference vs official-code
style vs plain CE, and a copy of the stack (``dst.copy_(stack)``: reading it once and writing it
once, the yardstick a single pass over the stack is measured against).

Shape of the brief: β=10, B=2, C=19, 256×256, fp32. Time is the pytest-benchmark median; peak
memory is the RSS growth of one forward+backward in a fresh subprocess (``peak_rss.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from baselines import make_inputs
from implementations import CPU_NAMES, IMPLEMENTATIONS, usable

SHAPE = dict(beta=10, batch=2, classes=19, size=(256, 256))
SHAPE_ID = "β=10 B=2 C=19 256² fp32"
NAMES = list(CPU_NAMES)
ROUNDS = {"official-style": 5, "torch-backend": 5}
COPY = "stack copy"


def _param(name):
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        not usable(name), reason=f"{name} needs a backend not available here"))


@pytest.mark.parametrize("name", [_param(n) for n in NAMES])
def test_time_forward_backward(benchmark, record, name):
    torch.manual_seed(0)
    fn = IMPLEMENTATIONS[name]
    logits, target, stack = make_inputs(SHAPE["beta"], SHAPE["batch"], SHAPE["classes"],
                                        SHAPE["size"])

    def step():
        logits.grad = None
        fn(logits, target, stack).backward()

    benchmark.group = f"cpu fwd+bwd {SHAPE_ID}"
    benchmark.pedantic(step, rounds=ROUNDS.get(name, 20), warmup_rounds=1)
    record("cpu", shape=SHAPE_ID, impl=name, median_s=benchmark.stats.stats.median)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_time_stack_copy(benchmark, record):
    torch.manual_seed(0)
    _, _, stack = make_inputs(SHAPE["beta"], SHAPE["batch"], SHAPE["classes"], SHAPE["size"])
    dst = torch.empty_like(stack)
    benchmark.group = f"cpu fwd+bwd {SHAPE_ID}"
    benchmark.pedantic(dst.copy_, args=(stack,), rounds=20, warmup_rounds=1)
    record("cpu", shape=SHAPE_ID, impl=COPY, median_s=benchmark.stats.stats.median)
    assert torch.equal(dst, stack)


@pytest.mark.parametrize("name", [_param(n) for n in NAMES])
def test_peak_memory(record, name):
    script = Path(__file__).with_name("peak_rss.py")
    size = SHAPE["size"]
    out = subprocess.run(
        [sys.executable, str(script), name, str(SHAPE["beta"]), str(SHAPE["batch"]),
         str(SHAPE["classes"]), str(size[0]), str(size[1])],
        check=True, capture_output=True, text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    record("cpu", shape=SHAPE_ID, impl=name, extra_bytes=result["extra_bytes"],
           stack_bytes=result["stack_bytes"])
    assert 0 < result["extra_bytes"] < 10 * result["stack_bytes"]
