"""The CUDA kernels on a machine without a GPU: tests/cuda_host/host_suite.py builds the kernels of
csrc/cuda as host C++ against a CUDA emulation (tests/cuda_host/include/cuda_host.h), with
AddressSanitizer and UndefinedBehaviorSanitizer, and runs them through the same launchers as the
torch glue against the reference. The sanitized library needs the ASan runtime preloaded, so the
suite runs in a subprocess; this is its one test here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cuda_host"))
import host_build  # noqa: E402

# The suite has 437 cases; a run that skipped or deselected them would pass only a few.
MIN_PASSED = 430

pytestmark = pytest.mark.skipif(
    host_build.compiler() is None or host_build.asan_runtime() is None,
    reason="needs a C++ compiler with AddressSanitizer (c++ and its libasan.so; set CXX to "
    "choose another) to build the CUDA kernels as host code",
)


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def test_cuda_kernels_on_the_host_under_asan():
    with tempfile.TemporaryDirectory(prefix="uce_cuda_host_") as build_dir:
        env = host_build.asan_env({**os.environ, "UCE_CUDA_HOST_BUILD_DIR": build_dir})
        # -s: a sanitizer report or an emulation abort goes to stderr as it happens; -v: the
        # last test named in stdout is the one that was running.
        cmd = [sys.executable, "-m", "pytest", "-v", "-s", "-p", "no:cacheprovider",
               str(Path("tests") / "cuda_host" / "host_suite.py")]
        start = time.perf_counter()
        try:
            result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                                    timeout=1200)
        except subprocess.TimeoutExpired as e:  # e.g. threads of a block stuck in a barrier
            pytest.fail(f"timed out after {e.timeout} s\n{_text(e.stdout)[-4000:]}"
                        f"{_text(e.stderr)[-4000:]}")
        seconds = time.perf_counter() - start
    # A sanitizer report or an emulation abort starts with its cause: keep stderr's beginning.
    output = (f"(build and run: {seconds:.0f} s)\n{result.stdout[-6000:]}\n"
              f"stderr:\n{result.stderr[:6000]}")
    assert result.returncode == 0, output
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed is not None and " failed" not in result.stdout, output
    assert int(passed.group(1)) >= MIN_PASSED, output
