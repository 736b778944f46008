"""Atomic checkpoints and per-rank RNG state, for exact resumption."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "atomic_save",
    "gather_rng_states",
    "get_rng_state",
    "load_checkpoint",
    "resolve_resume",
    "set_rng_state",
]


def get_rng_state(device: torch.device) -> dict[str, object]:
    """Python, NumPy and torch (CPU and, on CUDA, the current device's) RNG states.

    Stored as tensors, lists and ints only, so checkpoints load with ``weights_only=True``.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, object] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, object], device: torch.device) -> None:
    version, internal, gauss = state["python"]  # type: ignore[misc]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]  # type: ignore[misc]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)  # type: ignore[arg-type]


def gather_rng_states(device: torch.device) -> list[dict[str, object]]:
    """Every rank's RNG state, indexed by rank (a collective under torch.distributed)."""
    state = get_rng_state(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(states, _to_cpu(state))
    return states  # type: ignore[return-value]


def _to_cpu(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def atomic_save(obj: object, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, object]:
    return torch.load(path, map_location="cpu", weights_only=True)


def resolve_resume(resume: str | None, out_dir: str | os.PathLike[str]) -> Path | None:
    """``None`` -> None; ``"auto"`` -> ``<out_dir>/checkpoints/last.pt`` if it exists; else a
    path that must exist."""
    if not resume:
        return None
    if resume == "auto":
        path = Path(out_dir) / "checkpoints" / "last.pt"
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint {path} not found")
    return path
