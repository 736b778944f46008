"""Benchmark session plumbing: collect medians and peak memory, write JSON and a Markdown table.

Results land in ``benchmarks/results/<suite>.json`` and ``.md``; ``python benchmarks/render.py``
copies the tables into the README.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

RESULTS_DIR = Path(__file__).parent / "results"
_RECORDS: dict[str, list[dict]] = {}


@pytest.fixture
def record():
    """``record(suite, **row)`` stores one result row for the session's report."""
    def _record(suite: str, **row) -> None:
        _RECORDS.setdefault(suite, []).append(row)
    return _record


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    text = (f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    try:
        from uce_fast import _C

        text += f", CPU kernels: {_C.cpu_isa()}"
    except ImportError:
        pass
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    from report import write_suite  # local import: the report module has no pytest dependency

    for suite, rows in _RECORDS.items():
        write_suite(RESULTS_DIR, suite, rows, machine())
