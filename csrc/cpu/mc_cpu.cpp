// CPU kernels for the streaming Monte-Carlo statistics: mc_accumulate_ and
// mc_reduce (contract in uce_fast/ops.py).
//
// Same layout and tiling as the fused U-CE kernel (uce_cpu.cpp): a tile
// is T consecutive output pixels of one batch row x all classes, every
// per-pixel quantity a T-float array, at::parallel_for over (batch row,
// tile), one instantiation per instruction set. Per tile the samples are
// streamed in order, each through max -> exp / sum / entropy -> Welford,
// with the C x T working set in L1/L2 (mc_tile_size). mc_accumulate_
// updates the state rows of the tile in place; mc_reduce keeps C x T
// mean/M2 buffers (loaded from the state, or started by the first sample),
// streams all samples through them and writes only the outputs, so a whole
// stack costs one read of it and no (B, C, N) intermediate.
//
// Samples at another resolution (in_h x in_w != out_h x out_w) are resampled
// on the fly: per call, per-row and per-column source taps
// (uce::bilinear_source); per tile, the four source offsets and the weights
// of each output pixel (a tile may span output rows); per sample, each class
// row of the tile is interpolated into a C x T fp32 buffer and rounded to
// the samples' dtype. Groups of V = 16 (AVX-512) / 8 (AVX2) output pixels
// within one output row whose source columns fit 2V columns (upsampling, or
// downsampling by less than ~2x) load a 2V-column window per source row and
// pick their taps with in-register permutes; the other pixels load their
// four taps one by one. Measured at 64x128 -> 256x512, C = 19: with per-tap
// loads only, the resampled pass took 3x (fp32) to 12x (fp16) as long as
// the full-resolution one, with the windows ~1.6x. The interpolation runs in
// its own function per instruction set, built with fp-contract=off: the
// contract's formula rounds every product and sum separately, which an FMA
// would not.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/mc_checks.h"
#include "cpu/cpu_common.h"
#include "cpu/mc_tile.h"

#ifdef UCE_X86
#include <immintrin.h>
#define UCE_TARGET_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#endif

#if defined(__GNUC__) && !defined(__clang__)
#define UCE_NO_CONTRACT __attribute__((noinline, optimize("fp-contract=off")))
#elif defined(__GNUC__) || defined(__clang__)
// uce::bilinear_value rounds each operation itself under clang.
#define UCE_NO_CONTRACT __attribute__((noinline))
#else
#define UCE_NO_CONTRACT
#endif

namespace uce_cpu {
namespace {

// ---------------------------------------------------------------------------
// Resampling.

// Source taps of every output coordinate along one dim, once per call.
struct AxisTaps {
  std::vector<int32_t> i0, i1;
  std::vector<float> l0, l1;
};

AxisTaps axis_taps(int64_t in, int64_t out, bool align_corners) {
  AxisTaps a;
  a.i0.resize(out);
  a.i1.resize(out);
  a.l0.resize(out);
  a.l1.resize(out);
  const float scale = uce::bilinear_scale(in, out, align_corners);
  for (int64_t o = 0; o < out; ++o) {
    const uce::BilinearTap k =
        uce::bilinear_source(o, in, out, scale, align_corners);
    a.i0[o] = static_cast<int32_t>(k.i0);
    a.i1[o] = static_cast<int32_t>(k.i1);
    a.l0[o] = k.l0;
    a.l1[o] = k.l1;
  }
  return a;
}


void tile_taps(const AxisTaps& rows, const AxisTaps& cols, int64_t in_w,
               int64_t out_w, int64_t n0, int T, int V, const TileTaps& k) {
  int64_t oy = n0 / out_w;
  int64_t ox = n0 - oy * out_w;
  for (int t = 0; t < T; ++t) {
    const int64_t r0 = rows.i0[oy] * in_w;
    const int64_t r1 = rows.i1[oy] * in_w;
    k.o00[t] = static_cast<int32_t>(r0 + cols.i0[ox]);
    k.o01[t] = static_cast<int32_t>(r0 + cols.i1[ox]);
    k.o10[t] = static_cast<int32_t>(r1 + cols.i0[ox]);
    k.o11[t] = static_cast<int32_t>(r1 + cols.i1[ox]);
    k.wx0[t] = cols.l0[ox];
    k.wx1[t] = cols.l1[ox];
    k.wy0[t] = rows.l0[oy];
    k.wy1[t] = rows.l1[oy];
    if (++ox == out_w) {
      ox = 0;
      ++oy;
    }
  }
  if (V == 0) return;
  for (int t0 = 0, g = 0; t0 < T; t0 += V, ++g) {
    const int64_t first = n0 + t0;
    const int64_t last = first + V - 1;
    const int64_t oy0 = first / out_w;
    // Partial groups (tail of a tile) and groups crossing a row take the
    // scalar path.
    k.fast[g] = 0;
    if (t0 + V > T || last / out_w != oy0) continue;
    const int64_t ox0 = first - oy0 * out_w;
    const int32_t base = cols.i0[ox0];
    if (cols.i1[ox0 + V - 1] - base >= 2 * V) continue;
    k.fast[g] = 1;
    k.go0[g] = static_cast<int32_t>(rows.i0[oy0] * in_w + base);
    k.go1[g] = static_cast<int32_t>(rows.i1[oy0] * in_w + base);
    k.gcnt[g] = static_cast<int32_t>(in_w - base);
    k.gwy0[g] = rows.l0[oy0];
    k.gwy1[g] = rows.l1[oy0];
    for (int v = 0; v < V; ++v) {
      k.r0[t0 + v] = cols.i0[ox0 + v] - base;
      k.r1[t0 + v] = cols.i1[ox0 + v] - base;
    }
  }
}


// Scalar path for pixels [t0, t1) of one class row.
template <typename ST>
UCE_INLINE void resample_taps(const ST* __restrict p, int t0, int t1,
                            const int32_t* __restrict o00,
                            const int32_t* __restrict o01,
                            const int32_t* __restrict o10,
                            const int32_t* __restrict o11,
                            const float* __restrict wx0,
                            const float* __restrict wx1,
                            const float* __restrict wy0,
                            const float* __restrict wy1,
                            float* __restrict xr) {
  for (int t = t0; t < t1; ++t) {
    xr[t] = uce::bilinear_value(load_f(p[o00[t]]), load_f(p[o01[t]]),
                                load_f(p[o10[t]]), load_f(p[o11[t]]), wx0[t],
                                wx1[t], wy0[t], wy1[t]);
  }
}

// Rounds a class row to the samples' dtype and folds it into the max.
template <typename ST>
UCE_INLINE void round_max(float* __restrict xr, float* __restrict mx,
                          int T) {
  for (int t = 0; t < T; ++t) {
    const float v = round_as<ST>(xr[t]);
    const float m = mx[t];
    xr[t] = v;
    mx[t] = v > m ? v : m;
  }
}

// Without a window path (generic instruction set): every pixel scalar.
template <typename ST>
UCE_INLINE void gather_scalar(const Gather<ST>& a) {
  const int T = a.T;
  float* __restrict mx = a.mx;
  for (int t = 0; t < T; ++t) mx[t] = -std::numeric_limits<float>::infinity();
  for (int c = 0; c < a.C; ++c) {
    float* __restrict xr = a.xf + static_cast<int64_t>(c) * T;
    resample_taps(a.plane0 + c * a.c_stride, 0, T, a.k.o00, a.k.o01, a.k.o10,
                a.k.o11, a.k.wx0, a.k.wx1, a.k.wy0, a.k.wy1, xr);
    round_max<ST>(xr, mx, T);
  }
}

// With a window path: resample(q0, q1, cnt, r0, r1, wx0, wx1, wy0, wy1, out)
// interpolates V pixels from the 2V-column windows at q0 (row i0y) and q1
// (row i1y), of which cnt columns lie within the row.
template <typename ST, int V, typename Resample>
UCE_INLINE void gather_windows(const Gather<ST>& a, Resample resample) {
  const int T = a.T;
  const TileTaps& k = a.k;
  float* __restrict mx = a.mx;
  for (int t = 0; t < T; ++t) mx[t] = -std::numeric_limits<float>::infinity();
  for (int c = 0; c < a.C; ++c) {
    const ST* __restrict p = a.plane0 + c * a.c_stride;
    float* __restrict xr = a.xf + static_cast<int64_t>(c) * T;
    for (int t0 = 0, g = 0; t0 < T; t0 += V, ++g) {
      if (k.fast[g]) {
        resample(p + k.go0[g], p + k.go1[g], k.gcnt[g], k.r0 + t0, k.r1 + t0,
               k.wx0 + t0, k.wx1 + t0, k.gwy0[g], k.gwy1[g], xr + t0);
      } else {
        resample_taps(p, t0, std::min(t0 + V, T), k.o00, k.o01, k.o10, k.o11,
                    k.wx0, k.wx1, k.wy0, k.wy1, xr);
      }
    }
    round_max<ST>(xr, mx, T);
  }
}

// ---------------------------------------------------------------------------
// Streaming statistics of one tile.


template <typename ST>
struct McStream {
  // Samples: x0 = samples[0, b, 0, n0] at full resolution, samples[0, b, 0,
  // 0] when resampled (gather != nullptr, arguments in *g).
  const ST* x0;
  const ST* next;  // full resolution: first sample of the next tile, or null
  int next_T;
  int64_t s_stride;  // B * C * in_h * in_w
  int64_t c_stride;  // in_h * in_w
  int S;
  int64_t count;  // samples already in the accumulators (0: start afresh)
  int T;
  int C;
  GatherFn<ST> gather;
  Gather<ST>* g;
  // Accumulators (row stride ms): the state rows of the tile, or C x T
  // buffers, optionally loaded first from the state rows (row stride N).
  float* mean;
  float* m2;
  float* ent;
  int64_t ms;
  const float* in_mean;  // nullptr: nothing to load
  const float* in_m2;
  const float* in_ent;
  int64_t in_stride;
  // Scratch: C x T each, T each.
  float* e;
  float* xf;
  float* w0;
  float* w1;
  float* w2;
  int32_t* idx;
  // Finalisation (sigma == nullptr: none) from fin_* (row stride fin_ms).
  const float* fin_mean;
  const float* fin_m2;
  const float* fin_ent;
  int64_t fin_ms;
  float inv_denom;
  float* sigma;
  int64_t* pred;
  float* h;      // nullptr: no entropy / mutual information
  float* mi;
  float* probs;  // nullptr: no mean probabilities; row stride N
  int64_t N;
};


template <typename ST, int kT>
UCE_INLINE void mc_stream_tile(const McStream<ST>& a) {
  if (a.in_mean != nullptr) {
    mc_load_impl<kT>(a.in_mean, a.in_m2, a.in_ent, a.in_stride, a.T, a.C,
                     a.mean, a.m2, a.ent, a.ms);
  }
  if (a.S > 0) {
    // The C x T buffers of mc_reduce (ms == T) or the state rows (ms == N).
    if (a.ms == a.T) {
      mc_stream_impl<ST, kT, true, true>(
          a.x0, a.next, a.next_T, a.s_stride, a.c_stride, a.S, a.count, a.T,
          a.C, a.gather, a.g, a.mean, a.m2, a.ent, a.ms, a.e, a.xf, a.w0,
          a.w1, a.w2);
    } else {
      mc_stream_impl<ST, kT, true, false>(
          a.x0, a.next, a.next_T, a.s_stride, a.c_stride, a.S, a.count, a.T,
          a.C, a.gather, a.g, a.mean, a.m2, a.ent, a.ms, a.e, a.xf, a.w0,
          a.w1, a.w2);
    }
  }
  if (a.sigma != nullptr) {
    mc_finalize_impl<kT, false>(a.fin_mean, a.fin_m2, a.fin_ent, a.fin_ms,
                                a.T, a.C, a.inv_denom, a.w0, a.w1, a.idx,
                                a.sigma, a.pred, a.h, a.mi, a.probs, a.N);
  }
}

// ---------------------------------------------------------------------------
// Instruction-set variants (Isa, cpu_isa: cpu_common.h).

#ifdef UCE_X86
// V = 16 pixels from 32-column windows: one vpermt2ps per tap and row
// replaces 16 scalar loads. The windows are read with masked loads, only
// up to the end of the row. Products and sums in the order of
// uce::bilinear_value; the callers are built without contraction.
template <typename ST>
UCE_TARGET_AVX512 UCE_INLINE __m512 load16_avx512(const ST* p, __mmask16 m) {
  if constexpr (std::is_same<ST, float>::value) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    if constexpr (std::is_same<ST, c10::Half>::value) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

template <typename ST>
UCE_TARGET_AVX512 UCE_INLINE void resample16_avx512(
    const ST* q0, const ST* q1, int cnt, const int32_t* r0, const int32_t* r1,
    const float* wx0, const float* wx1, float wy0, float wy1, float* out) {
  const __mmask16 m_lo =
      cnt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1u);
  const __mmask16 m_hi = cnt >= 32   ? __mmask16(0xFFFF)
                         : cnt <= 16 ? __mmask16(0)
                                     : __mmask16((1u << (cnt - 16)) - 1u);
  const __m512 a_lo = load16_avx512(q0, m_lo);
  const __m512 a_hi = load16_avx512(q0 + 16, m_hi);
  const __m512 b_lo = load16_avx512(q1, m_lo);
  const __m512 b_hi = load16_avx512(q1 + 16, m_hi);
  const __m512i i0 = _mm512_loadu_si512(r0);
  const __m512i i1 = _mm512_loadu_si512(r1);
  const __m512 l0x = _mm512_loadu_ps(wx0);
  const __m512 l1x = _mm512_loadu_ps(wx1);
  const __m512 x00 = _mm512_permutex2var_ps(a_lo, i0, a_hi);
  const __m512 x01 = _mm512_permutex2var_ps(a_lo, i1, a_hi);
  const __m512 x10 = _mm512_permutex2var_ps(b_lo, i0, b_hi);
  const __m512 x11 = _mm512_permutex2var_ps(b_lo, i1, b_hi);
  const __m512 top =
      _mm512_add_ps(_mm512_mul_ps(x00, l0x), _mm512_mul_ps(x01, l1x));
  const __m512 bot =
      _mm512_add_ps(_mm512_mul_ps(x10, l0x), _mm512_mul_ps(x11, l1x));
  _mm512_storeu_ps(out,
                   _mm512_add_ps(_mm512_mul_ps(top, _mm512_set1_ps(wy0)),
                                 _mm512_mul_ps(bot, _mm512_set1_ps(wy1))));
}

// V = 8 pixels from 16-column windows: vpermps on both halves and a blend.
// float16 is widened with F16C (every AVX2 CPU has it; checked at dispatch).

template <typename ST>
UCE_TARGET_AVX2_F16C UCE_INLINE void load16_avx2(const ST* p, int cnt,
                                                 __m256& lo, __m256& hi) {
  if constexpr (std::is_same<ST, float>::value) {
    if (cnt >= 16) {
      lo = _mm256_loadu_ps(p);
      hi = _mm256_loadu_ps(p + 8);
    } else {
      const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      lo = _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt),
                                                    iota));
      hi = _mm256_maskload_ps(
          p + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt - 8), iota));
    }
  } else {
    // No masked 16-bit loads: the row end goes through a zero-padded copy.
    alignas(32) uint16_t tmp[16];
    const void* src = p;
    if (cnt < 16) {
      for (int i = 0; i < 16; ++i) tmp[i] = i < cnt ? p[i].x : 0;
      src = tmp;
    }
    const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(src));
    const __m128i h_lo = _mm256_castsi256_si128(h);
    const __m128i h_hi = _mm256_extracti128_si256(h, 1);
    if constexpr (std::is_same<ST, c10::Half>::value) {
      lo = _mm256_cvtph_ps(h_lo);
      hi = _mm256_cvtph_ps(h_hi);
    } else {
      lo = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(h_lo), 16));
      hi = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(h_hi), 16));
    }
  }
}

UCE_TARGET_AVX2 UCE_INLINE __m256 permute16_avx2(__m256 lo, __m256 hi,
                                                 __m256i idx) {
  const __m256 hi_sel =
      _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx),
                          _mm256_permutevar8x32_ps(hi, idx), hi_sel);
}

template <typename ST>
UCE_TARGET_AVX2_F16C UCE_INLINE void resample8_avx2(
    const ST* q0, const ST* q1, int cnt, const int32_t* r0, const int32_t* r1,
    const float* wx0, const float* wx1, float wy0, float wy1, float* out) {
  __m256 a_lo, a_hi, b_lo, b_hi;
  load16_avx2(q0, cnt, a_lo, a_hi);
  load16_avx2(q1, cnt, b_lo, b_hi);
  const __m256i i0 =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0));
  const __m256i i1 =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1));
  const __m256 l0x = _mm256_loadu_ps(wx0);
  const __m256 l1x = _mm256_loadu_ps(wx1);
  const __m256 x00 = permute16_avx2(a_lo, a_hi, i0);
  const __m256 x01 = permute16_avx2(a_lo, a_hi, i1);
  const __m256 x10 = permute16_avx2(b_lo, b_hi, i0);
  const __m256 x11 = permute16_avx2(b_lo, b_hi, i1);
  const __m256 top =
      _mm256_add_ps(_mm256_mul_ps(x00, l0x), _mm256_mul_ps(x01, l1x));
  const __m256 bot =
      _mm256_add_ps(_mm256_mul_ps(x10, l0x), _mm256_mul_ps(x11, l1x));
  _mm256_storeu_ps(out,
                   _mm256_add_ps(_mm256_mul_ps(top, _mm256_set1_ps(wy0)),
                                 _mm256_mul_ps(bot, _mm256_set1_ps(wy1))));
}
#endif

template <typename ST>
using StreamFn = void (*)(const McStream<ST>&);

// The tile body, for tile_variant (cpu_common.h).
template <typename ST>
struct StreamBody {
  template <int kT>
  struct At {
    static UCE_INLINE void run(const McStream<ST>& a) {
      mc_stream_tile<ST, kT>(a);
    }
  };
};

template <typename ST>
UCE_NO_CONTRACT void gather_generic(const Gather<ST>& a) {
  gather_scalar<ST>(a);
}

#ifdef UCE_X86
template <typename ST>
UCE_TARGET_AVX2_F16C UCE_NO_CONTRACT void gather_avx2(const Gather<ST>& a) {
  gather_windows<ST, 8>(a, resample8_avx2<ST>);
}
template <typename ST>
UCE_TARGET_AVX512 UCE_NO_CONTRACT void gather_avx512(const Gather<ST>& a) {
  gather_windows<ST, 16>(a, resample16_avx512<ST>);
}
#endif

// Also returns the group width V of the window path (0: none).
template <typename ST>
GatherFn<ST> pick_gather(Isa isa, int* V) {
#ifdef UCE_X86
  if (isa == Isa::kAvx512) {
    *V = 16;
    return &gather_avx512<ST>;
  }
  if (isa == Isa::kAvx2 && __builtin_cpu_supports("f16c")) {
    *V = 8;
    return &gather_avx2<ST>;
  }
#endif
  (void)isa;
  *V = 0;
  return &gather_generic<ST>;
}

// ---------------------------------------------------------------------------
// Driver: at::parallel_for over (batch row, tile) work items.

struct McParams {
  int64_t B = 0, C = 0, N = 0;
  int64_t T = 0, ntiles = 0;
  // Samples (S, B, C, in_h * in_w); nullptr or S == 0: none.
  const void* samples = nullptr;
  int64_t S = 0;
  int64_t in_plane = 0;
  // Resampling tables (nullptr: full resolution).
  const AxisTaps* rows = nullptr;
  const AxisTaps* cols = nullptr;
  int64_t in_w = 0, out_w = 0;
  // State (nullptr when absent) holding `count` samples.
  float* mean = nullptr;
  float* m2 = nullptr;
  float* ent = nullptr;
  int64_t count = 0;
  // true: fold the samples into the state in place (mc_accumulate_);
  // false: mc_reduce into the outputs below.
  bool accumulate = false;
  float inv_denom = 0.0f;
  float* sigma = nullptr;
  int64_t* pred = nullptr;
  float* h = nullptr;
  float* mi = nullptr;
  float* probs = nullptr;
};

template <typename ST>
void run_mc(const McParams& p) {
  const Isa isa = cpu_isa();
  const StreamFn<ST> full =
      tile_variant<StreamBody<ST>::template At, McStream<ST>>(isa, p.T);
  const StreamFn<ST> tail =
      tile_variant<StreamBody<ST>::template At, McStream<ST>>(isa, 0);
  const bool resample = p.rows != nullptr;
  int V = 0;
  const GatherFn<ST> gather = resample ? pick_gather<ST>(isa, &V) : nullptr;
  const bool has_samples = p.samples != nullptr && p.S > 0;
  // mc_reduce with samples: C x T accumulators; without: straight from the
  // state rows.
  const bool local = !p.accumulate && has_samples;
  const int64_t T = p.T, C = p.C, N = p.N;
  const int64_t work = T * C * (p.S + 1);

  at::parallel_for(0, p.B * p.ntiles, grain_for(work), [&](int64_t begin,
                                                           int64_t end) {
    constexpr bool kWiden = !std::is_same<ST, float>::value;
    const bool need_xf = has_samples && (kWiden || resample);
    const int64_t ct = Scratch::size_of(C * T);
    const int64_t t1 = Scratch::size_of(T);
    Scratch scratch((has_samples ? ct : 0) + (need_xf ? ct : 0) +
                    (local ? 2 * ct : 0) + (resample ? 21 : 5) * t1);
    McStream<ST> m{};
    Gather<ST> g{};
    m.s_stride = p.B * C * p.in_plane;
    m.c_stride = p.in_plane;
    m.S = static_cast<int>(has_samples ? p.S : 0);
    m.C = static_cast<int>(C);
    m.gather = gather;
    m.g = &g;
    m.inv_denom = p.inv_denom;
    m.N = N;
    m.e = has_samples ? scratch.take(C * T) : nullptr;
    m.xf = need_xf ? scratch.take(C * T) : nullptr;
    float* lmean = local ? scratch.take(C * T) : nullptr;
    float* lm2 = local ? scratch.take(C * T) : nullptr;
    float* lent = scratch.take(T);
    m.w0 = scratch.take(T);
    m.w1 = scratch.take(T);
    m.w2 = scratch.take(T);
    m.idx = reinterpret_cast<int32_t*>(scratch.take(T));
    if (resample) {
      g.c_stride = p.in_plane;
      g.C = static_cast<int>(C);
      g.k.o00 = reinterpret_cast<int32_t*>(scratch.take(T));
      g.k.o01 = reinterpret_cast<int32_t*>(scratch.take(T));
      g.k.o10 = reinterpret_cast<int32_t*>(scratch.take(T));
      g.k.o11 = reinterpret_cast<int32_t*>(scratch.take(T));
      g.k.wx0 = scratch.take(T);
      g.k.wx1 = scratch.take(T);
      g.k.wy0 = scratch.take(T);
      g.k.wy1 = scratch.take(T);
      g.k.r0 = reinterpret_cast<int32_t*>(scratch.take(T));
      g.k.r1 = reinterpret_cast<int32_t*>(scratch.take(T));
      g.k.fast = reinterpret_cast<int32_t*>(scratch.take(T));
      g.k.go0 = reinterpret_cast<int32_t*>(scratch.take(T));
      g.k.go1 = reinterpret_cast<int32_t*>(scratch.take(T));
      g.k.gcnt = reinterpret_cast<int32_t*>(scratch.take(T));
      g.k.gwy0 = scratch.take(T);
      g.k.gwy1 = scratch.take(T);
      g.xf = m.xf;
      g.mx = m.w0;
    }
    const ST* samples = static_cast<const ST*>(p.samples);

    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / p.ntiles;
      const int64_t n0 = (it % p.ntiles) * T;
      const int Tc = static_cast<int>(std::min<int64_t>(T, N - n0));
      const int64_t pix = b * N + n0;
      const int64_t row0 = b * C * N + n0;  // [b, 0, n0] of (B, C, N)
      m.T = Tc;
      if (has_samples) {
        if (resample) {
          m.x0 = samples + b * C * p.in_plane;
          g.T = Tc;
          tile_taps(*p.rows, *p.cols, p.in_w, p.out_w, n0, Tc, V, g.k);
        } else {
          m.x0 = samples + row0;
          m.next = nullptr;
          if (it + 1 < end) {
            const int64_t b1 = (it + 1) / p.ntiles;
            const int64_t n1 = ((it + 1) % p.ntiles) * T;
            m.next = samples + b1 * C * N + n1;
            m.next_T = static_cast<int>(std::min<int64_t>(T, N - n1));
          }
        }
      }
      const bool has_state = p.count > 0;
      if (p.accumulate) {
        m.count = p.count;
        m.mean = p.mean + row0;
        m.m2 = p.m2 + row0;
        m.ent = p.ent + pix;
        m.ms = N;
      } else if (local) {
        m.count = p.count;
        m.mean = lmean;
        m.m2 = lm2;
        m.ent = lent;
        m.ms = Tc;
        if (has_state) {
          m.in_mean = p.mean + row0;
          m.in_m2 = p.m2 + row0;
          m.in_ent = p.ent + pix;
          m.in_stride = N;
        }
        m.fin_mean = lmean;
        m.fin_m2 = lm2;
        m.fin_ent = lent;
        m.fin_ms = Tc;
      } else {
        m.fin_mean = p.mean + row0;
        m.fin_m2 = p.m2 + row0;
        m.fin_ent = p.ent + pix;
        m.fin_ms = N;
      }
      if (!p.accumulate) {
        m.sigma = p.sigma + pix;
        m.pred = p.pred + pix;
        m.h = p.h != nullptr ? p.h + pix : nullptr;
        m.mi = p.mi != nullptr ? p.mi + pix : nullptr;
        m.probs = p.probs != nullptr ? p.probs + row0 : nullptr;
      }
      (Tc == T ? full : tail)(m);
    }
  });
}

// ---------------------------------------------------------------------------
// Argument checking.

// Shared checks (csrc/common/mc_checks.h) with the CPU device check, plus the
// CPU kernels' own bound: their interpolation offsets are 32-bit.
const auto kCpu = [](const at::Tensor& t, const char* name) {
  check_cpu(t, name);
};

uce_mc::Geometry check_geometry(int64_t in_h, int64_t in_w, int64_t out_h,
                                int64_t out_w) {
  const uce_mc::Geometry g = uce_mc::check_geometry(in_h, in_w, out_h, out_w);
  TORCH_CHECK(!g.resample || g.in_plane <= INT32_MAX,
              "uce_fast: resampled samples must have fewer than 2^31 "
              "pixels per class, got ",
              g.in_plane);
  return g;
}

// ---------------------------------------------------------------------------
// Operators.

// The mutable state is taken as at::Tensor& (the C++ type of a Tensor(a!)
// argument): every backend's kernel of one op must have the same C++
// signature, or registering the second one aborts the library's load.
void mc_accumulate_cpu(at::Tensor& mean, at::Tensor& m2, at::Tensor& entropy,
                       const at::Tensor& samples,
                       int64_t count, int64_t in_h, int64_t in_w,
                       int64_t out_h, int64_t out_w, bool align_corners) {
  const uce_mc::Geometry geo = check_geometry(in_h, in_w, out_h, out_w);
  const auto [B, C, S] =
      uce_mc::check_accumulate(mean, m2, entropy, samples, count, geo, kCpu);
  if (B * geo.N == 0 || S == 0) return;

  McParams p;
  p.B = B;
  p.C = C;
  p.N = geo.N;
  p.T = mc_tile_size(C);
  p.ntiles = (p.N + p.T - 1) / p.T;
  p.samples = samples.data_ptr();
  p.S = S;
  p.in_plane = geo.in_plane;
  p.mean = mean.data_ptr<float>();
  p.m2 = m2.data_ptr<float>();
  p.ent = entropy.data_ptr<float>();
  p.count = count;
  p.accumulate = true;
  AxisTaps rows, cols;
  if (geo.resample) {
    rows = axis_taps(in_h, out_h, align_corners);
    cols = axis_taps(in_w, out_w, align_corners);
    p.rows = &rows;
    p.cols = &cols;
    p.in_w = in_w;
    p.out_w = out_w;
  }
  dispatch_float(samples.scalar_type(), "samples", [&](auto sv) {
    using ST = decltype(sv);
    run_mc<ST>(p);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mc_reduce_cpu(const std::optional<at::Tensor>& samples,
              const std::optional<at::Tensor>& mean,
              const std::optional<at::Tensor>& m2,
              const std::optional<at::Tensor>& entropy, int64_t count,
              int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
              bool align_corners, int64_t correction, bool want_probs,
              bool want_entropy) {
  const uce_mc::Geometry geo = check_geometry(in_h, in_w, out_h, out_w);
  const uce_mc::ReduceInputs in =
      uce_mc::check_reduce_inputs(samples, mean, m2, entropy, count);
  const bool has_samples = in.has_samples;
  const uce_mc::Sizes z = uce_mc::check_reduce(
      samples, mean, m2, entropy, count, correction, geo, in, kCpu);
  const int64_t B = z.B, C = z.C, S = z.S, N = geo.N;
  const int64_t n = count + S;
  auto [sigma, pred, h, mi, probs] = uce_mc::reduce_outputs(
      has_samples ? *samples : *mean, z, N, want_probs, want_entropy);
  if (B * N == 0) return {sigma, pred, h, mi, probs};

  McParams p;
  p.B = B;
  p.C = C;
  p.N = N;
  p.T = mc_tile_size(C);
  p.ntiles = (N + p.T - 1) / p.T;
  p.samples = has_samples ? samples->data_ptr() : nullptr;
  p.S = S;
  p.in_plane = geo.in_plane;
  if (count > 0) {
    p.mean = mean->data_ptr<float>();
    p.m2 = m2->data_ptr<float>();
    p.ent = entropy->data_ptr<float>();
  }
  p.count = count;
  p.accumulate = false;
  p.inv_denom = static_cast<float>(1.0 / static_cast<double>(n - correction));
  p.sigma = sigma.data_ptr<float>();
  p.pred = pred.data_ptr<int64_t>();
  p.h = want_entropy ? h.data_ptr<float>() : nullptr;
  p.mi = want_entropy ? mi.data_ptr<float>() : nullptr;
  p.probs = want_probs ? probs.data_ptr<float>() : nullptr;
  AxisTaps rows, cols;
  if (geo.resample && S > 0) {
    rows = axis_taps(in_h, out_h, align_corners);
    cols = axis_taps(in_w, out_w, align_corners);
    p.rows = &rows;
    p.cols = &cols;
    p.in_w = in_w;
    p.out_w = out_w;
  }
  dispatch_float(has_samples ? samples->scalar_type() : at::kFloat, "samples",
                 [&](auto sv) {
                   using ST = decltype(sv);
                   run_mc<ST>(p);
                 });
  return {sigma, pred, h, mi, probs};
}

}  // namespace
}  // namespace uce_cpu

TORCH_LIBRARY_IMPL(uce_fast, CPU, m) {
  m.impl("mc_accumulate_", &uce_cpu::mc_accumulate_cpu);
  m.impl("mc_reduce", &uce_cpu::mc_reduce_cpu);
}
