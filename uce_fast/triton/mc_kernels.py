"""Triton kernels for the streaming Monte-Carlo statistics (``mc_accumulate_`` and ``mc_reduce``).

Same layout and conventions as ``kernels``: one program per tile of ``BLOCK_N`` consecutive output
pixels of one batch row, classes as the other tile axis, fp32 math, int64 tile bases. The state is
``mean`` and ``m2`` (B, C, N) and ``entropy`` (B, N), float32; samples are (S, B, C, P) with P = N
when they are read as is, and P = in_h·in_w when they are upsampled on the fly (``INTERP``).

Upsampling: the launcher builds the per-output-row and per-output-column source indices and
weights (``source_index`` in ``uce_fast/ops.py``) as two (2, out) int32 tables [i0; i1] and two
(2, out) float32 tables [l0; l1]. A program turns them into four per-pixel source offsets and
four weights once; each class row of a sample is then four gathers (rows of contiguous output
pixels hit a few contiguous source rows, so they stay in L1/L2) and the bilinear combination in
the formula's order, rounded to the samples' dtype (``ROUND``) as a model's upsampling layer in
that dtype would. The full-resolution sample never exists in memory. The launcher
compiles that variant without fused multiply-add, so each product and sum is rounded as in the
formula.

Two variants:

* small C (``BLOCK_C = next_power_of_2(C)``): the tile's mean, M2 and mean entropy stay in
  registers while the S samples stream through; the state is read once and written once
  (accumulate), or never written and only the per-pixel outputs are (reduce: one pass over the
  samples, the low-memory path for a whole stack);
* large C (class chunks of ``BLOCK_C``): exact, per group of up to ``S_PAD`` samples. Pass A reads
  each sample once for its per-pixel max and sum of exponentials (online over the chunks, kept in
  (S_PAD, BLOCK_N) register tiles); pass B walks the class chunks, reading and writing the state
  chunk once and updating it with every sample of the group, and collects each sample's
  ``Σ_c p_c (x_c - max)`` for the entropy. The reduction then runs on the state
  (``mc_finalize_kernel``).

Per sample, with m = max_c x_c, e_c = exp(x_c - m), s = Σ_c e_c: p = e / s and the entropy
H = log s - Σ_c p_c (x_c - m), so no logarithm per class; a -inf logit (p = 0) contributes 0. A row
of -inf (m = -inf) gives NaN, and NaN propagates, as in the other kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from uce_fast.triton.kernels import (
    LN2,
    LOG2E,
    NEG_INF,
    _first_argmax,
    _load_classes,
    _pick,
    _pixel_tile,
    _sigma_from_m2,
    _tile_offsets,
)

# ------------------------------------------------------------------------------------- helpers


@triton.jit
def _bilinear_taps(n0, j, nmask, in_w, out_h, out_w, ty_ptr, wy_ptr, tx_ptr, wx_ptr):
    """Per output pixel of the tile: the source offsets (int32, within one class plane) of its
    four taps (y0x0, y0x1, y1x0, y1x1) and the weights (lx0, lx1, ly0, ly1)."""
    n = (n0 + j).to(tl.int32)
    oy = n // out_w
    ox = n - oy * out_w
    y0 = tl.load(ty_ptr + oy, mask=nmask, other=0)
    y1 = tl.load(ty_ptr + out_h + oy, mask=nmask, other=0)
    x0 = tl.load(tx_ptr + ox, mask=nmask, other=0)
    x1 = tl.load(tx_ptr + out_w + ox, mask=nmask, other=0)
    ly0 = tl.load(wy_ptr + oy, mask=nmask, other=0.0)
    ly1 = tl.load(wy_ptr + out_h + oy, mask=nmask, other=0.0)
    lx0 = tl.load(wx_ptr + ox, mask=nmask, other=0.0)
    lx1 = tl.load(wx_ptr + out_w + ox, mask=nmask, other=0.0)
    r0 = y0 * in_w
    r1 = y1 * in_w
    return r0 + x0, r0 + x1, r1 + x0, r1 + x1, lx0, lx1, ly0, ly1


@triton.jit
def _round_to_sample_dtype(x, tile, BF16_BITS: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in the samples' dtype, back in fp32."""
    if BF16_BITS:
        # Triton's interpreter truncates fp32 -> bf16 (compiled code rounds to nearest even):
        # there the rounding is done on the bits; NaN is kept as is.
        u = x.to(tl.uint32, bitcast=True)
        u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
        r = tl.where(x != x, x, u.to(tl.float32, bitcast=True))
    else:
        r = x.to(tile.dtype.element_ty).to(tl.float32)
    return r


@triton.jit
def _sample_tile(tile, cls, j, nmask, C, N, plane, o00, o01, o10, o11, lx0, lx1, ly0, ly1,
                 INTERP: tl.constexpr, ROUND: tl.constexpr, BF16_BITS: tl.constexpr,
                 WIDE: tl.constexpr):
    """(classes, pixels) fp32 logits of one sample for the tile; padded classes -inf, padded
    pixels finite. Read as is: ``tile`` is the address of class 0 at the tile's first pixel.
    Upsampled: ``tile`` is the address of class 0, source pixel 0, of the batch row."""
    if INTERP:
        cmask = cls < C
        m2d = cmask[:, None] & nmask[None, :]
        if WIDE:  # noqa: SIM108  (a constexpr branch: only one side is compiled)
            row = tile + cls.to(tl.int64)[:, None] * plane
        else:
            row = tile + (cls * plane)[:, None]
        v00 = tl.load(row + o00[None, :], mask=m2d, other=0.0).to(tl.float32)
        v01 = tl.load(row + o01[None, :], mask=m2d, other=0.0).to(tl.float32)
        v10 = tl.load(row + o10[None, :], mask=m2d, other=0.0).to(tl.float32)
        v11 = tl.load(row + o11[None, :], mask=m2d, other=0.0).to(tl.float32)
        top = v00 * lx0[None, :] + v01 * lx1[None, :]
        bottom = v10 * lx0[None, :] + v11 * lx1[None, :]
        x = top * ly0[None, :] + bottom * ly1[None, :]
        if ROUND:
            x = _round_to_sample_dtype(x, tile, BF16_BITS)
        x = tl.where(cmask[:, None], x, NEG_INF)
    else:
        x = _load_classes(tile, cls, j, nmask, C, N, WIDE)
    return x


@triton.jit
def _softmax_entropy(x):
    """(p, H) of a (classes, pixels) tile of logits holding every class: the softmax and the
    per-pixel entropy log s - Σ p (x - m)."""
    mx = tl.max(x, axis=0)
    xm = x - mx[None, :]
    e = tl.exp2(xm * LOG2E)
    ssum = tl.sum(e, axis=0)
    p = e * (1.0 / ssum)[None, :]
    # A -inf logit (and a padded class) has p = 0: its term is 0, not 0 * -inf.
    t = tl.sum(p * tl.where(x == NEG_INF, 0.0, xm), axis=0)
    return p, tl.log2(ssum) * LN2 - t


@triton.jit
def _entropy_of_mean(mean, cls, C):
    """Per pixel Σ_c -mean_c log mean_c over the tile's classes, 0·log 0 = 0; NaN propagates."""
    v = tl.where((cls < C)[:, None], mean, 0.0)
    return tl.sum(-v * (tl.log2(tl.where(v == 0.0, 1.0, v)) * LN2), axis=0)


@triton.jit
def _load_moments(mean_tile, m2_tile, cls, j, nmask, C, N, BLOCK_C: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_STATE: tl.constexpr, WIDE: tl.constexpr):
    """(mean, m2) (classes, pixels) of the tile; zeros without a state (nothing is read)."""
    if HAS_STATE:
        offs = _tile_offsets(cls, j, N, WIDE)
        m2d = (cls < C)[:, None] & nmask[None, :]
        mean = tl.load(mean_tile + offs, mask=m2d, other=0.0)
        m2 = tl.load(m2_tile + offs, mask=m2d, other=0.0)
    else:
        mean = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    return mean, m2


@triton.jit
def _load_entropy(ent_pix, j, nmask, BLOCK_N: tl.constexpr, HAS_STATE: tl.constexpr):
    if HAS_STATE:
        ent = tl.load(ent_pix + j, mask=nmask, other=0.0)
    else:
        ent = tl.zeros([BLOCK_N], dtype=tl.float32)
    return ent


@triton.jit
def _stream_small(mean, m2, ent, s_tile, stride_s, S, count, cls, j, nmask, C, N, plane,
                  o00, o01, o10, o11, lx0, lx1, ly0, ly1, INTERP: tl.constexpr,
                  ROUND: tl.constexpr, BF16_BITS: tl.constexpr, ENTROPY: tl.constexpr,
                  WIDE: tl.constexpr):
    """Folds the S samples, in order, into (mean, m2, ent) held in registers (all classes)."""
    tile = s_tile
    for s in range(S):
        x = _sample_tile(tile, cls, j, nmask, C, N, plane, o00, o01, o10, o11, lx0, lx1, ly0,
                         ly1, INTERP, ROUND, BF16_BITS, WIDE)
        p, h = _softmax_entropy(x)
        inv_k = 1.0 / (count + s + 1).to(tl.float32)
        d = p - mean
        mean += d * inv_k
        m2 += d * (p - mean)
        if ENTROPY:
            ent += (h - ent) * inv_k
        tile += stride_s
    return mean, m2, ent


@triton.jit
def _tile_sources(s_ptr, b, n0, j, nmask, C, N, in_w, out_h, out_w, plane,
                  ty_ptr, wy_ptr, tx_ptr, wx_ptr, BLOCK_N: tl.constexpr, INTERP: tl.constexpr):
    """The tile's first-sample address (see ``_sample_tile``) and its bilinear taps (dummies
    when the samples are read as is)."""
    if INTERP:
        o00, o01, o10, o11, lx0, lx1, ly0, ly1 = _bilinear_taps(
            n0, j, nmask, in_w, out_h, out_w, ty_ptr, wy_ptr, tx_ptr, wx_ptr)
        s_tile = s_ptr + b * C * plane
    else:
        o00 = j
        o01 = j
        o10 = j
        o11 = j
        lx0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        lx1 = lx0
        ly0 = lx0
        ly1 = lx0
        s_tile = s_ptr + (b * C * N + n0)
    return s_tile, o00, o01, o10, o11, lx0, lx1, ly0, ly1


@triton.jit
def _row(tile, rows, s):
    """Row s of a (S_PAD, BLOCK_N) tile (a select, no dynamic indexing)."""
    return tl.sum(tl.where(rows[:, None] == s, tile, 0.0), axis=0)


# ------------------------------------------------------------------------------------- kernels


@triton.jit
def mc_accumulate_kernel(
    s_ptr, mean_ptr, m2_ptr, ent_ptr, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
    C, N, in_w, out_h, out_w, plane, stride_s, S, count,
    HAS_STATE: tl.constexpr, INTERP: tl.constexpr, ROUND: tl.constexpr,
    BF16_BITS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    """Small C: the tile's state is read once (not at all when ``count == 0``), the S samples
    are folded in from registers, the state is written once."""
    b, n0, j, nmask = _pixel_tile(N, BLOCK_N)
    base = b * C * N + n0
    pix = b * N + n0
    cls = tl.arange(0, BLOCK_C)
    s_tile, o00, o01, o10, o11, lx0, lx1, ly0, ly1 = _tile_sources(
        s_ptr, b, n0, j, nmask, C, N, in_w, out_h, out_w, plane, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
        BLOCK_N, INTERP)
    mean, m2 = _load_moments(mean_ptr + base, m2_ptr + base, cls, j, nmask, C, N, BLOCK_C,
                             BLOCK_N, HAS_STATE, WIDE)
    ent = _load_entropy(ent_ptr + pix, j, nmask, BLOCK_N, HAS_STATE)
    mean, m2, ent = _stream_small(mean, m2, ent, s_tile, stride_s, S, count, cls, j, nmask, C, N,
                                  plane, o00, o01, o10, o11, lx0, lx1, ly0, ly1, INTERP, ROUND,
                                  BF16_BITS, True, WIDE)
    # The store addresses are formed anew from the int64 base (not the load's pointer tiles,
    # which would stay live across the sample loop: ~60 more registers per thread).
    offs = base + _tile_offsets(cls, j, N, WIDE)
    m2d = (cls < C)[:, None] & nmask[None, :]
    tl.store(mean_ptr + offs, mean, mask=m2d)
    tl.store(m2_ptr + offs, m2, mask=m2d)
    tl.store(ent_ptr + pix + j, ent, mask=nmask)


@triton.jit
def mc_reduce_kernel(
    s_ptr, mean_ptr, m2_ptr, ent_ptr, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
    sigma_ptr, pred_ptr, hout_ptr, mi_ptr, probs_ptr,
    C, N, in_w, out_h, out_w, plane, stride_s, S, count, inv_denom,
    HAS_STATE: tl.constexpr, HAS_SAMPLES: tl.constexpr, INTERP: tl.constexpr,
    ROUND: tl.constexpr, BF16_BITS: tl.constexpr, WANT_PROBS: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    """Small C: the state (if any) and the S samples (if any) folded in registers, then the
    per-pixel outputs; the state is never written, and nothing of size (C, N) is unless
    ``WANT_PROBS``."""
    b, n0, j, nmask = _pixel_tile(N, BLOCK_N)
    base = b * C * N + n0
    pix = b * N + n0
    cls = tl.arange(0, BLOCK_C)
    mean, m2 = _load_moments(mean_ptr + base, m2_ptr + base, cls, j, nmask, C, N, BLOCK_C,
                             BLOCK_N, HAS_STATE, WIDE)
    ent = _load_entropy(ent_ptr + pix, j, nmask, BLOCK_N, HAS_STATE)
    if HAS_SAMPLES:
        s_tile, o00, o01, o10, o11, lx0, lx1, ly0, ly1 = _tile_sources(
            s_ptr, b, n0, j, nmask, C, N, in_w, out_h, out_w, plane, ty_ptr, wy_ptr, tx_ptr,
            wx_ptr, BLOCK_N, INTERP)
        mean, m2, ent = _stream_small(mean, m2, ent, s_tile, stride_s, S, count, cls, j, nmask,
                                      C, N, plane, o00, o01, o10, o11, lx0, lx1, ly0, ly1,
                                      INTERP, ROUND, BF16_BITS, WANT_ENTROPY, WIDE)
    _, idx = _first_argmax(mean, cls, C)
    tl.store(sigma_ptr + pix + j, _sigma_from_m2(_pick(m2, cls, idx), inv_denom), mask=nmask)
    tl.store(pred_ptr + pix + j, idx.to(tl.int64), mask=nmask)
    if WANT_ENTROPY:
        h = _entropy_of_mean(mean, cls, C)
        mi = h - ent
        tl.store(hout_ptr + pix + j, h, mask=nmask)
        tl.store(mi_ptr + pix + j, tl.where(mi < 0.0, 0.0, mi), mask=nmask)
    if WANT_PROBS:
        offs = _tile_offsets(cls, j, N, WIDE)
        tl.store(probs_ptr + base + offs, mean, mask=(cls < C)[:, None] & nmask[None, :])


@triton.jit
def mc_accumulate_chunked_kernel(
    s_ptr, mean_in, m2_in, ent_in, mean_ptr, m2_ptr, ent_ptr, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
    C, N, in_w, out_h, out_w, plane, stride_s, S, count,
    HAS_STATE: tl.constexpr, INTERP: tl.constexpr, ROUND: tl.constexpr,
    BF16_BITS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    S_PAD: tl.constexpr, WIDE: tl.constexpr,
):
    """Large C, S <= S_PAD samples: each sample read twice (max/sum, then the updates), each
    state chunk read once (from ``*_in``, not at all without a state) and written once (to the
    output pointers, which may be the same tensors)."""
    b, n0, j, nmask = _pixel_tile(N, BLOCK_N)
    base = b * C * N + n0
    pix = b * N + n0
    chunk = tl.arange(0, BLOCK_C)
    rows = tl.arange(0, S_PAD)
    s_tile, o00, o01, o10, o11, lx0, lx1, ly0, ly1 = _tile_sources(
        s_ptr, b, n0, j, nmask, C, N, in_w, out_h, out_w, plane, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
        BLOCK_N, INTERP)
    # Pass A: per sample, max and sum of exp(x - max), online over the class chunks.
    m_all = tl.zeros([S_PAD, BLOCK_N], dtype=tl.float32)
    s_all = tl.zeros([S_PAD, BLOCK_N], dtype=tl.float32)
    tile = s_tile
    for s in range(S):
        m = tl.full([BLOCK_N], NEG_INF, dtype=tl.float32)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            x = _sample_tile(tile, c0 + chunk, j, nmask, C, N, plane, o00, o01, o10, o11, lx0,
                             lx1, ly0, ly1, INTERP, ROUND, BF16_BITS, WIDE)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # -inf - -inf guard: while every value seen is -inf, rescale from 0 instead.
            m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
            acc = acc * tl.exp2((m - m_ref) * LOG2E) + tl.sum(
                tl.exp2((x - m_ref[None, :]) * LOG2E), axis=0)
            m = m_new
        m_all = tl.where(rows[:, None] == s, m[None, :], m_all)
        s_all = tl.where(rows[:, None] == s, acc[None, :], s_all)
        tile += stride_s
    # Pass B: per class chunk, the Welford updates of every sample, and each sample's
    # Σ p (x - max) for its entropy.
    t_all = tl.zeros([S_PAD, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + chunk
        mean, m2 = _load_moments(mean_in + base, m2_in + base, cls, j, nmask, C, N, BLOCK_C,
                                 BLOCK_N, HAS_STATE, WIDE)
        tile = s_tile
        for s in range(S):
            x = _sample_tile(tile, cls, j, nmask, C, N, plane, o00, o01, o10, o11, lx0, lx1, ly0,
                             ly1, INTERP, ROUND, BF16_BITS, WIDE)
            xm = x - _row(m_all, rows, s)[None, :]
            p = tl.exp2(xm * LOG2E) * (1.0 / _row(s_all, rows, s))[None, :]
            t = tl.sum(p * tl.where(x == NEG_INF, 0.0, xm), axis=0)
            t_all += tl.where(rows[:, None] == s, t[None, :], 0.0)
            inv_k = 1.0 / (count + s + 1).to(tl.float32)
            d = p - mean
            mean += d * inv_k
            m2 += d * (p - mean)
            tile += stride_s
        offs = _tile_offsets(cls, j, N, WIDE)
        m2d = (cls < C)[:, None] & nmask[None, :]
        tl.store(mean_ptr + base + offs, mean, mask=m2d)
        tl.store(m2_ptr + base + offs, m2, mask=m2d)
    ent = _load_entropy(ent_in + pix, j, nmask, BLOCK_N, HAS_STATE)
    for s in range(S):
        h = tl.log2(_row(s_all, rows, s)) * LN2 - _row(t_all, rows, s)
        ent += (h - ent) * (1.0 / (count + s + 1).to(tl.float32))
    tl.store(ent_ptr + pix + j, ent, mask=nmask)


@triton.jit
def mc_finalize_kernel(
    mean_ptr, m2_ptr, ent_ptr, sigma_ptr, pred_ptr, hout_ptr, mi_ptr, C, N, inv_denom,
    WANT_ENTROPY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Large C: the per-pixel outputs from a state, class chunks with a running first argmax."""
    b, n0, j, nmask = _pixel_tile(N, BLOCK_N)
    base = b * C * N + n0
    pix = b * N + n0
    chunk = tl.arange(0, BLOCK_C)
    best = tl.full([BLOCK_N], NEG_INF, dtype=tl.float32)
    best_m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    h = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + chunk
        mean, m2 = _load_moments(mean_ptr + base, m2_ptr + base, cls, j, nmask, C, N, BLOCK_C,
                                 BLOCK_N, True, WIDE)
        c_best, c_idx = _first_argmax(mean, cls, C)
        # Strict >: on ties (and among NaNs, mapped to +inf) the earlier chunk keeps the pixel.
        take = c_best > best
        best = tl.where(take, c_best, best)
        best_m2 = tl.where(take, _pick(m2, cls, c_idx), best_m2)
        best_idx = tl.where(take, c_idx, best_idx)
        if WANT_ENTROPY:
            h += _entropy_of_mean(mean, cls, C)
    tl.store(sigma_ptr + pix + j, _sigma_from_m2(best_m2, inv_denom), mask=nmask)
    tl.store(pred_ptr + pix + j, best_idx.to(tl.int64), mask=nmask)
    if WANT_ENTROPY:
        mi = h - tl.load(ent_ptr + pix + j, mask=nmask, other=0.0)
        tl.store(hout_ptr + pix + j, h, mask=nmask)
        tl.store(mi_ptr + pix + j, tl.where(mi < 0.0, 0.0, mi), mask=nmask)
