"""The Triton backend's correctness suite on a machine without a GPU: the triton-parametrised
tests run in a subprocess under Triton's interpreter (``TRITON_INTERPRET=1`` must be set before
Triton is imported, so not in this process), on small shapes (``UCE_FAST_TEST_SMALL=1``).

The run must account for every test it selects: as many results as ``--collect-only`` finds for
the same selection, none failed, none errored and none skipped. The selection leaves out the
``slow`` tests, which are the ones that skip by design here (full-size shapes, a GPU's memory).
With CUDA the same tests run natively in the ordinary suite instead."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FILES = ["test_functional.py", "test_functional_errors.py", "test_functional_ood.py", "test_ops.py",
         "test_triton_kernels.py", "test_accumulator.py", "test_testing.py"]
SELECTION = [*(str(Path("tests") / name) for name in FILES), "-k", "triton", "-m", "not slow"]

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed"),
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="CUDA is available: the Triton tests run natively in the suite"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="already under the interpreter: the Triton tests run in-process"),
]


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "UCE_FAST_TEST_SMALL": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True)


def test_triton_suite_under_interpreter(tmp_path):
    listing = _pytest("--collect-only", "-q", *SELECTION)
    assert listing.returncode == 0, listing.stdout[-4000:] + listing.stderr[-2000:]
    selected = sum(1 for line in listing.stdout.splitlines() if "::" in line)
    assert selected > 0, listing.stdout[-4000:]

    report = tmp_path / "report.xml"
    result = _pytest("-q", "-x", f"--junitxml={report}", *SELECTION)
    output = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    suites = ET.parse(report).getroot().iter("testsuite")
    counts = {key: 0 for key in ("tests", "failures", "errors", "skipped")}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    assert counts == {"tests": selected, "failures": 0, "errors": 0, "skipped": 0}, output
