// Torch-facing glue of the streaming Monte-Carlo kernels (mc_accumulate_,
// mc_reduce): device guard, current stream and scratch, and the CUDA
// registration of the two ops. Argument checks, launcher arguments and
// outputs are in op_args.h; the kernels (csrc/cuda/mc_*.cu) see only raw
// pointers and sizes.
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

#include "cuda/mc_cuda.h"
#include "cuda/op_args.h"

namespace uce_cuda_mc_glue {
namespace {

using uce_cuda_glue::check_cuda;
using uce_cuda_glue::float_ptr;
using uce_cuda_glue::McCall;
using uce_cuda_glue::scratch_tensor;

// Launches mc_accumulate or mc_reduce on the current stream of `device`,
// with the class-chunked path's scratch sized for that device.
template <typename Launcher>
void launch_on(const at::Device& device, const McCall& m,
               const at::Tensor& like, const Launcher& launcher) {
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor scratch =
      scratch_tensor(uce_cuda::mc_scratch_floats(m.args), like);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(launcher(m.args, float_ptr(scratch), stream));
}

void mc_accumulate_cuda(at::Tensor& mean, at::Tensor& m2, at::Tensor& entropy,
                        const at::Tensor& samples, int64_t count, int64_t in_h,
                        int64_t in_w, int64_t out_h, int64_t out_w,
                        bool align_corners) {
  const McCall m = uce_cuda_glue::prepare_mc_accumulate(
      mean, m2, entropy, samples, count, in_h, in_w, out_h, out_w,
      align_corners, check_cuda);
  if (m.launch) launch_on(mean.device(), m, samples, uce_cuda::mc_accumulate);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mc_reduce_cuda(const std::optional<at::Tensor>& samples,
               const std::optional<at::Tensor>& mean,
               const std::optional<at::Tensor>& m2,
               const std::optional<at::Tensor>& entropy, int64_t count,
               int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
               bool align_corners, int64_t correction, bool want_probs,
               bool want_entropy) {
  const McCall m = uce_cuda_glue::prepare_mc_reduce(
      samples, mean, m2, entropy, count, in_h, in_w, out_h, out_w,
      align_corners, correction, want_probs, want_entropy, check_cuda);
  if (m.launch) {
    const at::Tensor& sigma = std::get<0>(m.outputs);
    launch_on(sigma.device(), m, sigma, uce_cuda::mc_reduce);
  }
  return m.outputs;
}

}  // namespace
}  // namespace uce_cuda_mc_glue

TORCH_LIBRARY_IMPL(uce_fast, CUDA, m) {
  m.impl("mc_accumulate_", &uce_cuda_mc_glue::mc_accumulate_cuda);
  m.impl("mc_reduce", &uce_cuda_mc_glue::mc_reduce_cuda);
}
