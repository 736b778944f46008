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
#include <vector>

#include "cuda/mc_cuda.h"

namespace uce_cuda_mc_glue {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

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

// Spatial sizes (messages as in csrc/cpu/mc_cpu.cpp): returns N = out_h *
// out_w. Resampling (sizes differ) needs a non-empty source whenever there is
// an output pixel.
int64_t check_sizes(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w) {
  TORCH_CHECK_VALUE(in_h >= 0 && in_w >= 0 && out_h >= 0 && out_w >= 0,
                    "uce_fast: sizes must be non-negative, got in_size (",
                    in_h, ", ", in_w, "), out_size (", out_h, ", ", out_w,
                    ")");
  TORCH_CHECK_VALUE(in_h <= INT32_MAX && in_w <= INT32_MAX &&
                        out_h <= INT32_MAX && out_w <= INT32_MAX,
                    "uce_fast: spatial size too large");
  const int64_t N = out_h * out_w;
  const bool resample = in_h != out_h || in_w != out_w;
  TORCH_CHECK_VALUE(!resample || N == 0 || (in_h > 0 && in_w > 0),
                    "uce_fast: cannot resample an empty (", in_h, ", ", in_w,
                    ") input to (", out_h, ", ", out_w, ")");
  return N;
}

// samples (S, B, C, in_h * in_w), a float dtype, contiguous; returns S.
int64_t check_samples(const at::Tensor& s, int64_t in_plane,
                      const at::Device& device) {
  check_cuda(s, "samples", device);
  TORCH_CHECK(is_float_type(s.scalar_type()),
              "uce_fast: samples must be float32, float16 or bfloat16, got ",
              s.scalar_type());
  TORCH_CHECK(s.is_contiguous(), "uce_fast: samples must be contiguous");
  TORCH_CHECK(s.dim() == 4,
              "uce_fast: samples must have shape (S, B, C, in_h * in_w), "
              "got ",
              s.sizes());
  TORCH_CHECK(s.size(3) == in_plane, "uce_fast: samples have ", s.size(3),
              " pixels per class, expected in_h * in_w = ", in_plane);
  TORCH_CHECK(s.size(2) >= 1, "uce_fast: samples must have at least one class");
  TORCH_CHECK(s.size(2) <= INT32_MAX, "uce_fast: samples has too many classes");
  TORCH_CHECK(s.size(0) <= INT32_MAX, "uce_fast: too many samples");
  return s.size(0);
}

// The state mean, m2 (B, C, N) and entropy (B, N): float32, contiguous.
void check_state(const at::Tensor& mean, const at::Tensor& m2,
                 const at::Tensor& entropy, int64_t N,
                 const at::Device& device) {
  const auto check_bcn = [N, &device](const at::Tensor& t, const char* name) {
    check_cuda(t, name, device);
    TORCH_CHECK(t.scalar_type() == at::kFloat, "uce_fast: ", name,
                " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 3 && t.size(2) == N, "uce_fast: ", name,
                " must have shape (B, C, ", N, "), got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "uce_fast: ", name, " must be contiguous");
  };
  check_bcn(mean, "mean");
  check_bcn(m2, "m2");
  TORCH_CHECK(m2.sizes() == mean.sizes(), "uce_fast: m2 must have the shape ",
              mean.sizes(), " of mean, got ", m2.sizes());
  TORCH_CHECK(mean.size(1) >= 1,
              "uce_fast: the state must have at least one class");
  TORCH_CHECK(mean.size(1) <= INT32_MAX,
              "uce_fast: the state has too many classes");
  check_cuda(entropy, "entropy", device);
  TORCH_CHECK(entropy.scalar_type() == at::kFloat,
              "uce_fast: entropy must be float32, got ", entropy.scalar_type());
  TORCH_CHECK(entropy.dim() == 2 && entropy.size(0) == mean.size(0) &&
                  entropy.size(1) == N,
              "uce_fast: entropy must have shape (", mean.size(0), ", ", N,
              "), got ", entropy.sizes());
  TORCH_CHECK(entropy.is_contiguous(), "uce_fast: entropy must be contiguous");
}

// Samples must match the state's batch and classes.
void check_samples_match(const at::Tensor& s, int64_t B, int64_t C,
                         int64_t in_plane) {
  TORCH_CHECK(s.size(1) == B && s.size(2) == C,
              "uce_fast: samples must have shape (S, ", B, ", ", C, ", ",
              in_plane, ") to match the state, got ", s.sizes());
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
  const int64_t N = check_sizes(in_h, in_w, out_h, out_w);
  check_state(mean, m2, entropy, N, device);
  const int64_t S = check_samples(samples, in_h * in_w, device);
  const int64_t B = mean.size(0);
  const int64_t C = mean.size(1);
  check_samples_match(samples, B, C, in_h * in_w);
  TORCH_CHECK_VALUE(count >= 0, "uce_fast: count must be >= 0, got ", count);
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
  const int64_t N = check_sizes(in_h, in_w, out_h, out_w);
  const bool has_samples = samples.has_value() && samples->defined();
  const int n_state = (mean.has_value() && mean->defined()) +
                      (m2.has_value() && m2->defined()) +
                      (entropy.has_value() && entropy->defined());
  TORCH_CHECK(n_state == 0 || n_state == 3,
              "uce_fast: give all of mean, m2 and entropy or none of them");
  const bool has_state = n_state == 3;
  TORCH_CHECK_VALUE(count >= 0, "uce_fast: count must be >= 0, got ", count);
  TORCH_CHECK(count == 0 || has_state,
              "uce_fast: mean, m2 and entropy are required when count > 0");
  TORCH_CHECK(has_samples || has_state,
              "uce_fast: need samples or a state to reduce");
  const at::Tensor& ref = has_samples ? *samples : *mean;
  TORCH_CHECK(ref.device().is_cuda(), "uce_fast (CUDA kernels): ",
              has_samples ? "samples" : "mean",
              " must be a CUDA tensor, got device ", ref.device());
  const at::Device device = ref.device();
  int64_t B = 0;
  int64_t C = 0;
  int64_t S = 0;
  if (has_state) {
    check_state(*mean, *m2, *entropy, N, device);
    B = mean->size(0);
    C = mean->size(1);
  }
  if (has_samples) {
    S = check_samples(*samples, in_h * in_w, device);
    if (has_state) {
      check_samples_match(*samples, B, C, in_h * in_w);
    } else {
      B = samples->size(1);
      C = samples->size(2);
    }
  }
  const int64_t n = count + S;
  TORCH_CHECK_VALUE(correction >= 0 && correction < n,
                    "uce_fast: correction must be in [0, n) = [0, ", n,
                    ") for n = count + S samples, got ", correction);

  const c10::cuda::CUDAGuard guard(device);
  const auto opts = ref.options().dtype(at::kFloat);
  at::Tensor sigma = at::empty({B, N}, opts);
  at::Tensor pred = at::empty({B, N}, opts.dtype(at::kLong));
  const std::vector<int64_t> map_shape =
      want_entropy ? std::vector<int64_t>{B, N} : std::vector<int64_t>{0};
  const std::vector<int64_t> probs_shape =
      want_probs ? std::vector<int64_t>{B, C, N} : std::vector<int64_t>{0};
  at::Tensor ent_out = at::empty(map_shape, opts);
  at::Tensor mi_out = at::empty(map_shape, opts);
  at::Tensor probs = at::empty(probs_shape, opts);
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
