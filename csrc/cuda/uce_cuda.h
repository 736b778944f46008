// Host-side interface of the CUDA kernels: plain pointers, sizes, a dtype tag
// and a stream. No torch headers, so the .cu files build with nvcc alone; the
// torch-facing glue (checks, allocation, op registration) is uce_cuda.cpp.
//
// Layout (the op contract in uce_fast/ops.py): every tensor is contiguous;
// input (B, C, N), samples (beta, B, C, N), per-pixel tensors (B, N). So the
// class stride is N, the batch stride C * N and the sample stride B * C * N;
// all offsets are computed in int64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace uce_cuda {

// Element type of input / samples / grad_input.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// uce_forward: per-pixel weighted CE, the weight from the Monte-Carlo samples
// or from a given sigma.
struct ForwardArgs {
  int64_t B = 0, C = 0, N = 0;

  // Monte-Carlo stack (nullptr when sigma_in is given).
  const void* samples = nullptr;
  DType samples_dtype = DType::kFloat32;
  int64_t beta = 0;
  float inv_denom = 0.0f;  // 1 / (beta - correction)

  // Given sigma (B, N) float32 (nullptr when samples are given).
  const float* sigma_in = nullptr;

  // Cross-entropy part.
  const void* input = nullptr;
  DType input_dtype = DType::kFloat32;
  const int64_t* target = nullptr;
  const float* weight = nullptr;  // (C,) class weights, nullptr = all ones
  float alpha = 0.0f;
  float one_minus_eps = 1.0f;
  float eps_over_c = 0.0f;
  int64_t ignore_index = -100;
  // Entropy maximisation (uce::label_code, uce::pixel_ce): a pixel labelled
  // ood_index is an OoD pixel while ood_on (ood_scale > 0): its loss is the CE
  // against the uniform distribution (eps = 1, inv_c = 1 / C) times
  // ood_scale, which is also its saved pixel weight. ood_index ==
  // ignore_index: off; with ood_scale == 0 (ood_on false) such a pixel is an
  // ignored one.
  int64_t ood_index = -100;
  bool ood_on = false;
  float ood_scale = 0.0f;
  float inv_c = 0.0f;
  // Lowest flat pixel index (b * N + n) whose label is neither in [0, C) nor
  // ignore_index nor ood_index. One int64 in device memory, preset to
  // INT64_MAX by the caller; kernels lower it with atomicMin. nullptr: labels
  // are not checked. Either way such a pixel is treated as ignored and its
  // label never used as an index.
  long long* bad_pixel = nullptr;

  // Outputs, (B, N) each: loss, pixel weight and the softmax normaliser of
  // the logits, norm_max = max_c x_c and norm_log = log sum_c exp(x_c - max)
  // (the two planes of the op's norm (2, B, N)).
  float* loss = nullptr;
  float* norm_max = nullptr;
  float* norm_log = nullptr;
  float* pixel_weight = nullptr;
};

struct BackwardArgs {
  int64_t B = 0, C = 0, N = 0;
  const float* grad_loss = nullptr;  // (B, N)
  const void* input = nullptr;       // (B, C, N)
  DType input_dtype = DType::kFloat32;
  const int64_t* target = nullptr;
  const float* norm_max = nullptr;  // (B, N) each, as written by forward()
  const float* norm_log = nullptr;
  const float* pixel_weight = nullptr;
  const float* weight = nullptr;
  float one_minus_eps = 1.0f;
  float eps_over_c = 0.0f;
  // Labels are not checked: a pixel whose label is neither in [0, C) nor
  // ignore_index nor ood_index gets 0 gradient, like an ignored one.
  int64_t ignore_index = -100;
  // Entropy maximisation, as in ForwardArgs; at an OoD pixel the saved
  // pixel_weight is ood_scale.
  int64_t ood_index = -100;
  bool ood_on = false;
  float ood_scale = 0.0f;
  float inv_c = 0.0f;
  void* grad_input = nullptr;  // (B, C, N), dtype of input
};

// Floats of device scratch that forward() needs for these arguments: 0 except
// on the class-chunked path (C > 64) with so many samples that the per-sample
// softmax normalisers do not fit in shared memory.
int64_t forward_scratch_floats(const ForwardArgs& a);

// Enqueue the kernels on `stream`; they return without synchronising. scratch
// must hold forward_scratch_floats(a) floats (may be nullptr when that is 0).
// Requires B * N > 0.
cudaError_t forward(const ForwardArgs& a, float* scratch, cudaStream_t stream);
cudaError_t backward(const BackwardArgs& a, cudaStream_t stream);

}  // namespace uce_cuda
