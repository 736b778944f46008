"""The CPU kernels' instruction-set variants: each runs the CPU parity tests in its own process
(the variant is chosen once per process from the CPU and ``UCE_FAST_CPU_ISA``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import uce_fast

pytestmark = pytest.mark.skipif("cpu" not in uce_fast.available_backends(),
                                reason="the compiled CPU kernels are not built")

ISAS = ["generic", "avx2", "avx512"]


def _run(code: str, isa: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "UCE_FAST_CPU_ISA": isa}
    return subprocess.run([sys.executable, *code.split("\0")], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).parent)


def _best_isa() -> str:
    from uce_fast import _C
    return _C.cpu_isa()


@pytest.mark.parametrize("isa", ISAS)
def test_isa_variant_passes_cpu_parity(isa):
    if ISAS.index(isa) > ISAS.index(_best_isa()):
        pytest.skip(f"this CPU runs at most {_best_isa()!r}")
    probe = _run("-c\0from uce_fast import _C; print(_C.cpu_isa())", isa)
    assert probe.stdout.strip() == isa, probe.stderr
    tests = "\0".join(str(Path(__file__).with_name(name))
                       for name in ("test_functional.py", "test_accumulator.py"))
    result = _run(f"-m\0pytest\0-q\0-x\0-p\0no:cacheprovider\0{tests}\0-k\0cpu and not slow",
                  isa)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
