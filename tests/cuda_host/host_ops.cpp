// The CUDA ops on CPU tensors: the launchers of csrc/cuda (uce_cuda::forward,
// backward, mc_accumulate, mc_reduce), built as host C++ against the
// emulation in include/cuda_host.h, driven with the argument structs that the
// torch glue builds (csrc/cuda/op_args.h), as torch.ops.uce_cuda_host.*
// with the schemas of torch.ops.uce_fast.*. Differences from the CUDA glue
// (uce_cuda.cpp, mc_cuda.cpp): CPU tensors, no stream, and every output and
// scratch buffer is filled with NaN (-7 for pred) before the launch, so that
// an element a kernel fails to write shows as a mismatch.
//
// configure() sets the emulated device; launches() returns and clears the
// launch log, one "kernel|grid|grid_run|block|smem_bytes|error" line each.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/mc_cuda.h"
#include "cuda/op_args.h"
#include "cuda/uce_cuda.h"

namespace uce_cuda_host {
namespace {

using namespace uce_cuda_glue;

void check_cpu(const at::Tensor& t, const char* name, const at::Device&) {
  TORCH_CHECK(t.device().is_cpu(), "uce_fast (CUDA kernels on the host): ",
              name, " must be a CPU tensor, got device ", t.device());
}

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "uce_fast (CUDA kernels on the host): ", op,
              " failed: ", cudaGetErrorString(e));
}

void poison(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return;
  if (t.is_floating_point()) {
    t.fill_(std::numeric_limits<float>::quiet_NaN());
  } else {
    t.fill_(-7);
  }
}

at::Tensor poisoned_scratch(int64_t floats, const at::Tensor& like) {
  at::Tensor s = scratch_tensor(floats, like);
  poison(s);
  return s;
}

// The read-back of uce_cuda.cpp (checked forward only), without the device
// copy.
void raise_if_bad_label(const at::Tensor& bad_pixel, const at::Tensor& target,
                        int64_t C, int64_t ignore_index, int64_t ood_index) {
  const int64_t pixel = bad_pixel.item<int64_t>();
  if (pixel == kNoBadPixel) return;
  raise_bad_label(target.data_ptr<int64_t>()[pixel], C, ignore_index,
                  ood_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> uce_forward(
    const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& samples,
    const std::optional<at::Tensor>& sigma,
    const std::optional<at::Tensor>& weight, double alpha,
    int64_t ignore_index, double label_smoothing, int64_t correction,
    bool check_labels, int64_t ood_index, double ood_scale) {
  const Forward f = prepare_forward(
      input, target, samples, sigma, weight, alpha, ignore_index,
      label_smoothing, correction, check_labels, ood_index, ood_scale,
      check_cpu);
  TORCH_CHECK(f.bad_pixel.defined() == (check_labels && f.launch),
              "uce_fast (CUDA kernels on the host): a bad-pixel buffer must "
              "exist exactly for a checked forward with pixels");
  TORCH_CHECK((f.args.bad_pixel != nullptr) == f.bad_pixel.defined(),
              "uce_fast (CUDA kernels on the host): args.bad_pixel must point "
              "at the bad-pixel buffer");
  if (!f.launch) return f.outputs();
  for (const at::Tensor& t : {f.loss, f.norm, f.pixel_weight}) poison(t);
  const at::Tensor scratch =
      poisoned_scratch(uce_cuda::forward_scratch_floats(f.args), input);
  check_launch(uce_cuda::forward(f.args, float_ptr(scratch), nullptr),
               "uce_forward");
  if (f.bad_pixel.defined()) {
    raise_if_bad_label(f.bad_pixel, target, f.args.C, ignore_index,
                       ood_index);
  }
  return f.outputs();
}

at::Tensor uce_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                        const at::Tensor& target, const at::Tensor& norm,
                        const at::Tensor& pixel_weight,
                        const std::optional<at::Tensor>& weight,
                        int64_t ignore_index, double label_smoothing,
                        int64_t ood_index, double ood_scale) {
  const Backward g = prepare_backward(grad_loss, input, target, norm,
                                      pixel_weight, weight, ignore_index,
                                      label_smoothing, ood_index, ood_scale,
                                      check_cpu);
  if (!g.launch) return g.grad_input;
  poison(g.grad_input);
  check_launch(uce_cuda::backward(g.args, nullptr), "uce_backward");
  return g.grad_input;
}

void mc_accumulate_(at::Tensor& mean, at::Tensor& m2, at::Tensor& entropy,
                    const at::Tensor& samples, int64_t count, int64_t in_h,
                    int64_t in_w, int64_t out_h, int64_t out_w,
                    bool align_corners) {
  const McCall m =
      prepare_mc_accumulate(mean, m2, entropy, samples, count, in_h, in_w,
                            out_h, out_w, align_corners, check_cpu);
  if (!m.launch) return;
  const at::Tensor scratch =
      poisoned_scratch(uce_cuda::mc_scratch_floats(m.args), samples);
  check_launch(uce_cuda::mc_accumulate(m.args, float_ptr(scratch), nullptr),
               "mc_accumulate_");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mc_reduce(const std::optional<at::Tensor>& samples,
          const std::optional<at::Tensor>& mean,
          const std::optional<at::Tensor>& m2,
          const std::optional<at::Tensor>& entropy, int64_t count,
          int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
          bool align_corners, int64_t correction, bool want_probs,
          bool want_entropy) {
  const McCall m = prepare_mc_reduce(
      samples, mean, m2, entropy, count, in_h, in_w, out_h, out_w,
      align_corners, correction, want_probs, want_entropy, check_cpu);
  if (!m.launch) return m.outputs;
  std::apply([](const auto&... t) { (poison(t), ...); }, m.outputs);
  const at::Tensor scratch = poisoned_scratch(
      uce_cuda::mc_scratch_floats(m.args), std::get<0>(m.outputs));
  check_launch(uce_cuda::mc_reduce(m.args, float_ptr(scratch), nullptr),
               "mc_reduce");
  return m.outputs;
}

void configure(int64_t sm_count, int64_t max_blocks, bool reverse_blocks,
               bool fail_device_query) {
  cuda_host::Config& c = cuda_host::config();
  c.sm_count = static_cast<int>(sm_count);
  c.max_blocks = max_blocks;
  c.reverse_blocks = reverse_blocks;
  c.fail_device_query = fail_device_query;
}

std::vector<std::string> launches() {
  std::vector<std::string> lines;
  for (const cuda_host::LaunchRecord& r : cuda_host::launch_log()) {
    lines.push_back(r.kernel + "|" + std::to_string(r.grid) + "|" +
                    std::to_string(r.grid_run) + "|" +
                    std::to_string(r.block) + "|" +
                    std::to_string(r.smem_bytes) + "|" +
                    cuda_host::error_name(r.result));
  }
  cuda_host::launch_log().clear();
  return lines;
}

}  // namespace
}  // namespace uce_cuda_host

TORCH_LIBRARY(uce_cuda_host, m) {
  m.def(
      "uce_forward(Tensor input, Tensor target, Tensor? samples, "
      "Tensor? sigma, Tensor? weight, float alpha, int ignore_index, "
      "float label_smoothing, int correction, bool check_labels, "
      "int ood_index, float ood_scale) -> (Tensor, Tensor, Tensor)",
      &uce_cuda_host::uce_forward);
  m.def(
      "uce_backward(Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor norm, Tensor pixel_weight, Tensor? weight, int ignore_index, "
      "float label_smoothing, int ood_index, float ood_scale) -> Tensor",
      &uce_cuda_host::uce_backward);
  m.def(
      "mc_accumulate_(Tensor(a!) mean, Tensor(b!) m2, Tensor(c!) entropy, "
      "Tensor samples, int count, int in_h, int in_w, int out_h, int out_w, "
      "bool align_corners) -> ()",
      &uce_cuda_host::mc_accumulate_);
  m.def(
      "mc_reduce(Tensor? samples, Tensor? mean, Tensor? m2, Tensor? entropy, "
      "int count, int in_h, int in_w, int out_h, int out_w, "
      "bool align_corners, int correction, bool want_probs, bool want_entropy) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)",
      &uce_cuda_host::mc_reduce);
  m.def(
      "configure(int sm_count, int max_blocks, bool reverse_blocks, "
      "bool fail_device_query) -> ()",
      &uce_cuda_host::configure);
  m.def("launches() -> str[]", &uce_cuda_host::launches);
}
