"""Triton kernels of the U-CE loss: the fused forward and the backward (contract:
``uce_fast.ops``). Layout and offsets as in ``tiles``.

The forward computes the weight (1 + sigma)^alpha of each pixel from a given sigma or from the
Monte-Carlo stack, then the weighted, label-smoothed CE of the logits. With a stack and all classes
in registers (C <= 128) the sigma comes from the same device functions as ``mc_reduce``'s
(``mc_kernels._stream_small``, ``_sigma_pred``), in the same program: one read of the stack. With
class chunks the launcher computes it first with ``mc_reduce``'s class-chunked kernel and this
kernel reads it (see ``uce_fast.triton.ops``).

Labels: both kernels treat a bad label (outside [0, C), neither ``ignore_index`` nor
``ood_index``) as ignored and gather with a clamped index, so nothing is read out of bounds; with
``CHECK_LABELS`` the forward also raises a one-word flag for the launcher to report it.

Entropy maximisation: a pixel labelled ``ood_index`` (with ``ood_scale`` > 0) is an OoD pixel:
the CE against the uniform distribution, i.e. label smoothing with ε = 1, weighted by
``ood_scale`` instead of (1 + sigma)^alpha. It needs the smoothing sum, which the ``SMOOTH``
variants form anyway: the launchers choose ``SMOOTH`` when label smoothing or OoD pixels are on,
and those variants select the coefficients (weight, 1 - ε, ε/C) per pixel as ``uce::pixel_ce``
does (three selects per pixel, no further read), so no variant of its own is compiled; the others
only keep ``ood_index`` out of the bad labels (with ``ood_scale`` = 0 such a pixel is ignored).
"""

from __future__ import annotations

import triton
import triton.language as tl

from uce_fast.triton.mc_kernels import _sigma_pred, _stream_small, _tile_sources
from uce_fast.triton.tiles import LN2, LOG2E, NEG_INF, _load_classes, _pixel_tile, _tile_offsets

# ------------------------------------------------------------------------------------- helpers


@triton.jit
def _labels(t_tile, j, nmask, C, ignore_index, ood_index, ood_scale):
    """(valid, ood, bad, class index int32) of a tile of int64 targets, as ``uce::label_code``:
    valid = a label in [0, C) on a real pixel; ood = ood_index on a real pixel while ood_scale > 0
    (ood_index is outside [0, C), or ignore_index to turn it off: then never); bad = a label
    outside [0, C) that is neither ignore_index nor ood_index. The index is the label where it is
    valid and 0 elsewhere, so gathers with it never leave [0, C)."""
    t = tl.load(t_tile + j, mask=nmask, other=ignore_index)
    keep = t != ignore_index
    out = (t < 0) | (t >= C)
    is_ood = keep & (t == ood_index)
    bad = keep & out & (~is_ood)
    valid = keep & (~out) & nmask
    return (valid, is_ood & (ood_scale > 0.0) & nmask, bad & nmask,
            tl.where(valid, t, 0).to(tl.int32))


@triton.jit
def _pixel_ce(ood, pw, one_minus_eps, eps_over_c, ood_scale, inv_c):
    """The CE coefficients of each pixel, as ``uce::pixel_ce``: (weight, 1 - eps, eps / C), at an
    OoD pixel (ood_scale, 0, 1 / C)."""
    return (tl.where(ood, ood_scale, pw), tl.where(ood, 0.0, one_minus_eps),
            tl.where(ood, inv_c, eps_over_c))


@triton.jit
def _class_weights(w_ptr, cls, C, HAS_WEIGHT: tl.constexpr):
    """Class weights of a chunk of classes; 0 for padded classes, 1 without a weight tensor."""
    cmask = cls < C
    if HAS_WEIGHT:  # noqa: SIM108  (a constexpr branch: only one side is compiled)
        cw = tl.load(w_ptr + cls, mask=cmask, other=0.0)
    else:
        cw = tl.where(cmask, 1.0, 0.0)
    return cw


@triton.jit
def _target_weights(w_ptr, tc, nmask, BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Class weight of each pixel's (clamped) label; 1 without a weight tensor."""
    if HAS_WEIGHT:
        cw_t = tl.load(w_ptr + tc, mask=nmask, other=0.0)
    else:
        cw_t = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    return cw_t


@triton.jit
def _ce_terms(x, cls, C, mx, tc, cw, SMOOTH: tl.constexpr):
    """Per-pixel sums over one chunk of classes, given the final max over all classes:
    (sum exp(x - max), max - x_t if the target is in the chunk else 0, sum cw * (max - x)).
    Every term is non-negative, so lse - x_t = log(sum) + (max - x_t) and
    sum cw (lse - x) = S log(sum) + sum cw (max - x) are formed without cancellation."""
    d = mx[None, :] - x  # padded classes: +inf
    ssum = tl.sum(tl.exp2(-d * LOG2E), axis=0)
    dt = tl.sum(tl.where(cls[:, None] == tc[None, :], d, 0.0), axis=0)
    if SMOOTH:
        sm = tl.sum(cw[:, None] * tl.where((cls < C)[:, None], d, 0.0), axis=0)
    else:
        sm = tl.zeros_like(ssum)
    return ssum, dt, sm


@triton.jit
def _pixel_weight(sigma, alpha, neg_sign):
    """(1 + sigma) ** alpha as exp2(alpha * log2|1 + sigma|); a negative base takes neg_sign
    (+1 / -1 for an even / odd integer alpha, NaN otherwise, as powf); alpha = 0 gives 1."""
    base = 1.0 + sigma
    mag = tl.exp2(alpha * tl.log2(tl.abs(base)))
    pw = tl.where(base < 0.0, neg_sign * mag, mag)
    return tl.where(alpha == 0.0, 1.0, pw)


# ------------------------------------------------------------------------------------- kernels


@triton.jit
def uce_forward_kernel(
    x_ptr, t_ptr, s_ptr, sig_ptr, w_ptr, loss_ptr, max_ptr, logsum_ptr, pw_ptr, flag_ptr,
    C, N, stride_s, beta, inv_denom, alpha, neg_sign, ignore_index, one_minus_eps, eps_over_c,
    ood_index, ood_scale, inv_c,
    HAS_SAMPLES: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    CHECK_LABELS: tl.constexpr, CHUNKED: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    """Per-pixel U-CE of one tile: the Monte-Carlo sigma of the stack (``HAS_SAMPLES``, all
    classes in registers) or the given sigma, the weight (1 + sigma)^alpha and the weighted,
    label-smoothed CE of the logits (in class chunks with ``CHUNKED``, never together with
    ``HAS_SAMPLES``), at OoD pixels (only with ``SMOOTH``) the CE against the uniform
    distribution times ood_scale. Writes only the fp32 per-pixel loss, the logits' max and
    log Σ exp(x - max), and the weight (ood_scale at OoD pixels); with ``CHECK_LABELS`` raises
    the flag when a label is bad."""
    b, n0, pix, base, j, nmask = _pixel_tile(C, N, BLOCK_N)
    valid, ood, bad, tc = _labels(t_ptr + pix, j, nmask, C, ignore_index, ood_index, ood_scale)
    if CHECK_LABELS:
        # One flag word for the whole launch; every writer stores the same value.
        tl.store(flag_ptr, 1, mask=tl.max(bad.to(tl.int32), axis=0) > 0)

    if HAS_SAMPLES:
        cls = tl.arange(0, BLOCK_C)
        s_tile, o00, o01, o10, o11, lx0, lx1, ly0, ly1 = _tile_sources(
            s_ptr, b, n0, j, nmask, C, N, 0, 0, 0, N, s_ptr, s_ptr, s_ptr, s_ptr, BLOCK_N, False)
        zeros = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
        mean, m2, _ = _stream_small(zeros, zeros, lx0, s_tile, stride_s, beta, 0, cls, j, nmask,
                                    C, N, N, o00, o01, o10, o11, lx0, lx1, ly0, ly1, False,
                                    False, False, False, WIDE)
        sigma, _ = _sigma_pred(mean, m2, cls, C, inv_denom)
    else:
        sigma = tl.load(sig_ptr + pix + j, mask=nmask, other=0.0)
    pw = _pixel_weight(sigma, alpha, neg_sign)

    x_tile = x_ptr + base
    chunk = tl.arange(0, BLOCK_C)
    if CHUNKED:
        # The logits are read twice (max, then the sums from the final max): they are 1/β of
        # the stack's bytes, and the sums stay free of cancellation.
        mx = tl.full([BLOCK_N], NEG_INF, dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            mx = tl.maximum(
                mx, tl.max(_load_classes(x_tile, c0 + chunk, j, nmask, C, N, WIDE), axis=0))
        ssum = tl.zeros([BLOCK_N], dtype=tl.float32)
        dt = tl.zeros([BLOCK_N], dtype=tl.float32)
        sm = tl.zeros([BLOCK_N], dtype=tl.float32)
        w_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cls = c0 + chunk
            cw = _class_weights(w_ptr, cls, C, HAS_WEIGHT)
            x = _load_classes(x_tile, cls, j, nmask, C, N, WIDE)
            ssum_c, dt_c, sm_c = _ce_terms(x, cls, C, mx, tc, cw, SMOOTH)
            ssum += ssum_c
            dt += dt_c
            sm += sm_c
            w_acc += cw
        weight_sum = tl.sum(w_acc, axis=0)
    else:
        x = _load_classes(x_tile, chunk, j, nmask, C, N, WIDE)
        mx = tl.max(x, axis=0)
        cw = _class_weights(w_ptr, chunk, C, HAS_WEIGHT)
        ssum, dt, sm = _ce_terms(x, chunk, C, mx, tc, cw, SMOOTH)
        weight_sum = tl.sum(cw, axis=0)

    cw_t = _target_weights(w_ptr, tc, nmask, BLOCK_N, HAS_WEIGHT)
    ls = tl.log2(ssum) * LN2
    # A term whose factor is exactly 0 is dropped by a select, so an infinite lse - x does not
    # turn it into NaN: the hard one at eps = 1 and at OoD pixels, the smoothing one at the known
    # pixels of a SMOOTH variant chosen for OoD pixels alone (eps = 0).
    if SMOOTH:
        pw, ome, eoc = _pixel_ce(ood, pw, one_minus_eps, eps_over_c, ood_scale, inv_c)
        per_pixel = tl.where(ome == 0.0, 0.0, ome * cw_t * (ls + dt))
        per_pixel += tl.where(eoc == 0.0, 0.0, eoc * (weight_sum * ls + sm))
        counted = valid | ood
    else:
        per_pixel = tl.where(one_minus_eps == 0.0, 0.0, one_minus_eps * cw_t * (ls + dt))
        counted = valid
    loss = tl.where(counted, pw * per_pixel, 0.0)
    tl.store(loss_ptr + pix + j, loss, mask=nmask)
    tl.store(max_ptr + pix + j, mx, mask=nmask)
    tl.store(logsum_ptr + pix + j, ls, mask=nmask)
    tl.store(pw_ptr + pix + j, pw, mask=nmask)


@triton.jit
def uce_backward_kernel(
    g_ptr, x_ptr, t_ptr, max_ptr, logsum_ptr, pw_ptr, w_ptr, out_ptr,
    C, N, ignore_index, one_minus_eps, eps_over_c, ood_index, ood_scale, inv_c,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    """grad_input of one pixel tile, all classes, from the saved per-pixel max, log-sum and weight:
    g = grad_loss * pw, p_c = exp((x_c - max) - logsum),
    grad_c = g ((1 - eps) cw[t] (p_c - [c = t]) + (eps / C) (S p_c - cw[c])), 0 where the label
    is ignore_index or bad; at OoD pixels (only with ``SMOOTH``) eps = 1 and pw = ood_scale."""
    _, _, pix, base, j, nmask = _pixel_tile(C, N, BLOCK_N)
    valid, ood, _, tc = _labels(t_ptr + pix, j, nmask, C, ignore_index, ood_index, ood_scale)
    pw = tl.load(pw_ptr + pix + j, mask=nmask, other=0.0)
    ome = one_minus_eps
    if SMOOTH:
        # The saved weight is already ood_scale at an OoD pixel; selected as the forward does.
        pw, ome, eoc = _pixel_ce(ood, pw, one_minus_eps, eps_over_c, ood_scale, inv_c)
        counted = valid | ood
    else:
        counted = valid
    g = tl.load(g_ptr + pix + j, mask=nmask, other=0.0) * pw
    # Ignored pixels: g (possibly inf, e.g. a "mean" over no pixel) is selected to 0 here and the
    # gradient once more below, so they get exactly 0 without inf * 0 in between.
    g = tl.where(counted, g, 0.0)
    mx = tl.load(max_ptr + pix + j, mask=nmask, other=0.0)
    ls = tl.load(logsum_ptr + pix + j, mask=nmask, other=0.0)
    cw_t = _target_weights(w_ptr, tc, nmask, BLOCK_N, HAS_WEIGHT)
    # Factors that are exactly 0 (eps = 1 or OoD pixels: the hard one; eps = 0 at the known
    # pixels of a SMOOTH variant: the smoothing one) are selected, not multiplied: g may be inf.
    k_hard = tl.where(ome == 0.0, 0.0, g * ome * cw_t)
    chunk = tl.arange(0, BLOCK_C)
    if SMOOTH:
        k_smooth = tl.where(eoc == 0.0, 0.0, g * eoc)
        w_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            w_acc += _class_weights(w_ptr, c0 + chunk, C, HAS_WEIGHT)
        weight_sum = tl.sum(w_acc, axis=0)
    x_tile = x_ptr + base
    out_tile = out_ptr + base
    # Each element is read once and written once; BLOCK_C x BLOCK_N only bounds the registers.
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + chunk
        cmask = cls < C
        offs = _tile_offsets(cls, j, N, WIDE)
        m2d = cmask[:, None] & nmask[None, :]
        x = tl.load(x_tile + offs, mask=m2d, other=0.0).to(tl.float32)
        # (x - max) - logsum, not x - lse: a float32 lse of large logits carries their
        # magnitude's rounding (ulp(1e4) ~ 1e-3) into p; x - max depends only on their spread.
        p = tl.exp2(((x - mx[None, :]) - ls[None, :]) * LOG2E)
        grad = k_hard[None, :] * (p - tl.where(cls[:, None] == tc[None, :], 1.0, 0.0))
        if SMOOTH:
            cw = _class_weights(w_ptr, cls, C, HAS_WEIGHT)
            grad += k_smooth[None, :] * (weight_sum * p - cw[:, None])
        grad = tl.where(counted[None, :], grad, 0.0)
        tl.store(out_tile + offs, grad.to(out_ptr.dtype.element_ty), mask=m2d)
