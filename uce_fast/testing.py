"""Checking a U-CE result against a float64 oracle that accepts either class of a near-tie.

U-CE's weight depends on ``k = argmax_c mean_b softmax(samples)``. Where the two largest mean
probabilities of a pixel differ by less than float32 rounding (near-uniform predictions early in
training make such pixels common: a few per 10⁵), a float32 kernel and a float64 computation may
pick different classes, and so different sigmas. Both are correct float32 answers. The oracle
here is U-CE written from its definition in float64 (softmax of the whole stack, mean, std,
argmax, gather, cross-entropy: no code shared with the package's backends); at every near-tie
pixel it takes the candidate class whose weight reproduces the checked result there, and it
reports how many such pixels there were. Exact ties (equal in float64) keep the first maximum,
as ``torch.argmax``: a kernel that picks another one fails.

Typical use, with ``got_loss`` and ``got_grad`` from any backend::

    ref = uce_oracle(logits, target, samples, got_grad=got_grad, alpha=10.0)
    torch.testing.assert_close(got_grad.double(), ref.grad, ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TIE_RTOL", "OracleResult", "uce_oracle"]

#: Relative gap ``(p_1 - p_c) / p_1`` of mean probabilities under which class ``c`` is a near-tie
#: of the top class ``p_1``: 2^-16 ≈ 1.5e-5, about 64 float32 ulps, above the rounding of a
#: float32 softmax averaged over hundreds of samples, far below any real difference.
TIE_RTOL = 2.0**-16


@dataclass
class OracleResult:
    """The oracle's U-CE, matched to the checked result at near-tie pixels.

    ``loss``: float64, a scalar or (B, *spatial) as the reduction asks. ``grad``: float64
    (B, C, *spatial), the gradient w.r.t. the logits of ``(loss * grad_output).sum()``.
    ``sigma``: (B, *spatial) float64, the sigma used per pixel. ``ties``: counted pixels with a
    near-tie candidate besides the first maximum; ``flips``: those where the checked result
    matched a candidate other than the first maximum.
    """

    loss: Tensor
    grad: Tensor
    sigma: Tensor
    ties: int
    flips: int


def _mean_std(samples: Tensor, correction: int) -> tuple[Tensor, Tensor]:
    """Mean and std over dim 0 of the float64 softmax (over dim 2) of a stack, two passes."""
    beta = samples.shape[0]
    total = torch.zeros_like(samples[0], dtype=torch.float64)
    for s in range(beta):
        total += torch.softmax(samples[s].double(), dim=1)
    mean = total / beta
    sq = torch.zeros_like(mean)
    for s in range(beta):
        sq += (torch.softmax(samples[s].double(), dim=1) - mean) ** 2
    return mean, (sq / (beta - correction)).sqrt()


def _resample(samples: Tensor, spatial: tuple[int, ...], align_corners: bool | None) -> Tensor:
    """A (β, B, C, h, w) stack brought to the logits' (H, W) as the kernels' contract says:
    bilinear in float32, rounded to the samples' dtype."""
    if tuple(samples.shape[3:]) == spatial:
        return samples
    if align_corners is None:
        raise ValueError("samples at another resolution than input need align_corners")
    beta, batch, classes = samples.shape[:3]
    flat = samples.reshape(beta * batch, classes, *samples.shape[3:]).float()
    up = F.interpolate(flat, size=spatial, mode="bilinear", align_corners=align_corners)
    return up.to(samples.dtype).reshape(beta, batch, classes, *spatial)


def uce_oracle(
    input: Tensor,
    target: Tensor,
    samples: Tensor,
    *,
    got_grad: Tensor | None = None,
    got_loss: Tensor | None = None,
    grad_output: Tensor | float = 1.0,
    alpha: float = 10.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    avg_non_ignore: bool = True,
    correction: int = 1,
    align_corners: bool | None = None,
    ood_index: int | None = None,
    ood_weight: float | None = None,
    tie_rtol: float = TIE_RTOL,
) -> OracleResult:
    """U-CE and its logits gradient in float64, from the definition, tie-aware.

    Args:
        input: (B, C, *spatial) logits (any float dtype; upcast to float64).
        target: (B, *spatial) int64; ``ignore_index`` and labels outside [0, C) count as ignored.
        samples: (β, B, C, *spatial) stack, or (β, B, C, h, w) for a (B, C, H, W) input
            (resampled with ``align_corners``, which is then required).
        got_grad: the checked gradient (shape of ``input``) of ``(loss * grad_output).sum()``;
            at near-tie pixels the candidate whose gradient column is closest to it is taken.
        got_loss: the checked per-pixel loss map (``reduction="none"``), used to match when
            ``got_grad`` is not given. With neither, near-ties keep the first maximum.
        grad_output: upstream gradient (a scalar, or (B, *spatial) with ``reduction="none"``).
        alpha, ignore_index, reduction, weight, label_smoothing, avg_non_ignore, correction,
        ood_index, ood_weight: as in :func:`uce_fast.uce_loss` (the OoD pixels' term is
            ``λ/(1-λ) · (-(1/C) Σ_c w_c log p_c)``, without the U-CE factor).
        tie_rtol: the near-tie threshold, relative to the top mean probability.

    Returns:
        :class:`OracleResult`.
    """
    x = input.detach().double().requires_grad_(True)
    classes, spatial = input.shape[1], tuple(input.shape[2:])
    stack = _resample(samples.detach(), spatial, align_corners)
    mean, std = _mean_std(stack, correction)

    valid = (target != ignore_index) & (target >= 0) & (target < classes)
    safe = torch.where(valid, target, 0)
    lam = 0.9 if ood_weight is None else ood_weight
    ood_scale = 0.0 if ood_index is None else lam / (1.0 - lam)
    ood = (target == ood_index) & (target != ignore_index) if ood_scale > 0 else None
    logp = torch.log_softmax(x, dim=1)
    nll = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    cw = None if weight is None else weight.detach().double()
    if cw is not None:
        nll = nll * cw[safe]
        smooth = -(logp * cw.view(1, classes, *([1] * len(spatial)))).sum(1)
    else:
        smooth = -logp.sum(1)
    ce = (1 - label_smoothing) * nll + (label_smoothing / classes) * smooth
    ce = torch.where(valid, ce, 0.0)
    # Entropy maximisation: the CE against the uniform distribution, no U-CE factor.
    ood_term = torch.zeros_like(ce) if ood is None else torch.where(
        ood, ood_scale * smooth / classes, 0.0)
    if reduction in ("none", "sum"):
        scale = torch.ones_like(ce)
    elif not avg_non_ignore:
        scale = torch.full_like(ce, 1.0 / target.numel())
    else:
        denom = (valid.double() if cw is None else torch.where(valid, cw[safe], 0.0)).sum()
        if ood is not None:
            denom = denom + ood_scale * (1.0 if cw is None else cw.mean()) * ood.sum()
        scale = torch.full_like(ce, 1.0) / denom
    upstream = torch.as_tensor(grad_output, dtype=torch.float64, device=ce.device)
    # d/dx of sum_n scale_n * upstream_n * ce_n: the gradient of U-CE is this times w_n per pixel.
    (unit,) = torch.autograd.grad((ce * scale * upstream).sum(), x, retain_graph=True)
    unit_ood = 0.0
    if ood is not None:
        (unit_ood,) = torch.autograd.grad((ood_term * scale * upstream).sum(), x)

    # Candidates: the first maximum, and every class within tie_rtol of it (exact ties aside).
    top = mean.max(dim=1, keepdim=True).values
    first = mean.argmax(dim=1)
    gap = top - mean
    near = (gap > 0) & (gap <= tie_rtol * top)
    near &= valid.unsqueeze(1)
    sigma_first = std.gather(1, first.unsqueeze(1)).squeeze(1)
    sigma = sigma_first.clone()
    tie_pixels = near.any(dim=1)
    ties = int(tie_pixels.sum())
    flips = 0
    if ties and (got_grad is not None or got_loss is not None):
        idx = tie_pixels.nonzero(as_tuple=True)
        cand = near.movedim(1, -1)[idx]                        # (T, C) bool
        cand[torch.arange(cand.shape[0]), first[idx]] = True
        cand_sigma = std.movedim(1, -1)[idx]                   # (T, C)
        cand_w = (1 + cand_sigma) ** alpha
        if got_grad is not None:
            got = got_grad.detach().double().movedim(1, -1)[idx]     # (T, C) columns
            col = unit.movedim(1, -1)[idx]                           # (T, C)
            # err[t, k]: max over classes c of |got[t, c] - w_k * col[t, c]|
            err = (got.unsqueeze(1) - cand_w.unsqueeze(2) * col.unsqueeze(1)).abs().amax(2)
        else:
            got = got_loss.detach().double()[idx]
            err = (got.unsqueeze(1) - cand_w * ce.detach()[idx].unsqueeze(1)).abs()
        err = torch.where(cand, err, torch.inf)
        # The first maximum wins unless another candidate reproduces the result strictly better.
        pick = err.argmin(dim=1)
        first_err = err.gather(1, first[idx].unsqueeze(1)).squeeze(1)
        pick = torch.where(err.gather(1, pick.unsqueeze(1)).squeeze(1) < first_err, pick,
                           first[idx])
        flips = int((pick != first[idx]).sum())
        sigma[idx] = cand_sigma.gather(1, pick.unsqueeze(1)).squeeze(1)

    w = (1 + sigma) ** alpha
    grad = unit * w.unsqueeze(1) + unit_ood
    per_pixel = torch.where(valid, w * ce.detach(), 0.0) + ood_term.detach()
    loss = per_pixel if reduction == "none" else (per_pixel * scale).sum()
    return OracleResult(loss.detach(), grad.detach(), sigma, ties, flips)
