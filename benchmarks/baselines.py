"""Baselines the fused kernels are measured against, written as users write them today."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def official_style_uce(logits: Tensor, target: Tensor, stack: Tensor, alpha: float = 10.0,
                       ignore_index: int = 255) -> Tensor:
    """U-CE as the paper's official code computes it from its preallocated fp32 (β, B, C, H, W)
    stack: softmax (twice), mean, std, argmax, a per-class ``where`` gather, CE, weight, mean."""
    classes = logits.shape[1]
    probability_map = torch.mean(torch.softmax(stack, dim=2), dim=0)
    uncertainty_map = torch.std(torch.softmax(stack, dim=2), dim=0)
    prediction_map = torch.argmax(probability_map, dim=1)
    sigma = torch.empty(prediction_map.shape, device=stack.device)
    for i in range(classes):
        sigma = torch.where(prediction_map == i, uncertainty_map[:, i], sigma)
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    ignored = torch.sum(target == ignore_index)
    loss = (1 + sigma) ** alpha * ce
    return torch.sum(loss) / (target.numel() - ignored)


def make_inputs(beta: int, batch: int, classes: int, size: tuple[int, ...], *,
                dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                ignore_index: int = 255):
    """Logits (with grad), int64 targets (10% ignored) and a (β, B, C, *size) sample stack,
    each allocated once at its final size (so peak memory before the loss is the inputs')."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty((batch, classes, *size), device=device, dtype=dtype)
    logits.normal_(generator=gen)
    stack = torch.empty((beta, batch, classes, *size), device=device, dtype=dtype)
    stack.normal_(generator=gen)
    target = torch.randint(0, classes, (batch, *size), device=device, generator=gen)
    target.masked_fill_(torch.rand((batch, *size), device=device, generator=gen) < 0.1,
                        ignore_index)
    return logits.requires_grad_(True), target, stack
