// The per-pixel Monte-Carlo statistics of one CPU tile, written once and
// used by mc_accumulate_ / mc_reduce (mc_cpu.cpp) and by the fused U-CE
// forward (uce_cpu.cpp): a tile is T consecutive output pixels of one batch
// row x all classes, every per-pixel quantity a T-float array. Per tile the
// samples are streamed in order, each through max -> exp / sum (/ entropy)
// -> Welford, then the first argmax of the mean picks sigma.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/cpu_common.h"

namespace uce_cpu {

// Taps of the T output pixels n0 .. n0 + T - 1 of a tile (which may span
// output rows), in groups of V consecutive pixels (V = vector width of the
// fast path, 0: none).
//  * Per pixel: source offsets within one class plane of in_h x in_w and
//    weights, for the scalar path.
//  * Per group that lies within one output row and whose source columns fit
//    a window of 2V columns: the offsets o0 / o1 of the window in source rows
//    i0y / i1y, the number of valid columns in it (to the end of the row),
//    the row weights, and per pixel the window positions r0 / r1 of its two
//    column taps. Such a group is interpolated with in-register permutes
//    instead of 4V scalar loads.
struct TileTaps {
  int32_t* o00;
  int32_t* o01;
  int32_t* o10;
  int32_t* o11;
  float* wx0;
  float* wx1;
  float* wy0;
  float* wy1;
  int32_t* r0;
  int32_t* r1;
  int32_t* fast;  // per group: 1 = window path
  int32_t* go0;
  int32_t* go1;
  int32_t* gcnt;
  float* gwy0;
  float* gwy1;
};

// One sample of one tile, resampled: xf (C x T) = the interpolated logits
// rounded to the samples' dtype, mx (T) = their max over classes (-inf
// start: a NaN logit still reaches the softmax sum through its exp).
template <typename ST>
struct Gather {
  const ST* plane0;  // samples[s, b, 0, 0]
  int64_t c_stride;  // in_h * in_w
  int T;
  int C;
  TileTaps k;
  float* xf;
  float* mx;
};

template <typename ST>
using GatherFn = void (*)(const Gather<ST>&);

// e = exp(x - max) per class, with its per-pixel sum and (kEntropy) the
// entropy sum sum_c e (x - max); x has row stride xs. During the pass the
// rows of the next sample (or tile) are prefetched when pf is given.
template <typename ST, int kT, bool kEntropy>
UCE_INLINE void softmax_pass(const float* __restrict x, int64_t xs, int T_rt,
                             int C, const float* __restrict mx,
                             float* __restrict e, float* __restrict sum,
                             float* __restrict sed, const ST* pf, int pf_T,
                             int64_t pf_cs) {
  const int T = kT > 0 ? kT : T_rt;
  for (int t = 0; t < T; ++t) {
    sum[t] = 0.0f;
    if constexpr (kEntropy) sed[t] = 0.0f;
  }
  for (int c = 0; c < C; ++c) {
    const float* __restrict row = x + c * xs;
    float* __restrict ec = e + static_cast<int64_t>(c) * T;
    if (pf != nullptr) prefetch_row(pf + c * pf_cs, pf_T);
    for (int t = 0; t < T; ++t) {
      const float d = row[t] - mx[t];
      const float v = uce::fast_expf_nonpos(d);
      ec[t] = v;
      sum[t] += v;
      if constexpr (kEntropy) sed[t] += uce::entropy_term(v, d);
    }
  }
}

// Folds samples 0 .. S-1 (sample s at x0 + s * s_stride, class rows cs
// apart; resampled through `gather` when it is given) into mean / m2 (C rows
// ms apart) holding `count` samples (0: start afresh) and, with kEntropy,
// the mean entropy `ent`. e, xf: C x T scratch; mx, inv, hs: T each. kDense:
// the accumulators are C x T buffers (ms == T), whose row offsets are then
// compile-time multiples for the fixed-width tiles.
template <typename ST, int kT, bool kEntropy, bool kDense>
UCE_INLINE void mc_stream_impl(
    const ST* __restrict x0, const ST* next, int next_T, int64_t s_stride,
    int64_t cs, int S, int64_t count, int T_rt, int C, GatherFn<ST> gather,
    Gather<ST>* g, float* __restrict mean, float* __restrict m2,
    float* __restrict ent, int64_t ms, float* __restrict e,
    float* __restrict xf, float* __restrict mx, float* __restrict inv,
    float* __restrict hs) {
  constexpr bool kWiden = !std::is_same<ST, float>::value;
  const int T = kT > 0 ? kT : T_rt;
  if constexpr (kDense) ms = T;
  for (int s = 0; s < S; ++s) {
    const ST* __restrict xs = x0 + s * s_stride;
    if (gather != nullptr) {
      // xf / mx are written by the gather: read them through g, not
      // through the restrict parameters.
      g->plane0 = xs;
      gather(*g);
      softmax_pass<ST, kT, kEntropy>(g->xf, T, T, C, g->mx, e, inv, hs,
                                     nullptr, 0, 0);
    } else {
      // Rows to prefetch while the exp pass works on L1-resident data: the
      // same tile of the next sample, or the first sample of the next tile.
      // Each tile row is only a few cache lines at a large stride, too many
      // concurrent streams for the hardware prefetchers to follow.
      const ST* pf = s + 1 < S ? xs + s_stride : next;
      const int pf_T = s + 1 < S ? T : next_T;
      for (int t = 0; t < T; ++t) mx[t] = load_f(xs[t]);
      if constexpr (kWiden) {
        for (int t = 0; t < T; ++t) xf[t] = mx[t];
        for (int c = 1; c < C; ++c) {
          const ST* __restrict row = xs + c * cs;
          float* __restrict xr = xf + static_cast<int64_t>(c) * T;
          for (int t = 0; t < T; ++t) {
            const float v = load_f(row[t]);
            const float m = mx[t];
            xr[t] = v;
            mx[t] = v > m ? v : m;
          }
        }
        softmax_pass<ST, kT, kEntropy>(xf, T, T, C, mx, e, inv, hs, pf, pf_T,
                                       cs);
      } else {
        for (int c = 1; c < C; ++c) {
          const ST* __restrict row = xs + c * cs;
          for (int t = 0; t < T; ++t) {
            const float v = row[t];
            const float m = mx[t];
            mx[t] = v > m ? v : m;
          }
        }
        softmax_pass<ST, kT, kEntropy>(xs, cs, T, C, mx, e, inv, hs, pf,
                                       pf_T, cs);
      }
    }
    // inv / hs hold sum_c e and sum_c e (x - max) until here.
    for (int t = 0; t < T; ++t) {
      const float r = 1.0f / inv[t];
      if constexpr (kEntropy) hs[t] = uce::softmax_entropy(inv[t], r, hs[t]);
      inv[t] = r;
    }
    const int64_t k = count + s + 1;
    if (k == 1) {
      for (int c = 0; c < C; ++c) {
        const int64_t o = static_cast<int64_t>(c) * T;
        const int64_t om = c * ms;
        for (int t = 0; t < T; ++t) {
          mean[om + t] = e[o + t] * inv[t];
          m2[om + t] = 0.0f;
        }
      }
      if constexpr (kEntropy) {
        for (int t = 0; t < T; ++t) ent[t] = hs[t];
      }
    } else {
      const float inv_k = 1.0f / static_cast<float>(k);
      for (int c = 0; c < C; ++c) {
        const int64_t o = static_cast<int64_t>(c) * T;
        const int64_t om = c * ms;
        for (int t = 0; t < T; ++t) {
          float mu = mean[om + t];
          float q = m2[om + t];
          uce::welford_update(e[o + t] * inv[t], inv_k, mu, q);
          mean[om + t] = mu;
          m2[om + t] = q;
        }
      }
      if constexpr (kEntropy) {
        for (int t = 0; t < T; ++t) {
          float h = ent[t];
          uce::mean_update(hs[t], inv_k, h);
          ent[t] = h;
        }
      }
    }
  }
}

// Copies the state rows of the tile into the C x T accumulators.
template <int kT>
UCE_INLINE void mc_load_impl(const float* __restrict in_mean,
                             const float* __restrict in_m2,
                             const float* __restrict in_ent, int64_t is,
                             int T_rt, int C, float* __restrict mean,
                             float* __restrict m2, float* __restrict ent,
                             int64_t ms) {
  const int T = kT > 0 ? kT : T_rt;
  for (int c = 0; c < C; ++c) {
    for (int t = 0; t < T; ++t) {
      mean[c * ms + t] = in_mean[c * is + t];
      m2[c * ms + t] = in_m2[c * is + t];
    }
  }
  for (int t = 0; t < T; ++t) ent[t] = in_ent[t];
}

// pred = first argmax of the mean (NaN counts as the maximum; pred may be
// nullptr), sigma from its M2; optionally H(mean), the mutual information
// and the mean itself. kDense: as mc_stream_impl's (ms == T).
template <int kT, bool kDense>
UCE_INLINE void mc_finalize_impl(
    const float* __restrict mean, const float* __restrict m2,
    const float* __restrict ent, int64_t ms, int T_rt, int C,
    float inv_denom, float* __restrict best, float* __restrict best_m2,
    int32_t* __restrict idx, float* __restrict sigma,
    int64_t* __restrict pred, float* __restrict h, float* __restrict mi,
    float* __restrict probs, int64_t ps) {
  const int T = kT > 0 ? kT : T_rt;
  if constexpr (kDense) ms = T;
  for (int t = 0; t < T; ++t) {
    best[t] = mean[t];
    best_m2[t] = m2[t];
    idx[t] = 0;
  }
  for (int c = 1; c < C; ++c) {
    const int64_t o = c * ms;
    for (int t = 0; t < T; ++t) {
      const float v = mean[o + t];
      const float b = best[t];
      const float q = m2[o + t];
      const float bq = best_m2[t];
      const int32_t bi = idx[t];
      const bool take = (v > b) | ((v != v) & (b == b));
      best[t] = take ? v : b;
      best_m2[t] = take ? q : bq;
      idx[t] = take ? c : bi;
    }
  }
  for (int t = 0; t < T; ++t) {
    sigma[t] = uce::welford_std(best_m2[t], inv_denom);
  }
  if (pred != nullptr) {
    for (int t = 0; t < T; ++t) pred[t] = idx[t];
  }
  if (h != nullptr) {
    for (int t = 0; t < T; ++t) h[t] = uce::entr(mean[t]);
    for (int c = 1; c < C; ++c) {
      const int64_t o = c * ms;
      for (int t = 0; t < T; ++t) h[t] += uce::entr(mean[o + t]);
    }
    for (int t = 0; t < T; ++t) mi[t] = uce::mutual_info(h[t], ent[t]);
  }
  if (probs != nullptr) {
    for (int c = 0; c < C; ++c) {
      for (int t = 0; t < T; ++t) probs[c * ps + t] = mean[c * ms + t];
    }
  }
}

}  // namespace uce_cpu
