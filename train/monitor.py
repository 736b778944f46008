"""Run output on rank 0: JSONL metrics, TensorBoard, a progress bar, step timing."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

__all__ = ["Progress", "RunLogger", "StepTimer"]


def _clean(value: object) -> object:
    """JSON-safe: NaN/inf -> None, tensors -> numbers, recursively."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunLogger:
    """Appends records to ``<out_dir>/metrics.jsonl`` and mirrors scalars to TensorBoard.

    Only rank 0 writes; on other ranks every method is a no-op. ``fresh=True`` truncates the
    JSONL file (a new run), otherwise records are appended (a resumed run).
    """

    def __init__(self, out_dir: str | os.PathLike[str], rank: int, *, fresh: bool,
                 tensorboard: bool = True) -> None:
        self.active = rank == 0
        self.out_dir = Path(out_dir)
        self._file = None
        self._tb = None
        if not self.active:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / "metrics.jsonl", "w" if fresh else "a")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # tensorboard not installed (or broken)
                print(f"TensorBoard logging off: {type(exc).__name__}: {exc}", flush=True)
            else:
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def record(self, kind: str, step: int, **fields: object) -> None:
        if not self.active or self._file is None:
            return
        entry = {"type": kind, "iteration": step, "time": time.time(), **fields}
        self._file.write(json.dumps(_clean(entry)) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in _scalars(fields):
                self._tb.add_scalar(f"{kind}/{name}", value, step)

    def print(self, message: str) -> None:
        if self.active:
            print(message, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _scalars(fields: dict[str, object], prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out.append((name, float(value)))
        elif isinstance(value, dict):
            out.extend(_scalars(value, f"{name}/"))
    return out


class Progress:
    """Rank 0's progress: a tqdm bar on an interactive terminal (when tqdm is installed), else a
    printed line every 5% of the run (logs and pipes get whole lines, never bar redraws).

    The bar shows the loss and the wall time of the last step (``step=`` postfix) rather than
    tqdm's rate, which at the end is the average over the whole run, warm-up included.
    """

    def __init__(self, total: int, initial: int, active: bool, enabled: bool) -> None:
        self.active = active
        self.bar = None
        self.total = total
        self.every = max(1, total // 20)
        if active and enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="it",
                                file=sys.stderr,
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                           "[{elapsed}<{remaining}{postfix}]")
        self.enabled = enabled

    def update(self, iteration: int, **postfix: object) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.enabled and (iteration % self.every == 0 or iteration == self.total):
            text = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"[{iteration}/{self.total}] {text}", flush=True)

    def write(self, message: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            # Cleared, printed on the bar's own stream, redrawn: never inside the bar's line.
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepTimer:
    """Wall time per phase of a step, averaged over the steps since the last ``summary``.

    On CUDA the device is synchronised at each phase boundary so the times are the GPU's.
    """

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.all_totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.all_steps = 0
        self._last = time.perf_counter()
        self._step_start = 0.0
        self._step_ms = 0.0

    def start(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._last = self._step_start = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self.all_totals[phase] += now - self._last
        self._last = now

    def end_step(self) -> None:
        self.steps += 1
        self.all_steps += 1
        self._step_ms = 1000.0 * (self._last - self._step_start)

    def last_step_ms(self) -> float:
        """Wall milliseconds of the last step, from ``start`` to its last ``lap``."""
        return self._step_ms

    def summary(self) -> dict[str, float]:
        """Mean milliseconds per step and phase since the previous call (and ``total``)."""
        steps = max(self.steps, 1)
        out = {k: 1000.0 * v / steps for k, v in self.totals.items()}
        out["total"] = sum(out.values())
        self.totals.clear()
        self.steps = 0
        return out

    def overall(self) -> dict[str, float]:
        steps = max(self.all_steps, 1)
        out = {k: 1000.0 * v / steps for k, v in self.all_totals.items()}
        out["total"] = sum(out.values())
        return out
