// Torch-facing glue of the CUDA kernels: argument checks (the same as the
// CPU backend's), output allocation, device guard and current stream, the
// read-back of invalid labels, and the CUDA registration of the ops. The
// kernels themselves (csrc/cuda/*.cu) see only raw pointers and sizes.
//
// Built only against a CUDA build of torch (setup.py adds csrc/cuda/ then).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "cuda/uce_cuda.h"

namespace uce_cuda_glue {
namespace {

constexpr int64_t kNoBadPixel = std::numeric_limits<int64_t>::max();

// ---------------------------------------------------------------------------
// Argument checking (messages as in csrc/cpu/uce_cpu.cpp).

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

uce_cuda::DType to_dtype(at::ScalarType t, const char* name) {
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

// Every tensor must live on the CUDA device of the first one checked.
void check_cuda(const at::Tensor& t, const char* name,
                const at::Device& device) {
  TORCH_CHECK(t.device().is_cuda(), "uce_fast (CUDA kernels): ", name,
              " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "uce_fast (CUDA kernels): ", name,
              " must be on ", device, " like the other arguments, got ",
              t.device());
}

void check_logits(const at::Tensor& t, const char* name,
                  const at::Device& device) {
  check_cuda(t, name, device);
  TORCH_CHECK(is_float_type(t.scalar_type()), "uce_fast: ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "uce_fast: ", name, " must be contiguous");
}

void check_f32_bn(const at::Tensor& t, const char* name, int64_t B, int64_t N,
                  const at::Device& device) {
  check_cuda(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "uce_fast: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == N, "uce_fast: ",
              name, " must have shape (", B, ", ", N, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "uce_fast: ", name, " must be contiguous");
}

void check_target(const at::Tensor& target, int64_t B, int64_t N,
                  const at::Device& device) {
  check_cuda(target, "target", device);
  TORCH_CHECK(target.scalar_type() == at::kLong,
              "uce_fast: target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == B &&
                  target.size(1) == N,
              "uce_fast: target must have shape (", B, ", ", N, "), got ",
              target.sizes());
  TORCH_CHECK(target.is_contiguous(), "uce_fast: target must be contiguous");
}

void check_input(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cuda(),
              "uce_fast (CUDA kernels): input must be a CUDA tensor, got "
              "device ",
              input.device());
  check_logits(input, "input", input.device());
  TORCH_CHECK(input.dim() == 3,
              "uce_fast: input must have shape (B, C, N), got ",
              input.sizes());
  TORCH_CHECK(input.size(1) >= 1,
              "uce_fast: input must have at least one class");
  TORCH_CHECK(input.size(1) <= INT32_MAX,
              "uce_fast: input has too many classes");
}

// Class weights (C,) float32, or nullptr. Their sum is formed on the device
// by the kernels (no host read of a device tensor).
const float* check_weight(const std::optional<at::Tensor>& weight, int64_t C,
                          const at::Device& device) {
  if (!weight.has_value() || !weight->defined()) return nullptr;
  const at::Tensor& w = *weight;
  check_cuda(w, "weight", device);
  TORCH_CHECK(w.scalar_type() == at::kFloat,
              "uce_fast: weight must be float32, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C,
              "uce_fast: weight must have shape (", C, ",), got ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "uce_fast: weight must be contiguous");
  return w.data_ptr<float>();
}

// Validates the Monte-Carlo stack and returns beta.
int64_t check_samples(const at::Tensor& samples, int64_t correction,
                      const at::Device& device) {
  check_logits(samples, "samples", device);
  TORCH_CHECK(samples.dim() == 4,
              "uce_fast: samples must have shape (beta, B, C, N), got ",
              samples.sizes());
  TORCH_CHECK(samples.size(2) >= 1,
              "uce_fast: samples must have at least one class");
  TORCH_CHECK(samples.size(2) <= INT32_MAX,
              "uce_fast: samples has too many classes");
  const int64_t beta = samples.size(0);
  TORCH_CHECK_VALUE(beta >= 2,
                    "uce_fast: need at least 2 Monte-Carlo samples, got "
                    "beta = ",
                    beta);
  TORCH_CHECK(beta <= INT32_MAX, "uce_fast: too many Monte-Carlo samples");
  TORCH_CHECK_VALUE(correction >= 0 && correction < beta,
                    "uce_fast: correction must be in [0, beta) = [0, ", beta,
                    "), got ", correction);
  return beta;
}

void check_label_smoothing(double label_smoothing) {
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "uce_fast: label_smoothing must be in [0, 1], got ",
                    label_smoothing);
}

// ---------------------------------------------------------------------------
// Invalid labels.
//
// The kernels never read out of bounds with a label and never trap (a device
// assert would leave the CUDA context unusable); they record the lowest flat
// pixel index with an invalid label in a one-element int64 device buffer,
// preset here to kNoBadPixel. After the launch the glue copies those 8 bytes
// back on the current stream and raises the same ValueError as the other
// backends. That copy synchronises the host with the stream once per call of
// uce_forward / uce_backward: the price of a raised error instead of silent
// garbage for bad labels. While the stream is being captured into a CUDA graph
// a synchronising copy is not allowed, so the check is skipped there (the
// kernels still clamp; graph warm-up runs, which are not captured, check).

at::Tensor new_bad_pixel_buffer(const at::Tensor& target) {
  return at::full({1}, kNoBadPixel, target.options());
}

void raise_if_bad_label(const at::Tensor& bad_pixel, const at::Tensor& target,
                        int64_t C, int64_t ignore_index, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  int64_t pixel = kNoBadPixel;
  c10::cuda::memcpy_and_sync(&pixel, bad_pixel.data_ptr(), sizeof(pixel),
                             cudaMemcpyDeviceToHost, stream);
  if (pixel == kNoBadPixel) return;
  int64_t label = 0;  // error path only: a second 8-byte read for the message
  c10::cuda::memcpy_and_sync(&label, target.data_ptr<int64_t>() + pixel,
                             sizeof(label), cudaMemcpyDeviceToHost, stream);
  TORCH_CHECK_VALUE(false, "target contains label ", label, ", outside [0, ",
                    C, ") and not ignore_index (", ignore_index, ")");
}

// ---------------------------------------------------------------------------
// Operators.

std::tuple<at::Tensor, at::Tensor, at::Tensor> uce_forward_cuda(
    const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& samples,
    const std::optional<at::Tensor>& sigma,
    const std::optional<at::Tensor>& weight, double alpha,
    int64_t ignore_index, double label_smoothing, int64_t correction) {
  check_input(input);
  const at::Device device = input.device();
  const int64_t B = input.size(0);
  const int64_t C = input.size(1);
  const int64_t N = input.size(2);
  check_target(target, B, N, device);
  const bool has_samples = samples.has_value() && samples->defined();
  const bool has_sigma = sigma.has_value() && sigma->defined();
  TORCH_CHECK(has_samples != has_sigma,
              "uce_fast: exactly one of samples and sigma must be given");
  const float* cw = check_weight(weight, C, device);
  check_label_smoothing(label_smoothing);

  uce_cuda::ForwardArgs a;
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
  if (has_samples) {
    const at::Tensor& s = *samples;
    a.beta = check_samples(s, correction, device);
    TORCH_CHECK(s.size(1) == B && s.size(2) == C && s.size(3) == N,
                "uce_fast: samples must have shape (beta, ", B, ", ", C, ", ",
                N, ") to match input, got ", s.sizes());
    a.samples = s.data_ptr();
    a.samples_dtype = to_dtype(s.scalar_type(), "samples");
    a.inv_denom =
        static_cast<float>(1.0 / static_cast<double>(a.beta - correction));
  } else {
    check_f32_bn(*sigma, "sigma", B, N, device);
    a.sigma_in = sigma->data_ptr<float>();
  }

  const c10::cuda::CUDAGuard guard(device);
  const auto opts = input.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B, N}, opts);
  at::Tensor lse = at::empty({B, N}, opts);
  at::Tensor pw = at::empty({B, N}, opts);
  if (B * N == 0) return {loss, lse, pw};
  a.loss = loss.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.pixel_weight = pw.data_ptr<float>();

  at::Tensor bad_pixel = new_bad_pixel_buffer(target);
  a.bad_pixel = reinterpret_cast<long long*>(bad_pixel.data_ptr<int64_t>());
  const int64_t scratch_floats = uce_cuda::forward_scratch_floats(a);
  at::Tensor scratch;
  if (scratch_floats > 0) scratch = at::empty({scratch_floats}, opts);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(uce_cuda::forward(
      a, scratch_floats > 0 ? scratch.data_ptr<float>() : nullptr, stream));
  raise_if_bad_label(bad_pixel, target, C, ignore_index, stream);
  return {loss, lse, pw};
}

std::tuple<at::Tensor, at::Tensor> mc_uncertainty_cuda(
    const at::Tensor& samples, int64_t correction) {
  TORCH_CHECK(samples.device().is_cuda(),
              "uce_fast (CUDA kernels): samples must be a CUDA tensor, got "
              "device ",
              samples.device());
  const at::Device device = samples.device();
  const int64_t beta = check_samples(samples, correction, device);
  const int64_t B = samples.size(1);
  const int64_t C = samples.size(2);
  const int64_t N = samples.size(3);

  const c10::cuda::CUDAGuard guard(device);
  const auto opts = samples.options();
  at::Tensor sigma = at::empty({B, N}, opts.dtype(at::kFloat));
  at::Tensor pred = at::empty({B, N}, opts.dtype(at::kLong));
  if (B * N == 0) return {sigma, pred};

  uce_cuda::ForwardArgs a;
  a.B = B;
  a.C = C;
  a.N = N;
  a.samples = samples.data_ptr();
  a.samples_dtype = to_dtype(samples.scalar_type(), "samples");
  a.beta = beta;
  a.inv_denom =
      static_cast<float>(1.0 / static_cast<double>(beta - correction));
  a.sigma_out = sigma.data_ptr<float>();
  a.pred_out = pred.data_ptr<int64_t>();
  const int64_t scratch_floats = uce_cuda::forward_scratch_floats(a);
  at::Tensor scratch;
  if (scratch_floats > 0) {
    scratch = at::empty({scratch_floats}, opts.dtype(at::kFloat));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(uce_cuda::forward(
      a, scratch_floats > 0 ? scratch.data_ptr<float>() : nullptr, stream));
  return {sigma, pred};
}

at::Tensor uce_backward_cuda(const at::Tensor& grad_loss_in,
                             const at::Tensor& input, const at::Tensor& target,
                             const at::Tensor& lse,
                             const at::Tensor& pixel_weight,
                             const std::optional<at::Tensor>& weight,
                             int64_t ignore_index, double label_smoothing) {
  check_input(input);
  const at::Device device = input.device();
  const int64_t B = input.size(0);
  const int64_t C = input.size(1);
  const int64_t N = input.size(2);
  check_cuda(grad_loss_in, "grad_loss", device);
  const c10::cuda::CUDAGuard guard(device);
  // May arrive expanded (zero strides) from a mean/sum reduction.
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  check_f32_bn(grad_loss, "grad_loss", B, N, device);
  check_target(target, B, N, device);
  check_f32_bn(lse, "lse", B, N, device);
  check_f32_bn(pixel_weight, "pixel_weight", B, N, device);
  const float* cw = check_weight(weight, C, device);
  check_label_smoothing(label_smoothing);

  at::Tensor grad_input = at::empty({B, C, N}, input.options());
  if (B * N == 0) return grad_input;

  uce_cuda::BackwardArgs a;
  a.B = B;
  a.C = C;
  a.N = N;
  a.grad_loss = grad_loss.data_ptr<float>();
  a.input = input.data_ptr();
  a.input_dtype = to_dtype(input.scalar_type(), "input");
  a.target = target.data_ptr<int64_t>();
  a.lse = lse.data_ptr<float>();
  a.pixel_weight = pixel_weight.data_ptr<float>();
  a.weight = cw;
  a.one_minus_eps = static_cast<float>(1.0 - label_smoothing);
  a.eps_over_c = static_cast<float>(label_smoothing / static_cast<double>(C));
  a.ignore_index = ignore_index;
  a.grad_input = grad_input.data_ptr();
  at::Tensor bad_pixel = new_bad_pixel_buffer(target);
  a.bad_pixel = reinterpret_cast<long long*>(bad_pixel.data_ptr<int64_t>());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(uce_cuda::backward(a, stream));
  raise_if_bad_label(bad_pixel, target, C, ignore_index, stream);
  return grad_input;
}

}  // namespace
}  // namespace uce_cuda_glue

TORCH_LIBRARY_IMPL(uce_fast, CUDA, m) {
  m.impl("uce_forward", &uce_cuda_glue::uce_forward_cuda);
  m.impl("uce_backward", &uce_cuda_glue::uce_backward_cuda);
  m.impl("mc_uncertainty", &uce_cuda_glue::mc_uncertainty_cuda);
}
