// CUDA kernels of the streaming Monte-Carlo ops (no torch headers):
// mc_accumulate (fold S samples into a float32 Welford state in place) and
// mc_reduce (the same folds on a private copy, then sigma, pred, entropy,
// mutual information and the mean probabilities).
//
// One thread per OUTPUT pixel looping over classes, pixels flattened over
// (b, n) and tiled as in uce_kernels.cuh (Pixels / tile_pixels, vector or
// scalar mode), so every class row access of a warp is 32 adjacent pixels of
// the state and, when the samples are read as they are, of the samples.
// When the samples are at another resolution, each pixel computes its
// bilinear source taps once per tile (F.interpolate's index and weight
// formula, every product and sum rounded separately) and reads 4 low-res
// values per class; neighbouring output pixels share most taps, so these
// reads hit L1/L2 and the full-resolution sample never exists. The value is
// rounded to the samples' dtype, as the reference's upsampling in that dtype.
//
// Per sample and pixel: m = max_c x_c, e_c = exp(x_c - m), s = sum_c e_c,
// p_c = e_c / s folded into the Welford mean / M2 with k = count + s + 1,
// and the entropy H = log(s) - sum_c e_c (x_c - m) / s (one log per sample,
// no per-class log) folded into the running mean entropy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "common/uce_math.h"
#include "cuda/device_compat.h"
#include "cuda/mc_launchers.h"
#include "cuda/uce_kernels.cuh"

namespace uce_cuda {
namespace detail {

// ---------------------------------------------------------------------------
// Bilinear source taps: uce::bilinear_scale (host, per dim) and
// uce::bilinear_source (per output coordinate) give F.interpolate's indices
// and weights, every product and sum rounded on its own.

// Taps of the thread's V pixels: element offsets of (y0, x0), (y0, x1),
// (y1, x0), (y1, x1) of class 0 of the pixel's batch row in a sample, and the
// weights. Empty when the samples are read as they are.
template <int V, bool kInterp>
struct Taps {};

template <int V>
struct Taps<V, true> {
  int64_t off[V][4];
  float lx0[V], lx1[V], ly0[V], ly1[V];
};

template <int V>
__device__ __forceinline__ void make_taps(Taps<V, true>& t,
                                          const Pixels<V>& px,
                                          const McArgs& a, int64_t N,
                                          float scale_h, float scale_w) {
  const int64_t plane = a.in_h * a.in_w;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t q = px.valid[v] ? px.q[v] : 0;
    const int64_t b = q / N;
    const int64_t n = q - b * N;
    const int64_t oy = n / a.out_w;
    const int64_t ox = n - oy * a.out_w;
    const uce::BilinearTap y =
        uce::bilinear_source(oy, a.in_h, a.out_h, scale_h, a.align_corners);
    const uce::BilinearTap x =
        uce::bilinear_source(ox, a.in_w, a.out_w, scale_w, a.align_corners);
    const int64_t base = b * a.C * plane;
    t.off[v][0] = base + y.i0 * a.in_w + x.i0;
    t.off[v][1] = base + y.i0 * a.in_w + x.i1;
    t.off[v][2] = base + y.i1 * a.in_w + x.i0;
    t.off[v][3] = base + y.i1 * a.in_w + x.i1;
    t.lx0[v] = x.l0;
    t.lx1[v] = x.l1;
    t.ly0[v] = y.l0;
    t.ly1[v] = y.l1;
  }
}

// One class row of the thread's V pixels from sample xs, widened to fp32:
// class c of a sample is c * plane elements from its class 0 (plane = N when
// read as is, in_h * in_w when resampled). Masked pixels read nothing, get 0.
template <DType D, int V, bool kVec, bool kInterp>
__device__ __forceinline__ void sample_row(const ElemT<D>* __restrict__ xs,
                                           const Pixels<V>& px,
                                           const Taps<V, kInterp>& t,
                                           int64_t off, float (&out)[V]) {
  if constexpr (kInterp) {
    const ElemT<D>* __restrict__ r = xs + off;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      out[v] = 0.0f;
      if (px.valid[v]) {
        const float x00 = Elem<D>::load(__ldg(r + t.off[v][0]));
        const float x01 = Elem<D>::load(__ldg(r + t.off[v][1]));
        const float x10 = Elem<D>::load(__ldg(r + t.off[v][2]));
        const float x11 = Elem<D>::load(__ldg(r + t.off[v][3]));
        const float val = uce::bilinear_value(x00, x01, x10, x11, t.lx0[v],
                                              t.lx1[v], t.ly0[v], t.ly1[v]);
        // Rounded to the samples' dtype by the hardware conversion (identity
        // for fp32); not uce::round_to_half / round_to_bf16, which keep a NaN's
        // sign and payload where the conversion gives the canonical NaN.
        out[v] = Elem<D>::load(Elem<D>::store(val));
      }
    }
  } else {
    load_row<D, V, kVec>(xs, px, off, out);
  }
}

// One class row of fp32 state (B, C, N). Plain loads, not __ldg: the
// accumulate kernel writes these addresses later in the same launch.
template <int V, bool kVec>
__device__ __forceinline__ void load_state_row(const float* p,
                                               const Pixels<V>& px,
                                               int64_t off, float (&out)[V]) {
  load_row<DType::kFloat32, V, kVec, /*kLdg=*/false>(p, px, off, out);
}

// An opaque copy of x: the compiler cannot prove it equal to x, so the
// addresses formed from it (class c at c * stride) are recomputed where they
// are used, a few integer ops per load, instead of C (4 * C when resampled)
// 64-bit addresses being hoisted out of the sample loop or kept live from
// the state's load to its store: those took 64-255 registers and spilled.
__device__ __forceinline__ int64_t opaque(int64_t x) {
#if defined(__CUDACC__)
  asm volatile("" : "+l"(x));  // "l": a 64-bit PTX register
#else
  asm volatile("" : "+r"(x));  // host build of the kernels (tests)
#endif
  return x;
}

// -p log p as torch.special.entr: 0 at 0, -inf below 0, NaN stays NaN. Not
// uce::entr, which takes the log from fast_logf (other roundings than logf)
// and gives NaN below 0.
__device__ __forceinline__ float entr(float p) {
  const float kInf = __int_as_float(0x7f800000);
  if (p > 0.0f) return -p * logf(p);
  return p == 0.0f ? 0.0f : (p < 0.0f ? -kInf : p);
}

// mc_reduce outputs of the thread's V pixels from the argmax state and the
// two entropies. MI = H(mean) - mean entropy, clamped at 0 so that NaN stays.
template <int V>
__device__ __forceinline__ void reduce_store(const McArgs& a,
                                             const Pixels<V>& px,
                                             const ArgMax<V>& best,
                                             const float (&hmean)[V],
                                             const float (&ent)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if (!px.valid[v]) continue;
    const int64_t q = px.q[v];
    a.sigma_out[q] = uce::welford_std(best.m2[v], a.inv_denom);
    a.pred_out[q] = best.cls[v];
    if (a.entropy_out != nullptr) {
      a.entropy_out[q] = hmean[v];
      a.mutual_info_out[q] = uce::mutual_info(hmean[v], ent[v]);
    }
  }
}

// ---------------------------------------------------------------------------
// Register tiles (C <= CM <= 64).
//
// The per-class Welford mean / M2 of the thread's V pixels live in registers
// for the whole call: read from the state once (count > 0), then every sample
// of the call is folded in (its C class values loaded into registers, C
// independent loads in flight), then written back once (mc_accumulate) or
// reduced to the outputs (mc_reduce: nothing of the state is written, and
// with count == 0 the stack is read exactly once and only the outputs are
// written). The class loops are unrolled to CM with a runtime c < C guard, so
// the arrays are register-allocated; the buckets and V per bucket are those
// of mc_register_kernel (3 * CM * V = 96 registers of per-class state up to
// CM = 32). Resampled reads keep V at 1 (2 for CM = 4): 4 loads per class
// already give 4 * C loads in flight, and each pixel adds 12 registers of
// taps.

template <DType ST, int CM, int V, bool kVec, bool kInterp, bool kReduce>
__global__ void __launch_bounds__(kRegThreads)
    mc_state_register_kernel(const McArgs a, float scale_h, float scale_w,
                             int64_t tiles) {
  const ElemT<ST>* __restrict__ samples =
      static_cast<const ElemT<ST>*>(a.samples);
  const int C = static_cast<int>(a.C);
  const int S = static_cast<int>(a.S);
  const int64_t N = a.out_h * a.out_w;
  const int64_t CN = a.C * N;
  const int64_t total = a.B * N;
  const int64_t plane = kInterp ? a.in_h * a.in_w : N;
  const int64_t s_stride = a.B * a.C * plane;
  const bool has_state = a.count > 0;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    Pixels<V> px;
    tile_pixels<V, kVec>(px, tile, total, N, CN);
    Taps<V, kInterp> tp;
    if constexpr (kInterp) make_taps<V>(tp, px, a, N, scale_h, scale_w);

    float mean[CM][V], m2[CM][V], ent[V];
    const int64_t ns_in = opaque(N);
#pragma unroll
    for (int c = 0; c < CM; ++c) {
      if (c < C && has_state) {
        const int64_t off = static_cast<int64_t>(c) * ns_in;
        load_state_row<V, kVec>(a.mean, px, off, mean[c]);
        load_state_row<V, kVec>(a.m2, px, off, m2[c]);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          mean[c][v] = 0.0f;
          m2[c][v] = 0.0f;
        }
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
      ent[v] = has_state && px.valid[v] ? a.entropy[px.q[v]] : 0.0f;
    }

    for (int s = 0; s < S; ++s) {
      const ElemT<ST>* __restrict__ xs = samples + s * s_stride;
      const int64_t cs = opaque(plane);
      float x[CM][V], sum[V], te[V];
      load_rows<CM, V>(0, C, [&](int c, float (&row)[V]) {
        sample_row<ST, V, kVec, kInterp>(xs, px, tp,
                                         static_cast<int64_t>(c) * cs, row);
      }, x);
      const float inv_k = 1.0f / static_cast<float>(a.count + s + 1);
      fold_sample<CM, V>(C, x, inv_k, mean, m2, sum, te);
      // H as uce::softmax_entropy, but with logf (fast_logf rounds otherwise).
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float h = logf(sum[v]) - te[v] * (1.0f / sum[v]);
        uce::mean_update(h, inv_k, ent[v]);
      }
    }

    if constexpr (!kReduce) {
      const int64_t ns_out = opaque(N);
#pragma unroll
      for (int c = 0; c < CM; ++c) {
        if (c < C) {
          const int64_t off = static_cast<int64_t>(c) * ns_out;
          store_row<DType::kFloat32, V, kVec>(a.mean, px, off, mean[c]);
          store_row<DType::kFloat32, V, kVec>(a.m2, px, off, m2[c]);
        }
      }
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (px.valid[v]) a.entropy[px.q[v]] = ent[v];
      }
    } else {
      ArgMax<V> best;
#pragma unroll
      for (int c = 0; c < CM; ++c) {
        if (c == 0 || c < C) best.step(c, mean[c], m2[c]);  // C >= 1
      }
      float hmean[V];
#pragma unroll
      for (int v = 0; v < V; ++v) hmean[v] = 0.0f;
      if (a.entropy_out != nullptr) {
#pragma unroll
        for (int c = 0; c < CM; ++c) {
          if (c < C) {
#pragma unroll
            for (int v = 0; v < V; ++v) hmean[v] += entr(mean[c][v]);
          }
        }
      }
      if (a.probs_out != nullptr) {
        const int64_t ns_out = opaque(N);
#pragma unroll
        for (int c = 0; c < CM; ++c) {
          if (c < C) {
            store_row<DType::kFloat32, V, kVec>(
                a.probs_out, px, static_cast<int64_t>(c) * ns_out, mean[c]);
          }
        }
      }
      reduce_store<V>(a, px, best, hmean, ent);
    }
  }
}

// ---------------------------------------------------------------------------
// Class chunks (C > 64): exact for any C.
//
// Pass 1, per sample of the call: one read of the C class values with an
// online max and sum of exp (as mc_chunked_kernel), giving the sample's
// softmax normalisers. Per sample and pixel three floats are kept: max, sum
// and the entropy sum sum_c e_c (x_c - max), which pass 2 accumulates chunk
// by chunk. They live in dynamic shared memory (3 * S * P floats,
// thread-private slots v * threads + tid, conflict-free and needing no
// barrier), or, when that exceeds the 48 KiB default (S > 15 read as is,
// S > 31 resampled), in a global scratch slice per block.
// Pass 2, per chunk of K classes: the chunk's Welford mean / M2 read from the
// state once (count > 0), every sample folded in from registers, then written
// back once (mc_accumulate) or reduced (mc_reduce: running argmax over the
// chunks in class order, H(mean) summed, mean_probs written). The samples are
// read twice, the state once, whatever S; the per-pixel working set is
// independent of C. With S = 0 (mc_reduce of a state) pass 1 is empty.
//
// K = 8 classes, V = 4 pixels (2 resampled): 2 * K * V = 64 (32) Welford
// registers plus K * V = 32 loads in flight per sample (64 resampled).

template <DType ST, int V, bool kVec, bool kInterp, bool kReduce>
__global__ void __launch_bounds__(kMcChunkThreads)
    mc_state_chunked_kernel(const McArgs a, float scale_h, float scale_w,
                            int64_t tiles, float* __restrict__ gstat) {
  constexpr int K = kChunkClasses;
  UCE_DYNAMIC_SHARED(float, s_mcstat);
  const ElemT<ST>* __restrict__ samples =
      static_cast<const ElemT<ST>*>(a.samples);
  const int C = static_cast<int>(a.C);
  const int S = static_cast<int>(a.S);
  const int64_t N = a.out_h * a.out_w;
  const int64_t CN = a.C * N;
  const int64_t total = a.B * N;
  const int64_t plane = kInterp ? a.in_h * a.in_w : N;
  const int64_t s_stride = a.B * a.C * plane;
  const bool has_state = a.count > 0;
  const int64_t P = static_cast<int64_t>(blockDim.x) * V;
  // Rows of P floats: 3 * s (max), 3 * s + 1 (sum), 3 * s + 2 (entropy sum).
  float* __restrict__ stat =
      gstat != nullptr ? gstat + static_cast<int64_t>(blockIdx.x) * 3 * S * P
                       : s_mcstat;
  const float kInf = __int_as_float(0x7f800000);
  const float kNaN = __int_as_float(0x7fc00000);

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    Pixels<V> px;
    tile_pixels<V, kVec>(px, tile, total, N, CN);
    Taps<V, kInterp> tp;
    if constexpr (kInterp) make_taps<V>(tp, px, a, N, scale_h, scale_w);

    // Pass 1: normalisers of every sample.
    for (int s = 0; s < S; ++s) {
      const ElemT<ST>* __restrict__ xs = samples + s * s_stride;
      float m[V], l[V];
      online_normalisers<V>(C, [&](int c, float (&row)[V]) {
        sample_row<ST, V, kVec, kInterp>(xs, px, tp,
                                         static_cast<int64_t>(c) * plane, row);
      }, m, l);
      const int64_t row = 3 * static_cast<int64_t>(s) * P;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t slot = stat_slot(row, v);
        stat[slot] = m[v];
        // A +inf max makes every probability NaN (exp(inf - inf) in the
        // reference's sum); NaN and all -inf reach NaN through l and pass 2.
        stat[slot + P] = m[v] == kInf ? kNaN : l[v];
        stat[slot + 2 * P] = 0.0f;
      }
    }

    // Pass 2: Welford over the samples, K classes at a time.
    ArgMax<V> best;
    float hmean[V];
#pragma unroll
    for (int v = 0; v < V; ++v) hmean[v] = 0.0f;
    for (int c0 = 0; c0 < C; c0 += K) {
      float mean[K][V], m2[K][V];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (c0 + k < C && has_state) {
          const int64_t off = static_cast<int64_t>(c0 + k) * N;
          load_state_row<V, kVec>(a.mean, px, off, mean[k]);
          load_state_row<V, kVec>(a.m2, px, off, m2[k]);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            mean[k][v] = 0.0f;
            m2[k][v] = 0.0f;
          }
        }
      }
      for (int s = 0; s < S; ++s) {
        const ElemT<ST>* __restrict__ xs = samples + s * s_stride;
        const int64_t cs = opaque(plane);
        float x[K][V];
        load_rows<K, V>(c0, C, [&](int c, float (&row)[V]) {
          sample_row<ST, V, kVec, kInterp>(xs, px, tp,
                                           static_cast<int64_t>(c) * cs, row);
        }, x);
        float ms[V], inv[V], te[V];
        const int64_t row = 3 * static_cast<int64_t>(s) * P;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int64_t slot = stat_slot(row, v);
          ms[v] = stat[slot];
          inv[v] = 1.0f / stat[slot + P];
          te[v] = 0.0f;
        }
        const float inv_k = 1.0f / static_cast<float>(a.count + s + 1);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if (c0 + k < C) {
#pragma unroll
            for (int v = 0; v < V; ++v) {
              const float d = x[k][v] - ms[v];
              const float e = exp_f(d);
              te[v] += uce::entropy_term(e, d);
              uce::welford_update(e * inv[v], inv_k, mean[k][v], m2[k][v]);
            }
          }
        }
#pragma unroll
        for (int v = 0; v < V; ++v) {
          stat[stat_slot(row + 2 * P, v)] += te[v];
        }
      }
      if constexpr (!kReduce) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if (c0 + k < C) {
            const int64_t off = static_cast<int64_t>(c0 + k) * opaque(N);
            store_row<DType::kFloat32, V, kVec>(a.mean, px, off, mean[k]);
            store_row<DType::kFloat32, V, kVec>(a.m2, px, off, m2[k]);
          }
        }
      } else {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int c = c0 + k;
          if (c < C) {
            best.step(c, mean[k], m2[k]);
            if (a.entropy_out != nullptr) {
#pragma unroll
              for (int v = 0; v < V; ++v) hmean[v] += entr(mean[k][v]);
            }
            if (a.probs_out != nullptr) {
              store_row<DType::kFloat32, V, kVec>(
                  a.probs_out, px, static_cast<int64_t>(c) * opaque(N),
                  mean[k]);
            }
          }
        }
      }
    }

    // The per-sample entropies, folded in sample order.
    float ent[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      ent[v] = has_state && px.valid[v] ? a.entropy[px.q[v]] : 0.0f;
    }
    for (int s = 0; s < S; ++s) {
      const int64_t row = 3 * static_cast<int64_t>(s) * P;
      const float inv_k = 1.0f / static_cast<float>(a.count + s + 1);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t slot = stat_slot(row + P, v);
        const float sum = stat[slot];
        const float h = logf(sum) - stat[slot + P] * (1.0f / sum);
        uce::mean_update(h, inv_k, ent[v]);
      }
    }
    if constexpr (!kReduce) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (px.valid[v]) a.entropy[px.q[v]] = ent[v];
      }
    } else {
      reduce_store<V>(a, px, best, hmean, ent);
    }
  }
}

// ---------------------------------------------------------------------------
// Launchers.

// Whether the samples (read as they are) and the state and probability rows
// of N pixels allow vector mode with V pixels per thread.
template <DType ST, int V>
bool mc_can_vectorise(const McArgs& a, int64_t N) {
  return can_vectorise<ST, V>(a.samples, N) &&
         can_vectorise<DType::kFloat32, V>(a.mean, N) &&
         can_vectorise<DType::kFloat32, V>(a.m2, N) &&
         can_vectorise<DType::kFloat32, V>(a.probs_out, N);
}

template <DType ST, int CM, int V, bool kReduce>
cudaError_t launch_mc_state_bucket(const McArgs& a, float scale_h,
                                   float scale_w, cudaStream_t stream) {
  const int64_t N = a.out_h * a.out_w;
  const int64_t total = a.B * N;
  if (mc_interp(a)) {
    constexpr int VI = CM <= 4 ? 2 : 1;
    const int64_t tiles =
        ceil_div(total, static_cast<int64_t>(kRegThreads) * VI);
    const dim3 grid(static_cast<unsigned int>(grid_for(tiles)));
    UCE_LAUNCH(grid, kRegThreads, 0, stream,
               mc_state_register_kernel<ST, CM, VI, false, true, kReduce>)(
        a, scale_h, scale_w, tiles);
    return cudaGetLastError();
  }
  const int64_t tiles = ceil_div(total, static_cast<int64_t>(kRegThreads) * V);
  const dim3 grid(static_cast<unsigned int>(grid_for(tiles)));
  if constexpr (V > 1) {
    if (mc_can_vectorise<ST, V>(a, N)) {
      UCE_LAUNCH(grid, kRegThreads, 0, stream,
                 mc_state_register_kernel<ST, CM, V, true, false, kReduce>)(
          a, scale_h, scale_w, tiles);
      return cudaGetLastError();
    }
  }
  UCE_LAUNCH(grid, kRegThreads, 0, stream,
             mc_state_register_kernel<ST, CM, V, false, false, kReduce>)(
      a, scale_h, scale_w, tiles);
  return cudaGetLastError();
}

template <DType ST, bool kReduce>
cudaError_t launch_mc_state_chunked(const McArgs& a, float scale_h,
                                    float scale_w, float* scratch,
                                    cudaStream_t stream) {
  const ChunkPlan plan = mc_chunk_plan(a);
  float* gstat = nullptr;
  if (plan.scratch_floats > 0) {
    if (scratch == nullptr) return cudaErrorInvalidValue;
    gstat = scratch;
  }
  const dim3 grid(static_cast<unsigned int>(plan.grid));
  if (mc_interp(a)) {
    UCE_LAUNCH(grid, kMcChunkThreads, plan.smem_bytes, stream,
               mc_state_chunked_kernel<ST, kMcChunkPixelsInterp, false, true,
                                       kReduce>)(a, scale_h, scale_w,
                                                 plan.tiles, gstat);
    return cudaGetLastError();
  }
  constexpr int V = kMcChunkPixels;
  if (mc_can_vectorise<ST, V>(a, a.out_h * a.out_w)) {
    UCE_LAUNCH(grid, kMcChunkThreads, plan.smem_bytes, stream,
               mc_state_chunked_kernel<ST, V, true, false, kReduce>)(
        a, scale_h, scale_w, plan.tiles, gstat);
  } else {
    UCE_LAUNCH(grid, kMcChunkThreads, plan.smem_bytes, stream,
               mc_state_chunked_kernel<ST, V, false, false, kReduce>)(
        a, scale_h, scale_w, plan.tiles, gstat);
  }
  return cudaGetLastError();
}

template <DType ST, bool kReduce>
cudaError_t launch_mc_state(const McArgs& a, float* scratch,
                            cudaStream_t stream) {
  const float scale_h = uce::bilinear_scale(a.in_h, a.out_h, a.align_corners);
  const float scale_w = uce::bilinear_scale(a.in_w, a.out_w, a.align_corners);
  if (a.C > kRegisterMaxClasses) {
    return launch_mc_state_chunked<ST, kReduce>(a, scale_h, scale_w, scratch,
                                                stream);
  }
  return with_register_bucket(a.C, [&](auto b) {
    using B = decltype(b);
    return launch_mc_state_bucket<ST, B::CM, B::V, kReduce>(a, scale_h,
                                                            scale_w, stream);
  });
}

}  // namespace detail
}  // namespace uce_cuda
