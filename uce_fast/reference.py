"""Pure-PyTorch U-CE: the ``"torch"`` backend and the oracle every other backend is tested against.

Everything here is written with ordinary differentiable torch operations and runs on any device.
Math is done in float32 for float16/bfloat16/float32 inputs and in float64 for float64 inputs, so
that tests can use a float64 run of these same functions as ground truth.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "mc_uncertainty",
    "uncertainty_weight",
    "weighted_cross_entropy",
]


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32: the dtype of the loss's math."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def mc_uncertainty(samples: Tensor, correction: int = 1) -> tuple[Tensor, Tensor]:
    """Predictive uncertainty of a Monte-Carlo stack of logits.

    Args:
        samples: (β, B, C, *spatial) logits of β stochastic forward passes, any float dtype.
        correction: divisor offset of the standard deviation (1 = unbiased, as ``torch.std``).

    Returns:
        ``(sigma, pred)``: ``sigma`` (B, *spatial), float32 (float64 for float64 samples), the
        standard deviation over samples of the softmax probability of the predicted class;
        ``pred`` (B, *spatial) int64, the argmax over classes of the mean probability (first
        maximum on ties, as ``torch.argmax``).
    """
    probs = torch.softmax(samples.to(compute_dtype(samples)), dim=2)
    pred = probs.mean(dim=0).argmax(dim=1)
    std = probs.std(dim=0, correction=correction)
    sigma = std.gather(1, pred.unsqueeze(1)).squeeze(1)
    return sigma, pred


def uncertainty_weight(sigma: Tensor, alpha: float) -> Tensor:
    """The U-CE pixel weight ``(1 + sigma) ** alpha`` (a constant: no gradient flows into it)."""
    return (1.0 + sigma.detach().to(compute_dtype(sigma))).pow(alpha)


def weighted_cross_entropy(
    input: Tensor,
    target: Tensor,
    pixel_weight: Tensor | None = None,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pixel cross-entropy, multiplied by a per-pixel weight, with torch's CE options.

    Args:
        input: (B, C, *spatial) logits, float16/bfloat16/float32/float64.
        target: (B, *spatial) int64 class indices; pixels equal to ``ignore_index`` give 0.
        pixel_weight: (B, *spatial) weight per pixel, or None for 1.
        weight: (C,) class weights as in ``F.cross_entropy``, or None.
        ignore_index: target value that is ignored.
        label_smoothing: ε in [0, 1], as in ``F.cross_entropy``.

    Returns:
        (B, *spatial) per-pixel loss in float32 (float64 for float64 input); exactly 0 where the
        target is ignored. With ``pixel_weight=None`` this equals
        ``F.cross_entropy(..., reduction="none")``.
    """
    dtype = compute_dtype(input)
    logp = torch.log_softmax(input.to(dtype), dim=1)
    num_classes = input.shape[1]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    nll = -logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    if weight is None:
        smooth = -logp.sum(dim=1)
    else:
        class_weight = weight.detach().to(dtype)
        nll = nll * class_weight[safe_target]
        shape = (1, num_classes) + (1,) * (input.dim() - 2)
        smooth = -(logp * class_weight.view(shape)).sum(dim=1)
    loss = nll
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * nll + (label_smoothing / num_classes) * smooth
    if pixel_weight is not None:
        loss = loss * pixel_weight.detach().to(dtype)
    return torch.where(valid, loss, torch.zeros((), dtype=dtype, device=loss.device))
