"""Functional U-CE: input validation, backend choice and the reduction, shared by every backend.

Backends compute the per-pixel loss; the reduction happens here, in torch, so it is the same for all
of them (deterministic, no atomics, no host synchronisation beyond the label check, which
``check_labels=False`` skips).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uce_fast import reference
from uce_fast._dispatch import (
    BACKENDS,
    FLOAT_DTYPES,
    available_backends,
    check_device,
    check_mc_stack,
    check_tensor,
    kernel_ops,
    label_mask,
    resolve_backend,
)
from uce_fast.accumulator import MCAccumulator, MCStats

__all__ = [
    "BACKENDS",
    "available_backends",
    "mc_stats",
    "predictive_uncertainty",
    "resolve_backend",
    "uce_loss",
]

_REDUCTIONS = ("mean", "sum", "none")
#: λ of the entropy-maximisation term when ``ood_index`` is given without ``ood_weight``: the
#: value of Chan, Rottmann & Gottschalk (ICCV 2021).
DEFAULT_OOD_WEIGHT = 0.9


def _reduce(
    per_pixel: Tensor,
    target: Tensor,
    weight: Tensor | None,
    known: Tensor | None,
    ood: Tensor | None,
    ood_scale: float,
    reduction: str,
    avg_non_ignore: bool,
) -> Tensor:
    """The reduction of the per-pixel loss. "mean" divides by the weight of the counted pixels:
    per known pixel its class weight (1 without ``weight``), per OoD pixel ``ood_scale`` times
    the mean class weight (the weight of the uniform target, as the class weight is that of a
    one-hot one). ``known`` and ``ood`` are the masks of known-class and OoD pixels (``ood``
    None when entropy maximisation is off)."""
    if reduction == "none":
        return per_pixel
    total = per_pixel.sum()
    if reduction == "sum":
        return total
    if not avg_non_ignore:
        return total / target.numel()
    if weight is None:
        count = known.sum()
        if ood is not None:
            count = count + ood_scale * ood.sum()
        return total / count
    class_weight = weight.detach().to(per_pixel.dtype)
    count = torch.where(known, class_weight[torch.where(known, target, 0)], 0).sum()
    if ood is not None:
        count = count + ood_scale * class_weight.mean() * ood.sum()
    return total / count


def _ood_scale(ood_index: int | None, ood_weight: float | None, num_classes: int,
               ignore_index: int) -> float:
    """The weight r = λ / (1 - λ) of an OoD pixel relative to a known one (0 when off)."""
    if ood_index is None:
        if ood_weight is not None:
            raise ValueError("ood_weight is the weight of the pixels labelled ood_index: give "
                             "ood_index too (or leave ood_weight unset)")
        return 0.0
    if isinstance(ood_index, bool) or not isinstance(ood_index, int):
        raise TypeError(f"ood_index must be an int or None, got {type(ood_index).__name__}")
    if 0 <= ood_index < num_classes or ood_index == ignore_index:
        raise ValueError(
            f"ood_index must be a label outside the classes [0, {num_classes}) and other than "
            f"ignore_index ({ignore_index}), got {ood_index}")
    lam = DEFAULT_OOD_WEIGHT if ood_weight is None else ood_weight
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam < 1.0:
        raise ValueError(f"ood_weight must be a number in [0, 1), got {ood_weight!r}")
    return float(lam) / (1.0 - float(lam))


def uce_loss(
    input: Tensor,
    target: Tensor,
    samples: Tensor | MCAccumulator | None = None,
    *,
    sigma: Tensor | None = None,
    alpha: float = 10.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    avg_non_ignore: bool = True,
    correction: int = 1,
    backend: str = "auto",
    align_corners: bool | None = None,
    check_labels: bool = True,
    ood_index: int | None = None,
    ood_weight: float | None = None,
) -> Tensor:
    """Uncertainty-aware cross-entropy (U-CE), optionally with entropy maximisation.

    ``loss_n = (1 + sigma_n) ** alpha * CE(input[:, :, n], target_n)``, where ``sigma_n`` is the
    standard deviation over the Monte-Carlo samples of the softmax probability of the class whose
    mean probability is highest. Gradient flows to ``input`` only.

    Entropy maximisation (Chan, Rottmann & Gottschalk, ICCV 2021): pixels labelled ``ood_index``
    (out-of-distribution proxy objects) get the cross-entropy against the uniform distribution,
    ``-(1/C) Σ_c log p_c`` (label smoothing with ε = 1; class-weighted with ``weight``), weighted
    ``λ = ood_weight`` against ``1 - λ`` for the known pixels — per pixel ``λ / (1 - λ)`` relative
    to a known pixel's weight 1 — and without the U-CE factor: sigma measures how the MC samples
    disagree about the predicted known class, which says nothing about a pixel of no known class,
    and the factor (up to (1 + sigma)^alpha) would rescale the term the paper balances with λ.
    "mean" divides by ``(1 - λ)·#known + λ·#OoD`` (scaled by ``1 / (1 - λ)``: ``#known +
    λ/(1 - λ)·#OoD``), so with λ = 0, or without OoD pixels, the loss is exactly the one without
    them; "sum" and "none" are the paper's per-pixel terms divided by ``1 - λ``.

    Args:
        input: (B, C, *spatial) logits with gradient; float32, float16 or bfloat16 (float64 on the
            "torch" backend). Any number of spatial dims, none included.
        target: (B, *spatial) int64 class indices in [0, C), ``ignore_index`` or ``ood_index``.
        samples: (β, B, C, *spatial) logits of β >= 2 stochastic (MC-dropout) forward passes, any
            float dtype; treated as constants. Or (β, B, C, h, w) at a lower resolution than a
            (B, C, H, W) ``input``: upsampled inside the kernels as
            ``F.interpolate(mode="bilinear", align_corners=align_corners)``. Or an
            :class:`MCAccumulator` of shape (B, C, *spatial). Give exactly one of ``samples`` and
            ``sigma``; with ``alpha=0`` neither is needed (every U-CE factor is 1: plain CE).
        sigma: (B, *spatial) precomputed predictive uncertainty (see ``predictive_uncertainty``).
        alpha: exponent of the weight ``(1 + sigma) ** alpha``; default 10 (the paper's best).
            With ``alpha=0`` the loss equals ``F.cross_entropy`` with the same options.
        ignore_index: target value that contributes neither loss nor gradient; default -100.
        reduction: "mean" (default), "sum" or "none" (per-pixel map (B, *spatial), 0 where
            ignored).
        weight: (C,) class weights as in ``F.cross_entropy``; default None.
        label_smoothing: ε in [0, 1] as in ``F.cross_entropy``; default 0.
        avg_non_ignore: with "mean", divide by the number of non-ignored pixels (by the sum of
            their class weights when ``weight`` is given, as torch does) — the default, as the
            official code; False divides by all B·∏spatial pixels (the paper's Algorithm 1).
        correction: standard-deviation divisor offset over the β samples; 1 (unbiased, default).
        backend: "auto" (default), "torch", "cpu", "cuda" or "triton"; see ``available_backends``.
        align_corners: bilinear convention for low-resolution ``samples``, required with
            them: the model's own (True for smp's DeepLabV3+ head, False for torchvision's).
        check_labels: raise ``ValueError`` for a label outside [0, C) that is not
            ``ignore_index`` (default True). On a GPU the check costs one host synchronisation
            per call; ``False`` skips it for the hot path, and such a label is then treated as
            ``ignore_index`` (no loss, no gradient, not counted by the mean; never read out of
            bounds), as during CUDA graph capture, where the check cannot run.
        ood_index: the label of out-of-distribution pixels (outside [0, C), not
            ``ignore_index``), which get the entropy-maximisation term; default None (off).
        ood_weight: λ in [0, 1), the weight of that term against ``1 - λ`` for the known pixels;
            default 0.9 (the paper's) when ``ood_index`` is given. λ = 0 ignores those pixels.

    Returns:
        float32 loss (float64 for float64 input on the "torch" backend): a scalar, or the
        per-pixel map (B, *spatial) with ``reduction="none"``.
    """
    input = check_tensor("input", input, FLOAT_DTYPES, "float32, float16 or bfloat16")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (B, C, *spatial), got {tuple(input.shape)}")
    device = input.device
    batch, num_classes, spatial = input.shape[0], input.shape[1], tuple(input.shape[2:])
    target = check_tensor("target", target, (torch.int64,), "int64 class indices")
    if tuple(target.shape) != (batch, *spatial):
        raise ValueError(
            f"target must have shape (B, *spatial) = {(batch, *spatial)} to match input "
            f"{tuple(input.shape)}, got {tuple(target.shape)}"
        )
    check_device("target", target, device)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    if samples is None and sigma is None and alpha == 0:
        sigma = input.new_zeros(target.shape, dtype=torch.float32)  # every factor is 1: CE
    if samples is None and sigma is None:
        raise ValueError(
            "U-CE needs the Monte-Carlo samples of the model: call it as criterion(logits, "
            "target, samples) with samples = uce_fast.MCSampler(model).sample(inputs, beta=10) "
            "(an MCAccumulator; or uce_fast.mc_sample, or a (β, B, C, *spatial) stack of β "
            "passes with dropout on), or give sigma= (B, *spatial); with alpha=0 (plain CE) "
            "neither is needed")
    if samples is not None and sigma is not None:
        raise ValueError("give exactly one of samples (β, B, C, *spatial) and sigma (B, *spatial)")
    if isinstance(samples, MCAccumulator):
        if samples.shape != tuple(input.shape) or samples._device != device:
            raise ValueError(
                f"samples (an MCAccumulator) must have shape input.shape = {tuple(input.shape)} "
                f"on {device}, got shape {samples.shape} on {samples._device}")
        sigma, samples = samples.sigma(correction), None
    elif samples is not None:
        check_mc_stack(samples, correction)
        check_device("samples", samples, device)
        samples = samples.detach()
        if tuple(samples.shape[1:]) != tuple(input.shape):
            if samples.dim() != 5 or tuple(samples.shape[1:3]) != (batch, num_classes):
                raise ValueError(
                    f"samples must have shape (β, *input.shape) = "
                    f"(β, {', '.join(map(str, input.shape))}), or (β, B, C, h, w) to be "
                    f"upsampled to a (B, C, H, W) input, got {tuple(samples.shape)}")
            stack = MCAccumulator._of_stack(samples, spatial, align_corners, backend)
            sigma, samples = stack.sigma(correction), None
    else:
        sigma = check_tensor("sigma", sigma, FLOAT_DTYPES, "a floating tensor (B, *spatial)")
        if tuple(sigma.shape) != tuple(target.shape):
            raise ValueError(
                f"sigma must have shape (B, *spatial) = {tuple(target.shape)}, "
                f"got {tuple(sigma.shape)}"
            )
        check_device("sigma", sigma, device)
        sigma = sigma.detach()
    if weight is not None:
        weight = check_tensor("weight", weight, FLOAT_DTYPES, "a floating tensor (C,)")
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(
                f"weight must have shape (C,) = ({num_classes},), got {tuple(weight.shape)}"
            )
        check_device("weight", weight, device)
        weight = weight.detach()
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(check_labels, bool):
        raise TypeError(f"check_labels must be a bool, got {type(check_labels).__name__}")
    ood_scale = _ood_scale(ood_index, ood_weight, num_classes, ignore_index)
    # OoD pixels with λ = 0 are exactly ignored ones (their label is still not a bad one).
    ood = target == ood_index if ood_scale > 0 else None

    dtypes = tuple(t.dtype for t in (input, samples, sigma) if t is not None)
    name = resolve_backend(backend, device, dtypes)
    known = None
    if name == "torch":
        known = label_mask(target, num_classes, ignore_index, check_labels, ood_index)
        if samples is not None:
            sigma = reference.mc_uncertainty(samples, correction)[0]
        per_pixel = reference.weighted_cross_entropy(
            input, target, reference.uncertainty_weight(sigma, alpha),
            weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
            valid=known, ood=ood, ood_scale=ood_scale,
        )
    else:
        pixels = math.prod(spatial)
        per_pixel = kernel_ops(name).uce_forward(
            input.contiguous().view(batch, num_classes, pixels),
            target.contiguous().view(batch, pixels),
            None if samples is None
            else samples.contiguous().view(samples.shape[0], batch, num_classes, pixels),
            None if sigma is None else sigma.float().contiguous().view(batch, pixels),
            None if weight is None else weight.float().contiguous(),
            float(alpha), ignore_index, float(label_smoothing), correction, check_labels,
            ignore_index if ood_index is None else ood_index, ood_scale,
        ).view(batch, *spatial)
        if reduction == "mean" and avg_non_ignore:
            if check_labels:  # every label is a class, ignore_index or ood_index
                known = target != ignore_index
                if ood_index is not None:
                    known &= target != ood_index
            else:
                known = label_mask(target, num_classes, ignore_index, False)
    return _reduce(per_pixel, target, weight, known, ood, ood_scale, reduction, avg_non_ignore)


def _stack_or_accumulator(samples: Tensor | MCAccumulator, size: tuple[int, int] | None,
                          align_corners: bool | None, backend: str,
                          correction: int) -> MCAccumulator:
    """The accumulator to finalise: ``samples`` itself, or one holding a whole stack."""
    if isinstance(samples, MCAccumulator):
        if size is not None:
            raise ValueError("size must be None for an MCAccumulator (give it to the accumulator)")
        return samples
    check_mc_stack(samples, correction)
    return MCAccumulator._of_stack(samples, size, align_corners, backend)


def predictive_uncertainty(
    samples: Tensor | MCAccumulator,
    correction: int = 1,
    backend: str = "auto",
    *,
    return_prediction: bool = False,
    size: tuple[int, int] | None = None,
    align_corners: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """U-CE's predictive uncertainty of a Monte-Carlo stack or accumulator.

    Args:
        samples: (β, B, C, *spatial) logits of β >= 2 stochastic forward passes; float32, float16
            or bfloat16 (float64 on the "torch" backend); or an :class:`MCAccumulator`.
        correction: standard-deviation divisor offset; 1 (unbiased, default).
        backend: "auto" (default), "torch", "cpu", "cuda" or "triton" (for a stack).
        return_prediction: also return the predicted class.
        size: (H, W) to resample (β, B, C, h, w) samples to, inside the kernels, as
            ``F.interpolate(mode="bilinear", align_corners=align_corners)``; default None.
        align_corners: bilinear convention with ``size``, required when resampling.

    Returns:
        sigma (B, *spatial) float32: the standard deviation over samples of the softmax
        probability of the class with the highest mean probability (first maximum on ties); with
        ``return_prediction``, ``(sigma, pred)`` where ``pred`` (B, *spatial) is int64.
    """
    acc = _stack_or_accumulator(samples, size, align_corners, backend, correction)
    return acc.sigma(correction, return_prediction=return_prediction)


def mc_stats(
    samples: Tensor | MCAccumulator,
    *,
    size: tuple[int, int] | None = None,
    align_corners: bool | None = None,
    correction: int = 1,
    backend: str = "auto",
) -> MCStats:
    """Monte-Carlo-dropout statistics for inference, in one fused pass over the samples.

    Args:
        samples: (β, B, C, *spatial) logits of β >= 2 stochastic forward passes (float32,
            float16 or bfloat16; float64 on the "torch" backend), or an :class:`MCAccumulator`.
        size: (H, W) to resample (β, B, C, h, w) samples to, inside the kernels, as
            ``F.interpolate(mode="bilinear", align_corners=align_corners)``; default None.
        align_corners: bilinear convention with ``size``, required when resampling.
        correction: standard-deviation divisor offset for ``sigma``; 1 (unbiased, default).
        backend: "auto" (default), "torch", "cpu", "cuda" or "triton" (for a stack).

    Returns:
        :class:`MCStats` ``(mean_probs, pred, sigma, entropy, mutual_info)``: mean softmax
        probabilities (B, C, *spatial), predicted class (int64), U-CE's sigma, predictive entropy
        and mutual information (BALD), each (B, *spatial) float32.
    """
    return _stack_or_accumulator(samples, size, align_corners, backend, correction).stats(
        correction)
