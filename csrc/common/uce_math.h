// Device-agnostic scalar math for the U-CE kernels.
//
// Everything here is a small inline function on plain floats/ints so the CPU
// kernels can call it inside `for (t = 0; t < T; ++t)` loops and still get
// vectorised code, and a CUDA kernel can call it per thread. No torch headers.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define UCE_HD __host__ __device__
#define UCE_INLINE __forceinline__
#elif defined(_MSC_VER)
#define UCE_HD
#define UCE_INLINE __forceinline
#else
#define UCE_HD
// Forced inlining matters: the CPU kernels are compiled once per instruction
// set (generic, AVX2+FMA, AVX-512 clones) and these helpers must be expanded
// inside each clone's loops for the loops to vectorise with that clone's
// instruction set.
#define UCE_INLINE inline __attribute__((always_inline))
#endif

namespace uce {

UCE_HD UCE_INLINE float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

UCE_HD UCE_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

// exp(x) for float, branch-free so that a loop of calls vectorises.
//
// Cephes-style: x = n*ln2 + r with n = round(x / ln2), |r| <= ln2/2, exp(r)
// from a degree-6 polynomial (the Cephes expf minimax coefficients), and 2^n
// assembled directly in the exponent field. ln2 is split in two constants so
// r is exact without needing FMA. Max error is about 1-2 ulp.
//
// n is obtained with the 1.5*2^23 "magic number" rounding trick instead of a
// float->int conversion: the rounded integer sits in the low mantissa bits,
// so no out-of-range conversion can happen even for NaN input.
//
// This variant only clamps the underflow side and is valid for x <= 88,
// which covers every softmax-style call (x - max <= 0). The input is clamped
// below at -88, so n >= -127 and the biased exponent n + 127 >= 0; n = -127
// (x below about -87.68, including -inf) gives a zero exponent field, i.e.
// exactly 0 without a separate select. With a single clamp the compiler
// folds it into one compare + and-mask after the polynomial, which keeps
// the vector loop short. NaN propagates.
UCE_HD UCE_INLINE float fast_expf_nonpos(float x) {
  const float kLo = -88.0f;
  const float kLog2e = 1.44269504088896341f;
  const float kMagic = 12582912.0f;  // 1.5 * 2^23
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;

  const float xc = x < kLo ? kLo : x;

  const float t = xc * kLog2e + kMagic;
  const float n = t - kMagic;  // round-to-nearest(x * log2(e))
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;

  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;

  // Integer n recovered from the low mantissa bits of t.
  const int32_t ni = (int32_t)(float_to_bits(t) - float_to_bits(kMagic));
  const float scale = bits_to_float((uint32_t)(ni + 127) << 23);
  return p * scale;
}

// exp(x) for any float x: additionally clamped above at 88 so that 2^n stays
// finite (n <= 127); the result saturates at e^88 (~1.7e38) instead of
// overflowing. Same accuracy as fast_expf_nonpos.
UCE_HD UCE_INLINE float fast_expf(float x) {
  const float kHi = 88.0f;
  return fast_expf_nonpos(x > kHi ? kHi : x);
}

// log(x) for float, branch-free so that a loop of calls vectorises.
//
// Cephes-style: x = m * 2^e with m in [sqrt(1/2), sqrt(2)) taken straight
// from the exponent/mantissa bits, log(1 + f) (f = m - 1) from a degree-9
// polynomial (the Cephes logf coefficients), e * ln2 added with ln2 split in
// two constants. Max error about 1 ulp. Subnormals are pre-scaled by 2^23;
// 0 -> -inf, +inf -> +inf, negative or NaN -> NaN, all by selects.
UCE_HD UCE_INLINE float fast_logf(float x) {
  const float kMinNormal = 1.17549435e-38f;
  const float kInf = bits_to_float(0x7F800000u);
  const float kNaN = bits_to_float(0x7FC00000u);
  const bool sub = x < kMinNormal;
  const float xs = sub ? x * 8388608.0f : x;  // 2^23
  const uint32_t bits = float_to_bits(xs);
  // frexp: xs = m * 2^e, m in [0.5, 1).
  int32_t e = (int32_t)((bits >> 23) & 0xFFu) - 126 - (sub ? 23 : 0);
  const float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);
  const bool lo = m < 0.707106781186547524f;
  e = lo ? e - 1 : e;
  const float f = lo ? (m + m) - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = (float)e;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = f + y;
  r = r + fe * 0.693359375f;
  r = x == kInf ? kInf : r;
  r = x == 0.0f ? -kInf : r;
  return x >= 0.0f ? r : kNaN;
}

// One Welford step for sample count m (m = s + 1), with inv_m = 1 / m.
// Welford instead of sum/sum-of-squares: when the samples agree and the
// probabilities are close to 1, E[p^2] - E[p]^2 cancels catastrophically in
// fp32, while the Welford M2 accumulates the small deviations directly.
UCE_HD UCE_INLINE void welford_update(float p, float inv_m, float& mean,
                                      float& m2) {
  const float d = p - mean;
  mean = mean + d * inv_m;
  m2 = m2 + d * (p - mean);
}

// sigma from Welford's M2 with a divisor of (beta - correction).
UCE_HD UCE_INLINE float welford_std(float m2, float inv_denom) {
  // M2 is a sum of d * (p - mean') terms of equal sign, so it is >= 0; the
  // clamp is only a guard and is written so that NaN still propagates.
  const float v = m2 * inv_denom;
  return sqrtf(v < 0.0f ? 0.0f : v);
}

// ---------------------------------------------------------------------------
// Streaming Monte-Carlo statistics.

// Entropy of softmax(x) without a log per class: with m = max_c x_c,
// d_c = x_c - m, e_c = exp(d_c), s = sum_c e_c and p_c = e_c / s,
//   H = -sum_c p_c log p_c = log(s) - sum_c p_c d_c.
// Both terms are >= 0, so nothing cancels. entropy_term(e_c, d_c) is one
// summand e_c * d_c of sum_ed = sum_c e_c d_c, 0 where e_c == 0 so that a
// -inf logit (d_c = -inf, p_c = 0) contributes 0 log 0 = 0 instead of
// 0 * -inf = NaN; a NaN logit still propagates (e_c is NaN then).
UCE_HD UCE_INLINE float entropy_term(float e, float d) {
  const float v = e * d;
  return e == 0.0f ? 0.0f : v;
}

// H from s = sum_c e_c, inv_s = 1 / s and sum_ed = sum_c entropy_term(e_c, d_c).
UCE_HD UCE_INLINE float softmax_entropy(float s, float inv_s, float sum_ed) {
  return fast_logf(s) - sum_ed * inv_s;
}

// -p log p with 0 log 0 = 0 (torch.special.entr for p >= 0); NaN propagates.
UCE_HD UCE_INLINE float entr(float p) {
  const float v = -p * fast_logf(p);
  return p == 0.0f ? 0.0f : v;
}

// Mutual information max(H(mean) - mean entropy, 0), written so that NaN
// propagates.
UCE_HD UCE_INLINE float mutual_info(float h_mean, float mean_h) {
  const float v = h_mean - mean_h;
  return v < 0.0f ? 0.0f : v;
}

// Running mean of count k with inv_k = 1 / k: mean += (x - mean) / k.
UCE_HD UCE_INLINE void mean_update(float x, float inv_k, float& mean) {
  mean = mean + (x - mean) * inv_k;
}

// Rounding of a float to the nearest float16 / bfloat16 value (ties to
// even), returned as float: what storing to that dtype and loading back
// gives, branch-free so that a loop of calls vectorises. Overflow gives inf,
// NaN stays NaN.
UCE_HD UCE_INLINE float round_to_half(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t a = u ^ sign;
  const float ax = bits_to_float(a);
  // Normal float16 range: 10 mantissa bits.
  const uint32_t rn = (a + 0x0FFFu + ((a >> 13) & 1u)) & 0xFFFFE000u;
  // Subnormal range (|x| < 2^-14): multiples of 2^-24, by adding 0.5 (whose
  // float ulp is 2^-24) and subtracting it again.
  const float sub = (ax + 0.5f) - 0.5f;
  uint32_t r = ax < 6.103515625e-05f ? float_to_bits(sub) : rn;
  r = a >= 0x477FF000u ? 0x7F800000u : r;      // |x| >= 65520 -> inf
  r = a > 0x7F800000u ? (a | 0x00400000u) : r;  // NaN
  return bits_to_float(r | sign);
}

UCE_HD UCE_INLINE float round_to_bf16(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  const uint32_t nan = (u | 0x00400000u) & 0xFFFF0000u;
  return bits_to_float((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : r);
}

// Bilinear interpolation exactly as F.interpolate(mode="bilinear")
// (ATen's UpSample.h index/weight formula, float32), with every product and
// sum rounded separately: no fused multiply-add anywhere, so the result does
// not depend on what the compiler contracts.
//
// mul_rn / add_rn are a product / sum that is never contracted: __fmul_rn /
// __fadd_rn on the device, a volatile temporary on the host (only used for
// the per-dimension tables, never in a vectorised loop).
UCE_HD UCE_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;
  return r;
#endif
}

UCE_HD UCE_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}

// IEEE division also on the device (__fdiv_rn holds under -use_fast_math).
UCE_HD UCE_INLINE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Source coordinate scale of one dim (sizes in_size -> out_size, both >= 1).
UCE_HD UCE_INLINE float bilinear_scale(int64_t in_size, int64_t out_size,
                                       bool align_corners) {
  if (align_corners) {
    return out_size > 1 ? div_rn((float)(in_size - 1), (float)(out_size - 1))
                        : 0.0f;
  }
  return div_rn((float)in_size, (float)out_size);
}

// Source taps of output coordinate o along one dim: x[o] = x[i0] * l0 +
// x[i1] * l1. When in_size == out_size: i0 = i1 = o, l0 = 1, l1 = 0.
struct BilinearTap {
  int64_t i0;
  int64_t i1;
  float l0;
  float l1;
};

UCE_HD UCE_INLINE BilinearTap bilinear_source(int64_t o, int64_t in_size,
                                              int64_t out_size, float scale,
                                              bool align_corners) {
  BilinearTap k;
  if (in_size == out_size) {
    k.i0 = o;
    k.i1 = o;
    k.l0 = 1.0f;
    k.l1 = 0.0f;
    return k;
  }
  float src;
  if (align_corners) {
    src = mul_rn(scale, (float)o);
  } else {
    src = add_rn(mul_rn(scale, add_rn((float)o, 0.5f)), -0.5f);
    src = src < 0.0f ? 0.0f : src;
  }
  const int64_t fl = (int64_t)floorf(src);
  k.i0 = fl < in_size - 1 ? fl : in_size - 1;
  const float l1 = add_rn(src, -(float)k.i0);
  k.l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
  k.i1 = k.i0 + (k.i0 < in_size - 1 ? 1 : 0);
  k.l0 = add_rn(1.0f, -k.l1);
  return k;
}

// The interpolated value from the four taps (x_yx: row tap y, column tap x):
//   ((x00 * l0x + x01 * l1x) * l0y + (x10 * l0x + x11 * l1x) * l1y).
// On the device every operation is rounded separately; on the host (GCC) the
// caller must be compiled without contraction (the CPU kernels call it from
// functions built with fp-contract=off), so that it still vectorises.
UCE_HD UCE_INLINE float bilinear_value(float x00, float x01, float x10,
                                       float x11, float l0x, float l1x,
                                       float l0y, float l1y) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  const float top = __fadd_rn(__fmul_rn(x00, l0x), __fmul_rn(x01, l1x));
  const float bot = __fadd_rn(__fmul_rn(x10, l0x), __fmul_rn(x11, l1x));
  return __fadd_rn(__fmul_rn(top, l0y), __fmul_rn(bot, l1y));
#elif defined(__clang__)
  // clang's -ffp-contract=fast disregards contraction pragmas.
  const float top = add_rn(mul_rn(x00, l0x), mul_rn(x01, l1x));
  const float bot = add_rn(mul_rn(x10, l0x), mul_rn(x11, l1x));
  return add_rn(mul_rn(top, l0y), mul_rn(bot, l1y));
#else
  const float top = x00 * l0x + x01 * l1x;
  const float bot = x10 * l0x + x11 * l1x;
  return top * l0y + bot * l1y;
#endif
}

// Per-pixel weight (1 + sigma)^alpha (a constant w.r.t. the logits).
UCE_HD UCE_INLINE float pixel_weight(float sigma, float alpha) {
  return powf(1.0f + sigma, alpha);
}

// ---------------------------------------------------------------------------
// Labels and the per-pixel CE coefficients.
//
// The kernels keep one int32 code per pixel instead of its int64 label: the
// class index in [0, C), kIgnoredPixel, or kOodPixel.
//  * kIgnoredPixel: the label is ignore_index, or outside [0, C) and not an
//    OoD label (a bad label: with check_labels the forward raises), or an OoD
//    label while ood_scale == 0 (entropy maximisation off: the pixel is then
//    exactly an ignored one).
//  * kOodPixel: the label is ood_index (which is outside [0, C); ood_index ==
//    ignore_index turns the feature off) and ood_scale > 0. Entropy
//    maximisation (Chan, Rottmann & Gottschalk, ICCV 2021): the pixel's loss is
//    the CE against the uniform distribution, (1/C) sum_c cw[c] (lse - x_c),
//    i.e. label smoothing with eps = 1 (no extra read: the smoothing sum is
//    formed anyway), weighted by ood_scale in place of the U-CE factor.
constexpr int32_t kIgnoredPixel = -1;
constexpr int32_t kOodPixel = -2;

// The code of label l; *bad is set for a bad label (outside [0, C), neither
// ignore_index nor ood_index). Branch-free selects, so that a loop vectorises.
UCE_HD UCE_INLINE int32_t label_code(int64_t l, int64_t C, int64_t ignore_index,
                                     int64_t ood_index, bool ood_on,
                                     bool* bad) {
  const bool out = (uint64_t)l >= (uint64_t)C;
  const bool ign = l == ignore_index;
  const bool ood = !ign & (l == ood_index);
  *bad = out & !ign & !ood;
  const int32_t other = (ood & ood_on) ? kOodPixel : kIgnoredPixel;
  return (ign | out) ? other : (int32_t)l;
}

// The CE coefficients of one pixel: its weight (the U-CE factor pw, or
// ood_scale at an OoD pixel), 1 - eps and eps / C (0 and 1 / C at an OoD
// pixel).
struct PixelCe {
  float pw;
  float one_minus_eps;
  float eps_over_c;
};

UCE_HD UCE_INLINE PixelCe pixel_ce(int32_t code, float pw, float one_minus_eps,
                                   float eps_over_c, float ood_scale,
                                   float inv_c) {
  const bool ood = code == kOodPixel;
  PixelCe k;
  k.pw = ood ? ood_scale : pw;
  k.one_minus_eps = ood ? 0.0f : one_minus_eps;
  k.eps_over_c = ood ? inv_c : eps_over_c;
  return k;
}

// Label-smoothed weighted CE of one pixel, times its pixel weight:
//   pw * ((1-eps) * cw[t] * (lse - x_t) + (eps/C) * sum_c cw[c] * (lse - x_c))
// lse_minus_xt = lse - x_t and sum_cw_lse_minus_x = sum_c cw[c]*(lse - x_c)
// are passed in precomputed (the callers form them from non-negative terms,
// log(sum) + (max - x), so no cancellation occurs).
// A term whose factor is exactly 0 (eps == 0 or eps == 1) is dropped by a
// select, so a -inf logit (infinite lse - x_c) does not turn it into NaN.
// Ignored pixels are selected to exactly 0.
UCE_HD UCE_INLINE float pixel_loss(bool ignored, float pw, float cw_t,
                                   float lse_minus_xt,
                                   float sum_cw_lse_minus_x,
                                   float one_minus_eps, float eps_over_c) {
  const float hard =
      one_minus_eps == 0.0f ? 0.0f : one_minus_eps * cw_t * lse_minus_xt;
  const float smooth =
      eps_over_c == 0.0f ? 0.0f : eps_over_c * sum_cw_lse_minus_x;
  const float l = pw * (hard + smooth);
  return ignored ? 0.0f : l;
}

// Per-pixel coefficients of the gradient
//   dL/dx_c = g * ((1-eps) cw[t] (p_c - [c==t]) + (eps/C) (S p_c - cw[c]))
//           = k_hard * (p_c - [c==t]) + k_smooth * (S p_c - cw[c])
// with g = grad_loss * pw, k_hard = g (1-eps) cw[t], k_smooth = g eps/C.
// A term whose factor is exactly 0 (eps == 0 or eps == 1) is dropped by a
// select rather than multiplied, so an infinite g does not turn it into NaN.
struct GradCoef {
  float k_hard;
  float k_smooth;
};

UCE_HD UCE_INLINE GradCoef grad_coef(float g, float cw_t, float one_minus_eps,
                                     float eps_over_c) {
  GradCoef k;
  k.k_hard = one_minus_eps == 0.0f ? 0.0f : g * one_minus_eps * cw_t;
  k.k_smooth = eps_over_c == 0.0f ? 0.0f : g * eps_over_c;
  return k;
}

// Gradient for class c of one pixel; p = exp(x_c - lse). Ignored pixels are
// selected to exactly 0 (never multiplied: g may be inf there).
UCE_HD UCE_INLINE float class_grad(bool ignored, float k_hard, float k_smooth,
                                   float p, bool is_target, float cw_c,
                                   float S) {
  const float v = k_hard * (p - (is_target ? 1.0f : 0.0f)) +
                  k_smooth * (S * p - cw_c);
  return ignored ? 0.0f : v;
}

}  // namespace uce
