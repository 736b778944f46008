// CPU kernels for the uce_fast operators.
//
// Layout: input (B, C, N), samples (beta, B, C, N), all contiguous, so the
// C values of one pixel are N elements apart. Rather than permuting, every
// kernel works on a tile of T consecutive pixels of one batch row and loops
// over classes: each class row of a tile is then a contiguous T-element
// load, and each per-pixel quantity (max, sum, mean, M2, ...) is a T-element
// float array, so every inner loop is a plain `for (t = 0; t < T; ++t)` over
// floats that the compiler vectorises.
//
// The per-tile routines are written once as always_inline templates and
// stamped out for three instruction sets, chosen at runtime from the CPU
// features: the default target, AVX2+FMA, and AVX-512 (512-bit vectors; the
// Monte-Carlo pass is bound by the FMA ports, and 16-wide vectors roughly
// halve it on cores with two 512-bit FMA units).
// UCE_FAST_CPU_ISA=generic|avx2|avx512 caps the choice (for testing the
// fallbacks).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/op_checks.h"
#include "cpu/cpu_common.h"
#include "cpu/mc_tile.h"

namespace uce_cpu {
namespace {

// ---------------------------------------------------------------------------
// Tile sizes of the CE and backward kernels (the Monte-Carlo pass uses
// mc_tile_size, cpu_common.h).

// CE-only pass (sigma given): keeps only T-element per-pixel arrays plus the
// C x T input slice re-read from L1, so it can use longer rows.
constexpr int64_t kCeTileBytes = 32 * 1024;
constexpr int64_t kMaxCeTile = 256;
// Backward: every element is read and written once, nothing is re-read; T
// only amortises the per-pixel coefficient set-up.
constexpr int64_t kBwdTile = 256;

int64_t ce_tile_size(int64_t C) {
  const int64_t t = (kCeTileBytes / (4 * C)) / 16 * 16;
  return std::max<int64_t>(16, std::min<int64_t>(t, kMaxCeTile));
}

struct CeConsts {
  const float* cw;  // class weights, nullptr = all ones
  float S;          // sum of class weights
  float one_minus_eps;
  float eps_over_c;
  int64_t ignore_index;
  // Entropy maximisation (uce::label_code): OoD pixels are those labelled
  // ood_index while ood_on (ood_scale > 0).
  int64_t ood_index;
  bool ood_on;
  float ood_scale;
  float inv_c;  // 1 / C
  bool check_labels;  // raise on an invalid label (forward only)
};

// Raises the ValueError for the first invalid label of a tile. Out of line:
// the tile loops only accumulate a flag.
[[noreturn]] UCE_COLD void throw_bad_label(const int64_t* tgt, int T,
                                           int64_t C, const CeConsts& k) {
  for (int t = 0; t < T; ++t) {
    bool bad = false;
    uce::label_code(tgt[t], C, k.ignore_index, k.ood_index, k.ood_on, &bad);
    if (bad) uce_checks::raise_bad_label(tgt[t], C, k.ignore_index, k.ood_index);
  }
  TORCH_CHECK(false, "uce_fast: internal error in label validation");
}

// Narrows a tile of labels to their int32 codes (uce::label_code): the class,
// kIgnoredPixel (also for invalid labels, which raise when `check`) or
// kOodPixel. Vectorised: only a flag is accumulated, the scan for the
// offending label happens out of line.
UCE_INLINE void load_labels(const int64_t* __restrict tgt, int T, int64_t C,
                            const CeConsts& k, bool check,
                            int32_t* __restrict lab) {
  const int64_t ignore_index = k.ignore_index, ood_index = k.ood_index;
  const bool ood_on = k.ood_on;
  int64_t bad = 0;
  for (int t = 0; t < T; ++t) {
    bool b = false;
    lab[t] = uce::label_code(tgt[t], C, ignore_index, ood_index, ood_on, &b);
    bad |= static_cast<int64_t>(b);
  }
  if (check && bad != 0) throw_bad_label(tgt, T, C, k);
}

// ---------------------------------------------------------------------------
// Monte-Carlo statistics of one tile: sigma of the beta samples from the
// per-pixel code of mc_reduce (cpu/mc_tile.h), without the entropy.

template <typename ST>
struct McTile {
  const ST* x0;      // samples[0, b, 0, n0]
  const ST* next;    // samples[0, b', 0, n0'] of the next tile, or nullptr
  int next_T;        // its width
  int64_t s_stride;  // B * C * N
  int64_t c_stride;  // N
  int T;
  int C;
  int beta;
  float inv_denom;  // 1 / (beta - correction)
  // Scratch: C x T each (row stride T), and T each.
  float* e;
  float* mean;
  float* m2;
  float* w0;
  float* w1;
  float* w2;
  int32_t* idx;
  float* xf;  // C x T, widened fp16/bf16 sample rows (unused for fp32)
  // Output for the T pixels.
  float* sigma;
};

template <typename ST, int kT>
UCE_INLINE void mc_tile(const McTile<ST>& a) {
  mc_stream_impl<ST, kT, false, true>(a.x0, a.next, a.next_T, a.s_stride,
                                a.c_stride, a.beta, 0, a.T, a.C, nullptr,
                                nullptr, a.mean, a.m2, nullptr, a.T, a.e,
                                a.xf, a.w0, a.w1, a.w2);
  mc_finalize_impl<kT, true>(a.mean, a.m2, nullptr, a.T, a.T, a.C, a.inv_denom,
                       a.w0, a.w1, a.idx, a.sigma, nullptr, nullptr, nullptr,
                       nullptr, 0);
}

// ---------------------------------------------------------------------------
// Weighted, label-smoothed CE of one tile of the main logits, scaled by the
// per-pixel weight (1 + sigma)^alpha. Writes pixel weight, loss and the
// softmax normaliser (max, log-sum) of the logits.

template <typename IT>
struct CeTile {
  const IT* x0;  // input[b, 0, n0]
  int64_t c_stride;
  const int64_t* tgt;
  int T;
  int C;
  const float* sigma;
  float alpha;
  CeConsts k;
  // Scratch, T each.
  float* mx;
  float* sum;
  float* smooth;
  float* dt;
  float* cwt;
  int32_t* lab;
  // Outputs.
  float* pw;
  float* loss;
  float* norm_max;  // max_c x_c
  float* norm_log;  // log sum_c exp(x_c - max)
};

template <typename IT>
UCE_INLINE void ce_tile_impl(
    const IT* __restrict x0, int64_t cs, const int64_t* __restrict tgt, int T,
    int C, const float* __restrict sigma, float alpha, const CeConsts& k,
    float* __restrict mx, float* __restrict sum,
    float* __restrict smooth, float* __restrict dt, float* __restrict cwt,
    int32_t* __restrict lab, float* __restrict pw, float* __restrict loss,
    float* __restrict norm_max, float* __restrict norm_log) {
  const float* __restrict cw = k.cw;
  const float S = k.S, ome = k.one_minus_eps, eoc = k.eps_over_c;
  const float ood_scale = k.ood_scale, inv_c = k.inv_c;
  load_labels(tgt, T, C, k, k.check_labels, lab);
  if (alpha == 0.0f) {
    for (int t = 0; t < T; ++t) pw[t] = 1.0f;
  } else {
    for (int t = 0; t < T; ++t) pw[t] = uce::pixel_weight(sigma[t], alpha);
  }

  for (int t = 0; t < T; ++t) mx[t] = load_f(x0[t]);
  for (int c = 1; c < C; ++c) {
    const IT* __restrict row = x0 + c * cs;
    for (int t = 0; t < T; ++t) {
      const float v = load_f(row[t]);
      const float m = mx[t];
      mx[t] = v > m ? v : m;
    }
  }
  for (int t = 0; t < T; ++t) {
    sum[t] = 0.0f;
    smooth[t] = 0.0f;
    dt[t] = 0.0f;
    cwt[t] = 0.0f;
  }
  // sum_c exp(x_c - max) and sum_c cw[c] * (max - x_c) accumulate
  // non-negative terms; lse - x_t and sum_c cw[c] (lse - x_c) are then
  // formed as log(sum) + (max - x_t) and S * log(sum) + smooth, without
  // cancellation. x_t and cw[t] are picked up by a select on the class
  // index instead of a per-pixel gather.
  for (int c = 0; c < C; ++c) {
    const IT* __restrict row = x0 + c * cs;
    const float w = cw != nullptr ? cw[c] : 1.0f;
    for (int t = 0; t < T; ++t) {
      const float d = mx[t] - load_f(row[t]);
      sum[t] += uce::fast_expf_nonpos(-d);
      smooth[t] += w * d;
      const bool hit = lab[t] == c;
      const float d_old = dt[t];
      const float w_old = cwt[t];
      dt[t] = hit ? d : d_old;
      cwt[t] = hit ? w : w_old;
    }
  }
  for (int t = 0; t < T; ++t) {
    const float ls = uce::fast_logf(sum[t]);
    norm_max[t] = mx[t];
    norm_log[t] = ls;
    const uce::PixelCe pc =
        uce::pixel_ce(lab[t], pw[t], ome, eoc, ood_scale, inv_c);
    pw[t] = pc.pw;
    loss[t] = uce::pixel_loss(lab[t] == uce::kIgnoredPixel, pc.pw, cwt[t],
                              ls + dt[t], S * ls + smooth[t],
                              pc.one_minus_eps, pc.eps_over_c);
  }
}

template <typename IT>
UCE_INLINE void ce_tile(const CeTile<IT>& a) {
  ce_tile_impl<IT>(a.x0, a.c_stride, a.tgt, a.T, a.C, a.sigma, a.alpha, a.k,
                   a.mx, a.sum, a.smooth, a.dt, a.cwt, a.lab, a.pw, a.loss,
                   a.norm_max, a.norm_log);
}

// ---------------------------------------------------------------------------
// Backward of one tile: grad_input[b, c, n] for the T pixels, all classes.

template <typename IT>
struct BwdTile {
  const IT* x0;  // input[b, 0, n0]
  IT* g0;        // grad_input[b, 0, n0]
  int64_t c_stride;
  const int64_t* tgt;
  const float* grad_loss;
  const float* norm_max;
  const float* norm_log;
  const float* pw;
  int T;
  int C;
  CeConsts k;
  // Scratch, T each.
  float* kh;
  float* ks;
  int32_t* lab;
};

template <typename IT>
UCE_INLINE void bwd_tile_impl(
    const IT* __restrict x0, IT* __restrict g0, int64_t cs,
    const int64_t* __restrict tgt, const float* __restrict gl,
    const float* __restrict norm_max, const float* __restrict norm_log,
    const float* __restrict pw, int T, int C, const CeConsts& k,
    float* __restrict kh, float* __restrict ks, int32_t* __restrict lab) {
  // Locals, not loads through `k` in the loops (the stores below may alias it).
  const float* __restrict cw = k.cw;
  const float S = k.S, ome = k.one_minus_eps, eoc = k.eps_over_c;
  const float ood_scale = k.ood_scale, inv_c = k.inv_c;
  load_labels(tgt, T, C, k, false, lab);
  for (int t = 0; t < T; ++t) {
    const int32_t l = lab[t];
    const float cw_t = cw != nullptr ? cw[l < 0 ? 0 : l] : 1.0f;
    // The saved pw is already ood_scale at an OoD pixel.
    const uce::PixelCe pc = uce::pixel_ce(l, pw[t], ome, eoc, ood_scale, inv_c);
    const uce::GradCoef g =
        uce::grad_coef(gl[t] * pc.pw, cw_t, pc.one_minus_eps, pc.eps_over_c);
    kh[t] = g.k_hard;
    ks[t] = g.k_smooth;
  }
  for (int c = 0; c < C; ++c) {
    const IT* __restrict row = x0 + c * cs;
    IT* __restrict out = g0 + c * cs;
    const float w = cw != nullptr ? cw[c] : 1.0f;
    for (int t = 0; t < T; ++t) {
      // (x - max) - log-sum rather than x - lse: a float32 lse of large
      // logits (|x| ~ 1e4) is off by up to ulp(1e4) / 2 ~ 5e-4, which would
      // become the softmax's relative error; x - max is exact or rounded
      // relative to the spread of the logits, whatever their offset.
      const float p =
          uce::fast_expf((load_f(row[t]) - norm_max[t]) - norm_log[t]);
      out[t] = store_f<IT>(uce::class_grad(lab[t] == uce::kIgnoredPixel, kh[t],
                                           ks[t], p, lab[t] == c, w, S));
    }
  }
}

template <typename IT>
UCE_INLINE void bwd_tile(const BwdTile<IT>& a) {
  bwd_tile_impl<IT>(a.x0, a.g0, a.c_stride, a.tgt, a.grad_loss, a.norm_max,
                    a.norm_log, a.pw, a.T, a.C, a.k, a.kh, a.ks, a.lab);
}

// ---------------------------------------------------------------------------
// Instruction-set variants (Isa, cpu_isa: cpu_common.h).

template <typename ST>
using McFn = void (*)(const McTile<ST>&);

// The tile bodies, for isa_variant / tile_variant (cpu_common.h).
template <typename ST>
struct McBody {
  template <int kT>
  struct At {
    static UCE_INLINE void run(const McTile<ST>& a) { mc_tile<ST, kT>(a); }
  };
};
template <typename IT>
struct CeBody {
  static UCE_INLINE void run(const CeTile<IT>& a) { ce_tile<IT>(a); }
};
template <typename IT>
struct BwdBody {
  static UCE_INLINE void run(const BwdTile<IT>& a) { bwd_tile<IT>(a); }
};

// ---------------------------------------------------------------------------
// Drivers: at::parallel_for over (batch row, tile) work items.

struct FwdParams {
  int64_t B = 0, C = 0, N = 0;
  int64_t T = 0, ntiles = 0;
  // Monte-Carlo stack (nullptr when sigma is given).
  const void* samples = nullptr;
  int64_t beta = 0;
  float inv_denom = 0.0f;
  // Given sigma (B, N) (nullptr when samples are given).
  const float* sigma_in = nullptr;
  // CE part.
  const void* input = nullptr;
  const int64_t* target = nullptr;
  CeConsts ce{};
  float alpha = 0.0f;
  // Outputs: (B, N) each; norm is (2, B, N) (max, log-sum).
  float* loss = nullptr;
  float* norm = nullptr;
  float* pw = nullptr;
};

template <typename IT, typename ST>
void run_forward(const FwdParams& p) {
  const Isa isa = cpu_isa();
  const McFn<ST> mc_full =
      tile_variant<McBody<ST>::template At, McTile<ST>>(isa, p.T);
  const McFn<ST> mc_tail =
      tile_variant<McBody<ST>::template At, McTile<ST>>(isa, 0);
  const auto ce = isa_variant<CeBody<IT>, CeTile<IT>>(isa);
  const bool has_samples = p.samples != nullptr;
  const int64_t T = p.T, C = p.C, N = p.N;
  const int64_t work = T * C * (has_samples ? p.beta + 1 : 1);

  at::parallel_for(0, p.B * p.ntiles, grain_for(work), [&](int64_t begin,
                                                           int64_t end) {
    constexpr bool kWiden = !std::is_same<ST, float>::value;
    const int64_t mc_floats =
        has_samples ? (kWiden ? 4 : 3) * Scratch::size_of(C * T) : 0;
    Scratch scratch(mc_floats + 11 * Scratch::size_of(T));
    McTile<ST> m{};
    CeTile<IT> k{};
    if (has_samples) {
      m.s_stride = p.B * C * N;
      m.c_stride = N;
      m.C = static_cast<int>(C);
      m.beta = static_cast<int>(p.beta);
      m.inv_denom = p.inv_denom;
      m.e = scratch.take(C * T);
      m.mean = scratch.take(C * T);
      m.m2 = scratch.take(C * T);
      m.w0 = scratch.take(T);
      m.w1 = scratch.take(T);
      m.w2 = scratch.take(T);
      m.idx = reinterpret_cast<int32_t*>(scratch.take(T));
      m.xf = kWiden ? scratch.take(C * T) : nullptr;
    }
    float* sig = scratch.take(T);
    k.c_stride = N;
    k.C = static_cast<int>(C);
    k.alpha = p.alpha;
    k.k = p.ce;
    k.mx = scratch.take(T);
    k.sum = scratch.take(T);
    k.smooth = scratch.take(T);
    k.dt = scratch.take(T);
    k.cwt = scratch.take(T);
    k.lab = reinterpret_cast<int32_t*>(scratch.take(T));
    const ST* samples = static_cast<const ST*>(p.samples);
    const IT* input = static_cast<const IT*>(p.input);

    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / p.ntiles;
      const int64_t n0 = (it % p.ntiles) * T;
      const int Tc = static_cast<int>(std::min<int64_t>(T, N - n0));
      const int64_t pix = b * N + n0;
      if (has_samples) {
        m.x0 = samples + b * C * N + n0;
        m.next = nullptr;
        if (it + 1 < end) {
          const int64_t b1 = (it + 1) / p.ntiles;
          const int64_t n1 = ((it + 1) % p.ntiles) * T;
          m.next = samples + b1 * C * N + n1;
          m.next_T = static_cast<int>(std::min<int64_t>(T, N - n1));
        }
        m.T = Tc;
        m.sigma = sig;
        (Tc == T ? mc_full : mc_tail)(m);
      }
      k.x0 = input + b * C * N + n0;
      k.tgt = p.target + pix;
      k.T = Tc;
      k.sigma = has_samples ? sig : p.sigma_in + pix;
      k.pw = p.pw + pix;
      k.loss = p.loss + pix;
      k.norm_max = p.norm + pix;
      k.norm_log = p.norm + p.B * N + pix;
      ce(k);
    }
  });
}

struct BwdParams {
  int64_t B = 0, C = 0, N = 0;
  int64_t T = 0, ntiles = 0;
  const float* grad_loss = nullptr;
  const void* input = nullptr;
  const int64_t* target = nullptr;
  const float* norm = nullptr;  // (2, B, N)
  const float* pw = nullptr;
  CeConsts ce{};
  void* grad_input = nullptr;
};

template <typename IT>
void run_backward(const BwdParams& p) {
  const auto fn = isa_variant<BwdBody<IT>, BwdTile<IT>>(cpu_isa());
  const int64_t T = p.T, C = p.C, N = p.N;
  at::parallel_for(0, p.B * p.ntiles, grain_for(T * C), [&](int64_t begin,
                                                            int64_t end) {
    Scratch scratch(3 * Scratch::size_of(T));
    BwdTile<IT> k{};
    k.c_stride = N;
    k.C = static_cast<int>(C);
    k.k = p.ce;
    k.kh = scratch.take(T);
    k.ks = scratch.take(T);
    k.lab = reinterpret_cast<int32_t*>(scratch.take(T));
    const IT* input = static_cast<const IT*>(p.input);
    IT* out = static_cast<IT*>(p.grad_input);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / p.ntiles;
      const int64_t n0 = (it % p.ntiles) * T;
      const int64_t pix = b * N + n0;
      k.x0 = input + b * C * N + n0;
      k.g0 = out + b * C * N + n0;
      k.tgt = p.target + pix;
      k.grad_loss = p.grad_loss + pix;
      k.norm_max = p.norm + pix;
      k.norm_log = p.norm + p.B * N + pix;
      k.pw = p.pw + pix;
      k.T = static_cast<int>(std::min<int64_t>(T, N - n0));
      fn(k);
    }
  });
}

// ---------------------------------------------------------------------------
// Argument checking: the checks shared with the CUDA glue
// (common/op_checks.h) with the CPU device check.

void on_cpu(const at::Tensor& t, const char* name, const at::Device&) {
  check_cpu(t, name);
}

// Returns (class weights or nullptr, their sum, in double as the CUDA kernels
// form it).
std::pair<const float*, float> weight_and_sum(
    const std::optional<at::Tensor>& weight, int64_t C,
    const at::Device& device) {
  const float* p = uce_checks::check_weight(weight, C, device, on_cpu);
  if (p == nullptr) return {nullptr, static_cast<float>(C)};
  double S = 0.0;
  for (int64_t c = 0; c < C; ++c) S += p[c];
  return {p, static_cast<float>(S)};
}

CeConsts make_ce(const std::pair<const float*, float>& w, int64_t C,
                 double label_smoothing, int64_t ignore_index,
                 int64_t ood_index, double ood_scale, bool check_labels) {
  uce_checks::check_label_smoothing(label_smoothing);
  uce_checks::check_ood(ood_index, ood_scale, C, ignore_index);
  CeConsts k{};
  k.cw = w.first;
  k.S = w.second;
  k.one_minus_eps = static_cast<float>(1.0 - label_smoothing);
  k.eps_over_c = static_cast<float>(label_smoothing / static_cast<double>(C));
  k.ignore_index = ignore_index;
  k.ood_index = ood_index;
  k.ood_on = ood_scale > 0.0;
  k.ood_scale = static_cast<float>(ood_scale);
  k.inv_c = static_cast<float>(1.0 / static_cast<double>(C));
  k.check_labels = check_labels;
  return k;
}

// ---------------------------------------------------------------------------
// Operators.

std::tuple<at::Tensor, at::Tensor, at::Tensor> uce_forward_cpu(
    const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& samples,
    const std::optional<at::Tensor>& sigma,
    const std::optional<at::Tensor>& weight, double alpha,
    int64_t ignore_index, double label_smoothing, int64_t correction,
    bool check_labels, int64_t ood_index, double ood_scale) {
  uce_checks::check_input(input, on_cpu);
  const at::Device device = input.device();
  const int64_t B = input.size(0);
  const int64_t C = input.size(1);
  const int64_t N = input.size(2);
  uce_checks::check_target(target, B, N, device, on_cpu);
  const bool has_samples = samples.has_value() && samples->defined();
  const bool has_sigma = sigma.has_value() && sigma->defined();
  TORCH_CHECK(has_samples != has_sigma,
              "uce_fast: exactly one of samples and sigma must be given");
  const CeConsts ce =
      make_ce(weight_and_sum(weight, C, device), C, label_smoothing,
              ignore_index, ood_index, ood_scale, check_labels);

  FwdParams p;
  p.B = B;
  p.C = C;
  p.N = N;
  p.input = input.data_ptr();
  p.target = target.data_ptr<int64_t>();
  p.ce = ce;
  p.alpha = static_cast<float>(alpha);
  at::ScalarType st = at::kFloat;
  if (has_samples) {
    const at::Tensor& s = *samples;
    p.beta = uce_checks::check_mc_stack(s, correction, device, on_cpu);
    TORCH_CHECK(s.size(1) == B && s.size(2) == C && s.size(3) == N,
                "uce_fast: samples must have shape (beta, ", B, ", ", C, ", ",
                N, ") to match input, got ", s.sizes());
    p.samples = s.data_ptr();
    p.inv_denom =
        static_cast<float>(1.0 / static_cast<double>(p.beta - correction));
    p.T = mc_tile_size(C);
    st = s.scalar_type();
  } else {
    uce_checks::check_f32_bn(*sigma, "sigma", B, N, device, on_cpu);
    p.sigma_in = sigma->data_ptr<float>();
    p.T = ce_tile_size(C);
  }

  const auto opts = input.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B, N}, opts);
  at::Tensor norm = at::empty({2, B, N}, opts);
  at::Tensor pw = at::empty({B, N}, opts);
  if (B * N == 0) return {loss, norm, pw};
  p.loss = loss.data_ptr<float>();
  p.norm = norm.data_ptr<float>();
  p.pw = pw.data_ptr<float>();
  p.ntiles = (N + p.T - 1) / p.T;

  dispatch_float(input.scalar_type(), "input", [&](auto iv) {
    using IT = decltype(iv);
    dispatch_float(st, "samples", [&](auto sv) {
      using ST = decltype(sv);
      run_forward<IT, ST>(p);
    });
  });
  return {loss, norm, pw};
}

at::Tensor uce_backward_cpu(const at::Tensor& grad_loss_in,
                            const at::Tensor& input, const at::Tensor& target,
                            const at::Tensor& norm,
                            const at::Tensor& pixel_weight,
                            const std::optional<at::Tensor>& weight,
                            int64_t ignore_index, double label_smoothing,
                            int64_t ood_index, double ood_scale) {
  uce_checks::check_input(input, on_cpu);
  const at::Device device = input.device();
  const int64_t B = input.size(0);
  const int64_t C = input.size(1);
  const int64_t N = input.size(2);
  check_cpu(grad_loss_in, "grad_loss");
  // May arrive expanded (zero strides) from a mean/sum reduction.
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  uce_checks::check_f32_bn(grad_loss, "grad_loss", B, N, device, on_cpu);
  uce_checks::check_target(target, B, N, device, on_cpu);
  uce_checks::check_f32_bn(norm, "norm", B, N, device, on_cpu, 2);
  uce_checks::check_f32_bn(pixel_weight, "pixel_weight", B, N, device,
                           on_cpu);
  const CeConsts ce =
      make_ce(weight_and_sum(weight, C, device), C, label_smoothing,
              ignore_index, ood_index, ood_scale, false);

  at::Tensor grad_input = at::empty({B, C, N}, input.options());
  if (B * N == 0) return grad_input;

  BwdParams p;
  p.B = B;
  p.C = C;
  p.N = N;
  p.T = kBwdTile;
  p.ntiles = (N + p.T - 1) / p.T;
  p.grad_loss = grad_loss.data_ptr<float>();
  p.input = input.data_ptr();
  p.target = target.data_ptr<int64_t>();
  p.norm = norm.data_ptr<float>();
  p.pw = pixel_weight.data_ptr<float>();
  p.ce = ce;
  p.grad_input = grad_input.data_ptr();

  dispatch_float(input.scalar_type(), "input", [&](auto iv) {
    using IT = decltype(iv);
    run_backward<IT>(p);
  });
  return grad_input;
}

}  // namespace

// Name of the instruction set the CPU kernels run with ("generic", "avx2",
// "avx512"), for `uce_fast._C.cpu_isa()`.
const char* isa_name() {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

}  // namespace uce_cpu

TORCH_LIBRARY_IMPL(uce_fast, CPU, m) {
  m.impl("uce_forward", &uce_cpu::uce_forward_cpu);
  m.impl("uce_backward", &uce_cpu::uce_backward_cpu);
}
