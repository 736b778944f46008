// Torch-facing glue of the streaming Monte-Carlo kernels (mc_accumulate_,
// mc_reduce): argument checks, output allocation, device guard and current
// stream, and the CUDA registration of the two ops. The kernels
// (csrc/cuda/mc_*.cu) see only raw pointers and sizes.
//
// Built only against a CUDA build of torch (setup.py adds csrc/cuda/ then).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/mc_checks.h"
#include "cuda/mc_cuda.h"

namespace uce_cuda_mc_glue {
namespace {

uce_cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return uce_cuda::DType::kFloat16;
    case at::kBFloat16:
      return uce_cuda::DType::kBFloat16;
    default:
      return uce_cuda::DType::kFloat32;
  }
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

uce_cuda::McArgs make_args(int64_t S, int64_t B, int64_t C, int64_t in_h,
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

// Scratch of the class-chunked path (empty when the kernels need none).
at::Tensor scratch_for(const uce_cuda::McArgs& a, const at::Tensor& like) {
  const int64_t floats = uce_cuda::mc_scratch_floats(a);
  if (floats == 0) return at::Tensor();
  return at::empty({floats}, like.options().dtype(at::kFloat));
}

// ---------------------------------------------------------------------------
// Operators.

void mc_accumulate_cuda(at::Tensor& mean, at::Tensor& m2, at::Tensor& entropy,
                        const at::Tensor& samples, int64_t count, int64_t in_h,
                        int64_t in_w, int64_t out_h, int64_t out_w,
                        bool align_corners) {
  TORCH_CHECK(mean.device().is_cuda(),
              "uce_fast (CUDA kernels): mean must be a CUDA tensor, got "
              "device ",
              mean.device());
  const at::Device device = mean.device();
  const auto on_device = [&device](const at::Tensor& t, const char* name) {
    check_cuda(t, name, device);
  };
  const uce_mc::Geometry geo =
      uce_mc::check_geometry(in_h, in_w, out_h, out_w);
  const int64_t N = geo.N;
  const auto [B, C, S] = uce_mc::check_accumulate(mean, m2, entropy, samples,
                                                  count, geo, on_device);
  if (B * N == 0 || S == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  uce_cuda::McArgs a =
      make_args(S, B, C, in_h, in_w, out_h, out_w, align_corners, count);
  a.samples = samples.data_ptr();
  a.samples_dtype = to_dtype(samples.scalar_type());
  a.mean = mean.data_ptr<float>();
  a.m2 = m2.data_ptr<float>();
  a.entropy = entropy.data_ptr<float>();
  at::Tensor scratch = scratch_for(a, samples);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(uce_cuda::mc_accumulate(
      a, scratch.defined() ? scratch.data_ptr<float>() : nullptr, stream));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mc_reduce_cuda(const std::optional<at::Tensor>& samples,
               const std::optional<at::Tensor>& mean,
               const std::optional<at::Tensor>& m2,
               const std::optional<at::Tensor>& entropy, int64_t count,
               int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
               bool align_corners, int64_t correction, bool want_probs,
               bool want_entropy) {
  const uce_mc::Geometry geo =
      uce_mc::check_geometry(in_h, in_w, out_h, out_w);
  const int64_t N = geo.N;
  const uce_mc::ReduceInputs in =
      uce_mc::check_reduce_inputs(samples, mean, m2, entropy, count);
  const bool has_samples = in.has_samples;
  const at::Tensor& ref = has_samples ? *samples : *mean;
  TORCH_CHECK(ref.device().is_cuda(), "uce_fast (CUDA kernels): ",
              has_samples ? "samples" : "mean",
              " must be a CUDA tensor, got device ", ref.device());
  const at::Device device = ref.device();
  const auto on_device = [&device](const at::Tensor& t, const char* name) {
    check_cuda(t, name, device);
  };
  const uce_mc::Sizes z = uce_mc::check_reduce(
      samples, mean, m2, entropy, count, correction, geo, in, on_device);
  const int64_t B = z.B, C = z.C, S = z.S;
  const int64_t n = count + S;

  const c10::cuda::CUDAGuard guard(device);
  auto [sigma, pred, ent_out, mi_out, probs] =
      uce_mc::reduce_outputs(ref, z, N, want_probs, want_entropy);
  if (B * N == 0) return {sigma, pred, ent_out, mi_out, probs};

  uce_cuda::McArgs a =
      make_args(S, B, C, in_h, in_w, out_h, out_w, align_corners, count);
  if (has_samples) {
    a.samples = samples->data_ptr();
    a.samples_dtype = to_dtype(samples->scalar_type());
  }
  if (count > 0) {  // count == 0: the state is not read
    a.mean = mean->data_ptr<float>();
    a.m2 = m2->data_ptr<float>();
    a.entropy = entropy->data_ptr<float>();
  }
  a.inv_denom = static_cast<float>(1.0 / static_cast<double>(n - correction));
  a.sigma_out = sigma.data_ptr<float>();
  a.pred_out = pred.data_ptr<int64_t>();
  if (want_entropy) {
    a.entropy_out = ent_out.data_ptr<float>();
    a.mutual_info_out = mi_out.data_ptr<float>();
  }
  if (want_probs) a.probs_out = probs.data_ptr<float>();
  at::Tensor scratch = scratch_for(a, ref);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(uce_cuda::mc_reduce(
      a, scratch.defined() ? scratch.data_ptr<float>() : nullptr, stream));
  return {sigma, pred, ent_out, mi_out, probs};
}

}  // namespace
}  // namespace uce_cuda_mc_glue

TORCH_LIBRARY_IMPL(uce_fast, CUDA, m) {
  m.impl("mc_accumulate_", &uce_cuda_mc_glue::mc_accumulate_cuda);
  m.impl("mc_reduce", &uce_cuda_mc_glue::mc_reduce_cuda);
}
