"""The Monte-Carlo pipelines the accumulator benchmark compares: β sample passes, then U-CE.

A stand-in for a DeepLabV3+ head produces each pass's logits at 1/4 resolution; the full-resolution
pipelines upsample them ×4 (bilinear, ``align_corners=True``) as the head does, the low-resolution
ones hand them to the accumulator, which upsamples inside its kernels. Each pipeline runs the β
passes and the fused loss forward+backward; ``run(name, ...)`` returns the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import uce_fast

#: name -> (description, how the samples are kept)
PIPELINES = {
    "stack": "β full-resolution samples stacked (the official code's layout), fused loss",
    "accumulator": "full-resolution samples streamed into MCAccumulator(store='state')",
    "low-res accumulator": "1/4-resolution samples kept by MCAccumulator(size, capacity=β) "
                           "(store='auto') and upsampled in the fused reduction",
    "low-res streaming": "1/4-resolution samples upsampled inside the update kernel into the "
                         "full-resolution state, MCAccumulator(size, store='state')",
}
UPSCALE = 4


def make_problem(batch: int, classes: int, size: tuple[int, int], device, seed: int = 0):
    """Main logits (with grad) and targets at full resolution, and the head's low-res mean."""
    gen = torch.Generator().manual_seed(seed)
    low = (size[0] // UPSCALE, size[1] // UPSCALE)
    base = (torch.randn(batch, classes, *low, generator=gen) * 2).to(device)
    logits = F.interpolate(base, size, mode="bilinear", align_corners=True)
    target = torch.randint(0, classes, (batch, *size), generator=gen).to(device)
    return logits.requires_grad_(True), target, base


def _head_pass(base: torch.Tensor) -> torch.Tensor:
    """One stochastic pass of the stand-in head: (B, C, H/4, W/4)."""
    return base + torch.randn_like(base)


def _upsample(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(low, size, mode="bilinear", align_corners=True)


def run(name: str, logits: torch.Tensor, target: torch.Tensor, base: torch.Tensor, beta: int,
        backend: str = "auto") -> torch.Tensor:
    """β passes and the loss (forward only; call ``.backward()`` on the result)."""
    size = tuple(logits.shape[-2:])
    if name == "stack":
        samples = None
        for i in range(beta):
            full = _upsample(_head_pass(base), size)
            if samples is None:
                samples = full.new_empty((beta, *full.shape))
            samples[i] = full
            del full
    elif name == "accumulator":
        samples = uce_fast.MCAccumulator(backend=backend, store="state")
        for _ in range(beta):
            samples.update(_upsample(_head_pass(base), size))
    elif name == "low-res accumulator":
        samples = uce_fast.MCAccumulator(size, align_corners=True, backend=backend, capacity=beta)
        for _ in range(beta):
            samples.update(_head_pass(base))
    elif name == "low-res streaming":
        samples = uce_fast.MCAccumulator(size, align_corners=True, backend=backend,
                                         store="state")
        for _ in range(beta):
            samples.update(_head_pass(base))
    else:
        raise KeyError(f"unknown pipeline {name!r}; expected one of {list(PIPELINES)}")
    return uce_fast.uce_loss(logits, target, samples, backend=backend)


def held_bytes(name: str, batch: int, classes: int, size: tuple[int, int], beta: int) -> int:
    """Bytes the samples' container holds after the β passes (float32), by construction."""
    pixels = batch * size[0] * size[1]
    low = pixels // UPSCALE**2
    state = (2 * classes + 1) * pixels * 4
    if name == "stack":
        return beta * classes * pixels * 4
    if name in ("accumulator", "low-res streaming"):
        return state
    kept = beta * classes * low * 4
    return kept if kept <= state else state
