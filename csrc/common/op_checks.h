// Argument checks of the uce_forward / uce_backward ops, shared by the CPU and
// the CUDA glue (and the host build of the CUDA kernels). Host-only (ATen, no
// CUDA headers). Each backend passes its device check,
// `on_device(tensor, name, device)`, which raises unless `tensor` is on
// `device`, the device of the op's logits.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace uce_checks {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

template <typename OnDevice>
void check_logits(const at::Tensor& t, const char* name,
                  const at::Device& device, const OnDevice& on_device) {
  on_device(t, name, device);
  TORCH_CHECK(is_float_type(t.scalar_type()), "uce_fast: ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "uce_fast: ", name, " must be contiguous");
}

// A contiguous float32 per-pixel tensor: (B, N), or (planes, B, N) when
// planes > 1.
template <typename OnDevice>
void check_f32_bn(const at::Tensor& t, const char* name, int64_t B, int64_t N,
                  const at::Device& device, const OnDevice& on_device,
                  int64_t planes = 1) {
  on_device(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "uce_fast: ", name,
              " must be float32, got ", t.scalar_type());
  if (planes > 1) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == planes && t.size(1) == B &&
                    t.size(2) == N,
                "uce_fast: ", name, " must have shape (", planes, ", ", B,
                ", ", N, "), got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == N,
                "uce_fast: ", name, " must have shape (", B, ", ", N,
                "), got ", t.sizes());
  }
  TORCH_CHECK(t.is_contiguous(), "uce_fast: ", name, " must be contiguous");
}

template <typename OnDevice>
void check_target(const at::Tensor& target, int64_t B, int64_t N,
                  const at::Device& device, const OnDevice& on_device) {
  on_device(target, "target", device);
  TORCH_CHECK(target.scalar_type() == at::kLong,
              "uce_fast: target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == B &&
                  target.size(1) == N,
              "uce_fast: target must have shape (", B, ", ", N, "), got ",
              target.sizes());
  TORCH_CHECK(target.is_contiguous(), "uce_fast: target must be contiguous");
}

// The logits (B, C, N); their device is the op's device.
template <typename OnDevice>
void check_input(const at::Tensor& input, const OnDevice& on_device) {
  check_logits(input, "input", input.device(), on_device);
  TORCH_CHECK(input.dim() == 3,
              "uce_fast: input must have shape (B, C, N), got ",
              input.sizes());
  TORCH_CHECK(input.size(1) >= 1,
              "uce_fast: input must have at least one class");
  TORCH_CHECK(input.size(1) <= INT32_MAX,
              "uce_fast: input has too many classes");
}

// Class weights (C,) float32, or nullptr.
template <typename OnDevice>
const float* check_weight(const std::optional<at::Tensor>& weight, int64_t C,
                          const at::Device& device,
                          const OnDevice& on_device) {
  if (!weight.has_value() || !weight->defined()) return nullptr;
  const at::Tensor& w = *weight;
  on_device(w, "weight", device);
  TORCH_CHECK(w.scalar_type() == at::kFloat,
              "uce_fast: weight must be float32, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C,
              "uce_fast: weight must have shape (", C, ",), got ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "uce_fast: weight must be contiguous");
  return w.data_ptr<float>();
}

// Validates the Monte-Carlo stack and returns beta.
template <typename OnDevice>
int64_t check_mc_stack(const at::Tensor& samples, int64_t correction,
                       const at::Device& device, const OnDevice& on_device) {
  check_logits(samples, "samples", device, on_device);
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

// The entropy-maximisation arguments: ood_index == ignore_index (off) or a
// label outside [0, C); ood_scale finite and >= 0.
inline void check_ood(int64_t ood_index, double ood_scale, int64_t C,
                      int64_t ignore_index) {
  TORCH_CHECK_VALUE(ood_index == ignore_index || ood_index < 0 || ood_index >= C,
                    "uce_fast: ood_index must be outside [0, ", C,
                    ") (or equal ignore_index to turn entropy maximisation off), "
                    "got ",
                    ood_index);
  TORCH_CHECK_VALUE(ood_scale >= 0.0 && ood_scale <= 3.4e38,
                    "uce_fast: ood_scale must be a finite number >= 0, got ",
                    ood_scale);
}

// The ValueError for a bad label (outside [0, C), neither ignore_index nor,
// when entropy maximisation is on, ood_index), worded as every backend words
// it.
[[noreturn]] inline void raise_bad_label(int64_t label, int64_t C,
                                         int64_t ignore_index,
                                         int64_t ood_index) {
  if (ood_index != ignore_index) {
    TORCH_CHECK_VALUE(false, "target contains label ", label, ", outside [0, ",
                      C, ") and neither ignore_index (", ignore_index,
                      ") nor ood_index (", ood_index, ")");
  }
  TORCH_CHECK_VALUE(false, "target contains label ", label, ", outside [0, ",
                    C, ") and not ignore_index (", ignore_index, ")");
}

inline void check_label_smoothing(double label_smoothing) {
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "uce_fast: label_smoothing must be in [0, 1], got ",
                    label_smoothing);
}

}  // namespace uce_checks
