"""The loss implementations a benchmark compares, by name: each ``fn(logits, target, stack)``."""

from __future__ import annotations

import torch.nn.functional as F
from baselines import official_style_uce

import uce_fast


def _uce(backend):
    return lambda logits, target, stack: uce_fast.uce_loss(
        logits, target, stack, ignore_index=255, backend=backend)


IMPLEMENTATIONS = {
    "fused-cpu": _uce("cpu"),
    "fused-cuda": _uce("cuda"),
    "torch-backend": _uce("torch"),
    "official-style": official_style_uce,
    "F.cross_entropy": lambda logits, target, stack: F.cross_entropy(logits, target,
                                                                     ignore_index=255),
}

#: The backend each implementation needs, where it needs one.
REQUIRES = {"fused-cpu": "cpu", "fused-cuda": "cuda"}


def usable(name: str) -> bool:
    need = REQUIRES.get(name)
    return need is None or need in uce_fast.available_backends()
