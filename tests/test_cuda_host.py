"""The CUDA kernels on a machine without a GPU: tests/cuda_host/host_suite.py builds the kernels of
csrc/cuda as host C++ against a CUDA emulation (tests/cuda_host/include/cuda_host.h), with
AddressSanitizer and UndefinedBehaviorSanitizer, and runs them through the same launchers as the
torch glue against the reference. The sanitized library needs the ASan runtime preloaded, so the
suite runs in a subprocess; this is its one test here.

That it ran whole is checked against the suite itself, not a count kept here: a first subprocess
collects it (``--collect-only -q``: every case the file defines, before any deselection), the
second runs it with a JUnit XML report, and every collected case must be in that report as passed
(none failed, errored, skipped or missing)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = Path("tests") / "cuda_host" / "host_suite.py"
sys.path.insert(0, str(ROOT / "tests" / "cuda_host"))
import host_build  # noqa: E402

pytestmark = pytest.mark.skipif(
    host_build.compiler() is None or host_build.asan_runtime() is None,
    reason="needs a C++ compiler with AddressSanitizer (c++ and its libasan.so; set CXX to "
    "choose another) to build the CUDA kernels as host code",
)

# Both subprocesses: no cache (no last-failed reordering), no configured addopts (no -k/-m/
# --deselect that a config file could add).
_PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts="]


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def _run(cmd: list[str], env: dict[str, str], what: str) -> tuple[int, str, str]:
    """(exit status, stdout, a summary for failure messages) of a pytest subprocess."""
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=1800)
    except subprocess.TimeoutExpired as e:  # e.g. threads of a block stuck in a barrier
        pytest.fail(f"{what}: timed out after {e.timeout} s\n{_text(e.stdout)[-4000:]}"
                    f"{_text(e.stderr)[-4000:]}")
    # A sanitizer report or an emulation abort starts with its cause: keep stderr's beginning.
    summary = (f"{what} ({time.perf_counter() - start:.0f} s)\n{result.stdout[-6000:]}\n"
               f"stderr:\n{result.stderr[:6000]}")
    return result.returncode, result.stdout, summary


def _collected(stdout: str) -> int:
    """The number of cases ``pytest --collect-only -q`` found, before any deselection: the
    ``N`` of "N tests collected" or of "M/N tests collected (K deselected)"."""
    m = re.search(r"^(?:\d+/)?(\d+) tests? collected", stdout, re.MULTILINE)
    assert m is not None, stdout[-2000:]
    return int(m.group(1))


def _outcomes(report: Path) -> dict[str, str]:
    """test id -> "passed" / "failure" / "error" / "skipped" from a JUnit XML report."""
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        key = f"{case.get('classname')}::{case.get('name')}"
        outcomes[key] = kinds[0] if kinds else "passed"
    return outcomes


def test_cuda_kernels_on_the_host_under_asan():
    with tempfile.TemporaryDirectory(prefix="uce_cuda_host_") as build_dir:
        env = host_build.asan_env({**os.environ, "UCE_CUDA_HOST_BUILD_DIR": build_dir})
        # Collecting imports the suite, which builds the library into build_dir; the run then
        # finds it up to date.
        rc, stdout, summary = _run([*_PYTEST, "--collect-only", "-q", str(SUITE)], env,
                                   "collect")
        assert rc == 0, summary
        expected = _collected(stdout)
        report = Path(build_dir) / "host_suite.xml"
        # -s: a sanitizer report or an emulation abort goes to stderr as it happens; -v: the
        # last test named in stdout is the one that was running.
        rc, _, summary = _run([*_PYTEST, "-v", "-s", f"--junitxml={report}", str(SUITE)], env,
                              "run")
        assert rc == 0, summary
        outcomes = _outcomes(report)
    not_passed = {k: v for k, v in outcomes.items() if v != "passed"}
    assert not not_passed, f"{not_passed}\n{summary}"
    assert expected > 0 and len(outcomes) == expected, (
        f"{len(outcomes)} cases in the report, {expected} collected\n{summary}")
