"""The loss implementations a benchmark compares, by name: each ``fn(logits, target, stack)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from baselines import official_style_uce

import uce_fast


def _uce(backend):
    return lambda logits, target, stack: uce_fast.uce_loss(
        logits, target, stack, ignore_index=255, backend=backend)


def _sigma_then_loss(backend):
    """sigma by its own pass (``predictive_uncertainty``), then the loss from it: two calls
    instead of the fused forward's one pass."""
    return lambda logits, target, stack: uce_fast.uce_loss(
        logits, target, sigma=uce_fast.predictive_uncertainty(stack, backend=backend),
        ignore_index=255, backend=backend)


_COMPILED: dict[str, object] = {}


def _compiled_reference(logits, target, stack):
    """torch.compile of the reference ("torch" backend), compiled on its first call per shape
    (a benchmark calls ``torch._dynamo.reset()`` before each shape, so no recompile limit is
    hit). Created on first use, so the CPU suite's subprocesses do not load the compiler."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_uce("torch"), dynamic=False)
    return _COMPILED["fn"](logits, target, stack)


IMPLEMENTATIONS = {
    "fused-cpu": _uce("cpu"),
    "fused-cuda": _uce("cuda"),
    "fused-triton": _uce("triton"),
    "sigma-then-loss-cpu": _sigma_then_loss("cpu"),
    "torch-backend": _uce("torch"),
    "torch.compile(reference)": _compiled_reference,
    "official-style": official_style_uce,
    "F.cross_entropy": lambda logits, target, stack: F.cross_entropy(logits, target,
                                                                     ignore_index=255),
}

#: The backend each implementation needs, where it needs one.
REQUIRES = {"fused-cpu": "cpu", "sigma-then-loss-cpu": "cpu", "fused-cuda": "cuda",
            "fused-triton": "triton"}

#: What each suite compares.
CPU_NAMES = ("fused-cpu", "sigma-then-loss-cpu", "torch-backend", "official-style",
             "F.cross_entropy")
CUDA_NAMES = ("fused-triton", "fused-cuda", "torch-backend", "torch.compile(reference)",
              "official-style", "F.cross_entropy")


def usable(name: str) -> bool:
    need = REQUIRES.get(name)
    return need is None or need in uce_fast.available_backends()
