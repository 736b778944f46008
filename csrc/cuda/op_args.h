// The CUDA ops from ATen tensors up to the launch: argument checks (shared
// with the CPU backend, common/op_checks.h), the launcher argument structs
// (ForwardArgs, BackwardArgs, McArgs) and the outputs. Shared by the torch glue
// (uce_cuda.cpp, mc_cuda.cpp) and by the host build of the kernels in
// tests/cuda_host, so that both drive the launchers with the same structs.
// The callers add the device guard, the stream, the scratch (sized for the
// current device, so allocated after selecting it), the launch and, for a
// forward with label checks, the read-back of invalid labels.
//
// `on_device(tensor, name, device)` is the caller's device check: it raises
// unless `tensor` is on `device`, the device of the op's first tensor.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common/mc_checks.h"
#include "common/op_checks.h"
#include "cuda/mc_cuda.h"
#include "cuda/uce_cuda.h"

namespace uce_cuda_glue {

using uce_checks::check_f32_bn;
using uce_checks::check_input;
using uce_checks::check_label_smoothing;
using uce_checks::check_mc_stack;
using uce_checks::check_ood;
using uce_checks::check_target;
using uce_checks::check_weight;
// The error every backend raises for the first invalid label in memory order
// (it names ood_index when entropy maximisation is on).
using uce_checks::raise_bad_label;

// Preset of the bad-pixel buffer: no invalid label seen.
constexpr int64_t kNoBadPixel = std::numeric_limits<int64_t>::max();

inline uce_cuda::DType to_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat:
      return uce_cuda::DType::kFloat32;
    case at::kHalf:
      return uce_cuda::DType::kFloat16;
    case at::kBFloat16:
      return uce_cuda::DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "uce_fast: unsupported dtype for ", name, ": ", t);
  return uce_cuda::DType::kFloat32;  // not reached
}

// The torch glue's device check: every tensor on the CUDA device `device`.
inline void check_cuda(const at::Tensor& t, const char* name,
                       const at::Device& device) {
  TORCH_CHECK(t.device().is_cuda(), "uce_fast (CUDA kernels): ", name,
              " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "uce_fast (CUDA kernels): ", name,
              " must be on ", device, " like the other arguments, got ",
              t.device());
}

inline float* float_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

// Scratch of `floats` float32 on the device of `like`; undefined when 0.
inline at::Tensor scratch_tensor(int64_t floats, const at::Tensor& like) {
  if (floats == 0) return at::Tensor();
  return at::empty({floats}, like.options().dtype(at::kFloat));
}

// ---------------------------------------------------------------------------
// uce_forward / uce_backward.

// The checked input (B, C, N): its device and sizes.
struct InputDims {
  at::Device device;
  int64_t B, C, N;
};

template <typename OnDevice>
InputDims checked_input(const at::Tensor& input, const OnDevice& on_device) {
  check_input(input, on_device);
  return {input.device(), input.size(0), input.size(1), input.size(2)};
}

// The entropy-maximisation fields of ForwardArgs / BackwardArgs (checked
// before with check_ood): OoD pixels are those labelled ood_index while
// ood_scale > 0 (uce::label_code).
template <typename Args>
void set_ood(Args& a, int64_t C, int64_t ood_index, double ood_scale) {
  a.ood_index = ood_index;
  a.ood_on = ood_scale > 0.0;
  a.ood_scale = static_cast<float>(ood_scale);
  a.inv_c = static_cast<float>(1.0 / static_cast<double>(C));
}

struct Forward {
  uce_cuda::ForwardArgs args;
  at::Tensor loss, norm, pixel_weight;  // float32 (B, N), (2, B, N), (B, N)
  // (1,) int64 preset to kNoBadPixel, for the kernels' atomicMin, when the
  // labels are checked and there is something to launch; else undefined
  // (and args.bad_pixel nullptr): nothing to read back.
  at::Tensor bad_pixel;
  bool launch = false;  // false: nothing to compute (B * N == 0)

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {loss, norm, pixel_weight};
  }
};

template <typename OnDevice>
Forward prepare_forward(const at::Tensor& input, const at::Tensor& target,
                        const std::optional<at::Tensor>& samples,
                        const std::optional<at::Tensor>& sigma,
                        const std::optional<at::Tensor>& weight, double alpha,
                        int64_t ignore_index, double label_smoothing,
                        int64_t correction, bool check_labels,
                        int64_t ood_index, double ood_scale,
                        const OnDevice& on_device) {
  const auto [device, B, C, N] = checked_input(input, on_device);
  check_target(target, B, N, device, on_device);
  const bool has_samples = samples.has_value() && samples->defined();
  const bool has_sigma = sigma.has_value() && sigma->defined();
  TORCH_CHECK(has_samples != has_sigma,
              "uce_fast: exactly one of samples and sigma must be given");
  const float* cw = check_weight(weight, C, device, on_device);
  check_label_smoothing(label_smoothing);
  check_ood(ood_index, ood_scale, C, ignore_index);

  Forward f;
  uce_cuda::ForwardArgs& a = f.args;
  a.B = B;
  a.C = C;
  a.N = N;
  a.input = input.data_ptr();
  a.input_dtype = to_dtype(input.scalar_type(), "input");
  a.target = target.data_ptr<int64_t>();
  a.weight = cw;
  a.alpha = static_cast<float>(alpha);
  a.one_minus_eps = static_cast<float>(1.0 - label_smoothing);
  a.eps_over_c = static_cast<float>(label_smoothing / static_cast<double>(C));
  a.ignore_index = ignore_index;
  set_ood(a, C, ood_index, ood_scale);
  if (has_samples) {
    const at::Tensor& s = *samples;
    a.beta = check_mc_stack(s, correction, device, on_device);
    TORCH_CHECK(s.size(1) == B && s.size(2) == C && s.size(3) == N,
                "uce_fast: samples must have shape (beta, ", B, ", ", C, ", ",
                N, ") to match input, got ", s.sizes());
    a.samples = s.data_ptr();
    a.samples_dtype = to_dtype(s.scalar_type(), "samples");
    a.inv_denom =
        static_cast<float>(1.0 / static_cast<double>(a.beta - correction));
  } else {
    check_f32_bn(*sigma, "sigma", B, N, device, on_device);
    a.sigma_in = sigma->data_ptr<float>();
  }

  const auto opts = input.options().dtype(at::kFloat);
  f.loss = at::empty({B, N}, opts);
  f.norm = at::empty({2, B, N}, opts);
  f.pixel_weight = at::empty({B, N}, opts);
  if (B * N == 0) return f;
  f.launch = true;
  a.loss = f.loss.data_ptr<float>();
  a.norm_max = f.norm.data_ptr<float>();
  a.norm_log = a.norm_max + B * N;
  a.pixel_weight = f.pixel_weight.data_ptr<float>();
  if (check_labels) {
    f.bad_pixel = at::full({1}, kNoBadPixel, target.options());
    a.bad_pixel =
        reinterpret_cast<long long*>(f.bad_pixel.data_ptr<int64_t>());
  }
  return f;
}

// Labels are not checked in the backward (nothing to read back).
struct Backward {
  uce_cuda::BackwardArgs args;
  at::Tensor grad_loss;   // contiguous copy or the caller's tensor
  at::Tensor grad_input;  // (B, C, N), dtype of input
  bool launch = false;    // false: nothing to compute (B * N == 0)
};

template <typename OnDevice>
Backward prepare_backward(const at::Tensor& grad_loss_in,
                          const at::Tensor& input, const at::Tensor& target,
                          const at::Tensor& norm,
                          const at::Tensor& pixel_weight,
                          const std::optional<at::Tensor>& weight,
                          int64_t ignore_index, double label_smoothing,
                          int64_t ood_index, double ood_scale,
                          const OnDevice& on_device) {
  const auto [device, B, C, N] = checked_input(input, on_device);
  on_device(grad_loss_in, "grad_loss", device);
  Backward g;
  // May arrive expanded (zero strides) from a mean/sum reduction.
  g.grad_loss = grad_loss_in.contiguous();
  check_f32_bn(g.grad_loss, "grad_loss", B, N, device, on_device);
  check_target(target, B, N, device, on_device);
  check_f32_bn(norm, "norm", B, N, device, on_device, 2);
  check_f32_bn(pixel_weight, "pixel_weight", B, N, device, on_device);
  const float* cw = check_weight(weight, C, device, on_device);
  check_label_smoothing(label_smoothing);
  check_ood(ood_index, ood_scale, C, ignore_index);

  g.grad_input = at::empty({B, C, N}, input.options());
  if (B * N == 0) return g;
  g.launch = true;

  uce_cuda::BackwardArgs& a = g.args;
  a.B = B;
  a.C = C;
  a.N = N;
  a.grad_loss = g.grad_loss.data_ptr<float>();
  a.input = input.data_ptr();
  a.input_dtype = to_dtype(input.scalar_type(), "input");
  a.target = target.data_ptr<int64_t>();
  a.norm_max = norm.data_ptr<float>();
  a.norm_log = a.norm_max + B * N;
  a.pixel_weight = pixel_weight.data_ptr<float>();
  a.weight = cw;
  a.one_minus_eps = static_cast<float>(1.0 - label_smoothing);
  a.eps_over_c = static_cast<float>(label_smoothing / static_cast<double>(C));
  a.ignore_index = ignore_index;
  set_ood(a, C, ood_index, ood_scale);
  a.grad_input = g.grad_input.data_ptr();
  return g;
}

// ---------------------------------------------------------------------------
// mc_accumulate_ / mc_reduce (checks in common/mc_checks.h).

struct McCall {
  uce_cuda::McArgs args;
  bool launch = false;  // false: nothing to compute (no pixels or samples)
  // mc_reduce's (sigma, pred, entropy, mutual_info, mean_probs).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
      outputs;
};

inline uce_cuda::McArgs mc_args(int64_t S, int64_t B, int64_t C, int64_t in_h,
                                int64_t in_w, int64_t out_h, int64_t out_w,
                                bool align_corners, int64_t count) {
  uce_cuda::McArgs a;
  a.S = S;
  a.B = B;
  a.C = C;
  a.in_h = in_h;
  a.in_w = in_w;
  a.out_h = out_h;
  a.out_w = out_w;
  a.align_corners = align_corners;
  a.count = count;
  return a;
}

template <typename OnDevice>
McCall prepare_mc_accumulate(at::Tensor& mean, at::Tensor& m2,
                             at::Tensor& entropy, const at::Tensor& samples,
                             int64_t count, int64_t in_h, int64_t in_w,
                             int64_t out_h, int64_t out_w, bool align_corners,
                             const OnDevice& on_device) {
  on_device(mean, "mean", mean.device());
  const at::Device device = mean.device();
  const auto check = [&](const at::Tensor& t, const char* name) {
    on_device(t, name, device);
  };
  const uce_mc::Geometry geo = uce_mc::check_geometry(in_h, in_w, out_h, out_w);
  const auto [B, C, S] = uce_mc::check_accumulate(mean, m2, entropy, samples,
                                                  count, geo, check);
  McCall m;
  m.launch = B * geo.N > 0 && S > 0;
  if (!m.launch) return m;
  uce_cuda::McArgs& a = m.args;
  a = mc_args(S, B, C, in_h, in_w, out_h, out_w, align_corners, count);
  a.samples = samples.data_ptr();
  a.samples_dtype = to_dtype(samples.scalar_type(), "samples");
  a.mean = mean.data_ptr<float>();
  a.m2 = m2.data_ptr<float>();
  a.entropy = entropy.data_ptr<float>();
  return m;
}

template <typename OnDevice>
McCall prepare_mc_reduce(const std::optional<at::Tensor>& samples,
                         const std::optional<at::Tensor>& mean,
                         const std::optional<at::Tensor>& m2,
                         const std::optional<at::Tensor>& entropy,
                         int64_t count, int64_t in_h, int64_t in_w,
                         int64_t out_h, int64_t out_w, bool align_corners,
                         int64_t correction, bool want_probs,
                         bool want_entropy, const OnDevice& on_device) {
  const uce_mc::Geometry geo = uce_mc::check_geometry(in_h, in_w, out_h, out_w);
  const int64_t N = geo.N;
  const uce_mc::ReduceInputs in =
      uce_mc::check_reduce_inputs(samples, mean, m2, entropy, count);
  const bool has_samples = in.has_samples;
  const at::Tensor& ref = has_samples ? *samples : *mean;
  on_device(ref, has_samples ? "samples" : "mean", ref.device());
  const at::Device device = ref.device();
  const auto check = [&](const at::Tensor& t, const char* name) {
    on_device(t, name, device);
  };
  const uce_mc::Sizes z = uce_mc::check_reduce(
      samples, mean, m2, entropy, count, correction, geo, in, check);

  McCall m;
  m.outputs = uce_mc::reduce_outputs(ref, z, N, want_probs, want_entropy);
  m.launch = z.B * N > 0;
  if (!m.launch) return m;
  uce_cuda::McArgs& a = m.args;
  a = mc_args(z.S, z.B, z.C, in_h, in_w, out_h, out_w, align_corners, count);
  if (has_samples) {
    a.samples = samples->data_ptr();
    a.samples_dtype = to_dtype(samples->scalar_type(), "samples");
  }
  if (count > 0) {  // count == 0: the state is not read
    a.mean = mean->data_ptr<float>();
    a.m2 = m2->data_ptr<float>();
    a.entropy = entropy->data_ptr<float>();
  }
  a.inv_denom = static_cast<float>(
      1.0 / static_cast<double>(count + z.S - correction));
  auto& [sigma, pred, ent_out, mi_out, probs] = m.outputs;
  a.sigma_out = sigma.data_ptr<float>();
  a.pred_out = pred.data_ptr<int64_t>();
  if (want_entropy) {
    a.entropy_out = ent_out.data_ptr<float>();
    a.mutual_info_out = mi_out.data_ptr<float>();
  }
  if (want_probs) a.probs_out = probs.data_ptr<float>();
  return m;
}

}  // namespace uce_cuda_glue
