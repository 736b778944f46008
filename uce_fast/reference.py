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
    "mc_accumulate_",
    "mc_finalize",
    "mc_moments",
    "mc_reduce",
    "mc_uncertainty",
    "merge_moments",
    "resample",
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
    return _sigma_and_prediction(*_mean_m2(probs), samples.shape[0], correction)


def resample(samples: Tensor, size: tuple[int, int] | None, align_corners: bool) -> Tensor:
    """Bilinear resampling of the last two dims, as the kernels do it on the fly.

    ``F.interpolate(mode="bilinear")`` computed in float32 (float64 for float64 samples) and
    rounded back to the dtype of ``samples``: the result a model's own upsampling layer gives in
    that dtype on CUDA. With ``size=None`` or the same size, ``samples`` is returned unchanged.

    Args:
        samples: (..., C, h, w) logits, any float dtype.
        size: (H, W) target size, or None.
        align_corners: as in ``F.interpolate``.
    """
    if size is None or tuple(samples.shape[-2:]) == tuple(size):
        return samples
    lead = samples.shape[:-2]
    flat = samples.reshape(-1, *samples.shape[-3:]).to(compute_dtype(samples))
    up = torch.nn.functional.interpolate(
        flat, size=tuple(size), mode="bilinear", align_corners=align_corners
    )
    return up.to(samples.dtype).reshape(*lead, *size)


def _mean_m2(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and sum of squared deviations over dim 0 of a stack of probabilities."""
    if probs.numel() == 0:  # an empty batch or spatial dim (torch's var_mean would warn)
        mean = probs.new_zeros(probs.shape[1:])
        return mean, torch.zeros_like(mean)
    # torch's Welford-style var_mean: identical samples give exactly mean = p and m2 = 0 (a plain
    # sum-then-divide mean can be an ulp off p, leaving a spurious sigma ~ 1e-8).
    var, mean = torch.var_mean(probs, dim=0, correction=0)
    return mean, var * probs.shape[0]


def _sigma_and_prediction(mean: Tensor, m2: Tensor, count: int,
                          correction: int) -> tuple[Tensor, Tensor]:
    """(sigma, pred) from the moments of ``count`` samples: the first argmax of ``mean`` and the
    standard deviation of its probability."""
    pred = mean.argmax(dim=1)
    var = m2.gather(1, pred.unsqueeze(1)).squeeze(1) / (count - correction)
    return var.clamp_min(0).sqrt(), pred


def mc_moments(samples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact (two-pass) moments of a Monte-Carlo stack's softmax probabilities.

    Args:
        samples: (β, B, C, *spatial) logits, any float dtype, β >= 1.

    Returns:
        ``(mean, m2, mean_entropy)``: mean over samples of the probabilities (B, C, *spatial), the
        sum of squared deviations from it (B, C, *spatial), and the mean over samples of each
        sample's entropy ``-Σ_c p log p`` (B, *spatial); float32 (float64 for float64 samples).
    """
    dtype = compute_dtype(samples)
    logp = torch.log_softmax(samples.to(dtype), dim=2)
    probs = logp.exp()
    mean, m2 = _mean_m2(probs)
    # 0·log 0 = 0: a class with probability 0 (a -inf logit) adds nothing.
    plogp = torch.where(probs > 0, probs * logp, torch.zeros((), dtype=dtype, device=probs.device))
    mean_entropy = -plogp.sum(dim=2).mean(dim=0)
    return mean, m2, mean_entropy


def merge_moments(
    first: tuple[Tensor, Tensor, Tensor], n_first: int,
    second: tuple[Tensor, Tensor, Tensor], n_second: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of the union of two sets of samples (Chan et al.'s parallel Welford merge).

    Each argument is ``(mean, m2, mean_entropy)`` as returned by :func:`mc_moments`, over
    ``n_first`` and ``n_second`` samples.
    """
    n = n_first + n_second
    mean_a, m2_a, ent_a = first
    mean_b, m2_b, ent_b = second
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_second / n)
    m2 = m2_a + m2_b + delta.square() * (n_first * n_second / n)
    ent = ent_a + (ent_b - ent_a) * (n_second / n)
    return mean, m2, ent


def mc_finalize(
    mean: Tensor, m2: Tensor, mean_entropy: Tensor, count: int, correction: int = 1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uncertainty maps from the moments of ``count`` samples.

    Args:
        mean, m2: (B, C, *spatial) mean and sum of squared deviations of the probabilities.
        mean_entropy: (B, *spatial) mean per-sample entropy.
        count: number of samples; ``correction`` < ``count``.
        correction: divisor offset of the standard deviation (1 = unbiased).

    Returns:
        ``(sigma, pred, entropy, mutual_info)``, each (B, *spatial): the standard deviation of
        the predicted class's probability, the predicted class (int64; first maximum of ``mean``),
        the predictive entropy ``H(mean)`` and the mutual information (BALD)
        ``H(mean) - mean_b H(p_b)``, clamped at 0 (it is >= 0 up to rounding).
    """
    sigma, pred = _sigma_and_prediction(mean, m2, count, correction)
    entropy = torch.special.entr(mean).sum(dim=1)
    mutual_info = (entropy - mean_entropy).clamp_min(0)
    return sigma, pred, entropy, mutual_info


def _flat_moments(samples: Tensor, in_size: tuple[int, int], out_size: tuple[int, int],
                  align_corners: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of samples (S, B, C, in_h·in_w), upsampled to out_size, flattened to (…, N)."""
    S, B, C, _ = samples.shape
    if tuple(in_size) != tuple(out_size):
        samples = resample(samples.view(S, B, C, *in_size), out_size, align_corners)
    return mc_moments(samples.reshape(S, B, C, -1))


def mc_accumulate_(mean: Tensor, m2: Tensor, entropy: Tensor, samples: Tensor, count: int,
                   in_size: tuple[int, int], out_size: tuple[int, int],
                   align_corners: bool) -> None:
    """The "torch" backend of the ``uce_fast::mc_accumulate_`` op (contract in ``uce_fast.ops``):
    folds samples (S, B, C, in_h·in_w) into the state mean/m2 (B, C, N), entropy (B, N) in place
    (exact moments of the new samples merged into the state's)."""
    new = _flat_moments(samples, in_size, out_size, align_corners)
    if count > 0:
        new = merge_moments((mean, m2, entropy), count, new, samples.shape[0])
    for state, value in zip((mean, m2, entropy), new, strict=True):
        state.copy_(value)


def mc_reduce(samples: Tensor | None, mean: Tensor | None, m2: Tensor | None,
              entropy: Tensor | None, count: int, in_size: tuple[int, int],
              out_size: tuple[int, int], align_corners: bool, correction: int, want_probs: bool,
              want_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The "torch" backend of the ``uce_fast::mc_reduce`` op (contract in ``uce_fast.ops``):
    ``(sigma, pred, entropy, mutual_info, mean_probs)`` of the state plus the samples; the
    entropy pair and mean_probs are empty (0,) tensors unless asked for."""
    state = None if count == 0 else (mean, m2, entropy)
    total = count
    if samples is not None:
        new = _flat_moments(samples, in_size, out_size, align_corners)
        state = new if state is None else merge_moments(state, count, new, samples.shape[0])
        total += samples.shape[0]
    sigma, pred, ent, mutual_info = mc_finalize(*state, total, correction)
    empty = sigma.new_empty((0,))
    if not want_entropy:
        ent = mutual_info = empty
    mean_probs = empty
    if want_probs:  # a new tensor, never the caller's state
        mean_probs = state[0] if samples is not None else state[0].clone()
    return sigma, pred, ent, mutual_info, mean_probs


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
    valid: Tensor | None = None,
    ood: Tensor | None = None,
    ood_scale: float = 0.0,
) -> Tensor:
    """Per-pixel cross-entropy, multiplied by a per-pixel weight, with torch's CE options, and
    entropy maximisation at out-of-distribution pixels.

    Args:
        input: (B, C, *spatial) logits, float16/bfloat16/float32/float64.
        target: (B, *spatial) int64 class indices; pixels equal to ``ignore_index`` give 0.
        pixel_weight: (B, *spatial) weight per pixel, or None for 1.
        weight: (C,) class weights as in ``F.cross_entropy``, or None.
        ignore_index: target value that is ignored.
        label_smoothing: ε in [0, 1], as in ``F.cross_entropy``.
        valid: (B, *spatial) bool mask of the pixels of a known class that count; default: label
            in [0, C) and not ``ignore_index`` (labels outside the range are treated as ignored).
        ood: (B, *spatial) bool mask of out-of-distribution pixels (disjoint from ``valid``), or
            None. Their loss is ``ood_scale`` times the cross-entropy against the uniform
            distribution, ``(1/C) Σ_c weight_c (-log p_c)`` (label smoothing with ε = 1), without
            ``pixel_weight``.
        ood_scale: the weight of the ``ood`` pixels; default 0.

    Returns:
        (B, *spatial) per-pixel loss in float32 (float64 for float64 input); exactly 0 where the
        target is ignored, and so is its gradient there, also for non-finite logits or pixel
        weights. With ``pixel_weight=None`` and no ``ood`` this equals
        ``F.cross_entropy(..., reduction="none")``.
    """
    dtype = compute_dtype(input)
    num_classes = input.shape[1]
    if valid is None:
        valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    counted = valid if ood is None else valid | ood
    safe_target = torch.where(valid, target, 0)
    zero = torch.zeros((), dtype=dtype, device=input.device)
    # Ignored pixels contribute exactly 0 to the loss and to the gradient, whatever their logits
    # and pixel weight (NaN and inf included): they are replaced by constants before any
    # arithmetic, so no 0 * NaN reaches the backward.
    logits = torch.where(counted.unsqueeze(1), input.to(dtype), zero)
    logp = torch.log_softmax(logits, dim=1)
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
        loss = loss * torch.where(valid, pixel_weight.detach().to(dtype), zero)
    loss = torch.where(valid, loss, zero)
    if ood is not None:
        loss = torch.where(ood, (ood_scale / num_classes) * smooth, loss)
    return loss
