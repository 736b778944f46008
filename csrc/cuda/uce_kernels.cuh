// CUDA kernels for the uce_fast operators (no torch headers).
//
// Layout: input (B, C, N), samples (beta, B, C, N), contiguous, so the C
// values of one pixel are N elements apart while consecutive pixels of a
// class row are adjacent. Threads therefore own pixels and loop over classes:
// a warp reads 32 (or 32 * V) consecutive pixels of one class row per load,
// fully coalesced, without permuting the tensors.
//
// Pixels are flattened over (b, n) (q = b * N + n), so small N with a large
// batch (N = 1 when there are no spatial dims) still fills the grid. A block
// covers a tile of P = threads * V pixels; each thread owns V of them:
//  * vector mode (N % V == 0 and every streamed pointer aligned to the access
//    width): the thread's V pixels are adjacent, so a class row of them is
//    one 16-byte load (4 fp32 or 8 fp16/bf16; 8 or 4 bytes when V is smaller)
//    and never crosses a batch row, since N % V == 0;
//  * scalar mode (anything else, e.g. odd N or a storage offset of one
//    element): pixel v of a thread is tile * P + v * threads + tid, so each
//    load instruction of a warp is still 32 adjacent elements.
// All element offsets are int64 (stacks beyond 2^31 elements are routine).
//
// Every kernel computes in fp32 and reuses the shared per-pixel math of
// common/uce_math.h (Welford step, std, pixel weight, label codes, the
// per-pixel CE coefficients, label-smoothed loss and gradient), so the CPU and
// CUDA backends implement one formula.
//
// This file: the tiling, element access, the weighted CE of a tile
// (ce_pixels), the CE-only forward and the backward. The Monte-Carlo
// statistics, and with them the fused forward (whose epilogue is ce_pixels),
// are in mc_kernels.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "common/uce_math.h"
#include "cuda/device_compat.h"
#include "cuda/uce_launchers.h"

namespace uce_cuda {
namespace detail {

// ---------------------------------------------------------------------------
// Launch geometry.

// CE-only forward and backward: little per-pixel state, 256 threads each
// owning 16 bytes of pixels per class row.
constexpr int kCeThreads = 256;
constexpr int kBwdThreads = 256;

constexpr int64_t kMaxGrid = 0x7fffffff;  // gridDim.x limit; grid-stride beyond

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t grid_for(int64_t tiles) {
  return tiles < kMaxGrid ? tiles : kMaxGrid;
}

// ---------------------------------------------------------------------------
// Element types. fp16/bf16 are handled as raw 16-bit words (so vector loads
// move plain integers) and widened with the conversion intrinsics.

template <DType D>
struct Elem;

template <>
struct Elem<DType::kFloat32> {
  using T = float;
  static __device__ __forceinline__ float load(T v) { return v; }
  static __device__ __forceinline__ T store(float f) { return f; }
};

template <>
struct Elem<DType::kFloat16> {
  using T = unsigned short;
  static __device__ __forceinline__ float load(T v) {
    return __half2float(__ushort_as_half(v));
  }
  // Round to nearest even, as c10::Half.
  static __device__ __forceinline__ T store(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
};

template <>
struct Elem<DType::kBFloat16> {
  using T = unsigned short;
  static __device__ __forceinline__ float load(T v) {
    return __uint_as_float(static_cast<unsigned int>(v) << 16);
  }
  // Round to nearest even, as c10::BFloat16.
  static __device__ __forceinline__ T store(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

template <DType D>
using ElemT = typename Elem<D>::T;

// Pixels per thread that make one class row of them a 16-byte access.
template <DType D>
constexpr int kVec16 = static_cast<int>(16 / sizeof(ElemT<D>));

// Register type of one vector access of kBytes.
template <int kBytes>
struct Chunk;
template <>
struct Chunk<2> {
  using T = unsigned short;
};
template <>
struct Chunk<4> {
  using T = unsigned int;
};
template <>
struct Chunk<8> {
  using T = uint2;
};
template <>
struct Chunk<16> {
  using T = uint4;
};

// Bytes per vector access for V pixels of D (16 at most; V * sizeof > 16
// takes several accesses).
template <DType D, int V>
constexpr int kChunkBytes = V * static_cast<int>(sizeof(ElemT<D>)) < 16
                                ? V * static_cast<int>(sizeof(ElemT<D>))
                                : 16;

// Whether a (.., N) tensor of D at p can be read in vector mode with V pixels
// per thread: every row start is then a multiple of V elements from p.
template <DType D, int V>
inline bool can_vectorise(const void* p, int64_t N) {
  return V > 1 && N % V == 0 &&
         reinterpret_cast<uintptr_t>(p) % kChunkBytes<D, V> == 0;
}

// ---------------------------------------------------------------------------
// Pixel tiles.

template <int V>
struct Pixels {
  int64_t q[V];     // flat pixel index b * N + n
  int64_t base[V];  // b * C * N + n: offset of class 0 in a (B, C, N) tensor
  bool valid[V];    // q < B * N (masked lanes of the tail tile)
};

template <int V, bool kVec>
__device__ __forceinline__ void tile_pixels(Pixels<V>& px, int64_t tile,
                                            int64_t total, int64_t N,
                                            int64_t CN) {
  const int64_t threads = blockDim.x;
  const int64_t tid = threadIdx.x;
  if constexpr (kVec) {
    // N % V == 0, so B * N % V == 0 and the V pixels are all valid or all
    // masked, and all in one batch row.
    const int64_t q0 = (tile * threads + tid) * V;
    const int64_t b = q0 / N;
    const int64_t base0 = b * CN + (q0 - b * N);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      px.q[v] = q0 + v;
      px.base[v] = base0 + v;
      px.valid[v] = q0 < total;
    }
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t q = tile * threads * V + v * threads + tid;
      const int64_t b = q / N;
      px.q[v] = q;
      px.base[v] = b * CN + (q - b * N);
      px.valid[v] = q < total;
    }
  }
}

// A load through the read-only data cache (__ldg), or a plain one for data
// that the same launch writes later (the Monte-Carlo state), which the
// non-coherent cache may not hold.
template <bool kLdg, typename T>
__device__ __forceinline__ T load_elem(const T* p) {
  if constexpr (kLdg) {
    return __ldg(p);
  } else {
    return *p;
  }
}

// Loads one class row (element offset `off` from each pixel's base) of the
// thread's V pixels, widened to fp32; masked pixels read nothing and get 0.
template <DType D, int V, bool kVec, bool kLdg = true>
__device__ __forceinline__ void load_row(const ElemT<D>* p, const Pixels<V>& px,
                                         int64_t off, float (&out)[V]) {
  using T = ElemT<D>;
  if constexpr (kVec) {
    constexpr int kBytes = kChunkBytes<D, V>;
    constexpr int kPer = kBytes / static_cast<int>(sizeof(T));
    using CT = typename Chunk<kBytes>::T;
    if (px.valid[0]) {
      const CT* src = reinterpret_cast<const CT*>(p + px.base[0] + off);
#pragma unroll
      for (int i = 0; i < V / kPer; ++i) {
        const CT raw = load_elem<kLdg>(src + i);
        T e[kPer];
        memcpy(e, &raw, kBytes);
#pragma unroll
        for (int j = 0; j < kPer; ++j) out[i * kPer + j] = Elem<D>::load(e[j]);
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) out[v] = 0.0f;
    }
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      out[v] = 0.0f;
      if (px.valid[v]) {
        out[v] = Elem<D>::load(load_elem<kLdg>(p + px.base[v] + off));
      }
    }
  }
}

// Stores one class row of the thread's V pixels (masked pixels untouched).
template <DType D, int V, bool kVec>
__device__ __forceinline__ void store_row(ElemT<D>* __restrict__ p,
                                          const Pixels<V>& px, int64_t off,
                                          const float (&val)[V]) {
  using T = ElemT<D>;
  if constexpr (kVec) {
    constexpr int kBytes = kChunkBytes<D, V>;
    constexpr int kPer = kBytes / static_cast<int>(sizeof(T));
    using CT = typename Chunk<kBytes>::T;
    if (px.valid[0]) {
      CT* dst = reinterpret_cast<CT*>(p + px.base[0] + off);
#pragma unroll
      for (int i = 0; i < V / kPer; ++i) {
        T e[kPer];
#pragma unroll
        for (int j = 0; j < kPer; ++j) e[j] = Elem<D>::store(val[i * kPer + j]);
        CT raw;
        memcpy(&raw, e, kBytes);
        dst[i] = raw;
      }
    }
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (px.valid[v]) p[px.base[v] + off] = Elem<D>::store(val[v]);
    }
  }
}

// ---------------------------------------------------------------------------
// Scalar helpers.

constexpr float kLog2e = 1.44269504088896341f;

// exp(x) = 2^(x log2 e): one multiply and the hardware ex2 (exp2f without
// --use_fast_math is the non-flushing ex2.approx.f32, within 2 ulp). The
// product's rounding adds |x| * 2^-24 relative error, which only matters
// where the result is far below the dominant terms (softmax arguments are
// x - max <= 0, backward's (x - max) - log-sum <= 0); exp(-inf) = 0, NaN
// stays NaN.
__device__ __forceinline__ float exp_f(float x) { return exp2f(x * kLog2e); }

// Sum of the class weights, in double as the CPU backend computes it, or C
// without weights (cw == nullptr). With weights every thread of the block
// must call it (it synchronises); warp 0 reduces into *slot.
__device__ __forceinline__ float class_weight_sum(const float* __restrict__ cw,
                                                  int64_t C, float* slot) {
  if (cw == nullptr) return static_cast<float>(C);
  if (threadIdx.x < 32) {
    double acc = 0.0;
    for (int64_t c = threadIdx.x; c < C; c += 32) {
      acc += static_cast<double>(__ldg(cw + c));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      acc += __shfl_down_sync(0xffffffffu, acc, o);
    }
    if (threadIdx.x == 0) *slot = static_cast<float>(acc);
  }
  __syncthreads();
  return *slot;
}

// The int32 code of pixel q's label (uce::label_code: the class,
// uce::kIgnoredPixel or uce::kOodPixel); kIgnoredPixel for masked pixels
// (nothing read). A bad label (outside [0, C), neither ignore_index nor
// ood_index) gives kIgnoredPixel, so nothing is gathered with it, and, when
// bad_pixel is given (the forward with label checks), is recorded there: the
// lowest pixel index wins, so the error the op raises after the launch names
// the first one in memory order, like the other backends. bad_pixel ==
// nullptr records nothing (no atomic, no read-back). Args: ForwardArgs or
// BackwardArgs (target, C, ignore_index and the OoD fields).
template <typename Args>
__device__ __forceinline__ int32_t load_label(const Args& a, int64_t q,
                                              bool valid,
                                              long long* bad_pixel) {
  if (!valid) return uce::kIgnoredPixel;
  const int64_t l = static_cast<int64_t>(
      __ldg(reinterpret_cast<const long long*>(a.target) + q));
  bool bad = false;
  const int32_t code = uce::label_code(l, a.C, a.ignore_index, a.ood_index,
                                       a.ood_on, &bad);
  if (bad && bad_pixel != nullptr) {
    atomicMin(bad_pixel, static_cast<long long>(q));
  }
  return code;
}

// ---------------------------------------------------------------------------
// Weighted, label-smoothed CE of the thread's V pixels, scaled by
// (1 + sigma)^alpha, or at an OoD pixel the CE against the uniform
// distribution scaled by ood_scale (uce::pixel_ce: three per-pixel selects of
// the weight and the smoothing factors, no extra byte read or written: the
// smoothing sum is formed for every pixel anyway); writes loss, norm and
// pixel weight (the one pixel_ce returns). Two passes over the class rows
// exactly as the CPU kernel: max, then sum_c exp(x_c - max) and
// sum_c cw[c] (max - x_c) from non-negative terms, with x_t and cw[t] picked
// by a select on the class index (no gather with the label). The second pass
// re-reads the rows the first one just read: from L1/L2 for small C (logits
// are 1 / (beta + 1) of the fused kernel's traffic anyway); at large C on
// the sigma-only path it costs a second read of the logits.

template <DType IT, int V, bool kVec>
__device__ __forceinline__ void ce_pixels(const ForwardArgs& a,
                                          const Pixels<V>& px, float S,
                                          const float (&sigma)[V]) {
  const ElemT<IT>* __restrict__ x = static_cast<const ElemT<IT>*>(a.input);
  const float* __restrict__ cw = a.weight;
  const int64_t N = a.N;
  const int C = static_cast<int>(a.C);

  float pw[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    pw[v] = a.alpha == 0.0f ? 1.0f : uce::pixel_weight(sigma[v], a.alpha);
  }

  float mx[V];
  load_row<IT, V, kVec>(x, px, 0, mx);
#pragma unroll 4
  for (int c = 1; c < C; ++c) {
    float r[V];
    load_row<IT, V, kVec>(x, px, static_cast<int64_t>(c) * N, r);
#pragma unroll
    for (int v = 0; v < V; ++v) mx[v] = r[v] > mx[v] ? r[v] : mx[v];
  }

  // The label codes only from here on: the max pass does not need them, so
  // they are not live across it (V registers fewer there: the fused kernel's
  // scalar-mode tiles of 8 pixels are at the register limit).
  int32_t lab[V];
  float sum[V], smooth[V], dt[V], cwt[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    lab[v] = load_label(a, px.q[v], px.valid[v], a.bad_pixel);
    sum[v] = 0.0f;
    smooth[v] = 0.0f;
    dt[v] = 0.0f;
    cwt[v] = 0.0f;
  }
#pragma unroll 4
  for (int c = 0; c < C; ++c) {
    float r[V];
    load_row<IT, V, kVec>(x, px, static_cast<int64_t>(c) * N, r);
    const float w = cw != nullptr ? __ldg(cw + c) : 1.0f;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      // d >= 0 (inf for a -inf logit; NaN when every logit is -inf, as in
      // the reference).
      const float d = mx[v] - r[v];
      sum[v] += exp_f(-d);
      smooth[v] += w * d;
      const bool hit = lab[v] == c;
      dt[v] = hit ? d : dt[v];
      cwt[v] = hit ? w : cwt[v];
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if (!px.valid[v]) continue;
    const float ls = logf(sum[v]);
    const int64_t q = px.q[v];
    a.norm_max[q] = mx[v];
    a.norm_log[q] = ls;
    // An OoD pixel hit no class above (dt = cwt = 0); its hard term is
    // dropped by pixel_loss's select on one_minus_eps == 0.
    const uce::PixelCe pc = uce::pixel_ce(lab[v], pw[v], a.one_minus_eps,
                                          a.eps_over_c, a.ood_scale, a.inv_c);
    a.loss[q] = uce::pixel_loss(lab[v] == uce::kIgnoredPixel, pc.pw, cwt[v],
                                ls + dt[v], S * ls + smooth[v],
                                pc.one_minus_eps, pc.eps_over_c);
    a.pixel_weight[q] = pc.pw;
  }
}

// The fused forward's end: the CE weighted by sigma, the std of the predicted
// class's probability (from the M2 the argmax carried).
// ---------------------------------------------------------------------------
// uce_forward with sigma given: the CE alone, V = 16 bytes of pixels.

template <DType IT, bool kVec>
__global__ void __launch_bounds__(kCeThreads)
    ce_kernel(const ForwardArgs a, int64_t tiles) {
  constexpr int V = kVec16<IT>;
  __shared__ float s_wsum;
  const float S = class_weight_sum(a.weight, a.C, &s_wsum);
  const int64_t total = a.B * a.N;
  const int64_t CN = a.C * a.N;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    Pixels<V> px;
    tile_pixels<V, kVec>(px, tile, total, a.N, CN);
    float sigma[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      sigma[v] = px.valid[v] ? __ldg(a.sigma_in + px.q[v]) : 0.0f;
    }
    ce_pixels<IT, V, kVec>(a, px, S, sigma);
  }
}

// ---------------------------------------------------------------------------
// Backward: grad_input[b, c, n] from the saved norm and pixel weight; every
// element read once and written once (16-byte loads and stores in vector
// mode). Ignored (and invalid-label) pixels get exactly 0 by a select, even
// when grad_loss is inf there; an OoD pixel gets the gradient of its uniform
// CE (uce::pixel_ce; the saved pixel weight is ood_scale there, so it moves
// the same bytes as any pixel). Labels are not checked here (no bad-pixel
// buffer, so no read-back after the launch): an invalid one can only come
// from a forward run without checks, which gave that pixel 0 loss.

template <DType IT, bool kVec>
__global__ void __launch_bounds__(kBwdThreads)
    backward_kernel(const BackwardArgs a, int64_t tiles) {
  constexpr int V = kVec16<IT>;
  __shared__ float s_wsum;
  const float* __restrict__ cw = a.weight;
  const float S = class_weight_sum(cw, a.C, &s_wsum);
  const ElemT<IT>* __restrict__ x = static_cast<const ElemT<IT>*>(a.input);
  ElemT<IT>* __restrict__ out = static_cast<ElemT<IT>*>(a.grad_input);
  const int C = static_cast<int>(a.C);
  const int64_t N = a.N;
  const int64_t total = a.B * a.N;
  const int64_t CN = a.C * a.N;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    Pixels<V> px;
    tile_pixels<V, kVec>(px, tile, total, N, CN);
    int32_t lab[V];
    float kh[V], ks[V], mx[V], ls[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      lab[v] = load_label(a, px.q[v], px.valid[v], nullptr);
      kh[v] = 0.0f;
      ks[v] = 0.0f;
      mx[v] = 0.0f;
      ls[v] = 0.0f;
      if (px.valid[v]) {
        const int64_t q = px.q[v];
        // Class 0's weight for an ignored or OoD pixel (never an index out of
        // range), unused there: an ignored pixel's gradient is selected away,
        // an OoD pixel's k_hard is 0.
        const float cw_t =
            cw != nullptr ? __ldg(cw + (lab[v] < 0 ? 0 : lab[v])) : 1.0f;
        const uce::PixelCe pc =
            uce::pixel_ce(lab[v], __ldg(a.pixel_weight + q), a.one_minus_eps,
                          a.eps_over_c, a.ood_scale, a.inv_c);
        const uce::GradCoef k = uce::grad_coef(
            __ldg(a.grad_loss + q) * pc.pw, cw_t, pc.one_minus_eps,
            pc.eps_over_c);
        kh[v] = k.k_hard;
        ks[v] = k.k_smooth;
        mx[v] = __ldg(a.norm_max + q);
        ls[v] = __ldg(a.norm_log + q);
      }
    }
#pragma unroll 4
    for (int c = 0; c < C; ++c) {
      const int64_t off = static_cast<int64_t>(c) * N;
      float r[V];
      load_row<IT, V, kVec>(x, px, off, r);
      const float w = cw != nullptr ? __ldg(cw + c) : 1.0f;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        // (x - max) - log-sum rather than x - lse: a float32 lse of large
        // logits (|x| ~ 1e4) is off by up to ulp(1e4) / 2 ~ 5e-4, which would
        // become the softmax's relative error; x - max is exact or rounded
        // relative to the spread of the logits, whatever their offset.
        const float p = exp_f((r[v] - mx[v]) - ls[v]);
        r[v] = uce::class_grad(lab[v] == uce::kIgnoredPixel, kh[v], ks[v], p,
                               lab[v] == c, w, S);
      }
      store_row<IT, V, kVec>(out, px, off, r);
    }
  }
}

// ---------------------------------------------------------------------------
// Launchers.

template <DType IT>
cudaError_t launch_ce(const ForwardArgs& a, cudaStream_t stream) {
  constexpr int V = kVec16<IT>;
  const int64_t tiles =
      ceil_div(a.B * a.N, static_cast<int64_t>(kCeThreads) * V);
  const dim3 grid(static_cast<unsigned int>(grid_for(tiles)));
  if (can_vectorise<IT, V>(a.input, a.N)) {
    UCE_LAUNCH(grid, kCeThreads, 0, stream, ce_kernel<IT, true>)(a, tiles);
  } else {
    UCE_LAUNCH(grid, kCeThreads, 0, stream, ce_kernel<IT, false>)(a, tiles);
  }
  return cudaGetLastError();
}

template <DType IT>
cudaError_t launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  constexpr int V = kVec16<IT>;
  const int64_t tiles =
      ceil_div(a.B * a.N, static_cast<int64_t>(kBwdThreads) * V);
  const dim3 grid(static_cast<unsigned int>(grid_for(tiles)));
  if (can_vectorise<IT, V>(a.input, a.N) &&
      can_vectorise<IT, V>(a.grad_input, a.N)) {
    UCE_LAUNCH(grid, kBwdThreads, 0, stream, backward_kernel<IT, true>)(a,
                                                                       tiles);
  } else {
    UCE_LAUNCH(grid, kBwdThreads, 0, stream, backward_kernel<IT, false>)(a,
                                                                        tiles);
  }
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace uce_cuda
