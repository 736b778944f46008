// CUDA kernels of the per-pixel Monte-Carlo statistics (no torch headers),
// one body for the three ops that need them:
//  * mc_accumulate: fold S samples into a float32 Welford state in place;
//  * mc_reduce: the same folds on a private copy, then sigma, pred, entropy,
//    mutual information and the mean probabilities;
//  * uce_forward with samples (the fused forward): the folds from an empty
//    state, then sigma and the weighted CE of the logits in the same kernel
//    (ce_pixels of uce_kernels.cuh), so the stack is read in one launch and
//    sigma never leaves registers.
// There is one kernel per path, mc_register_kernel (C <= 64) and
// mc_chunked_kernel (C > 64); what happens with a tile's statistics is their
// `Out` parameter (Accumulate, Reduce, FusedCe below), which also switches
// off at compile time what its op does not need (the state read, the
// entropy, the resampled reads).
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
// Per sample and pixel: m = max_c x_c, e_c = exp(x_c - m), s = sum_c e_c
// (max and sum kept apart: p_c = e_c / s, never exp(x_c - log-sum-exp)),
// p_c folded into the Welford mean / M2 with k = count + s + 1, and, with
// the entropy, H = log(s) - sum_c e_c (x_c - m) / s (one log per sample, no
// per-class log) folded into the running mean entropy. sigma is
// sqrt(M2[k] / (count + S - correction)) of the first argmax k of the mean
// (NaN counting as the maximum).
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

// Register-tile kernel: 128 threads. Its per-thread state is 3 * CM * V fp32
// registers (Welford mean and M2 per class and pixel, plus the current
// sample's row): 96 for every bucket up to CM = 32, about 130 registers per
// thread in all, so four 128-thread blocks stay resident per SM; each thread
// keeps C independent loads in flight per sample, which is what hides the
// HBM latency here.
constexpr int kRegThreads = 128;

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

// The class stride of the samples inside a sample loop: opaque where the
// hoisted addresses would sit beside the state's (the state is read and
// written back) or be 4 * C of them (resampled reads); plain for the fused
// forward, whose C sample addresses ptxas keeps in fewer registers when
// hoisted (sm_90, the CM = 8, V = 4 bucket in vector mode: 120 registers and
// no spill, against 128 and a spill with the opaque stride).
template <bool kOpaque>
__device__ __forceinline__ int64_t sample_stride(int64_t plane) {
  if constexpr (kOpaque) {
    return opaque(plane);
  } else {
    return plane;
  }
}

// ---------------------------------------------------------------------------
// Per-pixel statistics.

// Running argmax of the class means: strict >, so the first maximum wins;
// NaN counts as the maximum (first NaN wins), like torch.argmax and the CPU
// kernels.
__device__ __forceinline__ bool argmax_takes(float v, float best) {
  return (v > best) || (v != v && best == best);
}

// Running argmax over the class means of the thread's V pixels, carrying the
// winning class's M2 and index. Classes are stepped in order, from class 0
// (which always takes).
template <int V>
struct ArgMax {
  float mean[V] = {};
  float m2[V] = {};
  int32_t cls[V] = {};

  __device__ __forceinline__ void step(int c, const float (&mean_c)[V],
                                       const float (&m2_c)[V]) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const bool take = c == 0 || argmax_takes(mean_c[v], mean[v]);
      mean[v] = take ? mean_c[v] : mean[v];
      m2[v] = take ? m2_c[v] : m2[v];
      cls[v] = take ? c : cls[v];
    }
  }

  // Classes c0 .. c0 + K - 1 (those below C), in order.
  template <int K>
  __device__ __forceinline__ void step_chunk(int c0, int C,
                                             const float (&mean_k)[K][V],
                                             const float (&m2_k)[K][V]) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (c0 + k < C) step(c0 + k, mean_k[k], m2_k[k]);
    }
  }

  // sigma of the winning class, inv_denom = 1 / (count + S - correction).
  __device__ __forceinline__ void sigma(float inv_denom,
                                        float (&out)[V]) const {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = uce::welford_std(m2[v], inv_denom);
  }
};

// Loads the class rows c0 .. c0 + K - 1 of a sample into x through
// load(c, row); rows at or past C are set to 0 and never read.
template <int K, int V, typename LoadRow>
__device__ __forceinline__ void load_rows(int c0, int C, const LoadRow& load,
                                          float (&x)[K][V]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (c0 + k < C) {
      load(c0 + k, x[k]);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) x[k][v] = 0.0f;
    }
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

// The Welford mean / M2 of classes c0 .. c0 + K - 1 of the thread's V pixels
// from the state when kReadsState and has_state, else 0 (the first Welford
// step from 0, inv_k = 1, then gives exactly mean = p, M2 = 0 for finite p).
template <int K, int V, bool kVec, bool kReadsState>
__device__ __forceinline__ void load_state(const McArgs& a,
                                           const Pixels<V>& px, int c0,
                                           bool has_state, float (&mean)[K][V],
                                           float (&m2)[K][V]) {
  const int C = static_cast<int>(a.C);
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      mean[k][v] = 0.0f;
      m2[k][v] = 0.0f;
    }
  }
  if constexpr (kReadsState) {
    const int64_t ns = opaque(a.out_h * a.out_w);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (c0 + k < C && has_state) {
        const int64_t off = static_cast<int64_t>(c0 + k) * ns;
        load_state_row<V, kVec>(a.mean, px, off, mean[k]);
        load_state_row<V, kVec>(a.m2, px, off, m2[k]);
      }
    }
  }
}

// The running mean entropy of the thread's V pixels from the state, or 0.
template <int V>
__device__ __forceinline__ void load_entropy(const McArgs& a,
                                             const Pixels<V>& px,
                                             bool has_state, float (&ent)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    ent[v] = has_state && px.valid[v] ? a.entropy[px.q[v]] : 0.0f;
  }
}

// H of one sample from s = sum_c e_c and sum_ed = sum_c e_c (x_c - max), as
// uce::softmax_entropy but with logf (fast_logf rounds otherwise).
__device__ __forceinline__ float sample_entropy(float s, float sum_ed) {
  return logf(s) - sum_ed * (1.0f / s);
}

// Folds one sample, all of whose C <= CM class rows are in registers, into
// the per-class Welford mean / M2 (1 / k = inv_k for the k-th sample):
// x becomes exp(x - max) and p = x / sum is folded. Also returns the sum and,
// with kEntropy, the entropy sum sum_c e_c (x_c - max) (see
// uce::entropy_term). x - max <= 0; NaN when every class is -inf (or any is
// NaN or +inf), which propagates to the pixel as in the reference.
template <int CM, int V, bool kEntropy>
__device__ __forceinline__ void fold_sample(int C, float (&x)[CM][V],
                                            float inv_k, float (&mean)[CM][V],
                                            float (&m2)[CM][V],
                                            float (&sum)[V], float (&te)[V]) {
  float mx[V];
#pragma unroll
  for (int v = 0; v < V; ++v) mx[v] = x[0][v];
#pragma unroll
  for (int c = 1; c < CM; ++c) {
    if (c < C) {
#pragma unroll
      for (int v = 0; v < V; ++v) mx[v] = x[c][v] > mx[v] ? x[c][v] : mx[v];
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    sum[v] = 0.0f;
    te[v] = 0.0f;
  }
#pragma unroll
  for (int c = 0; c < CM; ++c) {
    if (c < C) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        // A class at -inf below a finite max has e = 0 and adds 0 (not
        // 0 * -inf) to the entropy sum.
        const float d = x[c][v] - mx[v];
        const float e = exp_f(d);
        x[c][v] = e;
        sum[v] += e;
        if constexpr (kEntropy) te[v] += uce::entropy_term(e, d);
      }
    }
  }
  float inv[V];
#pragma unroll
  for (int v = 0; v < V; ++v) inv[v] = 1.0f / sum[v];
#pragma unroll
  for (int c = 0; c < CM; ++c) {
    if (c < C) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        uce::welford_update(x[c][v] * inv[v], inv_k, mean[c][v], m2[c][v]);
      }
    }
  }
}

// Pass 1 of the class-chunked kernel for one sample: the softmax normalisers
// (max m, sum l of exp(x - m)) of the thread's V pixels from one read of the
// C class rows through load(c, row), with an online max and one exp per
// element: a new maximum rescales the sum by exp(m - r), otherwise
// exp(r - m) is added. r == m gives exactly 1 without subtracting, which
// also covers -inf == -inf (no -inf - -inf NaN from leading -inf classes).
template <int V, typename LoadRow>
__device__ __forceinline__ void online_normalisers(int C, const LoadRow& load,
                                                   float (&m)[V],
                                                   float (&l)[V]) {
  const float kInf = __int_as_float(0x7f800000);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    m[v] = -kInf;
    l[v] = 0.0f;
  }
#pragma unroll 4
  for (int c = 0; c < C; ++c) {
    float r[V];
    load(c, r);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const bool up = r[v] > m[v];
      const float d = up ? m[v] - r[v] : r[v] - m[v];
      const float e = r[v] == m[v] ? 1.0f : exp_f(d);
      l[v] = up ? fmaf(l[v], e, 1.0f) : l[v] + e;
      m[v] = up ? r[v] : m[v];
    }
  }
}

// Element offset of pixel v of this thread in row `row` of the class-chunked
// kernel's per-block statistics (rows of P = blockDim.x * V floats):
// thread-private slots v * threads + tid, conflict-free and needing no
// barrier.
__device__ __forceinline__ int64_t stat_slot(int64_t row, int v) {
  return row + v * static_cast<int64_t>(blockDim.x) + threadIdx.x;
}

// Sizes of a launch: classes, samples, output pixels N per batch row and
// B * N in all, the (B, C, N) batch stride, the samples' class stride
// (plane: N when read as is, in_h * in_w when resampled) and sample stride,
// and whether the state is read.
struct McSizes {
  int C, S;
  int64_t N, CN, total, plane, s_stride;
  bool has_state;  // the state is read: the Out reads one and count > 0
};

template <bool kInterp>
__device__ __forceinline__ McSizes mc_sizes(const McArgs& a,
                                            bool reads_state) {
  McSizes z;
  z.C = static_cast<int>(a.C);
  z.S = static_cast<int>(a.S);
  z.N = a.out_h * a.out_w;
  z.CN = a.C * z.N;
  z.total = a.B * z.N;
  z.plane = kInterp ? a.in_h * a.in_w : z.N;
  z.s_stride = a.B * a.C * z.plane;
  z.has_state = reads_state && a.count > 0;
  return z;
}

// ---------------------------------------------------------------------------
// What the kernels do with a tile's statistics: the `Out` parameter.
//
//  kReadsState  the state is read when count > 0 (else the folds start at 0)
//  kEntropy     the mean of the per-sample entropies is kept
//  kResampled   resampled reads are instantiated
//  block()      called once by every thread at the start (it may
//               synchronise); its value reaches tile()
//  vectorises<V>(N)  host: the Out's own tensors allow vector mode
//  chunk<K, V, kVec>(a, px, c0, mean, m2, t)  classes c0 .. c0 + K - 1 are
//               done (the register tile is one chunk of CM classes)
//  tile<V, kVec>(a, px, block, t, ent)  all classes of the tile are done

// A tile's results besides the state: the running argmax (with its M2) and
// H(mean) = sum_c entr(mean_c).
template <int V>
struct McTile {
  ArgMax<V> best;
  float hmean[V] = {};
};

// -p log p as torch.special.entr: 0 at 0, -inf below 0, NaN stays NaN. Not
// uce::entr, which takes the log from fast_logf (other roundings than logf)
// and gives NaN below 0.
__device__ __forceinline__ float entr(float p) {
  const float kInf = __int_as_float(0x7f800000);
  if (p > 0.0f) return -p * logf(p);
  return p == 0.0f ? 0.0f : (p < 0.0f ? -kInf : p);
}

// What mc_accumulate and mc_reduce have in common: the state and the
// entropy, resampled reads, no per-block setup, and no tensors besides
// McArgs'.
struct StateOut {
  static constexpr bool kReadsState = true;
  static constexpr bool kEntropy = true;
  static constexpr bool kResampled = true;

  __device__ __forceinline__ float block() const { return 0.0f; }
  template <int V>
  bool vectorises(int64_t) const {
    return true;
  }
};

// mc_accumulate: the folded state written back in place.
struct Accumulate : StateOut {
  template <int K, int V, bool kVec>
  __device__ __forceinline__ void chunk(const McArgs& a, const Pixels<V>& px,
                                        int c0, const float (&mean)[K][V],
                                        const float (&m2)[K][V],
                                        McTile<V>&) const {
    const int C = static_cast<int>(a.C);
    const int64_t ns = opaque(a.out_h * a.out_w);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (c0 + k < C) {
        const int64_t off = static_cast<int64_t>(c0 + k) * ns;
        store_row<DType::kFloat32, V, kVec>(a.mean, px, off, mean[k]);
        store_row<DType::kFloat32, V, kVec>(a.m2, px, off, m2[k]);
      }
    }
  }

  template <int V, bool kVec>
  __device__ __forceinline__ void tile(const McArgs& a, const Pixels<V>& px,
                                       float, const McTile<V>&,
                                       const float (&ent)[V]) const {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (px.valid[v]) a.entropy[px.q[v]] = ent[v];
    }
  }
};

// mc_reduce: nothing of the state is written; sigma, pred and the wanted
// outputs are. MI = H(mean) - mean entropy, clamped at 0 so that NaN stays.
struct Reduce : StateOut {
  template <int K, int V, bool kVec>
  __device__ __forceinline__ void chunk(const McArgs& a, const Pixels<V>& px,
                                        int c0, const float (&mean)[K][V],
                                        const float (&m2)[K][V],
                                        McTile<V>& t) const {
    const int C = static_cast<int>(a.C);
    t.best.template step_chunk<K>(c0, C, mean, m2);
    const int64_t ns = opaque(a.out_h * a.out_w);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (c0 + k < C) {
        if (a.entropy_out != nullptr) {
#pragma unroll
          for (int v = 0; v < V; ++v) t.hmean[v] += entr(mean[k][v]);
        }
        if (a.probs_out != nullptr) {
          store_row<DType::kFloat32, V, kVec>(
              a.probs_out, px, static_cast<int64_t>(c0 + k) * ns, mean[k]);
        }
      }
    }
  }

  template <int V, bool kVec>
  __device__ __forceinline__ void tile(const McArgs& a, const Pixels<V>& px,
                                       float, const McTile<V>& t,
                                       const float (&ent)[V]) const {
    float sigma[V];
    t.best.sigma(a.inv_denom, sigma);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (!px.valid[v]) continue;
      const int64_t q = px.q[v];
      a.sigma_out[q] = sigma[v];
      a.pred_out[q] = t.best.cls[v];
      if (a.entropy_out != nullptr) {
        a.entropy_out[q] = t.hmean[v];
        a.mutual_info_out[q] = uce::mutual_info(t.hmean[v], ent[v]);
      }
    }
  }
};

// The fused forward: the folds from an empty state (McArgs of fused_mc_args,
// count = 0), no entropy, then the CE of the logits weighted by
// (1 + sigma)^alpha for the same pixels (ce_pixels; an OoD pixel's sigma is
// computed like any other's and not used, its weight being ood_scale: its
// sample rows are part of the warp's coalesced row accesses anyway). Per pixel
// the kernel reads the beta sample rows (once on the register path, twice on
// the class-chunked one), the logits and the label, and writes loss, norm and
// pixel weight (16 bytes): the same traffic as a kernel that computed sigma
// itself, since sigma stays in registers (a sigma written by mc_reduce and read
// by the CE kernel would add 8 bytes per pixel and a second launch).
template <DType IT>
struct FusedCe {
  ForwardArgs f;

  static constexpr bool kReadsState = false;
  static constexpr bool kEntropy = false;
  static constexpr bool kResampled = false;

  // The class-weight sum S of ce_pixels (synchronises the block).
  __device__ __forceinline__ float block() const {
    __shared__ float s_wsum;
    return class_weight_sum(f.weight, f.C, &s_wsum);
  }
  template <int V>
  bool vectorises(int64_t N) const {
    return can_vectorise<IT, V>(f.input, N);
  }

  template <int K, int V, bool kVec>
  __device__ __forceinline__ void chunk(const McArgs& a, const Pixels<V>&,
                                        int c0, const float (&mean)[K][V],
                                        const float (&m2)[K][V],
                                        McTile<V>& t) const {
    t.best.template step_chunk<K>(c0, static_cast<int>(a.C), mean, m2);
  }

  template <int V, bool kVec>
  __device__ __forceinline__ void tile(const McArgs& a, const Pixels<V>& px,
                                       float wsum, const McTile<V>& t,
                                       const float (&)[V]) const {
    float sigma[V];
    t.best.sigma(a.inv_denom, sigma);
    ce_pixels<IT, V, kVec>(f, px, wsum, sigma);
  }
};

// ---------------------------------------------------------------------------
// Register tiles (C <= CM <= 64).
//
// The per-class Welford mean / M2 of the thread's V pixels live in registers
// for the whole call: read from the state once (count > 0), then every sample
// of the call is folded in (its C class values loaded into registers, C
// independent loads in flight), then handed to Out once: written back
// (mc_accumulate), reduced to the outputs (mc_reduce: nothing of the state is
// written, and with count == 0 the stack is read exactly once and only the
// outputs are written), or reduced to sigma and the CE (the fused forward:
// the stack read exactly once). The class loops are unrolled to CM with a
// runtime c < C guard, so the arrays are register-allocated; CM is a bucket
// (4, 8, 16, 32, 64) and V shrinks as CM grows (8, 4, 2, 1, 1) to keep
// 3 * CM * V at 96 registers (CM = 64 needs 192, about 220-255 in all: fewer
// resident warps, but 64 loads in flight per thread). Nothing grows with the
// number of samples. Resampled reads keep V at 1 (2 for CM = 4): 4 loads per
// class already give 4 * C loads in flight, and each pixel adds 12 registers
// of taps.

template <DType ST, int CM, int V, bool kVec, bool kInterp, typename Out>
__global__ void __launch_bounds__(kRegThreads)
    mc_register_kernel(const McArgs a, float scale_h, float scale_w,
                       int64_t tiles, const Out out) {
  const float blk = out.block();
  const ElemT<ST>* __restrict__ samples =
      static_cast<const ElemT<ST>*>(a.samples);
  const McSizes z = mc_sizes<kInterp>(a, Out::kReadsState);
  constexpr bool kOpaque = Out::kReadsState || kInterp;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    Pixels<V> px;
    tile_pixels<V, kVec>(px, tile, z.total, z.N, z.CN);
    Taps<V, kInterp> tp;
    if constexpr (kInterp) make_taps<V>(tp, px, a, z.N, scale_h, scale_w);

    float mean[CM][V], m2[CM][V], ent[V];
    load_state<CM, V, kVec, Out::kReadsState>(a, px, 0, z.has_state, mean,
                                               m2);
    load_entropy<V>(a, px, Out::kEntropy && z.has_state, ent);

    for (int s = 0; s < z.S; ++s) {
      const ElemT<ST>* __restrict__ xs = samples + s * z.s_stride;
      const int64_t cs = sample_stride<kOpaque>(z.plane);
      float x[CM][V], sum[V], te[V];
      load_rows<CM, V>(0, z.C, [&](int c, float (&row)[V]) {
        sample_row<ST, V, kVec, kInterp>(xs, px, tp,
                                         static_cast<int64_t>(c) * cs, row);
      }, x);
      const float inv_k = 1.0f / static_cast<float>(a.count + s + 1);
      fold_sample<CM, V, Out::kEntropy>(z.C, x, inv_k, mean, m2, sum, te);
      if constexpr (Out::kEntropy) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          uce::mean_update(sample_entropy(sum[v], te[v]), inv_k, ent[v]);
        }
      }
    }

    McTile<V> t;
    out.template chunk<CM, V, kVec>(a, px, 0, mean, m2, t);
    out.template tile<V, kVec>(a, px, blk, t, ent);
  }
}

// ---------------------------------------------------------------------------
// Class chunks (C > 64): exact for any C.
//
// Pass 1, per sample of the call: one read of the C class values with an
// online max and sum of exp, giving the sample's softmax normalisers. Per
// sample and pixel R floats are kept: max, sum and, with the entropy, the
// entropy sum sum_c e_c (x_c - max), which pass 2 accumulates chunk by chunk
// (R = kStatRows: 3, or 2 for the fused forward). They live in dynamic
// shared memory (R * S * P floats, thread-private slots v * threads + tid,
// conflict-free and needing no barrier), or, when that exceeds the 48 KiB
// default (S > 15 read as is with the entropy, S > 23 without, S > 31
// resampled), in a global scratch slice per block.
// Pass 2, per chunk of K classes: the chunk's Welford mean / M2 read from the
// state once (count > 0), every sample folded in from registers, then handed
// to Out (written back; or the running argmax over the chunks in class
// order, H(mean) summed, mean_probs written). The samples are read twice,
// the state once, whatever S (the per-block working set of a sample row,
// P * C elements, is too large at these C to stay cached between the
// passes); the per-pixel working set is independent of C and S. With S = 0
// (mc_reduce of a state) pass 1 is empty.
//
// K = 8 classes, V = 4 pixels (2 resampled): 2 * K * V = 64 (32) Welford
// registers plus K * V = 32 loads in flight per sample (64 resampled); 64
// threads keep the statistics at R KiB per sample and block.

template <DType ST, int V, bool kVec, bool kInterp, typename Out>
__global__ void __launch_bounds__(kChunkThreads)
    mc_chunked_kernel(const McArgs a, float scale_h, float scale_w,
                      int64_t tiles, float* __restrict__ gstat,
                      const Out out) {
  constexpr int K = kChunkClasses;
  constexpr int R = kStatRows<Out::kEntropy>;
  UCE_DYNAMIC_SHARED(float, s_mcstat);
  const float blk = out.block();
  const ElemT<ST>* __restrict__ samples =
      static_cast<const ElemT<ST>*>(a.samples);
  const McSizes z = mc_sizes<kInterp>(a, Out::kReadsState);
  constexpr bool kOpaque = Out::kReadsState || kInterp;
  const int64_t P = static_cast<int64_t>(blockDim.x) * V;
  // Rows of P floats: R * s (max), R * s + 1 (sum), R * s + 2 (entropy sum).
  float* __restrict__ stat =
      gstat != nullptr ? gstat + static_cast<int64_t>(blockIdx.x) * R * z.S * P
                       : s_mcstat;
  const float kInf = __int_as_float(0x7f800000);
  const float kNaN = __int_as_float(0x7fc00000);

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    Pixels<V> px;
    tile_pixels<V, kVec>(px, tile, z.total, z.N, z.CN);
    Taps<V, kInterp> tp;
    if constexpr (kInterp) make_taps<V>(tp, px, a, z.N, scale_h, scale_w);

    // Pass 1: normalisers of every sample.
    for (int s = 0; s < z.S; ++s) {
      const ElemT<ST>* __restrict__ xs = samples + s * z.s_stride;
      float m[V], l[V];
      online_normalisers<V>(z.C, [&](int c, float (&row)[V]) {
        sample_row<ST, V, kVec, kInterp>(
            xs, px, tp, static_cast<int64_t>(c) * z.plane, row);
      }, m, l);
      const int64_t row = R * static_cast<int64_t>(s) * P;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t slot = stat_slot(row, v);
        stat[slot] = m[v];
        // A +inf max makes every probability NaN (exp(inf - inf) in the
        // reference's sum); NaN and all -inf reach NaN through l and pass 2.
        stat[slot + P] = m[v] == kInf ? kNaN : l[v];
        if constexpr (Out::kEntropy) stat[slot + 2 * P] = 0.0f;
      }
    }

    // Pass 2: Welford over the samples, K classes at a time.
    McTile<V> t;
    for (int c0 = 0; c0 < z.C; c0 += K) {
      float mean[K][V], m2[K][V];
      load_state<K, V, kVec, Out::kReadsState>(a, px, c0, z.has_state, mean,
                                               m2);
      for (int s = 0; s < z.S; ++s) {
        const ElemT<ST>* __restrict__ xs = samples + s * z.s_stride;
        const int64_t cs = sample_stride<kOpaque>(z.plane);
        float x[K][V];
        load_rows<K, V>(c0, z.C, [&](int c, float (&row)[V]) {
          sample_row<ST, V, kVec, kInterp>(xs, px, tp,
                                           static_cast<int64_t>(c) * cs, row);
        }, x);
        float ms[V], inv[V], te[V];
        const int64_t row = R * static_cast<int64_t>(s) * P;
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
          if (c0 + k < z.C) {
#pragma unroll
            for (int v = 0; v < V; ++v) {
              const float d = x[k][v] - ms[v];
              const float e = exp_f(d);
              if constexpr (Out::kEntropy) te[v] += uce::entropy_term(e, d);
              uce::welford_update(e * inv[v], inv_k, mean[k][v], m2[k][v]);
            }
          }
        }
        if constexpr (Out::kEntropy) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            stat[stat_slot(row + 2 * P, v)] += te[v];
          }
        }
      }
      out.template chunk<K, V, kVec>(a, px, c0, mean, m2, t);
    }

    // The per-sample entropies, folded in sample order.
    float ent[V];
    load_entropy<V>(a, px, Out::kEntropy && z.has_state, ent);
    if constexpr (Out::kEntropy) {
      for (int s = 0; s < z.S; ++s) {
        const int64_t row = R * static_cast<int64_t>(s) * P;
        const float inv_k = 1.0f / static_cast<float>(a.count + s + 1);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int64_t slot = stat_slot(row + P, v);
          uce::mean_update(sample_entropy(stat[slot], stat[slot + P]), inv_k,
                           ent[v]);
        }
      }
    }
    out.template tile<V, kVec>(a, px, blk, t, ent);
  }
}

// ---------------------------------------------------------------------------
// Launchers.

// The register buckets: classes up to CM kept in registers, V pixels per
// thread. f(Bucket<CM, V>{}) is called for the smallest bucket holding
// C <= kRegisterMaxClasses.
template <int kCM, int kV>
struct Bucket {
  static constexpr int CM = kCM;
  static constexpr int V = kV;
};

template <typename F>
cudaError_t with_register_bucket(int64_t C, const F& f) {
  if (C <= 4) return f(Bucket<4, 8>{});
  if (C <= 8) return f(Bucket<8, 4>{});
  if (C <= 16) return f(Bucket<16, 2>{});
  if (C <= 32) return f(Bucket<32, 1>{});
  static_assert(kRegisterMaxClasses == 64, "register buckets end at 64");
  return f(Bucket<64, 1>{});
}

// Whether the samples (read as they are), the state and probability rows of
// N pixels and Out's own tensors allow vector mode with V pixels per thread.
template <DType ST, int V, typename Out>
bool mc_can_vectorise(const McArgs& a, const Out& out, int64_t N) {
  return can_vectorise<ST, V>(a.samples, N) &&
         can_vectorise<DType::kFloat32, V>(a.mean, N) &&
         can_vectorise<DType::kFloat32, V>(a.m2, N) &&
         can_vectorise<DType::kFloat32, V>(a.probs_out, N) &&
         out.template vectorises<V>(N);
}

template <DType ST, int CM, int V, typename Out>
cudaError_t launch_mc_bucket(const McArgs& a, const Out& out, float scale_h,
                             float scale_w, cudaStream_t stream) {
  const int64_t N = a.out_h * a.out_w;
  const int64_t total = a.B * N;
  if constexpr (Out::kResampled) {
    if (mc_interp(a)) {
      constexpr int VI = CM <= 4 ? 2 : 1;
      const int64_t tiles =
          ceil_div(total, static_cast<int64_t>(kRegThreads) * VI);
      const dim3 grid(static_cast<unsigned int>(grid_for(tiles)));
      UCE_LAUNCH(grid, kRegThreads, 0, stream,
                 mc_register_kernel<ST, CM, VI, false, true, Out>)(
          a, scale_h, scale_w, tiles, out);
      return cudaGetLastError();
    }
  }
  const int64_t tiles = ceil_div(total, static_cast<int64_t>(kRegThreads) * V);
  const dim3 grid(static_cast<unsigned int>(grid_for(tiles)));
  if constexpr (V > 1) {
    if (mc_can_vectorise<ST, V>(a, out, N)) {
      UCE_LAUNCH(grid, kRegThreads, 0, stream,
                 mc_register_kernel<ST, CM, V, true, false, Out>)(
          a, scale_h, scale_w, tiles, out);
      return cudaGetLastError();
    }
  }
  UCE_LAUNCH(grid, kRegThreads, 0, stream,
             mc_register_kernel<ST, CM, V, false, false, Out>)(
      a, scale_h, scale_w, tiles, out);
  return cudaGetLastError();
}

template <DType ST, typename Out>
cudaError_t launch_mc_chunked(const McArgs& a, const Out& out, float scale_h,
                              float scale_w, float* scratch,
                              cudaStream_t stream) {
  const ChunkPlan plan = mc_chunk_plan(a, Out::kEntropy);
  float* gstat = nullptr;
  if (plan.scratch_floats > 0) {
    if (scratch == nullptr) return cudaErrorInvalidValue;
    gstat = scratch;
  }
  const dim3 grid(static_cast<unsigned int>(plan.grid));
  if constexpr (Out::kResampled) {
    if (mc_interp(a)) {
      UCE_LAUNCH(grid, kChunkThreads, plan.smem_bytes, stream,
                 mc_chunked_kernel<ST, kChunkPixelsInterp, false, true, Out>)(
          a, scale_h, scale_w, plan.tiles, gstat, out);
      return cudaGetLastError();
    }
  }
  constexpr int V = kChunkPixels;
  if (mc_can_vectorise<ST, V>(a, out, a.out_h * a.out_w)) {
    UCE_LAUNCH(grid, kChunkThreads, plan.smem_bytes, stream,
               mc_chunked_kernel<ST, V, true, false, Out>)(
        a, scale_h, scale_w, plan.tiles, gstat, out);
  } else {
    UCE_LAUNCH(grid, kChunkThreads, plan.smem_bytes, stream,
               mc_chunked_kernel<ST, V, false, false, Out>)(
        a, scale_h, scale_w, plan.tiles, gstat, out);
  }
  return cudaGetLastError();
}

template <DType ST, typename Out>
cudaError_t launch_mc(const McArgs& a, const Out& out, float* scratch,
                      cudaStream_t stream) {
  const float scale_h = uce::bilinear_scale(a.in_h, a.out_h, a.align_corners);
  const float scale_w = uce::bilinear_scale(a.in_w, a.out_w, a.align_corners);
  if (a.C > kRegisterMaxClasses) {
    return launch_mc_chunked<ST>(a, out, scale_h, scale_w, scratch, stream);
  }
  return with_register_bucket(a.C, [&](auto b) {
    using B = decltype(b);
    return launch_mc_bucket<ST, B::CM, B::V>(a, out, scale_h, scale_w,
                                             stream);
  });
}

template <DType ST, bool kReduce>
cudaError_t launch_mc_state(const McArgs& a, float* scratch,
                            cudaStream_t stream) {
  if constexpr (kReduce) {
    return launch_mc<ST>(a, Reduce{}, scratch, stream);
  } else {
    return launch_mc<ST>(a, Accumulate{}, scratch, stream);
  }
}

template <DType IT, DType ST>
cudaError_t launch_fused(const ForwardArgs& f, float* scratch,
                         cudaStream_t stream) {
  return launch_mc<ST>(fused_mc_args(f), FusedCe<IT>{f}, scratch, stream);
}

}  // namespace detail
}  // namespace uce_cuda
