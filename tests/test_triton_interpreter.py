"""The Triton backend's correctness suite on a machine without a GPU: the triton-parametrised
tests run in a subprocess under Triton's interpreter (``TRITON_INTERPRET=1`` must be set before
Triton is imported, so not in this process), on small shapes (``UCE_FAST_TEST_SMALL=1``).

With CUDA the same tests run natively in the ordinary suite instead."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FILES = ["test_functional.py", "test_functional_errors.py", "test_ops.py", "test_triton_kernels.py",
         "test_accumulator.py"]
# The run selects ~510 tests; a run that skipped the Triton ones would pass only a handful.
MIN_PASSED = 450

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed"),
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="CUDA is available: the Triton tests run natively in the suite"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="already under the interpreter: the Triton tests run in-process"),
]


def test_triton_suite_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "UCE_FAST_TEST_SMALL": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           *(str(Path("tests") / name) for name in FILES), "-k", "triton"]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    output = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed is not None and " failed" not in result.stdout, output
    assert int(passed.group(1)) >= MIN_PASSED, output
