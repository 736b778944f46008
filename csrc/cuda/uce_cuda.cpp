// Torch-facing glue of the CUDA kernels: the device check, device guard and
// current stream, the scratch, the read-back of invalid labels (checked
// forward only), and the CUDA registration of the ops. Argument checks,
// launcher arguments and outputs are in op_args.h (shared with mc_cuda.cpp
// and the host build of the kernels); the kernels themselves
// (csrc/cuda/*.cu) see only raw pointers and sizes.
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
#include <optional>
#include <tuple>

#include "cuda/op_args.h"
#include "cuda/uce_cuda.h"

namespace uce_cuda_glue {
namespace {

// ---------------------------------------------------------------------------
// Invalid labels.
//
// The kernels never read out of bounds with a label and never trap (a device
// assert would leave the CUDA context unusable): a label outside [0, C) that
// is neither ignore_index nor ood_index makes its pixel an ignored one (an
// ood_index label is never invalid: with entropy maximisation on it is an OoD
// pixel, uce::label_code). With check_labels the forward also records the
// lowest flat pixel index with an invalid label in a one-element int64 device
// buffer, preset to kNoBadPixel; after the launch the glue copies those 8
// bytes back on the current stream and raises the same ValueError as the
// other backends (naming ood_index when entropy maximisation is on). That
// copy synchronises the host with the stream, once per checked forward: the
// price of a raised error instead of a silently ignored pixel. While the
// stream is being captured into a CUDA graph a synchronising copy is not
// allowed, so the check is skipped there (graph warm-up runs, which are not
// captured, check). Without check_labels no buffer is allocated and nothing
// synchronises; uce_backward never checks (an invalid label there gives 0
// gradient, as its forward gave 0 loss).

void raise_if_bad_label(const at::Tensor& bad_pixel, const at::Tensor& target,
                        int64_t C, int64_t ignore_index, int64_t ood_index,
                        cudaStream_t stream) {
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
  raise_bad_label(label, C, ignore_index, ood_index);
}

// ---------------------------------------------------------------------------
// Operators.

std::tuple<at::Tensor, at::Tensor, at::Tensor> uce_forward_cuda(
    const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& samples,
    const std::optional<at::Tensor>& sigma,
    const std::optional<at::Tensor>& weight, double alpha,
    int64_t ignore_index, double label_smoothing, int64_t correction,
    bool check_labels, int64_t ood_index, double ood_scale) {
  const Forward f = prepare_forward(
      input, target, samples, sigma, weight, alpha, ignore_index,
      label_smoothing, correction, check_labels, ood_index, ood_scale,
      check_cuda);
  if (!f.launch) return f.outputs();
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor scratch =
      scratch_tensor(uce_cuda::forward_scratch_floats(f.args), input);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(uce_cuda::forward(f.args, float_ptr(scratch), stream));
  if (f.bad_pixel.defined()) {
    raise_if_bad_label(f.bad_pixel, target, f.args.C, ignore_index, ood_index,
                       stream);
  }
  return f.outputs();
}

at::Tensor uce_backward_cuda(const at::Tensor& grad_loss,
                             const at::Tensor& input, const at::Tensor& target,
                             const at::Tensor& norm,
                             const at::Tensor& pixel_weight,
                             const std::optional<at::Tensor>& weight,
                             int64_t ignore_index, double label_smoothing,
                             int64_t ood_index, double ood_scale) {
  const Backward g = prepare_backward(grad_loss, input, target, norm,
                                      pixel_weight, weight, ignore_index,
                                      label_smoothing, ood_index, ood_scale,
                                      check_cuda);
  if (!g.launch) return g.grad_input;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(uce_cuda::backward(g.args, stream));
  return g.grad_input;
}

}  // namespace
}  // namespace uce_cuda_glue

TORCH_LIBRARY_IMPL(uce_fast, CUDA, m) {
  m.impl("uce_forward", &uce_cuda_glue::uce_forward_cuda);
  m.impl("uce_backward", &uce_cuda_glue::uce_backward_cuda);
}
