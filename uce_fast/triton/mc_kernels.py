"""Monte-Carlo statistics in Triton: the device functions every sigma of this backend comes from
(the fused forward's as well as ``mc_accumulate_``'s and ``mc_reduce``'s; contract:
``uce_fast.ops``), and the streaming kernels.

Layout as in ``tiles``: one program per tile of ``BLOCK_N`` consecutive output pixels of one batch
row, classes as the other tile axis, fp32 math, int64 tile bases. The state is ``mean`` and
``m2`` (B, C, N) and ``entropy`` (B, N), float32; samples are (S, B, C, P) with P = N when they
are read as is, and P = in_h·in_w when they are resampled on the fly (``RESAMPLE``).

One numerical form for every path (the statistics themselves: the contract). Per sample, with
m = max_c x_c, e_c = exp(x_c - m) and s = Σ_c e_c: p = e / s, the max and the sum kept apart (a
float32 log-sum-exp would carry the logits' magnitude's rounding into every p); Welford's update
(``_welford``); the entropy as log s - Σ_c p_c (x_c - m), no logarithm per class, a -inf logit
(p = 0) contributing 0, computed only where it is asked for (``ENTROPY``: the fused forward does
not pay for it); the first argmax with NaN as the maximum (``_first_argmax``). A row of -inf
(m = -inf) gives NaN, and NaN propagates.

Two paths:

* small C (``BLOCK_C = next_power_of_2(C)``, all classes in registers, ``_stream_small``): the
  tile's mean, M2 and mean entropy stay in registers while the samples stream through, each read
  once;
* large C (class chunks of ``BLOCK_C``): exact for any number of samples, with registers that do
  not depend on it. Pass A (``_normalise_samples``) reads each sample once for its per-pixel max
  and sum of exponentials, online over the chunks (``_online_normaliser``, which also rebases the
  entropy's sum), and writes (max, 1 / sum) to a float32 scratch of two (S, B, N) planes; pass B
  (``_fold_chunk``) walks the class chunks and, in each, the samples, forming p from the
  normalisers with the chunk's Welford update, then folds the chunk's first argmax into a running
  one (``_fold_argmax``). Beyond reading the samples twice, that is 8 bytes per sample and output
  pixel written and read back (the re-reads for later chunks hit the cache): at C = 150 and β = 10
  in bfloat16 the stack's two reads are 6000 bytes per pixel, the normalisers 160.

Resampling: the launcher builds the per-output-row and per-output-column source indices and
weights (the bilinear source index of the contract) as two (2, out) int32 tables [i0; i1] and two
(2, out) float32 tables [l0; l1]. A program turns them into four per-pixel source offsets and four
weights once; each class row of a sample is then four gathers (rows of contiguous output pixels
hit a few contiguous source rows, so they stay in L1/L2) and the bilinear combination in the
formula's order, rounded to the samples' dtype (``ROUND``) as a model's upsampling layer in that
dtype would. The full-resolution sample never exists in memory. The launcher compiles that variant
without fused multiply-add, so each product and sum is rounded as in the formula.
"""

from __future__ import annotations

import triton
import triton.language as tl

from uce_fast.triton.tiles import (
    INT32_MAX,
    LN2,
    LOG2E,
    NEG_INF,
    POS_INF,
    _load_classes,
    _pixel_tile,
    _tile_offsets,
)

# ---------------------------------------------------------------------- per-pixel statistics


@triton.jit
def _inv_count(count, s):
    """1 / k in float32 for sample s after ``count`` folded ones (k = count + s + 1)."""
    return 1.0 / tl.cast(count + s + 1, tl.float32)


@triton.jit
def _welford(mean, m2, p, inv_k):
    """Welford's update of (mean, M2) with the probabilities p of the k-th sample. Not a sum and
    a sum of squares: with confident, agreeing samples E[p^2] - E[p]^2 cancels catastrophically
    in fp32; M2 accumulates the small deviations directly."""
    d = p - mean
    mean += d * inv_k
    m2 += d * (p - mean)
    return mean, m2


@triton.jit
def _softmax(x, ENTROPY: tl.constexpr):
    """(p, H) of a (classes, pixels) tile holding every class (H: zeros without ``ENTROPY``)."""
    mx = tl.max(x, axis=0)
    xm = x - mx[None, :]
    e = tl.exp2(xm * LOG2E)
    ssum = tl.sum(e, axis=0)
    p = e * (1.0 / ssum)[None, :]
    if ENTROPY:
        # A -inf logit (and a padded class) has p = 0: its term is 0, not 0 * -inf.
        h = tl.log2(ssum) * LN2 - tl.sum(p * tl.where(x == NEG_INF, 0.0, xm), axis=0)
    else:
        h = tl.zeros_like(ssum)
    return p, h


@triton.jit
def _online_normaliser(x, m, s, t, ENTROPY: tl.constexpr):
    """One class chunk ``x`` folded into each pixel's running max m, s = Σ exp(x - m) and (with
    ``ENTROPY``) t = Σ exp(x - m) (x - m). Both sums are rebased to the new max m' as in an
    online softmax, t' = exp(m - m') (t + (m - m') s): every term of t is <= 0, nothing cancels."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # -inf - -inf guard: while every value seen is -inf (s = t = 0), rebase from 0 instead.
    m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
    shift = m - m_ref
    scale = tl.exp2(shift * LOG2E)
    xm = x - m_ref[None, :]
    e = tl.exp2(xm * LOG2E)
    if ENTROPY:
        # shift is -inf only while s = 0: selected away, so no -inf * 0 is formed.
        t = scale * (t + tl.where(s == 0.0, 0.0, shift) * s) + tl.sum(
            e * tl.where(x == NEG_INF, 0.0, xm), axis=0)
    s = s * scale + tl.sum(e, axis=0)
    return m_new, s, t


@triton.jit
def _first_argmax(mean, cls, C):
    """Per pixel (column): the largest mean and its first class index. NaN counts as the maximum
    (as torch.argmax): means are probabilities in [0, 1], so NaN is mapped to +inf first."""
    key = tl.where(mean != mean, POS_INF, mean)
    key = tl.where((cls < C)[:, None], key, NEG_INF)
    best = tl.max(key, axis=0)
    idx = tl.min(tl.where(key == best[None, :], cls[:, None], INT32_MAX), axis=0)
    return best, idx


@triton.jit
def _pick(tile, cls, idx):
    """tile[idx[j], j] for each pixel column j (a select, no gather)."""
    return tl.sum(tl.where(cls[:, None] == idx[None, :], tile, 0.0), axis=0)


@triton.jit
def _sigma_from_m2(m2, inv_denom):
    v = m2 * inv_denom
    # M2 >= 0 up to rounding; the clamp keeps NaN.
    return tl.sqrt(tl.where(v < 0.0, 0.0, v))


@triton.jit
def _sigma_pred(mean, m2, cls, C, inv_denom):
    """(sigma, predicted class) of a tile holding every class."""
    _, idx = _first_argmax(mean, cls, C)
    return _sigma_from_m2(_pick(m2, cls, idx), inv_denom), idx


@triton.jit
def _fold_argmax(best, best_m2, best_idx, mean, m2, cls, C):
    """A class chunk's first argmax folded into the running (best mean, its M2, its class)."""
    c_best, c_idx = _first_argmax(mean, cls, C)
    # Strict >: on ties (and among NaNs, mapped to +inf) the earlier chunk keeps the pixel.
    take = c_best > best
    return (tl.where(take, c_best, best), tl.where(take, _pick(m2, cls, c_idx), best_m2),
            tl.where(take, c_idx, best_idx))


@triton.jit
def _entropy_of_mean(mean, cls, C):
    """Per pixel Σ_c -mean_c log mean_c over the tile's classes, 0·log 0 = 0; NaN propagates."""
    v = tl.where((cls < C)[:, None], mean, 0.0)
    return tl.sum(-v * (tl.log2(tl.where(v == 0.0, 1.0, v)) * LN2), axis=0)


# ----------------------------------------------------------------------------- sample values


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
                 RESAMPLE: tl.constexpr, ROUND: tl.constexpr, BF16_BITS: tl.constexpr,
                 WIDE: tl.constexpr):
    """(classes, pixels) fp32 logits of one sample for the tile; padded classes -inf, padded
    pixels finite. Read as is: ``tile`` is the address of class 0 at the tile's first pixel.
    Resampled: ``tile`` is the address of class 0, source pixel 0, of the batch row."""
    if RESAMPLE:
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
def _tile_sources(s_ptr, b, n0, j, nmask, C, N, in_w, out_h, out_w, plane,
                  ty_ptr, wy_ptr, tx_ptr, wx_ptr, BLOCK_N: tl.constexpr, RESAMPLE: tl.constexpr):
    """The tile's first-sample address (see ``_sample_tile``) and its bilinear taps (dummies
    when the samples are read as is)."""
    if RESAMPLE:
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


# ------------------------------------------------------------------------- the sample loops


@triton.jit
def _stream_small(mean, m2, ent, s_tile, stride_s, S, count, cls, j, nmask, C, N, plane,
                  o00, o01, o10, o11, lx0, lx1, ly0, ly1, RESAMPLE: tl.constexpr,
                  ROUND: tl.constexpr, BF16_BITS: tl.constexpr, ENTROPY: tl.constexpr,
                  WIDE: tl.constexpr):
    """Folds the S samples, in order, into (mean, m2, ent) held in registers (all classes);
    ``ent`` is left as is without ``ENTROPY``."""
    tile = s_tile
    for s in range(S):
        x = _sample_tile(tile, cls, j, nmask, C, N, plane, o00, o01, o10, o11, lx0, lx1, ly0,
                         ly1, RESAMPLE, ROUND, BF16_BITS, WIDE)
        p, h = _softmax(x, ENTROPY)
        inv_k = _inv_count(count, s)
        mean, m2 = _welford(mean, m2, p, inv_k)
        if ENTROPY:
            ent += (h - ent) * inv_k
        tile += stride_s
    return mean, m2, ent


@triton.jit
def _normalise_samples(ent, s_tile, stride_s, nmax, ninv, nrm_stride, S, count, chunk, j, nmask,
                       C, N, plane, o00, o01, o10, o11, lx0, lx1, ly0, ly1,
                       RESAMPLE: tl.constexpr, ROUND: tl.constexpr, BF16_BITS: tl.constexpr,
                       ENTROPY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                       WIDE: tl.constexpr):
    """Pass A of the class-chunked path: each sample's per-pixel max and 1 / Σ exp(x - max),
    online over the class chunks, stored at ``nmax`` / ``ninv`` (the tile's pixels of sample 0;
    samples ``nrm_stride`` apart); with ``ENTROPY`` its entropy folded into the running mean
    ``ent``. Returns ``ent``."""
    tile = s_tile
    for s in range(S):
        m = tl.full([BLOCK_N], NEG_INF, dtype=tl.float32)
        ssum = tl.zeros([BLOCK_N], dtype=tl.float32)
        t = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            x = _sample_tile(tile, c0 + chunk, j, nmask, C, N, plane, o00, o01, o10, o11, lx0,
                             lx1, ly0, ly1, RESAMPLE, ROUND, BF16_BITS, WIDE)
            m, ssum, t = _online_normaliser(x, m, ssum, t, ENTROPY)
        inv_s = 1.0 / ssum
        tl.store(nmax + j, m, mask=nmask)
        tl.store(ninv + j, inv_s, mask=nmask)
        if ENTROPY:
            ent += ((tl.log2(ssum) * LN2 - t * inv_s) - ent) * _inv_count(count, s)
        tile += stride_s
        nmax += nrm_stride
        ninv += nrm_stride
    return ent


@triton.jit
def _fold_chunk(mean, m2, s_tile, stride_s, nmax, ninv, nrm_stride, S, count, cls, j, nmask,
                C, N, plane, o00, o01, o10, o11, lx0, lx1, ly0, ly1, RESAMPLE: tl.constexpr,
                ROUND: tl.constexpr, BF16_BITS: tl.constexpr, WIDE: tl.constexpr):
    """Pass B of the class-chunked path, one class chunk: the S samples' probabilities
    p = exp(x - max) / sum, from pass A's normalisers, folded in order into (mean, m2)."""
    tile = s_tile
    for s in range(S):
        x = _sample_tile(tile, cls, j, nmask, C, N, plane, o00, o01, o10, o11, lx0, lx1, ly0,
                         ly1, RESAMPLE, ROUND, BF16_BITS, WIDE)
        mx = tl.load(nmax + j, mask=nmask, other=0.0)
        inv_s = tl.load(ninv + j, mask=nmask, other=0.0)
        p = tl.exp2((x - mx[None, :]) * LOG2E) * inv_s[None, :]
        mean, m2 = _welford(mean, m2, p, _inv_count(count, s))
        tile += stride_s
        nmax += nrm_stride
        ninv += nrm_stride
    return mean, m2


# ------------------------------------------------------------------------------- the state


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
def _store_classes(ptr, base, tile, cls, j, nmask, C, N, WIDE: tl.constexpr):
    """Stores a (classes, pixels) tile at ``ptr`` + the tile's int64 ``base``. The addresses are
    formed anew from the base, not shared with a load's pointer tile, which would then stay live
    across the sample loop."""
    offs = base + _tile_offsets(cls, j, N, WIDE)
    tl.store(ptr + offs, tile, mask=(cls < C)[:, None] & nmask[None, :])


@triton.jit
def _load_entropy(ent_pix, j, nmask, BLOCK_N: tl.constexpr, HAS_STATE: tl.constexpr):
    if HAS_STATE:
        ent = tl.load(ent_pix + j, mask=nmask, other=0.0)
    else:
        ent = tl.zeros([BLOCK_N], dtype=tl.float32)
    return ent


@triton.jit
def _store_maps(hout_ptr, mi_ptr, pix, j, nmask, h, ent):
    """The predictive entropy and the mutual information max(H(mean) - entropy, 0)."""
    mi = h - ent
    tl.store(hout_ptr + pix + j, h, mask=nmask)
    tl.store(mi_ptr + pix + j, tl.where(mi < 0.0, 0.0, mi), mask=nmask)


# ------------------------------------------------------------------------------------- kernels


@triton.jit
def mc_accumulate_kernel(
    s_ptr, mean_ptr, m2_ptr, ent_ptr, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
    C, N, in_w, out_h, out_w, plane, stride_s, S, count,
    HAS_STATE: tl.constexpr, RESAMPLE: tl.constexpr, ROUND: tl.constexpr,
    BF16_BITS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    """Small C: the tile's state is read once (not at all when ``count == 0``), the S samples
    are folded in from registers, the state is written once."""
    b, n0, pix, base, j, nmask = _pixel_tile(C, N, BLOCK_N)
    cls = tl.arange(0, BLOCK_C)
    s_tile, o00, o01, o10, o11, lx0, lx1, ly0, ly1 = _tile_sources(
        s_ptr, b, n0, j, nmask, C, N, in_w, out_h, out_w, plane, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
        BLOCK_N, RESAMPLE)
    mean, m2 = _load_moments(mean_ptr + base, m2_ptr + base, cls, j, nmask, C, N, BLOCK_C,
                             BLOCK_N, HAS_STATE, WIDE)
    ent = _load_entropy(ent_ptr + pix, j, nmask, BLOCK_N, HAS_STATE)
    mean, m2, ent = _stream_small(mean, m2, ent, s_tile, stride_s, S, count, cls, j, nmask, C, N,
                                  plane, o00, o01, o10, o11, lx0, lx1, ly0, ly1, RESAMPLE, ROUND,
                                  BF16_BITS, True, WIDE)
    _store_classes(mean_ptr, base, mean, cls, j, nmask, C, N, WIDE)
    _store_classes(m2_ptr, base, m2, cls, j, nmask, C, N, WIDE)
    tl.store(ent_ptr + pix + j, ent, mask=nmask)


@triton.jit
def mc_reduce_kernel(
    s_ptr, mean_ptr, m2_ptr, ent_ptr, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
    sigma_ptr, pred_ptr, hout_ptr, mi_ptr, probs_ptr,
    C, N, in_w, out_h, out_w, plane, stride_s, S, count, inv_denom,
    HAS_STATE: tl.constexpr, HAS_SAMPLES: tl.constexpr, RESAMPLE: tl.constexpr,
    ROUND: tl.constexpr, BF16_BITS: tl.constexpr, WANT_PRED: tl.constexpr,
    WANT_PROBS: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    """Small C: the state (if any) and the S samples (if any) folded in registers, then the
    per-pixel outputs; the state is never written, nothing of size (C, N) is unless
    ``WANT_PROBS``, the prediction only with ``WANT_PRED``."""
    b, n0, pix, base, j, nmask = _pixel_tile(C, N, BLOCK_N)
    cls = tl.arange(0, BLOCK_C)
    mean, m2 = _load_moments(mean_ptr + base, m2_ptr + base, cls, j, nmask, C, N, BLOCK_C,
                             BLOCK_N, HAS_STATE, WIDE)
    ent = _load_entropy(ent_ptr + pix, j, nmask, BLOCK_N, HAS_STATE)
    if HAS_SAMPLES:
        s_tile, o00, o01, o10, o11, lx0, lx1, ly0, ly1 = _tile_sources(
            s_ptr, b, n0, j, nmask, C, N, in_w, out_h, out_w, plane, ty_ptr, wy_ptr, tx_ptr,
            wx_ptr, BLOCK_N, RESAMPLE)
        mean, m2, ent = _stream_small(mean, m2, ent, s_tile, stride_s, S, count, cls, j, nmask,
                                      C, N, plane, o00, o01, o10, o11, lx0, lx1, ly0, ly1,
                                      RESAMPLE, ROUND, BF16_BITS, WANT_ENTROPY, WIDE)
    sigma, idx = _sigma_pred(mean, m2, cls, C, inv_denom)
    tl.store(sigma_ptr + pix + j, sigma, mask=nmask)
    if WANT_PRED:
        tl.store(pred_ptr + pix + j, idx.to(tl.int64), mask=nmask)
    if WANT_ENTROPY:
        _store_maps(hout_ptr, mi_ptr, pix, j, nmask, _entropy_of_mean(mean, cls, C), ent)
    if WANT_PROBS:
        _store_classes(probs_ptr, base, mean, cls, j, nmask, C, N, WIDE)


@triton.jit
def mc_accumulate_chunked_kernel(
    s_ptr, mean_ptr, m2_ptr, ent_ptr, nmax_ptr, ninv_ptr, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
    C, N, in_w, out_h, out_w, plane, stride_s, nrm_stride, S, count,
    HAS_STATE: tl.constexpr, RESAMPLE: tl.constexpr, ROUND: tl.constexpr,
    BF16_BITS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    """Large C, any S: each sample read twice (pass A, pass B), each state chunk read once (not
    at all without a state) and written once, in place; the normalisers go through the scratch
    ``nmax_ptr`` / ``ninv_ptr`` (S, B, N)."""
    b, n0, pix, base, j, nmask = _pixel_tile(C, N, BLOCK_N)
    chunk = tl.arange(0, BLOCK_C)
    s_tile, o00, o01, o10, o11, lx0, lx1, ly0, ly1 = _tile_sources(
        s_ptr, b, n0, j, nmask, C, N, in_w, out_h, out_w, plane, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
        BLOCK_N, RESAMPLE)
    ent = _load_entropy(ent_ptr + pix, j, nmask, BLOCK_N, HAS_STATE)
    ent = _normalise_samples(ent, s_tile, stride_s, nmax_ptr + pix, ninv_ptr + pix, nrm_stride,
                             S, count, chunk, j, nmask, C, N, plane, o00, o01, o10, o11, lx0,
                             lx1, ly0, ly1, RESAMPLE, ROUND, BF16_BITS, True, BLOCK_C, BLOCK_N,
                             WIDE)
    tl.store(ent_ptr + pix + j, ent, mask=nmask)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + chunk
        mean, m2 = _load_moments(mean_ptr + base, m2_ptr + base, cls, j, nmask, C, N, BLOCK_C,
                                 BLOCK_N, HAS_STATE, WIDE)
        mean, m2 = _fold_chunk(mean, m2, s_tile, stride_s, nmax_ptr + pix, ninv_ptr + pix,
                               nrm_stride, S, count, cls, j, nmask, C, N, plane, o00, o01, o10,
                               o11, lx0, lx1, ly0, ly1, RESAMPLE, ROUND, BF16_BITS, WIDE)
        _store_classes(mean_ptr, base, mean, cls, j, nmask, C, N, WIDE)
        _store_classes(m2_ptr, base, m2, cls, j, nmask, C, N, WIDE)


@triton.jit
def mc_reduce_chunked_kernel(
    s_ptr, mean_ptr, m2_ptr, ent_ptr, nmax_ptr, ninv_ptr, ty_ptr, wy_ptr, tx_ptr, wx_ptr,
    sigma_ptr, pred_ptr, hout_ptr, mi_ptr, probs_ptr,
    C, N, in_w, out_h, out_w, plane, stride_s, nrm_stride, S, count, inv_denom,
    HAS_STATE: tl.constexpr, HAS_SAMPLES: tl.constexpr, RESAMPLE: tl.constexpr,
    ROUND: tl.constexpr, BF16_BITS: tl.constexpr, WANT_PRED: tl.constexpr,
    WANT_PROBS: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    """Large C, any S: the state (if any, read once, never written) and the samples (if any, read
    twice) reduced class chunk by class chunk with a running first argmax; nothing of size
    (C, N) is written unless ``WANT_PROBS``, the prediction only with ``WANT_PRED`` (the fused
    forward wants sigma alone)."""
    b, n0, pix, base, j, nmask = _pixel_tile(C, N, BLOCK_N)
    chunk = tl.arange(0, BLOCK_C)
    ent = _load_entropy(ent_ptr + pix, j, nmask, BLOCK_N, HAS_STATE)
    if HAS_SAMPLES:
        s_tile, o00, o01, o10, o11, lx0, lx1, ly0, ly1 = _tile_sources(
            s_ptr, b, n0, j, nmask, C, N, in_w, out_h, out_w, plane, ty_ptr, wy_ptr, tx_ptr,
            wx_ptr, BLOCK_N, RESAMPLE)
        ent = _normalise_samples(ent, s_tile, stride_s, nmax_ptr + pix, ninv_ptr + pix,
                                 nrm_stride, S, count, chunk, j, nmask, C, N, plane, o00, o01,
                                 o10, o11, lx0, lx1, ly0, ly1, RESAMPLE, ROUND, BF16_BITS,
                                 WANT_ENTROPY, BLOCK_C, BLOCK_N, WIDE)
    best = tl.full([BLOCK_N], NEG_INF, dtype=tl.float32)
    best_m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    h = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + chunk
        mean, m2 = _load_moments(mean_ptr + base, m2_ptr + base, cls, j, nmask, C, N, BLOCK_C,
                                 BLOCK_N, HAS_STATE, WIDE)
        if HAS_SAMPLES:
            mean, m2 = _fold_chunk(mean, m2, s_tile, stride_s, nmax_ptr + pix, ninv_ptr + pix,
                                   nrm_stride, S, count, cls, j, nmask, C, N, plane, o00, o01,
                                   o10, o11, lx0, lx1, ly0, ly1, RESAMPLE, ROUND, BF16_BITS,
                                   WIDE)
        best, best_m2, best_idx = _fold_argmax(best, best_m2, best_idx, mean, m2, cls, C)
        if WANT_ENTROPY:
            h += _entropy_of_mean(mean, cls, C)
        if WANT_PROBS:
            _store_classes(probs_ptr, base, mean, cls, j, nmask, C, N, WIDE)
    tl.store(sigma_ptr + pix + j, _sigma_from_m2(best_m2, inv_denom), mask=nmask)
    if WANT_PRED:
        tl.store(pred_ptr + pix + j, best_idx.to(tl.int64), mask=nmask)
    if WANT_ENTROPY:
        _store_maps(hout_ptr, mi_ptr, pix, j, nmask, h, ent)
