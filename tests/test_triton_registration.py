"""The Triton ops are registered where ``uce_fast`` is imported, never inside a trace: in a fresh
process under Triton's interpreter (``TRITON_INTERPRET=1``, so on CPU tensors), the very first call
after ``import uce_fast`` is ``torch.compile(fullgraph=True)`` of a function calling
``uce_loss(..., backend="triton")``, for a sample stack and for a given sigma; value and gradient
match ``backend="torch"``. And where Triton cannot run, importing the package does not load it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

FIRST_CALL_COMPILED = r"""
import torch

import uce_fast

assert hasattr(torch.ops.uce_fast, "triton_uce_forward"), "Triton ops not defined at import"
gen = torch.Generator().manual_seed(0)
input = torch.randn(2, 5, 4, 3, generator=gen)
target = torch.randint(0, 5, (2, 4, 3), generator=gen)
target[0, 0, 0] = -100
samples = input + torch.randn(3, 2, 5, 4, 3, generator=gen)
sigma = torch.rand(2, 4, 3, generator=gen)
options = dict(alpha=4.0, label_smoothing=0.1)


def with_samples(x, backend):
    return uce_fast.uce_loss(x, target, samples, backend=backend, **options)


def with_sigma(x, backend):
    return uce_fast.uce_loss(x, target, sigma=sigma, backend=backend, **options)


def value_and_grad(fn, backend):
    x = input.clone().requires_grad_(True)
    loss = fn(x, backend)
    loss.backward()
    return loss.detach(), x.grad


results = [value_and_grad(torch.compile(fn, fullgraph=True, dynamic=False), "triton")
           for fn in (with_samples, with_sigma)]
for fn, (loss, grad) in zip((with_samples, with_sigma), results):
    ref_loss, ref_grad = value_and_grad(fn, "torch")
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=2e-6)
print("compiled first call ok")
"""

NOT_LOADED = r"""
import sys

import torch

import uce_fast

assert not hasattr(torch.ops.uce_fast, "triton_uce_forward"), "Triton ops defined"
assert "uce_fast.triton.ops" not in sys.modules, "uce_fast.triton.ops imported"
print("not loaded ok")
"""


def _run(script: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script], env={**environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_first_call_inside_a_compiled_function():
    result = _run(FIRST_CALL_COMPILED, TRITON_INTERPRET="1", UCE_FAST_TEST_SMALL="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "compiled first call ok" in result.stdout


def test_not_loaded_where_triton_cannot_run():
    result = _run(NOT_LOADED, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "not loaded ok" in result.stdout
