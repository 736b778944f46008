"""The examples in examples/ run as written, a few steps on random data on the CPU. Each needs its
framework (torchvision; lightning and smp; transformers), which the CI installs with torch 2.11's
wheel (``.ci/cuda-stack``); skipped without it."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {
    "torchvision_plain.py": ("torchvision",),
    "lightning_smp.py": ("lightning", "segmentation_models_pytorch"),
    "transformers_segformer.py": ("transformers", "accelerate"),
}


def _param(name, needs):
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        bool(missing), reason=f"needs {', '.join(missing)}"))


@pytest.mark.parametrize("name", [_param(n, needs) for n, needs in EXAMPLES.items()])
def test_example_trains(name):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--steps", "2"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), result.stdout
    assert "'train_pass': 'used'" in result.stdout and "'shared_prefix': 'used:" in result.stdout
